"""``rnnjax.unroll``: variable lengths, reverse, layouts, carries, scan options and transformations.

The reference is ``tests/_reference.py``: each batch row run alone, on its valid prefix only (reversed for
``reverse=True``), by a NumPy Python loop. Padded positions of the inputs hold a large value, so any leak
into valid outputs or carries shows.
"""

import dataclasses
import functools

import _reference as ref
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import CELLS, INPUT_SIZE, assert_tree_close, jit_unroll, make_case, to_np

import rnnjax

CELL_NAMES = list(CELLS)


def assert_padding_zero_and_empty_rows_untouched(ys, final, carry, lengths):
    """Outputs past each row's length are exactly zero; rows of length 0 keep their initial carry exactly."""
    ys, lengths = np.asarray(ys), np.asarray(lengths)
    past = np.arange(ys.shape[-2]) >= lengths[..., None]  # (*B, T)
    np.testing.assert_array_equal(ys[past], 0.0)
    for got, initial in zip(final, carry):
        np.testing.assert_array_equal(np.asarray(got)[lengths == 0], np.asarray(initial)[lengths == 0])


# ---------------------------------------------------------------------------------------------------------
# Variable lengths and reverse against the NumPy reference
# ---------------------------------------------------------------------------------------------------------


# Every cell forward; reversed runs compile anew per cell, so beyond one cell of each kind they are slow.
FORWARD_AND_REVERSE = [pytest.param(name, False, id=f"{name}-forward") for name in CELL_NAMES] + [
    pytest.param(name, True, id=f"{name}-reverse", marks=() if name in ref.CORE else pytest.mark.slow)
    for name in CELL_NAMES
]


@pytest.mark.parametrize("name, reverse", FORWARD_AND_REVERSE)
def test_padded_batch_matches_each_row_alone(name, reverse):
    # Given a padded batch with a full row, a partial row and an empty row, and a random initial carry
    cell = CELLS[name]
    lengths = jnp.array([5, 3, 0])
    params, xs, carry = make_case(cell, 20, lengths=lengths)
    # When unrolled with lengths
    final, ys = jit_unroll(cell, params, xs, carry, lengths=lengths, reverse=reverse)
    # Then outputs and final carry match each row run alone on its valid prefix
    expected_final, expected_ys = ref.unroll(cell, params, to_np(xs), to_np(carry), to_np(lengths), reverse)
    np.testing.assert_allclose(ys, expected_ys, rtol=2e-5, atol=2e-5)
    assert_tree_close(final, expected_final)
    assert_padding_zero_and_empty_rows_untouched(ys, final, carry, lengths)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("name", ["lstm-peep-proj", "gru-reset-before"])
def test_length_one_and_all_padding_rows(name, reverse):
    cell = CELLS[name]
    for lengths in (jnp.array([1, 0, 1]), jnp.array([0, 0, 0])):
        params, xs, carry = make_case(cell, 21, lengths=lengths)
        final, ys = jit_unroll(cell, params, xs, carry, lengths=lengths, reverse=reverse)
        expected_final, expected_ys = ref.unroll(cell, params, to_np(xs), to_np(carry), to_np(lengths), reverse)
        np.testing.assert_allclose(ys, expected_ys, rtol=2e-5, atol=2e-5)
        assert_tree_close(final, expected_final)
        assert_padding_zero_and_empty_rows_untouched(ys, final, carry, lengths)


def test_padded_batch_equals_rows_run_alone_unpadded_in_jax():
    """The same property without the NumPy reference: rnnjax on each unpadded row (concrete lengths).

    Reversed, the harder case; the forward direction is covered by the reference tests.
    """
    reverse = True
    cell = CELLS["gru"]
    lengths = np.array([5, 2, 0])
    params, xs, carry = make_case(cell, 22, lengths=lengths)
    final, ys = rnnjax.unroll(cell, params, xs, carry, lengths=lengths, reverse=reverse)
    for b, length in enumerate(lengths):
        row_carry = jax.tree.map(lambda leaf, b=b: leaf[b], carry)
        row_final, row_ys = rnnjax.unroll(cell, params, xs[b, :length], row_carry, reverse=reverse)
        np.testing.assert_allclose(ys[b, :length], row_ys, rtol=1e-6, atol=1e-6)
        assert_tree_close(jax.tree.map(lambda leaf, b=b: leaf[b], final), to_np(row_final), rtol=1e-6, atol=1e-6)


