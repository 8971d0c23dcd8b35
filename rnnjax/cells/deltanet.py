"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule").

Each head keeps a matrix memory ``S`` ``(d_v, d_k)`` that the gated delta rule rewrites at every step:

.. math::
    S_t = \\alpha_t S_{t-1} (I - \\beta_t k_t k_t^\\top) + \\beta_t v_t k_t^\\top, \\qquad o_t = S_t q_t

The memory decays by ``α_t ∈ (0, 1)`` (Mamba-2's gate) and then replaces the value stored under the key ``k_t``
by ``v_t`` with strength ``β_t`` (the delta rule). :meth:`GatedDeltaNet.step` runs this recurrence one token at
a time; :meth:`GatedDeltaNet.sequence` (used by :func:`rnnjax.unroll`) runs the chunkwise-parallel form of Yang
et al. 2024 ("Parallelizing Linear Transformers with the Delta Rule over Sequence Length"): within a chunk of
``L`` steps the rank-one updates are collected into a WY representation by one unit-lower-triangular solve
(the UT transform), and a scan over chunks carries ``S``.

Chunk form. Within a chunk with initial memory ``S_0``, let ``γ_i = Σ_{s ≤ i} log α_s`` and write every memory
of the chunk as ``S_i = e^{γ_i} S_0 + Σ_{j ≤ i} e^{γ_i − γ_j} u_j k_j^T``. Substituting into the recurrence gives
``u_i = β_i (v_i − α_i S_{i−1} k_i)``, i.e. the unit lower-triangular system ``(I + A) U = diag(β) V −
diag(β e^γ) K S_0^T`` with ``A_ij = β_i e^{γ_i − γ_j} k_i·k_j`` for ``j < i``. So with
``W = (I + A)^{-1} diag(β e^γ) K`` and ``U' = (I + A)^{-1} diag(β) V`` (computed for all chunks at once):

.. math::
    U = U' - W S_0^\\top, \\qquad
    O = \\mathrm{diag}(e^{\\gamma}) Q S_0^\\top + (Q K^\\top \\odot D) U, \\qquad
    S_L = e^{\\gamma_L} S_0 + U^\\top \\mathrm{diag}(e^{\\gamma_L - \\gamma}) K

with ``D_ij = e^{γ_i − γ_j}`` for ``j ≤ i`` and ``0`` above the diagonal. The exponents ``γ_i − γ_j`` are summed
segment by segment (Mamba-2's ``segsum``), not subtracted from running sums, so that strong decays lose no
precision.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import _checks
from rnnjax.cells.base import Cell, batch_shape_tuple, keep_dtype, resolve_initializer
from rnnjax.cells.registry import register_cell
from rnnjax.precision import accumulation_dtype, matmul
from rnnjax.types import Array, DType, Params, PRNGKey

L2_EPS = 1e-6
"""``ε`` of the L2 normalisation ``x / sqrt(|x|² + ε)`` of ``q`` and ``k`` (as the paper's code, fla's ``l2norm``)."""

NORM_EPS = 1e-5
"""``ε`` of the output RMSNorm (fla's ``norm_eps`` default)."""

# The state algebra runs in float32 (or float64): ask for full precision, not the TF32 passes of GPUs.
_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


class GatedDeltaNetState(NamedTuple):
    """Carry of :class:`GatedDeltaNet` (``W = conv_width``, ``C = h (2 d_k + d_v)``, ``h`` heads).

    ``conv`` holds the last ``W`` inputs of the short convolutions (the projected ``q, k, v`` before the
    convolution), oldest first and the current step's last, so that :meth:`GatedDeltaNet.readout` can recompute
    the step's query from the carry alone; the next step uses its last ``W − 1`` rows.
    """

    conv: Array  # (*B, W, C) last W convolution inputs, newest last; float32 under bfloat16 compute
    S: Array  # (*B, h, d_v, d_k) one matrix memory per head, float32 under bfloat16 compute


@register_cell("gated_deltanet", "gdn")
@dataclasses.dataclass(frozen=True, kw_only=True)
class GatedDeltaNet(Cell):
    """Gated DeltaNet: a gated delta-rule matrix memory per head, with the paper's short convolutions and gate.

    For each step ``x_t`` ``(I,)`` and each head (``σ`` the logistic function, ``φ`` SiLU, ``*`` a causal
    depthwise convolution of width ``W`` over time):

    .. math::
        [\\tilde q_t, \\tilde k_t, v_t] = \\varphi\\big((x W_{qkv}) * w_{conv}\\big)_t, \\qquad
        q_t = \\frac{\\tilde q_t}{\\sqrt{d_k}\\,\\lVert \\tilde q_t \\rVert}, \\quad
        k_t = \\frac{\\tilde k_t}{\\lVert \\tilde k_t \\rVert} \\\\
        \\alpha_t = \\exp\\big(-e^{A_{\\log}} \\operatorname{softplus}(x_t w_a + b_{dt})\\big), \\qquad
        \\beta_t = c\\,\\sigma(x_t w_b), \\quad c = 2 \\text{ with negative eigenvalues, else } 1 \\\\
        S_t = \\alpha_t S_{t-1} (I - \\beta_t k_t k_t^\\top) + \\beta_t v_t k_t^\\top, \\qquad o_t = S_t q_t \\\\
        y_t = \\big[\\operatorname{RMSNorm}(o_t) \\odot \\varphi(x_t W_g)\\big]_{\\text{heads}} W_{out}

    as the paper's block (its Figure 1) and code (fla's ``GatedDeltaNet`` layer): the ``1/sqrt(d_k)`` query scale
    is fla's default ``scale`` of ``chunk_gated_delta_rule``; the RMSNorm, over each head's ``d_v`` values, has
    one weight vector ``(d_v,)`` shared by the heads. With ``allow_negative_eigenvalues`` (Grazzi et al. 2024,
    "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues") ``β_t ∈ (0, 2)``, so that the
    transition ``α_t (I − β_t k_t k_t^T)`` has the eigenvalue ``α_t (1 − β_t) ∈ (−1, 1)`` along ``k_t`` (and
    ``α_t`` on its complement).

    :meth:`sequence` (used by :func:`rnnjax.unroll`) runs the chunkwise-parallel form described in the module
    docstring; it equals stepping to rounding.

    Sizes (``H = hidden_size``, the model width and output size; ``h`` heads; ``C = h (2 d_k + d_v)``).
    Defaults follow fla, whose 1.3B model has ``h d_k = 0.75 H`` in heads of 256 and ``h d_v = 1.5 H``
    (``H = 2048`` gives 6 heads, ``d_k = 256``, ``d_v = 512``, about ``6 H²`` parameters):

    * ``num_heads``: ``max(1, 3H // 1024)``;
    * ``key_head_dim``: ``max(1, 3H // (4 h))``;
    * ``value_head_dim``: ``max(1, 3H // (2 h))``.

    Parameters (kernels are ``(in, out)``)::

        w_qkv:   (I, C)        q, k, v projections (blocks of h d_k, h d_k, h d_v), LeCun normal
        conv:    (W, C)        depthwise causal kernel, row W−1 multiplies the current input, U(±1/sqrt(W))
                               (PyTorch's Conv1d default, which fla uses); absent when conv_width = 0
        w_a:     (I, h)        gate projection, LeCun normal
        w_b:     (I, h)        β projection, LeCun normal
        A_log:   (h,)          log A, A ~ U[1, 16] (Mamba-2's A_init_range)
        dt_bias: (h,)          softplus⁻¹(dt), dt log-uniform on [1e-3, 1e-1], floored at 1e-4 (Mamba-2)
        w_gate:  (I, h d_v)    output-gate projection, LeCun normal
        norm:    (d_v,)        RMSNorm weight, ones
        w_out:   (h d_v, H)    output projection, LeCun normal

    Attributes:
        hidden_size: ``H``.
        num_heads: ``h``; ``None``: the default above.
        key_head_dim: ``d_k``; ``None``: the default above.
        value_head_dim: ``d_v``; ``None``: the default above (``2 d_k`` up to rounding).
        conv_width: ``W``, the width of the short convolutions (4, as the paper); ``0`` turns them off (then
            ``q, k, v = φ(x W_qkv)``, fla's ``use_short_conv=False``) and ``1`` is a per-channel scale.
        chunk_size: ``L``, steps per chunk of :meth:`sequence` (shorter sequences use one chunk of ``T``).
        allow_negative_eigenvalues: ``β_t = 2σ(·) ∈ (0, 2)`` instead of ``σ(·)``.
        param_dtype: dtype of the parameters ``init`` creates.
        dtype: compute dtype of the projections (``None``: the parameters' dtype). The convolution, the gates,
            the delta-rule algebra (the triangular solve included) and the carry are float32 under bfloat16.

    Example:
        >>> cell = rnnjax.GatedDeltaNet(hidden_size=64, num_heads=2)
        >>> params = cell.init(jax.random.key(0), input_size=64)
        >>> carry, ys = rnnjax.unroll(cell, params, jnp.ones((2, 100, 64)))
        >>> ys.shape, carry.S.shape, carry.conv.shape
        ((2, 100, 64), (2, 2, 48, 24), (2, 4, 192))
    """

    hidden_size: int
    num_heads: int | None = None
    key_head_dim: int | None = None
    value_head_dim: int | None = None
    conv_width: int = 4
    chunk_size: int = 64
    allow_negative_eigenvalues: bool = False
    param_dtype: DType = jnp.float32
    dtype: DType | None = None

    def __post_init__(self):
        self.check_hyperparameters()
        _checks.check_positive_int(self.num_heads, "num_heads", allow_none=True)
        _checks.check_positive_int(self.key_head_dim, "key_head_dim", allow_none=True)
        _checks.check_positive_int(self.value_head_dim, "value_head_dim", allow_none=True)
        width = self.conv_width
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)):
            raise TypeError(f"conv_width must be a non-negative int (0: no convolution), got {width!r}")
        if width < 0:
            raise ValueError(f"conv_width must be a non-negative int (0: no convolution), got {width}")
        _checks.check_positive_int(self.chunk_size, "chunk_size")
        if not isinstance(self.allow_negative_eigenvalues, (bool, np.bool_)):
            raise TypeError(f"allow_negative_eigenvalues must be a bool, got {self.allow_negative_eigenvalues!r}")

    # Sizes.

    @property
    def heads(self) -> int:
        """``h``: ``num_heads``, or ``max(1, 3H // 1024)``."""
        return self.num_heads if self.num_heads is not None else max(1, 3 * self.hidden_size // 1024)

    @property
    def key_dim(self) -> int:
        """``d_k`` per head: ``key_head_dim``, or ``max(1, 3H // (4 h))``."""
        if self.key_head_dim is not None:
            return self.key_head_dim
        return max(1, 3 * self.hidden_size // (4 * self.heads))

    @property
    def value_dim(self) -> int:
        """``d_v`` per head: ``value_head_dim``, or ``max(1, 3H // (2 h))``."""
        if self.value_head_dim is not None:
            return self.value_head_dim
        return max(1, 3 * self.hidden_size // (2 * self.heads))

    @property
    def conv_dim(self) -> int:
        """``C = h (2 d_k + d_v)``: the channels of the short convolutions (``q``, ``k`` and ``v`` together)."""
        return self.heads * (2 * self.key_dim + self.value_dim)

    # The protocol.

    def init(self, key: PRNGKey, input_size: int) -> Params:
        _checks.check_positive_int(input_size, "input_size")
        h, dv, C, W, H, I = self.heads, self.value_dim, self.conv_dim, self.conv_width, self.hidden_size, input_size
        k_qkv, k_a, k_b, k_gate, k_out, k_A, k_dt, k_conv = jax.random.split(key, 8)
        dense = resolve_initializer("lecun_normal", "kernel_init")
        pd = self.param_dtype
        A = jax.random.uniform(k_A, (h,), jnp.float32, minval=1.0, maxval=16.0)
        log_dt_min, log_dt_max = math.log(1e-3), math.log(1e-1)
        dt = jnp.exp(jax.random.uniform(k_dt, (h,), jnp.float32, minval=log_dt_min, maxval=log_dt_max))
        dt = jnp.maximum(dt, 1e-4)
        params = {
            "w_qkv": dense(k_qkv, (I, C), pd),
            "w_a": dense(k_a, (I, h), pd),
            "w_b": dense(k_b, (I, h), pd),
            "A_log": jnp.log(A).astype(pd),
            "dt_bias": (dt + jnp.log(-jnp.expm1(-dt))).astype(pd),  # softplus⁻¹(dt)
            "w_gate": dense(k_gate, (I, h * dv), pd),
            "norm": jnp.ones((dv,), pd),
            "w_out": dense(k_out, (h * dv, H), pd),
        }
        if W > 0:
            bound = 1.0 / math.sqrt(W)
            params["conv"] = jax.random.uniform(k_conv, (W, C), jnp.float32, minval=-bound, maxval=bound).astype(pd)
        return params

    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32) -> GatedDeltaNetState:
        batch = batch_shape_tuple(batch_shape)
        return GatedDeltaNetState(
            conv=jnp.zeros((*batch, self.conv_width, self.conv_dim), dtype),
            S=jnp.zeros((*batch, self.heads, self.value_dim, self.key_dim), dtype),
        )

    def input_size(self, params: Params) -> int:
        return params["w_qkv"].shape[0]

    output_field = None

    def recurrent_matrices(self, params: Params) -> dict[str, Array]:
        """None: the transition ``α_t (I − β_t k_t k_t^T)`` is computed from the input, not a weight matrix."""
        del params
        return {}

    # Shared by step, readout and sequence, so that all three round the same way.

    def _features(self, params: Params, window: Array) -> Array:
        """``φ`` of the short convolution over ``window`` ``(..., W, C)`` -> ``(..., C)`` (``W > 0``)."""
        kernel = params["conv"].astype(window.dtype)  # (W, C)
        return jax.nn.silu(jnp.sum(window * kernel, axis=-2))

    def _heads(self, features: Array) -> tuple[Array, Array, Array]:
        """``(..., C)`` -> normalised, scaled ``q`` ``(..., h, d_k)``, normalised ``k`` and ``v`` ``(..., h, d_v)``."""
        h, dk, dv = self.heads, self.key_dim, self.value_dim
        lead = features.shape[:-1]
        q = features[..., : h * dk].reshape(*lead, h, dk)
        k = features[..., h * dk : 2 * h * dk].reshape(*lead, h, dk)
        v = features[..., 2 * h * dk :].reshape(*lead, h, dv)
        return _l2_normalise(q) * (1.0 / math.sqrt(dk)), _l2_normalise(k), v

    def _gates(self, params: Params, x: Array, acc: DType) -> tuple[Array, Array]:
        """``log α_t`` and ``β_t``, each ``(..., h)`` in ``acc``, from ``x`` ``(..., I)``."""
        dtype = self.compute_dtype(params)
        dt = jax.nn.softplus(matmul(x, params["w_a"], dtype).astype(acc) + params["dt_bias"].astype(acc))  # (..., h)
        log_alpha = -jnp.exp(params["A_log"].astype(acc)) * dt
        beta = jax.nn.sigmoid(matmul(x, params["w_b"], dtype).astype(acc))  # (..., h)
        if self.allow_negative_eigenvalues:
            beta = 2.0 * beta
        return log_alpha, beta

    def _output(self, params: Params, o: Array, x: Array) -> Array:
        """``[RMSNorm(o) ⊙ φ(x W_g)] W_out``: ``o`` ``(..., h, d_v)``, ``x`` ``(..., I)`` -> ``(..., H)``, o's dtype."""
        acc, dtype = o.dtype, self.compute_dtype(params)
        gate = matmul(x, params["w_gate"], dtype).astype(acc).reshape(o.shape)  # (..., h, d_v)
        normed = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + NORM_EPS) * params["norm"].astype(acc)
        z = (normed * jax.nn.silu(gate)).reshape(*o.shape[:-2], -1)  # (..., h d_v)
        return matmul(z, params["w_out"], dtype).astype(acc)

    def _query(self, params: Params, carry: GatedDeltaNetState, x: Array, acc: DType) -> Array:
        """The step's query ``q_t`` ``(*B, h, d_k)`` from the post-step carry (its convolution window) and ``x``."""
        if self.conv_width > 0:
            features = self._features(params, carry.conv.astype(acc))
        else:
            features = jax.nn.silu(matmul(x, params["w_qkv"], self.compute_dtype(params)).astype(acc))
        return self._heads(features)[0]

    def readout(self, params: Params, carry: GatedDeltaNetState, x: Array) -> Array:
        """``y_t`` ``(*B, H)`` from the post-step carry (``S_t`` and the window of ``q_t``) and the step's ``x``."""
        acc = accumulation_dtype(carry.S.dtype)
        q = self._query(params, carry, x, acc)  # (*B, h, d_k)
        o = _einsum("...vk,...k->...v", carry.S.astype(acc), q)  # (*B, h, d_v)
        return self._output(params, o, x).astype(self.compute_dtype(params))

    def step(self, params: Params, carry: GatedDeltaNetState, x: Array) -> tuple[GatedDeltaNetState, Array]:
        """One step: ``x`` ``(*B, I)`` -> ``(carry, y)``, ``y`` ``(*B, H)`` in the compute dtype.

        ``S_t = α_t S_{t−1} + β_t (v_t − α_t S_{t−1} k_t) k_t^T`` (the recurrence of the class docstring,
        expanded), then ``o_t = S_t q_t``.
        """
        x = self.check_step_input(params, x, carry)
        acc = accumulation_dtype(carry.S.dtype)
        proj = matmul(x, params["w_qkv"], self.compute_dtype(params)).astype(acc)  # (*B, C)
        if self.conv_width > 0:
            window = jnp.concatenate([carry.conv[..., 1:, :].astype(acc), proj[..., None, :]], axis=-2)  # (*B, W, C)
            features = self._features(params, window)  # (*B, C)
        else:
            window = carry.conv
            features = jax.nn.silu(proj)
        q, k, v = self._heads(features)  # (*B, h, d_k), (*B, h, d_k), (*B, h, d_v)
        log_alpha, beta = self._gates(params, x, acc)  # (*B, h)
        alpha = jnp.exp(log_alpha)[..., None]  # (*B, h, 1)
        S = carry.S.astype(acc)  # (*B, h, d_v, d_k)
        S_k = _einsum("...vk,...k->...v", S, k)  # (*B, h, d_v)
        delta = beta[..., None] * (v - alpha * S_k)  # (*B, h, d_v)
        S = alpha[..., None] * S + delta[..., :, None] * k[..., None, :]  # (*B, h, d_v, d_k)
        o = _einsum("...vk,...k->...v", S, q)  # (*B, h, d_v)
        y = self._output(params, o, x)  # (*B, H)
        return keep_dtype(GatedDeltaNetState(window, S), carry), y.astype(self.compute_dtype(params))

    def sequence(
        self,
        params: Params,
        carry: GatedDeltaNetState,
        xs: Array,
        mask: Array | None,
        *,
        unroll: int | bool = 1,
        remat: bool | int = False,
        dropout_key: PRNGKey | None = None,
    ) -> tuple[GatedDeltaNetState, Array]:
        """Whole-sequence path: one projection, the convolution over time, the chunked delta rule, one readout.

        Any mask is handled: masked steps hold the carry (also the convolution window) and emit zeros, as under
        :func:`rnnjax.masked_scan`. Each row's valid steps are first moved to the front, in order (a stable
        sort; nothing moves for the prefix masks of :func:`rnnjax.unroll`), so that the convolution sees each
        row's valid inputs back to back and the final window holds its last ``W`` valid inputs (initial entries
        for rows with fewer); masked steps then have ``α = 1``, ``β = 0``, and the outputs go back in place.

        Args:
            params: from :meth:`init`.
            carry: initial :class:`GatedDeltaNetState`, ``conv`` ``(*B, W, C)``, ``S`` ``(*B, h, d_v, d_k)``.
            xs: time-major ``(T, *B, I)``.
            mask: ``(T, *B)`` booleans, ``True`` where a step is valid, or ``None``.
            unroll: iterations per loop of the scan over chunks.
            remat: ignored: the scan over chunks keeps one ``(h, d_v, d_k)`` memory per chunk and the
                chunk-parallel terms are ``(T, L)``-sized.

        Returns:
            ``(carry, ys)`` with ``ys`` ``(T, *B, H)`` in the compute dtype, zero where masked.
        """
        del remat, dropout_key
        xs = _checks.as_float_array(xs, "xs")
        _checks.check_features(xs, self.input_size(params), "xs")
        num_steps, batch_shape = xs.shape[0], xs.shape[1:-1]
        dtype, acc = self.compute_dtype(params), accumulation_dtype(carry.S.dtype)
        H, W, C = self.hidden_size, self.conv_width, self.conv_dim
        n = math.prod(batch_shape)
        if num_steps == 0 or n == 0:  # nothing to run: the carry stays, no outputs
            return carry, jnp.zeros((num_steps, *batch_shape, H), dtype)
        xs = xs.reshape(num_steps, n, xs.shape[-1])  # (T, N, I)
        steps = jnp.arange(num_steps, dtype=jnp.int32)[:, None]  # (T, 1)
        valid = order = counts = None
        if mask is not None:
            mask = mask.reshape(num_steps, n)  # (T, N)
            order = jnp.argsort(jnp.where(mask, steps, steps + num_steps), axis=0)  # (T, N) valid steps first
            xs = jnp.take_along_axis(xs, order[..., None], axis=0)  # (T, N, I)
            counts = jnp.sum(mask, axis=0, dtype=jnp.int32)  # (N,) valid steps per row
            valid = steps < counts  # (T, N), a prefix mask in the new order
        proj = matmul(xs, params["w_qkv"], dtype).astype(acc)  # (T, N, C)
        window0 = jnp.moveaxis(carry.conv.reshape(n, W, C).astype(acc), 1, 0)  # (W, N, C)
        if W > 0:
            padded = jnp.concatenate([window0, proj])  # (W + T, N, C): u_{-W} .. u_{T-1}
            kernel = params["conv"].astype(acc)  # (W, C)
            # step t reads u_{t-W+1} .. u_t, rows t+1 .. t+W of `padded`
            conv = kernel[0] * padded[1 : 1 + num_steps]
            for j in range(1, W):
                conv = conv + kernel[j] * padded[1 + j : 1 + j + num_steps]  # (T, N, C)
            features = jax.nn.silu(conv)
            if counts is None:
                window = padded[num_steps:]  # (W, N, C)
            else:  # rows num_valid .. num_valid + W − 1 of `padded`: the last W valid inputs
                index = counts[None, :] + jnp.arange(W, dtype=jnp.int32)[:, None]  # (W, N)
                window = jnp.take_along_axis(padded, index[..., None], axis=0)  # (W, N, C)
        else:
            features = jax.nn.silu(proj)
            window = window0
        q, k, v = self._heads(features)  # (T, N, h, d_k), (T, N, h, d_k), (T, N, h, d_v)
        log_alpha, beta = self._gates(params, xs, acc)  # (T, N, h)
        if valid is not None:  # masked steps: α = 1, β = 0 hold the memory
            log_alpha = jnp.where(valid[..., None], log_alpha, jnp.zeros_like(log_alpha))
            beta = jnp.where(valid[..., None], beta, jnp.zeros_like(beta))
        S0 = carry.S.reshape(n, *carry.S.shape[len(batch_shape) :]).astype(acc)  # (N, h, d_v, d_k)
        with jax.named_scope("rnnjax.gated_delta_rule_chunked"):
            o, S = chunked_gated_delta_rule(q, k, v, log_alpha, beta, S0, self.chunk_size, unroll=unroll)
        ys = self._output(params, o, xs)  # (T, N, H)
        if valid is not None:
            ys = jnp.where(valid[..., None], ys, jnp.zeros_like(ys))
            ys = jnp.take_along_axis(ys, jnp.argsort(order, axis=0)[..., None], axis=0)  # back in place
        new_carry = GatedDeltaNetState(
            conv=jnp.moveaxis(window, 0, 1).reshape(carry.conv.shape), S=S.reshape(carry.S.shape)
        )
        return keep_dtype(new_carry, carry), ys.reshape(num_steps, *batch_shape, H).astype(dtype)


def _l2_normalise(x: Array) -> Array:
    """``x / sqrt(|x|² + ε)`` over the last axis (``ε = L2_EPS``)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


def chunked_gated_delta_rule(
    q: Array,
    k: Array,
    v: Array,
    log_alpha: Array,
    beta: Array,
    S0: Array,
    chunk_size: int,
    *,
    unroll: int | bool = 1,
) -> tuple[Array, Array]:
    """The gated delta rule over a sequence in chunks (see the module docstring for the equations).

    Equals the loop ``S_t = α_t S_{t−1} (I − β_t k_t k_t^T) + β_t v_t k_t^T``, ``o_t = S_t q_t`` to rounding.
    A step with ``log α = 0`` and ``β = 0`` holds the memory. ``T`` is padded with such steps up to a multiple
    of ``L = min(chunk_size, T)``.

    Args:
        q: queries ``(T, N, h, d_k)``.
        k: keys ``(T, N, h, d_k)``.
        v: values ``(T, N, h, d_v)``.
        log_alpha: ``log α_t`` ``(T, N, h)``, ``≤ 0``.
        beta: ``β_t`` ``(T, N, h)``.
        S0: initial memory ``(N, h, d_v, d_k)``.
        chunk_size: ``L``, the largest chunk.
        unroll: iterations per loop of the scan over chunks.

    Returns:
        ``(o, S)``: outputs ``o_t`` ``(T, N, h, d_v)`` and the final memory ``(N, h, d_v, d_k)``, in the dtype
        of the inputs.
    """
    num_steps, dk = q.shape[0], q.shape[-1]
    L = min(chunk_size, num_steps)
    num_chunks = -(-num_steps // L)
    pad = num_chunks * L - num_steps

    def chunks(a: Array) -> Array:  # (T, N, h, ...) -> (n, N, h, L, ...)
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))  # padding: log α = 0, β = 0 hold the memory
        return jnp.moveaxis(a.reshape(num_chunks, L, *a.shape[1:]), 1, 3)

    q, k, v, g, b = (chunks(a) for a in (q, k, v, log_alpha, beta))  # (n, N, h, L, d) and (n, N, h, L)
    on_or_below = jnp.tril(jnp.ones((L, L), bool))  # (L, L): j <= i
    below = jnp.tril(jnp.ones((L, L), bool), -1)  # (L, L): j < i
    # segsum: seg[i, j] = Σ_{j < s <= i} g_s = γ_i − γ_j for j <= i, each a sum of its own terms
    seg = jnp.cumsum(jnp.where(below, g[..., :, None], jnp.zeros_like(g[..., :, None])), axis=-2)  # (n, N, h, L, L)
    decay = jnp.where(on_or_below, jnp.exp(jnp.where(on_or_below, seg, jnp.zeros_like(seg))), jnp.zeros_like(seg))
    gamma = jnp.cumsum(g, axis=-1)  # (n, N, h, L): γ_i, from the chunk's start
    to_end = seg[..., -1, :]  # (n, N, h, L): γ_L − γ_j
    # UT transform: (I + A) [W | U'] = [diag(β e^γ) K | diag(β) V], A_ij = β_i e^{γ_i − γ_j} k_i·k_j for j < i
    kk = _einsum("...ik,...jk->...ij", k, k)  # (n, N, h, L, L)
    A = jnp.where(below, b[..., :, None] * decay * kk, jnp.zeros_like(kk))  # (n, N, h, L, L)
    rhs = jnp.concatenate([(b * jnp.exp(gamma))[..., None] * k, b[..., None] * v], axis=-1)  # (n, N, h, L, d_k + d_v)
    solved = _unit_lower_solve(A, rhs)  # (n, N, h, L, d_k + d_v)
    w, u_partial = solved[..., :dk], solved[..., dk:]  # (n, N, h, L, d_k), (n, N, h, L, d_v)
    attention = _einsum("...ik,...jk->...ij", q, k) * decay  # (n, N, h, L, L): (Q K^T ⊙ D)
    q_decayed = q * jnp.exp(gamma)[..., None]  # (n, N, h, L, d_k): diag(e^γ) Q
    k_decayed = k * jnp.exp(to_end)[..., None]  # (n, N, h, L, d_k): diag(e^{γ_L − γ}) K
    chunk_decay = jnp.exp(gamma[..., -1])[..., None, None]  # (n, N, h, 1, 1): e^{γ_L}

    def body(S, inputs):  # S: (N, h, d_v, d_k), the memory at the chunk's start
        w, u_partial, attention, q_decayed, k_decayed, chunk_decay = inputs
        u = u_partial - _einsum("...ck,...vk->...cv", w, S)  # (N, h, L, d_v)
        o = _einsum("...ck,...vk->...cv", q_decayed, S) + _einsum("...ij,...jv->...iv", attention, u)  # (N, h, L, d_v)
        S = chunk_decay * S + _einsum("...cv,...ck->...vk", u, k_decayed)  # (N, h, d_v, d_k)
        return S, o

    S, o = jax.lax.scan(body, S0, (w, u_partial, attention, q_decayed, k_decayed, chunk_decay), unroll=unroll)
    o = jnp.moveaxis(o, 3, 1).reshape(num_chunks * L, *o.shape[1:3], o.shape[-1])  # (n L, N, h, d_v)
    return o[:num_steps], S


def _unit_lower_solve(A: Array, rhs: Array) -> Array:
    """Solves ``(I + A) X = rhs`` for strictly lower-triangular ``A`` ``(..., L, L)``, ``rhs`` ``(..., L, d)``.

    Forward substitution, ``X_i = rhs_i − Σ_{j<i} A_ij X_j``, one row per iteration of a ``fori_loop`` (the
    rows of every chunk, head and batch row at once). Written out rather than ``lax.linalg.triangular_solve``:
    on the CPU that op calls LAPACK's ``trsm`` through a custom call, and training programs holding it hung
    XLA:CPU reproducibly (every XLA thread idle, the result never ready: ``experiments/state_tracking.py``,
    jax 0.10.2); this loop is plain XLA on every backend, with the same arithmetic as ``trsm``.
    """

    def row(i, X):  # rows < i of X are solved; A[..., i, j >= i] = 0, so the unsolved rows add nothing
        update = _einsum("...j,...jd->...d", jax.lax.dynamic_index_in_dim(A, i, axis=-2, keepdims=False), X)
        solved = jax.lax.dynamic_index_in_dim(rhs, i, axis=-2, keepdims=False) - update  # (..., d)
        return jax.lax.dynamic_update_index_in_dim(X, solved, i, axis=-2)

    return jax.lax.fori_loop(0, A.shape[-1], row, rhs)
