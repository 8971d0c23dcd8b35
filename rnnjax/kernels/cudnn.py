"""The LSTM on cuDNN, through ``jax.experimental.rnn``, on CUDA GPUs.

cuDNN runs a whole LSTM sequence, forward and backward, as one fused library call. ``jax.experimental.rnn.lstm``
exposes it (a ``custom_vjp`` over the ``rnn_fwd`` / ``rnn_bwd`` primitives, lowered for CUDA only: there is no
CPU or TPU lowering). This module maps rnnjax's LSTM onto it:

* the parameters are packed, differentiably, into cuDNN's flat weight vector (:func:`pack_weights`), so
  gradients flow back to ``w_ih``, ``w_hh`` and ``b``;
* the batch axes are flattened to one axis ``N``, and each row's ``seq_length`` is read off the mask;
* rows of length 0 are run for one step (cuDNN fails on a zero length, jax issue 17966), then given back their
  initial carry and zero outputs;
* outputs past each row's length are zero, and the final carry is the carry after each row's last valid step,
  exactly as :func:`rnnjax.masked_scan`;
* the matmuls run in full float32 (``precision=HIGHEST``: cuDNN's FMA math, no TF32).

Only the LSTM: ``jax.experimental.rnn`` drives cuDNN in its ``CUDNN_LSTM`` mode alone (its cuDNN descriptor
fixes the cell mode; there is no GRU, no plain RNN). The GRU keeps its pure-JAX path on GPUs.

The plain LSTM (``peepholes=False``, no ``proj_size``; with or without bias) takes this path in ``unroll``,
:class:`rnnjax.Bidirectional` and :class:`rnnjax.Stack` when all of these hold at trace time:

* JAX's default backend is a CUDA GPU and jaxlib has its CUDA RNN kernels (:func:`available`);
* the mode is ``"auto"`` or ``"always"`` (:func:`set_mode`, :func:`use_mode`, environment variable
  ``RNNJAX_CUDNN``; ``"never"`` switches it off);
* parameters, inputs, carry and compute dtype are float32 (cuDNN's RNN descriptor here is float32 only);
* ``T`` and the batch are not empty, and ``remat`` is unset (with ``remat`` the LSTM steps with
  :func:`rnnjax.masked_scan`, whatever the backend);
* the mask gives each row a prefix of valid steps (what :func:`rnnjax.unroll` always passes; see
  :func:`lstm_sequence`).

Mode ``"always"`` raises a ``RuntimeError`` naming every reason that keeps a call off cuDNN, instead of falling
back. ``cell.step`` never uses cuDNN: one step is a few small matmuls, and a cuDNN call costs a descriptor setup
and a device-to-host copy of the sequence lengths each time. :func:`status` says whether the path is active.

Under ``jax.vmap`` the cuDNN calls run once per mapped element (``jax.custom_batching.sequential_vmap``: the
primitives have no batching rule of their own), as the native CPU kernels do.

Shapes below: ``N`` the flattened batch, ``G = 4H``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import typing
import warnings
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import rnn as jax_rnn

from rnnjax import _checks
from rnnjax.kernels import gated, native
from rnnjax.types import Array, Params
from rnnjax.unrolling import time_mask

Mode = Literal["auto", "never", "always"]
MODES: tuple[str, ...] = typing.get_args(Mode)
ENVIRONMENT_VARIABLE = "RNNJAX_CUDNN"
PRECISION = jax.lax.Precision.HIGHEST
"""cuDNN math in full float32: ``jax.experimental.rnn`` maps HIGHEST to ``CUDNN_FMA_MATH`` (no TF32)."""

_OFF_WORDS = ("0", "false", "off", "no")


def _parse_mode(value: str | None) -> Mode:
    """The mode an ``RNNJAX_CUDNN`` value names: ``auto`` (also unset), ``never`` (also 0/false/off/no), ``always``."""
    word = (value or "auto").strip().lower()
    if word in _OFF_WORDS:
        return "never"
    if word not in MODES:
        warnings.warn(
            f"{ENVIRONMENT_VARIABLE}={value!r} is not one of {MODES}; the cuDNN LSTM path stays in mode 'auto'",
            stacklevel=2,
        )
        return "auto"
    return typing.cast(Mode, word)


_mode: Mode = _parse_mode(os.environ.get(ENVIRONMENT_VARIABLE))


# -------------------------------------------------------------------------------------------------- the switch


@functools.cache
def _has_cuda_rnn_kernels() -> bool:
    """Whether jaxlib's GPU plugin brought the cuDNN RNN kernels (the workspace-size query exists only then)."""
    gpu_rnn = getattr(jax_rnn, "gpu_rnn", None)
    return gpu_rnn is not None and hasattr(gpu_rnn, "compute_rnn_workspace_reserve_space_sizes")


