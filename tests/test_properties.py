"""Property-based tests (hypothesis): drawn cells, options, batch shapes, lengths and dtypes.

Two properties, over every registered cell (``rnnjax.cell_names()``) and the options that change its equations:

* **unroll is stepping**: ``rnnjax.unroll`` (any layout, lengths, reverse, given or default carry) equals the
  reference, a Python loop of ``cell.step`` over each row's valid steps alone (backwards for ``reverse``), with
  outputs exactly zero past each row's length;
* **bad input is named**: every invalid combination (the kinds docs/errors.md lists) raises ``TypeError`` or
  ``ValueError`` whose message starts with the argument's name, at once (at trace time).

Examples are bounded (``max_examples``) and derandomized, so a run is reproducible and takes seconds; the
equivalence property, which compiles a scan per example, is marked slow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnjax

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# The options of each shipped cell that change its equations or its carry; other cells are drawn with defaults.
BOOLEAN = st.booleans()
OPTIONS = {
    "simple": {"activation": st.sampled_from(["tanh", "relu"]), "use_bias": BOOLEAN},
    "jordan": {
        "output_size": st.sampled_from([None, 2]),
        "activation": st.sampled_from(["tanh", "relu"]),
        "output_activation": st.sampled_from(["tanh", "sigmoid", "identity"]),
        "use_bias": BOOLEAN,
    },
    "lstm": {"peepholes": BOOLEAN, "proj_size": st.sampled_from([None, 2]), "use_bias": BOOLEAN},
    "gru": {"reset_after": BOOLEAN, "use_bias": BOOLEAN},
    "mingru": {
        "activation": st.just("g"),  # with method "log"; "identity" is drawn below for the other methods
        "method": st.sampled_from([None, "sequential", "associative", "log"]),
        "use_bias": BOOLEAN,
    },
    "lru": {
        "model_size": st.sampled_from([None, 2]),
        "r_min": st.sampled_from([0.0, 0.5]),
        "method": st.sampled_from([None, "sequential", "associative"]),
    },
}
OPTIONS["minlstm"] = OPTIONS["mingru"]


class Precision(NamedTuple):
    """One precision configuration of the drawn problems."""

    cell_options: dict  # param_dtype (what init makes) and dtype (of the matmuls)
    input_dtype: jnp.dtype  # of xs
    x64: bool  # 64-bit floats on
    tolerance: float  # rtol = atol of the comparison with stepping


DTYPES = {
    "float32": Precision({}, jnp.float32, False, 2e-5),
    "bfloat16-inputs": Precision({}, jnp.bfloat16, False, 2e-5),
    "bfloat16-compute": Precision({"dtype": jnp.bfloat16}, jnp.float32, False, 5e-2),  # outputs rounded to bf16
    "float64": Precision({"param_dtype": jnp.float64}, jnp.float64, True, 1e-9),
}


@contextlib.contextmanager
def x64(enabled: bool):
    """64-bit floats on while the block runs (what the ``enable_x64`` fixture does for a whole test)."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", enabled)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


@dataclasses.dataclass
class Case:
    """One drawn problem: a cell, its parameters, inputs ``(*B, T, I)``, an initial carry and lengths."""

    name: str
    cell: object
    params: dict
    xs: jax.Array  # (*B, T, I)
    carry: object  # the cell's carry NamedTuple, or None for the default zeros
    lengths: np.ndarray | None  # (*B,) integers in [0, T]
    reverse: bool
    time_major: bool
    dtype: str


def draw_cell(data, precision_options: dict):
    """A registered cell name and the cell, with drawn options (hidden size 1 to 3)."""
    name = data.draw(st.sampled_from(rnnjax.cell_names()), label="cell")
    options = {key: data.draw(value, label=key) for key, value in OPTIONS.get(name, {}).items()}
    if options.get("method") not in (None, "log") and name in ("mingru", "minlstm"):
        options["activation"] = data.draw(st.sampled_from(["g", "identity"]), label="activation")
    hidden_size = data.draw(st.integers(1, 3), label="hidden_size")
    return name, rnnjax.make_cell(name, hidden_size=hidden_size, **options, **precision_options)


