"""A cell fed one token at a time, from host memory, at the lowest latency this host allows.

``jax.jit(cell.step)`` is the general way to stream, and it is what every cell, device and dtype supports. On a
CPU a jitted call carries a fixed dispatch cost of its own, about 10 µs for the six arrays of an LSTM step
(measured on an AMD EPYC core, 2026-12-06), which is as much as the step's arithmetic at a few hundred units.
:class:`Streamer` removes it where it can: for the plain float32 LSTM and the reset-after GRU on the CPU, with the
native kernels built and switched on (:mod:`rnnjax.kernels.native`), each :meth:`Streamer.step` calls the
kernel's streaming step directly on NumPy buffers it owns, through ``ctypes``. Every other cell, option, dtype or
backend runs ``jax.jit(cell.step)``. Both give ``cell.step``'s numbers to float32 rounding (tested).

A streamer holds a copy of the parameters taken when it was made and the carry between calls::

    streamer = rnnjax.Streamer(cell, params, batch_shape=(1,))
    for frame in frames:                      # each (1, I), e.g. audio features
        y = streamer.step(frame)              # NumPy (1, H)
    carry = streamer.carry                    # the cell's carry, as JAX arrays
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import _checks
from rnnjax.cells.base import batch_shape_tuple
from rnnjax.cells.gru import GRU
from rnnjax.cells.lstm import LSTM
from rnnjax.kernels import native
from rnnjax.protocol import SequenceCore
from rnnjax.types import Params

_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_int64
_LSTM_ARGTYPES = [_SIZE] * 3 + [_POINTER] * 9 + [_SIZE]
_GRU_ARGTYPES = [_SIZE] * 3 + [_POINTER] * 8 + [_SIZE]


def _host(array, shape: tuple[int, ...]) -> np.ndarray:
    """A C-contiguous float32 NumPy copy of ``array`` with ``shape``."""
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32).reshape(shape))


def _pointer(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


class Streamer:
    """Runs ``cell`` one step per call on host inputs, keeping the carry between calls.

    Args:
        cell: Any rnnjax cell, or a layer that streams (``Stack``; not ``Bidirectional``).
        params: The cell's parameters (copied: later changes to ``params`` do not reach the streamer).
        batch_shape: The batch axes of each input, e.g. ``()`` for single vectors ``(I,)`` or ``(1,)`` for
            ``(1, I)``.
        carry: The carry to start from (default ``cell.initial_carry(batch_shape)``); leaves ``(*batch_shape, .)``
            as ``cell.initial_carry`` makes them.

    Attributes:
        native: Whether steps run on the native kernel without JAX dispatch (see the module docstring);
            otherwise on ``jax.jit(cell.step)``.

    A streamer is one stream's state: it is not safe to call one streamer from several threads at once.
    """

    def __init__(self, cell: SequenceCore, params: Params, batch_shape: Sequence[int] | int = (), carry=None):
        if not isinstance(cell, SequenceCore):
            raise TypeError(f"cell must be an rnnjax cell or layer, got {type(cell).__name__}")
        if not cell.can_stream:
            raise ValueError(f"cell {type(cell).__name__} cannot stream: it has no step for one element at a time")
        self.cell = cell
        self.params = jax.tree.map(jnp.asarray, params)  # a copy of NumPy leaves: later changes do not reach it
        self.batch_shape = batch_shape_tuple(batch_shape)
        self.input_size = int(cell.input_size(params))
        self._x_shape = (*self.batch_shape, self.input_size)
        self._initial = cell.initial_carry(self.batch_shape)
        start = self._checked_carry(carry)
        x_example = jnp.zeros(self._x_shape, jnp.float32)
        # The cell's own checks of params, carry and input, without running a step.
        _, y_shape = jax.eval_shape(cell.step, self.params, start, x_example)
        self._y_shape = tuple(y_shape.shape)
        self.native = isinstance(cell, (LSTM, GRU)) and bool(cell._native(self.params, start, x_example))
        if self.native and not hasattr(native._load().handle, "rnnjax_lstm_step"):
            self.native = False  # a library built from an older rnnjax: it has no streaming entry points
        if self.native:
            self._prepare_native(start)
        else:
            self._step = jax.jit(cell.step)
            self._carry = start

    # ------------------------------------------------------------------------------------------------ public

    def step(self, x) -> np.ndarray:
        """Feeds one input ``x`` ``(*batch_shape, I)`` (NumPy or JAX, real numbers; cast to float32 on the native
        path) and returns the cell's output ``(*batch_shape, O)`` as a new NumPy array."""
        if not hasattr(x, "dtype"):
            x = np.asarray(x)
        if np.shape(x) != self._x_shape:
            raise ValueError(
                f"x must have shape {self._x_shape} (batch_shape {self.batch_shape} + (input_size "
                f"{self.input_size},)), got {np.shape(x)}"
            )
        if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
            raise TypeError(f"x must hold real numbers, got dtype {x.dtype}")  # bfloat16 is floating, not kind "f"
        if not self.native:
            self._carry, y = self._step(self.params, self._carry, jnp.asarray(x))
            return np.asarray(y)
        np.copyto(self._x, np.asarray(x).reshape(self._x.shape), casting="unsafe")
        status = self._kernel(*self._arguments[self._current])
        if status != 0:
            raise RuntimeError(f"the native streaming step failed (status {status}: out of memory?)")
        self._current ^= 1
        return self._h[self._current].reshape(self._y_shape).copy()

    @property
    def carry(self):
        """The carry after the last step, as the cell's carry type of JAX arrays."""
        if not self.native:
            return self._carry
        fields = {"h": self._h[self._current]}
        if isinstance(self.cell, LSTM):
            fields["c"] = self._c[self._current]
        return type(self._initial)(**{k: jnp.asarray(v.reshape(self._y_shape)) for k, v in fields.items()})

    def reset(self, carry=None) -> None:
        """Starts again from ``carry`` (default: ``cell.initial_carry(batch_shape)``)."""
        start = self._checked_carry(carry)
        if self.native:
            self._load_carry(start)
        else:
            self._carry = start

    # ----------------------------------------------------------------------------------------------- private

    def _checked_carry(self, carry):
        if carry is None:
            return self._initial
        _checks.check_carry(carry, self._initial)
        return jax.tree.map(lambda leaf, ref: jnp.asarray(leaf, ref.dtype), carry, self._initial)

    def _prepare_native(self, start) -> None:
        """Host copies of the weights, two carry buffers used in turn, and the kernel's argument lists."""
        params, H, I = self.params, self.cell.hidden_size, self.input_size
        N = math.prod(self.batch_shape)
        is_lstm = isinstance(self.cell, LSTM)
        G = (4 if is_lstm else 3) * H
        w_ih, w_hh = _host(params["w_ih"], (I, G)), _host(params["w_hh"], (H, G))
        if is_lstm:
            biases = [_host(params["b"], (G,)) if "b" in params else np.zeros(G, np.float32)]
        else:
            biases = [_host(params[k], (G,)) if k in params else np.zeros(G, np.float32) for k in ("b_ih", "b_hh")]
        self._x = np.zeros((N, I), np.float32)
        self._mask = np.ones(N, np.bool_)
        self._h = [np.zeros((N, H), np.float32) for _ in range(2)]
        self._c = [np.zeros((N, H), np.float32) for _ in range(2)] if is_lstm else []
        self._weights = [w_ih, w_hh, *biases]  # kept alive: the argument lists hold their addresses
        handle = native._load().handle
        kernel = handle.rnnjax_lstm_step if is_lstm else handle.rnnjax_gru_step
        kernel.argtypes = _LSTM_ARGTYPES if is_lstm else _GRU_ARGTYPES
        kernel.restype = ctypes.c_int
        self._kernel = kernel
        weights = [_pointer(w) for w in self._weights]
        threads = native.threads()
        self._arguments = []
        for current in (0, 1):
            other = 1 - current
            if is_lstm:
                carry_in = [_pointer(self._h[current]), _pointer(self._c[current]), _pointer(self._mask)]
                carry_out = [_pointer(self._h[other]), _pointer(self._c[other])]
            else:
                carry_in = [_pointer(self._h[current]), _pointer(self._mask)]
                carry_out = [_pointer(self._h[other])]
            self._arguments.append((N, I, H, _pointer(self._x), *weights, *carry_in, *carry_out, threads))
        self._load_carry(start)

    def _load_carry(self, carry) -> None:
        self._current = 0
        N = self._x.shape[0]
        np.copyto(self._h[0], np.asarray(carry.h, np.float32).reshape(N, -1))
        if self._c:
            np.copyto(self._c[0], np.asarray(carry.c, np.float32).reshape(N, -1))

    def __repr__(self) -> str:
        path = "native kernel" if self.native else "jax.jit(cell.step)"
        return f"Streamer({self.cell!r}, batch_shape={self.batch_shape}, {path})"
