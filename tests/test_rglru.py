"""Tests of the RG-LRU and Griffin's recurrent block (``rnnjax/cells/rglru.py``).

Two independent references: ``recurrentgemma``'s JAX ``RGLRU`` and ``RecurrentBlock`` (weights copied across;
skipped when the package is not installed), and a plain NumPy float64 loop written from the paper's equations.
Then the cells' own contracts: the whole-sequence path equals stepping (values, final carry with its conv buffer,
gradients) for every scan method and any mask; bfloat16 compute keeps a float32 carry; bad hyperparameters are
named.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from rnnjax.cells.base import Cell
from rnnjax.cells.rglru import RGLRU, GriffinBlock, GriffinState, RGLRUState
from rnnjax.unrolling import time_mask

METHODS = ("sequential", "associative", "log")


def normal(seed, shape, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def perturbed(tree, seed, dtype=jnp.float32, scale=0.2):
    """Every leaf cast to ``dtype`` plus ``scale`` times normal noise (biases start at zero)."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(
        treedef, [leaf.astype(dtype) + normal(seed + i, leaf.shape, dtype, scale) for i, leaf in enumerate(leaves)]
    )


@functools.partial(jax.jit, static_argnums=(0, 2))
def init(cell, key, input_size):
    """``cell.init`` compiled as one program (eagerly, each of its operations would compile on its own)."""
    return cell.init(key, input_size)


def make_case(cell, input_size, batch, steps, dtype=jnp.float32, seed=0):
    """``(params, xs (batch, steps, I), carry)``: perturbed parameters and a nonzero initial carry."""
    params = perturbed(init(cell, jax.random.key(seed), input_size), 100 * seed + 1, dtype)
    xs = normal(100 * seed + 50, (batch, steps, input_size), dtype)
    carry = perturbed(cell.initial_carry((batch,), dtype), 100 * seed + 70, dtype, 0.5)
    return params, xs, carry


def assert_trees_close(actual, expected, rtol, atol):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol)


@functools.partial(jax.jit, static_argnums=0)
def run(cell, params, xs, carry=None, lengths=None):
    """``rnnjax.unroll`` under one shared ``jit`` (cells are hashable): equal shapes compile once across tests."""
    return rnnjax.unroll(cell, params, xs, carry, lengths=lengths)


@functools.partial(jax.jit, static_argnums=0)
def step(cell, params, carry, x):
    """``cell.step`` compiled, and ``cell.readout`` of the carry it returns (which must give the same ``y``)."""
    new, y = cell.step(params, carry, x)
    return new, y, cell.readout(params, new, x)


def max_error(actual, expected) -> float:
    return max(
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64)), initial=0.0))
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected))
    )


# ---------------------------------------------------------------------------------------------------------------
# Reference 1: recurrentgemma (DeepMind's JAX implementation), weights copied across.
# ---------------------------------------------------------------------------------------------------------------


def rg_lru_params(p):
    """Our RG-LRU parameters under recurrentgemma's ``RGLRU`` names."""
    return {
        "a_param": p["a_param"],
        "input_gate": {"w": p["gate_x_w"], "b": p["gate_x_b"]},
        "a_gate": {"w": p["gate_a_w"], "b": p["gate_a_b"]},
    }


def rg_block_params(p):
    """Our :class:`GriffinBlock` parameters under recurrentgemma's ``RecurrentBlock`` names."""
    return {
        "linear_y": {"kernel": p["w_y"], "bias": p["b_y"]},
        "linear_x": {"kernel": p["w_x"], "bias": p["b_x"]},
        "conv_1d": {"w": p["conv_w"], "b": p["conv_b"]},
        "rg_lru": rg_lru_params(p),
        "linear_out": {"kernel": p["w_out"], "bias": p["b_out"]},
    }