def draw_case(data, dtype: str) -> Case:
    """Draws a valid problem; call with x64 already set as ``DTYPES[dtype]`` says."""
    precision = DTYPES[dtype]
    input_dtype = precision.input_dtype
    name, cell = draw_cell(data, precision.cell_options)
    batch_shape = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2), label="batch_shape"))
    num_steps = data.draw(st.integers(1, 5), label="T")  # T = 0 and empty batches: test_empty_time_axis_or_batch
    input_size = data.draw(st.integers(1, 3), label="I")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    params = cell.init(jax.random.key(seed), input_size)
    params = jax.tree.map(  # off their initial values (biases start at zero), so every term is exercised
        lambda leaf: (leaf + 0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype), params
    )
    xs = jnp.asarray(rng.standard_normal((*batch_shape, num_steps, input_size)), input_dtype)
    carry = None
    if data.draw(BOOLEAN, label="given carry"):
        zeros = cell.initial_carry(batch_shape, rnnjax.unrolling.default_carry_dtype(input_dtype))
        carry = jax.tree.map(lambda leaf: (leaf + 0.5 * rng.standard_normal(leaf.shape)).astype(leaf.dtype), zeros)
    lengths = None
    if data.draw(BOOLEAN, label="with lengths"):
        length_dtype = data.draw(st.sampled_from([np.int32, np.int64, np.uint8]), label="lengths dtype")
        lengths = rng.integers(0, num_steps + 1, batch_shape).astype(length_dtype)
    reverse = data.draw(BOOLEAN, label="reverse")
    time_major = data.draw(BOOLEAN, label="time_major")
    return Case(name, cell, params, xs, carry, lengths, reverse, time_major, dtype)


def run_unroll(case: Case, **changes):
    """``rnnjax.unroll`` on the case (with any argument replaced by ``changes``); xs in the case's layout."""
    arguments = dict(
        params=case.params,
        xs=jnp.moveaxis(case.xs, -2, 0) if case.time_major else case.xs,
        carry=case.carry,
        lengths=case.lengths,
        reverse=case.reverse,
        time_major=case.time_major,
    )
    arguments.update(changes)
    return rnnjax.unroll(case.cell, arguments.pop("params"), arguments.pop("xs"), arguments.pop("carry"), **arguments)


@functools.partial(jax.jit, static_argnames=("cell", "reverse", "time_major"))
def jit_unroll(cell, params, xs, carry, lengths, reverse, time_major):
    """``rnnjax.unroll`` compiled as one program (``lengths`` traced): much faster to compile than eager calls."""
    return rnnjax.unroll(cell, params, xs, carry, lengths=lengths, reverse=reverse, time_major=time_major)


@functools.partial(jax.jit, static_argnums=0)
def jit_step(cell, params, carry, x):
    """``cell.step`` compiled: the reference loop compiles it once per cell and row shape."""
    return cell.step(params, carry, x)


def stepped(case: Case):
    """The reference: ``cell.step`` in a Python loop, each row of ``xs`` alone on its valid steps.

    Returns:
        ``(final carry leaves, ys (*B, T, O))`` as float64 NumPy arrays; outputs past each row's length are 0.
    """
    cell, xs = case.cell, case.xs
    *batch_shape, num_steps, _ = xs.shape
    carry_dtype = rnnjax.unrolling.default_carry_dtype(xs.dtype)
    carry = cell.initial_carry(tuple(batch_shape), carry_dtype) if case.carry is None else case.carry
    final = [np.array(leaf, np.float64) for leaf in jax.tree.leaves(carry)]
    ys = np.zeros((*batch_shape, num_steps, cell.output_size))
    for row in np.ndindex(*batch_shape):
        row_carry = jax.tree.map(lambda leaf: leaf[row], carry)  # noqa: B023  (used at once)
        length = num_steps if case.lengths is None else int(case.lengths[row])
        for t in reversed(range(length)) if case.reverse else range(length):
            row_carry, y = jit_step(cell, case.params, row_carry, xs[row + (t,)])
            ys[row + (t,)] = np.asarray(y.astype(jnp.float32) if y.dtype == jnp.bfloat16 else y, np.float64)
        for out, leaf in zip(final, jax.tree.leaves(row_carry)):
            out[row] = np.asarray(leaf, np.float64)
    return final, ys


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DTYPES))
@settings(max_examples=10, **SETTINGS)
@given(data=st.data())
def test_unroll_equals_stepping_each_row_alone(dtype, data):
    """Given any cell, options, batch shape, lengths, reverse, layout and precision, unroll is stepping."""
    tolerance = DTYPES[dtype].tolerance
    with x64(DTYPES[dtype].x64):
        case = draw_case(data, dtype)
        xs = jnp.moveaxis(case.xs, -2, 0) if case.time_major else case.xs
        final, ys = jit_unroll(case.cell, case.params, xs, case.carry, case.lengths, case.reverse, case.time_major)
        want_final, want_ys = stepped(case)
    ys = np.asarray(jnp.moveaxis(ys, 0, -2) if case.time_major else ys, np.float64)
    assert ys.shape == want_ys.shape
    np.testing.assert_allclose(ys, want_ys, rtol=tolerance, atol=tolerance)
    for got, want in zip(jax.tree.leaves(final), want_final):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tolerance, atol=tolerance)
    if case.lengths is not None:  # padding is exactly zero, not merely small
        padding = np.arange(ys.shape[-2]) >= case.lengths[..., None]  # (*B, T)
        assert np.all(ys[padding] == 0.0)


