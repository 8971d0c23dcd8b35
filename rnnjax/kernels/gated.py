"""Fused whole-sequence paths for LSTM and GRU, with hand-written backward passes.

``jax.grad`` of a ``lax.scan`` over ``cell.step`` does, at every time step, a small matmul for the
recurrent weight gradient (``h_{t-1}^T dz_t``, contraction over the batch only) and one for the input weight
gradient. XLA's CPU backend runs such thin matmuls far below its peak. The paths here instead

* keep the input projection inside the forward scan (LSTM: one ``[x_t, h] @ [W_ih; W_hh]`` matmul per step):
  measured on XLA's CPU backend, hoisting it out as one ``(T*B, I) @ (I, G)`` matmul made the forward pass
  1.8-2× slower (B=32, T=128, I=64, H=256; ``python -m rnnjax.bench.breakdown``, part ``scan_hoisted``),
  because the ``(T, B, G)`` projection must be written and read back;
* run a backward scan that propagates only ``(dh, dc)`` and emits each step's gate gradient ``dz_t``;
* compute ``dW_hh = H_prev^T DZ``, ``dW_ih = X^T DZ`` and ``dX = DZ W_ih^T`` after it as single large
  matmuls (contraction over ``T*B``).

The numbers equal stepping (tested against ``masked_scan(cell.step, ...)`` and its autodiff), including
masking: where ``mask`` is false the carry is held and the output is zero.

Shapes inside this module are flattened to one batch axis ``N = prod(*B)``; ``G`` is ``4H`` (LSTM) or ``3H``
(GRU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rnnjax.precision import accumulation_dtype, matmul
from rnnjax.types import Array, DType


def flatten_batch(xs: Array, carry, mask: Array | None):
    """``(T, *B, I)`` -> ``(T, N, I)``; carry leaves ``(*B, F)`` -> ``(N, F)``; mask ``(T, *B)`` -> ``(T, N)``."""
    T, batch_shape = xs.shape[0], xs.shape[1:-1]
    n = 1
    for size in batch_shape:
        n *= size
    xs = xs.reshape(T, n, xs.shape[-1])
    carry = jax.tree.map(lambda leaf: leaf.reshape(n, leaf.shape[-1]), carry)
    mask = None if mask is None else mask.reshape(T, n)
    return xs, carry, mask, batch_shape


def unflatten_batch(ys: Array, carry, batch_shape):
    """Inverse of :func:`flatten_batch` for the outputs ``(T, N, O)`` and the final carry."""
    ys = ys.reshape(ys.shape[0], *batch_shape, ys.shape[-1])
    carry = jax.tree.map(lambda leaf: leaf.reshape(*batch_shape, leaf.shape[-1]), carry)
    return ys, carry


def _dot_tn(a: Array, b: Array, dtype: DType) -> Array:
    """``a^T b`` for ``a`` ``(T, N, K)`` and ``b`` ``(T, N, G)``, contracting over ``T`` and ``N``: ``(K, G)``."""
    acc = accumulation_dtype(dtype)
    return jnp.einsum("tnk,tng->kg", a.astype(dtype), b.astype(dtype), preferred_element_type=acc)


def _dot_nt(a: Array, w: Array, dtype: DType) -> Array:
    """``a w^T`` for ``a`` ``(..., G)`` and ``w`` ``(K, G)``: ``(..., K)``."""
    acc = accumulation_dtype(dtype)
    return jnp.einsum("...g,kg->...k", a.astype(dtype), w.astype(dtype), preferred_element_type=acc)


def _shift_in(first: Array, seq: Array) -> Array:
    """``[first, seq[0], ..., seq[T-2]]``: the previous-step values ``(T, N, F)``."""
    return jnp.concatenate([first[None].astype(seq.dtype), seq[:-1]], axis=0)


def _hold(mask_t, new, old):
    return new if mask_t is None else jnp.where(mask_t[:, None], new, old)


# ----------------------------------------------------------------------------------------------------------- LSTM


def _lstm_gates(z: Array) -> tuple[Array, Array, Array, Array]:
    i, f, g, o = jnp.split(z, 4, axis=-1)
    return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)


def _lstm_scan(w_ih, w_hh, b, xs, h0, c0, mask, dtype, unroll, keep_residuals):
    out_dtype = jnp.dtype(dtype)
    w = jnp.concatenate([w_ih, w_hh], axis=0).astype(dtype)  # (I + P, 4H): one matmul per step

    def body(carry, inputs):
        h, c = carry  # (N, P), (N, H)
        x_t, m = inputs  # (N, I), (N,) or None
        z = matmul(jnp.concatenate([x_t.astype(dtype), h.astype(dtype)], axis=-1), w, dtype)  # (N, 4H)
        if b is not None:
            z = z + b.astype(z.dtype)
        i, f, g, o = _lstm_gates(z)
        c_new = f * c.astype(z.dtype) + i * g
        h_new = o * jnp.tanh(c_new)
        h_out = _hold(m, h_new.astype(h.dtype), h)
        c_out = _hold(m, c_new.astype(c.dtype), c)
        y = h_new.astype(out_dtype) if m is None else jnp.where(m[:, None], h_new, 0.0).astype(out_dtype)
        residuals = (jnp.concatenate([i, f, g, o], axis=-1), h_out, c_out) if keep_residuals else None
        return (h_out, c_out), (y, residuals)

    (h_T, c_T), (ys, residuals) = jax.lax.scan(body, (h0, c0), (xs, mask), unroll=unroll)
    return (h_T, c_T), ys, residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _lstm_fused(w_ih, w_hh, b, xs, h0, c0, mask, dtype, unroll):
    carry, ys, _ = _lstm_scan(w_ih, w_hh, b, xs, h0, c0, mask, dtype, unroll, keep_residuals=False)
    return carry, ys


def _lstm_fused_fwd(w_ih, w_hh, b, xs, h0, c0, mask, dtype, unroll):
    carry, ys, (gates, hs, cs) = _lstm_scan(w_ih, w_hh, b, xs, h0, c0, mask, dtype, unroll, keep_residuals=True)
    return (carry, ys), (w_ih, w_hh, b, xs, h0, c0, mask, gates, hs, cs)


def _lstm_fused_bwd(dtype, unroll, residuals, cotangents):
    w_ih, w_hh, b, xs, h0, c0, mask, gates, hs, cs = residuals
    (d_hT, d_cT), dys = cotangents
    acc = gates.dtype
    c_prev = _shift_in(c0, cs)  # (T, N, H)

    def body(carry, inputs):
        dh, dc = carry  # (N, H) gradients w.r.t. the carry after this step
        dy, gate, c_t, c_p, m = inputs
        i, f, g, o = jnp.split(gate, 4, axis=-1)
        c_new = f * c_p + i * g  # the cell's own c_t (cs holds the masked carry)
        tc = jnp.tanh(c_new)
        dh_new = dh + dy.astype(acc)
        dc_new = dc + dh_new * o * (1.0 - tc * tc)
        dz = jnp.concatenate(
            [
                dc_new * g * i * (1.0 - i),
                dc_new * c_p * f * (1.0 - f),
                dc_new * i * (1.0 - g * g),
                dh_new * tc * o * (1.0 - o),
            ],
            axis=-1,
        )  # (N, 4H)
        if m is not None:
            dz = jnp.where(m[:, None], dz, 0.0)
        dh_prev = _dot_nt(dz, w_hh, dtype)  # (N, P)
        dc_prev = dc_new * f
        if m is not None:
            dh_prev = jnp.where(m[:, None], dh_prev, dh)
            dc_prev = jnp.where(m[:, None], dc_prev, dc)
        return (dh_prev, dc_prev), dz

    (dh0, dc0), dzs = jax.lax.scan(
        body, (d_hT.astype(acc), d_cT.astype(acc)), (dys, gates, cs, c_prev, mask), reverse=True, unroll=unroll
    )
    h_prev = _shift_in(h0, hs)  # (T, N, P)
    d_w_hh = _dot_tn(h_prev, dzs, dtype).astype(w_hh.dtype)  # (P, 4H)
    d_w_ih = _dot_tn(xs, dzs, dtype).astype(w_ih.dtype)  # (I, 4H)
    d_b = None if b is None else jnp.sum(dzs, axis=(0, 1)).astype(b.dtype)
    d_xs = _dot_nt(dzs, w_ih, dtype).astype(xs.dtype)  # (T, N, I)
    return d_w_ih, d_w_hh, d_b, d_xs, dh0.astype(h0.dtype), dc0.astype(c0.dtype), None


_lstm_fused.defvjp(_lstm_fused_fwd, _lstm_fused_bwd)


@jax.named_scope("rnnjax.lstm_sequence")
def lstm_sequence(cell, params, carry, xs: Array, mask: Array | None, *, unroll=1):
    """Fused LSTM over time-major ``xs`` ``(T, *B, I)``; same contract as ``masked_scan(cell.step, ...)``.

    Supports the plain LSTM (with or without bias); the caller falls back to stepping for peepholes or a
    projection.
    """
    xs, flat_carry, flat_mask, batch_shape = flatten_batch(xs, carry, mask)
    (h_T, c_T), ys = _lstm_fused(
        params["w_ih"],
        params["w_hh"],
        params.get("b"),
        xs,
        flat_carry.h,
        flat_carry.c,
        flat_mask,
        cell.compute_dtype(params),
        unroll,
    )
    ys, final = unflatten_batch(ys, type(carry)(h=h_T, c=c_T), batch_shape)
    return final, ys


# ------------------------------------------------------------------------------------------------------------ GRU


def _gru_scan(w_ih, w_hh, b_ih, b_hh, xs, h0, mask, dtype, unroll, keep_residuals):
    out_dtype = jnp.dtype(dtype)

    def body(h, inputs):
        x_t, m = inputs  # (N, I), (N,) or None
        xw_t = matmul(x_t, w_ih, dtype)  # (N, 3H)
        if b_ih is not None:
            xw_t = xw_t + b_ih.astype(xw_t.dtype)
        gh = matmul(h, w_hh, dtype).astype(xw_t.dtype)  # (N, 3H)
        if b_hh is not None:
            gh = gh + b_hh.astype(gh.dtype)
        i_r, i_z, i_n = jnp.split(xw_t, 3, axis=-1)
        h_r, h_z, h_n = jnp.split(gh, 3, axis=-1)
        r = jax.nn.sigmoid(i_r + h_r)
        z = jax.nn.sigmoid(i_z + h_z)
        n = jnp.tanh(i_n + r * h_n)
        h_new = n + z * (h.astype(n.dtype) - n)  # (1 - z) n + z h
        h_out = _hold(m, h_new.astype(h.dtype), h)
        y = h_new.astype(out_dtype) if m is None else jnp.where(m[:, None], h_new, 0.0).astype(out_dtype)
        residuals = (jnp.concatenate([r, z, n, h_n], axis=-1), h_out) if keep_residuals else None
        return h_out, (y, residuals)

    h_T, (ys, residuals) = jax.lax.scan(body, h0, (xs, mask), unroll=unroll)
    return h_T, ys, residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _gru_fused(w_ih, w_hh, b_ih, b_hh, xs, h0, mask, dtype, unroll):
    h_T, ys, _ = _gru_scan(w_ih, w_hh, b_ih, b_hh, xs, h0, mask, dtype, unroll, keep_residuals=False)
    return h_T, ys


def _gru_fused_fwd(w_ih, w_hh, b_ih, b_hh, xs, h0, mask, dtype, unroll):
    h_T, ys, (acts, hs) = _gru_scan(w_ih, w_hh, b_ih, b_hh, xs, h0, mask, dtype, unroll, keep_residuals=True)
    return (h_T, ys), (w_ih, w_hh, b_ih, b_hh, xs, h0, mask, acts, hs)


def _gru_fused_bwd(dtype, unroll, residuals, cotangents):
    w_ih, w_hh, b_ih, b_hh, xs, h0, mask, acts, hs = residuals
    d_hT, dys = cotangents
    acc = acts.dtype
    h_prev = _shift_in(h0, hs)  # (T, N, H)

    def body(dh, inputs):
        dy, act, h_p, m = inputs
        r, z, n, h_n = jnp.split(act, 4, axis=-1)
        dh_new = dh + dy.astype(acc)
        dn = dh_new * (1.0 - z) * (1.0 - n * n)  # through tanh
        dz = dh_new * (h_p - n) * z * (1.0 - z)
        dr = dn * h_n * r * (1.0 - r)
        d_gi = jnp.concatenate([dr, dz, dn], axis=-1)  # (N, 3H) gradient of x W_ih + b_ih
        d_gh = jnp.concatenate([dr, dz, dn * r], axis=-1)  # (N, 3H) gradient of h W_hh + b_hh
        if m is not None:
            d_gi = jnp.where(m[:, None], d_gi, 0.0)
            d_gh = jnp.where(m[:, None], d_gh, 0.0)
        dh_prev = dh_new * z + _dot_nt(d_gh, w_hh, dtype)
        if m is not None:
            dh_prev = jnp.where(m[:, None], dh_prev, dh)
        return dh_prev, (d_gi, d_gh)

    dh0, (d_gis, d_ghs) = jax.lax.scan(
        body, d_hT.astype(acc), (dys, acts, h_prev.astype(acc), mask), reverse=True, unroll=unroll
    )
    d_w_hh = _dot_tn(h_prev, d_ghs, dtype).astype(w_hh.dtype)  # (H, 3H)
    d_w_ih = _dot_tn(xs, d_gis, dtype).astype(w_ih.dtype)  # (I, 3H)
    d_b_ih = None if b_ih is None else jnp.sum(d_gis, axis=(0, 1)).astype(b_ih.dtype)
    d_b_hh = None if b_hh is None else jnp.sum(d_ghs, axis=(0, 1)).astype(b_hh.dtype)
    d_xs = _dot_nt(d_gis, w_ih, dtype).astype(xs.dtype)  # (T, N, I)
    return d_w_ih, d_w_hh, d_b_ih, d_b_hh, d_xs, dh0.astype(h0.dtype), None


_gru_fused.defvjp(_gru_fused_fwd, _gru_fused_bwd)


@jax.named_scope("rnnjax.gru_sequence")
def gru_sequence(cell, params, carry, xs: Array, mask: Array | None, *, unroll=1):
    """Fused reset-after GRU over time-major ``xs`` ``(T, *B, I)``; same contract as ``masked_scan``."""
    xs, flat_carry, flat_mask, batch_shape = flatten_batch(xs, carry, mask)
    h_T, ys = _gru_fused(
        params["w_ih"],
        params["w_hh"],
        params.get("b_ih"),
        params.get("b_hh"),
        xs,
        flat_carry.h,
        flat_mask,
        cell.compute_dtype(params),
        unroll,
    )
    ys, final = unflatten_batch(ys, type(carry)(h=h_T), batch_shape)
    return final, ys
