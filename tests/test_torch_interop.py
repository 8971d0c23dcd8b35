"""Parity of rnnjax.interop.torch with PyTorch's RNN, LSTM and GRU modules (outputs, states, round trips, errors).

Most tests run under ``jax.disable_jit()``: each configuration would otherwise compile its own scan, which
costs far more than the tiny computation. ``test_jitted_padded_matches_packed`` checks the compiled path.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rnnjax import GRU, LSTM, Bidirectional, JordanRNN, SimpleRNN, Stack  # noqa: E402
from rnnjax.interop import from_torch, from_torch_state, to_torch, to_torch_state  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning"),
]

I, H, T, B, P = 3, 5, 6, 3, 2  # input, hidden, time, batch, LSTM projection sizes
MODES = ("rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru")
LENGTHS = np.array([4, 6, 1])  # (B,), unsorted, with a length-1 row
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def eager():
    """Runs a test without compiling (op-by-op dispatch is far cheaper than one compile per configuration)."""
    with jax.disable_jit():
        yield


def make_module(mode, num_layers=1, bidirectional=False, batch_first=False, bias=True, seed=0):
    """A PyTorch module of kind ``mode`` with seeded random parameters (biases included)."""
    torch.manual_seed(seed)
    options = dict(num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    if mode.startswith("rnn"):
        return torch.nn.RNN(I, H, nonlinearity=mode.removeprefix("rnn_"), **options)
    if mode.startswith("lstm"):
        return torch.nn.LSTM(I, H, proj_size=P if mode == "lstm_proj" else 0, **options)
    return torch.nn.GRU(I, H, **options)


def make_inputs(batch_first, batch=True, seed=1):
    """Random float32 inputs: ``(B, T, I)`` if ``batch_first``, ``(T, B, I)`` otherwise, ``(T, I)`` unbatched."""
    shape = ((B, T, I) if batch_first else (T, B, I)) if batch else (T, I)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def make_torch_state(module, batch=True, seed=2):
    """A random initial state for ``module``: ``h_0`` ``(L*D, *B, P)``, or ``(h_0, c_0)`` for an LSTM."""
    generator = torch.Generator().manual_seed(seed)
    num_states = module.num_layers * (2 if module.bidirectional else 1)
    batch_shape = (B,) if batch else ()
    h_0 = torch.randn(num_states, *batch_shape, module.proj_size or H, generator=generator)
    if module.mode != "LSTM":
        return h_0
    return h_0, torch.randn(num_states, *batch_shape, H, generator=generator)


def run_torch(module, xs, hx=None, lengths=None):
    """PyTorch's outputs (NumPy) and final state, through a packed sequence when ``lengths`` is given."""
    inputs = torch.from_numpy(xs)
    module.eval()  # no dropout between layers
    with torch.no_grad():
        if lengths is None:
            ys, state = module(inputs, hx)
            return ys.numpy(), state
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            inputs, torch.as_tensor(lengths), batch_first=module.batch_first, enforce_sorted=False
        )
        ys, state = module(packed, hx)
        ys, _ = torch.nn.utils.rnn.pad_packed_sequence(ys, batch_first=module.batch_first, total_length=T)
        return ys.numpy(), state


def assert_states_close(got, want):
    """Compares ``h_n`` tensors, or ``(h_n, c_n)`` pairs, shapes included."""
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert isinstance(g, torch.Tensor)
        assert g.shape == w.shape
        np.testing.assert_allclose(g.numpy(), w.numpy(), **TOL)


def random_params(layer, seed=3):
    """Random float32 parameters for ``layer`` with input size ``I`` (biases non-zero, unlike ``init``'s).

    Built with NumPy from the shapes ``init`` would give, which is far cheaper than running ``init``.
    """
    shapes = jax.eval_shape(lambda key: layer.init(key, I), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), jnp.float32), shapes)


# PyTorch -> rnnjax: outputs and final states.


@pytest.mark.usefixtures("eager")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
@pytest.mark.parametrize("mode", MODES)
def test_matches_torch(mode, num_layers, bidirectional, batch_first, bias):
    module = make_module(mode, num_layers, bidirectional, batch_first, bias)
    xs = make_inputs(batch_first)  # (B, T, I) or (T, B, I)
    want_ys, want_state = run_torch(module, xs)
    layer, params = from_torch(module)
    assert isinstance(layer, Stack) and len(layer.layers) == num_layers
    assert layer.time_major == (not batch_first)
    carry, ys = layer.apply(params, xs)
    assert ys.shape == want_ys.shape
    np.testing.assert_allclose(np.asarray(ys), want_ys, **TOL)
    assert_states_close(to_torch_state(layer, carry), want_state)