def _platform_problems() -> list[str]:
    """Why this process cannot run cuDNN's LSTM now, whatever the call (empty when it can).

    Tests replace this function to run the wrapper on the CPU with a reference in place of the primitives.
    """
    problems = []
    backend = jax.default_backend()
    if backend != "gpu":
        problems.append(f"the default backend is {backend}")
    elif "rocm" in str(getattr(jax.devices()[0].client, "platform_version", "")).lower():
        problems.append("the GPU runs ROCm (MIOpen orders the LSTM gates differently; only CUDA is supported)")
    if not _has_cuda_rnn_kernels():
        problems.append("jaxlib has no CUDA RNN kernels (install jax[cuda12] for cuDNN)")
    return problems


def available() -> bool:
    """Whether cuDNN's LSTM can run here: the default backend is a CUDA GPU and jaxlib has the kernels."""
    return not _platform_problems()


def mode() -> Mode:
    """The current mode: ``"auto"``, ``"never"`` or ``"always"``."""
    return _mode


def set_mode(new_mode: Mode) -> None:
    """Sets the mode for functions traced from now on.

    Args:
        new_mode: ``"auto"``: cuDNN wherever it applies, else the other paths; ``"never"``: never cuDNN;
            ``"always"``: every LSTM sequence must run on cuDNN, else ``RuntimeError`` naming why not.
    """
    global _mode
    _checks.check_choice(new_mode, MODES, "mode")
    _mode = new_mode


@contextlib.contextmanager
def use_mode(new_mode: Mode):
    """Context manager: trace with the cuDNN path in ``new_mode``, then restore the previous mode."""
    previous = _mode
    set_mode(new_mode)
    try:
        yield
    finally:
        set_mode(previous)


def enabled() -> bool:
    """Whether the path is available and its mode is not ``"never"``."""
    return _mode != "never" and available()


def set_enabled(flag: bool) -> None:
    """``set_mode("auto")`` for ``True``, ``set_mode("never")`` for ``False`` (as :func:`native.set_enabled`)."""
    if not isinstance(flag, bool):
        raise TypeError(f"flag must be a bool, got {flag!r}")
    set_mode("auto" if flag else "never")


def _other_path() -> str:
    if jax.default_backend() == "cpu" and native.enabled():
        return "the native CPU kernel (rnnjax.kernels.native)"
    return "the pure-JAX path (rnnjax.kernels.gated, or masked_scan)"


def status() -> str:
    """One line saying whether the LSTM runs on cuDNN here, and if not, why not and what runs instead."""
    if _mode == "never":
        return (
            f"cuDNN LSTM path switched off (mode 'never': {ENVIRONMENT_VARIABLE}=never or set_mode('never')); "
            f"the LSTM runs on {_other_path()}"
        )
    problems = _platform_problems()
    if problems:
        return f"cuDNN LSTM path unavailable: {'; '.join(problems)}; the LSTM runs on {_other_path()}"
    return (
        f"cuDNN LSTM path active (mode {_mode!r}): plain float32 LSTMs run on cuDNN through jax.experimental.rnn "
        "in full float32 (no TF32)"
    )


