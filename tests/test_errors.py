"""Input validation: every error names the argument, what was expected and what was given."""

import dataclasses
import logging
import re
import subprocess
import sys

import _reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import CELLS, make_case

import rnnjax

GRU = CELLS["gru"]  # H = 4
LSTM = CELLS["lstm-peep-proj"]  # H = 4, P = 3


@pytest.fixture(scope="module")
def gru_case():
    """GRU params for I = 3, inputs (3, 5, 3), a carry (3, 4)."""
    return make_case(GRU, 60)


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


def test_wrong_feature_size(gru_case):
    params, xs, carry = gru_case
    with pytest.raises(ValueError, match=r"xs has 2 features .* expect 3 \(shape \(3, 5, 2\)\)"):
        rnnjax.unroll(GRU, params, xs[..., :2])
    with pytest.raises(ValueError, match=r"^x has 4 features .* expect 3 \(shape \(3, 4\)\)"):
        GRU.step(params, carry, jnp.ones((3, 4)))
    layer = rnnjax.Bidirectional(GRU)
    with pytest.raises(ValueError, match=r"xs has 2 features .* expect 3"):
        layer.apply(layer.init(jax.random.key(0), 3), xs[..., :2])
    stack = rnnjax.Stack([GRU, GRU])
    with pytest.raises(ValueError, match=r"xs has 2 features .* expect 3"):
        stack.apply(stack.init(jax.random.key(0), 3), xs[..., :2])


def test_wrong_rank(gru_case):
    params, xs, carry = gru_case
    with pytest.raises(
        ValueError, match=r"xs must have shape \(\*batch, time, features\) \(rank >= 2\), got shape \(3,\)"
    ):
        rnnjax.unroll(GRU, params, jnp.ones(3))
    with pytest.raises(
        ValueError, match=r"xs must have shape \(time, \*batch, features\) \(rank >= 2\), got shape \(3,\)"
    ):
        rnnjax.unroll(GRU, params, jnp.ones(3), time_major=True)
    with pytest.raises(ValueError, match=r"x must have shape \(\*batch, input_size\) \(rank >= 1\), got shape \(\)"):
        GRU.step(params, carry, jnp.float32(1.0))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, np.int64])
def test_integer_inputs_are_a_type_error(gru_case, dtype):
    params, xs, carry = gru_case
    name = jnp.dtype(dtype).name if dtype is not np.int64 else "int32"  # int64 is canonicalised without x64
    with pytest.raises(TypeError, match=rf"xs must have a floating-point dtype, got {name}; cast"):
        rnnjax.unroll(GRU, params, np.ones((3, 5, 3), dtype))
    with pytest.raises(TypeError, match=rf"x must have a floating-point dtype, got {name}"):
        GRU.step(params, carry, np.ones((3, 3), dtype))


def test_non_array_inputs_are_a_type_error(gru_case):
    params, _, _ = gru_case
    with pytest.raises(TypeError, match=r"xs must be an array of floats, got str"):
        rnnjax.unroll(GRU, params, "abc")


# ---------------------------------------------------------------------------------------------------------
# Carries
# ---------------------------------------------------------------------------------------------------------


def test_carry_of_wrong_shape(gru_case):
    params, xs, carry = gru_case
    with pytest.raises(ValueError, match=r"carry\.h must have shape \(3, 4\), got \(2, 4\)"):
        rnnjax.unroll(GRU, params, xs, rnnjax.GRUState(h=carry.h[:2]))
    with pytest.raises(ValueError, match=r"carry\.h must have shape \(3, 4\), got \(3, 5\)"):
        rnnjax.unroll(GRU, params, xs, rnnjax.GRUState(h=jnp.zeros((3, 5))))
    lstm_params = ref.random_params(LSTM, 0, 3)
    with pytest.raises(ValueError, match=r"carry\.c must have shape \(3, 4\), got \(3, 3\)"):
        rnnjax.unroll(LSTM, lstm_params, xs, rnnjax.LSTMState(h=jnp.zeros((3, 3)), c=jnp.zeros((3, 3))))
    layer = rnnjax.Bidirectional(GRU)
    bad = rnnjax.BidirectionalState(carry, rnnjax.GRUState(h=carry.h[:1]))
    with pytest.raises(ValueError, match=r"carry\.backward\.h must have shape \(3, 4\), got \(1, 4\)"):
        layer.apply(layer.init(jax.random.key(0), 3), xs, bad)


