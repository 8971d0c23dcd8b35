"""Native CPU kernels for the LSTM and reset-after GRU recurrences, called through XLA's FFI.

``lax.scan`` on XLA's CPU backend pays a fixed cost per step that, for an LSTM of a few hundred units, is already
larger than PyTorch's whole step. The kernels in ``csrc/`` run the recurrence itself in C++ (the weights packed
once per call into panels, the gate math fused into the recurrent matmul, AVX-512, AVX2 + FMA or a portable build
chosen at run time, threads over batch rows); the large matmuls of training (weight and input gradients) stay in
XLA. The library is built by ``pip install`` (scikit-build-core and CMake, ``CMakeLists.txt``); when no C++ compiler
was present it is absent and everything runs on the pure-JAX path. :func:`status` says which path is active and why.

The LSTM (plain, with or without bias: no peepholes, no projection) and the reset-after GRU use the kernels in
``unroll`` and in ``cell.step`` when all of these hold at trace time:

* the library loaded and its handlers registered (:func:`available`);
* they are switched on: environment variable ``RNNJAX_NATIVE`` is not ``0`` and :func:`set_enabled` /
  :func:`use_native` did not turn them off;
* JAX's default backend is the CPU (GPU and TPU never see them);
* the parameters, inputs, carry and compute dtype are all float32.

The switch and the thread count are read when a function is traced: a function jitted before the change keeps the
path it was compiled with.

Both paths give the same numbers to float32 rounding (``tests/test_native.py`` checks values and every gradient to
1e-5 against the pure-JAX path over odd shapes, under ``jit``, ``vmap`` and ``grad``). Shapes below use one
flattened batch axis ``N``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib.util
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.kernels import gated
from rnnjax.types import Array

LIBRARY_MODULE = "rnnjax.kernels._native"
"""The native library's module name: ``rnnjax/kernels/_native.so``, loaded with ctypes, never imported."""

TARGETS = (
    "rnnjax_lstm_forward",
    "rnnjax_lstm_forward_train",
    "rnnjax_lstm_forward_projected",
    "rnnjax_lstm_forward_projected_train",
    "rnnjax_lstm_backward",
    "rnnjax_gru_forward",
    "rnnjax_gru_forward_train",
    "rnnjax_gru_backward",
)
ISAS = ("portable", "avx2", "avx512")


@dataclasses.dataclass(frozen=True)
class _Library:
    handle: ctypes.CDLL | None
    path: str | None
    reason: str  # why it is unavailable ("" when loaded)


_lock = threading.Lock()
_library: _Library | None = None
_enabled: bool = os.environ.get("RNNJAX_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")
_threads: int | None = None
_projection: bool | None = None
_UNPACKED_ROW_STEPS = 8  # kUnpackedRowSteps in csrc/rnn_kernels_impl.inc: up to this, no packing, one thread


def _library_path() -> str | None:
    override = os.environ.get("RNNJAX_NATIVE_LIBRARY")
    if override:
        return override
    spec = importlib.util.find_spec(LIBRARY_MODULE)
    return None if spec is None else spec.origin


def _load() -> _Library:
    global _library
    with _lock:
        if _library is not None:
            return _library
        path = _library_path()
        if path is None or not os.path.exists(path):
            _library = _Library(
                None,
                path,
                "the native library rnnjax/kernels/_native.so was not built (no C++ compiler or no XLA FFI "
                "headers when rnnjax was installed; reinstall with g++ or clang++ on the PATH to build it)",
            )
            return _library
        try:
            handle = ctypes.CDLL(path)
            for name in ("rnnjax_native_isa", "rnnjax_native_best_isa"):
                getattr(handle, name).restype = ctypes.c_char_p
            handle.rnnjax_native_set_isa.argtypes = [ctypes.c_int]
            for name in TARGETS:
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(handle, name)), platform="cpu")
        except (OSError, AttributeError, RuntimeError, ValueError) as error:
            _library = _Library(None, path, f"loading {path} failed: {error}")
            return _library
        _library = _Library(handle, path, "")
        return _library


def available() -> bool:
    """Whether the native library is built, loaded and registered with XLA."""
    return _load().handle is not None


def enabled() -> bool:
    """Whether the kernels are available and switched on (they still run only on the CPU backend)."""
    return _enabled and available()


def set_enabled(flag: bool) -> None:
    """Switches the native kernels on or off for functions traced from now on (``RNNJAX_NATIVE=0`` starts off)."""
    global _enabled
    if not isinstance(flag, bool):
        raise TypeError(f"flag must be a bool, got {flag!r}")
    _enabled = flag


