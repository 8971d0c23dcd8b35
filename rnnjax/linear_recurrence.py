"""Linear recurrences ``h_t = a_t ⊙ h_{t-1} + b_t``, solved four ways.

A recurrence that is linear in ``h`` (minGRU, minLSTM, LRU, ...) needs no nonlinear step function, so it can be
solved without stepping a cell. Four solvers give the same numbers (up to rounding)::

    h = h0
    for t in range(T):               # what every method computes, time-major, elementwise over (*S)
        h = a[t] * h + b[t]
        hs[t] = h

* ``"sequential"``: one ``lax.scan`` over time; ``O(T)`` steps, ``O(T·S)`` work. The backward pass is one
  reverse scan (a custom VJP), not the transpose of the forward loop.
* ``"associative"``: ``lax.associative_scan`` with the operator ``(a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2)``;
  ``O(log T)`` depth, about ``2×`` the work and several ``(T, *S)`` temporaries. The backward pass is one reverse
  associative scan.
* ``"log"``: log space (Heinsen 2023), for positive coefficients: with ``A_t = Σ_{s≤t} log a_s``,
  ``h_t = e^{A_t} h_0 + exp(A_t + logcumsumexp_{s≤t}(log b_s − A_s))``. Nothing under- or overflows however long
  the sequence (the sum stays in log space), at the price of a precision loss of about ``|A_T|·ε`` in relative
  terms (``~1e-3`` in float32 at ``T=16384`` with gates near 0.5). Needs ``a > 0``; :func:`linear_scan` splits a
  signed ``b`` into positive and negative parts, :func:`log_linear_scan` takes ``log a`` and ``log b`` directly
  (``log b = -inf`` where ``b = 0``). The backward pass is in log space too, so it stays finite as well.
* ``"pallas"``: a Pallas kernel (:mod:`rnnjax.kernels.pallas_scan`): the state split into blocks of lanes over
  the grid, time walked in chunks inside each program with the state carried from chunk to chunk; ``O(T)`` steps
  like ``"sequential"``, in one kernel. The backward pass is the same kernel run backwards in time. Compiled
  through the Triton lowering on a GPU, run in Pallas interpret mode elsewhere (correct on CPU, but slower than
  ``"sequential"``); it has not been run on a GPU in this project.

Default (:func:`default_method`), from ``python -m rnnjax.bench.parallel_scan`` (see ``docs/benchmarks.md``):
on CPU ``"sequential"`` at every length (``lax.associative_scan`` measured 2–5× and log space 5–10× slower from
``T=64`` to ``T=16384``, train step, B=16, H=256); on GPU and TPU ``"associative"`` from ``T ≥ 256`` (a scan's
per-step launch cost dominates there). The accelerator threshold has **not** been measured in this project yet.
``"pallas"`` is never chosen by default: with no GPU measurement of it there is nothing to justify that.

Shapes: ``a`` and ``b`` are time-major ``(T, *S)`` (``a`` may be any shape that broadcasts against ``b``, e.g. a
time-invariant ``(N,)`` for the LRU); ``h0`` is ``(*S)``. ``lengths`` and ``reverse`` follow :func:`rnnjax.unroll`:
outputs past a row's length are zero, the final state is the state after the row's last valid step, and
``reverse=True`` runs each row backwards within its own length. 16-bit inputs are solved in float32.
"""

from __future__ import annotations

import functools
import typing
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import _checks
from rnnjax.kernels import pallas_scan
from rnnjax.types import Array
from rnnjax.unrolling import reverse_sequences, time_mask

Method = Literal["sequential", "associative", "log", "pallas"]
METHODS: tuple[str, ...] = typing.get_args(Method)

# Below this many steps an accelerator runs the sequential scan (provisional, see the module docstring).
ACCELERATOR_ASSOCIATIVE_FROM = 256


