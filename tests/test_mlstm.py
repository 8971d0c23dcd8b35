"""Tests of :class:`rnnjax.cells.mlstm.MLSTM` against independent references.

References: a plain float64 NumPy loop over the paper's equations (Beck et al. 2024, §2.3) in the *unstabilised*
form ``C̄_t = σ(f̃_t) C̄_{t-1} + exp(ĩ_t) v_t k_tᵀ`` (the paper's ``(V, K)`` layout), ``n̄_t = σ(f̃_t) n̄_{t-1} +
exp(ĩ_t) k_t``, ``h̃_t = C̄_t q_t / max(|n̄_tᵀ q_t|, 1)``, whose states the cell's stabilised ones must equal
times ``exp(−m_t)``; the cell's own ``step`` under ``masked_scan`` for the chunkwise ``sequence`` (values, final
carry, gradients); and, when installed, the official ``xlstm`` package's PyTorch backends
(``pip install --no-deps xlstm==2.0.6``), fed the same projections, with ``eps=0``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from rnnjax.cells.mlstm import MLSTM, MLSTMState
from rnnjax.unrolling import masked_scan

I = 5  # input features


def normal(seed, shape, scale=1.0):
    return scale * np.random.default_rng(seed).standard_normal(shape)


def make_params(cell, seed, dtype=jnp.float32, scale=0.4):
    """Parameters moved off their initial values (gate kernels start at zero), so every term is exercised."""
    params = cell.init(jax.random.key(seed), I)
    return {
        k: jnp.asarray(np.asarray(v, np.float64) + normal(seed + j, v.shape, scale), dtype)
        for j, (k, v) in enumerate(sorted(params.items()))
    }


def make_carry(cell, seed, batch_shape, dtype=jnp.float32):
    """A nonzero carry (any real ``m``, ``n``, ``C``)."""
    zeros = cell.initial_carry(batch_shape, dtype)
    return MLSTMState(*(jnp.asarray(normal(seed + j, leaf.shape, 0.5), dtype) for j, leaf in enumerate(zeros)))


def reference(cell, params, xs, carry):
    """The paper's equations, unstabilised, in float64 NumPy; one row: ``xs`` ``(T, I)``, carry without batch.

    Returns ``(ys (T, H), (m, n, C))`` with the final state stabilised by the reference's own ``m`` recursion and
    ``C`` in the cell's ``(NH, K, V)`` layout.
    """
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    NH, K, V = cell.num_heads, cell.head_key_size, cell.hidden_size // cell.num_heads
    m = np.array(carry.m, np.float64)  # (NH,)
    n_bar = np.exp(m)[:, None] * np.asarray(carry.n, np.float64)  # (NH, K)
    C_bar = np.exp(m)[:, None, None] * np.swapaxes(np.asarray(carry.C, np.float64), -1, -2)  # (NH, V, K)
    ys = []
    for x in np.asarray(xs, np.float64):
        y = np.zeros(cell.hidden_size)
        for h in range(NH):
            q = x @ p["w_q"][:, h * K : (h + 1) * K]
            k = x @ p["w_k"][:, h * K : (h + 1) * K] / math.sqrt(K)
            v = x @ p["w_v"][:, h * V : (h + 1) * V]
            i_pre = x @ p["w_i"][:, h] + p["b_i"][h]
            f_pre = x @ p["w_f"][:, h] + p["b_f"][h]
            f = 1.0 / (1.0 + math.exp(-f_pre))
            C_bar[h] = f * C_bar[h] + math.exp(i_pre) * np.outer(v, k)
            n_bar[h] = f * n_bar[h] + math.exp(i_pre) * k
            m[h] = max(math.log(f) + m[h], i_pre)
            o = 1.0 / (1.0 + np.exp(-(x @ p["w_o"][:, h * V : (h + 1) * V] + p["b_o"][h * V : (h + 1) * V])))
            y[h * V : (h + 1) * V] = o * (C_bar[h] @ q) / max(abs(n_bar[h] @ q), 1.0)
        ys.append(y)
    scale = np.exp(-m)
    return np.array(ys), (m, scale[:, None] * n_bar, scale[:, None, None] * np.swapaxes(C_bar, -1, -2))


@functools.partial(jax.jit, static_argnums=0)
def unroll(cell, params, xs, carry=None, lengths=None):
    return rnnjax.unroll(cell, params, xs, carry, lengths=lengths)


@functools.partial(jax.jit, static_argnums=0)
def step(cell, params, carry, x):
    return cell.step(params, carry, x)


@functools.partial(jax.jit, static_argnums=0)
def run_sequence(cell, params, carry, xs, mask):
    return cell.sequence(params, carry, xs, mask)


@functools.partial(jax.jit, static_argnums=0)
def run_stepped(cell, params, carry, xs, mask):
    return masked_scan(cell.step, params, carry, xs, mask)


def assert_trees_close(actual, expected, rtol, atol):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol)


# Values against the paper's equations.


@pytest.mark.usefixtures("enable_x64")
def test_step_and_sequence_equal_the_paper_equations():
    # Given 3 heads with key size 4 and value size 2, float64 parameters, inputs (2, T, I) and a nonzero carry
    T = 10  # 3 chunks of 4, the last one short
    cell = MLSTM(hidden_size=6, num_heads=3, key_size=4, chunk_size=4)
    params = make_params(cell, seed=1, dtype=jnp.float64)
    xs = jnp.asarray(normal(2, (2, T, I)), jnp.float64)
    carry = make_carry(cell, 3, (2,), jnp.float64)
    # When run through sequence (rnnjax.unroll) and through step in a loop
    final, ys = unroll(cell, params, xs, carry)
    stepped, c = [], carry
    for t in range(T):
        c, y = step(cell, params, c, xs[:, t])
        stepped.append(y)
    # Then both equal the unstabilised equations, row by row, outputs and final stabilised state
    for b in range(2):
        want_ys, want_final = reference(cell, params, xs[b], jax.tree.map(lambda leaf, b=b: leaf[b], carry))
        np.testing.assert_allclose(ys[b], want_ys, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(jnp.stack(stepped, 1)[b], want_ys, rtol=1e-10, atol=1e-12)
        for got_final in (final, c):
            for got, want in zip(got_final, want_final):
                np.testing.assert_allclose(got[b], want, rtol=1e-10, atol=1e-12)


# The chunkwise form against stepping.


@pytest.mark.parametrize(
    "chunk_size, batch_shape, masked",
    [(1, (2, 3), True), (3, (2, 3), False), (4, (2, 3), True), (64, (), True), (64, (2, 3), False)],
    ids=["L1-mask", "L3", "L4-mask", "L64-unbatched-mask", "L64"],
)
def test_chunkwise_sequence_equals_stepping(chunk_size, batch_shape, masked):
    # Given T = 10 (not a multiple of 3 or 4; below 64), a nonzero carry and maybe a mask with holes
    T = 10
    cell = MLSTM(hidden_size=8, num_heads=2, key_size=3, chunk_size=chunk_size)
    stepping = MLSTM(hidden_size=8, num_heads=2, key_size=3)  # step ignores chunk_size: one compiled reference
    params = make_params(cell, seed=4)
    xs = jnp.asarray(normal(5, (T, *batch_shape, I)), jnp.float32)
    carry = make_carry(cell, 6, batch_shape)
    mask = jnp.asarray(np.random.default_rng(7).random((T, *batch_shape)) < 0.7) if masked else None
    # When run chunkwise and stepped under masked_scan
    got = run_sequence(cell, params, carry, xs, mask)
    want = run_stepped(stepping, params, carry, xs, mask)
    # Then outputs and final carries agree to float32 rounding, and masked outputs are exactly zero
    assert_trees_close(got, want, rtol=2e-5, atol=2e-6)
    if masked:
        np.testing.assert_array_equal(np.asarray(got[1])[~np.asarray(mask)], 0.0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def run_with_gradient(run, cell, args, mask, weights):
    """``(run(cell, *args, mask), gradient)``: the gradient of a loss of the outputs and every leaf of the final
    carry with respect to ``args = (params, carry, xs)``."""

    def loss(args):
        final, ys = run(cell, *args, mask)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(leaf)) for leaf in final), (final, ys)

    grads, outputs = jax.grad(loss, has_aux=True)(args)
    return outputs, grads


@pytest.mark.parametrize("chunk_size", [pytest.param(1, marks=pytest.mark.slow), 4, 64])
def test_chunkwise_gradients_equal_stepping_gradients(chunk_size):
    # Given float32 (params, carry, xs) with a nonzero carry, and a mask with a hole and an empty row
    T = 9
    cell = MLSTM(hidden_size=4, num_heads=2, chunk_size=chunk_size)
    params = make_params(cell, seed=8)
    xs = jnp.asarray(normal(9, (T, 3, I)), jnp.float32)
    args = (params, make_carry(cell, 10, (3,)), xs)
    mask = jnp.asarray(np.arange(T)[:, None] < np.array([T, 4, 0])).at[2, 0].set(False)
    weights = jnp.asarray(normal(11, (T, 3, cell.hidden_size)), jnp.float32)
    # When differentiated through the chunkwise form and through stepping (step ignores chunk_size)
    got = run_with_gradient(run_sequence, cell, args, mask, weights)
    want = run_with_gradient(run_stepped, MLSTM(hidden_size=4, num_heads=2), args, mask, weights)
    # Then values and gradients (parameters, initial carry, inputs) are finite and agree
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(got))
    assert_trees_close(got[0], want[0], rtol=2e-5, atol=2e-6)
    assert_trees_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    # and masked inputs get exactly no gradient
    np.testing.assert_array_equal(np.asarray(got[1][2])[~np.asarray(mask)], 0.0)


@pytest.mark.slow
def test_saturated_gates_stay_finite_with_finite_gradients():
    # Given input gates far beyond exp's float32 range (ĩ ≈ ±200: m ≈ +200, and m ≈ −200 falling by 30 a step)
    # and forget gates near 0 and near 1
    T = 12
    cell = MLSTM(hidden_size=6, num_heads=3, chunk_size=5)
    params = make_params(cell, seed=12)
    params["b_i"] = jnp.array([200.0, -200.0, -200.0])
    params["b_f"] = jnp.array([-30.0, -30.0, 30.0])
    args = (params, cell.initial_carry((2,)), jnp.asarray(normal(13, (T, 2, I)), jnp.float32))
    mask = jnp.asarray(np.arange(T)[:, None] < np.array([T, 5]))
    weights = jnp.ones((T, 2, cell.hidden_size), jnp.float32)
    # When run chunkwise and stepped, and differentiated
    got = run_with_gradient(run_sequence, cell, args, mask, weights)
    want = run_with_gradient(run_stepped, cell, args, mask, weights)
    # Then values and gradients are finite and the two forms agree
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves((got, want)))
    assert_trees_close(got[0], want[0], rtol=2e-5, atol=2e-6)
    assert_trees_close(got[1], want[1], rtol=1e-4, atol=1e-5)


# Variable lengths, precision, transformations.


def test_variable_lengths_equal_each_row_alone():
    # Given lengths [T, 5, 1, 0] and a nonzero carry
    T, lengths = 11, [11, 5, 1, 0]
    cell = MLSTM(hidden_size=4, num_heads=2, chunk_size=4)
    params = make_params(cell, seed=14)
    xs = jnp.asarray(normal(15, (4, T, I)), jnp.float32)
    carry = make_carry(cell, 16, (4,))
    final, ys = unroll(cell, params, xs, carry, jnp.array(lengths))
    for b, n in enumerate(lengths):
        row_carry = jax.tree.map(lambda leaf, b=b: leaf[b], carry)
        row_final = jax.tree.map(lambda leaf, b=b: leaf[b], final)
        if n == 0:  # an empty row keeps its carry bit for bit
            assert_trees_close(row_final, row_carry, rtol=0, atol=0)
        else:  # a row equals the reference run on its prefix alone
            want_ys, want_final = reference(cell, params, xs[b, :n], row_carry)
            np.testing.assert_allclose(ys[b, :n], want_ys, rtol=2e-5, atol=2e-6)
            assert_trees_close(row_final, MLSTMState(*want_final), rtol=2e-5, atol=2e-6)
        np.testing.assert_array_equal(np.asarray(ys[b, n:]), 0.0)  # and outputs past the length are exactly 0


def test_bfloat16_compute_keeps_a_float32_carry_and_is_close_to_float32():
    cell32 = MLSTM(hidden_size=8, num_heads=2, chunk_size=4)
    cell16 = MLSTM(hidden_size=8, num_heads=2, chunk_size=4, dtype=jnp.bfloat16)
    params = make_params(cell32, seed=17)
    xs = jnp.asarray(normal(18, (2, 10, I)), jnp.float32)
    carry = make_carry(cell32, 19, (2,))
    final32, ys32 = unroll(cell32, params, xs, carry)
    final16, ys16 = unroll(cell16, params, xs, carry)
    stepped16 = run_stepped(cell16, params, carry, jnp.moveaxis(xs, 1, 0), None)
    assert ys16.dtype == jnp.bfloat16 and stepped16[1].dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in (*final16, *stepped16[0]))
    np.testing.assert_allclose(np.asarray(ys16, np.float32), ys32, rtol=5e-2, atol=5e-2)
    assert_trees_close(final16, final32, rtol=5e-2, atol=5e-2)
    # the chunkwise and stepped bf16 runs round the projection the same way: they agree closely
    np.testing.assert_allclose(
        np.asarray(ys16, np.float32), np.moveaxis(np.asarray(stepped16[1], np.float32), 0, 1), rtol=2e-2, atol=2e-2
    )
    assert_trees_close(final16, stepped16[0], rtol=1e-4, atol=1e-5)


def test_readout_reads_the_step_output_off_the_carry_and_jit_matches_eager():
    cell = MLSTM(hidden_size=6, num_heads=3, key_size=2)
    params = make_params(cell, seed=20)
    carry, x = make_carry(cell, 21, (2,)), jnp.asarray(normal(22, (2, I)), jnp.float32)
    new, y = cell.step(params, carry, x)
    np.testing.assert_allclose(cell.readout(params, new, x), y, rtol=1e-6, atol=1e-7)
    assert_trees_close(jax.jit(cell.step)(params, carry, x), (new, y), rtol=1e-6, atol=1e-7)
    assert cell.recurrent_matrices(params) == {}
    assert new.m.shape == (2, 3) and new.n.shape == (2, 3, 2) and new.C.shape == (2, 3, 2, 2)


def test_init_follows_the_official_code():
    cell = MLSTM(hidden_size=8, num_heads=4, key_size=3)
    params = cell.init(jax.random.key(0), 64)
    shapes = {k: v.shape for k, v in params.items()}
    assert shapes == {
        "w_q": (64, 12), "w_k": (64, 12), "w_v": (64, 8), "w_o": (64, 8), "b_o": (8,),
        "w_i": (64, 4), "b_i": (4,), "w_f": (64, 4), "b_f": (4,),
    }  # fmt: skip
    np.testing.assert_allclose(params["b_f"], [3.0, 4.0, 5.0, 6.0], rtol=1e-6)  # linspace(3, 6) over heads
    np.testing.assert_array_equal(params["w_i"], 0.0)
    np.testing.assert_array_equal(params["w_f"], 0.0)
    np.testing.assert_array_equal(params["b_o"], 0.0)
    std = math.sqrt(2 / (5 * 64))  # small init
    qkv = np.concatenate([np.ravel(params[k]) for k in ("w_q", "w_k", "w_v")])
    assert abs(qkv.std() / std - 1) < 0.1
    assert 0.0 < float(jnp.std(params["b_i"])) < 0.3
    assert rnnjax.make_cell("mlstm", hidden_size=4) == MLSTM(hidden_size=4)
    assert MLSTM(hidden_size=4, param_dtype=jnp.bfloat16).init(jax.random.key(0), 3)["w_q"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"num_heads": 3}, ValueError, r"^num_heads must divide hidden_size"),
        ({"num_heads": 0}, ValueError, r"^num_heads must be a positive int"),
        ({"num_heads": 2.0}, TypeError, r"^num_heads must be a positive int"),
        ({"key_size": 0}, ValueError, r"^key_size must be a positive int"),
        ({"chunk_size": 0}, ValueError, r"^chunk_size must be a positive int"),
        ({"chunk_size": 1.5}, TypeError, r"^chunk_size must be a positive int"),
        ({"hidden_size": 0}, ValueError, r"^hidden_size must be a positive int"),
        ({"dtype": jnp.int8}, TypeError, r"^dtype must be a floating-point dtype"),
    ],
)
def test_bad_hyperparameters_are_named(options, error, message):
    with pytest.raises(error, match=message):
        MLSTM(**{"hidden_size": 4, **options})


# The official PyTorch code (xlstm 2.0.6), fed the cell's projections.


def projections(cell, params, xs):
    """``q, k (unscaled), v`` ``(B, NH, T, ·)``, gate pre-activations ``(B, NH, T)`` and ``o`` ``(B, T, H)``."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xs = np.asarray(xs, np.float64)  # (B, T, I)
    NH = cell.num_heads

    def heads(a):  # (B, T, NH·D) -> (B, NH, T, D)
        return np.moveaxis(a.reshape(*a.shape[:2], NH, -1), 2, 1)

    q, k, v = (heads(xs @ p[name]) for name in ("w_q", "w_k", "w_v"))
    i_pre = np.moveaxis(xs @ p["w_i"] + p["b_i"], -1, 1)  # (B, NH, T)
    f_pre = np.moveaxis(xs @ p["w_f"] + p["b_f"], -1, 1)
    o = 1.0 / (1.0 + np.exp(-(xs @ p["w_o"] + p["b_o"])))
    return q, k, v, i_pre, f_pre, o


