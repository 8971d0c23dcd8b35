"""The gate algebra of minGRU / minLSTM and their fused sequential kernel.

``sequential_sequence`` solves ``h_t = (1 − z_t) ⊙ h_{t-1} + z_t ⊙ v_t`` in blocks of :data:`BLOCK_STEPS` steps:
each block projects its inputs with one matmul, computes the gates for the whole block at once and runs the
recurrence; the backward pass recomputes the block's projection and returns the weight gradient blockwise.
Nothing of size ``(T, N, kH)`` besides the outputs is ever stored, which is what makes it fast on CPU
(see ``docs/benchmarks.md``). Shapes are flattened to one batch axis ``N``; ``k`` is 2 (minGRU) or 3 (minLSTM).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.precision import matmul
from rnnjax.types import Array

# Steps per block of the fused sequential kernel. Measured on CPU (python -m rnnjax.bench.parallel_scan): 32 to 128
# are within noise of each other; much smaller blocks pay per-iteration overhead, much larger ones leave cache.
BLOCK_STEPS = 64


def g(x: Array) -> Array:
    """The paper's candidate activation: ``x + ½`` for ``x ≥ 0``, ``σ(x)`` otherwise (positive, continuous)."""
    return jnp.where(x >= 0, x + 0.5, jax.nn.sigmoid(x))


def log_g(x: Array) -> Array:
    """``log g(x)``, computed without forming ``g(x)`` for negative ``x`` (``−softplus(−x)``)."""
    return jnp.where(x >= 0, jnp.log(jax.nn.relu(x) + 0.5), -jax.nn.softplus(-x))


def _g_grad(x: Array) -> Array:
    s = jax.nn.sigmoid(x)
    return jnp.where(x >= 0, jnp.ones_like(x), s * (1.0 - s))


# The gate algebra shared by step, the scans and the fused kernel. proj: (..., kH) pre-activations.


def gate_logit(kind: str, proj: Array, H: int) -> Array:
    """``u`` with ``z = σ(u)``: ``k_z`` for minGRU, ``softplus(−k_f) − softplus(−k_i)`` for minLSTM."""
    if kind == "gru":
        return proj[..., :H]
    return jax.nn.softplus(-proj[..., :H]) - jax.nn.softplus(-proj[..., H : 2 * H])


def gate_and_candidate(kind: str, activation: str, proj: Array, H: int) -> tuple[Array, Array]:
    """``(z, v)``: the update gate ``σ(u)`` and the activated candidate, each ``(..., H)``."""
    z = jax.nn.sigmoid(gate_logit(kind, proj, H))
    cand = proj[..., -H:]
    return z, (g(cand) if activation == "g" else cand)


def log_coefficients(kind: str, proj: Array, H: int) -> tuple[Array, Array]:
    """``(log a, log b)`` of the log-space form: ``log(1 − z)``, ``log z + log g(h̃)``."""
    u = gate_logit(kind, proj, H)
    return -jax.nn.softplus(u), -jax.nn.softplus(-u) + log_g(proj[..., -H:])


# The fused sequential kernel.


class FusedConfig(NamedTuple):
    kind: str  # "gru" (blocks z, h̃) or "lstm" (blocks f, i, h̃)
    activation: str  # "g" or "identity"
    compute_dtype: jnp.dtype  # dtype of the projection matmuls
    block: int  # steps per block


