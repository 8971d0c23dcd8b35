"""Cells against a NumPy reference of their documented equations: step, unroll, streaming, gradients, bf16.

Given a cell from the grid (every kind × every option that changes the equations) with random parameters
(biases and peepholes made non-zero), when it is stepped or unrolled, then the numbers match a float64 NumPy
Python loop written from the docstring math (``tests/_reference.py``).
"""

import dataclasses
import functools

import _reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import CELLS, INPUT_SIZE, assert_tree_close, jit_unroll, make_case, random_params, to_jax_carry, to_np

import rnnjax

CELL_NAMES = list(CELLS)


def documented_shapes(cell, I):
    """Parameter names and shapes as the cells' docstrings list them."""
    H = cell.hidden_size
    if isinstance(cell, rnnjax.SimpleRNN):
        shapes = {"w_ih": (I, H), "w_hh": (H, H)}
        if cell.use_bias:
            shapes["b"] = (H,)
    elif isinstance(cell, rnnjax.JordanRNN):
        O = cell.output_size
        shapes = {"w_ih": (I, H), "w_yh": (O, H), "w_hy": (H, O)}
        if cell.use_bias:
            shapes.update(b_h=(H,), b_y=(O,))
    elif isinstance(cell, rnnjax.LSTM):
        P = cell.proj_size or H
        shapes = {"w_ih": (I, 4 * H), "w_hh": (P, 4 * H)}
        if cell.use_bias:
            shapes["b"] = (4 * H,)
        if cell.peepholes:
            shapes.update(w_ci=(H,), w_cf=(H,), w_co=(H,))
        if cell.proj_size is not None:
            shapes["w_hr"] = (H, P)
    else:
        shapes = {"w_ih": (I, 3 * H), "w_hh": (H, 3 * H)}
        if cell.use_bias:
            shapes.update(b_ih=(3 * H,), b_hh=(3 * H,))
    return shapes


# ---------------------------------------------------------------------------------------------------------
# Parameters, carries, hashability
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CELL_NAMES)
def test_init_gives_documented_names_and_shapes(name, key):
    cell = CELLS[name]
    params = jax.eval_shape(lambda k: cell.init(k, INPUT_SIZE), key)
    assert {k: v.shape for k, v in params.items()} == documented_shapes(cell, INPUT_SIZE)
    assert all(v.dtype == jnp.float32 for v in params.values())
    assert cell.input_size(params) == INPUT_SIZE


@pytest.mark.parametrize("name", ref.cell_grid())
def test_init_conventions(name, key):
    """Biases and peepholes start at zero (the LSTM forget block at forget_bias); each recurrent gate block
    is orthogonal; different keys give different weights."""
    cell = CELLS[name]
    params = cell.init(key, INPUT_SIZE)
    H = cell.hidden_size
    for bias in ("b", "b_h", "b_y", "b_ih", "b_hh", "w_ci", "w_cf", "w_co"):
        if bias in params:
            expected = np.zeros(params[bias].shape)
            if isinstance(cell, rnnjax.LSTM) and bias == "b":
                expected[H : 2 * H] = cell.forget_bias
            np.testing.assert_array_equal(params[bias], expected)
    blocks = {rnnjax.SimpleRNN: 1, rnnjax.LSTM: 4, rnnjax.GRU: 3}.get(type(cell))
    if blocks is not None:
        w_hh = np.asarray(params["w_hh"], np.float64)
        for k in range(blocks):
            block = w_hh[:, k * H : (k + 1) * H]  # (P, H) with P <= H: orthonormal rows
            np.testing.assert_allclose(block @ block.T, np.eye(block.shape[0]), atol=1e-5)
    assert not np.allclose(params["w_ih"], cell.init(jax.random.key(1), INPUT_SIZE)["w_ih"])