def no_reset_positions(batch, steps, start=1):
    """``segment_pos`` that never is 0: recurrentgemma resets the state (and masks the conv) where it is 0."""
    return jnp.broadcast_to(jnp.arange(start, start + steps, dtype=jnp.int32), (batch, steps))


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
def test_rglru_equals_recurrentgemma(with_state):
    pytest.importorskip("recurrentgemma")
    from recurrentgemma.jax import layers as rg_layers

    # Given the bare RG-LRU (no input projection, as recurrentgemma's layer) with 2 heads and moved weights
    cell = RGLRU(hidden_size=8, num_heads=2, input_projection=False)
    params, xs, carry = make_case(cell, 8, batch=3, steps=12, seed=1)
    if not with_state:
        carry = cell.initial_carry((3,))
    module = rg_layers.RGLRU(width=8, num_heads=2)
    # When both run the sequence (recurrentgemma with no segment reset, from the same state)
    with jax.numpy_dtype_promotion("standard"):
        want_ys, want_h = jax.jit(module.apply)(
            {"params": rg_lru_params(params)}, xs, no_reset_positions(3, 12), cache=carry.h if with_state else None
        )
    final, ys = run(cell, params, xs, carry)
    # Then outputs and final states agree to float32 rounding
    assert max_error(ys, want_ys) < 1e-5 and max_error(final.h, want_h) < 1e-5
    np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final.h, want_h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [10, 2], ids=["T=10", "T=2<K-1"])
def test_griffin_block_sequence_equals_recurrentgemma(steps):
    pytest.importorskip("recurrentgemma")
    from recurrentgemma.jax import modules as rg_modules

    # Given the block with width 6, lru_width 8, 2 heads, conv width 4, from a zero carry (recurrentgemma's
    # training mode takes no initial state: its conv pads with zeros, its RG-LRU starts at zero)
    cell = GriffinBlock(hidden_size=6, lru_width=8, num_heads=2, conv_width=4)
    params, xs, _ = make_case(cell, 6, batch=2, steps=steps, seed=2)
    module = rg_modules.RecurrentBlock(width=6, num_heads=2, lru_width=8, conv1d_temporal_width=4)
    with jax.numpy_dtype_promotion("standard"):
        want_ys, cache = jax.jit(module.apply)({"params": rg_block_params(params)}, xs, no_reset_positions(2, steps))
    final, ys = run(cell, params, xs)
    # Then outputs, the RG-LRU state and the conv buffer (zero-padded when T < K - 1) agree
    np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final.h, cache.rg_lru_state, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final.conv, cache.conv1d_state, rtol=1e-5, atol=1e-5)


