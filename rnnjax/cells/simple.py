"""Elman (simple) and Jordan recurrent cells."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax import _checks
from rnnjax.cells.base import (
    ACTIVATIONS,
    Activation,
    Cell,
    Initializer,
    InitializerName,
    batch_shape_tuple,
    keep_dtype,
    resolve_initializer,
)
from rnnjax.cells.registry import register_cell
from rnnjax.precision import matmul
from rnnjax.types import Array, DType, Params, PRNGKey


class SimpleRNNState(NamedTuple):
    """Carry of :class:`SimpleRNN`."""

    h: Array  # (*B, H) hidden state


@register_cell("simple", "elman")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SimpleRNN(Cell):
    """The Elman network: the hidden state is fed back.

    .. math::
        h_t = \\phi(x_t W_{ih} + h_{t-1} W_{hh} + b), \\qquad y_t = h_t

    Parameters (``I`` inputs, ``H`` hidden)::

        w_ih: (I, H)   input kernel
        w_hh: (H, H)   recurrent kernel (orthogonal by default)
        b:    (H,)     bias (absent when use_bias=False); PyTorch's b_ih + b_hh

    Attributes:
        hidden_size: ``H``.
        activation: ``"tanh"`` (default) or ``"relu"``.
        use_bias: whether ``b`` exists.
        kernel_init / recurrent_init: initialiser name or callable for ``w_ih`` / ``w_hh``.
        param_dtype: dtype of the parameters ``init`` creates.
        dtype: compute dtype of the matmuls (``None``: the parameters' dtype); they accumulate in float32.

    Example:
        >>> cell = SimpleRNN(hidden_size=8)
        >>> params = cell.init(jax.random.key(0), input_size=3)
        >>> carry, y = cell.step(params, cell.initial_carry((2,)), jnp.ones((2, 3)))
        >>> y.shape
        (2, 8)
    """

    hidden_size: int
    activation: Activation = "tanh"
    use_bias: bool = True
    kernel_init: InitializerName | Initializer = "glorot_uniform"
    recurrent_init: InitializerName | Initializer = "orthogonal"
    param_dtype: DType = jnp.float32
    dtype: DType | None = None

    def __post_init__(self):
        self.check_hyperparameters()
        _checks.check_choice(self.activation, ("tanh", "relu"), "activation")

    def init(self, key: PRNGKey, input_size: int) -> Params:
        _checks.check_positive_int(input_size, "input_size")
        k_ih, k_hh = jax.random.split(key)
        H = self.hidden_size
        params = {
            "w_ih": resolve_initializer(self.kernel_init, "kernel_init")(k_ih, (input_size, H), self.param_dtype),
            "w_hh": resolve_initializer(self.recurrent_init, "recurrent_init")(k_hh, (H, H), self.param_dtype),
        }
        if self.use_bias:
            params["b"] = jnp.zeros((H,), self.param_dtype)
        return params

    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32) -> SimpleRNNState:
        return SimpleRNNState(h=jnp.zeros((*batch_shape_tuple(batch_shape), self.hidden_size), dtype))

    def input_size(self, params: Params) -> int:
        return params["w_ih"].shape[0]

    output_field = "h"

    def recurrent_matrices(self, params: Params) -> dict[str, Array]:
        """``{"w_hh": (H, H)}``."""
        return {"w_hh": params["w_hh"]}

    def step(self, params: Params, carry: SimpleRNNState, x: Array) -> tuple[SimpleRNNState, Array]:
        """One step: ``x`` ``(*B, I)``, ``carry.h`` ``(*B, H)`` -> ``(carry, y)``, ``y`` ``(*B, H)``."""
        x = self.check_step_input(params, x, carry)
        dtype = self.compute_dtype(params)
        z = matmul(x, params["w_ih"], dtype) + matmul(carry.h, params["w_hh"], dtype)  # (*B, H)
        if self.use_bias:
            z = z + params["b"].astype(z.dtype)
        h = ACTIVATIONS[self.activation](z)  # (*B, H)
        return keep_dtype(SimpleRNNState(h=h), carry), h.astype(dtype)


class JordanState(NamedTuple):
    """Carry of :class:`JordanRNN`: the previous *output*, not the hidden state."""

    y: Array  # (*B, O) previous output


@register_cell("jordan")
@dataclasses.dataclass(frozen=True, kw_only=True)
class JordanRNN(Cell):
    """The Jordan network: the previous output, not the hidden state, is fed back.

    .. math::
        h_t = \\phi(x_t W_{ih} + y_{t-1} W_{yh} + b_h), \\qquad y_t = \\psi(h_t W_{hy} + b_y)

    Parameters (``I`` inputs, ``H`` hidden, ``O`` outputs)::

        w_ih: (I, H)   input kernel
        w_yh: (O, H)   output-to-hidden (recurrent) kernel
        b_h:  (H,)     hidden bias
        w_hy: (H, O)   hidden-to-output kernel
        b_y:  (O,)     output bias

    Attributes:
        hidden_size: ``H``.
        output_size: ``O`` (``None``, the default, means ``hidden_size``).
        activation: ``phi``, ``"tanh"`` or ``"relu"``.
        output_activation: ``psi``, ``"tanh"`` (default), ``"sigmoid"`` or ``"identity"``. A bounded
            ``psi`` keeps the fed-back signal bounded.
        use_bias, kernel_init, recurrent_init, param_dtype, dtype: as for :class:`SimpleRNN`.
    """

    hidden_size: int
    output_size: int | None = None  # type: ignore[assignment]  # a field here, a property on Cell
    activation: Activation = "tanh"
    output_activation: Activation = "tanh"
    use_bias: bool = True
    kernel_init: InitializerName | Initializer = "glorot_uniform"
    recurrent_init: InitializerName | Initializer = "orthogonal"
    param_dtype: DType = jnp.float32
    dtype: DType | None = None

    def __post_init__(self):
        self.check_hyperparameters()
        _checks.check_positive_int(self.output_size, "output_size", allow_none=True)
        if self.output_size is None:
            object.__setattr__(self, "output_size", self.hidden_size)
        _checks.check_choice(self.activation, ("tanh", "relu"), "activation")
        _checks.check_choice(self.output_activation, ("tanh", "sigmoid", "identity"), "output_activation")

    def init(self, key: PRNGKey, input_size: int) -> Params:
        _checks.check_positive_int(input_size, "input_size")
        k_ih, k_yh, k_hy = jax.random.split(key, 3)
        H, O = self.hidden_size, self.output_size
        kernel_init = resolve_initializer(self.kernel_init, "kernel_init")
        recurrent_init = resolve_initializer(self.recurrent_init, "recurrent_init")
        params = {
            "w_ih": kernel_init(k_ih, (input_size, H), self.param_dtype),
            "w_yh": recurrent_init(k_yh, (O, H), self.param_dtype),
            "w_hy": kernel_init(k_hy, (H, O), self.param_dtype),
        }
        if self.use_bias:
            params["b_h"] = jnp.zeros((H,), self.param_dtype)
            params["b_y"] = jnp.zeros((O,), self.param_dtype)
        return params

    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32) -> JordanState:
        return JordanState(y=jnp.zeros((*batch_shape_tuple(batch_shape), self.output_size), dtype))

    def input_size(self, params: Params) -> int:
        return params["w_ih"].shape[0]

    output_field = "y"

    def recurrent_matrices(self, params: Params) -> dict[str, Array]:
        """The output loop ``{"w_yh @ w_hy": (O, O)}``: the state is the output, fed back through both."""
        return {"w_yh @ w_hy": params["w_yh"] @ params["w_hy"]}

    def step(self, params: Params, carry: JordanState, x: Array) -> tuple[JordanState, Array]:
        """One step: ``x`` ``(*B, I)``, ``carry.y`` ``(*B, O)`` -> ``(carry, y)``, ``y`` ``(*B, O)``."""
        x = self.check_step_input(params, x, carry)
        dtype = self.compute_dtype(params)
        z = matmul(x, params["w_ih"], dtype) + matmul(carry.y, params["w_yh"], dtype)  # (*B, H)
        if self.use_bias:
            z = z + params["b_h"].astype(z.dtype)
        h = ACTIVATIONS[self.activation](z)  # (*B, H)
        o = matmul(h, params["w_hy"], dtype)  # (*B, O)
        if self.use_bias:
            o = o + params["b_y"].astype(o.dtype)
        y = ACTIVATIONS[self.output_activation](o)  # (*B, O)
        return keep_dtype(JordanState(y=y), carry), y.astype(dtype)
