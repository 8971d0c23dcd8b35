"""The mLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", arXiv 2405.04517, §2.3).

A matrix memory per head, written with an outer product and read with a query, under an exponential input gate
and a sigmoid forget gate. The gates read only ``x_t`` (no state-to-state weights), so a whole sequence is
computed chunkwise in parallel (:meth:`MLSTM.sequence`): the quadratic, attention-like form inside a chunk of
``chunk_size`` steps, the recurrent matrix state across chunks. It gives the numbers of :meth:`MLSTM.step`
under :func:`rnnjax.masked_scan`, to rounding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax import _checks
from rnnjax.cells.base import Cell, batch_shape_tuple, keep_dtype
from rnnjax.cells.registry import register_cell
from rnnjax.precision import matmul
from rnnjax.types import Array, DType, Params, PRNGKey

_HIGHEST = jax.lax.Precision.HIGHEST  # the state arithmetic is float32 even where matmuls default to bf16 passes


class MLSTMState(NamedTuple):
    """Carry of :class:`MLSTM` (``NH`` heads, ``K`` key size and ``V = H / NH`` value size per head).

    All three are stabilised: the true (unstabilised) memory is ``exp(m) C`` and normaliser ``exp(m) n``.
    ``m`` comes first so that the first leaf is the plain ``(*B, NH)`` vector of the state.
    """

    m: Array  # (*B, NH) log-scale stabiliser, float32 under bfloat16 compute
    n: Array  # (*B, NH, K) normaliser state Σ i'·k
    C: Array  # (*B, NH, K, V) matrix memory Σ i'·k vᵀ (the official kernels' (key, value) layout)


class _Projection(NamedTuple):
    """Everything the cell reads off ``x_t``, in the state dtype."""

    q: Array  # (..., NH, K) query
    k: Array  # (..., NH, K) key, already scaled by 1/√K
    v: Array  # (..., NH, V) value
    o: Array  # (..., H) output gate σ(x W_o + b_o)
    log_i: Array  # (..., NH) input-gate pre-activation ĩ = log i (exponential input gate)
    log_f: Array  # (..., NH) log σ(f̃), the log of the sigmoid forget gate


@register_cell("mlstm")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MLSTM(Cell):
    """mLSTM: a multi-head matrix memory with exponential input gates and sigmoid forget gates.

    Per head (``K`` key size, ``V = H / NH`` value size), with ``ĩ_t, f̃_t`` scalars per head:

    .. math::
        q_t = x_t W_q, \\quad k_t = x_t W_k / \\sqrt{K}, \\quad v_t = x_t W_v, \\quad
            o_t = \\sigma(x_t W_o + b_o) \\\\
        \\tilde\\imath_t = x_t w_i + b_i, \\quad \\tilde f_t = x_t w_f + b_f \\\\
        m_t = \\max(\\log\\sigma(\\tilde f_t) + m_{t-1},\\ \\tilde\\imath_t), \\quad
            i'_t = \\exp(\\tilde\\imath_t - m_t), \\quad f'_t = \\exp(\\log\\sigma(\\tilde f_t) + m_{t-1} - m_t) \\\\
        C_t = f'_t C_{t-1} + i'_t\\, k_t v_t^\\top, \\qquad n_t = f'_t n_{t-1} + i'_t k_t \\\\
        \\tilde h_t = \\frac{C_t^\\top q_t}{\\max(|n_t^\\top q_t|, \\exp(-m_t))}, \\qquad
            y_t = h_t = o_t \\odot [\\tilde h_t^{(1)}, \\dots, \\tilde h_t^{(NH)}]

    These are the equations of the paper's §2.3 with the stabiliser ``m`` of its appendix, as in the official code
    (``xlstm/blocks/mlstm/backends.py``, ``recurrent_step_stabilized_simple``): the forget gate is the sigmoid,
    used in log space as ``log σ(f̃) = −softplus(−f̃)``; the input gate is exponential; the initial ``m`` is 0.
    As in the paper (and unlike the official ``mLSTMCell``, whose gates read ``[q, k, v]`` inside a block with a
    causal convolution and a group norm), the gates read ``x_t``.
    ``C`` is stored as ``k vᵀ`` (``(K, V)``, the official layout) and read as ``Cᵀ q``. The stabiliser cancels
    from ``h``: with the unstabilised ``C̄ = e^m C``, ``n̄ = e^m n``, ``h̃ = C̄ᵀq / max(|n̄ᵀq|, 1)``. Unlike the
    official kernels no ``eps`` is added to the denominator, so that ``h`` does not depend on the stabiliser.

    :meth:`sequence` (used by :func:`rnnjax.unroll`) is the chunkwise-parallel form: with the cumulative log
    forget gates ``b_t = Σ_{r ≤ t} log σ(f̃_r)`` inside a chunk and the carry ``(C_0, n_0, m_0)`` at its start,
    ``m_t = max(b_t + m_0, max_{s ≤ t} D_ts)`` with the decay matrix ``D_ts = b_t − b_s + ĩ_s``, and
    ``h̃_t ∝ e^{b_t + m_0 − m_t} C_0ᵀ q_t + Σ_{s ≤ t} e^{D_ts − m_t} (q_t·k_s) v_s``; the state at the chunk's
    end is carried to the next chunk. Masked steps (``mask`` False) get forget gate 1 and input gate 0, so they
    hold the carry exactly, and output zeros.

    Parameters (``I`` inputs, ``H`` hidden, ``NH`` heads, ``K`` key size per head)::

        w_q: (I, NH·K)  query kernel        w_k: (I, NH·K)  key kernel        w_v: (I, H)  value kernel
        w_o: (I, H)     output-gate kernel  b_o: (H,)       output-gate bias
        w_i: (I, NH)    input-gate kernel   b_i: (NH,)      input-gate bias
        w_f: (I, NH)    forget-gate kernel  b_f: (NH,)      forget-gate bias

    Heads are contiguous blocks of the ``NH·K`` and ``H`` axes. Initialisation follows the official code
    (``xlstm/blocks/mlstm/layer.py`` ``mLSTMLayer.reset_parameters``, ``xlstm/blocks/mlstm/cell.py``
    ``mLSTMCell.reset_parameters``): ``w_q, w_k, w_v`` (and ``w_o``) ``N(0, 2 / (5 I))`` ("small init"),
    ``w_i`` and ``w_f`` zero, ``b_i ~ N(0, 0.1²)``, ``b_f`` evenly spaced over ``[3, 6]`` across heads
    (forget gates near 1), ``b_o`` zero.

    Attributes:
        hidden_size: ``H``, the output size, ``NH`` times the value size per head.
        num_heads: ``NH``, must divide ``hidden_size``. The default, 1, fits every ``hidden_size``.
        key_size: ``K``, the query and key size per head; ``None``: the value size ``H / NH``.
        chunk_size: steps per chunk of the chunkwise form in :meth:`sequence` (memory ``O(chunk_size²)`` per
            head and row); any value gives the same numbers.
        param_dtype: dtype of the parameters ``init`` creates.
        dtype: compute dtype of the input projection (``None``: the parameters' dtype); gates, state and the
            recurrence are float32 under bfloat16 (float64 for a float64 carry).

    Example:
        >>> cell = rnnjax.MLSTM(hidden_size=16, num_heads=4)
        >>> params = cell.init(jax.random.key(0), input_size=8)
        >>> carry, ys = rnnjax.unroll(cell, params, jnp.ones((2, 100, 8)))
        >>> ys.shape, carry.C.shape
        ((2, 100, 16), (2, 4, 4, 4))
    """

    hidden_size: int
    num_heads: int = 1
    key_size: int | None = None
    chunk_size: int = 64
    param_dtype: DType = jnp.float32
    dtype: DType | None = None

    def __post_init__(self):
        self.check_hyperparameters()
        _checks.check_positive_int(self.num_heads, "num_heads")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads must divide hidden_size (the value size per head is hidden_size / num_heads), got "
                f"num_heads={self.num_heads} for hidden_size={self.hidden_size}"
            )
        _checks.check_positive_int(self.key_size, "key_size", allow_none=True)
        _checks.check_positive_int(self.chunk_size, "chunk_size")

    @property
    def value_size(self) -> int:
        """``V = H / NH``, the value (and output) size per head."""
        return self.hidden_size // self.num_heads

    @property
    def head_key_size(self) -> int:
        """``K``: ``key_size``, or the value size when unset."""
        return self.value_size if self.key_size is None else self.key_size

    def init(self, key: PRNGKey, input_size: int) -> Params:
        _checks.check_positive_int(input_size, "input_size")
        I, H, NH, K = input_size, self.hidden_size, self.num_heads, self.head_key_size
        k_q, k_k, k_v, k_o, k_i = jax.random.split(key, 5)
        std = math.sqrt(2.0 / (5.0 * I))  # small init, Nguyen & Salazar 2019, as xlstm's small_init_init_
        pd = self.param_dtype

        def normal(k, shape, scale):
            return (scale * jax.random.normal(k, shape, jnp.float32)).astype(pd)

        return {
            "w_q": normal(k_q, (I, NH * K), std),
            "w_k": normal(k_k, (I, NH * K), std),
            "w_v": normal(k_v, (I, H), std),
            "w_o": normal(k_o, (I, H), std),
            "b_o": jnp.zeros((H,), pd),
            "w_i": jnp.zeros((I, NH), pd),
            "b_i": normal(k_i, (NH,), 0.1),
            "w_f": jnp.zeros((I, NH), pd),
            "b_f": jnp.linspace(3.0, 6.0, NH, dtype=jnp.float32).astype(pd),  # as torch.linspace(3, 6, NH)
        }

    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32) -> MLSTMState:
        batch = batch_shape_tuple(batch_shape)
        NH, K, V = self.num_heads, self.head_key_size, self.value_size
        return MLSTMState(
            m=jnp.zeros((*batch, NH), dtype),
            n=jnp.zeros((*batch, NH, K), dtype),
            C=jnp.zeros((*batch, NH, K, V), dtype),
        )

    def input_size(self, params: Params) -> int:
        return params["w_q"].shape[0]

    def recurrent_matrices(self, params: Params) -> dict[str, Array]:
        """None: the gates, keys and values read only the input, so no weight maps the state to the next state."""
        del params
        return {}

    # Shared by step, readout and sequence so that all three round the same way.

    def _project(self, params: Params, x: Array, acc: DType) -> _Projection:
        """One matmul for ``q, k, v, o, ĩ, f̃``: ``x`` ``(..., I)`` -> a :class:`_Projection` in ``acc``."""
        NH, K, H = self.num_heads, self.head_key_size, self.hidden_size
        names = ("w_q", "w_k", "w_v", "w_o", "w_i", "w_f")
        kernel = jnp.concatenate([params[name] for name in names], axis=-1)  # (I, 2NH·K + 2H + 2NH)
        proj = matmul(x, kernel, self.compute_dtype(params)).astype(acc)  # (..., 2NH·K + 2H + 2NH)
        ends = (NH * K, 2 * NH * K, 2 * NH * K + H, 2 * NH * K + 2 * H, 2 * NH * K + 2 * H + NH)
        q, k, v, o, i, f = jnp.split(proj, ends, axis=-1)
        heads = x.shape[:-1] + (NH, -1)
        return _Projection(
            q=q.reshape(heads),  # (..., NH, K)
            k=k.reshape(heads) / jnp.asarray(math.sqrt(K), acc),  # (..., NH, K)
            v=v.reshape(heads),  # (..., NH, V)
            o=jax.nn.sigmoid(o + params["b_o"].astype(acc)),  # (..., H)
            log_i=i + params["b_i"].astype(acc),  # (..., NH)
            log_f=jax.nn.log_sigmoid(f + params["b_f"].astype(acc)),  # (..., NH)
        )

    def _output(self, p: _Projection, state: MLSTMState) -> Array:
        """``y = o ⊙ Cᵀq / max(|nᵀq|, e^{−m})`` with heads concatenated: ``(..., H)`` in the state dtype."""
        num = jnp.einsum("...hkv,...hk->...hv", state.C, p.q, precision=_HIGHEST)  # (..., NH, V)
        qn = jnp.einsum("...hk,...hk->...h", state.n, p.q, precision=_HIGHEST)  # (..., NH)
        h = _normalise(num, qn, state.m)  # (..., NH, V)
        return p.o * h.reshape(h.shape[:-2] + (self.hidden_size,))  # (..., H)

    def readout(self, params: Params, carry: MLSTMState, x: Array) -> Array:
        """``y = o ⊙ h̃`` from the post-step ``carry`` and the step's input ``x``: ``(*B, H)``."""
        p = self._project(params, x, carry.C.dtype)
        return self._output(p, carry).astype(self.compute_dtype(params))

    def step(self, params: Params, carry: MLSTMState, x: Array) -> tuple[MLSTMState, Array]:
        """One step: ``x`` ``(*B, I)`` -> ``(carry, y)``, ``y`` ``(*B, H)`` in the compute dtype."""
        x = self.check_step_input(params, x, carry)
        acc = _state_dtype(carry)
        state = MLSTMState(*(leaf.astype(acc) for leaf in carry))
        p = self._project(params, x, acc)
        m = jnp.maximum(p.log_f + state.m, p.log_i)  # (*B, NH)
        f = jnp.exp(p.log_f + state.m - m)  # (*B, NH) f'
        i = jnp.exp(p.log_i - m)  # (*B, NH) i'
        C = f[..., None, None] * state.C + (i[..., None] * p.k)[..., :, None] * p.v[..., None, :]  # (*B, NH, K, V)
        n = f[..., None] * state.n + i[..., None] * p.k  # (*B, NH, K)
        new = MLSTMState(m=m, n=n, C=C)
        y = self._output(p, new)  # (*B, H)
        return keep_dtype(new, carry), y.astype(self.compute_dtype(params))

    def sequence(
        self,
        params: Params,
        carry: MLSTMState,
        xs: Array,
        mask: Array | None,
        *,
        unroll=1,
        remat=False,
        dropout_key=None,
    ) -> tuple[MLSTMState, Array]:
        """Chunkwise-parallel path (see the class docstring); equals :meth:`step` under ``masked_scan``.

        Args:
            params: from :meth:`init`.
            carry: initial :class:`MLSTMState` with leaves ``(*B, ...)``.
            xs: time-major ``(T, *B, I)``.
            mask: ``(T, *B)`` booleans or ``None``; any pattern (not only prefixes) is honoured.
            unroll: chunks per iteration of the scan over chunks.
            remat: ignored (a chunk's backward pass keeps ``O(chunk_size²)`` values per head and row).

        Returns:
            ``(carry, ys)`` with ``ys`` ``(T, *B, H)`` in the compute dtype, zero where masked.
        """
        del remat, dropout_key
        xs = _checks.as_float_array(xs, "xs")
        _checks.check_features(xs, self.input_size(params), "xs")
        num_steps, batch = xs.shape[0], xs.shape[1:-1]
        dtype, H = self.compute_dtype(params), self.hidden_size
        if num_steps == 0 or math.prod(batch) == 0:  # nothing to run: the carry stays, no outputs
            return carry, jnp.zeros((num_steps, *batch, H), dtype)
        acc = _state_dtype(carry)
        rows = math.prod(batch)
        p = self._project(params, xs.reshape(num_steps, rows, xs.shape[-1]), acc)  # leaves (T, N, ...)
        log_i, log_f = p.log_i, p.log_f  # (T, N, NH)
        if mask is not None:  # a masked step holds the carry: forget gate 1 (log 0), input gate 0 (log −∞)
            valid = mask.reshape(num_steps, rows, 1)  # (T, N, 1)
            log_i = jnp.where(valid, log_i, _large_negative(acc))
            log_f = jnp.where(valid, log_f, jnp.zeros_like(log_f))

        chunk = min(self.chunk_size, num_steps)
        num_chunks = -(-num_steps // chunk)
        pad = num_chunks * chunk - num_steps  # padded steps are masked: they hold the carry

        def chunked(a, fill=0.0):  # (T, N, ...) -> (num_chunks, chunk, N, ...)
            a = jnp.concatenate([a, jnp.full((pad, *a.shape[1:]), fill, a.dtype)]) if pad else a
            return a.reshape(num_chunks, chunk, *a.shape[1:])

        inputs = (chunked(p.q), chunked(p.k), chunked(p.v), chunked(log_i, _large_negative(acc)), chunked(log_f))
        state0 = MLSTMState(*(leaf.astype(acc).reshape(rows, *leaf.shape[len(batch) :]) for leaf in carry))
        below = jnp.tril(jnp.ones((chunk, chunk), bool))[:, :, None, None]  # (t, s, 1, 1): s ≤ t

        def run_chunk(state: MLSTMState, chunk_inputs):
            q, k, v, log_i, log_f = chunk_inputs  # (L, N, NH, K), (L, N, NH, K), (L, N, NH, V), (L, N, NH) x2
            b = jnp.cumsum(log_f, axis=0)  # (L, N, NH) log of the forget gates' product since the chunk's start
            log_d = b[:, None] - b[None, :] + log_i[None, :]  # (t, s, N, NH) decay matrix D_ts
            log_d = jnp.where(below, log_d, _large_negative(acc))
            log_inter = b + state.m  # (L, N, NH) log weight of the carried state
            m = jnp.maximum(log_inter, jnp.max(log_d, axis=1))  # (L, N, NH) = the stepped stabiliser m_t
            inter = jnp.exp(log_inter - m)  # (L, N, NH)
            weights = jnp.exp(log_d - m[:, None]) * jnp.einsum("tnhk,snhk->tsnh", q, k, precision=_HIGHEST)
            num = inter[..., None] * jnp.einsum("tnhk,nhkv->tnhv", q, state.C, precision=_HIGHEST)
            num = num + jnp.einsum("tsnh,snhv->tnhv", weights, v, precision=_HIGHEST)  # (L, N, NH, V)
            qn = inter * jnp.einsum("tnhk,nhk->tnh", q, state.n, precision=_HIGHEST) + weights.sum(axis=1)
            h = _normalise(num, qn, m)  # (L, N, NH, V)
            # The state after the chunk's last step, from the last row of the decay matrix.
            m_end, g = m[-1], jnp.exp(log_d[-1] - m[-1])  # (N, NH), (s, N, NH)
            carried = inter[-1]  # (N, NH)
            C = carried[..., None, None] * state.C + jnp.einsum("snh,snhk,snhv->nhkv", g, k, v, precision=_HIGHEST)
            n = carried[..., None] * state.n + jnp.einsum("snh,snhk->nhk", g, k, precision=_HIGHEST)
            return MLSTMState(m=m_end, n=n, C=C), h

        with jax.named_scope("rnnjax.mlstm_chunkwise"):
            state, hs = jax.lax.scan(run_chunk, state0, inputs, unroll=unroll)  # hs (num_chunks, L, N, NH, V)
        hs = hs.reshape(num_chunks * chunk, rows, H)[:num_steps]  # (T, N, H)
        ys = (p.o * hs).reshape(num_steps, *batch, H)  # (T, *B, H)
        if mask is not None:
            ys = jnp.where(mask[..., None], ys, jnp.zeros_like(ys))
        new = MLSTMState(*(leaf.reshape(old.shape) for leaf, old in zip(state, carry)))
        return keep_dtype(new, carry), ys.astype(dtype)


def _state_dtype(carry: MLSTMState) -> DType:
    """The dtype of the recurrence: float64 for a float64 carry, else float32 (bfloat16 carries too)."""
    return jnp.dtype(jnp.float64) if carry.C.dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _normalise(num: Array, qn: Array, m: Array) -> Array:
    """``h̃ = num / max(|qn|, e^{−m})``: ``num`` ``(..., V)``, ``qn`` and ``m`` ``(...)`` -> ``(..., V)``.

    Two guards keep NaN out of values and gradients at saturated gates, where the formula itself would give
    ``0/0`` or ``∞``:

    * ``e^{−m}`` is capped at ``e^{0.9 log(max float)}`` (``e^{79.9}`` in float32) instead of overflowing when
      ``m`` is very negative (input-gate pre-activations below about −80); ``h̃`` is then ``num · e^{−79.9}``
      or smaller, where the exact ``num · e^{m}`` is smaller still, and ``m`` gets no gradient through the cap;
    * the denominator is 0 only where ``e^{−m}`` underflows (``m`` above 88 in float32) and ``qᵀn = 0``, such as
      a zero query; ``h̃`` is then 0 (the limit for ``q → 0``) rather than ``0/0`` (padded steps of the
      chunkwise form have zero queries).
    """
    cap = 0.9 * math.log(float(jnp.finfo(m.dtype).max))
    den = jnp.maximum(jnp.abs(qn), jnp.exp(-jnp.maximum(m, -cap)))[..., None]  # (..., 1)
    positive = den > 0
    return jnp.where(positive, num / jnp.where(positive, den, jnp.ones_like(den)), jnp.zeros_like(num))


def _large_negative(dtype: DType) -> Array:
    """A finite stand-in for ``log 0``: ``exp`` of it (minus a stabiliser) is 0, and ``x − x`` is never ``−∞ + ∞``."""
    return jnp.asarray(-1e30, dtype)