def default_method(num_steps: int, backend: str | None = None) -> str:
    """The solver :func:`linear_scan` and the parallel cells use when none is given.

    Args:
        num_steps: ``T``.
        backend: ``"cpu"``, ``"gpu"``, ``"tpu"``, ...; ``None`` means ``jax.default_backend()``.

    Returns:
        ``"sequential"`` on CPU at every length (measured); ``"associative"`` on accelerators from
        ``T ≥ 256`` (provisional), else ``"sequential"``.
    """
    backend = jax.default_backend() if backend is None else backend
    if backend == "cpu" or num_steps < ACCELERATOR_ASSOCIATIVE_FROM:
        return "sequential"
    return "associative"


def solve_dtype(*dtypes) -> jnp.dtype:
    """The dtype a recurrence is solved in: float32 for 16-bit inputs, complex64 if any input is complex."""
    complex_ = any(jnp.issubdtype(d, jnp.complexfloating) for d in dtypes)
    wide = any(jnp.dtype(d) in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128)) for d in dtypes)
    if complex_:
        return jnp.dtype(jnp.complex128 if wide else jnp.complex64)
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


@jax.named_scope("rnnjax.linear_scan")
def linear_scan(
    a,
    b,
    h0=None,
    *,
    lengths=None,
    reverse: bool = False,
    method: Method | None = None,
    unroll: int = 1,
) -> tuple[Array, Array]:
    """Solves ``h_t = a_t ⊙ h_{t-1} + b_t`` over the leading (time) axis.

    Args:
        a: coefficients, broadcastable to ``b``'s shape (``(T, *S)``, or ``(*S)``-like for time-invariant ones).
        b: inputs ``(T, *S)``.
        h0: initial state ``(*S)``; ``None`` means zeros.
        lengths: optional integers ``(*L)``, ``L`` a prefix of ``S`` (the batch axes): valid steps per row.
        reverse: run each row from its last valid step to its first.
        method: ``"sequential"``, ``"associative"``, ``"log"`` (needs ``a > 0``) or ``"pallas"``; ``None``:
            :func:`default_method`.
        unroll: steps per loop iteration of the sequential method.

    Returns:
        ``(h_last, hs)``: ``h_last`` ``(*S)`` and ``hs`` ``(T, *S)`` (zero past each row's length), in float32
        for 16-bit inputs (complex64 for complex ones).

    Example:
        >>> a = jnp.full((5, 3), 0.5); b = jnp.ones((5, 3))
        >>> h_last, hs = rnnjax.linear_recurrence.linear_scan(a, b)
        >>> hs[:, 0]
        Array([1.    , 1.5   , 1.75  , 1.875 , 1.9375], dtype=float32)
    """
    a, b, h0, lengths, mask, method = _prepare(a, b, h0, lengths, method, "a", "b")
    if reverse:
        a = jnp.broadcast_to(a, b.shape)
        a, b = reverse_sequences(a, lengths), reverse_sequences(b, lengths)
    h_last, hs = masked_linear_scan(a, b, h0, mask, method, unroll=unroll)
    return h_last, (reverse_sequences(hs, lengths) if reverse else hs)


@jax.named_scope("rnnjax.log_linear_scan")
def log_linear_scan(
    log_a,
    log_b,
    h0=None,
    *,
    lengths=None,
    reverse: bool = False,
) -> tuple[Array, Array]:
    """Solves ``h_t = a_t ⊙ h_{t-1} + b_t`` in log space, given ``log a`` and ``log b``.

    ``b = exp(log_b) ≥ 0`` (``log_b = -inf`` is allowed and means ``b = 0``); ``h0`` may have any sign. This is the
    form the log-space minGRU and minLSTM use (``log a = -softplus(k)`` is exact where ``1 - σ(k)`` would round to
    zero). Forward and backward passes are computed in log space: nothing overflows at any length.

    Args:
        log_a: ``(T, *S)`` (or broadcastable), finite.
        log_b: ``(T, *S)``.
        h0: ``(*S)``; ``None`` means zeros.
        lengths, reverse: as for :func:`linear_scan`.

    Returns:
        ``(h_last, hs)`` as for :func:`linear_scan` (``h``, not ``log h``).
    """
    log_a, log_b, h0, lengths, mask, _ = _prepare(log_a, log_b, h0, lengths, "log", "log_a", "log_b")
    if reverse:
        log_a = jnp.broadcast_to(log_a, log_b.shape)
        log_a, log_b = reverse_sequences(log_a, lengths), reverse_sequences(log_b, lengths)
    h_last, hs = masked_log_linear_scan(log_a, log_b, h0, mask)
    return h_last, (reverse_sequences(hs, lengths) if reverse else hs)