def call_problems(cell, params: Params, carry, xs: Array, mask: Array | None, *, remat=False) -> list[str]:
    """Why this call of ``cell.sequence`` cannot run on cuDNN (empty when it can), machine reasons first.

    Args:
        cell: the :class:`rnnjax.LSTM`.
        params, carry, xs, mask: as :meth:`rnnjax.LSTM.sequence` receives them; ``xs`` ``(T, *B, I)``.
        remat: ``sequence``'s ``remat``.
    """
    problems = _platform_problems()
    if cell.peepholes:
        problems.append("the LSTM has peepholes")
    if cell.proj_size is not None:
        problems.append("the LSTM has an output projection (proj_size)")
    if remat is not False:
        problems.append("remat is set (the LSTM then steps with masked_scan)")
    dtypes = {jnp.dtype(cell.compute_dtype(params))}
    dtypes |= {jnp.dtype(leaf.dtype) for leaf in (xs, *jax.tree.leaves(carry), *jax.tree.leaves(params))}
    if dtypes != {jnp.dtype(jnp.float32)}:
        names = ", ".join(sorted(str(d) for d in dtypes))
        problems.append(f"cuDNN takes float32 alone (compute dtype, parameters, inputs, carry), got {names}")
    if xs.shape[0] == 0:
        problems.append("the sequence is empty (T = 0)")
    if math.prod(xs.shape[1:-1]) == 0:
        problems.append("the batch is empty")
    known_mask = _known_mask(mask)
    if known_mask is not None and known_mask.size and not _is_prefix_mask(known_mask.reshape(xs.shape[0], -1)):
        problems.append("the mask is not a prefix of valid steps in every row (cuDNN takes sequence lengths)")
    return problems


def applies(cell, params: Params, carry, xs: Array, mask: Array | None, *, remat=False) -> bool:
    """Whether this call of ``cell.sequence`` runs on cuDNN, by the mode.

    Raises:
        RuntimeError: mode ``"always"`` and the call cannot run on cuDNN; the message names every reason.
    """
    if _mode == "never" or (_mode == "auto" and _platform_problems()):
        return False
    problems = call_problems(cell, params, carry, xs, mask, remat=remat)
    if problems and _mode == "always":
        raise RuntimeError(
            f"the cuDNN LSTM path is forced (mode 'always') but cannot run: {'; '.join(problems)}. "
            f"Use set_mode('auto') or {ENVIRONMENT_VARIABLE}=auto to fall back to the other paths"
        )
    return not problems


# ------------------------------------------------------------------------------------------ weights and masks


def pack_weights(params: Params) -> Array:
    """rnnjax's LSTM parameters as cuDNN's flat weight vector, differentiably.

    cuDNN's layout for one unidirectional layer (``jax.experimental.rnn.unpack_lstm_weights``) is
    ``[W_ih (G, I), W_hh (G, H), b_ih (G,), b_hh (G,)]``, each flattened row-major, gate blocks ``i, f, g, o``:
    the order rnnjax uses. rnnjax's kernels are the transposes; its single bias ``b`` (PyTorch's
    ``b_ih + b_hh``) goes to ``b_ih`` and ``b_hh`` is zero, so ``b``'s gradient is ``b_ih``'s. Without a bias
    both are zero constants.

    Args:
        params: ``w_ih`` ``(I, G)``, ``w_hh`` ``(H, G)``, optional ``b`` ``(G,)``.

    Returns:
        ``(G * (I + H + 2),)``.
    """
    w_ih, w_hh = params["w_ih"], params["w_hh"]  # (I, G), (H, G)
    zeros = jnp.zeros((w_hh.shape[-1],), w_hh.dtype)  # (G,)
    b_ih = params.get("b", zeros)  # (G,)
    return jnp.concatenate([w_ih.T.reshape(-1), w_hh.T.reshape(-1), b_ih, zeros])


def _known_mask(mask: Array | None) -> np.ndarray | None:
    """The mask's values when known while tracing (a concrete array), else ``None`` (traced, also by vmap)."""
    if mask is None or isinstance(mask, jax.core.Tracer):
        return None
    return np.asarray(mask, bool)


