"""Conformance suite: the cell protocol, checked for every cell in the registry.

Every test is parametrised over :func:`rnnjax.cell_names`, so a newly registered cell is tested here without
editing this file. The references are a plain Python loop over ``cell.step`` one row at a time (not
``masked_scan``), each row of a padded batch run alone on its valid prefix, and central finite differences; each
cell is built with ``rnnjax.make_cell(name, hidden_size=4)`` and parameters moved off their initial values (biases
start at zero), so that every term of a cell's equations is exercised.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
import rnnjax.nnx as rnx

NAMES = rnnjax.cell_names()
SHIPPED = (
    "gated_deltanet",
    "griffin",
    "gru",
    "jordan",
    "lru",
    "lstm",
    "mamba2",
    "mingru",
    "minlstm",
    "mlstm",
    "rglru",
    "simple",
    "slstm",
)
H, I, T = 4, 3, 6  # hidden size, input features, time steps
LENGTHS = (T, 3, 1, 0)  # a full row, a partial one, a single step and an empty row
B = len(LENGTHS)

pytestmark = pytest.mark.parametrize("name", NAMES)

HEAVY = ("gated_deltanet", "griffin", "mamba2", "mlstm", "slstm")
"""Cells whose cases here take 0.5-4.6 s each (chunked or block forms that compile large programs). Each has its own
test module checking its sequence against stepping and a NumPy reference; here the default run (``-m "not slow"``)
keeps for them the structural checks, the loop reference with lengths and reverse, vmap and the gradients, and
the full suite (no ``-m``) runs the rest."""

SLOW_FOR_HEAVY = {
    "test_unroll_equals_a_python_loop_over_step[full",
    "test_padded_batch_equals_each_row_alone_on_its_prefix",
    "test_several_batch_axes_equal_the_flattened_batch",
    "test_bfloat16_compute_is_close_to_float32_and_keeps_a_float32_carry",
    "test_jit_equals_eager",
    "test_nnx_recurrent_equals_unroll_and_step",
}


def is_slow_case(item) -> bool:
    """Whether a collected case is slow (read by tests/conftest.py): a SLOW_FOR_HEAVY test of a HEAVY cell."""
    name = item.callspec.params.get("name") if hasattr(item, "callspec") else None
    return name in HEAVY and any(item.name.startswith(prefix) for prefix in SLOW_FOR_HEAVY)


def make(name, **options):
    return rnnjax.make_cell(name, hidden_size=H, **options)


@functools.partial(jax.jit, static_argnums=0, static_argnames="reverse")
def run(cell, params, xs, carry=None, lengths=None, *, reverse=False):
    """``rnnjax.unroll`` under one shared ``jit`` (cells are hashable), so equal shapes compile once across tests."""
    return rnnjax.unroll(cell, params, xs, carry, lengths=lengths, reverse=reverse)


@functools.partial(jax.jit, static_argnums=0)
def step(cell, params, carry, x):
    """``cell.step`` under one shared ``jit``: the reference loop compiles it once per cell, dtype and row shape."""
    return cell.step(params, carry, x)


def normal(seed, shape, dtype=jnp.float32, scale=1.0):
    """Normal noise drawn by NumPy (a ``jax.random`` draw would compile once per shape and dtype)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def perturbed(tree, seed, dtype, scale):
    """Every leaf of ``tree`` cast to ``dtype`` plus ``scale`` times normal noise."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(
        treedef, [leaf.astype(dtype) + normal(seed + i, leaf.shape, dtype, scale) for i, leaf in enumerate(leaves)]
    )


def make_case(cell, batch_shape=(B,), dtype=jnp.float32, seed=0):
    """``(params, xs, carry)``: perturbed parameters, inputs ``(*batch_shape, T, I)`` and a nonzero carry."""
    params = perturbed(cell.init(jax.random.key(seed), I), 100 * seed + 1, dtype, 0.2)
    xs = normal(seed + 50, (*batch_shape, T, I), dtype)
    carry = perturbed(cell.initial_carry(batch_shape, dtype), 100 * seed + 70, dtype, 0.5)
    return params, xs, carry


def row(tree, b):
    """Row ``b`` of every leaf; ``b`` may be a slice."""
    return jax.tree.map(lambda leaf: leaf[b], tree)


def stepped(cell, params, xs, carry, lengths=None, reverse=False):
    """The reference: a Python loop over ``cell.step``, one row of ``xs`` ``(B, T, I)`` at a time.

    Row ``b`` takes steps ``0 .. lengths[b] - 1`` (backwards when ``reverse``); outputs elsewhere are zero and
    the row's final carry is the carry after its last step. Returns ``(final carry, ys (B, T, O))`` as NumPy.
    """
    xs = np.asarray(xs)
    num_rows, num_steps = xs.shape[:2]
    ys = np.zeros((num_rows, num_steps, cell.output_size), np.float64)
    finals = []
    for b in range(num_rows):
        c = row(carry, b)
        n = num_steps if lengths is None else lengths[b]
        for t in reversed(range(n)) if reverse else range(n):
            c, y = step(cell, params, c, xs[b, t])
            ys[b, t] = np.asarray(y, np.float64)
        finals.append(c)
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(leaf) for leaf in leaves]), *finals), ys


def assert_trees_close(actual, expected, rtol, atol):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol)


def test_registry_builds_the_named_cell(name):
    # make_cell gives a hashable cell of the requested size, and every alias builds the same kind of cell
    assert set(SHIPPED) <= set(NAMES)
    cell = make(name)
    assert cell.hidden_size == H
    assert hash(cell) == hash(make(name))
    for alias in set(rnnjax.cell_names(aliases=True)) - set(NAMES):
        if type(rnnjax.make_cell(alias, hidden_size=H)) is type(cell):
            assert rnnjax.make_cell(alias, hidden_size=H) == cell


@pytest.mark.parametrize("batch_shape", [(), 3, (2, 3)], ids=["none", "int", "2x3"])
def test_initial_carry_is_a_zero_named_tuple_with_the_batch_shape_and_dtype(name, batch_shape):
    cell = make(name)
    batch = (batch_shape,) if isinstance(batch_shape, int) else batch_shape
    carry = cell.initial_carry(batch_shape)
    assert isinstance(carry, tuple) and hasattr(carry, "_fields")  # a NamedTuple, never a bare tuple
    for leaf in carry:
        # leaves are (*B, ...): one feature axis for vector states, more for matrix memories and conv buffers
        assert leaf.shape[: len(batch)] == batch and leaf.ndim >= len(batch) + 1 and leaf.dtype == jnp.float32
        np.testing.assert_array_equal(leaf, 0.0)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in cell.initial_carry(batch_shape, jnp.bfloat16))


def test_cells_are_frozen_hashable_static_jit_arguments(name):
    cell, twin = make(name), make(name)
    assert twin is not cell and twin == cell and hash(twin) == hash(cell)
    assert rnnjax.make_cell(name, hidden_size=H + 1) != cell
    with pytest.raises(dataclasses.FrozenInstanceError):
        cell.hidden_size = 7
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def scaled(c, x):
        traces.append(c)
        return x * c.output_size

    assert float(scaled(cell, jnp.float32(1.0))) == float(scaled(twin, jnp.float32(1.0))) == cell.output_size
    assert len(traces) == 1  # the equal twin hit the cache


# Values.


@pytest.mark.usefixtures("enable_x64")
@pytest.mark.parametrize("lengths, reverse", [(None, False), (LENGTHS, True)], ids=["full", "lengths-reverse"])
def test_unroll_equals_a_python_loop_over_step(name, lengths, reverse):
    # Given float64 parameters, inputs and a nonzero initial carry
    cell = make(name)
    params, xs, carry = make_case(cell, dtype=jnp.float64, seed=1)
    # When unrolled (through the cell's sequence fast path when it has one) and stepped in a Python loop
    n = None if lengths is None else jnp.array(lengths)
    final, ys = rnnjax.unroll(cell, params, xs, carry, lengths=n, reverse=reverse)
    want_final, want_ys = stepped(cell, params, xs, carry, lengths, reverse)
    # Then outputs and final carries agree to float64 precision, in float64
    assert ys.dtype == jnp.float64
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(final))
    np.testing.assert_allclose(ys, want_ys, rtol=1e-10, atol=1e-12)
    assert_trees_close(final, want_final, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_padded_batch_equals_each_row_alone_on_its_prefix(name, reverse):
    # Given a batch with lengths [T, 3, 1, 0] and a nonzero initial carry
    cell = make(name)
    params, xs, carry = make_case(cell, seed=2)
    final, ys = run(cell, params, xs, carry, jnp.array(LENGTHS), reverse=reverse)
    for b, n in enumerate(LENGTHS):
        carry_b = row(carry, slice(b, b + 1))
        if n == 0:  # When a row is empty, then its carry is the initial carry and its outputs are zero
            want_final, want_ys = carry_b, np.zeros((1, 0, cell.output_size))
        else:  # Else it equals the row's prefix run alone, unpadded (reversed, and flipped back, when reverse)
            prefix = xs[b : b + 1, :n]
            want_final, want_ys = run(cell, params, prefix[:, ::-1] if reverse else prefix, carry_b)
            want_ys = want_ys[:, ::-1] if reverse else want_ys
        np.testing.assert_allclose(ys[b, :n], want_ys[0], rtol=1e-5, atol=1e-6)
        assert_trees_close(row(final, b), row(want_final, 0), rtol=1e-5, atol=1e-6)
        # and its outputs past its length are exactly zero
        np.testing.assert_array_equal(np.asarray(ys[b, n:]), 0.0)


def test_several_batch_axes_equal_the_flattened_batch(name):
    # Given inputs (2, 3, T, I), a (2, 3) carry and (2, 3) lengths
    cell = make(name)
    params, xs, carry = make_case(cell, batch_shape=(2, 3), seed=3)
    lengths = jnp.array([[T, 2, 0], [1, 5, T]])
    final, ys = run(cell, params, xs, carry, lengths, reverse=True)
    # When the same rows run as one flat batch of 6
    flat = jax.tree.map(lambda leaf: leaf.reshape(6, *leaf.shape[2:]), (xs, carry, lengths))
    flat_final, flat_ys = run(cell, params, *flat, reverse=True)
    # Then the results are the same numbers, reshaped
    assert ys.shape == (2, 3, T, cell.output_size)
    np.testing.assert_allclose(ys.reshape(6, T, -1), flat_ys, rtol=1e-6, atol=1e-6)
    assert_trees_close(
        jax.tree.map(lambda leaf: leaf.reshape(6, *leaf.shape[2:]), final), flat_final, rtol=1e-6, atol=1e-6
    )


def test_bfloat16_compute_is_close_to_float32_and_keeps_a_float32_carry(name):
    # Given float32 parameters, and the same cell computing in bfloat16
    cell32 = make(name)
    cell16 = make(name, dtype=jnp.bfloat16)
    assert jnp.dtype(cell16.dtype) == jnp.bfloat16
    params, xs, carry = make_case(cell32, seed=4)
    lengths = jnp.array(LENGTHS)
    # When both are unrolled
    final32, ys32 = run(cell32, params, xs, carry, lengths)
    final16, ys16 = run(cell16, params, xs, carry, lengths)
    # Then bfloat16 outputs are finite and close to float32, padding is zero, and the carry stays float32
    assert ys16.dtype == jnp.bfloat16
    ys16 = np.asarray(ys16.astype(jnp.float32))
    assert np.isfinite(ys16).all()
    np.testing.assert_allclose(ys16, ys32, rtol=5e-2, atol=5e-2)
    np.testing.assert_array_equal(ys16[2, 1:], 0.0)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(final16))
    assert_trees_close(final16, final32, rtol=5e-2, atol=5e-2)


# Transformations.


def test_jit_equals_eager(name):
    cell = make(name)
    params, xs, carry = make_case(cell, seed=5)
    lengths = jnp.array(LENGTHS)
    eager = rnnjax.unroll(cell, params, xs, carry, lengths=lengths, reverse=True)
    jitted = run(cell, params, xs, carry, lengths, reverse=True)
    assert_trees_close(jitted, eager, rtol=1e-6, atol=1e-6)


def test_vmap_over_rows_equals_the_batched_run(name):
    cell = make(name)
    params, xs, carry = make_case(cell, seed=6)
    lengths = jnp.array(LENGTHS)
    batched = run(cell, params, xs, carry, lengths, reverse=True)
    # Each vmapped call sees one row with no batch axes: xs (T, I), an unbatched carry and a scalar length
    mapped = jax.jit(jax.vmap(lambda x, c, n: rnnjax.unroll(cell, params, x, c, lengths=n, reverse=True)))(
        xs, carry, lengths
    )
    assert_trees_close(mapped, batched, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("enable_x64")
@pytest.mark.parametrize(
    "lengths, reverse",
    [
        pytest.param(None, False, marks=pytest.mark.slow),
        pytest.param(LENGTHS, False, marks=pytest.mark.slow),
        (LENGTHS, True),
    ],
    ids=["full", "lengths", "lengths-reverse"],
)
def test_gradients_match_central_differences(name, lengths, reverse):
    # Given float64 parameters, inputs and initial carry, and a loss of the outputs and the final carry
    cell = make(name)
    args = make_case(cell, dtype=jnp.float64, seed=7)  # (params, xs, carry)
    n = None if lengths is None else jnp.array(lengths)
    weights = normal(8, (B, T, cell.output_size), jnp.float64)

    def loss(args):
        final, ys = rnnjax.unroll(cell, *args, lengths=n, reverse=reverse)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(final))

    # When the loss is differenced along random directions in (params, xs, carry), with one compiled program:
    # central differences at steps eps and eps / 2, Richardson-extrapolated, so that the O(eps²) error cancels
    # (the LRU's phases enter through exp(exp(theta_log)), whose curvature makes plain differences too coarse)
    eps = 1e-4
    directions = [perturbed(jax.tree.map(jnp.zeros_like, args), 1000 + 100 * k, jnp.float64, 1.0) for k in range(3)]
    steps = [(d, s * h) for d in directions for h in (eps, eps / 2) for s in (1, -1)]
    points = [jax.tree.map(lambda a, d, step=step: a + step * d, args, d) for d, step in steps]

    @jax.jit
    def gradient_and_values(args, points):
        return jax.grad(loss)(args), jax.lax.map(loss, jax.tree.map(lambda *p: jnp.stack(p), *points))

    grads, values = gradient_and_values(args, points)
    values = np.asarray(values).reshape(len(directions), 2, 2)  # (direction, step eps or eps / 2, sign + or -)
    coarse, fine = (values[:, 0, 0] - values[:, 0, 1]) / (2 * eps), (values[:, 1, 0] - values[:, 1, 1]) / eps
    numeric = (4 * fine - coarse) / 3
    analytic = [
        sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        for direction in directions
    ]
    # Then the directional derivatives from autodiff agree with the differences
    np.testing.assert_allclose(analytic, numeric, rtol=1e-7, atol=1e-8)
    # and inputs past a row's length get no gradient
    if lengths is not None:
        np.testing.assert_array_equal(np.asarray(grads[1][3]), 0.0)
        np.testing.assert_array_equal(np.asarray(grads[1][1, 3:]), 0.0)


# The NNX adapter.


def test_nnx_recurrent_equals_unroll_and_step(name):
    cell = make(name)
    params, xs, carry = make_case(cell, seed=9)
    lengths = jnp.array(LENGTHS)
    model = rnx.Recurrent(cell, params=params)
    # The adapter runs the cell like unroll (default and given carries, with lengths, forward and reversed)
    assert_trees_close(
        model(xs, lengths=lengths, reverse=True),
        run(cell, params, xs, None, lengths, reverse=True),
        rtol=1e-6,
        atol=1e-6,
    )
    assert_trees_close(model(xs, carry, lengths=lengths), run(cell, params, xs, carry, lengths), rtol=1e-6, atol=1e-6)
    # and steps like cell.step
    assert_trees_close(model.step(carry, xs[:, 0]), cell.step(params, carry, xs[:, 0]), rtol=1e-6, atol=1e-6)


# Errors.


def test_wrong_feature_count_names_xs(name):
    cell = make(name)
    params, xs, _ = make_case(cell, seed=10)
    with pytest.raises(ValueError, match=r"\bxs\b.*features"):
        rnnjax.unroll(cell, params, xs[..., :-1])
    with pytest.raises(ValueError, match=r"\bx\b.*features"):
        cell.step(params, cell.initial_carry((B,)), xs[:, 0, :-1])


def test_params_for_another_input_size_are_rejected(name):
    cell = make(name)
    _, xs, _ = make_case(cell, seed=11)
    params = cell.init(jax.random.key(0), I + 2)
    with pytest.raises(ValueError, match=r"\bxs\b.*expect 5"):
        rnnjax.unroll(cell, params, xs)
    with pytest.raises(ValueError, match=r"\bx\b.*expect 5"):
        cell.step(params, cell.initial_carry((B,)), xs[:, 0])


@pytest.mark.parametrize(
    "lengths",
    [(T, 3, 1), ((T, 3), (1, 0)), (T + 1, 3, 1, 0), (T, -1, 1, 0)],
    ids=["too-few", "wrong-rank", "above-T", "negative"],
)
def test_bad_lengths_are_rejected_eagerly(name, lengths):
    cell = make(name)
    params, xs, _ = make_case(cell, seed=12)
    with pytest.raises(ValueError, match=r"\blengths\b"):
        rnnjax.unroll(cell, params, xs, lengths=jnp.array(lengths))


def test_carry_of_the_wrong_shape_or_structure_is_rejected(name):
    cell = make(name)
    params, xs, _ = make_case(cell, seed=13)
    x, good = xs[:, 0], cell.initial_carry((B,))
    jax.jit(cell.step)(params, good, x)  # the right carry passes
    fewer_rows = jax.tree.map(lambda leaf: leaf[1:], good)
    with pytest.raises(ValueError, match=rf"carry\.\w+ must have shape \({B}(, \d+)+\), got \({B - 1}(, \d+)+\)"):
        cell.step(params, fewer_rows, x)
    other = rnnjax.make_cell(name, hidden_size=H + 1)
    for bad in (fewer_rows, cell.initial_carry((B, 1)), other.initial_carry((B,))):
        with pytest.raises(ValueError, match=r"\bcarry\b"):
            rnnjax.unroll(cell, params, xs, bad)
        with pytest.raises(ValueError, match=r"\bcarry\b"):
            cell.step(params, bad, x)
        with pytest.raises(ValueError, match=r"\bcarry\b"):
            jax.jit(cell.step)(params, bad, x)  # raised while tracing: jitted code pays nothing
    # A bare tuple is not the cell's named carry
    with pytest.raises(ValueError, match=r"carry must have the structure"):
        cell.step(params, tuple(good), x)
    with pytest.raises(ValueError, match=r"carry must have the structure"):
        rnnjax.unroll(cell, params, xs, tuple(good))