# Empty problems: zero steps, and an empty batch (the fused kernels return early on both).


@pytest.mark.parametrize("edge", ["T=0", "B=0"])
@pytest.mark.parametrize("name", rnnjax.cell_names())
def test_empty_time_axis_or_batch(name, edge):
    """Zero steps leave the carry as it was and give no outputs; an empty batch gives empty results."""
    cell = rnnjax.make_cell(name, hidden_size=2)
    params = cell.init(jax.random.key(0), 3)
    batch_shape, num_steps = ((2,), 0) if edge == "T=0" else ((0,), 4)
    carry = jax.tree.map(lambda leaf: leaf + 0.5, cell.initial_carry(batch_shape))
    final, ys = rnnjax.unroll(
        cell, params, jnp.ones((*batch_shape, num_steps, 3)), carry, lengths=np.zeros(batch_shape, np.int32)
    )
    assert ys.shape == (*batch_shape, num_steps, cell.output_size)
    for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(carry)):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------------------
# Invalid input: (exception type, the message's start) for each kind of bad input, built from a valid case.
# ---------------------------------------------------------------------------------------------------------


def _resized_last_axis(leaf, extra=1):
    shape = np.shape(leaf)
    return jnp.zeros((*shape[:-1], shape[-1] + extra) if shape else (1,), leaf.dtype)


def bad_inputs(case: Case, rng: np.random.Generator) -> dict:
    """``kind -> (exception, message pattern, call)``: each call feeds ``case`` one invalid argument.

    Messages start with the argument's name (``xs``, ``x``, ``params[...]``, ``carry...``, ``lengths``,
    ``remat``); docs/errors.md lists these kinds.
    """
    batch_shape, num_steps = case.xs.shape[:-2], case.xs.shape[-2]
    keys = sorted(case.params)
    key = keys[rng.integers(len(keys))]
    quoted = re.escape(f"['{key}']")
    carry = case.carry if case.carry is not None else case.cell.initial_carry(batch_shape)
    first = type(carry)._fields[0]
    features = case.xs.shape[-1]
    x = jnp.ones((*batch_shape, features), case.xs.dtype)  # one step's input
    lengths = np.full(batch_shape, num_steps, np.int32)
    out_of_range = lengths.copy().reshape(-1)
    if out_of_range.size:
        out_of_range[rng.integers(out_of_range.size)] = rng.choice([-1, num_steps + 1 + int(rng.integers(3))])
    kinds = {
        "xs integer": (
            TypeError,
            r"^xs must have a floating-point dtype",
            lambda: run_unroll(case, xs=jnp.ones((2, 3), jnp.int32)),
        ),
        "xs not an array": (TypeError, r"^xs must be an array of floats", lambda: run_unroll(case, xs="abc")),
        "xs rank 1": (ValueError, r"^xs must have shape \(", lambda: run_unroll(case, xs=jnp.ones(3))),
        "xs features": (
            ValueError,
            rf"^xs has {features + 1} features on its last axis, but the parameters expect {features}",
            lambda: run_unroll(case, xs=jnp.ones((*case.xs.shape[:-1], case.xs.shape[-1] + 1), case.xs.dtype)),
        ),
        "params missing key": (
            ValueError,
            rf"^params{quoted} is missing",
            lambda: run_unroll(case, params={k: v for k, v in case.params.items() if k != key}),
        ),
        "params unexpected key": (
            ValueError,
            r"^params\['extra'\] is unexpected",
            lambda: run_unroll(case, params={**case.params, "extra": jnp.zeros(2)}),
        ),
        "params shape": (
            ValueError,
            rf"^params{quoted} must have shape .*, got ",
            lambda: run_unroll(case, params={**case.params, key: _resized_last_axis(case.params[key])}),
        ),
        "params not an array": (
            TypeError,
            rf"^params{quoted} must be an array, got str",
            lambda: run_unroll(case, params={**case.params, key: "zeros"}),
        ),
        "carry structure": (
            ValueError,
            r"^carry must have the structure",
            lambda: run_unroll(case, carry=tuple(carry)),
        ),
        "carry shape": (
            ValueError,
            rf"^carry\.{re.escape(first)} must have shape",
            lambda: run_unroll(case, carry=carry._replace(**{first: _resized_last_axis(getattr(carry, first))})),
        ),
        "carry integer": (
            TypeError,
            rf"^carry\.{re.escape(first)} must have a floating-point dtype",
            lambda: run_unroll(case, carry=carry._replace(**{first: getattr(carry, first).astype(jnp.int32)})),
        ),
        "lengths float": (
            TypeError,
            r"^lengths must have an integer dtype",
            lambda: run_unroll(case, lengths=lengths.astype(np.float32)),
        ),
        "lengths shape": (
            ValueError,
            r"^lengths must have the batch shape",
            lambda: run_unroll(case, lengths=np.zeros((*batch_shape, 2), np.int32)),
        ),
        "remat": (ValueError, r"^remat must be True, False or a chunk length", lambda: run_unroll(case, remat=-1)),
        "step x features": (
            ValueError,
            rf"^x has {case.xs.shape[-1] + 1} features",
            lambda: case.cell.step(case.params, carry, jnp.ones((*batch_shape, case.xs.shape[-1] + 1), case.xs.dtype)),
        ),
        "step params missing key": (
            ValueError,
            rf"^params{quoted} is missing",
            lambda: case.cell.step({k: v for k, v in case.params.items() if k != key}, carry, x),
        ),
        "step carry shape": (
            ValueError,
            rf"^carry\.{re.escape(first)} must have shape",
            lambda: case.cell.step(
                case.params, carry._replace(**{first: _resized_last_axis(getattr(carry, first))}), x
            ),
        ),
    }
    if out_of_range.size:
        kinds["lengths out of range"] = (
            ValueError,
            rf"^lengths must lie in \[0, {num_steps}\] \(the time axis of xs\)",
            lambda: run_unroll(case, lengths=out_of_range.reshape(batch_shape)),
        )
    if batch_shape:  # step on a batch: the carry's batch axes must be x's
        del kinds["step carry shape"]
        kinds["step carry batch"] = (
            ValueError,
            rf"^carry\.{re.escape(first)} must have shape",
            lambda: case.cell.step(case.params, carry, jnp.ones((*batch_shape, 1, case.xs.shape[-1]), case.xs.dtype)),
        )
    return kinds


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_every_invalid_input_is_named(data):
    """Given a valid case, replacing any one argument by a bad one raises TypeError/ValueError naming it."""
    case = draw_case(data, data.draw(st.sampled_from(["float32", "bfloat16-inputs", "bfloat16-compute"])))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="corruption seed"))
    kinds = bad_inputs(case, rng)
    kind = data.draw(st.sampled_from(sorted(kinds)), label="bad input")
    error, message, call = kinds[kind]
    with pytest.raises(error, match=message):
        call()


