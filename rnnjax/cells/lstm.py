"""Long short-term memory (Hochreiter & Schmidhuber 1997; forget gate, Gers et al. 2000)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax import _checks
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
from rnnjax.kernels import cudnn, gated, native
from rnnjax.precision import matmul
from rnnjax.types import Array, DType, Params, PRNGKey
from rnnjax.unrolling import masked_scan


class LSTMState(NamedTuple):
    """Carry of :class:`LSTM`."""

    h: Array  # (*B, P) output state (P = proj_size, or H without projection)
    c: Array  # (*B, H) cell state; float32 under bfloat16 compute


@register_cell("lstm")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LSTM(Cell):
    """LSTM with a forget gate, optional peepholes and an optional output projection.

    Gates are stacked in PyTorch's order ``i, f, g, o``:

    .. math::
        [i, f, g, o] &= x_t W_{ih} + h_{t-1} W_{hh} + b \\\\
        i &= \\sigma(i + w_{ci} \\odot c_{t-1}), \\quad f = \\sigma(f + w_{cf} \\odot c_{t-1}),
            \\quad g = \\tanh(g) \\\\
        c_t &= f \\odot c_{t-1} + i \\odot g \\\\
        o &= \\sigma(o + w_{co} \\odot c_t), \\qquad h_t = (o \\odot \\tanh(c_t))\\, W_{hr}

    (peephole terms ``w_c*`` only with ``peepholes=True``; ``W_hr`` only with ``proj_size``.) ``y_t = h_t``.

    Parameters (``I`` inputs, ``H`` hidden, ``P`` = ``proj_size`` or ``H``)::

        w_ih: (I, 4H)   input kernel, gate blocks i, f, g, o
        w_hh: (P, 4H)   recurrent kernel (each gate block orthogonal by default)
        b:    (4H,)     bias; the f block starts at forget_bias (PyTorch's b_ih + b_hh)
        w_ci, w_cf, w_co: (H,)   peephole weights (peepholes=True)
        w_hr: (H, P)    projection (proj_size set)

    Attributes:
        hidden_size: ``H``.
        forget_bias: initial value of the forget-gate bias (default 1.0, Jozefowicz et al. 2015).
        peepholes: add the diagonal peephole connections of Gers & Schmidhuber (2000).
        proj_size: if set, ``h`` is projected to this size, as PyTorch's ``proj_size``.
        use_bias: whether ``b`` exists.
        kernel_init / recurrent_init: initialiser name or callable for ``w_ih`` (and ``w_hr``) / ``w_hh``.
        param_dtype: dtype of the parameters ``init`` creates.
        dtype: compute dtype of the matmuls (``None``: the parameters' dtype). Matmuls accumulate in float32
            and the gates and the cell state ``c`` are computed in float32 under bfloat16.
    """

    hidden_size: int
    forget_bias: float = 1.0
    peepholes: bool = False
    proj_size: int | None = None
    use_bias: bool = True
    kernel_init: InitializerName | Initializer = "glorot_uniform"
    recurrent_init: InitializerName | Initializer = "orthogonal"
    param_dtype: DType = jnp.float32
    dtype: DType | None = None

    def __post_init__(self):
        self.check_hyperparameters()
        _checks.check_positive_int(self.proj_size, "proj_size", allow_none=True)

    @property
    def output_size(self) -> int:
        return self.proj_size or self.hidden_size

    def init(self, key: PRNGKey, input_size: int) -> Params:
        _checks.check_positive_int(input_size, "input_size")
        k_ih, k_hh, k_hr = jax.random.split(key, 3)
        H, P = self.hidden_size, self.output_size
        kernel_init = resolve_initializer(self.kernel_init, "kernel_init")
        recurrent_init = resolve_initializer(self.recurrent_init, "recurrent_init")
        params = {
            "w_ih": init_blocks(kernel_init, k_ih, input_size, H, 4, self.param_dtype),
            "w_hh": init_blocks(recurrent_init, k_hh, P, H, 4, self.param_dtype),
        }
        if self.use_bias:
            b = jnp.zeros((4, H), self.param_dtype).at[1].set(self.forget_bias)
            params["b"] = b.reshape(4 * H)
        if self.peepholes:
            for name in ("w_ci", "w_cf", "w_co"):
                params[name] = jnp.zeros((H,), self.param_dtype)
        if self.proj_size is not None:
            params["w_hr"] = kernel_init(k_hr, (H, P), self.param_dtype)
        return params

    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32) -> LSTMState:
        batch = batch_shape_tuple(batch_shape)
        return LSTMState(
            h=jnp.zeros((*batch, self.output_size), dtype),
            c=jnp.zeros((*batch, self.hidden_size), dtype),
        )

    def input_size(self, params: Params) -> int:
        return params["w_ih"].shape[0]

    output_field = "h"

    def recurrent_matrices(self, params: Params) -> dict[str, Array]:
        """The four gate blocks of ``w_hh``: ``w_hh/i``, ``w_hh/f``, ``w_hh/g``, ``w_hh/o``, each ``(P, H)``."""
        return dict(zip(("w_hh/i", "w_hh/f", "w_hh/g", "w_hh/o"), jnp.split(params["w_hh"], 4, axis=-1)))

    def step(self, params: Params, carry: LSTMState, x: Array) -> tuple[LSTMState, Array]:
        """One step: ``x`` ``(*B, I)`` -> ``(carry, y)``, ``y`` ``(*B, P)``.

        On the CPU the plain float32 LSTM runs this step on the native kernel (:mod:`rnnjax.kernels.native`).
        A single step never goes to cuDNN (:mod:`rnnjax.kernels.cudnn`): each cuDNN call sets up descriptors and
        copies the sequence lengths to the host, a fixed cost a step's few small matmuls cannot repay.
        """
        x = self.check_step_input(params, x, carry)
        if self._native(params, carry, x):
            carry, ys = native.lstm_sequence(params, carry, x[None], None)
            return carry, ys[0]
        dtype = self.compute_dtype(params)
        z = matmul(x, params["w_ih"], dtype) + matmul(carry.h, params["w_hh"], dtype)  # (*B, 4H)
        if self.use_bias:
            z = z + params["b"].astype(z.dtype)
        i, f, g, o = jnp.split(z, 4, axis=-1)  # each (*B, H)
        c_prev = carry.c.astype(z.dtype)  # (*B, H)
        if self.peepholes:
            i = i + params["w_ci"].astype(z.dtype) * c_prev
            f = f + params["w_cf"].astype(z.dtype) * c_prev
        c = jax.nn.sigmoid(f) * c_prev + jax.nn.sigmoid(i) * jnp.tanh(g)  # (*B, H)
        if self.peepholes:
            o = o + params["w_co"].astype(z.dtype) * c
        h = jax.nn.sigmoid(o) * jnp.tanh(c)  # (*B, H)
        if self.proj_size is not None:
            h = matmul(h, params["w_hr"], dtype)  # (*B, P)
        return keep_dtype(LSTMState(h=h, c=c), carry), h.astype(dtype)

    def sequence(
        self, params: Params, carry, xs: Array, mask: Array | None, *, unroll=1, remat=False, dropout_key=None
    ):
        """Whole-sequence fast path used by :func:`rnnjax.unroll`: time-major ``xs`` ``(T, *B, I)``.

        Without peepholes or projection it runs, in float32 on a CUDA GPU, cuDNN (:mod:`rnnjax.kernels.cudnn`;
        its mode ``"always"`` raises here when cuDNN cannot run), in float32 on the CPU the native kernel
        (:mod:`rnnjax.kernels.native`; ``unroll`` has no effect on either), else :mod:`rnnjax.kernels.gated`: one
        ``[x_t, h] @ [W_ih; W_hh]`` matmul per step (measured faster than hoisting the input projection on CPU)
        and a hand-written backward pass whose weight gradients are single large matmuls. Otherwise, or with
        ``remat``, it steps with :func:`rnnjax.masked_scan`. All give the same numbers (tested).
        """
        del dropout_key
        if cudnn.applies(self, params, carry, xs, mask, remat=remat):
            return cudnn.lstm_sequence(params, carry, xs, mask)
        if remat or self.peepholes or self.proj_size is not None or xs.shape[0] == 0:
            return masked_scan(self.step, params, carry, xs, mask, unroll=unroll, remat=remat)
        if self._native(params, carry, xs):
            return native.lstm_sequence(params, carry, xs, mask)
        return gated.lstm_sequence(self, params, carry, xs, mask, unroll=unroll)

    def _native(self, params: Params, carry, xs: Array) -> bool:
        """Whether the native CPU kernel serves these options, arrays and dtypes (see :mod:`rnnjax.kernels.native`)."""
        if self.peepholes or self.proj_size is not None or jnp.dtype(self.compute_dtype(params)) != jnp.float32:
            return False
        return native.applies(xs, *jax.tree.leaves(carry), *jax.tree.leaves(params))