def test_carry_of_wrong_structure_or_dtype(gru_case):
    params, xs, carry = gru_case
    with pytest.raises(ValueError, match=r"carry must have the structure .*GRUState.*, got .*LSTMState"):
        rnnjax.unroll(GRU, params, xs, rnnjax.LSTMState(carry.h, carry.h))
    with pytest.raises(ValueError, match=r"carry must have the structure .*GRUState.*, got PyTreeDef\(\(\*,\)\)"):
        rnnjax.unroll(GRU, params, xs, (carry.h,))  # a bare tuple is not the NamedTuple
    with pytest.raises(TypeError, match=r"carry\.h must have a floating-point dtype, got int32"):
        rnnjax.unroll(GRU, params, xs, rnnjax.GRUState(h=jnp.zeros((3, 4), jnp.int32)))
    stack = rnnjax.Stack([GRU, GRU])
    with pytest.raises(ValueError, match=r"carry must have the structure"):
        stack.apply(stack.init(jax.random.key(0), 3), xs, carry)


# Every registered cell with its default options: tests/test_conformance.py; here the option grid, whose
# options change the carry (Jordan's output size, the LSTM's projection).
@pytest.mark.parametrize("name", list(CELLS))
def test_step_rejects_a_carry_of_the_wrong_shape_or_structure(name):
    """``cell.step`` checks its carry against ``initial_carry(batch)``, as ``unroll`` does, at trace time."""
    cell = CELLS[name]
    params = cell.init(jax.random.key(0), 3)
    x = jnp.ones((2, 3))
    good = cell.initial_carry((2,))
    cell.step(params, good, x)  # the right carry passes
    jax.jit(cell.step)(params, good, x)
    first = good._fields[0]
    wrong_batch = good._replace(**{first: getattr(good, first)[:1]})
    with pytest.raises(ValueError, match=rf"carry\.{first} must have shape \(2, \d+\), got \(1, \d+\)"):
        cell.step(params, wrong_batch, x)
    with pytest.raises(ValueError, match=rf"carry\.{first} must have shape"):
        jax.jit(cell.step)(params, wrong_batch, x)  # raised while tracing: jitted code pays nothing
    with pytest.raises(ValueError, match=r"carry must have the structure"):
        cell.step(params, tuple(good), x)  # a bare tuple instead of the named carry


# ---------------------------------------------------------------------------------------------------------
# Parameters: compared with what init(key, I) makes, at trace time, and named by their path
# ---------------------------------------------------------------------------------------------------------

LSTM16 = rnnjax.LSTM(hidden_size=16)  # I = 8: w_ih (8, 64), w_hh (16, 64), b (64,)
MADE_BY = r" \(as LSTM\.init\(key, 8\) makes them for inputs of 8 features\)"


def _without(tree, key):
    return {name: value for name, value in tree.items() if name != key}


