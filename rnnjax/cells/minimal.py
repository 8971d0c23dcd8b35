"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): gates that do not read ``h``.

Both cells compute ``h_t = h_{t-1} + z_t ⊙ (v_t − h_{t-1})``, i.e. the linear recurrence
``h_t = (1 − z_t) ⊙ h_{t-1} + z_t ⊙ v_t`` whose coefficients depend on ``x_t`` only. So a whole sequence is
solved without stepping a cell: :meth:`sequence` (used by :func:`rnnjax.unroll`) projects the inputs and solves
the recurrence with one of the methods of :mod:`rnnjax.scan`:

* ``"sequential"`` — a fused kernel: blocks of 64 steps, each block projects its inputs with one matmul, computes
  the gates for the whole block at once and runs the recurrence; the backward pass recomputes the block's
  projection and returns the weight gradient blockwise. Nothing of size ``(T, B, kH)`` besides the outputs is
  ever stored, which is what makes it fast on CPU (see ``docs/benchmarks.md``).
* ``"associative"`` — ``lax.associative_scan`` over ``(1 − z, z ⊙ v)``.
* ``"log"`` — the paper's log-space form: ``log(1 − z) = −softplus(k)``, ``log z = −softplus(−k)`` and
  ``log v = log g(ṽ)``; needs ``activation="g"`` so that ``v > 0``.