@pytest.mark.parametrize("name", ["elman-tanh", "jordan", "lstm-peep-proj", "gru"])
def test_init_with_bfloat16_param_dtype(name, key):
    """Regression: the orthogonal initialiser has no bfloat16 QR kernel; 16-bit params are drawn in float32."""
    cell = dataclasses.replace(CELLS[name], param_dtype=jnp.bfloat16)
    params = cell.init(key, INPUT_SIZE)
    assert all(v.dtype == jnp.bfloat16 for v in params.values())
    params32 = CELLS[name].init(key, INPUT_SIZE)
    for name_, value in params.items():  # the float32 draw, rounded
        np.testing.assert_array_equal(value, params32[name_].astype(jnp.bfloat16))


def test_lstm_forget_bias_and_custom_initializers(key):
    cell = rnnjax.LSTM(hidden_size=2, forget_bias=3.0, kernel_init="zeros", recurrent_init=jax.nn.initializers.ones)
    params = cell.init(key, 2)
    np.testing.assert_array_equal(params["b"], [0, 0, 3, 3, 0, 0, 0, 0])
    np.testing.assert_array_equal(params["w_ih"], np.zeros((2, 8)))
    np.testing.assert_array_equal(params["w_hh"], np.ones((2, 8)))


@pytest.mark.parametrize("name", CELL_NAMES)
@pytest.mark.parametrize("batch_shape", [(), 3, (2, 3)], ids=["none", "int", "2x3"])
def test_initial_carry_is_zero_with_batch_shape_and_dtype(name, batch_shape):
    cell = CELLS[name]
    batch = (batch_shape,) if isinstance(batch_shape, int) else batch_shape
    carry = cell.initial_carry(batch_shape)
    assert isinstance(carry, tuple) and hasattr(carry, "_fields")  # a NamedTuple, never a bare tuple
    sizes = {"h": cell.output_size, "y": cell.output_size, "c": cell.hidden_size}
    for field, leaf in zip(carry._fields, carry):
        assert leaf.shape == (*batch, sizes[field]) and leaf.dtype == jnp.float32
        np.testing.assert_array_equal(leaf, 0.0)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in cell.initial_carry(batch_shape, jnp.bfloat16))


@pytest.mark.parametrize("name", CELL_NAMES)
def test_cells_are_hashable_static_jit_arguments(name):
    cell = CELLS[name]
    twin = dataclasses.replace(cell)
    assert twin is not cell and twin == cell and hash(twin) == hash(cell)
    assert dataclasses.replace(cell, hidden_size=cell.hidden_size + 1) != cell
    with pytest.raises(dataclasses.FrozenInstanceError):
        cell.hidden_size = 7
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def scaled(c, x):
        traces.append(c)
        return x * c.output_size

    assert float(scaled(cell, jnp.float32(1.0))) == float(scaled(twin, jnp.float32(1.0))) == cell.output_size
    assert len(traces) == 1  # the equal twin hit the cache


def test_output_sizes():
    assert rnnjax.SimpleRNN(hidden_size=5).output_size == 5
    assert rnnjax.JordanRNN(hidden_size=5).output_size == 5
    assert rnnjax.JordanRNN(hidden_size=5, output_size=2).output_size == 2
    assert rnnjax.LSTM(hidden_size=5).output_size == 5
    assert rnnjax.LSTM(hidden_size=5, proj_size=2).output_size == 2
    assert rnnjax.GRU(hidden_size=5).output_size == 5