@pytest.mark.usefixtures("eager")
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("mode", MODES)
def test_padded_matches_packed(mode, bidirectional, batch_first):
    """Padded batches with lengths and initial states against pack_padded_sequence, outputs and h_n / c_n."""
    module = make_module(mode, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
    xs = make_inputs(batch_first)
    hx = make_torch_state(module)
    want_ys, want_state = run_torch(module, xs, hx, LENGTHS)
    layer, params = from_torch(module)
    carry_0 = from_torch_state(layer, *hx) if isinstance(hx, tuple) else from_torch_state(layer, hx)
    carry, ys = layer.apply(params, xs, carry_0, lengths=LENGTHS)
    np.testing.assert_allclose(np.asarray(ys), want_ys, **TOL)  # zero past each length on both sides
    assert_states_close(to_torch_state(layer, carry), want_state)
    assert_states_close(to_torch_state(layer, carry_0), hx)  # the state conversions are inverse


@pytest.mark.parametrize("mode", ["lstm_proj", "gru"])
def test_jitted_padded_matches_packed(mode):
    module = make_module(mode, num_layers=2, bidirectional=True, batch_first=True)
    xs = make_inputs(batch_first=True)
    hx = make_torch_state(module)
    want_ys, want_state = run_torch(module, xs, hx, LENGTHS)
    layer, params = from_torch(module)
    carry_0 = from_torch_state(layer, hx)  # an LSTM's (h_0, c_0) pair is accepted as h_0, like PyTorch's hx
    apply = jax.jit(lambda params, xs, carry, lengths: layer.apply(params, xs, carry, lengths=lengths))
    carry, ys = apply(params, xs, carry_0, jnp.asarray(LENGTHS))
    np.testing.assert_allclose(np.asarray(ys), want_ys, **TOL)
    assert_states_close(to_torch_state(layer, carry), want_state)


@pytest.mark.usefixtures("eager")
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
@pytest.mark.parametrize("mode", MODES)
def test_unbatched_with_initial_state(mode, batch_first):
    module = make_module(mode, num_layers=2, bidirectional=True, batch_first=batch_first)
    xs = make_inputs(batch_first, batch=False)  # (T, I) whatever batch_first says, as in PyTorch
    hx = make_torch_state(module, batch=False)  # (L*D, P)
    want_ys, want_state = run_torch(module, xs, hx)
    layer, params = from_torch(module)
    carry, ys = layer.apply(params, xs, from_torch_state(layer, hx))
    assert ys.shape == want_ys.shape == (T, 2 * (module.proj_size or H))
    np.testing.assert_allclose(np.asarray(ys), want_ys, **TOL)
    assert_states_close(to_torch_state(layer, carry), want_state)


def test_converted_parameters():
    module = make_module("lstm_proj", num_layers=2, bidirectional=True).double()
    module.dropout = 0.25
    layer, params = from_torch(module)
    assert layer.dropout == 0.25
    assert isinstance(layer.layers[1], Bidirectional)
    assert layer.layers[1].forward == LSTM(hidden_size=H, proj_size=P)
    backward = params["layers"][1]["backward"]
    assert {name: value.shape for name, value in backward.items()} == {
        "w_ih": (2 * P, 4 * H),
        "w_hh": (P, 4 * H),
        "b": (4 * H,),
        "w_hr": (H, P),
    }
    assert all(isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    expected_b = (module.bias_ih_l1_reverse + module.bias_hh_l1_reverse).detach().float().numpy()
    np.testing.assert_allclose(np.asarray(backward["b"]), expected_b, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(backward["w_hr"]), module.weight_hr_l1_reverse.detach().float().numpy().T)

    gru_layer, gru_params = from_torch(make_module("gru", bias=True))
    assert gru_layer.layers[0] == GRU(hidden_size=H)
    assert sorted(gru_params["layers"][0]) == ["b_hh", "b_ih", "w_hh", "w_ih"]


def test_parameters_are_copies():
    module = make_module("gru")
    _, params = from_torch(module)
    before = np.asarray(params["layers"][0]["w_ih"]).copy()
    with torch.no_grad():
        module.weight_ih_l0.add_(1.0)
    np.testing.assert_array_equal(np.asarray(params["layers"][0]["w_ih"]), before)


# rnnjax -> PyTorch.

ROUND_TRIP_LAYERS = {
    "rnn_relu_L2": Stack([SimpleRNN(hidden_size=H, activation="relu")] * 2),
    "rnn_tanh_nobias_bi": Stack([Bidirectional(SimpleRNN(hidden_size=H, use_bias=False))], time_major=True),
    "lstm_proj_bi_L2": Stack([Bidirectional(LSTM(hidden_size=H, proj_size=P))] * 2, dropout=0.25),
    "lstm_L2_time_major": Stack([LSTM(hidden_size=H)] * 2, time_major=True),
    "gru_bi_L2": Stack([Bidirectional(GRU(hidden_size=H))] * 2),
}


@pytest.mark.usefixtures("eager")
@pytest.mark.parametrize("name", list(ROUND_TRIP_LAYERS))
def test_to_torch_round_trip(name):
    layer = ROUND_TRIP_LAYERS[name]
    params = random_params(layer)
    xs = make_inputs(batch_first=not layer.time_major)
    carry, ys = layer.apply(params, xs, lengths=LENGTHS)

    module = to_torch(layer, params)
    assert module.batch_first == (not layer.time_major)
    assert module.dropout == layer.dropout and module.num_layers == len(layer.layers)
    want_ys, want_state = run_torch(module, xs, lengths=LENGTHS)
    np.testing.assert_allclose(np.asarray(ys), want_ys, **TOL)
    assert_states_close(to_torch_state(layer, carry), want_state)

    layer_back, params_back = from_torch(module)
    _, ys_back = layer_back.apply(params_back, xs, lengths=LENGTHS)
    np.testing.assert_allclose(np.asarray(ys_back), np.asarray(ys), **TOL)


def test_to_torch_keeps_gru_parameters_exactly():
    module = make_module("gru", num_layers=2, bidirectional=True)
    again = to_torch(*from_torch(module))
    assert isinstance(again, torch.nn.GRU)
    for (name, want), (name_again, got) in zip(module.named_parameters(), again.named_parameters()):
        assert name == name_again
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# Errors.


@pytest.mark.parametrize("module", [torch.nn.Linear(3, 5), torch.nn.RNNCell(3, 5), "lstm"])
def test_from_torch_rejects_other_objects(module):
    with pytest.raises(TypeError, match="module must be a torch.nn.RNN"):
        from_torch(module)


def test_from_torch_rejects_dropout_one():
    module = make_module("gru", num_layers=2)
    module.dropout = 1.0
    with pytest.raises(ValueError, match="module.dropout"):
        from_torch(module)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (Stack([LSTM(hidden_size=H, peepholes=True)]), "peepholes"),
        (Stack([GRU(hidden_size=H, reset_after=False)]), "reset_after=False"),
        (Stack([GRU(hidden_size=H)] * 2, residual=True), "residual"),
        (Stack([LSTM(hidden_size=H), GRU(hidden_size=H)]), r"layer.layers\[1\] is GRU"),
        (Stack([GRU(hidden_size=H), GRU(hidden_size=4)]), "same cell type and sizes"),
        (Stack([Bidirectional(GRU(hidden_size=H), LSTM(hidden_size=H))]), r"layers\[0\].backward"),
        (Stack([Bidirectional(GRU(hidden_size=H)), GRU(hidden_size=H)]), "mixes Bidirectional"),
        (Stack([Bidirectional(GRU(hidden_size=H), merge="sum")]), "merge='sum'"),
        (Stack([JordanRNN(hidden_size=H)]), "JordanRNN"),
    ],
    ids=["peepholes", "reset_before", "residual", "mixed", "sizes", "directions", "mixed_bi", "merge", "jordan"],
)
def test_to_torch_rejects_unrepresentable(layer, message):
    with pytest.raises(ValueError, match=message):
        to_torch(layer, {})