# The four cases, and their neighbours: (make bad params from good ones, the error's message).
BAD_LSTM16_PARAMS = {
    "missing-w_hh": (
        lambda p: _without(p, "w_hh"),
        r"^params\['w_hh'\] is missing: keys \['b', 'w_hh', 'w_ih'\] expected, got \['b', 'w_ih'\]" + MADE_BY,
    ),
    "gru-params": (
        lambda p: rnnjax.GRU(hidden_size=16).init(jax.random.key(1), 8),
        r"^params\['b'\] is missing and params\['b_hh'\], params\['b_ih'\] are unexpected: keys "
        r"\['b', 'w_hh', 'w_ih'\] expected, got \['b_hh', 'b_ih', 'w_hh', 'w_ih'\]" + MADE_BY,
    ),
    "hidden-32": (
        lambda p: rnnjax.LSTM(hidden_size=32).init(jax.random.key(1), 8),
        r"^params\['b'\] must have shape \(64,\), got \(128,\); params\['w_hh'\] must have shape \(16, 64\), got "
        r"\(32, 128\); params\['w_ih'\] must have shape \(8, 64\), got \(8, 128\)" + MADE_BY,
    ),
    "transposed-w_ih": (
        lambda p: {**p, "w_ih": p["w_ih"].T},
        r"^params\['w_ih'\] must have shape \(8, 64\), got \(64, 8\)" + MADE_BY,
    ),
    "extra-key": (
        lambda p: {**p, "w_hr": jnp.zeros((16, 16))},
        r"^params\['w_hr'\] is unexpected: keys \['b', 'w_hh', 'w_ih'\] expected" + ".*" + MADE_BY,
    ),
    "a-list": (
        lambda p: [p["w_ih"], p["w_hh"], p["b"]],
        r"^params must be a dict with the keys \['b', 'w_hh', 'w_ih'\], got list" + MADE_BY,
    ),
}
RUN_LSTM16 = {
    "unroll": lambda params, xs: rnnjax.unroll(LSTM16, params, xs),
    "jit-unroll": lambda params, xs: jax.jit(lambda p, x: rnnjax.unroll(LSTM16, p, x))(params, xs),
    "step": lambda params, xs: LSTM16.step(params, LSTM16.initial_carry((4,)), xs[:, 0]),
    "jit-step": lambda params, xs: jax.jit(LSTM16.step)(params, LSTM16.initial_carry((4,)), xs[:, 0]),
    "scan-of-step": lambda params, xs: rnnjax.masked_scan(LSTM16.step, params, LSTM16.initial_carry(4), xs, None),
}


@pytest.mark.parametrize("how", list(RUN_LSTM16))
@pytest.mark.parametrize("case", list(BAD_LSTM16_PARAMS))
def test_bad_params_are_named_by_path_with_expected_and_actual(case, how):
    """Before: a bare KeyError, an XLA broadcasting or dot_general error, or xs blamed for a transposed w_ih."""
    make_bad, message = BAD_LSTM16_PARAMS[case]
    good = LSTM16.init(jax.random.key(0), 8)
    xs = jnp.ones((4, 10, 8))
    with pytest.raises(ValueError, match=message):
        RUN_LSTM16[how](make_bad(good), xs)


def test_a_parameter_that_is_not_an_array_is_a_type_error():
    good = LSTM16.init(jax.random.key(0), 8)
    with pytest.raises(TypeError, match=r"^params\['b'\] must be an array, got str" + MADE_BY):
        rnnjax.unroll(LSTM16, {**good, "b": "zeros"}, jnp.ones((4, 10, 8)))


def test_inputs_of_the_wrong_size_are_still_blamed_on_the_inputs():
    """Parameters consistent with another input size are fine: the inputs are named, not the parameters."""
    params = LSTM16.init(jax.random.key(0), 8)
    with pytest.raises(ValueError, match=r"^xs has 64 features on its last axis, but the parameters expect 8"):
        rnnjax.unroll(LSTM16, params, jnp.ones((4, 10, 64)))
    with pytest.raises(ValueError, match=r"^x has 3 features on its last axis, but the parameters expect 8"):
        LSTM16.step(params, LSTM16.initial_carry((4,)), jnp.ones((4, 3)))


def test_params_of_another_float_dtype_are_valid():
    """Only keys and shapes are compared: bfloat16 parameters for a float32-declared cell run."""
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), LSTM16.init(jax.random.key(0), 8))
    _, ys = rnnjax.unroll(LSTM16, params, jnp.ones((2, 3, 8), jnp.bfloat16))
    assert ys.shape == (2, 3, 16)