def test_griffin_block_steps_equal_recurrentgemma_decoding_from_a_given_state():
    pytest.importorskip("recurrentgemma")
    from recurrentgemma.jax import modules as rg_modules

    # Given a nonzero state (RG-LRU state and conv buffer) fed to recurrentgemma's decoding mode as its cache
    cell = GriffinBlock(hidden_size=6, lru_width=8, num_heads=2, conv_width=4)
    params, xs, carry = make_case(cell, 6, batch=2, steps=5, seed=3)
    module = rg_modules.RecurrentBlock(width=6, num_heads=2, lru_width=8, conv1d_temporal_width=4)
    variables = {"params": rg_block_params(params)}
    cache = rg_modules.RecurrentBlockCache(rg_lru_state=carry.h, conv1d_state=carry.conv)
    want, apply = [], jax.jit(module.apply)
    with jax.numpy_dtype_promotion("standard"):
        for t in range(5):  # decoding takes one token per call
            y, cache = apply(variables, xs[:, t : t + 1], no_reset_positions(2, 1, start=t + 1), cache=cache)
            want.append(y[:, 0])
    # When our block runs the 5 tokens as a sequence from the same state
    final, ys = run(cell, params, xs, carry)
    # Then outputs and the final state agree
    np.testing.assert_allclose(ys, jnp.stack(want, axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final.h, cache.rg_lru_state, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final.conv, cache.conv1d_state, rtol=1e-5, atol=1e-5)


def test_recurrentgemma_segment_reset_is_the_documented_difference():
    pytest.importorskip("recurrentgemma")
    from recurrentgemma.jax import layers as rg_layers

    # recurrentgemma restarts at segment_pos == 0: a = 0 and no sqrt(1 - a²) factor, so h_0 = i_0 ⊙ x_0
    cell = RGLRU(hidden_size=4, num_heads=2, input_projection=False)
    params, xs, _ = make_case(cell, 4, batch=1, steps=3, seed=4)
    with jax.numpy_dtype_promotion("standard"):
        want_ys, _ = jax.jit(rg_layers.RGLRU(width=4, num_heads=2).apply)(
            {"params": rg_lru_params(params)}, xs, no_reset_positions(1, 3, start=0)
        )
    _, ys = run(cell, params, xs)
    assert not np.allclose(ys[:, 0], want_ys[:, 0], atol=1e-3)  # our cell has no resets: it normalises h_0 too
    gate_x = jax.nn.sigmoid(jnp.einsum("hi,hij->hj", xs[0, 0].reshape(2, 2), params["gate_x_w"]) + params["gate_x_b"])
    np.testing.assert_allclose(want_ys[0, 0], gate_x.reshape(4) * xs[0, 0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Reference 2: the paper's equations as a NumPy float64 loop.
# ---------------------------------------------------------------------------------------------------------------


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_rglru_step(p, h, u):
    """One RG-LRU step from eq. 1–4 of the paper, with a = σ(Λ_paper) = σ(−a_param): ``h``, ``u`` ``(L,)``."""
    num_heads, head = np.shape(p["gate_x_w"])[:2]
    heads = u.reshape(num_heads, head)
    i = np_sigmoid(np.einsum("hi,hij->hj", heads, p["gate_x_w"]) + p["gate_x_b"]).reshape(-1)
    r = np_sigmoid(np.einsum("hi,hij->hj", heads, p["gate_a_w"]) + p["gate_a_b"]).reshape(-1)
    a = np_sigmoid(-p["a_param"]) ** (8.0 * r)
    return a * h + np.sqrt(1.0 - a**2) * (i * u)


def np_gelu(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def np_run(cell, params, xs, carry, lengths):
    """The float64 loop over each row's first ``lengths[b]`` steps: ``(final carry leaves, ys (B, T, O))``."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xs = np.asarray(xs, np.float64)
    leaves = [np.array(leaf, np.float64) for leaf in carry]
    ys = np.zeros((*xs.shape[:2], cell.output_size))
    for b, n in enumerate(lengths):
        h = leaves[0][b].copy()
        if isinstance(cell, RGLRU):
            for t in range(n):
                u = xs[b, t] @ p["w_in"] if cell.input_projection else xs[b, t]
                h = np_rglru_step(p, h, u)
                ys[b, t] = h
        else:
            buffer = leaves[1][b].copy()  # (K-1, L) oldest first
            for t in range(n):
                window = np.concatenate([buffer, (xs[b, t] @ p["w_x"] + p["b_x"])[None]])  # (K, L)
                v = np.sum(window * p["conv_w"], axis=0) + p["conv_b"]
                h = np_rglru_step(p, h, v)
                ys[b, t] = (np_gelu(xs[b, t] @ p["w_y"] + p["b_y"]) * h) @ p["w_out"] + p["b_out"]
                buffer = window[1:]
            leaves[1][b] = buffer
        leaves[0][b] = h
    return leaves, ys


CELLS = {
    "rglru-projected": (RGLRU(hidden_size=4, num_heads=2), 3),
    "rglru-bare": (RGLRU(hidden_size=4, num_heads=2, input_projection=False), 4),
    "griffin": (GriffinBlock(hidden_size=3, lru_width=4, num_heads=2, conv_width=3), 5),
}
LENGTHS = (7, 4, 1, 0)  # a full row, rows shorter than T, one shorter than the conv's buffer, an empty one


@functools.partial(jax.jit, static_argnums=0)
def run_every_method(cell, params, xs, carry, lengths):
    """``rnnjax.unroll`` with each solver of the linear scan, as one compiled program: ``{method: (carry, ys)}``."""
    return {m: rnnjax.unroll(dataclasses.replace(cell, method=m), params, xs, carry, lengths=lengths) for m in METHODS}


@pytest.mark.usefixtures("enable_x64")
@pytest.mark.parametrize("name", list(CELLS))
def test_unroll_equals_the_papers_equations_in_float64(name):
    # Given float64 parameters, inputs (4, 7, I), a nonzero carry and lengths [7, 4, 1, 0]
    cell, input_size = CELLS[name]
    params, xs, carry = make_case(cell, input_size, batch=4, steps=7, dtype=jnp.float64, seed=5)
    # When unrolled (the whole-sequence path) with each scan method and computed by the NumPy loop
    results = run_every_method(cell, params, xs, carry, jnp.array(LENGTHS))
    want_final, want_ys = np_run(cell, params, xs, carry, LENGTHS)
    for method, (final, ys) in results.items():
        # Then they agree to float64 rounding (log space loses a little more), and padding is zero
        tol = 1e-10 if method == "log" else 1e-12
        np.testing.assert_allclose(ys, want_ys, rtol=tol, atol=tol, err_msg=method)
        for got, want in zip(final, want_final):
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=method)
        np.testing.assert_array_equal(np.asarray(ys[3]), 0.0)


# ---------------------------------------------------------------------------------------------------------------
# The cells' contracts.
# ---------------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def fast_and_stepped(cell, params, carry, xs, mask):
    """``cell.sequence`` (the fast path) and ``Cell.sequence`` (masked_scan of ``step``) on time-major ``xs``."""
    return cell.sequence(params, carry, xs, mask), Cell.sequence(cell, params, carry, xs, mask)


@pytest.mark.parametrize("name", ["rglru-projected", pytest.param("rglru-bare", marks=pytest.mark.slow), "griffin"])
def test_sequence_equals_stepping_values_final_carry_and_gradients(name):
    # Given a nonzero carry (RG-LRU state and conv buffer), prefix masks of lengths [7, 4, 1, 0] and a loss of the
    # outputs and the final carry
    cell = CELLS[name][0]
    params, xs, carry = make_case(cell, CELLS[name][1], batch=4, steps=7, seed=6)
    xs = jnp.moveaxis(xs, 1, 0)  # (T, B, I)
    mask = time_mask(jnp.array(LENGTHS), 7)  # (T, B)
    weights = normal(7, (7, 4, cell.output_size))

    def loss(sequence, args):
        params, xs, carry = args
        final, ys = sequence(params, carry, xs, mask)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(final)), (final, ys)

    # When the fast path (cell.sequence, each scan method) and masked_scan of step (Cell.sequence) run, in one
    # compiled program: values and gradients
    @jax.jit
    def every_path(args):
        paths = {m: dataclasses.replace(cell, method=m).sequence for m in METHODS}
        paths["stepped"] = functools.partial(Cell.sequence, cell)
        return {key: jax.grad(functools.partial(loss, path), has_aux=True)(args) for key, path in paths.items()}

    results = every_path((params, xs, carry))
    want_grads, (want_final, want_ys) = results.pop("stepped")
    for method, (grads, (final, ys)) in results.items():
        # Then the fast path gives the stepped values and final carry (conv buffer included)
        np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5, err_msg=method)
        assert_trees_close(final, want_final, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(ys[:, 3]), 0.0)
        assert_trees_close(jax.tree.map(lambda leaf: leaf[3], final), jax.tree.map(lambda leaf: leaf[3], carry), 0, 0)
        # and the same gradients with respect to parameters, inputs and initial carry
        assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(grads[1][:, 3]), 0.0)  # the empty row's inputs get no gradient
        np.testing.assert_array_equal(np.asarray(grads[1][1:, 2]), 0.0)  # nor the padding of the one-step row


@pytest.mark.parametrize("name", ["griffin", pytest.param("rglru-projected", marks=pytest.mark.slow)])
def test_any_mask_not_only_prefixes_equals_stepping(name):
    # Given masks with holes (a masked step holds the carry, conv buffer included)
    cell = CELLS[name][0]
    params, xs, carry = make_case(cell, CELLS[name][1], batch=5, steps=9, seed=8)
    xs = jnp.moveaxis(xs, 1, 0)  # (T, B, I)
    mask = jnp.asarray(np.random.default_rng(9).random((9, 5)) < 0.6)
    mask = mask.at[:, 0].set(False).at[:, 1].set(True)  # an all-masked row and a full one
    (final, ys), (want_final, want_ys) = fast_and_stepped(cell, params, carry, xs, mask)
    np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5)
    assert_trees_close(final, want_final, rtol=1e-5, atol=1e-5)


def test_griffin_final_conv_buffer_holds_the_last_valid_inputs():
    # Given a conv of width 3 (a buffer of 2), a nonzero initial buffer and rows of lengths 7, 4, 1 and 0
    cell = CELLS["griffin"][0]
    params, xs, carry = make_case(cell, 5, batch=4, steps=7, seed=10)
    final, _ = run(cell, params, xs, carry, jnp.array(LENGTHS))
    u = xs @ params["w_x"] + params["b_x"]  # (B, T, L) the conv's inputs
    # Then a row keeps its last 2 valid inputs; a row of 1 keeps the initial buffer's newest entry and its input;
    # an empty row keeps the initial buffer
    np.testing.assert_allclose(final.conv[0], u[0, 5:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(final.conv[1], u[1, 2:4], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(final.conv[2], jnp.concatenate([carry.conv[2, 1:], u[2, :1]]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(final.conv[3], carry.conv[3])


@pytest.mark.parametrize("name", ["griffin", pytest.param("rglru-projected", marks=pytest.mark.slow)])
def test_bfloat16_compute_keeps_a_float32_carry_and_is_close_to_float32(name):
    cell32 = CELLS[name][0]
    cell16 = dataclasses.replace(cell32, dtype=jnp.bfloat16)
    params, xs, carry = make_case(cell32, CELLS[name][1], batch=4, steps=7, seed=11)
    lengths = jnp.array(LENGTHS)
    final32, ys32 = run(cell32, params, xs, carry, lengths)
    final16, ys16 = run(cell16, params, xs, carry, lengths)
    assert ys16.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in final16)
    np.testing.assert_allclose(ys16.astype(jnp.float32), ys32, rtol=5e-2, atol=5e-2)
    assert_trees_close(final16, final32, rtol=5e-2, atol=5e-2)
    # and a single step does the same
    new, y, _ = step(cell16, params, jax.tree.map(lambda leaf: leaf[:2], carry), xs[:2, 0])
    assert y.dtype == jnp.bfloat16 and all(leaf.dtype == jnp.float32 for leaf in new)


def test_any_batch_shape_steps_and_unrolls():
    cell = CELLS["griffin"][0]  # I = 5, L = 4, K = 3, H = 3
    params, _, _ = make_case(cell, 5, batch=4, steps=7, seed=10)
    # No batch axes: one step, and readout recomputes its output from the new carry and the input
    carry = cell.initial_carry(())
    assert carry.h.shape == (4,) and carry.conv.shape == (2, 4)
    new, y, readout = step(cell, params, carry, jnp.ones(5))
    assert isinstance(new, GriffinState) and y.shape == (3,)
    np.testing.assert_allclose(readout, y, rtol=1e-6, atol=1e-6)
    # Two batch axes: a whole sequence
    final, ys = run(cell, params, jnp.ones((2, 3, 6, 5)))
    assert ys.shape == (2, 3, 6, 3) and final.h.shape == (2, 3, 4) and final.conv.shape == (2, 3, 2, 4)


def test_gradients_stay_finite_where_a_rounds_to_one():
    # Given a_param so negative that softplus(a_param) underflows: a = 1 and 1 − a² = 0 exactly in float32, where
    # the derivative of √(1 − a²) is infinite; recurrentgemma bounds it at 1000 (sqrt_bound_derivative), and so do we
    cell = RGLRU(hidden_size=4, num_heads=2, input_projection=False)
    params, xs, carry = make_case(cell, 4, batch=2, steps=3, seed=13)
    params = {**params, "a_param": jnp.full((4,), -200.0)}

    @jax.jit
    def grads(params, carry):
        return jax.grad(lambda p, c: jnp.sum(rnnjax.unroll(cell, p, xs, c)[1] ** 2), argnums=(0, 1))(params, carry)

    for leaf in jax.tree.leaves(grads(params, carry)):
        assert np.all(np.isfinite(leaf))
    # and the state is carried unchanged plus the (unnormalised by 0) input: h_t = h_{t-1} + 0
    final, _ = run(cell, params, xs, carry)
    np.testing.assert_array_equal(final.h, carry.h)


def test_initialisation_follows_recurrentgemma():
    # σ(−a_param) lies on the ring [0.9, 0.999] with its square uniform (rnn_real_param_init), gate kernels are
    # N(0, 1 / width) per entry (fan-in of the (N, D, D) block kernel), biases zero
    params = init(RGLRU(hidden_size=512, num_heads=2, input_projection=False), jax.random.key(1), 512)
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    base = np_sigmoid(-params["a_param"])
    assert base.min() >= 0.9 - 1e-6 and base.max() <= 0.999 + 1e-6
    squared = (base**2 - 0.81) / (0.999**2 - 0.81)  # uniform on [0, 1]
    assert abs(squared.mean() - 0.5) < 0.05 and abs(np.quantile(squared, 0.25) - 0.25) < 0.05
    assert params["gate_x_w"].shape == (2, 256, 256)
    assert abs(params["gate_x_w"].std() * math.sqrt(512) - 1.0) < 0.01
    np.testing.assert_array_equal(params["gate_a_b"], 0.0)
    block = init(GriffinBlock(hidden_size=64, lru_width=128, conv_width=4), jax.random.key(2), 256)
    block = {k: np.asarray(v, np.float64) for k, v in block.items()}
    assert (
        abs(block["w_x"].std() * math.sqrt(256) - 1.0) < 0.02 and abs(block["w_y"].std() * math.sqrt(256) - 1.0) < 0.02
    )
    assert abs(block["conv_w"].std() * math.sqrt(4 / 0.01) - 1.0) < 0.1
    assert abs(block["w_out"].std() * math.sqrt(128) - 1.0) < 0.02
    np.testing.assert_array_equal(block["conv_b"], 0.0)


def test_recurrent_matrices_and_registry():
    cell = RGLRU(hidden_size=4, num_heads=2)
    params, xs, carry = make_case(cell, 3, batch=2, steps=1, seed=12)
    (matrix,) = cell.recurrent_matrices(params).values()
    decay = np_sigmoid(-np.asarray(params["a_param"], np.float64)) ** 8
    np.testing.assert_allclose(matrix, np.diag(decay), rtol=1e-6, atol=1e-7)
    # every step's a_t lies between the declared diag(a) (r_t = 1) and 1: from h = 1 with a zero input, h_1 = a_1
    a_t = run(cell, params, jnp.zeros((2, 1, 3)), RGLRUState(jnp.ones((2, 4))))[0].h
    assert np.all(a_t >= decay - 1e-6) and np.all(a_t <= 1.0)
    assert GriffinBlock(hidden_size=4).recurrent_matrices(params) == {}
    assert type(rnnjax.make_cell("rglru", hidden_size=4)) is RGLRU
    assert type(rnnjax.make_cell("griffin", hidden_size=4)) is GriffinBlock


@pytest.mark.parametrize(
    "cls, options, error, message",
    [
        (RGLRU, {"num_heads": 3}, ValueError, r"^num_heads must divide hidden_size \(4\)"),
        (RGLRU, {"num_heads": 0}, ValueError, r"^num_heads must be a positive int"),
        (RGLRU, {"input_projection": "yes"}, TypeError, r"^input_projection must be a bool"),
        (RGLRU, {"min_rad": 0.0}, ValueError, r"^min_rad and max_rad must satisfy"),
        (RGLRU, {"max_rad": 1.0}, ValueError, r"^min_rad and max_rad must satisfy"),
        (RGLRU, {"min_rad": "big"}, TypeError, r"^min_rad must be a float"),
        (RGLRU, {"method": "fast"}, ValueError, r"^method must be one of"),
        (RGLRU, {"hidden_size": 0}, ValueError, r"^hidden_size must be a positive int"),
        (GriffinBlock, {"conv_width": 0}, ValueError, r"^conv_width must be a positive int"),
        (GriffinBlock, {"lru_width": 6, "num_heads": 4}, ValueError, r"^num_heads must divide lru_width \(6\)"),
        (GriffinBlock, {"lru_width": 0}, ValueError, r"^lru_width must be a positive int"),
        (GriffinBlock, {"max_rad": 0.5, "min_rad": 0.6}, ValueError, r"^min_rad and max_rad must satisfy"),
        (GriffinBlock, {"method": "fast"}, ValueError, r"^method must be one of"),
    ],
)
def test_bad_hyperparameters_are_named(cls, options, error, message):
    with pytest.raises(error, match=message):
        cls(**{"hidden_size": 4, **options})


def test_bare_rglru_needs_input_size_equal_to_hidden_size():
    with pytest.raises(ValueError, match=r"^input_size must equal hidden_size \(4\) when input_projection=False"):
        RGLRU(hidden_size=4, input_projection=False).init(jax.random.key(0), 3)
