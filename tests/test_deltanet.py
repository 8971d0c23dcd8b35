"""Gated DeltaNet: against a float64 NumPy loop written from the paper's equations, and chunked against stepping.

The reference (:func:`reference`) follows Yang, Kautz & Hatamizadeh 2024 literally, one row, step and head at a
time: ``S_t = α_t S_{t−1} (I − β_t k_t k_t^T) + β_t v_t k_t^T`` with the transition as an explicit ``d_k × d_k``
matrix, ``o_t = S_t q_t``, then the gated RMSNorm and the output projection. The cell's ``step`` uses the
expanded update and ``sequence`` the chunked WY form, so each is checked against an independent computation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from rnnjax.cells.deltanet import GatedDeltaNet, GatedDeltaNetState
from rnnjax.unrolling import masked_scan, time_mask

H, I = 4, 3  # hidden size, input features


def normal(seed, shape, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def perturbed(tree, seed, dtype, scale):
    """Every leaf cast to ``dtype`` plus ``scale`` times normal noise (moves parameters off their initial values)."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(
        treedef, [leaf.astype(dtype) + normal(seed + i, leaf.shape, dtype, scale) for i, leaf in enumerate(leaves)]
    )


def make_case(cell, batch=2, steps=9, dtype=jnp.float32, seed=0):
    """``(params, xs (B, T, I), carry)``: perturbed parameters, inputs and a nonzero initial carry."""
    params = perturbed(cell.init(jax.random.key(seed), I), 100 * seed + 1, dtype, 0.3)
    xs = normal(100 * seed + 50, (batch, steps, I), dtype)
    carry = perturbed(cell.initial_carry((batch,), dtype), 100 * seed + 70, dtype, 0.5)
    return params, xs, carry


# The reference: a float64 NumPy loop from the paper's equations.


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _silu(z):
    return z * _sigmoid(z)


def reference(cell, params, xs, carry, lengths=None):
    """Row by row, step by step, head by head, in float64.

    Args:
        cell: the hyperparameters.
        params: the cell's parameters.
        xs: ``(B, T, I)``.
        carry: initial :class:`GatedDeltaNetState` with a batch axis ``B``.
        lengths: valid steps per row (``None``: all ``T``).

    Returns:
        ``(ys (B, T, H), conv (B, W, C), S (B, h, d_v, d_k))``; outputs past a row's length are zero.
    """
    P = {name: np.asarray(value, np.float64) for name, value in params.items()}
    xs = np.asarray(xs, np.float64)
    h, dk, dv, W = cell.heads, cell.key_dim, cell.value_dim, cell.conv_width
    c = 2.0 if cell.allow_negative_eigenvalues else 1.0
    num_rows, num_steps = xs.shape[:2]
    ys = np.zeros((num_rows, num_steps, cell.hidden_size))
    convs, states = np.array(carry.conv, np.float64), np.array(carry.S, np.float64)
    for b in range(num_rows):
        window, S = convs[b], states[b]  # (W, C), (h, d_v, d_k)
        for t in range(num_steps if lengths is None else lengths[b]):
            x = xs[b, t]
            u = x @ P["w_qkv"]  # the short convolutions' inputs (C,)
            if W > 0:
                window = np.concatenate([window[1:], u[None]])  # last W inputs, newest last
                f = _silu((window * P["conv"]).sum(axis=0))
            else:
                f = _silu(u)
            q, k, v = f[: h * dk].reshape(h, dk), f[h * dk : 2 * h * dk].reshape(h, dk), f[2 * h * dk :].reshape(h, dv)
            q = q / np.sqrt((q**2).sum(-1, keepdims=True) + 1e-6) / np.sqrt(dk)
            k = k / np.sqrt((k**2).sum(-1, keepdims=True) + 1e-6)
            alpha = np.exp(-np.exp(P["A_log"]) * np.logaddexp(0.0, x @ P["w_a"] + P["dt_bias"]))  # (h,)
            beta = c * _sigmoid(x @ P["w_b"])  # (h,)
            o = np.zeros((h, dv))
            for i in range(h):
                transition = alpha[i] * (np.eye(dk) - beta[i] * np.outer(k[i], k[i]))  # (d_k, d_k)
                S[i] = S[i] @ transition + beta[i] * np.outer(v[i], k[i])
                o[i] = S[i] @ q[i]
            gate = (x @ P["w_gate"]).reshape(h, dv)
            z = o / np.sqrt((o**2).mean(-1, keepdims=True) + 1e-5) * P["norm"] * _silu(gate)
            ys[b, t] = z.reshape(-1) @ P["w_out"]
        convs[b], states[b] = window, S
    return ys, convs, states