@jax.named_scope("rnnjax.masked_linear_scan")
def masked_linear_scan(
    a: Array, b: Array, h0: Array, mask: Array | None, method: str, *, unroll: int = 1
) -> tuple[Array, Array]:
    """:func:`linear_scan` on prepared inputs, with a time mask instead of lengths (the cells' fast paths).

    Where ``mask`` is false the state is held (``a = 1``, ``b = 0``) and the output is zero, as in
    :func:`rnnjax.masked_scan`.

    Args:
        a: broadcastable to ``b``; same dtype as ``b``.
        b: ``(T, *S)`` in the dtype to solve in (see :func:`solve_dtype`).
        h0: ``(*S)``, same dtype.
        mask: ``(T, *L)`` booleans (``L`` a prefix of ``S``) or ``None``.
        method: one of :data:`METHODS`.
        unroll: for the sequential method.

    Returns:
        ``(h_last, hs)`` with ``hs`` ``(T, *S)``.
    """
    _checks.check_choice(method, METHODS, "method")
    if b.shape[0] == 0:  # no steps: the state stays (the associative scan cannot take an empty axis)
        return h0, jnp.zeros(b.shape, h0.dtype)
    if mask is not None:
        m = _expand(mask, b)
        a = jnp.where(m, a, jnp.ones_like(a))
        b = jnp.where(m, b, jnp.zeros_like(b))
    if method == "sequential":
        hs = _sequential(a, b, h0, unroll)
    elif method == "associative":
        hs = _associative(jnp.broadcast_to(a, b.shape), b, h0)
    elif method == "pallas":
        hs = pallas_scan.solve(a, b, h0)
    else:
        if jnp.issubdtype(b.dtype, jnp.complexfloating):
            raise ValueError("method='log' needs real coefficients; use 'sequential', 'associative' or 'pallas'")
        hs = _log_signed(jnp.broadcast_to(a, b.shape), b, h0)
    return _finish(hs, h0, mask)


@jax.named_scope("rnnjax.masked_log_linear_scan")
def masked_log_linear_scan(log_a: Array, log_b: Array, h0: Array, mask: Array | None) -> tuple[Array, Array]:
    """:func:`log_linear_scan` on prepared inputs with a time mask (``(T, *L)`` or ``None``), as
    :func:`masked_linear_scan`."""
    if jnp.issubdtype(log_b.dtype, jnp.complexfloating):
        raise ValueError("log_linear_scan needs real log_a and log_b")
    log_a = jnp.broadcast_to(log_a, log_b.shape)
    if mask is not None:
        m = _expand(mask, log_b)
        log_a = jnp.where(m, log_a, jnp.zeros_like(log_a))
        log_b = jnp.where(m, log_b, jnp.full_like(log_b, -jnp.inf))
    return _finish(_log_scan(log_a, log_b, h0), h0, mask)


# Shared plumbing.


