"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs", arXiv 2405.21060): the Mamba-2 block as one cell.

One step of the block (shape letters: ``B`` batch, ``T`` time, ``I`` input, ``D`` model width = output size,
``E = expand·D`` inner width, ``H`` heads, ``P = E / H`` head size, ``G`` groups of B/C, ``N`` state size,
``K`` conv width, ``Q`` chunk size, ``C = E + 2GN`` conv channels)::

    z, u, dt_raw = split(x W_in)                     # (E,), (C,), (H,)
    x_t, B_t, C_t = split(SiLU(conv_K(u)_t + b))     # causal depthwise conv over the last K u's
    dt = softplus(dt_raw + dt_bias),  A = −exp(A_log)
    h_t = exp(dt·A) h_{t−1} + dt · x_t B_tᵀ           # per head: (P, N)
    y_t = h_t C_t + D ⊙ x_t                           # per head: (P,)
    out = RMSNorm_G(y ⊙ SiLU(z)) · w  W_out           # grouped RMSNorm, norm_before_gate=False

:meth:`Mamba2.sequence` (used by :func:`rnnjax.unroll`) does not step: it projects the whole sequence with one
matmul, runs the convolution over the whole sequence (the carry's buffer prepended) and solves the state space
model with the chunked SSD algorithm of the paper (Section 6, and ``ssd_minimal.py`` of ``state-spaces/mamba``):
within a chunk of ``Q`` steps the quadratic ("attention") form with the decay matrix
``L[l, s] = exp(a_{s+1} + … + a_l)`` (``a = dt·A``), between chunks a scan that passes the ``(H, P, N)`` state
on. Masked steps (any mask, not only prefixes) hold the carry and emit zeros, as :func:`rnnjax.masked_scan`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import _checks
from rnnjax.cells.base import Cell, batch_shape_tuple, keep_dtype
from rnnjax.cells.registry import register_cell
from rnnjax.precision import matmul
from rnnjax.types import Array, DType, Params, PRNGKey

# Initialisation of the official code (state-spaces/mamba, mamba_ssm/modules/mamba2.py, Mamba2.__init__).
DT_MIN, DT_MAX, DT_INIT_FLOOR = 1e-3, 0.1, 1e-4  # dt ~ exp(U[log dt_min, log dt_max]), clamped below
A_INIT_RANGE = (1.0, 16.0)  # A_log = log U[1, 16]
MAX_HEAD_DIM = 64  # the paper's head size P; head_dim=None takes the largest divisor of E not above it


class Mamba2State(NamedTuple):
    """Carry of :class:`Mamba2`.

    ``conv`` holds the last ``K`` inputs of the convolution, the newest last: the ``K − 1`` older rows are what
    the next step's convolution needs, and the newest one (the current step's own input) lets :meth:`Mamba2.readout`
    recompute the step's output from the carry, as ``conv_state`` of ``mamba_ssm``'s inference cache does.
    """

    conv: Array  # (*B, K, C) last K conv inputs u = [x | B | C] pre-activation, newest last, float32
    ssm: Array  # (*B, H, P, N) SSM state per head, float32


@register_cell("mamba2")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Mamba2(Cell):
    """Mamba-2 block: in-projection, causal conv, selective state space model (SSD), gated RMSNorm, out-projection.

    .. math::
        [z, u, \\delta] = x_t W_{in}, \\qquad [\\bar x_t, B_t, C_t] = \\mathrm{SiLU}\\big(\\textstyle\\sum_{k}
            w_k \\odot u_{t-K+1+k} + b\\big) \\\\
        \\Delta_t = \\mathrm{softplus}(\\delta + \\delta_b), \\qquad A = -e^{A_{\\log}} \\\\
        h_t = e^{\\Delta_t A} h_{t-1} + \\Delta_t \\, \\bar x_t B_t^\\top, \\qquad
            y_t = h_t C_t + D \\odot \\bar x_t \\\\
        o_t = \\mathrm{RMSNorm}(y_t \\odot \\mathrm{SiLU}(z)) \\odot g \\; W_{out}

    per head ``h`` (``Δ``, ``A``, ``D`` scalars per head; ``B``, ``C`` shared by the ``H / G`` heads of a group).
    The RMSNorm is taken over each group's ``E / G`` channels, as ``RMSNormGated(group_size=E // G,
    norm_before_gate=False)`` in the official code. There is no ``dt`` clamp (the official default
    ``dt_limit=(0, inf)``).

    Sizes: ``D = hidden_size`` (the output size), ``E = expand·D``, ``P = head_dim`` (``None``: the largest
    divisor of ``E`` not above 64, so 64 whenever 64 divides ``E``, and ``E`` itself when ``E ≤ 64``),
    ``H = E / P``, ``G = num_groups`` (must divide ``H``), ``N = state_size``, ``K = conv_width``, ``C = E + 2GN``.

    Parameters (kernels are ``(in, out)``)::

        in_proj:     (I, 2E + 2GN + H)  blocks z (E), x (E), B (GN), C (GN), dt (H); U(±1/√I)
        conv_weight: (K, C)             depthwise kernel, row k multiplies u_{t−K+1+k}; U(±1/√K)
        conv_bias:   (C,)               U(±1/√K)
        dt_bias:     (H,)               softplus⁻¹(dt), dt log-uniform on [1e-3, 0.1] (floored at 1e-4)
        A_log:       (H,)               log U[1, 16]
        D:           (H,)               ones
        norm_weight: (E,)               ones
        out_proj:    (E, D)             U(±1/√E)

    as ``mamba_ssm/modules/mamba2.py`` (``Mamba2.__init__``, PyTorch's default ``Linear``/``Conv1d`` init; the
    ``1/√n_layer`` rescaling of ``out_proj`` belongs to a stack of blocks and is not applied).

    Attributes:
        hidden_size: ``D``, the model width and output size.
        expand: ``E / D`` (default 2).
        head_dim: ``P``; ``None`` (default): the rule above. Must divide ``E``.
        state_size: ``N`` (default 64: the official code's default is 128; 64 halves the carry and the
            ``N``-sized work of each chunk on CPU).
        num_groups: ``G``, groups of heads sharing ``B`` and ``C`` (default 1).
        conv_width: ``K`` (default 4).
        chunk_size: ``Q``, steps per SSD chunk in :meth:`sequence` (default 64; the official kernels use 256,
            CPU matmuls of ``Q × Q`` per head are cheaper at 64). Changes rounding only, not the function.
        norm_eps: epsilon of the gated RMSNorm (``1e-5`` as the official code).
        param_dtype: dtype of the parameters ``init`` creates.
        dtype: compute dtype of ``in_proj`` and ``out_proj`` (``None``: the parameters' dtype); the convolution,
            the SSM and the norm run in float32 (float64 with float64 parameters or carry), the carry stays float32.

    Example:
        >>> cell = rnnjax.Mamba2(hidden_size=16, state_size=8)
        >>> params = cell.init(jax.random.key(0), input_size=16)
        >>> carry, ys = rnnjax.unroll(cell, params, jnp.ones((2, 100, 16)))
        >>> ys.shape, carry.ssm.shape, carry.conv.shape
        ((2, 100, 16), (2, 1, 32, 8), (2, 4, 48))
    """

    hidden_size: int
    expand: int = 2
    head_dim: int | None = None
    state_size: int = 64
    num_groups: int = 1
    conv_width: int = 4
    chunk_size: int = 64
    norm_eps: float = 1e-5
    param_dtype: DType = jnp.float32
    dtype: DType | None = None

    output_field = None

    def __post_init__(self):
        self.check_hyperparameters()
        for name in ("expand", "state_size", "num_groups", "conv_width", "chunk_size"):
            _checks.check_positive_int(getattr(self, name), name)
        _checks.check_positive_int(self.head_dim, "head_dim", allow_none=True)
        if self.head_dim is not None and self.inner_size % self.head_dim:
            raise ValueError(
                f"head_dim must divide the inner width expand * hidden_size = {self.inner_size}, got {self.head_dim}"
            )
        if self.num_heads % self.num_groups:
            raise ValueError(f"num_groups must divide the number of heads {self.num_heads}, got {self.num_groups}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be a positive float, got {self.norm_eps!r}")

    # Sizes.

    @property
    def inner_size(self) -> int:
        """``E = expand · hidden_size``."""
        return self.expand * self.hidden_size

    @property
    def head_size(self) -> int:
        """``P``: ``head_dim``, or the largest divisor of ``E`` not above 64."""
        if self.head_dim is not None:
            return self.head_dim
        return max(p for p in range(1, min(MAX_HEAD_DIM, self.inner_size) + 1) if self.inner_size % p == 0)

    @property
    def num_heads(self) -> int:
        """``H = E / P``."""
        return self.inner_size // self.head_size

    @property
    def conv_size(self) -> int:
        """``C = E + 2GN``, the channels of the convolution (``x``, ``B`` and ``C``)."""
        return self.inner_size + 2 * self.num_groups * self.state_size

    # Protocol.

    def init(self, key: PRNGKey, input_size: int) -> Params:
        _checks.check_positive_int(input_size, "input_size")
        I, E, H, C, K = input_size, self.inner_size, self.num_heads, self.conv_size, self.conv_width
        k_in, k_w, k_b, k_dt, k_a, k_out = jax.random.split(key, 6)
        f32 = jnp.float32

        def uniform(k, shape, bound):
            return jax.random.uniform(k, shape, f32, -bound, bound)

        # dt log-uniform on [dt_min, dt_max], floored; dt_bias = softplus⁻¹(dt) = dt + log(1 − exp(−dt))
        log_dt = jax.random.uniform(k_dt, (H,), f32, math.log(DT_MIN), math.log(DT_MAX))
        dt = jnp.maximum(jnp.exp(log_dt), DT_INIT_FLOOR)
        params = {
            "in_proj": uniform(k_in, (I, 2 * E + 2 * self.num_groups * self.state_size + H), 1 / math.sqrt(I)),
            "conv_weight": uniform(k_w, (K, C), 1 / math.sqrt(K)),
            "conv_bias": uniform(k_b, (C,), 1 / math.sqrt(K)),
            "dt_bias": dt + jnp.log(-jnp.expm1(-dt)),
            "A_log": jnp.log(jax.random.uniform(k_a, (H,), f32, *A_INIT_RANGE)),
            "D": jnp.ones((H,), f32),
            "norm_weight": jnp.ones((E,), f32),
            "out_proj": uniform(k_out, (E, self.hidden_size), 1 / math.sqrt(E)),
        }
        return {name: value.astype(self.param_dtype) for name, value in params.items()}

    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32) -> Mamba2State:
        batch = batch_shape_tuple(batch_shape)
        return Mamba2State(
            conv=jnp.zeros((*batch, self.conv_width, self.conv_size), dtype),
            ssm=jnp.zeros((*batch, self.num_heads, self.head_size, self.state_size), dtype),
        )

    def input_size(self, params: Params) -> int:
        return params["in_proj"].shape[0]

    def recurrent_matrices(self, params: Params) -> dict[str, Array]:
        """None: the transition ``exp(dt·A)`` is a scalar per head that depends on the input, not a weight matrix."""
        del params
        return {}

    def step(self, params: Params, carry: Mamba2State, x: Array) -> tuple[Mamba2State, Array]:
        """One token: ``x`` ``(*B, I)`` -> ``(carry, y)`` with ``y`` ``(*B, D)`` in the compute dtype.

        Math per head: ``h = exp(dt·A) h + dt · x Bᵀ``, ``y = h C + D x`` (see the class docstring).
        """
        x = self.check_step_input(params, x, carry)
        real = self._real_dtype(params, carry)
        z, u, dt_raw = self._project(params, x, real)  # (*B, E), (*B, C), (*B, H)
        conv = jnp.concatenate([carry.conv[..., 1:, :].astype(real), u[..., None, :]], axis=-2)  # (*B, K, C)
        xh, b, c = self._conv_out(params, conv, real)  # (*B, H, P), (*B, H, N), (*B, H, N)
        dt = jax.nn.softplus(dt_raw + params["dt_bias"].astype(real))  # (*B, H)
        decay = jnp.exp(dt * self._A(params, real))  # (*B, H)
        ssm = decay[..., None, None] * carry.ssm.astype(real) + (dt[..., None] * xh)[..., :, None] * b[..., None, :]
        y = jnp.einsum("...hpn,...hn->...hp", ssm, c) + params["D"].astype(real)[:, None] * xh  # (*B, H, P)
        out = self._output(params, y, z)  # (*B, D)
        return keep_dtype(Mamba2State(conv, ssm), carry), out.astype(self.compute_dtype(params))

    def readout(self, params: Params, carry: Mamba2State, x: Array) -> Array:
        """The output of the step that produced ``carry`` from ``x``: ``(*B, D)`` in the compute dtype.

        ``z`` comes from ``x``; ``x̄`` and ``C`` from the convolution of the carry's ``K`` buffered inputs (whose
        newest row is this step's); ``y = h C + D x̄`` from the carry's state.
        """
        real = self._real_dtype(params, carry)
        z, _, _ = self._project(params, x, real)  # (*B, E)
        xh, _, c = self._conv_out(params, carry.conv.astype(real), real)  # (*B, H, P), _, (*B, H, N)
        y = jnp.einsum("...hpn,...hn->...hp", carry.ssm.astype(real), c) + params["D"].astype(real)[:, None] * xh
        return self._output(params, y, z).astype(self.compute_dtype(params))

    def sequence(
        self,
        params: Params,
        carry: Mamba2State,
        xs: Array,
        mask: Array | None,
        *,
        unroll: int | bool = 1,
        remat: bool | int = False,
        dropout_key: PRNGKey | None = None,
    ) -> tuple[Mamba2State, Array]:
        """Whole-sequence path: one in-projection, the convolution over the sequence, chunked SSD, one out-projection.

        Equals stepping with :func:`rnnjax.masked_scan` (to rounding) for any ``T``, carry and mask: a masked step
        holds the carry (``dt = 0`` there: decay 1, no input; the convolution sees only valid inputs, the valid
        steps being gathered to the front of each row first) and outputs zeros.

        Args:
            params: from :meth:`init`.
            carry: initial :class:`Mamba2State`, ``conv`` ``(*B, K, C)``, ``ssm`` ``(*B, H, P, N)``.
            xs: time-major ``(T, *B, I)``.
            mask: ``(T, *B)`` booleans or ``None`` (all valid).
            unroll: passed to the scan over chunks.
            remat: ignored: the chunked algorithm stores ``(T, *B, ...)``-sized values and ``(T/Q)`` states.

        Returns:
            ``(carry, ys)``: the carry after each row's last valid step (``conv`` holding its last ``K`` valid
            inputs, initial buffer rows first when a row has fewer), ``ys`` ``(T, *B, D)`` in the compute dtype,
            zero where masked.
        """
        del remat, dropout_key
        xs = _checks.as_float_array(xs, "xs")
        _checks.check_rank(xs, "xs", 2, "(time, *batch, input_size)")
        _checks.check_features(xs, self.input_size(params), "xs")
        num_steps, batch_shape = xs.shape[0], xs.shape[1:-1]
        dtype = self.compute_dtype(params)
        if num_steps == 0 or math.prod(batch_shape) == 0:  # nothing to run: the carry stays, no outputs
            return carry, jnp.zeros((num_steps, *batch_shape, self.hidden_size), dtype)
        real = self._real_dtype(params, carry)
        K, H, P, N, G = self.conv_width, self.num_heads, self.head_size, self.state_size, self.num_groups
        z, u, dt_raw = self._project(params, xs, real)  # (T, *B, E), (T, *B, C), (T, *B, H)
        buffer = jnp.moveaxis(carry.conv.astype(real), -2, 0)  # (K, *B, C)
        if mask is None:
            window = jnp.concatenate([buffer, u], axis=0)  # (K + T, *B, C)
            conv_in = _sliding_windows(window[1:], K)  # (T, *B, K, C): rows t+1 .. t+K of window
            new_conv = window[num_steps:]  # (K, *B, C)
        else:
            mask = jnp.asarray(mask, bool)  # (T, *B)
            # Valid steps first (a stable sort keeps their order): the conv of the compacted rows is a prefix
            # problem; each valid step then reads its conv back from its rank among the valid steps.
            order = jnp.argsort(jnp.logical_not(mask).astype(jnp.int32), axis=0, stable=True)  # (T, *B)
            window = jnp.concatenate([buffer, jnp.take_along_axis(u, order[..., None], axis=0)], axis=0)  # (K+T,*B,C)
            count = jnp.sum(mask, axis=0, dtype=jnp.int32)  # (*B,)
            rank = jnp.maximum(jnp.cumsum(mask, axis=0, dtype=jnp.int32) - 1, 0)  # (T, *B)
            conv_in = jnp.take_along_axis(_sliding_windows(window[1:], K), rank[..., None, None], axis=0)  # (T,*B,K,C)
            last = count + jnp.arange(K, dtype=jnp.int32).reshape((K,) + (1,) * len(batch_shape))  # (K, *B)
            new_conv = jnp.take_along_axis(window, last[..., None], axis=0)  # (K, *B, C)
        xh, b, c = self._conv_out(params, conv_in, real)  # (T, *B, H, P), (T, *B, H, N) x 2 (B, C per head)
        dt = jax.nn.softplus(dt_raw + params["dt_bias"].astype(real))  # (T, *B, H)
        if mask is not None:
            dt = jnp.where(mask[..., None], dt, jnp.zeros_like(dt))  # masked steps: decay 1, no input

        n = math.prod(batch_shape)
        r = H // G  # heads per group

        def rows(a, tail):  # (T, *B, ...) -> (n, T, ...)
            return jnp.moveaxis(a.reshape(num_steps, n, *tail), 0, 1)

        y, h_last = _ssd(
            rows(xh, (G, r, P)),
            rows(dt, (G, r)),
            self._A(params, real).reshape(G, r),
            rows(b.reshape(*b.shape[:-2], G, r, N)[..., 0, :], (G, N)),  # B, C per group (heads of a group share)
            rows(c.reshape(*c.shape[:-2], G, r, N)[..., 0, :], (G, N)),
            carry.ssm.astype(real).reshape(n, G, r, P, N),
            self.chunk_size,
            unroll,
        )  # (n, T, G, r, P), (n, G, r, P, N)
        y = jnp.moveaxis(y, 0, 1).reshape(num_steps, *batch_shape, H, P)  # (T, *B, H, P)
        y = y + params["D"].astype(real)[:, None] * xh
        ys = self._output(params, y, z)  # (T, *B, D)
        if mask is not None:
            ys = jnp.where(mask[..., None], ys, jnp.zeros_like(ys))
        new_carry = Mamba2State(jnp.moveaxis(new_conv, 0, -2), h_last.reshape(*batch_shape, H, P, N))
        return keep_dtype(new_carry, carry), ys.astype(dtype)

    # Pieces shared by step, readout and sequence, so that all round the same way.

    def _real_dtype(self, params: Params, carry: Mamba2State) -> DType:
        """float64 when the compute dtype or the carry is float64, else float32: conv, SSM and norm run in it."""
        wide = jnp.dtype(self.compute_dtype(params)) == jnp.float64 or carry.ssm.dtype == jnp.float64
        return jnp.dtype(jnp.float64 if wide else jnp.float32)

    def _A(self, params: Params, real: DType) -> Array:
        """``A = −exp(A_log)``: ``(H,)``."""
        return -jnp.exp(params["A_log"].astype(real))

    def _project(self, params: Params, x: Array, real: DType) -> tuple[Array, Array, Array]:
        """``x W_in`` split into ``z`` ``(..., E)``, the conv input ``u`` ``(..., C)`` and ``dt_raw`` ``(..., H)``."""
        E, C = self.inner_size, self.conv_size
        proj = matmul(x, params["in_proj"], self.compute_dtype(params)).astype(real)  # (..., 2E + 2GN + H)
        return proj[..., :E], proj[..., E : E + C], proj[..., E + C :]

    def _conv_out(self, params: Params, window: Array, real: DType) -> tuple[Array, Array, Array]:
        """The activated conv output of ``K`` inputs ``(..., K, C)``, split into ``x̄`` and per-head ``B``, ``C``.

        Returns:
            ``x̄`` ``(..., H, P)``, ``B`` and ``C`` ``(..., H, N)`` (each group's ``B``, ``C`` repeated for its heads).
        """
        E, G, N, H = self.inner_size, self.num_groups, self.state_size, self.num_heads
        w, bias = params["conv_weight"].astype(real), params["conv_bias"].astype(real)  # (K, C), (C,)
        xbc = jax.nn.silu(jnp.sum(window * w, axis=-2) + bias)  # (..., C)
        xh = xbc[..., :E].reshape(*xbc.shape[:-1], H, self.head_size)  # (..., H, P)
        b = xbc[..., E : E + G * N].reshape(*xbc.shape[:-1], G, N)  # (..., G, N)
        c = xbc[..., E + G * N :].reshape(*xbc.shape[:-1], G, N)  # (..., G, N)
        return xh, jnp.repeat(b, H // G, axis=-2), jnp.repeat(c, H // G, axis=-2)

    def _output(self, params: Params, y: Array, z: Array) -> Array:
        """``RMSNorm_G(y ⊙ SiLU(z)) · w`` then ``W_out``: ``y`` ``(..., H, P)``, ``z`` ``(..., E)`` -> ``(..., D)``."""
        real, G = y.dtype, self.num_groups
        v = y.reshape(*z.shape) * jax.nn.silu(z)  # (..., E)
        v = v.reshape(*z.shape[:-1], G, self.inner_size // G)  # (..., G, E/G)
        eps = jnp.asarray(self.norm_eps, real)
        v = v * jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + eps)
        v = v.reshape(z.shape) * params["norm_weight"].astype(real)  # (..., E)
        return matmul(v, params["out_proj"], self.compute_dtype(params))  # (..., D) accumulation dtype


def _sliding_windows(a: Array, width: int) -> Array:
    """``out[t] = a[t : t + width]`` for ``t < len(a) − width + 1``: ``(L, ...)`` -> ``(L − width + 1, ..., width)``.

    The window axis is put second to last: ``(L, *B, C)`` -> ``(L − K + 1, *B, K, C)``.
    """
    steps = a.shape[0] - width + 1
    return jnp.stack([a[k : k + steps] for k in range(width)], axis=-2)


def _segsum(a: Array) -> Array:
    """``out[..., l, s] = a[..., s+1] + … + a[..., l]`` for ``s ≤ l``, ``−inf`` above the diagonal: ``(..., Q, Q)``.

    Summed per entry (not as a difference of cumulative sums), so small sums stay exact next to large ones.
    """
    Q = a.shape[-1]
    strictly_lower = np.tril(np.ones((Q, Q), bool), -1)
    terms = jnp.where(strictly_lower, a[..., :, None], jnp.zeros((), a.dtype))  # (..., Q(l), Q(s)): a_l for l > s
    sums = jnp.cumsum(terms, axis=-2)  # (..., Q, Q): Σ_{s < k ≤ l} a_k
    return jnp.where(np.tril(np.ones((Q, Q), bool)), sums, jnp.asarray(-jnp.inf, a.dtype))


def _ssd(x, dt, A, B, C, h0, chunk_size: int, unroll):
    """The chunked SSD algorithm: ``h_t = exp(dt_t A) h_{t−1} + dt_t x_t B_tᵀ``, ``y_t = h_t C_t`` for all ``t``.

    Shape letters: ``n`` rows, ``T`` steps, ``G`` groups, ``r`` heads per group, ``P`` head size, ``N`` state.
    With ``a_t = dt_t A`` and the chunk's decay matrix ``L[l, s] = exp(a_{s+1} + … + a_l)`` (``s ≤ l``):

    * intra-chunk (quadratic form): ``y_l = Σ_{s ≤ l} (C_l · B_s) L[l, s] dt_s x_s``;
    * chunk states: ``S = Σ_s L[Q−1, s] dt_s x_s B_sᵀ``, the state a chunk adds from a zero start;
    * state passing: ``h_{c+1} = exp(a_0 + … + a_{Q−1}) h_c + S_c`` (a scan over chunks);
    * inter-chunk output: ``y_l += exp(a_0 + … + a_l) h_c C_l``.

    Args:
        x: ``(n, T, G, r, P)``.
        dt: ``(n, T, G, r)``, zero at masked steps.
        A: ``(G, r)``, negative.
        B, C: ``(n, T, G, N)``.
        h0: ``(n, G, r, P, N)`` initial state.
        chunk_size: ``Q``; ``T`` is padded with ``dt = 0`` steps to a multiple of it.
        unroll: of the scan over chunks.

    Returns:
        ``(y (n, T, G, r, P), h_T (n, G, r, P, N))``.
    """
    n, T = x.shape[:2]
    Q = min(chunk_size, T)
    pad = -T % Q
    if pad:
        x, dt, B, C = (jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2)) for v in (x, dt, B, C))
    nc = (T + pad) // Q

    def chunks(v):  # (n, T', ...) -> (n, nc, Q, ...)
        return v.reshape(n, nc, Q, *v.shape[2:])

    x, dt, B, C = chunks(x), chunks(dt), chunks(B), chunks(C)
    a = jnp.moveaxis(dt * A, 2, -1)  # (n, nc, G, r, Q)
    L = jnp.exp(_segsum(a))  # (n, nc, G, r, Q, Q)
    cum = jnp.cumsum(a, axis=-1)  # (n, nc, G, r, Q): a_0 + … + a_l
    xdt = x * dt[..., None]  # (n, nc, Q, G, r, P)
    scores = jnp.einsum("bclgn,bcsgn->bcgls", C, B)  # (n, nc, G, Q, Q)
    y_diag = jnp.einsum("bcgls,bcgrls,bcsgrp->bclgrp", scores, L, xdt)  # (n, nc, Q, G, r, P)
    states = jnp.einsum("bcsgn,bcgrs,bcsgrp->bcgrpn", B, L[..., -1, :], xdt)  # (n, nc, G, r, P, N)
    chunk_decay = jnp.exp(cum[..., -1])  # (n, nc, G, r)

    def pass_state(h, inputs):  # h: (n, G, r, P, N) entering the chunk
        decay, added = inputs
        return decay[..., None, None] * h + added, h

    h_last, h_in = jax.lax.scan(
        pass_state, h0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(states, 1, 0)), unroll=unroll
    )  # (n, G, r, P, N), (nc, n, G, r, P, N)
    y_off = jnp.einsum("bclgn,cbgrpn,bcgrl->bclgrp", C, h_in, jnp.exp(cum))  # (n, nc, Q, G, r, P)
    y = (y_diag + y_off).reshape(n, nc * Q, *x.shape[3:])[:, :T]  # (n, T, G, r, P)
    return y, h_last