OPTIONS = [
    pytest.param({}, id="default"),
    pytest.param(
        dict(num_heads=2, key_head_dim=2, value_head_dim=3, conv_width=2, allow_negative_eigenvalues=True),
        id="heads-negative",
    ),
    pytest.param(dict(conv_width=0, num_heads=2), id="no-conv", marks=pytest.mark.slow),
    pytest.param(dict(conv_width=1, num_heads=3, key_head_dim=3), id="width-1", marks=pytest.mark.slow),
]


@functools.partial(jax.jit, static_argnums=(0, 1))
def unroll_and_step(cell, with_step, params, xs, carry, lengths):
    """``rnnjax.unroll`` (the chunked path) and, ``with_step``, ``masked_scan`` of ``step``: one program."""
    chunked = rnnjax.unroll(cell, params, xs, carry, lengths=lengths)
    if not with_step:
        return chunked, None
    final, ys = masked_scan(cell.step, params, carry, jnp.moveaxis(xs, 1, 0), time_mask(lengths, xs.shape[1]))
    return chunked, (final, jnp.moveaxis(ys, 0, 1))


@pytest.mark.usefixtures("enable_x64")
@pytest.mark.parametrize("options", OPTIONS)
def test_step_and_sequence_equal_the_numpy_reference(options):
    # Given float64 parameters, inputs, a nonzero initial carry, and rows of 9, 7, 2 (< conv width) and 0 steps
    cell = GatedDeltaNet(hidden_size=H, chunk_size=3, param_dtype=jnp.float64, **options)
    lengths = [9, 7, 2, 0]
    params, xs, carry = make_case(cell, batch=len(lengths), dtype=jnp.float64, seed=1)
    want_ys, want_conv, want_S = reference(cell, params, xs, carry, lengths)
    # When run by unroll (chunks of 3, the last one partial) and by masked_scan of step (the grid's first two)
    with_step = options.get("conv_width", 4) >= 2
    (final, ys), stepped = unroll_and_step(cell, with_step, params, xs, carry, jnp.array(lengths))
    results = [(ys, final)]
    if with_step:
        step_final, step_ys = stepped
        results.append((step_ys, step_final))
    # Then both equal the reference to float64 rounding: values, final memory and final convolution window
    for got_ys, got in results:
        assert got_ys.dtype == jnp.float64
        np.testing.assert_allclose(got_ys, want_ys, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got.S, want_S, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got.conv, want_conv, rtol=1e-10, atol=1e-12)
    # and a row shorter than the window keeps the initial entries it did not overwrite, an empty row all of them
    width = cell.conv_width
    if width > 2:
        np.testing.assert_array_equal(final.conv[2, : width - 2], carry.conv[2, 2:])
    np.testing.assert_array_equal(final.conv[3], carry.conv[3])
    np.testing.assert_array_equal(final.S[3], carry.S[3])


# Chunked sequence against stepping.