def _prepare(a, b, h0, lengths, method, name_a, name_b):
    a = _checks.as_float_array(a, name_a)
    b = _checks.as_float_array(b, name_b)
    _checks.check_rank(b, name_b, 1, "(time, *state)")
    if method is None:
        method = default_method(b.shape[0])
    _checks.check_choice(method, METHODS, "method")
    _checks.check_broadcasts_to(a, b, name_a, name_b)
    if a.ndim == b.ndim and a.shape[0] == 1 and b.shape[0] != 1:
        a = a[0]  # time-invariant
    dtype = solve_dtype(a.dtype, b.dtype) if h0 is None else solve_dtype(a.dtype, b.dtype, jnp.result_type(h0))
    a, b = a.astype(dtype), b.astype(dtype)
    if h0 is None:
        h0 = jnp.zeros(b.shape[1:], dtype)
    else:
        h0 = jnp.asarray(h0)
        if h0.shape != b.shape[1:]:
            raise ValueError(f"h0 must have shape {b.shape[1:]} (b without its time axis), got {h0.shape}")
        h0 = h0.astype(dtype)
    mask = None
    if lengths is not None:
        batch_ndim = np.ndim(lengths)
        lengths = _checks.check_lengths(lengths, b.shape[1 : 1 + batch_ndim], b.shape[0])
        mask = time_mask(lengths, b.shape[0])  # (T, *L)
    return a, b, h0, lengths, mask, method


def _expand(mask: Array, like: Array) -> Array:
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


def _finish(hs, h0, mask):
    h_last = hs[-1] if hs.shape[0] else h0  # held past each row's length, so the last entry is the final state
    if mask is not None:
        hs = jnp.where(_expand(mask, hs), hs, jnp.zeros_like(hs))
    return h_last, hs


