"""``Bidirectional`` and ``Stack`` against references built from independent NumPy loops."""

import dataclasses
import functools
from typing import NamedTuple

import _reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import CELLS, INPUT_SIZE, assert_tree_close, make_case, to_np

import rnnjax


@functools.partial(jax.jit, static_argnums=0, static_argnames=("unroll", "remat"))
def jit_apply(layer, params, xs, carry, lengths=None, dropout_key=None, unroll=1, remat=False):
    """``layer.apply`` under jit with the layer static (so layers must be hashable)."""
    kwargs = {} if dropout_key is None else {"dropout_key": dropout_key}
    return layer.apply(params, xs, carry, lengths=lengths, unroll=unroll, remat=remat, **kwargs)


LENGTHS = jnp.array([5, 3, 0])


def assert_zero_past_lengths(ys, lengths):
    past = np.arange(ys.shape[-2]) >= np.asarray(lengths)[..., None]
    np.testing.assert_array_equal(np.asarray(ys)[past], 0.0)


# ---------------------------------------------------------------------------------------------------------
# Bidirectional
# ---------------------------------------------------------------------------------------------------------

BIDIRECTIONAL = {
    "concat-mixed": rnnjax.Bidirectional(CELLS["lstm-peep-proj"], CELLS["gru"]),  # O = 3 + 4
    "sum": rnnjax.Bidirectional(CELLS["gru-reset-before"], merge="sum"),
    "mean": rnnjax.Bidirectional(CELLS["jordan-O3-identity-relu"], CELLS["lstm-peep-proj"], merge="mean"),
    "none": rnnjax.Bidirectional(CELLS["elman-tanh"], merge="none"),
}