def test_layer_params_are_named_by_their_full_path():
    stack = rnnjax.Stack([rnnjax.GRU(hidden_size=8), LSTM16])
    params = stack.init(jax.random.key(0), 8)
    bad = {"layers": [params["layers"][0], {**params["layers"][1], "w_hh": jnp.zeros((32, 64))}]}
    message = (
        r"^params\['layers'\]\[1\]\['w_hh'\] must have shape \(16, 64\), got \(32, 64\) "
        r"\(as Stack\.init\(key, 8\) makes them for inputs of 8 features\)"
    )
    with pytest.raises(ValueError, match=message):
        stack.apply(bad, jnp.ones((4, 10, 8)))
    with pytest.raises(ValueError, match=message):
        stack.step(bad, stack.initial_carry((4,)), jnp.ones((4, 8)))
    layer = rnnjax.Bidirectional(LSTM16)
    params = layer.init(jax.random.key(0), 8)
    bad = {"forward": params["forward"], "backward": _without(params["backward"], "b")}
    with pytest.raises(ValueError, match=r"^params\['backward'\]\['b'\] is missing: keys"):
        layer.apply(bad, jnp.ones((4, 10, 8)))
    assert jax.tree.map(jnp.shape, layer.param_shapes(8)) == jax.tree.map(jnp.shape, params)


def test_model_params_are_named_by_their_full_path():
    from rnnjax import attention, models, tasks

    task = tasks.get("adding", seq_len=6)
    model = models.build_model(task, "lstm", hidden_size=16)
    params = model.init(jax.random.key(0))
    bad = {**params, "core": rnnjax.LSTM(hidden_size=32).init(jax.random.key(1), task.input_size)}
    message = r"^params\['core'\]\['b'\] must have shape \(64,\), got \(128,\); .*\(as SequenceModel\.init\(key\)"
    batch = task.train_batch(0, 4)
    with pytest.raises(ValueError, match=message):
        model.apply(bad, batch.inputs, lengths=batch.lengths)
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda p: model.loss_and_metrics(p, batch, task.kind))(bad)
    transformer = attention.Transformer(input_size=task.input_size, output_size=1, d_model=8, num_heads=2)
    params = transformer.init(jax.random.key(0))
    bad = {**params, "head": _without(params["head"], "b")}
    with pytest.raises(ValueError, match=r"^params\['head'\]\['b'\] is missing: .*\(as Transformer\.init\(key\)"):
        transformer.loss_and_metrics(bad, batch, task.kind)


def test_the_params_check_reads_only_shapes(monkeypatch):
    """The check changes nothing in the traced program, and declares a core's parameters once, not per step."""
    cell = rnnjax.LSTM(hidden_size=13)  # a configuration no other test declares: the cache starts cold
    params = cell.init(jax.random.key(0), 5)
    xs = jnp.ones((2, 7, 5))
    checked = jax.make_jaxpr(lambda p, x: rnnjax.unroll(cell, p, x))(params, xs)
    calls = []
    original_init = rnnjax.LSTM.init
    monkeypatch.setattr(rnnjax.LSTM, "init", lambda self, *args: calls.append(args) or original_init(self, *args))
    carry = cell.initial_carry((2,))
    for t in range(7):  # streaming, eagerly: the declaration is read from the cache at every step
        carry, _ = cell.step(params, carry, xs[:, t])
    assert calls == []
    monkeypatch.setattr(rnnjax._checks, "check_core_params", lambda *args, **kwargs: None)
    unchecked = jax.make_jaxpr(lambda p, x: rnnjax.unroll(cell, p, x))(params, xs)
    assert str(checked) == str(unchecked)


# ---------------------------------------------------------------------------------------------------------
# Lengths
# ---------------------------------------------------------------------------------------------------------


