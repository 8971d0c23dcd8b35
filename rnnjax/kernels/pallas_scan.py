"""A chunked Pallas kernel for the linear recurrence ``h_t = a_t ⊙ h_{t-1} + b_t``.

What :func:`solve` computes, time-major and elementwise over the state axes ``(*S)``::

    h = h0
    for t in range(T):
        h = a[t] * h + b[t]
        hs[t] = h

Layout. The state axes are flattened to one axis of ``S`` lanes and padded to a multiple of the block size
``K`` (a power of two); the grid has one program per block of ``K`` lanes, and the programs are independent (the
recurrence is elementwise). Inside a program the time axis, padded to a multiple of the chunk size ``C`` (a power
of two), is walked chunk by chunk: a ``fori_loop`` over chunks carries the running state ``(K,)`` from one chunk
to the next, and within a chunk the ``C`` steps are unrolled, each loading one ``(K,)`` row of ``a`` and ``b`` and
storing one row of ``h``. Every load and store is a power-of-two ``(K,)`` vector, as the Triton lowering needs.
Padding is inert: padded steps come after the real ones with ``b = 0`` (and ``a = 1`` where ``a`` varies in time),
padded lanes have ``a = 1``, ``b = h0 = 0``; both are sliced off, so their cotangents are zero.

Backward pass (a ``jax.custom_vjp``). With ``g_t`` the cotangent of ``hs[t]`` and ``λ_t = ∂L/∂h_t`` accumulated
backwards,

.. math::
    λ_t = g_t + a_{t+1} λ_{t+1}, \\qquad ∂L/∂a_t = λ_t h_{t-1}, \\qquad ∂L/∂b_t = λ_t, \\qquad
    ∂L/∂h_0 = a_1 λ_1,

the first of which is itself a linear recurrence, run backwards in time by the same kernel (its "adjoint" walk
keeps ``c = a_{t+1} λ_{t+1}`` as the carry). For complex arrays these are JAX's cotangents (transposes, no
conjugates), as in the sequential solver's backward pass. A time-invariant ``a`` (any shape that broadcasts
against the state, e.g. the LRU's ``(N,)``) is passed to the kernel as one ``(1, S)`` row, never materialised over
time; its gradient is ``Σ_t λ_t h_{t-1}``, and the reduction over the axes it was broadcast along is done by JAX's
own transpose of the ``broadcast_to`` in front of the kernel.

Dtypes. Real ``float32`` and ``float64``, and complex ``complex64`` / ``complex128`` (the LRU), the latter by
splitting every complex array into real and imaginary parts and doing the complex product in real arithmetic
inside the kernel (Triton has no complex type). Anything else (16-bit floats, integers) raises ``ValueError``:
:func:`rnnjax.linear_recurrence.linear_scan` and the cells promote 16-bit inputs to float32 before they get here.

Compiled or interpreted (:func:`interpret_mode`). On a GPU the kernel is compiled through Pallas's Triton
lowering. Everywhere else (CPU; also TPU, whose Mosaic lowering this kernel was not written for) it runs in
Pallas interpret mode, which turns the kernel into an ordinary XLA program: correct, but slower than the
``"sequential"`` solver. ``RNNJAX_PALLAS_INTERPRET=1`` forces interpret mode (``=0`` forces compilation); it is
read when a function is traced, so a jitted function keeps the mode of its first trace.

**Not run on a GPU.** This project has no GPU: the kernel is tested in interpret mode on CPU only, and its Triton
lowering has been checked only by lowering (not compiling or running) for ``cuda`` from a CPU machine. Its speed
on a GPU has not been measured, which is why it is not a default of :func:`rnnjax.linear_recurrence.default_method`.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from rnnjax import _checks
from rnnjax.types import Array

CHUNK_SIZE = 8
"""Steps per chunk ``C``: unrolled inside the kernel's loop over chunks (a power of two). Not tuned on a GPU; in
interpret mode the compile time grows with it (about 0.5 s at 8, 1 s at 16 for a forward and backward pair)."""

BLOCK_SIZE = 128
"""State lanes per program ``K`` (a power of two); smaller states use the next power of two above their size."""

INTERPRET_ENV = "RNNJAX_PALLAS_INTERPRET"
"""Environment variable: ``1`` forces interpret mode, ``0`` forces compilation, unset or empty: by backend."""

SUPPORTED_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.float64, jnp.complex64, jnp.complex128))


class KernelConfig(NamedTuple):
    """The static configuration of one kernel launch (hashable: a ``custom_vjp`` non-differentiable argument)."""

    chunk: int  # C: steps per chunk, a power of two
    block: int  # K: lanes per program, a power of two
    interpret: bool  # run in Pallas interpret mode instead of compiling


def interpret_mode(backend: str | None = None) -> bool:
    """Whether the kernel runs in Pallas interpret mode.

    Args:
        backend: ``"cpu"``, ``"gpu"``, ``"tpu"``, ...; ``None`` means ``jax.default_backend()``.

    Returns:
        ``True`` if ``RNNJAX_PALLAS_INTERPRET=1``, ``False`` if it is ``0``; otherwise ``True`` on every backend
        but ``"gpu"`` (where the kernel is compiled through the Triton lowering).
    """
    forced = os.environ.get(INTERPRET_ENV, "").strip()
    if forced not in ("", "0", "1"):
        raise ValueError(f"{INTERPRET_ENV} must be 0 or 1 (or unset), got {forced!r}")
    if forced:
        return forced == "1"
    backend = jax.default_backend() if backend is None else backend
    return backend != "gpu"


@jax.named_scope("rnnjax.pallas_scan")
def solve(
    a: Array,
    b: Array,
    h0: Array,
    *,
    chunk_size: int = CHUNK_SIZE,
    block_size: int = BLOCK_SIZE,
    interpret: bool | None = None,
) -> Array:
    """Solves ``h_t = a_t ⊙ h_{t-1} + b_t`` over the leading (time) axis with the Pallas kernel.

    Args:
        a: coefficients ``(T, *S)``, or any shape that broadcasts against ``b`` (a time-invariant ``(*S)``-like
            array such as ``(N,)`` or ``(1, *S)``); the same dtype as ``b``.
        b: inputs ``(T, *S)``: float32, float64, complex64 or complex128.
        h0: initial state ``(*S)``, the same dtype as ``b``.
        chunk_size: steps per chunk ``C`` (a power of two); a sequence shorter than ``C`` uses the next power of
            two above ``T``.
        block_size: state lanes per program ``K`` (a power of two); a smaller state uses the next power of two
            above its size.
        interpret: run in Pallas interpret mode; ``None``: :func:`interpret_mode`.

    Returns:
        ``hs`` ``(T, *S)`` in ``b``'s dtype: ``hs[t] = h_{t+1}`` in the recurrence's one-based numbering.

    Raises:
        ValueError: for another dtype, mismatched dtypes or shapes, or a size that is not a power of two.

    Example:
        >>> hs = rnnjax.kernels.pallas_scan.solve(jnp.full((5, 3), 0.5), jnp.ones((5, 3)), jnp.zeros(3))
        >>> hs[:, 0]
        Array([1.    , 1.5   , 1.75  , 1.875 , 1.9375], dtype=float32)
    """
    _check_inputs(a, b, h0, chunk_size, block_size)
    num_steps, state_shape = b.shape[0], b.shape[1:]
    size = math.prod(state_shape)
    if num_steps == 0 or size == 0:
        return jnp.zeros(b.shape, b.dtype)
    config = KernelConfig(
        chunk=min(chunk_size, pl.next_power_of_2(num_steps)),
        block=min(block_size, pl.next_power_of_2(size)),
        interpret=interpret_mode() if interpret is None else bool(interpret),
    )
    padded_steps = _round_up(num_steps, config.chunk)
    padded_size = _round_up(size, config.block)
    if _is_time_invariant(a, b):
        a_state = a[0] if a.ndim == b.ndim else a
        a_rows = jnp.broadcast_to(a_state, state_shape).reshape(1, size)  # (1, S)
        a_rows = _pad(a_rows, 1, padded_size, 1)  # (1, S')
    else:
        a_rows = jnp.broadcast_to(a, b.shape).reshape(num_steps, size)  # (T, S)
        a_rows = _pad(a_rows, padded_steps, padded_size, 1)  # (T', S')
    b_rows = _pad(b.reshape(num_steps, size), padded_steps, padded_size, 0)  # (T', S')
    h0_row = _pad(h0.reshape(1, size), 1, padded_size, 0)  # (1, S')
    hs = _scan(config, a_rows, b_rows, h0_row)  # (T', S')
    return hs[:num_steps, :size].reshape(b.shape)  # (T, *S)


# The custom VJP, on padded (rows, lanes) arrays: a (T', S') or (1, S'), b (T', S'), h0 (1, S').


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(config: KernelConfig, a: Array, b: Array, h0: Array) -> Array:
    return _launch(config, a, b, h0)


def _scan_fwd(config, a, b, h0):
    hs = _launch(config, a, b, h0)  # (T', S')
    return hs, (a, hs, h0)


def _scan_bwd(config, residuals, g):
    a, hs, h0 = residuals
    lam = _launch(config, a, g, None)  # (T', S') λ_t = g_t + a_{t+1} λ_{t+1}
    h_prev = jnp.concatenate([h0, hs[:-1]], axis=0)  # (T', S') h_{t-1}
    da = lam * h_prev  # (T', S')
    if a.shape[0] == 1:  # time-invariant: one coefficient per lane for every step
        da = jnp.sum(da, axis=0, keepdims=True)  # (1, S')
    dh0 = a[:1] * lam[:1]  # (1, S') a_1 λ_1
    return da, lam, dh0


_scan.defvjp(_scan_fwd, _scan_bwd)


# The kernel.


def _launch(config: KernelConfig, a: Array, b: Array, h0: Array | None) -> Array:
    """One ``pallas_call``: the forward walk from ``h0``, or, when ``h0`` is ``None``, the adjoint walk.

    The adjoint walk runs backwards in time with the carry ``c`` (zero at the end)::

        for t in reversed(range(T)):
            out[t] = b[t] + c      # λ_t = g_t + a_{t+1} λ_{t+1}
            c = a[t] * out[t]      # a_t λ_t, the next (earlier) step's carry
    """
    padded_steps, padded_size = b.shape
    complex_ = jnp.issubdtype(b.dtype, jnp.complexfloating)
    parts = _split if complex_ else (lambda x: (x,))
    a_parts, b_parts = parts(a), parts(b)
    h0_parts = () if h0 is None else parts(h0)
    time_invariant = a.shape[0] == 1 and padded_steps != 1
    rows = pl.BlockSpec((padded_steps, config.block), lambda i: (0, i))  # (T', K) of (T', S')
    row = pl.BlockSpec((1, config.block), lambda i: (0, i))  # (1, K) of (1, S')
    a_spec = row if time_invariant else rows
    kernel = functools.partial(
        _kernel,
        num_parts=len(b_parts),
        chunk=config.chunk,
        num_chunks=padded_steps // config.chunk,
        time_invariant=time_invariant,
        adjoint=h0 is None,
    )
    real = b_parts[0].dtype
    out = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((padded_steps, padded_size), real) for _ in b_parts],
        grid=(padded_size // config.block,),
        in_specs=[a_spec] * len(a_parts) + [rows] * len(b_parts) + [row] * len(h0_parts),
        out_specs=[rows] * len(b_parts),
        interpret=config.interpret,
        compiler_params=None if config.interpret else pl_triton.CompilerParams(num_warps=4, num_stages=1),
        name="rnnjax_linear_scan_adjoint" if h0 is None else "rnnjax_linear_scan",
    )(*a_parts, *b_parts, *h0_parts)
    return jax.lax.complex(*out) if complex_ else out[0]


def _kernel(*refs, num_parts: int, chunk: int, num_chunks: int, time_invariant: bool, adjoint: bool):
    """One program: ``K`` lanes, all ``T'`` steps, walked in ``num_chunks`` chunks of ``chunk`` steps.

    ``refs`` are ``a``, ``b``, ``h0`` (absent in the adjoint walk) and the output, each as ``num_parts`` refs
    (1 for real, 2 for complex: real and imaginary parts); ``a`` is ``(1, K)`` or ``(T', K)``, ``b`` and the
    output ``(T', K)``, ``h0`` ``(1, K)``.
    """
    p = num_parts
    a_refs, b_refs = refs[:p], refs[p : 2 * p]
    h0_refs = () if adjoint else refs[2 * p : 3 * p]
    out_refs = refs[-p:]
    a_fixed = tuple(ref[0, :] for ref in a_refs) if time_invariant else None  # (K,) per part

    def walk_chunk(index, carry):  # carry: the running state (K,) per part, handed from chunk to chunk
        first = (num_chunks - 1 - index if adjoint else index) * chunk
        for step in range(chunk):  # unrolled
            t = first + (chunk - 1 - step if adjoint else step)
            a_t = a_fixed if time_invariant else tuple(ref[t, :] for ref in a_refs)  # (K,) per part
            b_t = tuple(ref[t, :] for ref in b_refs)  # (K,) per part
            if adjoint:
                h = _add(b_t, carry)  # λ_t = g_t + c
                carry = _mul(a_t, h)  # c = a_t λ_t
            else:
                h = carry = _add(_mul(a_t, carry), b_t)  # h_t = a_t h_{t-1} + b_t
            for ref, value in zip(out_refs, h):
                ref[t, :] = value
        return carry

    if adjoint:
        init = tuple(jnp.zeros(ref.shape[1:], ref.dtype) for ref in b_refs)  # (K,) per part
    else:
        init = tuple(ref[0, :] for ref in h0_refs)  # (K,) per part
    jax.lax.fori_loop(0, num_chunks, walk_chunk, init)


def _add(x: tuple, y: tuple) -> tuple:
    return tuple(u + v for u, v in zip(x, y))


def _mul(x: tuple, y: tuple) -> tuple:
    """Elementwise product of two real ``(v,)`` or complex ``(re, im)`` values, in real arithmetic."""
    if len(x) == 1:
        return (x[0] * y[0],)
    (x_re, x_im), (y_re, y_im) = x, y
    return (x_re * y_re - x_im * y_im, x_re * y_im + x_im * y_re)


# Plumbing.


def _split(x: Array) -> tuple[Array, Array]:
    return jnp.real(x), jnp.imag(x)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(x: Array, rows: int, lanes: int, value: float) -> Array:
    """Pads ``(r, s)`` to ``(rows, lanes)`` with ``value`` at the end of both axes."""
    widths = ((0, rows - x.shape[0]), (0, lanes - x.shape[1]))
    if widths == ((0, 0), (0, 0)):
        return x
    return jnp.pad(x, widths, constant_values=jnp.asarray(value, x.dtype))


def _is_time_invariant(a: Array, b: Array) -> bool:
    """Whether ``a`` carries no time axis: fewer axes than ``b``, or a leading axis of 1 against ``T > 1``."""
    return a.ndim < b.ndim or (a.shape[0] == 1 and b.shape[0] != 1)


def _check_inputs(a: Array, b: Array, h0: Array, chunk_size: int, block_size: int) -> None:
    dtype = jnp.dtype(b.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"method='pallas' solves float32, float64, complex64 or complex128, got {dtype}; promote the inputs "
            "(rnnjax.linear_recurrence.linear_scan solves 16-bit inputs in float32) or use method='sequential'"
        )
    if jnp.dtype(a.dtype) != dtype or jnp.dtype(h0.dtype) != dtype:
        raise ValueError(f"method='pallas' needs a, b and h0 of one dtype, got {a.dtype}, {b.dtype}, {h0.dtype}")
    if b.ndim < 1:
        raise ValueError(f"b must be (time, *state), got shape {b.shape}")
    _checks.check_broadcasts_to(a, b, "a", "b")
    if h0.shape != b.shape[1:]:
        raise ValueError(f"h0 must have shape {b.shape[1:]} (b without its time axis), got {h0.shape}")
    for name, value in (("chunk_size", chunk_size), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value!r}")