# Hyperparameters: (option values, exception, the message's start), for every registered cell or for one.
BAD_HYPERPARAMETERS = {
    None: [
        ({"hidden_size": 0}, ValueError, r"^hidden_size must be a positive int, got 0"),
        ({"hidden_size": -2}, ValueError, r"^hidden_size must be a positive int, got -2"),
        ({"hidden_size": 2.5}, TypeError, r"^hidden_size must be a positive int, got 2\.5"),
        ({"hidden_size": True}, TypeError, r"^hidden_size must be a positive int, got True"),
        ({"param_dtype": jnp.int32}, TypeError, r"^param_dtype must be a floating-point dtype, got int32"),
        ({"dtype": "nonsense"}, TypeError, r"^dtype must be a dtype, got 'nonsense'"),
    ],
    "simple": [({"activation": "sigmoid"}, ValueError, r"^activation must be one of")],
    "jordan": [
        ({"output_activation": "relu"}, ValueError, r"^output_activation must be one of"),
        ({"output_size": 0}, ValueError, r"^output_size must be a positive int"),
    ],
    "lstm": [({"proj_size": 0}, ValueError, r"^proj_size must be a positive int")],
    "mingru": [
        ({"activation": "tanh"}, ValueError, r"^activation must be one of"),
        ({"method": "fast"}, ValueError, r"^method must be one of"),
        ({"method": "log", "activation": "identity"}, ValueError, r"^method='log' needs activation='g'"),
    ],
    "lru": [
        ({"max_phase": 0.0}, ValueError, r"^max_phase must be positive"),
        ({"method": "log"}, ValueError, r"^method must be one of"),
        ({"model_size": 0}, ValueError, r"^model_size must be a positive int"),
    ],
}
BAD_HYPERPARAMETERS["minlstm"] = BAD_HYPERPARAMETERS["mingru"]


@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_every_invalid_hyperparameter_is_named(data):
    """Given any registered cell, a bad option raises TypeError/ValueError naming it when the cell is built."""
    name = data.draw(st.sampled_from(rnnjax.cell_names()), label="cell")
    choices = BAD_HYPERPARAMETERS[None] + BAD_HYPERPARAMETERS.get(name, [])
    options, error, message = data.draw(st.sampled_from(choices), label="bad option")
    with pytest.raises(error, match=message):
        rnnjax.make_cell(name, **{"hidden_size": 2, **options})