@contextlib.contextmanager
def use_native(flag: bool = True):
    """Context manager: trace with the native kernels switched on (or off, with ``False``), then restore."""
    global _enabled
    previous = _enabled
    set_enabled(flag)
    try:
        yield
    finally:
        _enabled = previous


def threads() -> int:
    """Threads a kernel call uses: :func:`set_threads`, else ``RNNJAX_NATIVE_THREADS``, else the usable cores."""
    if _threads is not None:
        return _threads
    value = os.environ.get("RNNJAX_NATIVE_THREADS")
    if value:
        return max(1, int(value))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(count: int | None) -> None:
    """Sets the threads per kernel call (``None``: back to the default). Threads split the batch rows."""
    global _threads
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"count must be a positive int or None, got {count!r}")
    _threads = count


def isa() -> str | None:
    """The instruction set the kernels run with (``"avx512"``, ``"avx2"``, ``"portable"``), or None."""
    handle = _load().handle
    return None if handle is None else handle.rnnjax_native_isa().decode()


def best_isa() -> str | None:
    """The widest instruction set this CPU runs, or None when the library is unavailable."""
    handle = _load().handle
    return None if handle is None else handle.rnnjax_native_best_isa().decode()


def set_isa(name: str | None) -> None:
    """Runs the kernels with instruction set ``name`` (one this CPU supports), or the best one for ``None``.

    Takes effect at once, also for compiled functions (the choice is made inside the kernel). For tests and
    benchmarks of the narrower paths.
    """
    handle = _load().handle
    if handle is None:
        raise RuntimeError(f"the native kernels are unavailable: {_load().reason}")
    name = best_isa() if name is None else name
    if name not in ISAS:
        raise ValueError(f"name must be one of {ISAS} or None, got {name!r}")
    if handle.rnnjax_native_set_isa(ISAS.index(name)) != 0:
        raise ValueError(f"this CPU cannot run {name!r}; the widest it runs is {best_isa()!r}")


def status() -> str:
    """One line saying which path the LSTM and GRU take on this machine, and why."""
    library = _load()
    if library.handle is None:
        return f"native CPU kernels unavailable: {library.reason}; the LSTM and GRU run on the pure-JAX path"
    if not _enabled:
        return "native CPU kernels switched off (RNNJAX_NATIVE=0 or set_enabled(False)); pure-JAX path"
    backend = jax.default_backend()
    where = "" if backend == "cpu" else f" (not used now: the default backend is {backend})"
    return f"native CPU kernels active: {isa()} instruction set, {threads()} thread(s), {library.path}{where}"


def applies(*arrays) -> bool:
    """Whether a call with these arrays (and ``None``s) takes the native path when traced now (not for empty
    arrays: an empty batch has nothing to compute)."""
    if not enabled() or jax.default_backend() != "cpu":
        return False
    return all(a is None or (jnp.dtype(a.dtype) == jnp.float32 and a.size > 0) for a in arrays)


# ----------------------------------------------------------------------------------------------------- FFI calls


def _call(target: str, results: list[tuple[tuple[int, ...], type]], *args, thread_count: int):
    if not available():  # also registers the handlers on first use
        raise RuntimeError(f"the native kernels are unavailable: {_load().reason}")
    shapes = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in results]
    return jax.ffi.ffi_call(target, shapes, vmap_method="sequential")(*args, threads=np.int64(thread_count))


def _mask(mask: Array | None, T: int, N: int) -> Array:
    return jnp.ones((T, N), bool) if mask is None else mask.astype(bool)


def _weight_grads(inputs: Array, h_prev: Array, d_in: Array, d_rec: Array, w_ih: Array):
    """``dW_ih = X^T D_in``, ``dW_hh = H_prev^T D_rec`` and ``dX = D_in W_ih^T`` as single large matmuls.

    The operands are flattened to ``(T*N, .)`` matrices first: XLA:CPU copies ``(T, N, G)`` operands into
    another layout for a two-axis contraction (measured 19.5 against 15.3 ms at T=128, N=32, I=64, H=256).
    """
    T, N, G = d_in.shape
    d_in2, d_rec2 = d_in.reshape(T * N, G), d_rec.reshape(T * N, G)  # (T*N, G)
    d_w_ih = inputs.reshape(T * N, -1).T @ d_in2  # (I, G)
    d_w_hh = h_prev.reshape(T * N, -1).T @ d_rec2  # (H, G)
    d_xs = (d_in2 @ w_ih.T).reshape(T, N, -1)  # (T, N, I)
    return d_w_ih, d_w_hh, d_xs