@pytest.mark.parametrize("name", list(BIDIRECTIONAL))
def test_bidirectional_matches_two_numpy_loops(name):
    # Given a padded batch (rows of length 5, 3, 0) and random initial carries for both directions
    layer = BIDIRECTIONAL[name]
    params, xs, carry = make_case(layer, 40, lengths=LENGTHS)
    # When applied
    final, ys = jit_apply(layer, params, xs, carry, LENGTHS)
    # Then outputs and carries match a forward and a reversed NumPy loop merged by the mode
    expected_final, expected_ys = ref.bidirectional(layer, to_np(params), to_np(xs), to_np(carry), LENGTHS)
    assert isinstance(final, rnnjax.BidirectionalState)
    assert_tree_close(final, expected_final)
    for got, want in zip(jax.tree.leaves(ys), jax.tree.leaves(expected_ys)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        assert_zero_past_lengths(got, LENGTHS)
    if layer.merge != "none":
        assert ys.shape[-1] == layer.output_size
    # the empty row keeps both initial carries exactly
    for got, initial in zip(jax.tree.leaves(final), jax.tree.leaves(carry)):
        np.testing.assert_array_equal(got[2], initial[2])


def test_bidirectional_backward_carry_is_the_carry_after_position_zero():
    layer = BIDIRECTIONAL["concat-mixed"]
    params, xs, carry = make_case(layer, 40, lengths=LENGTHS)
    final, ys = jit_apply(layer, params, xs, carry, LENGTHS)
    # Step the backward cell by hand over row 1 (length 3): positions 2, 1, 0.
    row_carry = jax.tree.map(lambda leaf: leaf[1], carry.backward)
    for t in (2, 1, 0):
        row_carry, y = layer.backward.step(params["backward"], row_carry, xs[1, t])
        # the backward half of the output at position t is the output of the step that processed t
        np.testing.assert_allclose(ys[1, t, layer.forward.output_size :], y, rtol=1e-6, atol=1e-6)
    assert_tree_close(jax.tree.map(lambda leaf: leaf[1], final.backward), to_np(row_carry), rtol=1e-6, atol=1e-6)


def test_bidirectional_time_major_and_default_carry():
    layer = dataclasses.replace(BIDIRECTIONAL["concat-mixed"], time_major=True)
    params, xs, carry = make_case(layer, 41, lengths=LENGTHS)
    zero = jax.tree.map(jnp.zeros_like, carry)
    final, ys = layer.apply(params, jnp.moveaxis(xs, 1, 0), lengths=LENGTHS)
    expected_final, expected_ys = ref.bidirectional(layer, to_np(params), to_np(xs), to_np(zero), LENGTHS)
    assert ys.shape == (5, 3, 7)
    np.testing.assert_allclose(ys, np.moveaxis(expected_ys, 1, 0), rtol=2e-5, atol=2e-5)
    assert_tree_close(final, expected_final)


def test_bidirectional_init_output_size_and_hashability(key):
    cell = CELLS["gru"]
    layer = rnnjax.Bidirectional(cell)
    assert layer.backward == cell and layer.output_size == 8
    assert rnnjax.Bidirectional(cell, merge="sum").output_size == 4
    assert rnnjax.Bidirectional(cell, merge="none").output_size == 4
    assert BIDIRECTIONAL["concat-mixed"].output_size == 7
    params = layer.init(key, INPUT_SIZE)
    assert set(params) == {"forward", "backward"}
    assert not np.allclose(params["forward"]["w_ih"], params["backward"]["w_ih"])  # separate parameters
    assert layer.input_size(params) == INPUT_SIZE
    assert hash(layer) == hash(rnnjax.Bidirectional(rnnjax.GRU(hidden_size=4), cell, merge="concat"))


@pytest.mark.usefixtures("enable_x64")
def test_bidirectional_gradients_match_finite_differences_of_reference():
    layer = rnnjax.Bidirectional(
        dataclasses.replace(CELLS["lstm-peep-proj"], param_dtype=jnp.float64),
        dataclasses.replace(CELLS["gru-reset-before"], param_dtype=jnp.float64),
    )
    lengths = np.array([4, 2])
    params = ref.random_params(layer, 42, INPUT_SIZE, dtype=jnp.float64)
    xs = jnp.asarray(np.random.default_rng(43).standard_normal((2, 4, INPUT_SIZE)))
    carry = ref.to_jax_carry(layer, ref.random_carry(layer, (2,), seed=44), jnp.float64)
    weights = ref.loss_weights(jax.eval_shape(lambda: layer.apply(params, xs, carry)[::-1]), seed=45)

    def loss(args):
        final, ys = layer.apply(args[0], args[1], args[2], lengths=lengths)
        return ref.weighted_sum(ys, final, weights)

    def reference_loss(args):
        final, ys = ref.bidirectional(layer, *args, lengths=lengths)
        return ref.weighted_sum(ys, final, weights)

    ref.check_gradients(loss, reference_loss, (params, xs, carry))


# ---------------------------------------------------------------------------------------------------------
# Stack
# ---------------------------------------------------------------------------------------------------------

STACKS = {
    "plain": rnnjax.Stack([CELLS["lstm-peep-proj"], CELLS["gru"]]),  # sizes 3 -> 3 -> 4
    # input size 3 and every layer 3 wide: a residual around every layer, the first included
    "residual": rnnjax.Stack(
        [rnnjax.GRU(hidden_size=3), CELLS["jordan-O3-identity-relu"], CELLS["lstm-peep-proj"]], residual=True
    ),
    # sizes 3 -> 3 (2 + 1, a residual around the Bidirectional layer) -> 4 -> 2
    "bidirectional": rnnjax.Stack(
        [
            rnnjax.Bidirectional(rnnjax.GRU(hidden_size=2), rnnjax.GRU(hidden_size=1)),
            CELLS["elman-tanh"],
            CELLS["lstm-proj-nobias"],
        ],
        residual=True,
    ),
    "last-bidirectional-none": rnnjax.Stack(
        [rnnjax.GRU(hidden_size=3), rnnjax.Bidirectional(CELLS["elman-tanh"], merge="none")], residual=True
    ),
}


@pytest.mark.parametrize("name", list(STACKS))
def test_stack_matches_layer_by_layer_numpy_reference(name):
    # Given a padded batch and random initial carries for every layer
    stack = STACKS[name]
    params, xs, carry = make_case(stack, 46, lengths=LENGTHS)
    # When applied (no dropout)
    final, ys = jit_apply(stack, params, xs, carry, LENGTHS)
    # Then each layer's carry and the top outputs match NumPy loops chained layer by layer
    expected_final, expected_ys = ref.stack(stack, to_np(params), to_np(xs), to_np(carry), LENGTHS)
    assert isinstance(final, rnnjax.StackState) and len(final.layers) == len(stack.layers)
    assert_tree_close(final, expected_final)
    for got, want in zip(jax.tree.leaves(ys), jax.tree.leaves(expected_ys)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        assert_zero_past_lengths(got, LENGTHS)  # regression: residuals carried input padding through


def test_stack_layer_sizes(key):
    stack = STACKS["bidirectional"]
    params = jax.eval_shape(lambda: stack.init(key, INPUT_SIZE))
    assert len(params["layers"]) == 3
    assert [stack.layers[i].input_size(p) for i, p in enumerate(params["layers"])] == [3, 3, 4]
    assert params["layers"][2]["w_hr"].shape == (4, 2)
    assert stack.output_size == 2 and stack.input_size(params) == INPUT_SIZE
    assert STACKS["plain"].output_size == 4
    assert isinstance(stack.layers, tuple) and hash(stack) == hash(dataclasses.replace(stack))
    carry = stack.initial_carry((2,))
    assert [jax.tree.map(jnp.shape, layer) for layer in carry.layers][1:] == [((2, 4),), ((2, 2), (2, 4))]


def test_stack_time_major():
    stack = dataclasses.replace(STACKS["residual"], time_major=True)
    params, xs, carry = make_case(stack, 47, lengths=LENGTHS)
    final, ys = jit_apply(stack, params, jnp.moveaxis(xs, 1, 0), carry, LENGTHS)
    expected_final, expected_ys = ref.stack(stack, to_np(params), to_np(xs), to_np(carry), LENGTHS)
    np.testing.assert_allclose(ys, np.moveaxis(expected_ys, 1, 0), rtol=2e-5, atol=2e-5)
    assert_tree_close(final, expected_final)


@pytest.mark.usefixtures("enable_x64")
def test_stack_gradients_match_finite_differences_of_reference():
    """Through a Bidirectional layer, a residual connection and padding (float64)."""
    f64 = functools.partial(dataclasses.replace, param_dtype=jnp.float64)
    stack = rnnjax.Stack([rnnjax.Bidirectional(f64(rnnjax.GRU(hidden_size=2))), f64(CELLS["lstm-peep"])], residual=True)
    lengths = np.array([4, 2])
    params = ref.random_params(stack, 48, INPUT_SIZE, dtype=jnp.float64)
    xs = jnp.asarray(np.random.default_rng(49).standard_normal((2, 4, INPUT_SIZE)))
    carry = ref.to_jax_carry(stack, ref.random_carry(stack, (2,), seed=50), jnp.float64)
    weights = ref.loss_weights(jax.eval_shape(lambda: stack.apply(params, xs, carry)[::-1]), seed=51)

    def loss(args):
        final, ys = stack.apply(*args, lengths=lengths)
        return ref.weighted_sum(ys, final, weights)

    def reference_loss(args):
        final, ys = ref.stack(stack, *args, lengths=lengths)
        return ref.weighted_sum(ys, final, weights)

    ref.check_gradients(loss, reference_loss, (params, xs, carry))


# ---------------------------------------------------------------------------------------------------------
# Stack: dropout
# ---------------------------------------------------------------------------------------------------------


class PassState(NamedTuple):
    x: jax.Array  # (*B, I) the last input


@dataclasses.dataclass(frozen=True)
class PassThrough:
    """A test cell whose output is its input, so a Stack's output shows the dropout applied below it."""

    size: int

    @property
    def output_size(self):
        return self.size

    def init(self, key, input_size):
        return {"unused": jnp.zeros((input_size,))}

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        batch = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        return PassState(jnp.zeros((*batch, self.size), dtype))

    def input_size(self, params):
        return params["unused"].shape[0]

    def step(self, params, carry, x):
        return PassState(x.astype(carry.x.dtype)), x


def test_dropout_zeroes_and_rescales_between_layers_but_not_after_the_last():
    # Given a GRU under a pass-through top layer, so the stack's output is the GRU's output after dropout
    rate = 0.5
    stack = rnnjax.Stack([rnnjax.GRU(hidden_size=8), PassThrough(8)], dropout=rate)
    lengths = jnp.array([5, 5, 5])
    params, xs, carry = make_case(stack, 52)
    _, clean = jit_apply(stack, params, xs, carry, lengths)
    # When applied with a dropout key
    _, dropped = jit_apply(stack, params, xs, carry, lengths, jax.random.key(1))
    # Then every entry is either zero or the clean value scaled by exactly 1 / (1 - rate), both occur, and
    # nothing was dropped or rescaled a second time after the last layer
    clean, dropped = np.asarray(clean), np.asarray(dropped)
    zeros = dropped == 0.0
    assert 0.2 < zeros.mean() < 0.8
    np.testing.assert_allclose(dropped[~zeros], clean[~zeros] / (1 - rate), rtol=1e-6)
    # Another key drops other entries; the same key the same ones.
    _, other = jit_apply(stack, params, xs, carry, lengths, jax.random.key(2))
    assert not np.array_equal(np.asarray(other) == 0.0, zeros)
    np.testing.assert_array_equal(jit_apply(stack, params, xs, carry, lengths, jax.random.key(1))[1], dropped)


def test_without_a_key_dropout_is_off_and_the_last_layer_is_never_dropped():
    stack = rnnjax.Stack([CELLS["gru"], CELLS["gru"]], dropout=0.5)
    params, xs, carry = make_case(stack, 53, lengths=LENGTHS)
    _, ys = jit_apply(stack, params, xs, carry, LENGTHS)
    _, expected = ref.stack(stack, to_np(params), to_np(xs), to_np(carry), LENGTHS)
    np.testing.assert_allclose(ys, expected, rtol=2e-5, atol=2e-5)
    # a one-layer stack has no layer between which to drop
    single = rnnjax.Stack([CELLS["gru"]], dropout=0.5)
    params, xs, carry = make_case(single, 54, lengths=LENGTHS)
    _, with_key = jit_apply(single, params, xs, carry, LENGTHS, jax.random.key(3))
    _, without = jit_apply(single, params, xs, carry, LENGTHS)
    np.testing.assert_array_equal(with_key, without)


# ---------------------------------------------------------------------------------------------------------
# Stack: streaming
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("name", ref.cell_grid())
def test_stack_streaming_step_matches_reference(name, residual):
    """Two layers of a cell, ``I = O`` so that with ``residual`` both layers get one; streamed by ``step``."""
    cell = CELLS[name]
    stack = rnnjax.Stack([cell, cell], residual=residual)
    params, xs, carry = make_case(stack, 55, input_size=cell.output_size)
    expected_final, expected_ys = ref.stack(stack, to_np(params), to_np(xs), to_np(carry))
    streamed = []
    for t in range(xs.shape[1]):
        carry, y = stack.step(params, carry, xs[:, t])
        streamed.append(y)
    np.testing.assert_allclose(jnp.stack(streamed, axis=1), expected_ys, rtol=2e-5, atol=2e-5)
    assert_tree_close(carry, expected_final)


def test_stack_streaming_equals_apply_and_unroll():
    """Stack.step one element at a time == Stack.apply == rnnjax.unroll(stack) (a stack of cells is a cell)."""
    stack = STACKS["residual"]
    params, xs, carry = make_case(stack, 56, lengths=LENGTHS)
    final, ys = jit_apply(stack, params, xs, carry, LENGTHS)
    final_unroll, ys_unroll = ref.jit_unroll(stack, params, xs, carry, lengths=LENGTHS)
    np.testing.assert_allclose(ys_unroll, ys, rtol=1e-6, atol=1e-6)
    assert_tree_close(final_unroll, to_np(final), rtol=1e-6, atol=1e-6)
    step_carry, streamed = carry, []
    for t in range(xs.shape[1]):
        step_carry, y = stack.step(params, step_carry, xs[:, t])
        streamed.append(y)
    np.testing.assert_allclose(jnp.stack(streamed, axis=1)[0], ys[0], rtol=1e-6, atol=1e-6)  # the full row
    assert_tree_close(jax.tree.map(lambda leaf: leaf[0], step_carry), to_np(jax.tree.map(lambda leaf: leaf[0], final)))