def _is_prefix_mask(mask: np.ndarray) -> bool:
    """Whether every row of ``mask`` ``(T, N)`` is ``True`` for ``t < length`` and ``False`` after."""
    lengths = mask.sum(axis=0)  # (N,)
    return bool(np.array_equal(mask, np.arange(mask.shape[0])[:, None] < lengths))


def _raise_unless_prefix(mask: np.ndarray) -> None:
    if not _is_prefix_mask(np.asarray(mask, bool)):
        raise ValueError(
            "mask must be a prefix of valid steps in every row (True for t < length, then False) on the cuDNN "
            "LSTM path, which takes sequence lengths; rnnjax.unroll always passes one. For other masks call "
            "sequence under rnnjax.kernels.cudnn.use_mode('never')"
        )


def _sequence_lengths(mask: Array | None, T: int, N: int) -> Array:
    """Each row's length ``(N,)`` int32 from a prefix mask ``(T, N)``.

    Masks reaching ``sequence`` are prefixes (``t < length``): :func:`rnnjax.unroll` builds them with
    :func:`rnnjax.unrolling.time_mask`, and :class:`rnnjax.Bidirectional` and :class:`rnnjax.Stack` pass them
    on unchanged (rnnjax.protocol.SequenceCore.sequence states it). A caller of ``sequence`` may still pass
    another mask: a known one keeps the call off cuDNN (:func:`call_problems`); a traced one is compared on the
    device and, if it is not a prefix, fails the computation with a ``ValueError`` message
    (:func:`rnnjax._checks.checked_at_run_time`) rather than silently counting its steps.
    """
    if mask is None:
        return jnp.full((N,), T, jnp.int32)
    steps = mask.astype(jnp.int32)  # (T, N)
    known = _known_mask(mask)
    if known is not None:
        _raise_unless_prefix(known)
    else:
        lengths = jnp.sum(steps, axis=0, dtype=jnp.int32)  # (N,)
        not_prefix = jnp.any(mask != time_mask(lengths, T))
        steps = _checks.checked_at_run_time(steps, not_prefix, _raise_unless_prefix)
    return jnp.sum(steps, axis=0, dtype=jnp.int32)  # (N,)


# ------------------------------------------------------------------------------------------ the cuDNN kernels


def _cudnn_forward(xs_bm: Array, h0: Array, c0: Array, weights: Array, seq_lengths: Array):
    """cuDNN's training forward pass (``jax.experimental.rnn.lstm_fwd``) for one layer, one direction.

    Args:
        xs_bm: ``(N, T, I)`` batch-major inputs.
        h0, c0: ``(1, N, H)``.
        weights: :func:`pack_weights`.
        seq_lengths: ``(N,)`` int32, each in ``[1, T]``.

    Returns:
        ``((ys (N, T, H), h_n (1, N, H), c_n (1, N, H)), residuals)``, the residuals opaque (cuDNN's reserve
        space among them).
    """
    return jax_rnn.lstm_fwd(
        xs_bm,
        h0,
        c0,
        weights,
        seq_lengths,
        input_size=xs_bm.shape[-1],
        hidden_size=h0.shape[-1],
        num_layers=1,
        dropout=0.0,
        bidirectional=False,
        precision=PRECISION,
    )


def _cudnn_backward(residuals, cotangents):
    """cuDNN's backward pass (``jax.experimental.rnn.lstm_bwd``): ``(dxs_bm, dh0, dc0, dweights)``."""
    xs_bm, h0 = residuals[0], residuals[1]
    input_size, hidden_size = xs_bm.shape[-1], h0.shape[-1]
    grads = jax_rnn.lstm_bwd(input_size, hidden_size, 1, 0.0, False, PRECISION, residuals, cotangents)
    return grads[:4]  # the fifth is seq_lengths' (zeros)