# ---------------------------------------------------------------------------------------------------------
# Numerics against the NumPy reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, batch_shape",
    [(name, (2, 3)) for name in CELL_NAMES] + [(name, ()) for name in ref.CORE],
    ids=[f"{name}-2x3" for name in CELL_NAMES] + [f"{name}-none" for name in ref.CORE],
)
def test_step_matches_numpy(name, batch_shape):
    # Given random parameters, a random carry and a random input
    cell = CELLS[name]
    params, xs, carry = make_case(cell, 1, batch_shape, num_steps=1)
    # When one step is taken
    new_carry, y = cell.step(params, carry, xs[..., 0, :])
    # Then carry and output match the reference, row by row
    expected_carry, expected_ys = ref.unroll(cell, params, to_np(xs), to_np(carry))
    assert type(new_carry) is type(carry)
    assert y.shape == (*batch_shape, cell.output_size) and y.dtype == jnp.float32
    assert_tree_close(new_carry, expected_carry)
    np.testing.assert_allclose(y, expected_ys[..., 0, :], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_unroll_matches_numpy_loop(name):
    cell = CELLS[name]
    params, xs, carry = make_case(cell, 4)
    final, ys = jit_unroll(cell, params, xs, carry, lengths=ref.full_lengths(xs))
    expected_final, expected_ys = ref.unroll(cell, params, to_np(xs), to_np(carry))
    assert ys.shape == (*xs.shape[:-1], cell.output_size)
    np.testing.assert_allclose(ys, expected_ys, rtol=2e-5, atol=2e-5)
    assert_tree_close(final, expected_final)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_streaming_step_by_step_equals_unroll(name):
    """Feeding one element at a time through ``step`` gives unroll's outputs and final carry."""
    cell = CELLS[name]
    params, xs, carry = make_case(cell, 7)
    final, ys = jit_unroll(cell, params, xs, carry, lengths=ref.full_lengths(xs))
    streamed = []
    for t in range(xs.shape[-2]):
        carry, y = cell.step(params, carry, xs[:, t])
        streamed.append(y)
    np.testing.assert_allclose(jnp.stack(streamed, axis=1), ys, rtol=1e-6, atol=1e-6)
    assert_tree_close(carry, to_np(final), rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("enable_x64")
@pytest.mark.parametrize("name", ref.cell_grid())
def test_step_gradients_match_finite_differences_of_reference(name):
    """d(loss)/d(params, x, carry) of one step against central differences of the NumPy step (float64).

    Gradients through whole padded and reversed sequences are checked in test_sequence.py.
    """
    cell = dataclasses.replace(CELLS[name], param_dtype=jnp.float64)
    params = random_params(cell, 9, INPUT_SIZE, dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(10).standard_normal((2, INPUT_SIZE)))
    carry = to_jax_carry(cell, ref.random_carry(cell, (2,), seed=11), jnp.float64)
    weights = ref.loss_weights(jax.eval_shape(cell.step, params, carry, x)[::-1], seed=12)

    def loss(args):
        new_carry, y = cell.step(*args)
        return ref.weighted_sum(y, new_carry, weights)

    def reference_loss(args):
        new_carry, ys = ref.unroll(cell, args[0], args[2][:, None, :], args[1])
        return ref.weighted_sum(ys[:, 0], new_carry, weights)

    ref.check_gradients(loss, reference_loss, (params, carry, x))


@pytest.mark.torch
def test_numpy_reference_matches_pytorch():
    """Checks the reference itself (gate order, projection, reset-after GRU) against PyTorch's modules."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    xs = rng.standard_normal((2, 5, INPUT_SIZE))

    def tensor(a):
        return torch.tensor(np.asarray(a, np.float64))

    lstm = rnnjax.LSTM(hidden_size=4, proj_size=3)
    p = to_np(random_params(lstm, 13, INPUT_SIZE))
    module = torch.nn.LSTM(INPUT_SIZE, 4, proj_size=3, batch_first=True).double()
    with torch.no_grad():
        module.weight_ih_l0.copy_(tensor(p["w_ih"].T))
        module.weight_hh_l0.copy_(tensor(p["w_hh"].T))
        module.bias_ih_l0.copy_(tensor(p["b"]))
        module.bias_hh_l0.zero_()
        module.weight_hr_l0.copy_(tensor(p["w_hr"].T))
        torch_ys, (torch_h, torch_c) = module(tensor(xs))
    (h, c), ys = ref.unroll(lstm, p, xs, ref.random_carry(lstm, (2,), 0, scale=0.0))
    np.testing.assert_allclose(ys, torch_ys.numpy(), atol=1e-10)
    np.testing.assert_allclose(c, torch_c[0].numpy(), atol=1e-10)

    gru = rnnjax.GRU(hidden_size=4)
    p = to_np(random_params(gru, 14, INPUT_SIZE))
    module = torch.nn.GRU(INPUT_SIZE, 4, batch_first=True).double()
    with torch.no_grad():
        module.weight_ih_l0.copy_(tensor(p["w_ih"].T))
        module.weight_hh_l0.copy_(tensor(p["w_hh"].T))
        module.bias_ih_l0.copy_(tensor(p["b_ih"]))
        module.bias_hh_l0.copy_(tensor(p["b_hh"]))
        torch_ys, _ = module(tensor(xs))
    _, ys = ref.unroll(gru, p, xs, ref.random_carry(gru, (2,), 0, scale=0.0))
    np.testing.assert_allclose(ys, torch_ys.numpy(), atol=1e-10)

    elman = rnnjax.SimpleRNN(hidden_size=4, activation="relu")
    p = to_np(random_params(elman, 15, INPUT_SIZE))
    module = torch.nn.RNN(INPUT_SIZE, 4, nonlinearity="relu", batch_first=True).double()
    with torch.no_grad():
        module.weight_ih_l0.copy_(tensor(p["w_ih"].T))
        module.weight_hh_l0.copy_(tensor(p["w_hh"].T))
        module.bias_ih_l0.copy_(tensor(p["b"]))
        module.bias_hh_l0.zero_()
        torch_ys, _ = module(tensor(xs))
    _, ys = ref.unroll(elman, p, xs, ref.random_carry(elman, (2,), 0, scale=0.0))
    np.testing.assert_allclose(ys, torch_ys.numpy(), atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# Reduced precision
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ref.cell_grid(fast=("jordan-O3-identity-relu", "lstm-peep-proj", "gru-reset-before")))
def test_bfloat16_compute_is_close_to_float32_and_keeps_float32_carry(name):
    # Given float32 parameters and a cell computing its matmuls in bfloat16
    cell = CELLS[name]
    lengths = jnp.array([5, 3, 0])
    params, xs, carry = make_case(cell, 16, lengths=lengths)
    final32, ys32 = jit_unroll(cell, params, xs, carry, lengths=lengths)
    # When unrolled with dtype=bfloat16
    final16, ys16 = jit_unroll(dataclasses.replace(cell, dtype=jnp.bfloat16), params, xs, carry, lengths=lengths)
    # Then outputs are bfloat16 and close, padding stays zero, and the carry stays float32
    assert ys16.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in final16)
    np.testing.assert_allclose(to_np(ys16), ys32, rtol=2e-2, atol=2e-2)
    assert_tree_close(final16, to_np(final32), rtol=2e-2, atol=2e-2)
    np.testing.assert_array_equal(to_np(ys16)[1, 3:], 0.0)


@pytest.mark.parametrize("name", ref.cell_grid(fast=("lstm-peep-proj",), names=("lstm-peep-proj", "gru-reset-before")))
def test_bfloat16_params_and_inputs(name):
    cell = CELLS[name]
    lengths = jnp.array([5, 5, 5])
    params, xs, carry = make_case(cell, 18)
    xs16 = xs.astype(jnp.bfloat16)
    _, ys32 = jit_unroll(cell, params, xs16.astype(jnp.float32), carry, lengths=lengths)
    # bfloat16 inputs with float32 parameters compute in float32: the same numbers as upcast inputs.
    final, ys = jit_unroll(cell, params, xs16, carry, lengths=lengths)
    assert ys.dtype == jnp.float32 and all(leaf.dtype == jnp.float32 for leaf in final)
    np.testing.assert_allclose(ys, ys32, rtol=1e-6, atol=1e-6)
    # bfloat16 parameters (param_dtype) compute in bfloat16; the default carry is float32.
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    final, ys = rnnjax.unroll(dataclasses.replace(cell, param_dtype=jnp.bfloat16), params16, xs16)
    assert ys.dtype == jnp.bfloat16 and all(leaf.dtype == jnp.float32 for leaf in final)
    zero_carry = jax.tree.map(jnp.zeros_like, carry)
    _, ys32 = jit_unroll(cell, params, xs16.astype(jnp.float32), zero_carry, lengths=lengths)
    np.testing.assert_allclose(to_np(ys), ys32, rtol=3e-2, atol=3e-2)