def test_reverse_without_lengths_is_reversing_the_whole_sequence():
    cell = CELLS["lstm-peep-proj"]
    params, xs, carry = make_case(cell, 23)
    final, ys = jit_unroll(cell, params, xs, carry, reverse=True)
    expected_final, expected_ys = ref.unroll(cell, params, to_np(xs), to_np(carry), reverse=True)
    np.testing.assert_allclose(ys, expected_ys, rtol=2e-5, atol=2e-5)
    assert_tree_close(final, expected_final)


@pytest.mark.parametrize("name", ["elman-tanh", "lstm-peep-proj"])
def test_zero_time_steps_returns_the_initial_carry(name):
    cell = CELLS[name]
    params, xs, carry = make_case(cell, 24, num_steps=0)
    for lengths in (None, np.zeros(3, np.int32)):
        for reverse in (False, True):
            final, ys = rnnjax.unroll(cell, params, xs, carry, lengths=lengths, reverse=reverse)
            assert ys.shape == (3, 0, cell.output_size)
            assert_tree_close(final, to_np(carry), rtol=0, atol=0)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("batch_shape", [(), (2, 3)], ids=["none", "2x3"])
def test_batch_shapes(batch_shape, reverse):
    """No batch axis, and several batch axes ``*B = (2, 3)``, with lengths."""
    cell = CELLS["lstm-peep-proj"]
    lengths = np.array(3) if batch_shape == () else np.array([[5, 0, 2], [1, 3, 4]])
    params, xs, carry = make_case(cell, 25, batch_shape, lengths=lengths)
    final, ys = jit_unroll(cell, params, xs, carry, lengths=lengths, reverse=reverse)
    expected_final, expected_ys = ref.unroll(cell, params, to_np(xs), to_np(carry), lengths, reverse)
    assert ys.shape == (*batch_shape, 5, cell.output_size)
    np.testing.assert_allclose(ys, expected_ys, rtol=2e-5, atol=2e-5)
    assert_tree_close(final, expected_final)
    assert_padding_zero_and_empty_rows_untouched(ys, final, carry, lengths)


def test_time_major_layout_is_the_transpose():
    cell = CELLS["lstm-peep-proj"]
    lengths = np.array([[5, 0, 2], [1, 3, 4]])
    params, xs, carry = make_case(cell, 25, (2, 3), lengths=lengths)
    final, ys = jit_unroll(cell, params, xs, carry, lengths=lengths, reverse=True)
    final_tm, ys_tm = jit_unroll(
        cell, params, jnp.moveaxis(xs, -2, 0), carry, lengths=lengths, reverse=True, time_major=True
    )
    assert ys_tm.shape == (5, 2, 3, cell.output_size)
    np.testing.assert_array_equal(ys_tm, jnp.moveaxis(ys, -2, 0))
    assert_tree_close(final_tm, to_np(final), rtol=0, atol=0)