def projects_inputs(T: int, N: int, I: int, H: int) -> bool:
    """Whether the LSTM kernel gets its input part ``x W_ih + b`` projected beforehand by one XLA matmul over all
    ``T * N`` rows (then each step multiplies only ``h W_hh``), rather than multiplying ``[x_t, h] [W_ih; W_hh]``
    step by step. :func:`set_projection` overrides the choice.

    Projecting pays at one or two rows (``N <= 2``): each step is then bound by reading the weights, and it reads
    ``W_hh`` alone instead of ``[W_ih; W_hh]``. From four rows on the step is bound by its multiply-adds, and the
    projection's ``(T, N, 4H)`` buffer costs more than it saves. A streaming step (``T * N <= 8``) never
    projects: an extra XLA operation costs more than its matmul.
    """
    del I, H  # measured at I=64 and H=64, 256, 1024: the batch decides
    if _projection is not None:
        return _projection
    return N <= 2 and T * N > _UNPACKED_ROW_STEPS


def set_projection(flag: bool | None) -> None:
    """Forces the LSTM's input projection before the kernel on (``True``) or off (``False``) for functions traced
    from now on; ``None``: chosen by shape (:func:`projects_inputs`). For tests and benchmarks."""
    global _projection
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"flag must be a bool or None, got {flag!r}")
    _projection = flag


def _lstm_forward(w_ih, w_hh, b, xs, h0, c0, mask, thread_count, project, *, train: bool):
    """The forward kernel: ``(ys, h_T, c_T)``, and with ``train`` also the activated gates ``(T, N, 4H)`` and the
    carry entering each step ``h_prev``, ``c_prev`` ``(T, N, H)`` that the backward kernel reads. With ``project``
    the input part ``x W_ih + b`` is one XLA matmul first and the kernel adds its rows to ``h W_hh``."""
    T, N, I, H = xs.shape[0], xs.shape[1], xs.shape[2], h0.shape[-1]
    f32 = jnp.float32
    results = [((T, N, H), f32), ((N, H), f32), ((N, H), f32)]
    if train:
        results += [((T, N, 4 * H), f32), ((T, N, H), f32), ((T, N, H), f32)]
    mask = _mask(mask, T, N)
    if project:
        zx = xs.reshape(T * N, I) @ w_ih  # (T*N, 4H)
        zx = (zx if b is None else zx + b).reshape(T, N, 4 * H)
        target = "rnnjax_lstm_forward_projected_train" if train else "rnnjax_lstm_forward_projected"
        return _call(target, results, zx, w_hh, h0, c0, mask, thread_count=thread_count)
    bias = jnp.zeros((4 * H,), f32) if b is None else b
    target = "rnnjax_lstm_forward_train" if train else "rnnjax_lstm_forward"
    return _call(target, results, xs, w_ih, w_hh, bias, h0, c0, mask, thread_count=thread_count)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _lstm(w_ih, w_hh, b, xs, h0, c0, mask, thread_count, project):
    ys, h_T, c_T = _lstm_forward(w_ih, w_hh, b, xs, h0, c0, mask, thread_count, project, train=False)
    return (h_T, c_T), ys


def _lstm_fwd(w_ih, w_hh, b, xs, h0, c0, mask, thread_count, project):
    ys, h_T, c_T, gates, h_prev, c_prev = _lstm_forward(
        w_ih, w_hh, b, xs, h0, c0, mask, thread_count, project, train=True
    )
    return ((h_T, c_T), ys), (w_ih, w_hh, b, xs, mask, gates, h_prev, c_prev)


def _lstm_bwd(thread_count, project, residuals, cotangents):
    del project  # the input part's gradient is dz either way
    w_ih, w_hh, b, xs, mask, gates, h_prev, c_prev = residuals
    (d_hT, d_cT), dys = cotangents
    T, N, H = h_prev.shape
    f32 = jnp.float32
    dz, dh0, dc0, d_b = _call(
        "rnnjax_lstm_backward",
        [((T, N, 4 * H), f32), ((N, H), f32), ((N, H), f32), ((4 * H,), f32)],
        w_hh,
        gates,
        c_prev,
        dys,
        d_hT,
        d_cT,
        _mask(mask, T, N),
        thread_count=thread_count,
    )
    d_w_ih, d_w_hh, d_xs = _weight_grads(xs, h_prev, dz, dz, w_ih)
    return d_w_ih, d_w_hh, None if b is None else d_b, d_xs, dh0, dc0, None


