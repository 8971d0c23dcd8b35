"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): gates that do not read ``h``.

Both cells compute ``h_t = h_{t-1} + z_t ⊙ (v_t − h_{t-1})``, i.e. the linear recurrence
``h_t = (1 − z_t) ⊙ h_{t-1} + z_t ⊙ v_t`` whose coefficients depend on ``x_t`` only. So a whole sequence is
solved without stepping a cell: :meth:`sequence` (used by :func:`rnnjax.unroll`) projects the inputs and solves
the recurrence with one of the methods of :mod:`rnnjax.linear_recurrence`:

* ``"sequential"`` — a fused kernel: blocks of 64 steps, each block projects its inputs with one matmul, computes
  the gates for the whole block at once and runs the recurrence; the backward pass recomputes the block's
  projection and returns the weight gradient blockwise. Nothing of size ``(T, B, kH)`` besides the outputs is
  ever stored, which is what makes it fast on CPU (see ``docs/benchmarks.md``).
* ``"associative"`` — ``lax.associative_scan`` over ``(1 − z, z ⊙ v)``.
* ``"pallas"`` — the Pallas kernel of :mod:`rnnjax.kernels.pallas_scan` over ``(1 − z, z ⊙ v)`` (compiled on a
  GPU, interpreted elsewhere).
* ``"log"`` — the paper's log-space form: ``log(1 − z) = −softplus(k)``, ``log z = −softplus(−k)`` and
  ``log v = log g(ṽ)``; needs ``activation="g"`` so that ``v > 0``.

``activation`` is the candidate's activation: ``"g"`` (default; the paper's log-space form,
``g(x) = x + ½`` for ``x ≥ 0`` and ``σ(x)`` otherwise, which keeps ``v`` positive) or ``"identity"`` (the paper's
plain form, ``v = ṽ``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax import _checks, linear_recurrence
from rnnjax.cells.base import (
    Cell,
    Initializer,
    InitializerName,
    batch_shape_tuple,
    init_blocks,
    keep_dtype,
    resolve_initializer,
)
from rnnjax.cells.registry import register_cell
from rnnjax.kernels import minimal as minimal_kernel
from rnnjax.precision import matmul
from rnnjax.types import Array, DType, Params, PRNGKey

ACTIVATIONS = ("g", "identity")


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
    activation: Literal["g", "identity"] = "g"
    method: linear_recurrence.Method | None = None
    use_bias: bool = True
    kernel_init: InitializerName | Initializer = "glorot_uniform"
    param_dtype: DType = jnp.float32
    dtype: DType | None = None

    _blocks = 2
    _kind = "gru"

    def __post_init__(self):
        self.check_hyperparameters()
        _checks.check_choice(self.activation, ACTIVATIONS, "activation")
        if self.method is not None:
            _checks.check_choice(self.method, linear_recurrence.METHODS, "method")
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

    output_field = "h"

    def recurrent_matrices(self, params: Params) -> dict[str, Array]:
        """None: the gates read only the input, so no weight matrix maps the state to the next state."""
        del params
        return {}

    def step(self, params: Params, carry, x: Array):
        """One step: ``x`` ``(*B, I)``, ``carry.h`` ``(*B, H)`` -> ``(carry, y)``, ``y = h`` ``(*B, H)``."""
        x = self.check_step_input(params, x, carry)
        h_prev = carry.h
        proj = self._project(params, x, h_prev.dtype)  # (*B, kH)
        z, v = minimal_kernel.gate_and_candidate(self._kind, self.activation, proj, self.hidden_size)
        h = h_prev + z * (v - h_prev)  # (*B, H)
        return keep_dtype(self._state(h), carry), h.astype(self.compute_dtype(params))

    def sequence(
        self, params: Params, carry, xs: Array, mask: Array | None, *, unroll=1, remat=False, dropout_key=None
    ):
        """Whole-sequence fast path (see the module docstring); equals :meth:`step` under ``masked_scan``.

        Args:
            params: from :meth:`init`.
            carry: initial state, ``h`` ``(*B, H)``.
            xs: time-major inputs ``(T, *B, I)``.
            mask: ``(T, *B)`` booleans or ``None``.
            unroll: steps per iteration for the ``"sequential"`` method of :func:`rnnjax.linear_recurrence.linear_scan`
                when not fused; the fused kernel blocks by itself.
            remat: ignored: the fused kernel always recomputes the projection in the backward pass and the
                other methods store only ``(T, *B, H)``-sized coefficients.

        Returns:
            ``(carry, ys)`` with ``ys`` ``(T, *B, H)`` in the compute dtype.
        """
        del remat, dropout_key
        xs = _checks.as_float_array(xs, "xs")
        _checks.check_features(xs, self.input_size(params), "xs")
        h0 = carry.h
        num_steps, batch_shape = xs.shape[0], xs.shape[1:-1]
        method = self.method or linear_recurrence.default_method(num_steps)
        dtype = self.compute_dtype(params)
        H = self.hidden_size
        if num_steps == 0 or math.prod(batch_shape) == 0:  # nothing to run: the carry stays, no outputs
            return carry, jnp.zeros((num_steps, *batch_shape, H), dtype)
        if method == "sequential":
            n = 1
            for size in batch_shape:
                n *= size
            block = min(minimal_kernel.BLOCK_STEPS, max(num_steps, 1))
            cfg = minimal_kernel.FusedConfig(self._kind, self.activation, jnp.dtype(dtype), block)
            with jax.named_scope("rnnjax.minimal_fused_sequential"):
                h_last, ys = minimal_kernel.fused_sequential(
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
                log_a, log_b = minimal_kernel.log_coefficients(self._kind, proj, H)
                h_last, ys = linear_recurrence.masked_log_linear_scan(log_a, log_b, h0, mask)
            else:
                z, v = minimal_kernel.gate_and_candidate(self._kind, self.activation, proj, H)
                u = minimal_kernel.gate_logit(self._kind, proj, H)
                a = jax.nn.sigmoid(-u)  # 1 − z without the cancellation
                h_last, ys = linear_recurrence.masked_linear_scan(a, z * v, h0, mask, method, unroll=unroll)
        return keep_dtype(self._state(h_last), carry), ys.astype(dtype)


@register_cell("mingru")
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
            ``"associative"``, ``"log"`` (needs ``activation="g"``), ``"pallas"``; ``None``:
            :func:`rnnjax.linear_recurrence.default_method`.
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


@register_cell("minlstm")
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
