"""Tests of :class:`rnnjax.cells.mamba2.Mamba2`: two independent references, the SSD path against stepping, masks,
precision, initialisation and hyperparameter errors.

References: a plain NumPy float64 loop written from the equations (below), and the Mamba-2 mixer of
``mamba2-jax`` (pure JAX/Flax NNX) with the same weights copied in. Convention differences with ``mamba2-jax``:
its conv cache holds the last ``K − 1`` conv inputs as ``(batch, C, K − 1)``, ours the last ``K`` as
``(*B, K, C)`` (the extra, newest row lets ``readout`` recompute a step's output), so ours ``[..., 1:, :]``
transposed is its cache; it supports one B/C group only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from rnnjax.cells.mamba2 import Mamba2, Mamba2State
from rnnjax.unrolling import masked_scan

I, T = 3, 10  # input features, time steps (not a multiple of the chunk size 4)
LENGTHS = (T, 7, 2, 1, 0)  # full, partial, shorter than the conv width, a single step, empty
CELL = Mamba2(hidden_size=4, state_size=3, head_dim=2, num_groups=2, chunk_size=4)  # E = 8: 4 heads, 2 groups
CELL_G1 = Mamba2(hidden_size=4, state_size=3, head_dim=2, chunk_size=4)  # one group, as mamba2-jax


def perturbed(tree, seed, scale, dtype=jnp.float32):
    """Every leaf plus ``scale`` times NumPy normal noise (parameters off their initial values: all terms act)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf: jnp.asarray(np.asarray(leaf) + scale * rng.standard_normal(leaf.shape), dtype), tree
    )


def make_case(cell, batch_shape, num_steps=T, input_size=I, seed=0, dtype=jnp.float32):
    """``(params, xs (T, *B, I) time-major, carry)`` with perturbed parameters and a nonzero carry."""
    params = perturbed(cell.init(jax.random.key(seed), input_size), seed + 1, 0.2, dtype)
    rng = np.random.default_rng(seed + 2)
    xs = jnp.asarray(rng.standard_normal((num_steps, *batch_shape, input_size)), dtype)
    carry = perturbed(cell.initial_carry(batch_shape, dtype), seed + 3, 0.5, dtype)
    return params, xs, carry


@functools.partial(jax.jit, static_argnums=0)
def jit_sequence(cell, params, carry, xs, mask):
    return cell.sequence(params, carry, xs, mask)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("reverse", "time_major"))
def jit_unroll(cell, params, xs, carry, lengths=None, *, reverse=False, time_major=False):
    return rnnjax.unroll(cell, params, xs, carry, lengths=lengths, reverse=reverse, time_major=time_major)


@functools.partial(jax.jit, static_argnums=0)
def jit_stepped(cell, params, carry, xs, mask):
    """The reference semantics: ``masked_scan`` of ``cell.step``."""
    return masked_scan(cell.step, params, carry, xs, mask)


def prefix_mask(lengths, num_steps=T):
    return jnp.arange(num_steps)[:, None] < jnp.asarray(lengths)[None, :]  # (T, B)


def assert_trees_close(actual, expected, rtol, atol):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol)


# The NumPy float64 reference, written from the equations.