def test_running_in_two_halves_with_the_carry_equals_the_whole_run():
    cell = CELLS["lstm-peep-proj"]
    params, xs, carry = make_case(cell, 26)
    final, ys = jit_unroll(cell, params, xs, carry, lengths=ref.full_lengths(xs))
    middle, ys_first = rnnjax.unroll(cell, params, xs[:, :2], carry)
    final_split, ys_second = rnnjax.unroll(cell, params, xs[:, 2:], middle)
    np.testing.assert_allclose(jnp.concatenate([ys_first, ys_second], axis=1), ys, rtol=1e-6, atol=1e-6)
    assert_tree_close(final_split, to_np(final), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Scan options, transformations, gradients
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [dict(unroll=2), dict(remat=True, unroll=True)],
    ids=["unroll2", "remat-unroll-all"],
)
def test_unroll_and_remat_give_the_same_numbers_and_gradients(options):
    value, grads = _unroll_value_and_grad(**options)
    baseline_value, baseline_grads = _unroll_value_and_grad()
    np.testing.assert_allclose(value, baseline_value, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(baseline_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@functools.cache
def _unroll_value_and_grad(**options):
    """Value and gradient of a loss of a padded Elman run (cached: the baseline is shared).

    The scan options act on the masked scan, not on a cell's equations: the cheapest cell suffices.
    """
    cell = CELLS["elman-tanh"]
    lengths = jnp.array([5, 3, 0])
    params, xs, carry = make_case(cell, 27, lengths=lengths)
    shapes = jax.eval_shape(lambda: rnnjax.unroll(cell, params, xs, carry)[::-1])
    weights = [jnp.asarray(w, jnp.float32) for w in ref.loss_weights(shapes, seed=28)]

    def loss(args):
        final, ys = rnnjax.unroll(cell, *args, lengths=lengths, **options)
        return ref.weighted_sum(ys, final, weights)

    return jax.jit(jax.value_and_grad(loss))((params, xs, carry))


@pytest.mark.usefixtures("enable_x64")
@pytest.mark.parametrize("name", ref.cell_grid(fast=("lstm-peep-proj",)))
def test_sequence_gradients_match_finite_differences_of_reference(name):
    """Gradients through padded forward and reversed runs (float64) against the NumPy reference."""
    cell = dataclasses.replace(CELLS[name], param_dtype=jnp.float64)
    lengths = np.array([4, 2])
    params = ref.random_params(cell, 29, INPUT_SIZE, dtype=jnp.float64)
    xs = jnp.asarray(np.random.default_rng(30).standard_normal((2, 4, INPUT_SIZE)))
    carry = ref.to_jax_carry(cell, ref.random_carry(cell, (2,), seed=31), jnp.float64)
    shapes = jax.eval_shape(lambda: rnnjax.unroll(cell, params, xs, carry)[::-1])
    w_forward, w_reverse = ref.loss_weights(shapes, seed=32), ref.loss_weights(shapes, seed=33)

    def loss(args):
        f_final, f_ys = rnnjax.unroll(cell, *args, lengths=lengths)
        r_final, r_ys = rnnjax.unroll(cell, *args, lengths=lengths, reverse=True)
        return ref.weighted_sum(f_ys, f_final, w_forward) + ref.weighted_sum(r_ys, r_final, w_reverse)

    def reference_loss(args):
        f_final, f_ys = ref.unroll(cell, *args, lengths=lengths)
        r_final, r_ys = ref.unroll(cell, *args, lengths=lengths, reverse=True)
        return ref.weighted_sum(f_ys, f_final, w_forward) + ref.weighted_sum(r_ys, r_final, w_reverse)

    ref.check_gradients(loss, reference_loss, (params, xs, carry))


def test_jit_vmap_and_grad():
    cell = CELLS["gru"]
    lengths = jnp.array([5, 3, 0])
    params, xs, carry = make_case(cell, 34, lengths=lengths)
    # jit, lengths traced (checked by a host callback)
    final, ys = jit_unroll(cell, params, xs, carry, lengths=lengths, reverse=True)
    expected_final, expected_ys = ref.unroll(cell, params, to_np(xs), to_np(carry), to_np(lengths), reverse=True)
    np.testing.assert_allclose(ys, expected_ys, rtol=2e-5, atol=2e-5)
    assert_tree_close(final, expected_final)
    # vmap over the batch axis: each row without a batch axis
    final_vmap, ys_vmap = jax.vmap(
        lambda x, c, length: rnnjax.unroll(cell, params, x, c, lengths=length, reverse=True)
    )(xs, carry, lengths)
    np.testing.assert_allclose(ys_vmap, ys, rtol=1e-6, atol=1e-6)
    assert_tree_close(final_vmap, to_np(final), rtol=1e-6, atol=1e-6)
    # grad: the padding of xs gets exactly zero gradient, every parameter a finite one
    grads = jax.jit(jax.grad(lambda p, x: jnp.sum(jit_unroll(cell, p, x, carry, lengths=lengths)[1] ** 2), (0, 1)))(
        params, xs
    )
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    past = np.arange(5) >= np.asarray(lengths)[:, None]
    np.testing.assert_array_equal(np.asarray(grads[1])[past], 0.0)
    assert np.abs(np.asarray(grads[1])[~past]).sum() > 0


def test_masked_scan_holds_the_carry_and_zeroes_outputs():
    cell = CELLS["lstm-peep-proj"]
    lengths = jnp.array([5, 3, 0])
    params, xs, carry = make_case(cell, 35, lengths=lengths)
    mask = jnp.arange(5)[:, None] < lengths  # (T, B)
    final, ys = rnnjax.masked_scan(cell.step, params, carry, jnp.moveaxis(xs, 1, 0), mask)
    expected_final, expected_ys = ref.unroll(cell, params, to_np(xs), to_np(carry), to_np(lengths))
    np.testing.assert_allclose(jnp.moveaxis(ys, 0, 1), expected_ys, rtol=2e-5, atol=2e-5)
    assert_tree_close(final, expected_final)


def test_default_carry_is_zero():
    cell = CELLS["lstm-peep-proj"]
    lengths = jnp.array([5, 3, 0])
    params, xs, carry = make_case(cell, 38, lengths=lengths)
    final, ys = rnnjax.unroll(cell, params, xs, lengths=lengths)
    zero = jax.tree.map(jnp.zeros_like, carry)
    expected_final, expected_ys = jit_unroll(cell, params, xs, zero, lengths=lengths)
    np.testing.assert_allclose(ys, expected_ys, rtol=1e-6, atol=1e-6)
    assert_tree_close(final, to_np(expected_final), rtol=1e-6, atol=1e-6)
    assert all(leaf.dtype == jnp.float32 for leaf in final)


# ---------------------------------------------------------------------------------------------------------
# reverse_sequences, and lengths under 64-bit mode
# ---------------------------------------------------------------------------------------------------------


def numpy_reverse_sequences(xs, lengths):
    lengths = np.asarray(lengths)
    out = np.array(xs)
    for idx in np.ndindex(*xs.shape[1:-1]):
        length = int(lengths[idx])
        out[(slice(0, length), *idx)] = xs[(slice(0, length), *idx)][::-1]
    return out


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)], ids=["none", "B3", "2x3"])
def test_reverse_sequences_matches_numpy_and_is_an_involution(batch_shape):
    rng = np.random.default_rng(36)
    xs = rng.standard_normal((5, *batch_shape, 2)).astype(np.float32)
    lengths = rng.integers(0, 6, batch_shape).astype(np.int32)
    reversed_xs = rnnjax.reverse_sequences(jnp.asarray(xs), jnp.asarray(lengths))
    np.testing.assert_array_equal(reversed_xs, numpy_reverse_sequences(xs, lengths))
    np.testing.assert_array_equal(rnnjax.reverse_sequences(reversed_xs, jnp.asarray(lengths)), xs)
    np.testing.assert_array_equal(rnnjax.reverse_sequences(jnp.asarray(xs), None), xs[::-1])