def test_lengths_of_wrong_shape_or_dtype(gru_case):
    params, xs, _ = gru_case
    with pytest.raises(ValueError, match=r"lengths must have the batch shape \(3,\), got shape \(2,\)"):
        rnnjax.unroll(GRU, params, xs, lengths=jnp.array([5, 5]))
    with pytest.raises(ValueError, match=r"lengths must have the batch shape \(3,\), got shape \(\)"):
        rnnjax.unroll(GRU, params, xs, lengths=5)
    with pytest.raises(TypeError, match=r"lengths must have an integer dtype, got float32"):
        rnnjax.unroll(GRU, params, xs, lengths=jnp.array([5.0, 5.0, 5.0]))
    with pytest.raises(TypeError, match=r"lengths must have an integer dtype, got bool"):
        rnnjax.unroll(GRU, params, xs, lengths=np.array([True, True, False]))


@pytest.mark.parametrize(
    "lengths, values", [([6, 2, 0], "from 0 to 6"), ([5, -1, 2], "from -1 to 5")], ids=["too-long", "negative"]
)
def test_concrete_lengths_outside_range_raise_at_once(gru_case, lengths, values):
    params, xs, _ = gru_case
    message = rf"lengths must lie in \[0, 5\] \(the time axis of xs\), got values {values}"
    with pytest.raises(ValueError, match=message):
        rnnjax.unroll(GRU, params, xs, lengths=np.array(lengths))
    layer = rnnjax.Bidirectional(GRU)
    with pytest.raises(ValueError, match=message):
        layer.apply(layer.init(jax.random.key(0), 3), xs, lengths=lengths)
    stack = rnnjax.Stack([GRU])
    with pytest.raises(ValueError, match=message):
        stack.apply(stack.init(jax.random.key(0), 3), xs, lengths=jnp.array(lengths))


def test_traced_lengths_outside_range_raise_at_run_time(gru_case):
    params, xs, carry = gru_case
    # the shared jitted unroll: lengths are traced, so they are checked while the program runs
    with pytest.raises(
        Exception, match=r"lengths must lie in \[0, 5\] \(the time axis of xs\), got values from 0 to 6"
    ):
        jax.block_until_ready(ref.jit_unroll(GRU, params, xs, carry, lengths=jnp.array([6, 2, 0])))
    stack = rnnjax.Stack([GRU])
    apply = jax.jit(lambda p, x, n: stack.apply(p, x, lengths=n))
    with pytest.raises(Exception, match=r"lengths must lie in \[0, 5\]"):
        jax.block_until_ready(apply(stack.init(jax.random.key(0), 3), xs, jnp.array([0, -2, 3])))
    # in-range lengths run through the same compiled programs without complaint
    jax.block_until_ready(ref.jit_unroll(GRU, params, xs, carry, lengths=jnp.array([5, 2, 0])))


def test_traced_lengths_outside_range_are_named_first(gru_case, caplog):
    """Under jit the bad value is found while the program runs: the first line logged names lengths and [0, T].

    Before: JAX's log said ``jax.pure_callback failed`` with a whole traceback, and the ValueError came last.
    """
    params, xs, carry = gru_case
    message = r"lengths must lie in \[0, 5\] \(the time axis of xs\), got values from 0 to 6"
    caplog.set_level(logging.ERROR)
    with pytest.raises((jax.errors.JaxRuntimeError, ValueError), match=r"RunTimeCheckError: " + message):
        jax.block_until_ready(ref.jit_unroll(GRU, params, xs, carry, lengths=jnp.array([6, 2, 0])))
    first = caplog.records[0]
    found_while_running = r" \(found while a compiled computation ran; the call fails with an XLA error carrying this "
    found_while_running += r"message\)"
    assert re.fullmatch(message + found_while_running, first.getMessage())
    assert first.exc_info is None and "Traceback" not in caplog.text and "pure_callback failed" not in caplog.text