``activation`` is the candidate's activation: ``"g"`` (default; the paper's log-space form,
``g(x) = x + ½`` for ``x ≥ 0`` and ``σ(x)`` otherwise, which keeps ``v`` positive) or ``"identity"`` (the paper's
plain form, ``v = ṽ``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax import _checks
from rnnjax import scan as linear
from rnnjax.cells.base import Cell, Initializer, batch_shape_tuple, init_blocks, keep_dtype, matmul, resolve_initializer
from rnnjax.types import Array, DType, Params, PRNGKey

ACTIVATIONS = ("g", "identity")

# Steps per block of the fused sequential kernel. Measured on CPU (python -m rnnjax.bench.parallel): 32 to 128
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


class MinGRUState(NamedTuple):
    """Carry of :class:`MinGRU`."""

    h: Array  # (*B, H) hidden state, float32 under bfloat16 compute


class MinLSTMState(NamedTuple):
    """Carry of :class:`MinLSTM`."""

    h: Array  # (*B, H) hidden state, float32 under bfloat16 compute


@dataclasses.dataclass(frozen=True, kw_only=True)
class _MinimalCell(Cell):
    """Shared machinery of :class:`MinGRU` and :class:`MinLSTM` (``_blocks`` gate blocks per input)."""

    hidden_size: int
    activation: str = "g"
    method: str | None = None
    use_bias: bool = True
    kernel_init: str | Initializer = "glorot_uniform"
    param_dtype: DType = jnp.float32
    dtype: DType | None = None

    _blocks = 2
    _kind = "gru"

    def __post_init__(self):
        self.check_hyperparameters()
        _checks.check_choice(self.activation, ACTIVATIONS, "activation")
        if self.method is not None:
            _checks.check_choice(self.method, linear.METHODS, "method")
        if self.method == "log" and self.activation != "g":
            raise ValueError("method='log' needs activation='g' (the log-space form needs positive candidates)")

    def init(self, key: PRNGKey, input_size: int) -> Params:
        _checks.check_positive_int(input_size, "input_size")
        init = resolve_initializer(self.kernel_init, "kernel_init")
        H = self.hidden_size
        params = {"w_ih": init_blocks(init, key, input_size, H, self._blocks, self.param_dtype)}
        if self.use_bias:
            params["b_ih"] = jnp.zeros((self._blocks * H,), self.param_dtype)
        return params

    def input_size(self, params: Params) -> int:
        return params["w_ih"].shape[0]

    def _state(self, h: Array):
        raise NotImplementedError

    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32):
        return self._state(jnp.zeros((*batch_shape_tuple(batch_shape), self.hidden_size), dtype))

    def _project(self, params: Params, x: Array, acc_dtype: DType) -> Array:
        """``x W_ih + b_ih``: ``(..., I)`` -> ``(..., kH)`` in ``acc_dtype``."""
        proj = matmul(x, params["w_ih"], self.compute_dtype(params)).astype(acc_dtype)
        if self.use_bias:
            proj = proj + params["b_ih"].astype(acc_dtype)
        return proj

    def step(self, params: Params, carry, x: Array):
        """One step: ``x`` ``(*B, I)``, ``carry.h`` ``(*B, H)`` -> ``(carry, y)``, ``y = h`` ``(*B, H)``."""
        x = self.check_step_input(params, x, carry)
        h_prev = carry.h
        proj = self._project(params, x, h_prev.dtype)  # (*B, kH)
        z, v = _gate_and_candidate(self._kind, self.activation, proj, self.hidden_size)
        h = h_prev + z * (v - h_prev)  # (*B, H)
        return keep_dtype(self._state(h), carry), h.astype(self.compute_dtype(params))

    def sequence(self, params: Params, carry, xs: Array, mask: Array | None, *, unroll=1, remat=False):
        """Whole-sequence fast path (see the module docstring); equals :meth:`step` under ``masked_scan``.

        Args:
            params: from :meth:`init`.
            carry: initial state, ``h`` ``(*B, H)``.
            xs: time-major inputs ``(T, *B, I)``.
            mask: ``(T, *B)`` booleans or ``None``.
            unroll: steps per iteration for the ``"sequential"`` method of :func:`rnnjax.scan.linear_scan`
                when not fused; the fused kernel blocks by itself.
            remat: ignored: the fused kernel always recomputes the projection in the backward pass and the
                other methods store only ``(T, *B, H)``-sized coefficients.

        Returns:
            ``(carry, ys)`` with ``ys`` ``(T, *B, H)`` in the compute dtype.
        """
        del remat
        xs = _checks.as_float_array(xs, "xs")
        _checks.check_features(xs, self.input_size(params), "xs")
        h0 = carry.h
        num_steps, batch_shape = xs.shape[0], xs.shape[1:-1]
        method = self.method or linear.default_method(num_steps)
        dtype = self.compute_dtype(params)
        H = self.hidden_size
        if method == "sequential":
            n = 1
            for size in batch_shape:
                n *= size
            cfg = _FusedConfig(self._kind, self.activation, jnp.dtype(dtype), min(BLOCK_STEPS, max(num_steps, 1)))
            h_last, ys = _fused(
                cfg,
                params["w_ih"],
                params.get("b_ih"),
                xs.reshape(num_steps, n, xs.shape[-1]),
                h0.reshape(n, H),
                None if mask is None else mask.reshape(num_steps, n),
            )
            h_last, ys = h_last.reshape(h0.shape), ys.reshape(num_steps, *batch_shape, H)
        else:
            proj = self._project(params, xs, h0.dtype)  # (T, *B, kH)
            if method == "log":
                log_a, log_b = _log_coefficients(self._kind, proj, H)
                h_last, ys = linear.masked_log_linear_scan(log_a, log_b, h0, mask)
            else:
                z, v = _gate_and_candidate(self._kind, self.activation, proj, H)
                u = _gate_logit(self._kind, proj, H)
                a = jax.nn.sigmoid(-u)  # 1 − z without the cancellation
                h_last, ys = linear.masked_linear_scan(a, z * v, h0, mask, method, unroll=unroll)
        return keep_dtype(self._state(h_last), carry), ys.astype(dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinGRU(_MinimalCell):
    """minGRU: a GRU whose update gate and candidate read only the input.

    .. math::
        z_t = \\sigma(x_t W_z + b_z), \\qquad \\tilde h_t = g(x_t W_h + b_h) \\\\
        h_t = (1 - z_t) \\odot h_{t-1} + z_t \\odot \\tilde h_t, \\qquad y_t = h_t

    (``g`` is the identity with ``activation="identity"``.) Parallel in time: see the module docstring.

    Parameters (``I`` inputs, ``H`` hidden)::

        w_ih: (I, 2H)   input kernel, blocks z (update gate), h̃ (candidate)
        b_ih: (2H,)     bias (use_bias=True)

    Attributes:
        hidden_size: ``H``.
        activation: ``"g"`` (default, the log-space form) or ``"identity"``.
        method: how :meth:`sequence` solves the recurrence, one of ``"sequential"`` (fused kernel),
            ``"associative"``, ``"log"`` (needs ``activation="g"``); ``None``: :func:`rnnjax.scan.default_method`.
        use_bias: whether ``b_ih`` exists.
        kernel_init: initialiser name or callable for ``w_ih`` (per block).
        param_dtype: dtype of the parameters ``init`` creates.
        dtype: compute dtype of the matmul (``None``: the parameters' dtype); gates, recurrence and carry are
            float32 under bfloat16.

    Example:
        >>> cell = rnnjax.MinGRU(hidden_size=32)
        >>> params = cell.init(jax.random.key(0), input_size=8)
        >>> carry, ys = rnnjax.unroll(cell, params, jnp.ones((4, 100, 8)))
        >>> ys.shape
        (4, 100, 32)
    """

    _blocks = 2
    _kind = "gru"

    def _state(self, h: Array) -> MinGRUState:
        return MinGRUState(h=h)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinLSTM(_MinimalCell):
    """minLSTM: an LSTM whose gates read only the input, with normalised (length-independent) gates.

    .. math::
        f_t = \\sigma(x_t W_f + b_f), \\quad i_t = \\sigma(x_t W_i + b_i), \\quad
            \\tilde h_t = g(x_t W_h + b_h) \\\\
        f'_t = \\frac{f_t}{f_t + i_t}, \\quad i'_t = \\frac{i_t}{f_t + i_t}, \\qquad
            h_t = f'_t \\odot h_{t-1} + i'_t \\odot \\tilde h_t, \\qquad y_t = h_t

    Computed stably as ``i'_t = σ(softplus(−k_f) − softplus(−k_i))`` (``k`` the pre-activations), which is also
    the paper's log-space form (``log f' = −softplus(d)``, ``log i' = −softplus(−d)``,
    ``d = softplus(−k_f) − softplus(−k_i)``).

    Parameters (``I`` inputs, ``H`` hidden)::

        w_ih: (I, 3H)   input kernel, blocks f (forget), i (input), h̃ (candidate)
        b_ih: (3H,)     bias (use_bias=True)

    Attributes:
        hidden_size, activation, method, use_bias, kernel_init, param_dtype, dtype: as :class:`MinGRU`.

    Example:
        >>> cell = rnnjax.MinLSTM(hidden_size=32, method="log")
        >>> params = cell.init(jax.random.key(0), input_size=8)
        >>> carry, ys = rnnjax.unroll(cell, params, jnp.ones((4, 100, 8)))
        >>> carry.h.shape
        (4, 32)
    """

    _blocks = 3
    _kind = "lstm"

    def _state(self, h: Array) -> MinLSTMState:
        return MinLSTMState(h=h)


# The gate algebra shared by step, the scans and the fused kernel. proj: (..., kH) pre-activations.


def _gate_logit(kind: str, proj: Array, H: int) -> Array:
    """``u`` with ``z = σ(u)``: ``k_z`` for minGRU, ``softplus(−k_f) − softplus(−k_i)`` for minLSTM."""
    if kind == "gru":
        return proj[..., :H]
    return jax.nn.softplus(-proj[..., :H]) - jax.nn.softplus(-proj[..., H : 2 * H])


def _gate_and_candidate(kind: str, activation: str, proj: Array, H: int) -> tuple[Array, Array]:
    """``(z, v)``: the update gate ``σ(u)`` and the activated candidate, each ``(..., H)``."""
    z = jax.nn.sigmoid(_gate_logit(kind, proj, H))
    cand = proj[..., -H:]
    return z, (g(cand) if activation == "g" else cand)


def _log_coefficients(kind: str, proj: Array, H: int) -> tuple[Array, Array]:
    """``(log a, log b)`` of the log-space form: ``log(1 − z)``, ``log z + log g(h̃)``."""
    u = _gate_logit(kind, proj, H)
    return -jax.nn.softplus(u), -jax.nn.softplus(-u) + log_g(proj[..., -H:])


# The fused sequential kernel.


class _FusedConfig(NamedTuple):
    kind: str  # "gru" (blocks z, h̃) or "lstm" (blocks f, i, h̃)
    activation: str  # "g" or "identity"
    compute_dtype: jnp.dtype  # dtype of the projection matmuls
    block: int  # steps per block


def _block_forward(cfg: _FusedConfig, w, b, x_blk, m_blk, h, ys, start):
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
    z, v = _gate_and_candidate(cfg.kind, cfg.activation, proj, H)  # (U, N, H) each
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


def _blockwise_projection(cfg: _FusedConfig, w, b, x_blk, acc_dtype):
    U, N, I = x_blk.shape
    proj = matmul(x_blk.reshape(U * N, I), w, cfg.compute_dtype).astype(acc_dtype)
    if b is not None:
        proj = proj + b.astype(acc_dtype)
    return proj.reshape(U, N, -1)


def _block_backward(cfg: _FusedConfig, w, b, x_blk, m_blk, ys_blk, g_blk, c, acc_dtype):
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
    u = _gate_logit(cfg.kind, proj, H)
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
def _fused(cfg: _FusedConfig, w, b, xs, h0, mask):
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


_fused.defvjp(_fused_fwd, _fused_bwd)