def numpy_reference(cell: Mamba2, params, xs, carry):
    """One row: ``xs`` ``(T, I)``, carry leaves without batch axes -> ``(ys (T, D), conv (K, C), ssm (H, P, N))``."""
    p = {name: np.asarray(value, np.float64) for name, value in params.items()}
    E, G, N, H, P = cell.inner_size, cell.num_groups, cell.state_size, cell.num_heads, cell.head_size
    C = cell.conv_size
    conv, h = np.array(carry.conv, np.float64), np.array(carry.ssm, np.float64)

    def silu(v):
        return v / (1.0 + np.exp(-v))

    ys = []
    for x in np.asarray(xs, np.float64):
        proj = x @ p["in_proj"]
        z, u, dt_raw = proj[:E], proj[E : E + C], proj[E + C :]
        conv = np.concatenate([conv[1:], u[None]], axis=0)  # the last K conv inputs
        xbc = silu((conv * p["conv_weight"]).sum(axis=0) + p["conv_bias"])
        xh, b, c = xbc[:E].reshape(H, P), xbc[E : E + G * N].reshape(G, N), xbc[E + G * N :].reshape(G, N)
        dt = np.log1p(np.exp(dt_raw + p["dt_bias"]))  # softplus
        A = -np.exp(p["A_log"])
        y = np.zeros((H, P))
        for head in range(H):
            g = head // (H // G)  # heads of a group are contiguous
            h[head] = np.exp(dt[head] * A[head]) * h[head] + dt[head] * np.outer(xh[head], b[g])
            y[head] = h[head] @ c[g] + p["D"][head] * xh[head]
        v = (y.reshape(E) * silu(z)).reshape(G, E // G)
        v = v / np.sqrt(np.mean(v**2, axis=-1, keepdims=True) + cell.norm_eps)
        ys.append((v.reshape(E) * p["norm_weight"]) @ p["out_proj"])
    return np.stack(ys), conv, h


@pytest.mark.parametrize(
    "options",
    [
        dict(state_size=3, num_groups=2, head_dim=2, chunk_size=4),
        pytest.param(dict(state_size=5, expand=1, chunk_size=64), marks=pytest.mark.slow),
    ],
    ids=["groups2-chunk4", "defaults-head-rule"],
)
def test_sequence_and_step_equal_a_numpy_float64_loop(options):
    # Given a cell with I != D, perturbed parameters and a nonzero carry, 2 rows
    cell = Mamba2(hidden_size=4, **options)
    params, xs, carry = make_case(cell, (2,), seed=10)
    # When run through unroll (the SSD path) and by stepping
    final, ys = jit_unroll(cell, params, xs, carry, time_major=True)
    step_final, step_ys = jit_stepped(cell, params, carry, xs, None)
    # Then both equal the float64 loop of the equations, row by row
    for b in range(2):
        want_ys, want_conv, want_ssm = numpy_reference(cell, params, xs[:, b], jax.tree.map(lambda v, b=b: v[b], carry))
        for got_ys, got_final in ((ys, final), (step_ys, step_final)):
            np.testing.assert_allclose(got_ys[:, b], want_ys, rtol=2e-5, atol=2e-5)
            np.testing.assert_allclose(got_final.conv[b], want_conv, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(got_final.ssm[b], want_ssm, rtol=2e-5, atol=2e-5)


def test_step_without_batch_axes_equals_the_numpy_loop():
    cell = Mamba2(hidden_size=2, state_size=4, chunk_size=4)
    params, xs, carry = make_case(cell, (), num_steps=5, seed=11)
    want_ys, want_conv, want_ssm = numpy_reference(cell, params, xs, carry)
    step = jax.jit(cell.step)
    for t in range(5):
        carry, y = step(params, carry, xs[t])
        assert y.shape == (2,)
        np.testing.assert_allclose(y, want_ys[t], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(carry.conv, want_conv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(carry.ssm, want_ssm, rtol=2e-5, atol=2e-5)


# mamba2-jax's mixer with our weights.


def mamba2_jax_mixer(cell: Mamba2, params):
    """A ``mamba2_jax.Mamba2Mixer`` of the same sizes holding ``params`` (one group, input size = D)."""
    mamba2_jax = pytest.importorskip("mamba2_jax")
    nnx = pytest.importorskip("flax.nnx")
    config = mamba2_jax.Mamba2Config(
        hidden_size=cell.hidden_size,
        state_size=cell.state_size,
        head_dim=cell.head_size,
        chunk_size=cell.chunk_size,
        expand=cell.expand,
        conv_kernel=cell.conv_width,
        num_hidden_layers=1,
    )
    mixer = mamba2_jax.Mamba2Mixer(config, layer_idx=0, rngs=nnx.Rngs(0))
    mixer.in_proj.kernel[...] = params["in_proj"]  # blocks z, x, B, C, dt in both
    mixer.conv1d.conv.kernel[...] = params["conv_weight"][:, None, :]  # (K, 1, C): row k times u_{t−K+1+k}
    mixer.conv1d.conv.bias[...] = params["conv_bias"]
    mixer.dt_bias[...] = params["dt_bias"]
    mixer.A_log[...] = params["A_log"]
    mixer.D[...] = params["D"]
    mixer.norm.weight[...] = params["norm_weight"]
    mixer.out_proj.kernel[...] = params["out_proj"]
    return nnx.jit(lambda mixer, xs, conv_state=None, ssm_state=None: mixer(xs, conv_state, ssm_state)), mixer


def test_sequence_equals_the_mamba2_jax_mixer():
    # Given one cell and the reference mixer with the same weights (T = 10 over chunks of 4 in both)
    cell = Mamba2(hidden_size=4, state_size=3, head_dim=4, chunk_size=4)
    params, xs, carry = make_case(cell, (2,), input_size=4, seed=20)
    run, mixer = mamba2_jax_mixer(cell, params)
    xs_bm = jnp.moveaxis(xs, 0, 1)  # (B, T, D)
    # When both run from zero states
    ref_out, ref_conv, ref_ssm = run(mixer, xs_bm)
    final, ys = jit_unroll(cell, params, xs_bm, cell.initial_carry(2))
    # Then outputs and final states agree (its conv cache is our last K − 1 rows, transposed)
    np.testing.assert_allclose(ys, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.swapaxes(final.conv[:, 1:], 1, 2), ref_conv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(final.ssm, ref_ssm, rtol=1e-5, atol=1e-5)
    # and from nonzero states (our oldest conv row is unused by the next step, so it may be anything)
    ref_out, ref_conv, ref_ssm = run(mixer, xs_bm, jnp.swapaxes(carry.conv[:, 1:], 1, 2), carry.ssm)
    final, ys = jit_unroll(cell, params, xs_bm, carry)
    np.testing.assert_allclose(ys, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.swapaxes(final.conv[:, 1:], 1, 2), ref_conv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(final.ssm, ref_ssm, rtol=1e-5, atol=1e-5)


def test_step_equals_the_mamba2_jax_mixer_with_its_cache():
    # Given the reference mixer run one token at a time on its (conv, ssm) cache
    cell = CELL_G1
    params, xs, carry = make_case(cell, (2,), num_steps=6, input_size=4, seed=21)
    run, mixer = mamba2_jax_mixer(cell, params)
    conv_cache, ssm_cache = jnp.swapaxes(carry.conv[:, 1:], 1, 2), carry.ssm
    step = jax.jit(cell.step)
    for t in range(6):
        ref_out, conv_cache, ssm_cache = run(mixer, xs[t][:, None], conv_cache, ssm_cache)
        carry, y = step(params, carry, xs[t])
        # Then every output and every cached state agree
        np.testing.assert_allclose(y, ref_out[:, 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(jnp.swapaxes(carry.conv[:, 1:], 1, 2), conv_cache, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(carry.ssm, ssm_cache, rtol=1e-5, atol=1e-5)


# The SSD path against stepping.


@pytest.mark.parametrize(
    "chunk_size",
    [pytest.param(1, marks=pytest.mark.slow), 4, pytest.param(64, marks=pytest.mark.slow)],
    ids=["chunk1", "chunk4", "chunk-above-T"],
)
def test_sequence_equals_stepping_with_lengths(chunk_size):
    # Given rows of lengths [T, 7, 2, 1, 0] (two shorter than the conv width) and a nonzero carry
    cell = dataclasses.replace(CELL, chunk_size=chunk_size)
    params, xs, carry = make_case(cell, (len(LENGTHS),), seed=30)
    mask = prefix_mask(LENGTHS)
    # When run by the chunked SSD path and by masked stepping
    final, ys = jit_sequence(cell, params, carry, xs, mask)
    want_final, want_ys = jit_stepped(cell, params, carry, xs, mask)
    # Then outputs and the final carry (conv buffer included) agree, padding is zero, empty rows keep the carry
    np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5)
    assert_trees_close(final, want_final, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ys)[~np.asarray(mask)], 0.0)
    assert_trees_close(jax.tree.map(lambda v: v[4], final), jax.tree.map(lambda v: v[4], carry), 0, 0)
    # The row of length 2 keeps its two inputs last, after the initial buffer's last K − 2 rows
    u = (xs[:2, 2] @ params["in_proj"])[:, 8 : 8 + cell.conv_size]  # (2, C): E = 8
    np.testing.assert_allclose(final.conv[2], jnp.concatenate([carry.conv[2, 2:], u]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "chunk_size",
    [pytest.param(1, marks=pytest.mark.slow), 4, pytest.param(64, marks=pytest.mark.slow)],
    ids=["chunk1", "chunk4", "chunk-above-T"],
)
def test_gradients_of_sequence_equal_those_of_stepping(chunk_size):
    cell = dataclasses.replace(CELL, chunk_size=chunk_size)
    args = make_case(cell, (len(LENGTHS),), seed=40)  # (params, xs, carry)
    mask = prefix_mask(LENGTHS)
    weights = jnp.asarray(np.random.default_rng(41).standard_normal((T, len(LENGTHS), 4)), jnp.float32)

    def loss(run, args):
        params, xs, carry = args
        final, ys = run(cell, params, carry, xs, mask)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(final))

    got = jax.jit(jax.grad(functools.partial(loss, jit_sequence)))(args)
    want = jax.jit(jax.grad(functools.partial(loss, jit_stepped)))(args)
    assert_trees_close(got, want, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(got[0]["A_log"]).sum()) > 0.0  # the decay gets a gradient
    np.testing.assert_array_equal(np.asarray(got[1])[7:, 1], 0.0)  # masked inputs get none
    np.testing.assert_array_equal(np.asarray(got[1])[:, 4], 0.0)


def test_any_mask_not_only_prefixes_equals_stepping():
    # Given holes in the middle of rows (masked steps hold the carry: the conv sees only valid inputs)
    cell = CELL
    params, xs, carry = make_case(cell, (len(LENGTHS),), seed=50)
    mask = jnp.asarray(np.random.default_rng(51).random((T, len(LENGTHS))) < 0.6)
    final, ys = jit_sequence(cell, params, carry, xs, mask)
    want_final, want_ys = jit_stepped(cell, params, carry, xs, mask)
    np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5)
    assert_trees_close(final, want_final, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_several_batch_axes_and_reverse_through_unroll():
    cell = Mamba2(hidden_size=3, state_size=2, chunk_size=4)
    params, xs, carry = make_case(cell, (2, 3), seed=60)
    lengths = jnp.array([[T, 2, 0], [1, 5, T]])
    final, ys = jit_unroll(cell, params, xs, carry, lengths, reverse=True, time_major=True)
    flat = jax.tree.map(lambda v: v.reshape(6, *v.shape[2:]), carry)
    flat_final, flat_ys = jit_unroll(
        cell, params, xs.reshape(T, 6, I), flat, lengths=lengths.reshape(6), reverse=True, time_major=True
    )
    np.testing.assert_allclose(ys.reshape(T, 6, -1), flat_ys, rtol=1e-6, atol=1e-6)
    assert_trees_close(jax.tree.map(lambda v: v.reshape(6, *v.shape[2:]), final), flat_final, 1e-6, 1e-6)


def test_readout_of_a_stepped_carry_is_the_step_output():
    cell = CELL
    params, xs, carry = make_case(cell, (2,), seed=70)
    new_carry, y = jax.jit(cell.step)(params, carry, xs[0])
    np.testing.assert_allclose(jax.jit(cell.readout)(params, new_carry, xs[0]), y, rtol=1e-6, atol=1e-6)
    assert cell.recurrent_matrices(params) == {}


# Precision.


def test_bfloat16_compute_keeps_a_float32_carry_and_is_close_to_float32():
    cell32 = CELL
    cell16 = dataclasses.replace(CELL, dtype=jnp.bfloat16)
    params, xs, carry = make_case(cell32, (len(LENGTHS),), seed=80)
    mask = prefix_mask(LENGTHS)
    final32, ys32 = jit_sequence(cell32, params, carry, xs, mask)
    final16, ys16 = jit_sequence(cell16, params, carry, xs, mask)
    step_final16, step_ys16 = jit_stepped(cell16, params, carry, xs, mask)
    assert ys16.dtype == step_ys16.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((final16, step_final16)))
    ys16 = np.asarray(ys16.astype(jnp.float32))
    np.testing.assert_allclose(ys16, ys32, rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(ys16, step_ys16.astype(jnp.float32), rtol=2e-2, atol=2e-2)
    assert_trees_close(final16, final32, rtol=2e-2, atol=2e-2)
    assert_trees_close(final16, step_final16, rtol=1e-5, atol=1e-5)  # the state is float32 in both paths


@pytest.mark.slow
@pytest.mark.usefixtures("enable_x64")
def test_float64_parameters_run_in_float64():
    cell = Mamba2(hidden_size=2, state_size=2, chunk_size=4, param_dtype=jnp.float64)
    params, xs, carry = make_case(cell, (2,), seed=90, dtype=jnp.float64)
    final, ys = jit_sequence(cell, params, carry, xs, None)
    assert ys.dtype == jnp.float64 and all(leaf.dtype == jnp.float64 for leaf in final)
    want_ys, want_conv, want_ssm = numpy_reference(cell, params, xs[:, 0], jax.tree.map(lambda v: v[0], carry))
    np.testing.assert_allclose(ys[:, 0], want_ys, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(final.ssm[0], want_ssm, rtol=1e-11, atol=1e-12)


# Shapes, initialisation and hyperparameters.


@pytest.mark.parametrize(
    "hidden_size, expand, head_dim, heads", [(1, 2, 2, 1), (4, 2, 8, 1), (48, 2, 48, 2), (64, 2, 64, 2), (96, 1, 48, 2)]
)
def test_default_head_dim_is_the_largest_divisor_of_the_inner_width_up_to_64(hidden_size, expand, head_dim, heads):
    cell = Mamba2(hidden_size=hidden_size, expand=expand)
    assert (cell.head_size, cell.num_heads) == (head_dim, heads)


def test_init_follows_the_official_code_and_the_carry_layout():
    cell = Mamba2(hidden_size=16, head_dim=4, state_size=5, num_groups=2, conv_width=3)
    params = cell.init(jax.random.key(0), 7)
    E, H, C = 32, 8, 32 + 2 * 2 * 5
    shapes = {name: value.shape for name, value in params.items()}
    assert shapes == {
        "in_proj": (7, 2 * E + 20 + H),
        "conv_weight": (3, C),
        "conv_bias": (C,),
        "dt_bias": (H,),
        "A_log": (H,),
        "D": (H,),
        "norm_weight": (E,),
        "out_proj": (E, 16),
    }
    dt = jax.nn.softplus(params["dt_bias"])
    assert bool(jnp.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))))
    A = jnp.exp(params["A_log"])
    assert bool(jnp.all((A >= 1.0) & (A <= 16.0)))
    np.testing.assert_array_equal(params["D"], 1.0)
    np.testing.assert_array_equal(params["norm_weight"], 1.0)
    assert float(jnp.abs(params["in_proj"]).max()) <= 1 / np.sqrt(7)
    carry = cell.initial_carry((2, 3))
    assert isinstance(carry, Mamba2State)
    assert carry.conv.shape == (2, 3, 3, C) and carry.ssm.shape == (2, 3, H, 4, 5)
    assert rnnjax.make_cell("mamba2", hidden_size=16, head_dim=4, state_size=5, num_groups=2, conv_width=3) == cell
    _, y = jax.eval_shape(cell.step, params, carry, jnp.ones((2, 3, 7)))  # any batch shape, traced only
    assert y.shape == (2, 3, 16)


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"expand": 0}, ValueError, r"^expand must be a positive int"),
        ({"state_size": 0}, ValueError, r"^state_size must be a positive int"),
        ({"num_groups": 1.5}, TypeError, r"^num_groups must be a positive int"),
        ({"conv_width": -1}, ValueError, r"^conv_width must be a positive int"),
        ({"chunk_size": 0}, ValueError, r"^chunk_size must be a positive int"),
        ({"head_dim": 0}, ValueError, r"^head_dim must be a positive int"),
        ({"head_dim": 3}, ValueError, r"^head_dim must divide the inner width expand \* hidden_size = 8, got 3"),
        ({"head_dim": 4, "num_groups": 3}, ValueError, r"^num_groups must divide the number of heads 2, got 3"),
        ({"norm_eps": 0.0}, ValueError, r"^norm_eps must be a positive float"),
        ({"hidden_size": 0}, ValueError, r"^hidden_size must be a positive int"),
        ({"dtype": jnp.int32}, TypeError, r"^dtype must be a floating-point dtype"),
    ],
)
def test_bad_hyperparameters_are_named(options, error, message):
    with pytest.raises(error, match=message):
        Mamba2(**{"hidden_size": 4, **options})