def test_reverse_sequences_with_narrow_integer_lengths_and_long_sequences():
    xs = jnp.arange(300.0).reshape(300, 1, 1)
    reversed_xs = rnnjax.reverse_sequences(xs, jnp.array([250], jnp.uint8))
    np.testing.assert_array_equal(reversed_xs[:, 0, 0], np.r_[np.arange(249.0, -1, -1), np.arange(250.0, 300)])


@pytest.mark.usefixtures("enable_x64")
def test_lengths_work_under_x64():
    """Regression: with jax_enable_x64 an int64 time index met int32 lengths under strict promotion."""
    xs = jnp.asarray(np.arange(10.0).reshape(5, 2, 1))
    for lengths in (np.array([3, 5], np.int32), np.array([3, 5], np.int64), jnp.array([3, 5], jnp.int32), [3, 5]):
        np.testing.assert_array_equal(rnnjax.reverse_sequences(xs, lengths), numpy_reverse_sequences(xs, lengths))
    cell = dataclasses.replace(CELLS["gru"], param_dtype=jnp.float64)
    params = ref.random_params(cell, 37, 1, dtype=jnp.float64)
    final, ys = rnnjax.unroll(cell, params, jnp.moveaxis(xs, 0, 1), lengths=jnp.array([3, 5], jnp.int32))
    assert ys.dtype == jnp.float64 and final.h.dtype == jnp.float64
    expected_final, expected_ys = ref.unroll(
        cell, params, np.moveaxis(np.asarray(xs), 0, 1), (np.zeros((2, 4)),), np.array([3, 5])
    )
    np.testing.assert_allclose(ys, expected_ys, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Property-based: random batch shapes, lengths and directions
# ---------------------------------------------------------------------------------------------------------


@st.composite
def padded_batches(draw):
    batch_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    num_steps = draw(st.integers(0, 4))
    lengths = np.asarray(
        draw(
            st.lists(st.integers(0, num_steps), min_size=int(np.prod(batch_shape)), max_size=int(np.prod(batch_shape)))
        )
    )
    return batch_shape, num_steps, lengths.reshape(batch_shape).astype(np.int32)


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(
    batch=padded_batches(),
    reverse=st.booleans(),
    name=st.sampled_from(["gru", "lstm-peep-proj"]),
    seed=st.integers(0, 2**16),
)
def test_property_padded_equals_each_row_alone(batch, reverse, name, seed):
    batch_shape, num_steps, lengths = batch
    cell = CELLS[name]
    params, xs, carry = make_case(cell, seed, batch_shape, num_steps=num_steps, lengths=lengths)
    final, ys = jit_unroll(cell, params, xs, carry, lengths=lengths, reverse=reverse)
    expected_final, expected_ys = ref.unroll(cell, params, to_np(xs), to_np(carry), lengths, reverse)
    np.testing.assert_allclose(ys, expected_ys, rtol=2e-5, atol=2e-5)
    assert_tree_close(final, expected_final)
    assert_padding_zero_and_empty_rows_untouched(ys, final, carry, lengths)