# The primitives have no batching rule: under vmap each mapped element is one cuDNN call. The module-level
# functions are looked up at call time, so tests can stand a reference in for them.
_forward_per_element = jax.custom_batching.sequential_vmap(lambda *args: _cudnn_forward(*args))
_backward_per_element = jax.custom_batching.sequential_vmap(lambda *args: _cudnn_backward(*args))


@jax.custom_vjp
def _cudnn_lstm(xs_bm: Array, h0: Array, c0: Array, weights: Array, seq_lengths: Array):
    """``(ys (N, T, H), h_n (1, N, H), c_n (1, N, H))`` of cuDNN's LSTM; differentiable in all but seq_lengths."""
    outputs, _ = _forward_per_element(xs_bm, h0, c0, weights, seq_lengths)
    return outputs


def _cudnn_lstm_fwd(xs_bm, h0, c0, weights, seq_lengths):
    outputs, residuals = _forward_per_element(xs_bm, h0, c0, weights, seq_lengths)
    return outputs, (seq_lengths, residuals)


def _cudnn_lstm_bwd(saved, cotangents):
    seq_lengths, residuals = saved
    d_xs, d_h0, d_c0, d_weights = _backward_per_element(residuals, cotangents)
    # Padding steps have no effect: their input gradient is zero whatever cuDNN leaves there.
    valid = time_mask(seq_lengths, d_xs.shape[1]).T  # (N, T)
    d_xs = jnp.where(valid[..., None], d_xs, jnp.zeros_like(d_xs))  # (N, T, I)
    return d_xs, d_h0, d_c0, d_weights, None


_cudnn_lstm.defvjp(_cudnn_lstm_fwd, _cudnn_lstm_bwd)


# ------------------------------------------------------------------------------------------ cell entry point


@jax.named_scope("rnnjax.cudnn_lstm_sequence")
def lstm_sequence(params: Params, carry, xs: Array, mask: Array | None):
    """The plain LSTM over time-major ``xs`` ``(T, *B, I)`` on cuDNN; contract of :func:`rnnjax.masked_scan`.

    Args:
        params: ``w_ih`` ``(I, G)``, ``w_hh`` ``(H, G)``, optional ``b`` ``(G,)``, float32.
        carry: ``LSTMState(h, c)``, leaves ``(*B, H)``.
        xs: ``(T, *B, I)`` with ``T >= 1`` and a non-empty batch.
        mask: ``(T, *B)`` booleans, a prefix of ``True`` per row, or ``None``.

    Returns:
        ``(final_carry, ys)``: ``ys`` ``(T, *B, H)``, zero past each row's length; the carry after each row's
        last valid step (the initial carry for a row of length 0).
    """
    xs, flat, flat_mask, batch_shape = gated.flatten_batch(xs, carry, mask)  # (T, N, I), (N, H), (T, N)
    T, N = xs.shape[0], xs.shape[1]
    lengths = _sequence_lengths(flat_mask, T, N)  # (N,)
    seq_lengths = jnp.maximum(lengths, 1)  # (N,); a zero length makes cuDNN fail (jax issue 17966)
    ys, h_n, c_n = _cudnn_lstm(
        jnp.swapaxes(xs, 0, 1),  # (N, T, I)
        flat.h[None],  # (1, N, H)
        flat.c[None],  # (1, N, H)
        pack_weights(params),
        seq_lengths,
    )
    ys = jnp.swapaxes(ys, 0, 1)  # (T, N, H)
    h_T, c_T = h_n[0], c_n[0]  # (N, H)
    if mask is not None:
        valid = time_mask(lengths, T)  # (T, N)
        ys = jnp.where(valid[..., None], ys, jnp.zeros_like(ys))  # also the step run for a length-0 row
        empty = (lengths == 0)[:, None]  # (N, 1)
        h_T = jnp.where(empty, flat.h, h_T)  # (N, H)
        c_T = jnp.where(empty, flat.c, c_T)  # (N, H)
    ys, final = gated.unflatten_batch(ys, type(carry)(h=h_T, c=c_T), batch_shape)
    return final, ys