def test_lengths_outside_range_under_vmap(gru_case, caplog):
    """Under vmap outside jit the values are known while tracing: a plain ValueError at once (before: a
    JaxRuntimeError); under vmap inside jit, as under jit, the first line logged names lengths."""
    params, xs, _ = gru_case

    def run_row(x, n):  # one row: x (5, 3), n ()
        return rnnjax.unroll(GRU, params, x, lengths=n)[1]

    with pytest.raises(
        ValueError, match=r"^lengths must lie in \[0, 5\] \(the time axis of xs\), got values from 1 to 7"
    ):
        jax.vmap(run_row)(xs, jnp.array([1, 7, 3]))
    assert jax.vmap(run_row)(xs, jnp.array([1, 5, 0])).shape == (3, 5, 4)
    caplog.set_level(logging.ERROR)
    with pytest.raises((jax.errors.JaxRuntimeError, ValueError), match=r"RunTimeCheckError: lengths must lie in"):
        jax.block_until_ready(jax.jit(jax.vmap(run_row))(xs, jnp.array([1, 7, 3])))
    assert caplog.records[0].getMessage().startswith("lengths must lie in [0, 5] (the time axis of xs), got values")


@pytest.mark.slow
def test_what_a_script_prints_first_names_lengths(tmp_path):
    """End to end, in a fresh interpreter without logging configured: stderr starts with the lengths message."""
    script = tmp_path / "bad_lengths.py"
    script.write_text(
        "import jax, jax.numpy as jnp, rnnjax\n"
        "cell = rnnjax.GRU(hidden_size=4)\n"
        "params = cell.init(jax.random.key(0), 3)\n"
        "run = jax.jit(lambda n: rnnjax.unroll(cell, params, jnp.ones((2, 10, 3)), lengths=n)[1])\n"
        "jax.block_until_ready(run(jnp.array([3, 11])))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    first_line = done.stderr.strip().splitlines()[0]
    assert first_line.startswith("lengths must lie in [0, 10] (the time axis of xs), got values from 3 to 11"), (
        first_line
    )
    assert "jax.errors.JaxRuntimeError: INTERNAL: CpuCallback error" in done.stderr  # the first call fails
    assert "RunTimeCheckError: lengths must lie in [0, 10]" in done.stderr


@pytest.mark.usefixtures("enable_x64")
def test_traced_lengths_check_works_under_x64():
    """Regression: the run-time check compared int32 lengths with an int64 array of num_steps."""
    cell = dataclasses.replace(GRU, param_dtype=jnp.float64)
    params = ref.random_params(cell, 61, 3, dtype=jnp.float64)
    xs = jnp.zeros((2, 4, 3))
    run = jax.jit(lambda n: rnnjax.unroll(cell, params, xs, lengths=n)[1])
    assert jax.block_until_ready(run(jnp.array([4, 1], jnp.int32))).shape == (2, 4, 4)
    with pytest.raises(
        Exception, match=r"lengths must lie in \[0, 4\] \(the time axis of xs\), got values from 1 to 9"
    ):
        jax.block_until_ready(run(jnp.array([9, 1], jnp.int32)))


# ---------------------------------------------------------------------------------------------------------
# Hyperparameters and layer configuration
# ---------------------------------------------------------------------------------------------------------

CELL_CLASSES = [rnnjax.SimpleRNN, rnnjax.JordanRNN, rnnjax.LSTM, rnnjax.GRU]


@pytest.mark.parametrize("cls", CELL_CLASSES, ids=lambda c: c.__name__)
def test_hidden_size_must_be_a_positive_int(cls):
    with pytest.raises(ValueError, match=r"hidden_size must be a positive int, got 0"):
        cls(hidden_size=0)
    with pytest.raises(ValueError, match=r"hidden_size must be a positive int, got -3"):
        cls(hidden_size=-3)
    with pytest.raises(TypeError, match=r"hidden_size must be a positive int, got 2\.5"):
        cls(hidden_size=2.5)
    with pytest.raises(TypeError, match=r"hidden_size must be a positive int, got True"):
        cls(hidden_size=True)


@pytest.mark.parametrize("cls", CELL_CLASSES, ids=lambda c: c.__name__)
def test_dtypes_must_be_floating(cls):
    with pytest.raises(TypeError, match=r"param_dtype must be a floating-point dtype, got int32"):
        cls(hidden_size=2, param_dtype=jnp.int32)
    with pytest.raises(TypeError, match=r"dtype must be a dtype, got 'nonsense'"):
        cls(hidden_size=2, dtype="nonsense")


@pytest.mark.parametrize("cls", CELL_CLASSES, ids=lambda c: c.__name__)
def test_input_size_and_initialisers(cls):
    cell = cls(hidden_size=2, kernel_init="glorot_sideways")
    with pytest.raises(ValueError, match=r"kernel_init must be one of \('orthogonal', .*\), got 'glorot_sideways'"):
        cell.init(jax.random.key(0), 3)
    with pytest.raises(ValueError, match=r"input_size must be a positive int, got 0"):
        cls(hidden_size=2).init(jax.random.key(0), 0)


def test_activations_and_sizes():
    with pytest.raises(ValueError, match=r"activation must be one of \('tanh', 'relu'\), got 'sigmoid'"):
        rnnjax.SimpleRNN(hidden_size=2, activation="sigmoid")
    with pytest.raises(ValueError, match=r"activation must be one of \('tanh', 'relu'\), got 'gelu'"):
        rnnjax.JordanRNN(hidden_size=2, activation="gelu")
    with pytest.raises(
        ValueError, match=r"output_activation must be one of \('tanh', 'sigmoid', 'identity'\), got 'relu'"
    ):
        rnnjax.JordanRNN(hidden_size=2, output_activation="relu")
    with pytest.raises(ValueError, match=r"output_size must be a positive int, got 0"):
        rnnjax.JordanRNN(hidden_size=2, output_size=0)
    with pytest.raises(ValueError, match=r"proj_size must be a positive int, got 0"):
        rnnjax.LSTM(hidden_size=2, proj_size=0)


def test_bidirectional_configuration():
    with pytest.raises(ValueError, match=r"merge must be one of \('concat', 'sum', 'mean', 'none'\), got 'max'"):
        rnnjax.Bidirectional(GRU, merge="max")
    with pytest.raises(ValueError, match=r"merge='sum' needs equal output sizes, got forward 4 and backward 3"):
        rnnjax.Bidirectional(GRU, LSTM, merge="sum")
    with pytest.raises(ValueError, match=r"merge='mean' needs equal output sizes, got forward 3 and backward 4"):
        rnnjax.Bidirectional(LSTM, GRU, merge="mean")


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1])
def test_stack_dropout_must_lie_in_zero_one(rate):
    with pytest.raises(ValueError, match=rf"dropout must lie in \[0, 1\), got {rate}"):
        rnnjax.Stack([GRU], dropout=rate)