_lstm.defvjp(_lstm_fwd, _lstm_bwd)


def _gru_forward(w_ih, w_hh, b_ih, b_hh, xs, h0, mask, thread_count, *, train: bool):
    """The forward kernel: ``(ys, h_T)``, and with ``train`` also ``r, z, n, h W_hn + b_hn`` ``(T, N, 4H)`` and
    the carry entering each step ``h_prev`` ``(T, N, H)`` that the backward kernel reads."""
    T, N, H = xs.shape[0], xs.shape[1], h0.shape[-1]
    f32 = jnp.float32
    results = [((T, N, H), f32), ((N, H), f32)]
    if train:
        results += [((T, N, 4 * H), f32), ((T, N, H), f32)]
    zeros = jnp.zeros((3 * H,), f32)
    biases = (zeros if b_ih is None else b_ih, zeros if b_hh is None else b_hh)
    target = "rnnjax_gru_forward_train" if train else "rnnjax_gru_forward"
    return _call(target, results, xs, w_ih, w_hh, *biases, h0, _mask(mask, T, N), thread_count=thread_count)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _gru(w_ih, w_hh, b_ih, b_hh, xs, h0, mask, thread_count):
    ys, h_T = _gru_forward(w_ih, w_hh, b_ih, b_hh, xs, h0, mask, thread_count, train=False)
    return h_T, ys


def _gru_fwd(w_ih, w_hh, b_ih, b_hh, xs, h0, mask, thread_count):
    ys, h_T, acts, h_prev = _gru_forward(w_ih, w_hh, b_ih, b_hh, xs, h0, mask, thread_count, train=True)
    return (h_T, ys), (w_ih, w_hh, b_ih, b_hh, xs, mask, acts, h_prev)


def _gru_bwd(thread_count, residuals, cotangents):
    w_ih, w_hh, b_ih, b_hh, xs, mask, acts, h_prev = residuals
    d_hT, dys = cotangents
    T, N, H = h_prev.shape
    f32 = jnp.float32
    d_gi, d_gh, dh0, d_b_ih, d_b_hh = _call(
        "rnnjax_gru_backward",
        [((T, N, 3 * H), f32), ((T, N, 3 * H), f32), ((N, H), f32), ((3 * H,), f32), ((3 * H,), f32)],
        w_hh,
        acts,
        h_prev,
        dys,
        d_hT,
        _mask(mask, T, N),
        thread_count=thread_count,
    )
    d_w_ih, d_w_hh, d_xs = _weight_grads(xs, h_prev, d_gi, d_gh, w_ih)
    return d_w_ih, d_w_hh, None if b_ih is None else d_b_ih, None if b_hh is None else d_b_hh, d_xs, dh0, None


_gru.defvjp(_gru_fwd, _gru_bwd)


# ---------------------------------------------------------------------------------------------- cell entry points


@jax.named_scope("rnnjax.native_lstm_sequence")
def lstm_sequence(params, carry, xs: Array, mask: Array | None):
    """The plain LSTM over time-major ``xs`` ``(T, *B, I)`` on the native kernel; contract of ``masked_scan``.

    Returns ``(carry, ys)`` with ``ys`` ``(T, *B, H)``.
    """
    xs, flat, flat_mask, batch_shape = gated.flatten_batch(xs, carry, mask)
    T, N, I = xs.shape
    project = projects_inputs(T, N, I, flat.c.shape[-1])
    (h_T, c_T), ys = _lstm(
        params["w_ih"], params["w_hh"], params.get("b"), xs, flat.h, flat.c, flat_mask, threads(), project
    )
    ys, final = gated.unflatten_batch(ys, type(carry)(h=h_T, c=c_T), batch_shape)
    return final, ys


@jax.named_scope("rnnjax.native_gru_sequence")
def gru_sequence(params, carry, xs: Array, mask: Array | None):
    """The reset-after GRU over time-major ``xs`` ``(T, *B, I)`` on the native kernel; contract of ``masked_scan``."""
    xs, flat, flat_mask, batch_shape = gated.flatten_batch(xs, carry, mask)
    h_T, ys = _gru(
        params["w_ih"], params["w_hh"], params.get("b_ih"), params.get("b_hh"), xs, flat.h, flat_mask, threads()
    )
    ys, final = gated.unflatten_batch(ys, type(carry)(h=h_T), batch_shape)
    return final, ys