def concat_heads(h):  # (B, NH, T, V) -> (B, T, H)
    h = np.moveaxis(np.asarray(h, np.float64), 1, 2)
    return h.reshape(*h.shape[:2], -1)


@pytest.mark.slow
def test_equals_the_official_pytorch_backends():
    backends = pytest.importorskip("xlstm.blocks.mlstm.backends")
    torch = pytest.importorskip("torch")
    T, NH, D = 12, 2, 4  # the official backends need equal key and value sizes
    cell = MLSTM(hidden_size=NH * D, num_heads=NH, chunk_size=5)
    params = make_params(cell, seed=23)
    xs = jnp.asarray(normal(24, (3, T, I)), jnp.float32)
    carry = make_carry(cell, 25, (3,))
    final, ys = rnnjax.unroll(cell, params, xs, carry)
    q, k, v, i_pre, f_pre, o = projections(cell, params, xs)

    def tensor(a):
        return torch.tensor(np.asarray(a, np.float32))

    # The recurrent step (k / √D as here; C in the (K, V) layout), from the same nonzero carry
    C, n, m = tensor(carry.C), tensor(carry.n)[..., None], tensor(carry.m)[..., None, None]
    hs = []
    for t in range(T):
        h, (C, n, m) = backends.recurrent_step_stabilized_simple(
            C, n, m, *(tensor(a[:, :, t : t + 1]) for a in (q, k, v)),
            tensor(i_pre[:, :, t, None, None]), tensor(f_pre[:, :, t, None, None]), eps=0.0,
        )  # fmt: skip
        hs.append(h.numpy())
    torch_ys = o * concat_heads(np.concatenate(hs, axis=2))
    errors = {"step y": np.abs(ys - torch_ys).max()}
    np.testing.assert_allclose(ys, torch_ys, rtol=1e-5, atol=1e-5)
    for name, got, want in (("m", final.m, m[..., 0, 0]), ("n", final.n, n[..., 0]), ("C", final.C, C)):
        errors[f"step {name}"] = np.abs(np.asarray(got) - want.numpy()).max()
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)

    # The chunkwise form (q / √D there instead of k / √D, so its C and n are √D times the cell's), T = 3 chunks
    h, (C, n, m) = backends.chunkwise_simple(
        *(tensor(a) for a in (q, k, v, i_pre, f_pre)), tensor(np.sqrt(D) * np.asarray(carry.C)),
        tensor(np.sqrt(D) * np.asarray(carry.n)), tensor(carry.m), chunk_size=4,
        return_last_state=True, eps=0.0,
    )  # fmt: skip
    errors["chunkwise y"] = np.abs(ys - o * concat_heads(h.numpy())).max()
    np.testing.assert_allclose(ys, o * concat_heads(h.numpy()), rtol=1e-5, atol=1e-5)
    for name, got, want in (
        ("m", final.m, m[..., 0, 0]),
        ("n", final.n, n / np.sqrt(D)),
        ("C", final.C, C / np.sqrt(D)),
    ):
        errors[f"chunkwise {name}"] = np.abs(np.asarray(got) - want.numpy()).max()
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)

    # The parallel (quadratic) form, from the zero state
    _, ys0 = rnnjax.unroll(cell, params, xs)
    h = backends.parallel_stabilized_simple(
        *(tensor(a) for a in (q, k, v)), tensor(i_pre[..., None]), tensor(f_pre[..., None]), eps=0.0
    )
    errors["parallel y"] = np.abs(ys0 - o * concat_heads(h.numpy())).max()
    np.testing.assert_allclose(ys0, o * concat_heads(h.numpy()), rtol=1e-5, atol=1e-5)
    print("max abs errors against xlstm:", {name: float(e) for name, e in errors.items()})