def test_stack_configuration(gru_case):
    params, xs, carry = gru_case
    with pytest.raises(ValueError, match=r"layers must hold at least one cell or layer, got none"):
        rnnjax.Stack([])
    with pytest.raises(ValueError, match=r"layers\[0\] is Bidirectional with merge='none', which cannot feed a layer"):
        rnnjax.Stack([rnnjax.Bidirectional(GRU, merge="none"), GRU])
    stack = rnnjax.Stack([GRU, rnnjax.Bidirectional(GRU)])
    stack_params = stack.init(jax.random.key(0), 3)
    with pytest.raises(ValueError, match=r"layers\[1\] \(Bidirectional\) needs the whole sequence"):
        stack.step(stack_params, stack.initial_carry((3,)), xs[:, 0])
    with pytest.raises(ValueError, match=r"^params\['layers'\] must be a list of 2 entries, got 1 \(as Stack\.init"):
        stack.apply({"layers": stack_params["layers"][:1]}, xs)
    with pytest.raises(
        ValueError,
        match=r"^params\['layers'\] is missing and params\['b_hh'\], params\['b_ih'\], params\['w_hh'\], "
        r"params\['w_ih'\] are unexpected: keys \['layers'\] expected",
    ):
        stack.apply(params, xs)  # a cell's parameters for a stack