@functools.partial(jax.jit, static_argnums=(0, 1))
def value_and_gradients(cell, stepped, args, mask, weights):
    """``L = Σ ys ⊙ weights + Σ sin(final carry)`` and ``dL/d(params, xs, carry)``, by ``sequence`` or stepping."""

    def loss(args):
        params, xs, carry = args  # xs (T, B, I)
        run = functools.partial(masked_scan, cell.step) if stepped else cell.sequence
        final, ys = run(params, carry, xs, mask)
        value = jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(final))
        return value, (final, ys)

    return jax.value_and_grad(loss, has_aux=True)(args)


@pytest.mark.parametrize(
    "chunk_size", [pytest.param(1, marks=pytest.mark.slow), 4, pytest.param(16, marks=pytest.mark.slow)]
)
def test_chunked_sequence_equals_stepping_values_carry_and_gradients(chunk_size):
    # Given T = 10 (not a multiple of 4; 16 > T), a nonzero initial carry, and lengths (10, 3, 0)
    cell = GatedDeltaNet(hidden_size=H, num_heads=2, chunk_size=chunk_size, allow_negative_eigenvalues=True)
    params, xs, carry = make_case(cell, batch=3, steps=10, seed=2)
    args = (params, jnp.moveaxis(xs, 1, 0), carry)  # xs (T, B, I)
    mask = time_mask(jnp.array([10, 3, 0]), 10)
    weights = normal(3, (10, 3, H))
    # When the loss of outputs and final carry is differentiated through sequence and through stepping (one
    # stepping program for every chunk size: step does not read chunk_size)
    (value, (final, ys)), grads = value_and_gradients(cell, False, args, mask, weights)
    stepping_cell = dataclasses.replace(cell, chunk_size=64)
    (want_value, (want_final, want_ys)), want_grads = value_and_gradients(stepping_cell, True, args, mask, weights)
    # Then values, final carries and every gradient agree to float32 rounding
    np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves((final, grads)), jax.tree.leaves((want_final, want_grads))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    # and padding gives exact zeros and takes no gradient
    np.testing.assert_array_equal(ys[3:, 1], 0.0)
    np.testing.assert_array_equal(grads[1][3:, 1], 0.0)
    np.testing.assert_array_equal(grads[1][:, 2], 0.0)


@pytest.mark.slow
def test_any_mask_holds_the_carry_like_masked_scan():
    # Given a mask with holes (not a prefix): masked steps hold the whole carry, the convolution window included
    cell = GatedDeltaNet(hidden_size=H, chunk_size=4)
    params, xs, carry = make_case(cell, batch=4, steps=11, seed=4)
    xs = jnp.moveaxis(xs, 1, 0)
    mask = jnp.asarray(np.random.default_rng(5).random((11, 4)) < 0.5).at[:, 3].set(False)
    final, ys = jax.jit(cell.sequence)(params, carry, xs, mask)
    want_final, want_ys = jax.jit(functools.partial(masked_scan, cell.step))(params, carry, xs, mask)
    np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ys)[~np.asarray(mask)], 0.0)
    for got, want in zip(final, want_final):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# Negative eigenvalues.


def _transitions(cell, params, x):
    """The state transition ``M_t`` of one step, per row: ``S_t = S_{t−1} M_t + β v kᵀ`` gives
    ``M_t = S_t(S_{t−1} = [I; 0]) − S_t(S_{t−1} = 0)`` (the first ``d_k`` rows of ``S``; ``d_v ≥ d_k``).

    Returns ``(B, h, d_k, d_k)``.
    """
    dk, dv = cell.key_dim, cell.value_dim
    zero = cell.initial_carry(x.shape[:1])
    eye = jnp.broadcast_to(jnp.eye(dv, dk), zero.S.shape)
    with_eye, _ = cell.step(params, zero._replace(S=eye), x)
    without, _ = cell.step(params, zero, x)
    return np.asarray(with_eye.S - without.S)[..., :dk, :]