def _block_forward(cfg: FusedConfig, w, b, x_blk, m_blk, h, ys, start):
    """Projects one block of steps and runs its recurrence, writing the outputs into ``ys`` in place.

    Args:
        x_blk: ``(U, N, I)``; m_blk: ``(U, N)`` or ``None``; h: ``(N, H)`` state before the block;
        ys: ``(T, N, H)`` outputs so far; start: index of the block's first step.

    Returns:
        ``(h, ys)``: the state after the block, and ``ys`` with the block's outputs (zero where masked).
    """
    U = x_blk.shape[0]
    H = h.shape[-1]
    proj = _blockwise_projection(cfg, w, b, x_blk, h.dtype)  # (U, N, kH)
    z, v = gate_and_candidate(cfg.kind, cfg.activation, proj, H)  # (U, N, H) each
    if m_blk is not None:
        z = jnp.where(m_blk[..., None], z, jnp.zeros_like(z))  # z = 0 holds the state

    def inner(j, carry):
        h, ys = carry
        z_j = jax.lax.dynamic_index_in_dim(z, j, keepdims=False)
        v_j = jax.lax.dynamic_index_in_dim(v, j, keepdims=False)
        h = h + z_j * (v_j - h)  # (N, H), the same arithmetic as step
        y = h
        if m_blk is not None:
            valid = jax.lax.dynamic_index_in_dim(m_blk, j, keepdims=False)
            y = jnp.where(valid[:, None], h, jnp.zeros_like(h))
        return h, jax.lax.dynamic_update_index_in_dim(ys, y, start + j, 0)

    return jax.lax.fori_loop(0, U, inner, (h, ys))


def _blockwise_projection(cfg: FusedConfig, w, b, x_blk, acc_dtype):
    U, N, I = x_blk.shape
    proj = matmul(x_blk.reshape(U * N, I), w, cfg.compute_dtype).astype(acc_dtype)
    if b is not None:
        proj = proj + b.astype(acc_dtype)
    return proj.reshape(U, N, -1)


def _block_backward(cfg: FusedConfig, w, b, x_blk, m_blk, ys_blk, g_blk, c, acc_dtype):
    """The backward pass of :func:`_block_forward`.

    Args:
        ys_blk: the block's outputs (equal to the state where valid); g_blk: their cotangents ``(U, N, H)``;
        c: ``(N, H)`` cotangent flowing into the state after the block.

    Returns:
        ``(c, dproj)``: the cotangent of the state before the block and of the projection, as ``k`` blocks
        ``(U·N, H)`` (gate blocks, candidate last).
    """
    U, N, _ = x_blk.shape
    H = c.shape[-1]
    proj = _blockwise_projection(cfg, w, b, x_blk, acc_dtype)
    u = gate_logit(cfg.kind, proj, H)
    z = jax.nn.sigmoid(u)
    cand = proj[..., -H:]
    v = g(cand) if cfg.activation == "g" else cand
    if m_blk is not None:
        z = jnp.where(m_blk[..., None], z, jnp.zeros_like(z))
        g_blk = jnp.where(m_blk[..., None], g_blk, jnp.zeros_like(g_blk))

    def inner(jj, carry):  # dh_t = g_t + (1 − z_{t+1}) dh_{t+1}, backwards through the block
        c, dh_blk = carry
        j = U - 1 - jj
        dh = jax.lax.dynamic_index_in_dim(g_blk, j, keepdims=False) + c
        z_j = jax.lax.dynamic_index_in_dim(z, j, keepdims=False)
        return dh - z_j * dh, jax.lax.dynamic_update_index_in_dim(dh_blk, dh, j, 0)

    c, dh = jax.lax.fori_loop(0, U, inner, (c, jnp.zeros((U, N, H), acc_dtype)))
    dv = dh * z  # ∂L/∂v
    du = dv * (v - ys_blk)  # ∂L/∂u = dh (v − h_{t-1}) z (1 − z) = dh z (v − h_t)
    d_cand = dv * _g_grad(cand) if cfg.activation == "g" else dv
    if cfg.kind == "gru":
        parts = [du, d_cand]
    else:  # u = softplus(−k_f) − softplus(−k_i)
        parts = [-du * jax.nn.sigmoid(-proj[..., :H]), du * jax.nn.sigmoid(-proj[..., H : 2 * H]), d_cand]
    return c, [part.reshape(U * N, H) for part in parts]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_sequential(cfg: FusedConfig, w, b, xs, h0, mask):
    """Fused forward: ``xs`` ``(T, N, I)``, ``h0`` ``(N, H)``, ``mask`` ``(T, N)`` -> ``(h_last, ys (T, N, H))``."""
    return _fused_forward(cfg, w, b, xs, h0, mask)