# ---------------------------------------------------------------------------------------------------------
# Run configs
# ---------------------------------------------------------------------------------------------------------


def test_run_config_unknown_cell_lists_the_registered_names():
    with pytest.raises(ValueError, match=r"RunConfig.cell: unknown cell 'nope'; known cells: \[.*'mingru'.*\]"):
        rnnjax.train.RunConfig(cell="nope")
    for name in rnnjax.cell_names(aliases=True):
        assert rnnjax.train.RunConfig(cell=name).cell == name


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"model": "cnn"}, r"RunConfig.model must be one of \('rnn', 'transformer'\), got 'cnn'"),
        ({"num_heads": 0}, r"RunConfig.num_heads must be an integer >= 1, got 0"),
        ({"hidden_size": 2.5}, r"RunConfig.hidden_size must be an integer >= 1, got 2.5"),
        ({"tbptt": 0}, r"RunConfig.tbptt must be an integer >= 1, got 0"),
        ({"dropout": 1.0}, r"RunConfig.dropout must lie in \[0, 1\), got 1.0"),
        ({"model": "transformer", "hidden_size": 12, "num_heads": 4}, r"hidden_size .* multiple of 2 \* num_heads"),
        ({"model": "transformer", "tbptt": 4}, r"RunConfig.tbptt applies to model='rnn' only"),
        ({"model": "transformer", "cell_options": {"a": 1}}, r"RunConfig.cell_options applies to model='rnn'"),
    ],
)
def test_run_config_fields_are_validated(fields, message):
    with pytest.raises(ValueError, match=message):
        rnnjax.train.RunConfig(**fields)


def test_run_config_from_dict_rejects_unknown_fields():
    assert rnnjax.train.RunConfig.from_dict({"cell": "gru"}).model == "rnn"  # configs saved before `model` existed
    with pytest.raises(ValueError, match=r"RunConfig: unknown fields \['hidden'\]"):
        rnnjax.train.RunConfig.from_dict({"hidden": 4})


# Arguments of fit and checkpoint steps.


@pytest.mark.parametrize(
    ("argument", "value", "error", "message"),
    [
        ("batch_size", 0, ValueError, r"batch_size must be >= 1, got 0"),
        ("batch_size", 2.5, TypeError, r"batch_size must be an int, got 2.5"),
        ("steps", -1, ValueError, r"steps must be >= 0, got -1"),
        ("log_every", 0, ValueError, r"log_every must be >= 1, got 0"),
        ("keep", 0, ValueError, r"keep must be >= 1, got 0"),
        ("eval_batch_size", 0, ValueError, r"eval_batch_size must be >= 1, got 0"),
        ("seed", "1", TypeError, r"seed must be an int, got '1'"),
        ("eval_splits", "valid", TypeError, r"eval_splits must be a sequence of split names"),
    ],
)
def test_fit_names_a_bad_argument(argument, value, error, message):
    from rnnjax import models, tasks, train

    task = tasks.get("adding", seq_len=4)
    model = models.build_model(task, "gru", hidden_size=2)
    options = {"steps": 1, "batch_size": 2, argument: value}
    with pytest.raises(error, match=message):
        train.fit(model, task, **options)


def test_restoring_an_absent_step_lists_the_steps_there(tmp_path):
    from rnnjax import checkpoint

    for step in (2, 4, 6):
        checkpoint.save(tmp_path, {"step": np.int32(step), "w": np.zeros(3, np.float32)})
    with pytest.raises(FileNotFoundError, match=r"step 3 is absent from .*; steps there: \[2, 4, 6\]"):
        checkpoint.restore(tmp_path, step=3)
    assert int(checkpoint.restore(tmp_path, step=4)["step"]) == 4