def _unbroadcast(x: Array, shape: tuple[int, ...]) -> Array:
    """Sums ``x`` over the axes along which an array of ``shape`` was broadcast to ``x.shape``."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1)
    return jnp.sum(x, axis=axes).reshape(shape) if axes else x


def _shift_in(h0: Array, hs: Array) -> Array:
    """``h_{t-1}`` for every ``t``: ``(h0, hs[0], ..., hs[T-2])``."""
    return jnp.concatenate([h0[None], hs[:-1]], axis=0)


# Sequential: lax.scan forward, one reverse lax.scan backward.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sequential(a, b, h0, unroll):
    return _sequential_forward(a, b, h0, unroll)


def _sequential_forward(a, b, h0, unroll):
    if a.ndim == b.ndim:  # time-varying (_prepare squeezes a leading unit time axis)

        def step(h, ab):
            h = ab[0] * h + ab[1]
            return h, h

        return jax.lax.scan(step, h0, (a, b), unroll=unroll)[1]

    def step_invariant(h, b_t):  # time-invariant a, closed over
        h = a * h + b_t
        return h, h

    return jax.lax.scan(step_invariant, h0, b, unroll=unroll)[1]


def _sequential_fwd(a, b, h0, unroll):
    hs = _sequential_forward(a, b, h0, unroll)
    return hs, (a, hs, h0)


def _sequential_bwd(unroll, residuals, g):
    a, hs, h0 = residuals
    # dh_t = g_t + a_{t+1} dh_{t+1}: the carry c holds a_{t+1} dh_{t+1}.
    if a.ndim == hs.ndim:

        def step(c, ga):
            dh = ga[0] + c
            return ga[1] * dh, dh

        c, dh = jax.lax.scan(step, jnp.zeros_like(h0), (g, a), reverse=True, unroll=unroll)
    else:

        def step_invariant(c, g_t):
            dh = g_t + c
            return a * dh, dh

        c, dh = jax.lax.scan(step_invariant, jnp.zeros_like(h0), g, reverse=True, unroll=unroll)
    da = _unbroadcast(dh * _shift_in(h0, hs), a.shape)
    return da, dh, c


_sequential.defvjp(_sequential_fwd, _sequential_bwd)


# Associative: lax.associative_scan forward, one reverse associative scan backward.


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def _solve_associative(a, b, h0, reverse=False):
    first = 0 if not reverse else -1
    b = b.at[first].add(a[first] * h0)
    return jax.lax.associative_scan(_combine, (a, b), reverse=reverse, axis=0)[1]


@jax.custom_vjp
def _associative(a, b, h0):
    return _solve_associative(a, b, h0)


def _associative_fwd(a, b, h0):
    hs = _solve_associative(a, b, h0)
    return hs, (a, hs, h0)


def _associative_bwd(residuals, g):
    a, hs, h0 = residuals
    # dh_t = g_t + a_{t+1} dh_{t+1}: a reverse recurrence with coefficients shifted by one step.
    a_next = jnp.concatenate([a[1:], jnp.zeros_like(a[:1])], axis=0)
    dh = _solve_associative(a_next, g, jnp.zeros_like(h0), reverse=True)
    return dh * _shift_in(h0, hs), dh, a[0] * dh[0]


_associative.defvjp(_associative_fwd, _associative_bwd)


# Log space: forward and backward both as cumulative log-sum-exps.


def _log_or_neg_inf(x: Array) -> Array:
    """``log(x)`` where ``x > 0``, ``-inf`` elsewhere (no NaN, and no gradient through the masked branch)."""
    positive = x > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, x, jnp.ones_like(x))), jnp.full_like(x, -jnp.inf))


def _log_signed(a, b, h0):
    """Log-space solve for positive ``a`` and signed ``b``: ``h = h(b⁺) - h(b⁻)`` by linearity in ``b``."""
    log_a = jnp.log(a)
    zeros = jnp.zeros_like(h0)
    return _log_scan(log_a, _log_or_neg_inf(b), h0) - _log_scan(log_a, _log_or_neg_inf(-b), zeros)


def _cumulative(x: Array, combine, init: float, reverse: bool) -> Array:
    """Cumulative ``combine`` over axis 0 as one sequential ``lax.scan`` (CPU: XLA's CPU lowering of
    ``lax.cumsum``/``lax.cumlogsumexp`` builds a log-depth tree of slices that measured 4–50× slower)."""

    def step(acc, x_t):
        acc = combine(acc, x_t)
        return acc, acc

    return jax.lax.scan(step, jnp.full(x.shape[1:], init, x.dtype), x, reverse=reverse)[1]


def _cumsum(x: Array, reverse: bool = False) -> Array:
    if jax.default_backend() == "cpu":
        return _cumulative(x, jnp.add, 0.0, reverse)
    return jax.lax.cumsum(x, axis=0, reverse=reverse)


def _cumlogsumexp(x: Array, reverse: bool = False) -> Array:
    if jax.default_backend() == "cpu":
        return _cumulative(x, jnp.logaddexp, -jnp.inf, reverse)
    return jax.lax.cumlogsumexp(x, axis=0, reverse=reverse)


def _log_forward(log_a, log_b, h0):
    cum_a = _cumsum(log_a)  # (T, *S) A_t = Σ_{s≤t} log a_s
    acc = _cumlogsumexp(log_b - cum_a)  # (T, *S) log Σ_{s≤t} b_s / (a_1 ... a_s)
    return jnp.exp(cum_a) * h0 + jnp.exp(cum_a + acc)


@jax.custom_vjp
def _log_scan(log_a, log_b, h0):
    return _log_forward(log_a, log_b, h0)


def _log_scan_fwd(log_a, log_b, h0):
    hs = _log_forward(log_a, log_b, h0)
    return hs, (log_a, log_b, hs, h0)


def _log_scan_bwd(residuals, g):
    log_a, log_b, hs, h0 = residuals
    # dh_t = Σ_{u≥t} (A_u / A_t) g_u, with g split by sign so that each half stays in log space.
    cum_a = _cumsum(log_a)
    pos = _cumlogsumexp(cum_a + _log_or_neg_inf(g), reverse=True)
    neg = _cumlogsumexp(cum_a + _log_or_neg_inf(-g), reverse=True)
    dh = jnp.exp(pos - cum_a) - jnp.exp(neg - cum_a)  # (T, *S)
    d_log_b = dh * jnp.exp(log_b)  # ∂h_t/∂log b_t = b_t
    d_log_a = dh * jnp.exp(log_a) * _shift_in(h0, hs)  # ∂h_t/∂log a_t = a_t h_{t-1}
    return d_log_a, d_log_b, jnp.exp(log_a[0]) * dh[0]


_log_scan.defvjp(_log_scan_fwd, _log_scan_bwd)