@pytest.mark.parametrize("negative", [False, True], ids=["beta-in-0-1", "beta-in-0-2"])
def test_negative_eigenvalues_are_reachable_only_when_allowed(negative):
    # Given a cell whose β projection is scaled up, so that σ(x w_b) sweeps (0, 1), and 256 random inputs
    cell = GatedDeltaNet(hidden_size=H, allow_negative_eigenvalues=negative)
    params = cell.init(jax.random.key(0), I)
    params = {**params, "w_b": 3.0 * params["w_b"], "A_log": params["A_log"] - 6.0}  # α close to 1
    x = normal(6, (256, I))
    # Then β covers (0, 1), or (0, 2) with negative eigenvalues, and never reaches the ends
    _, beta = cell._gates(params, x, jnp.float32)
    beta = np.asarray(beta, np.float64)
    top = 2.0 if negative else 1.0
    assert 0.0 < beta.min() < 0.05 and top - 0.05 < beta.max() < top
    # and the transitions α (I − β k kᵀ) are symmetric with eigenvalues in (−1, 1]: α on k's complement and
    # α (1 − β) along k, below 0 for some inputs exactly when negative eigenvalues are allowed
    M = _transitions(cell, params, x)
    np.testing.assert_allclose(M, np.swapaxes(M, -1, -2), atol=1e-6)
    eigenvalues = np.linalg.eigvalsh(M)  # (B, h, d_k), ascending
    assert eigenvalues.max() <= 1.0 + 1e-6 and eigenvalues.min() > -1.0
    if negative:
        assert eigenvalues.min() < -0.5
    else:
        assert eigenvalues.min() > -1e-6
    # and the eigenvalue along k is α (1 − β |k|²), with |k|² ≤ 1 (1 up to the normalisation's ε), the others α
    log_alpha, _ = cell._gates(params, x, jnp.float32)
    alpha = np.exp(np.asarray(log_alpha, np.float64))  # (B, h)
    np.testing.assert_allclose(
        eigenvalues[..., 1:], np.broadcast_to(alpha[..., None], eigenvalues[..., 1:].shape), atol=1e-5
    )
    assert np.all(alpha * (1 - beta) - 1e-5 <= eigenvalues[..., 0]) and np.all(eigenvalues[..., 0] <= alpha + 1e-5)


# Precision, shapes, the protocol.


def test_bfloat16_compute_keeps_a_float32_carry_and_is_close_to_the_reference():
    # Given float32 parameters and a cell computing its projections in bfloat16, rows of 10, 5 and 0 steps
    cell = GatedDeltaNet(hidden_size=8, num_heads=2, chunk_size=4, dtype=jnp.bfloat16)
    params, xs, carry = make_case(cell, batch=3, steps=10, seed=7)
    lengths = [10, 5, 0]
    want_ys, want_conv, want_S = reference(cell, params, xs, carry, lengths)
    # When unrolled (the chunked path) and stepped
    (final, ys), (step_final, step_ys) = unroll_and_step(cell, True, params, xs, carry, jnp.array(lengths))
    # Then outputs are bfloat16, carries float32, both close to the float64 reference; padding exactly zero
    assert ys.dtype == step_ys.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in (*final, *step_final))
    np.testing.assert_array_equal(np.asarray(ys[1, 5:], np.float32), 0.0)
    for got_ys, got in ((ys, final), (step_ys, step_final)):
        np.testing.assert_allclose(np.asarray(got_ys, np.float32), want_ys, rtol=5e-2, atol=5e-2)
        np.testing.assert_allclose(got.S, want_S, rtol=5e-2, atol=5e-2)
        np.testing.assert_allclose(got.conv, want_conv, rtol=5e-2, atol=5e-2)
    # and the chunked path agrees with stepping to float32 rounding in the carry (both solve in float32)
    for got, want in zip(final, step_final):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_shape", [(), (2, 3)], ids=["none", "2x3"])
