"""Gated recurrent unit (Cho et al. 2014), in both the reset-after and reset-before forms."""

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
from rnnjax.kernels import gated, native
from rnnjax.precision import matmul
from rnnjax.types import Array, DType, Params, PRNGKey
from rnnjax.unrolling import masked_scan


class GRUState(NamedTuple):
    """Carry of :class:`GRU`."""

    h: Array  # (*B, H) hidden state


@register_cell("gru")
@dataclasses.dataclass(frozen=True, kw_only=True)
class GRU(Cell):
    """GRU with gates in PyTorch's order ``r, z, n``.

    ``reset_after=True`` (default; PyTorch and cuDNN) applies the reset gate after the recurrent matmul,
    which is why it needs the separate hidden bias ``b_hn``:

    .. math::
        r &= \\sigma(x W_{ir} + b_{ir} + h W_{hr} + b_{hr}), \\quad
        z = \\sigma(x W_{iz} + b_{iz} + h W_{hz} + b_{hz}) \\\\
        n &= \\tanh(x W_{in} + b_{in} + r \\odot (h W_{hn} + b_{hn})) \\\\
        h_t &= (1 - z) \\odot n + z \\odot h_{t-1}

    ``reset_after=False`` is the original form of Cho et al. (2014), with the reset applied before the matmul:
    ``n = tanh(x W_in + b_in + (r ⊙ h) W_hn + b_hn)``. ``y_t = h_t``.

    Parameters (``I`` inputs, ``H`` hidden)::

        w_ih: (I, 3H)   input kernel, gate blocks r, z, n
        w_hh: (H, 3H)   recurrent kernel (each gate block orthogonal by default)
        b_ih: (3H,)     input bias
        b_hh: (3H,)     hidden bias (its n block is b_hn)

    Attributes:
        hidden_size: ``H``.
        reset_after: which form (see above).
        use_bias: whether ``b_ih`` and ``b_hh`` exist.
        kernel_init / recurrent_init: initialiser name or callable for ``w_ih`` / ``w_hh``.
        param_dtype: dtype of the parameters ``init`` creates.
        dtype: compute dtype of the matmuls (``None``: the parameters' dtype); gates in float32 under bf16.
    """

    hidden_size: int
    reset_after: bool = True
    use_bias: bool = True
    kernel_init: InitializerName | Initializer = "glorot_uniform"
    recurrent_init: InitializerName | Initializer = "orthogonal"
    param_dtype: DType = jnp.float32
    dtype: DType | None = None

    def __post_init__(self):
        self.check_hyperparameters()

    def init(self, key: PRNGKey, input_size: int) -> Params:
        _checks.check_positive_int(input_size, "input_size")
        k_ih, k_hh = jax.random.split(key)
        H = self.hidden_size
        params = {
            "w_ih": init_blocks(
                resolve_initializer(self.kernel_init, "kernel_init"), k_ih, input_size, H, 3, self.param_dtype
            ),
            "w_hh": init_blocks(
                resolve_initializer(self.recurrent_init, "recurrent_init"), k_hh, H, H, 3, self.param_dtype
            ),
        }
        if self.use_bias:
            params["b_ih"] = jnp.zeros((3 * H,), self.param_dtype)
            params["b_hh"] = jnp.zeros((3 * H,), self.param_dtype)
        return params

    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32) -> GRUState:
        return GRUState(h=jnp.zeros((*batch_shape_tuple(batch_shape), self.hidden_size), dtype))

    def input_size(self, params: Params) -> int:
        return params["w_ih"].shape[0]

    output_field = "h"

    def recurrent_matrices(self, params: Params) -> dict[str, Array]:
        """The three gate blocks of ``w_hh``: ``w_hh/r``, ``w_hh/z``, ``w_hh/n``, each ``(H, H)``."""
        return dict(zip(("w_hh/r", "w_hh/z", "w_hh/n"), jnp.split(params["w_hh"], 3, axis=-1)))

    def step(self, params: Params, carry: GRUState, x: Array) -> tuple[GRUState, Array]:
        """One step: ``x`` ``(*B, I)``, ``carry.h`` ``(*B, H)`` -> ``(carry, y)``, ``y`` ``(*B, H)``.

        On the CPU the float32 reset-after GRU runs this step on the native kernel (:mod:`rnnjax.kernels.native`).
        """
        x = self.check_step_input(params, x, carry)
        if self._native(params, carry, x):
            carry, ys = native.gru_sequence(params, carry, x[None], None)
            return carry, ys[0]
        dtype = self.compute_dtype(params)
        H = self.hidden_size
        h_prev = carry.h
        gi = matmul(x, params["w_ih"], dtype)  # (*B, 3H)
        if self.use_bias:
            gi = gi + params["b_ih"].astype(gi.dtype)
        i_r, i_z, i_n = jnp.split(gi, 3, axis=-1)  # each (*B, H)
        if self.reset_after:
            gh = matmul(h_prev, params["w_hh"], dtype)  # (*B, 3H)
            if self.use_bias:
                gh = gh + params["b_hh"].astype(gh.dtype)
            h_r, h_z, h_n = jnp.split(gh, 3, axis=-1)
            r = jax.nn.sigmoid(i_r + h_r)
            z = jax.nn.sigmoid(i_z + h_z)
            n = jnp.tanh(i_n + r * h_n)
        else:
            gh = matmul(h_prev, params["w_hh"][:, : 2 * H], dtype)  # (*B, 2H)
            if self.use_bias:
                gh = gh + params["b_hh"][: 2 * H].astype(gh.dtype)
            h_r, h_z = jnp.split(gh, 2, axis=-1)
            r = jax.nn.sigmoid(i_r + h_r)
            z = jax.nn.sigmoid(i_z + h_z)
            hn = matmul(r * h_prev.astype(r.dtype), params["w_hh"][:, 2 * H :], dtype)  # (*B, H)
            if self.use_bias:
                hn = hn + params["b_hh"][2 * H :].astype(hn.dtype)
            n = jnp.tanh(i_n + hn)
        h = (1.0 - z) * n + z * h_prev.astype(z.dtype)  # (*B, H)
        return keep_dtype(GRUState(h=h), carry), h.astype(dtype)

    def sequence(
        self, params: Params, carry, xs: Array, mask: Array | None, *, unroll=1, remat=False, dropout_key=None
    ):
        """Whole-sequence fast path used by :func:`rnnjax.unroll`: time-major ``xs`` ``(T, *B, I)``.

        For the reset-after GRU it runs, in float32 on the CPU, the native kernel (:mod:`rnnjax.kernels.native`;
        ``unroll`` has no effect there), else :mod:`rnnjax.kernels.gated`: the input projection inside the
        forward scan (measured faster than hoisting it on CPU) and a hand-written backward pass whose weight
        gradients are single large matmuls. Otherwise, or with ``remat``, it steps with
        :func:`rnnjax.masked_scan`. All give the same numbers (tested).
        """
        del dropout_key
        if remat or not self.reset_after or xs.shape[0] == 0:
            return masked_scan(self.step, params, carry, xs, mask, unroll=unroll, remat=remat)
        if self._native(params, carry, xs):
            return native.gru_sequence(params, carry, xs, mask)
        return gated.gru_sequence(self, params, carry, xs, mask, unroll=unroll)

    def _native(self, params: Params, carry, xs: Array) -> bool:
        """Whether the native CPU kernel serves these options, arrays and dtypes (see :mod:`rnnjax.kernels.native`)."""
        if not self.reset_after or jnp.dtype(self.compute_dtype(params)) != jnp.float32:
            return False
        return native.applies(xs, *jax.tree.leaves(carry), *jax.tree.leaves(params))