def test_to_torch_rejects_bad_arguments():
    cell = LSTM(hidden_size=H)
    with pytest.raises(TypeError, match=r"layer must be an rnnjax.Stack"):
        to_torch(cell, {})
    stack = Stack([cell] * 2)
    params = random_params(stack)
    with pytest.raises(ValueError, match=r"params must be \{'layers'"):
        to_torch(stack, {"layers": params["layers"][:1]})
    del params["layers"][1]["b"]
    with pytest.raises(ValueError, match=r"params\['layers'\]\[1\] must be a dict with keys"):
        to_torch(stack, params)
    params = random_params(stack)
    params["layers"][1]["w_ih"] = jnp.zeros((H + 1, 4 * H))
    with pytest.raises(ValueError, match="weight_ih_l1 must have shape"):
        to_torch(stack, params)


def test_state_conversion_errors():
    lstm, _ = from_torch(make_module("lstm", num_layers=2))
    gru, _ = from_torch(make_module("gru", num_layers=2))
    h_0 = torch.zeros(2, B, H)
    with pytest.raises(ValueError, match="c_0 is required"):
        from_torch_state(lstm, h_0)
    with pytest.raises(ValueError, match="c_0 is only for LSTM"):
        from_torch_state(gru, h_0, h_0)
    with pytest.raises(ValueError, match=r"h_0 must have shape \(num_layers \* num_directions = 2"):
        from_torch_state(gru, torch.zeros(1, B, H))
    with pytest.raises(ValueError, match="c_0 has batch shape"):
        from_torch_state(lstm, h_0, torch.zeros(2, B + 1, H))
    with pytest.raises(TypeError, match="h_0 must be a torch.Tensor"):
        from_torch_state(gru, "zeros")
    with pytest.raises(ValueError, match="carry must be a StackState"):
        to_torch_state(gru, gru.layers[0].initial_carry((B,)))
    with pytest.raises(ValueError, match="carry"):
        to_torch_state(gru, lstm.initial_carry((B,)))


# PyTorch stays optional.


def test_missing_torch_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'rnnjax\[torch\]'"):
        from_torch(object())


def test_import_rnnjax_does_not_import_torch():
    code = "import sys, rnnjax, rnnjax.interop; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