def test_step_readout_and_shapes(batch_shape):
    cell = rnnjax.make_cell("gdn", hidden_size=H)
    assert type(cell) is GatedDeltaNet and cell == rnnjax.make_cell("gated_deltanet", hidden_size=H)
    params = perturbed(cell.init(jax.random.key(0), I), 8, jnp.float32, 0.3)
    carry = perturbed(cell.initial_carry(batch_shape), 9, jnp.float32, 0.5)
    assert isinstance(carry, GatedDeltaNetState)
    assert carry.conv.shape == (*batch_shape, 4, cell.conv_dim)
    assert carry.S.shape == (*batch_shape, cell.heads, cell.value_dim, cell.key_dim)
    x = normal(10, (*batch_shape, I))
    new, y = jax.jit(cell.step)(params, carry, x)
    assert y.shape == (*batch_shape, H) and y.dtype == jnp.float32
    # the output is a function of the post-step carry and x (what diagnostics perturb)
    np.testing.assert_allclose(cell.readout(params, new, x), y, rtol=1e-6, atol=1e-6)
    assert cell.recurrent_matrices(params) == {}


@pytest.mark.parametrize(
    "hidden_size, sizes", [(1, (1, 1, 1)), (4, (1, 3, 6)), (5, (1, 3, 7)), (2048, (6, 256, 512)), (1024, (3, 256, 512))]
)
def test_default_head_sizes(hidden_size, sizes):
    # fla's 1.3B layout: h d_k = 0.75 H in heads of 256, h d_v = 1.5 H; at least one head of size one
    cell = GatedDeltaNet(hidden_size=hidden_size)
    assert (cell.heads, cell.key_dim, cell.value_dim) == sizes
    shapes = jax.eval_shape(lambda: cell.init(jax.random.key(0), 5))
    h, dk, dv = sizes
    assert shapes["w_qkv"].shape == (5, h * (2 * dk + dv)) and shapes["w_out"].shape == (h * dv, hidden_size)
    assert shapes["conv"].shape == (4, h * (2 * dk + dv)) and shapes["A_log"].shape == (h,)


def test_initialisation_follows_mamba2():
    cell = GatedDeltaNet(hidden_size=64, num_heads=64, key_head_dim=2)
    params = jax.jit(cell.init, static_argnums=1)(jax.random.key(1), 8)
    A = np.exp(np.asarray(params["A_log"]))
    dt = np.logaddexp(0.0, np.asarray(params["dt_bias"], np.float64))  # softplus(dt_bias)
    assert 1.0 <= A.min() and A.max() <= 16.0
    assert 1e-3 * 0.999 <= dt.min() and dt.max() <= 1e-1 * 1.001
    np.testing.assert_array_equal(params["norm"], 1.0)
    assert np.abs(np.asarray(params["conv"])).max() <= 0.5  # U(±1/sqrt(W)), W = 4


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"hidden_size": 0}, ValueError, r"^hidden_size must be a positive int"),
        ({"num_heads": 0}, ValueError, r"^num_heads must be a positive int"),
        ({"key_head_dim": -1}, ValueError, r"^key_head_dim must be a positive int"),
        ({"value_head_dim": 1.5}, TypeError, r"^value_head_dim must be a positive int"),
        ({"conv_width": -1}, ValueError, r"^conv_width must be a non-negative int"),
        ({"conv_width": 2.0}, TypeError, r"^conv_width must be a non-negative int"),
        ({"conv_width": True}, TypeError, r"^conv_width must be a non-negative int"),
        ({"chunk_size": 0}, ValueError, r"^chunk_size must be a positive int"),
        ({"chunk_size": None}, TypeError, r"^chunk_size must be a positive int"),
        ({"allow_negative_eigenvalues": "yes"}, TypeError, r"^allow_negative_eigenvalues must be a bool"),
        ({"param_dtype": jnp.int32}, TypeError, r"^param_dtype must be a floating-point dtype"),
    ],
)
def test_bad_hyperparameters_are_named(options, error, message):
    with pytest.raises(error, match=message):
        GatedDeltaNet(**{"hidden_size": H, **options})