def _fused_forward(cfg, w, b, xs, h0, mask):
    T, N, I = xs.shape
    H = h0.shape[-1]
    U = cfg.block
    n, rest = divmod(T, U)
    acc = h0.dtype

    def block(i, carry):
        h, ys = carry
        x_blk = jax.lax.dynamic_slice(xs, (i * U, 0, 0), (U, N, I))
        m_blk = None if mask is None else jax.lax.dynamic_slice(mask, (i * U, 0), (U, N))
        return _block_forward(cfg, w, b, x_blk, m_blk, h, ys, i * U)

    h, ys = jax.lax.fori_loop(0, n, block, (h0, jnp.zeros((T, N, H), acc)))
    if rest:
        m_tail = None if mask is None else mask[n * U :]
        h, ys = _block_forward(cfg, w, b, xs[n * U :], m_tail, h, ys, n * U)
    return h, ys


def _fused_fwd(cfg, w, b, xs, h0, mask):
    h_last, ys = _fused_forward(cfg, w, b, xs, h0, mask)
    return (h_last, ys), (w, b, xs, h0, mask, ys)


def _fused_bwd(cfg, residuals, cotangents):
    w, b, xs, h0, mask, ys = residuals
    g_last, g_ys = cotangents
    T, N, I = xs.shape
    U = cfg.block
    n, rest = divmod(T, U)
    acc = h0.dtype
    cd = cfg.compute_dtype

    H = ys.shape[-1]

    def accumulate(dw, db, dx, x_blk, dproj, start):
        # One (I, H) weight gradient and one (H,) bias gradient per gate block; dx sums the blocks' terms.
        x_t = x_blk.reshape(-1, I).T.astype(cd)  # (I, U·N)
        dw = dw + jnp.concatenate([jnp.matmul(x_t, d.astype(cd), preferred_element_type=acc) for d in dproj], -1)
        db = db + jnp.concatenate([jnp.sum(d, axis=0) for d in dproj])
        dx_blk = sum(matmul(d, w[:, k * H : (k + 1) * H].T, cd) for k, d in enumerate(dproj))
        return dw, db, jax.lax.dynamic_update_slice(dx, dx_blk.astype(dx.dtype).reshape(-1, N, I), (start, 0, 0))

    kH = w.shape[-1]
    dw, db = jnp.zeros((I, kH), acc), jnp.zeros((kH,), acc)
    dx = jnp.zeros(xs.shape, xs.dtype)
    c = g_last.astype(acc)
    if rest:
        start = n * U
        m_tail = None if mask is None else mask[start:]
        c, dproj = _block_backward(cfg._replace(block=rest), w, b, xs[start:], m_tail, ys[start:], g_ys[start:], c, acc)
        dw, db, dx = accumulate(dw, db, dx, xs[start:], dproj, start)

    def block(ii, carry):
        c, dw, db, dx = carry
        start = (n - 1 - ii) * U
        x_blk = jax.lax.dynamic_slice(xs, (start, 0, 0), (U, N, I))
        m_blk = None if mask is None else jax.lax.dynamic_slice(mask, (start, 0), (U, N))
        ys_blk = jax.lax.dynamic_slice(ys, (start, 0, 0), (U, N, ys.shape[-1]))
        g_blk = jax.lax.dynamic_slice(g_ys, (start, 0, 0), (U, N, ys.shape[-1]))
        c, dproj = _block_backward(cfg, w, b, x_blk, m_blk, ys_blk, g_blk, c, acc)
        dw, db, dx = accumulate(dw, db, dx, x_blk, dproj, start)
        return c, dw, db, dx

    c, dw, db, dx = jax.lax.fori_loop(0, n, block, (c, dw, db, dx))
    db = None if b is None else db.astype(b.dtype)
    return dw.astype(w.dtype), db, dx, c.astype(h0.dtype), None


fused_sequential.defvjp(_fused_fwd, _fused_bwd)
