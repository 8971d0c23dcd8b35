"""The RG-LRU and Griffin's recurrent block (De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local
Attention for Efficient Language Models", arXiv:2402.19427), as cells.

Both follow Google DeepMind's reference code, ``recurrentgemma`` 1.0.1 (``recurrentgemma/jax/layers.py``:
``RGLRU``, ``BlockDiagonalLinear``, ``Conv1D``, ``rnn_real_param_init``, ``sqrt_bound_derivative``;
``recurrentgemma/jax/modules.py``: ``RecurrentBlock``), with the parameters in the same layouts (the names map one
to one, see :class:`GriffinBlock`) so that weights copy across unchanged (``tests/test_rglru.py`` does so and
compares outputs and states).

Shape letters (besides ``B``, ``T``, ``I``, ``H`` of :mod:`rnnjax.types`): ``L`` the RG-LRU width (``H`` for
:class:`RGLRU`, ``lru_width`` for :class:`GriffinBlock`), ``N`` the number of gate heads (diagonal blocks),
``D = L / N`` the width of one head, ``K`` the temporal width of the convolution.

The recurrence gates read only the input, so :meth:`sequence` computes every step's coefficients at once (one
matmul for both gates) and solves ``h_t = a_t ⊙ h_{t-1} + b_t`` with
:func:`rnnjax.linear_recurrence.masked_linear_scan` (``"sequential"``, ``"associative"``, ``"log"`` or
``"pallas"``; ``a_t`` is always positive).

Differences from ``recurrentgemma``, all deliberate:

* no segment resets: ``recurrentgemma`` restarts the recurrence (``a = 0`` and no ``√(1 − a²)`` factor) and masks
  the convolution wherever ``segment_pos == 0``, i.e. at the first token of every document; here a sequence
  continues from the given carry, and padding is expressed with ``lengths`` instead. The two agree whenever no
  ``segment_pos`` is zero.
* ``1 − a²`` is computed as ``−expm1(2 log a)`` (``recurrentgemma``: ``1 − exp(2 log a)``), which keeps its
  relative precision as ``a → 1``; the square root's derivative is bounded at 1000 as in ``recurrentgemma``.
* the state maths (gates, ``a``, the convolution, the scan) runs in float32 (float64 for a float64 carry) also
  under ``dtype=jnp.bfloat16``; only the matmuls run in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax import _checks, linear_recurrence
from rnnjax.cells.base import Cell, batch_shape_tuple, keep_dtype
from rnnjax.cells.registry import register_cell
from rnnjax.precision import matmul
from rnnjax.types import Array, DType, Params, PRNGKey

C = 8.0
"""The paper's constant ``c`` in ``a_t = σ(Λ)^{c r_t}`` (fixed, as in the paper and ``recurrentgemma``)."""

MAX_SQRT_GRADIENT = 1000.0
"""Bound on the derivative of ``√(1 − a²)`` with respect to ``1 − a²`` (``recurrentgemma``'s value)."""


class RGLRUState(NamedTuple):
    """Carry of :class:`RGLRU`."""

    h: Array  # (*B, H) hidden state, float32 under bfloat16 compute


class GriffinState(NamedTuple):
    """Carry of :class:`GriffinBlock`: the RG-LRU state and the convolution's last ``K − 1`` inputs."""

    h: Array  # (*B, L) RG-LRU state, float32 under bfloat16 compute
    conv: Array  # (*B, K-1, L) the conv's previous inputs, oldest first (recurrentgemma's conv1d_state)


# The RG-LRU's maths, shared by both cells and by step and sequence (so that both round the same way).


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sqrt_bounded(x: Array, max_gradient: float) -> Array:
    """``√x`` whose derivative is that at ``max(x, 1 / (4 max_gradient²))``, i.e. at most ``max_gradient``.

    ``recurrentgemma``'s ``sqrt_bound_derivative``: ``√(1 − a²)`` has an unbounded derivative as ``a → 1``.
    """
    del max_gradient
    return jnp.sqrt(x)


def _sqrt_bounded_fwd(x, max_gradient):
    del max_gradient
    return jnp.sqrt(x), x


def _sqrt_bounded_bwd(max_gradient, x, g):
    x = jnp.maximum(x, 1.0 / (4.0 * max_gradient**2))
    return (g * 0.5 / jnp.sqrt(x),)


_sqrt_bounded.defvjp(_sqrt_bounded_fwd, _sqrt_bounded_bwd)


def _state_dtype(carry_leaf: Array) -> DType:
    """The dtype of the state maths: float64 for a float64 carry, else float32."""
    return jnp.dtype(jnp.float64) if carry_leaf.dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _init_rglru(key: PRNGKey, width: int, num_heads: int, min_rad: float, max_rad: float, dtype: DType) -> Params:
    """The RG-LRU's parameters, initialised as ``recurrentgemma``'s ``RGLRU`` (``only_real=True``).

    * ``gate_x_w``, ``gate_a_w`` ``(N, D, D)``: ``BlockDiagonalLinear`` kernels, ``variance_scaling(1, "fan_in",
      "normal")`` on the 3-D shape, whose fan-in is ``N · D = L``: entries ``N(0, 1 / L)``;
    * ``gate_x_b``, ``gate_a_b`` ``(N, D)``: zeros;
    * ``a_param`` ``(L,)``: ``rnn_real_param_init(min_rad, max_rad)``: the base ``σ(−a_param) = r`` with ``r²``
      uniform on ``[min_rad², max_rad²]`` (uniform on the ring's area), i.e. ``a_param = log(1 / r − 1)``.
    """
    k_x, k_a, k_lambda = jax.random.split(key, 3)
    head = width // num_heads
    kernel = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    u = jax.random.uniform(k_lambda, (width,), jnp.float32)
    log_r = 0.5 * jnp.log(u * (max_rad**2 - min_rad**2) + min_rad**2 + 1e-8)  # (L,) log r, as recurrentgemma
    return {
        "a_param": jnp.log(jnp.exp(-log_r) - 1.0).astype(dtype),  # softplus⁻¹(−log r)
        "gate_a_b": jnp.zeros((num_heads, head), dtype),
        "gate_a_w": kernel(k_a, (num_heads, head, head), jnp.float32).astype(dtype),
        "gate_x_b": jnp.zeros((num_heads, head), dtype),
        "gate_x_w": kernel(k_x, (num_heads, head, head), jnp.float32).astype(dtype),
    }


def _rglru_coefficients(params: Params, u: Array, compute_dtype: DType, acc: DType) -> tuple[Array, Array]:
    """The RG-LRU's ``(log a_t, b_t)`` for inputs ``u`` ``(..., L)``, so that ``h_t = a_t ⊙ h_{t-1} + b_t``.

    .. math::
        r_t = σ(W_a u_t + b_a), \\quad i_t = σ(W_x u_t + b_x), \\quad
        \\log a_t = −c\\,\\mathrm{softplus}(Λ)\\, r_t, \\quad b_t = \\sqrt{1 − a_t^2} ⊙ (i_t ⊙ u_t)

    with block-diagonal ``W_a``, ``W_x`` (one matmul for both) and ``Λ = a_param``. Returns both ``(..., L)`` in
    ``acc``.
    """
    num_heads, head = params["gate_x_w"].shape[:2]
    kernel = jnp.concatenate([params["gate_x_w"], params["gate_a_w"]], axis=-1)  # (N, D, 2D)
    bias = jnp.concatenate([params["gate_x_b"], params["gate_a_b"]], axis=-1).astype(acc)  # (N, 2D)
    heads = u.reshape(*u.shape[:-1], num_heads, 1, head)  # (..., N, 1, D)
    gates = matmul(heads, kernel, compute_dtype).astype(acc)[..., 0, :] + bias  # (..., N, 2D)
    gate_x = jax.nn.sigmoid(gates[..., :head]).reshape(u.shape)  # (..., L) i_t
    gate_a = jax.nn.sigmoid(gates[..., head:]).reshape(u.shape)  # (..., L) r_t
    log_a = -C * gate_a * jax.nn.softplus(params["a_param"].astype(acc))  # (..., L)
    multiplier = _sqrt_bounded(-jnp.expm1(2.0 * log_a), MAX_SQRT_GRADIENT)  # (..., L) √(1 − a²)
    return log_a, multiplier * (gate_x * u.astype(acc))


def _check_rglru_options(cell, width: int, width_name: str) -> None:
    """Validates ``num_heads`` (it must divide ``width``), ``min_rad``, ``max_rad`` and ``method``."""
    _checks.check_positive_int(cell.num_heads, "num_heads")
    if width % cell.num_heads:
        raise ValueError(f"num_heads must divide {width_name} ({width}), got num_heads={cell.num_heads}")
    for name in ("min_rad", "max_rad"):
        value = getattr(cell, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float, got {value!r}")
    if not 0.0 < cell.min_rad <= cell.max_rad < 1.0:
        raise ValueError(
            f"min_rad and max_rad must satisfy 0 < min_rad <= max_rad < 1, got min_rad={cell.min_rad}, "
            f"max_rad={cell.max_rad}"
        )
    if cell.method is not None:
        _checks.check_choice(cell.method, linear_recurrence.METHODS, "method")


@register_cell("rglru")
@dataclasses.dataclass(frozen=True, kw_only=True)
class RGLRU(Cell):
    """RG-LRU: the real-gated linear recurrent unit of Griffin and Hawk (De et al. 2024, eq. 1–4).

    .. math::
        r_t = σ(W_a u_t + b_a), \\qquad i_t = σ(W_x u_t + b_x), \\qquad
        a_t = σ(−Λ)^{c\\, r_t} = \\exp(−c\\,\\mathrm{softplus}(Λ)\\, r_t) \\\\
        h_t = a_t ⊙ h_{t-1} + \\sqrt{1 − a_t^2} ⊙ (i_t ⊙ u_t), \\qquad y_t = h_t

    with ``c = 8``, ``W_a``, ``W_x`` block-diagonal with ``num_heads`` blocks (``recurrentgemma``'s
    ``BlockDiagonalLinear``) and ``Λ = a_param`` stored as in ``recurrentgemma``: its ``a_param`` is minus the
    paper's ``Λ`` (the paper writes ``a = σ(Λ)``; the code ``log a = −softplus(a_param)``).

    Input width: the paper's RG-LRU maps ``H`` features to ``H`` (``u_t = x_t``). With ``input_projection=True``
    (the default) the cell first projects ``u_t = x_t W_in`` with a learnt ``(I, H)`` kernel (no bias), for any
    ``I`` (also when ``I == H``: the parameters do not depend on the input size); it is then the paper's RG-LRU
    after a linear layer, not the bare layer. With ``input_projection=False``, ``u_t = x_t`` exactly as in the
    paper and ``recurrentgemma``, and ``init`` requires ``input_size == hidden_size``.

    Initialisation (``recurrentgemma`` 1.0.1, ``layers.py``): gate kernels ``N(0, 1 / H)`` (the fan-in of the
    ``(N, D, D)`` block kernel is ``N · D = H``), gate biases zero, and ``a_param`` such that the base
    ``σ(−a_param)`` lies on the ring ``[min_rad, max_rad] = [0.9, 0.999]`` with its square uniform
    (``rnn_real_param_init``). Note that the code puts the base ``σ(−Λ)`` on that ring, so the slowest decay
    ``a_t`` at ``r_t = 1`` is ``σ(−Λ)^8 ∈ [0.43, 0.992]``; the paper's text says ``a^c`` is uniform on
    ``[0.9, 0.999]``. This follows the code. ``W_in`` is ``N(0, 1 / I)`` (``recurrentgemma``'s ``Dense`` kernels).

    Parameters (``I`` inputs, ``H`` state, ``N`` heads of width ``D = H / N``; kernels ``(in, out)``)::

        w_in:     (I, H)     input projection (only with input_projection=True)
        gate_x_w: (N, D, D)  input gate kernel W_x, per head;   gate_x_b: (N, D) its bias b_x
        gate_a_w: (N, D, D)  recurrence gate kernel W_a;        gate_a_b: (N, D) its bias b_a
        a_param:  (H,)       Λ (recurrentgemma's sign): a_t = exp(−8 softplus(a_param) r_t)

    Attributes:
        hidden_size: ``H``, the width of the state and the output.
        num_heads: ``N``, the number of diagonal blocks of the gate kernels; must divide ``H``.
        input_projection: whether ``x`` is projected to ``H`` features first (see above).
        min_rad, max_rad: the ring of the initial base ``σ(−Λ)``, ``0 < min_rad ≤ max_rad < 1``.
        method: solver of :meth:`sequence` (``"sequential"``, ``"associative"``, ``"log"``, ``"pallas"``);
            ``None``: :func:`rnnjax.linear_recurrence.default_method`.
        param_dtype: dtype of the parameters ``init`` creates.
        dtype: compute dtype of the matmuls (``None``: the parameters' dtype); gates, ``a_t`` and the state are
            float32 (float64 for a float64 carry).

    Example:
        >>> cell = rnnjax.RGLRU(hidden_size=8, num_heads=2)
        >>> params = cell.init(jax.random.key(0), input_size=3)
        >>> carry, ys = rnnjax.unroll(cell, params, jnp.ones((2, 10, 3)))
        >>> ys.shape, carry.h.shape
        ((2, 10, 8), (2, 8))
    """

    hidden_size: int
    num_heads: int = 1
    input_projection: bool = True
    min_rad: float = 0.9
    max_rad: float = 0.999
    method: linear_recurrence.Method | None = None
    param_dtype: DType = jnp.float32
    dtype: DType | None = None

    output_field = "h"

    def __post_init__(self):
        self.check_hyperparameters()
        if not isinstance(self.input_projection, bool):
            raise TypeError(f"input_projection must be a bool, got {self.input_projection!r}")
        _check_rglru_options(self, self.hidden_size, "hidden_size")

    def init(self, key: PRNGKey, input_size: int) -> Params:
        _checks.check_positive_int(input_size, "input_size")
        H = self.hidden_size
        if not self.input_projection and input_size != H:
            raise ValueError(
                f"input_size must equal hidden_size ({H}) when input_projection=False, got input_size={input_size}"
            )
        k_gates, k_in = jax.random.split(key)
        params = _init_rglru(k_gates, H, self.num_heads, self.min_rad, self.max_rad, self.param_dtype)
        if self.input_projection:
            kernel = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")
            params["w_in"] = kernel(k_in, (input_size, H), jnp.float32).astype(self.param_dtype)
        return params

    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32) -> RGLRUState:
        return RGLRUState(jnp.zeros((*batch_shape_tuple(batch_shape), self.hidden_size), dtype))

    def input_size(self, params: Params) -> int:
        return params["w_in"].shape[0] if self.input_projection else params["a_param"].shape[0]

    def decay(self, params: Params) -> Array:
        """``σ(−Λ)^c`` ``(H,)``: ``a_t`` at ``r_t = 1``, the smallest value ``a_t`` can take (``a_t ∈ [it, 1)``)."""
        return jnp.exp(-C * jax.nn.softplus(params["a_param"].astype(jnp.float32)))

    def recurrent_matrices(self, params: Params) -> dict[str, Array]:
        """``{"diag(a)": (H, H)}``: ``diag(σ(−Λ)^c)``, the transition at ``r_t = 1``.

        The actual transition ``diag(a_t)`` depends on the input through ``r_t``, and lies between this matrix
        (most contracting) and the identity; no weight matrix maps ``h`` to ``h``.
        """
        return {"diag(a)": jnp.diag(self.decay(params))}

    def _coefficients(self, params: Params, x: Array, acc: DType) -> tuple[Array, Array]:
        """``(log a, b)`` ``(..., H)`` in ``acc`` for inputs ``x`` ``(..., I)``."""
        dtype = self.compute_dtype(params)
        u = matmul(x, params["w_in"], dtype).astype(acc) if self.input_projection else x.astype(acc)  # (..., H)
        return _rglru_coefficients(params, u, dtype, acc)

    def step(self, params: Params, carry: RGLRUState, x: Array) -> tuple[RGLRUState, Array]:
        """One step: ``x`` ``(*B, I)``, ``carry.h`` ``(*B, H)`` -> ``(carry, y)``, ``y = h_t`` ``(*B, H)``."""
        x = self.check_step_input(params, x, carry)
        acc = _state_dtype(carry.h)
        log_a, b = self._coefficients(params, x, acc)  # (*B, H) each
        h = jnp.exp(log_a) * carry.h.astype(acc) + b  # (*B, H)
        return keep_dtype(RGLRUState(h), carry), h.astype(self.compute_dtype(params))

    def sequence(
        self,
        params: Params,
        carry: RGLRUState,
        xs: Array,
        mask: Array | None,
        *,
        unroll=1,
        remat=False,
        dropout_key=None,
    ) -> tuple[RGLRUState, Array]:
        """Whole-sequence path: the gates of every step in one matmul, then a linear scan.

        Args:
            params: from :meth:`init`.
            carry: initial :class:`RGLRUState` ``(*B, H)``.
            xs: time-major ``(T, *B, I)``.
            mask: ``(T, *B)`` booleans or ``None`` (any mask: masked steps hold the state).
            unroll: steps per iteration of the sequential scan.
            remat: ignored (the scan keeps only ``(T, *B, H)`` values).

        Returns:
            ``(carry, ys)`` with ``ys`` ``(T, *B, H)`` in the compute dtype, zero where masked.
        """
        del remat, dropout_key
        xs = _checks.as_float_array(xs, "xs")
        _checks.check_features(xs, self.input_size(params), "xs")
        acc = _state_dtype(carry.h)
        method = self.method or linear_recurrence.default_method(xs.shape[0])
        log_a, b = self._coefficients(params, xs, acc)  # (T, *B, H) each
        h_last, hs = linear_recurrence.masked_linear_scan(
            jnp.exp(log_a), b, carry.h.astype(acc), mask, method, unroll=unroll
        )  # (*B, H), (T, *B, H)
        return keep_dtype(RGLRUState(h_last), carry), hs.astype(self.compute_dtype(params))


@register_cell("griffin")
@dataclasses.dataclass(frozen=True, kw_only=True)
class GriffinBlock(Cell):
    """Griffin's recurrent block (De et al. 2024, fig. 2; ``recurrentgemma``'s ``RecurrentBlock``) as a cell.

    .. math::
        g_t = \\mathrm{GeLU}(x_t W_y + b_y), \\qquad u_t = x_t W_x + b_x \\\\
        v_t = \\textstyle\\sum_{k=0}^{K-1} w_k ⊙ u_{t-K+1+k} + b_c \\qquad \\text{(causal depthwise conv)} \\\\
        h_t = \\mathrm{RGLRU}(v_t, h_{t-1}), \\qquad y_t = (g_t ⊙ h_t) W_{out} + b_{out}

    ``GeLU`` is the tanh approximation (``jax.nn.gelu``, as ``recurrentgemma``), and the RG-LRU is that of
    :class:`RGLRU` (without input projection) on ``L = lru_width`` features. The convolution's inputs before
    the first step are the carry's buffer ``conv`` (zeros initially: ``recurrentgemma``'s zero padding), the
    ``K − 1`` previous ``u`` oldest first, so ``w_{K-1}`` weights the current step.

    :meth:`step` streams one token. :meth:`sequence` (used by :func:`rnnjax.unroll`) projects the whole sequence
    with one matmul per branch, runs the convolution as ``K`` shifted products and the RG-LRU as a linear scan,
    and returns the same numbers, final carry included: with a mask, the convolution sees only each row's valid
    steps in order (any mask, not only prefixes), and the final buffer holds the row's last ``K − 1`` valid
    ``u`` (topped up with the initial buffer's newest entries when the row has fewer).

    Parameters (``I`` inputs, ``H`` outputs, ``L`` RG-LRU width, ``N`` heads of width ``D = L / N``, ``K`` conv
    width; names map to ``recurrentgemma``'s ``linear_y``, ``linear_x``, ``conv_1d``, ``rg_lru``, ``linear_out``)::

        w_y: (I, L), b_y: (L,)       GeLU branch (linear_y)
        w_x: (I, L), b_x: (L,)       recurrent branch (linear_x)
        conv_w: (K, L), conv_b: (L,) depthwise conv (conv_1d.w, conv_1d.b)
        gate_x_w, gate_x_b, gate_a_w, gate_a_b, a_param   the RG-LRU, as in :class:`RGLRU`
                                     (rg_lru.input_gate.w/.b, rg_lru.a_gate.w/.b, rg_lru.a_param)
        w_out: (L, H), b_out: (H,)   output layer (linear_out)

    Initialisation as ``recurrentgemma``: ``w_y``, ``w_x`` ``N(0, 1 / I)``, ``w_out`` ``N(0, 1 / L)`` (its
    ``final_w_init_variance_scale`` default of 1; the Griffin model passes ``2 / num_layers``), ``conv_w``
    ``N(0, 0.01 / K)``, biases zero, the RG-LRU as in :class:`RGLRU`.

    Attributes:
        hidden_size: ``H``, the block's output width (``recurrentgemma``'s ``width``).
        lru_width: ``L``; ``None`` means ``H``.
        num_heads: ``N``, the number of diagonal blocks of the RG-LRU's gate kernels; must divide ``L``.
        conv_width: ``K``, the temporal width of the convolution (``conv1d_temporal_width``, default 4).
        min_rad, max_rad: the ring of the RG-LRU's initial base ``σ(−Λ)`` (see :class:`RGLRU`).
        method: solver of the RG-LRU in :meth:`sequence`; ``None``: :func:`rnnjax.linear_recurrence.default_method`.
        param_dtype: dtype of the parameters ``init`` creates.
        dtype: compute dtype of the matmuls (``None``: the parameters' dtype); the convolution, gates and state
            are float32 (float64 for a float64 carry).

    Example:
        >>> cell = rnnjax.GriffinBlock(hidden_size=8, lru_width=12, num_heads=3)
        >>> params = cell.init(jax.random.key(0), input_size=8)
        >>> carry, ys = rnnjax.unroll(cell, params, jnp.ones((2, 10, 8)))
        >>> ys.shape, carry.h.shape, carry.conv.shape
        ((2, 10, 8), (2, 12), (2, 3, 12))
    """

    hidden_size: int
    lru_width: int | None = None
    num_heads: int = 1
    conv_width: int = 4
    min_rad: float = 0.9
    max_rad: float = 0.999
    method: linear_recurrence.Method | None = None
    param_dtype: DType = jnp.float32
    dtype: DType | None = None

    output_field = None

    def __post_init__(self):
        self.check_hyperparameters()
        _checks.check_positive_int(self.lru_width, "lru_width", allow_none=True)
        _checks.check_positive_int(self.conv_width, "conv_width")
        _check_rglru_options(self, self.width, "lru_width" if self.lru_width is not None else "hidden_size")

    @property
    def width(self) -> int:
        """``L``: ``lru_width``, or ``hidden_size`` when unset."""
        return self.hidden_size if self.lru_width is None else self.lru_width

    def init(self, key: PRNGKey, input_size: int) -> Params:
        _checks.check_positive_int(input_size, "input_size")
        I, L, H, K = input_size, self.width, self.hidden_size, self.conv_width
        k_y, k_x, k_conv, k_out, k_lru = jax.random.split(key, 5)
        dense = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        conv = jax.nn.initializers.variance_scaling(0.01, "fan_in", "normal")  # fan-in of (K, L) is K
        pd = self.param_dtype
        return {
            "w_y": dense(k_y, (I, L), jnp.float32).astype(pd),
            "b_y": jnp.zeros((L,), pd),
            "w_x": dense(k_x, (I, L), jnp.float32).astype(pd),
            "b_x": jnp.zeros((L,), pd),
            "conv_w": conv(k_conv, (K, L), jnp.float32).astype(pd),
            "conv_b": jnp.zeros((L,), pd),
            **_init_rglru(k_lru, L, self.num_heads, self.min_rad, self.max_rad, pd),
            "w_out": dense(k_out, (L, H), jnp.float32).astype(pd),
            "b_out": jnp.zeros((H,), pd),
        }

    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32) -> GriffinState:
        batch = batch_shape_tuple(batch_shape)
        L = self.width
        return GriffinState(
            h=jnp.zeros((*batch, L), dtype),
            conv=jnp.zeros((*batch, self.conv_width - 1, L), dtype),
        )

    def input_size(self, params: Params) -> int:
        return params["w_x"].shape[0]

    def recurrent_matrices(self, params: Params) -> dict[str, Array]:
        """``{}``: no weight matrix maps the state to the next state (see :meth:`RGLRU.recurrent_matrices`)."""
        del params
        return {}

    # Shared by step, sequence and readout.

    def _branch(self, params: Params, x: Array, name: str, acc: DType) -> Array:
        """``x W_name + b_name``: ``(..., I)`` -> ``(..., L)`` in ``acc``."""
        proj = matmul(x, params[f"w_{name}"], self.compute_dtype(params)).astype(acc)
        return proj + params[f"b_{name}"].astype(acc)

    def _conv(self, params: Params, taps: Sequence[Array], acc: DType) -> Array:
        """``b_c + Σ_k w_k ⊙ taps[k]``, ``taps`` the ``K`` inputs of each output, oldest first: ``(..., L)``."""
        w = params["conv_w"].astype(acc)  # (K, L)
        out = params["conv_b"].astype(acc)
        for k, tap in enumerate(taps):
            out = out + w[k] * tap
        return out

    def _output(self, params: Params, h: Array, x: Array, acc: DType) -> Array:
        """``y = (GeLU(x W_y + b_y) ⊙ h) W_out + b_out``: ``h`` ``(..., L)``, ``x`` ``(..., I)`` -> ``(..., H)``."""
        g = jax.nn.gelu(self._branch(params, x, "y", acc), approximate=True)  # (..., L)
        y = matmul(g * h.astype(acc), params["w_out"], self.compute_dtype(params)).astype(acc)  # (..., H)
        return (y + params["b_out"].astype(acc)).astype(self.compute_dtype(params))

    def readout(self, params: Params, carry: GriffinState, x: Array) -> Array:
        """``y`` ``(*B, H)`` of the step that produced ``carry`` (its RG-LRU state ``h``) from input ``x``."""
        return self._output(params, carry.h, x, _state_dtype(carry.h))

    def step(self, params: Params, carry: GriffinState, x: Array) -> tuple[GriffinState, Array]:
        """One step: ``x`` ``(*B, I)`` -> ``(carry, y)``, ``y`` ``(*B, H)``; the buffer shifts in ``u_t``."""
        x = self.check_step_input(params, x, carry)
        acc = _state_dtype(carry.h)
        u = self._branch(params, x, "x", acc)  # (*B, L)
        window = jnp.concatenate([carry.conv.astype(acc), u[..., None, :]], axis=-2)  # (*B, K, L)
        v = self._conv(params, [window[..., k, :] for k in range(self.conv_width)], acc)  # (*B, L)
        log_a, b = _rglru_coefficients(params, v, self.compute_dtype(params), acc)  # (*B, L) each
        h = jnp.exp(log_a) * carry.h.astype(acc) + b  # (*B, L)
        new_carry = keep_dtype(GriffinState(h=h, conv=window[..., 1:, :]), carry)
        return new_carry, self._output(params, h, x, acc)

    def sequence(
        self,
        params: Params,
        carry: GriffinState,
        xs: Array,
        mask: Array | None,
        *,
        unroll=1,
        remat=False,
        dropout_key=None,
    ) -> tuple[GriffinState, Array]:
        """Whole-sequence path: branch matmuls over all steps, the conv as ``K`` shifted products, a linear scan.

        With a mask, each row's valid steps are gathered to the front (in order) before the convolution and the
        results scattered back, so the convolution sees what stepping would: its buffer and the valid inputs.

        Args:
            params: from :meth:`init`.
            carry: initial :class:`GriffinState`.
            xs: time-major ``(T, *B, I)``.
            mask: ``(T, *B)`` booleans or ``None``.
            unroll: steps per iteration of the sequential scan.
            remat: ignored (only ``(T, *B, L)`` values are kept).

        Returns:
            ``(carry, ys)`` with ``ys`` ``(T, *B, H)`` in the compute dtype, zero where masked; the final buffer
            holds each row's last ``K − 1`` valid inputs of the convolution.
        """
        del remat, dropout_key
        xs = _checks.as_float_array(xs, "xs")
        _checks.check_features(xs, self.input_size(params), "xs")
        acc = _state_dtype(carry.h)
        T, K = xs.shape[0], self.conv_width
        method = self.method or linear_recurrence.default_method(T)
        us = self._branch(params, xs, "x", acc)  # (T, *B, L)
        if mask is not None and T:
            order = jnp.argsort(jnp.logical_not(mask), axis=0, stable=True)  # (T, *B) valid steps first, in order
            us = jnp.take_along_axis(us, order[..., None], axis=0)  # (T, *B, L) compacted
        past = jnp.moveaxis(carry.conv.astype(acc), -2, 0)  # (K-1, *B, L)
        full = jnp.concatenate([past, us], axis=0)  # (K-1+T, *B, L)
        vs = self._conv(params, [full[k : k + T] for k in range(K)], acc)  # (T, *B, L)
        if mask is not None and T:
            position = jnp.maximum(jnp.cumsum(mask, axis=0, dtype=jnp.int32) - 1, 0)  # (T, *B) rank among valid steps
            vs = jnp.take_along_axis(vs, position[..., None], axis=0)  # (T, *B, L) back in place
        log_a, b = _rglru_coefficients(params, vs, self.compute_dtype(params), acc)  # (T, *B, L) each
        h_last, hs = linear_recurrence.masked_linear_scan(
            jnp.exp(log_a), b, carry.h.astype(acc), mask, method, unroll=unroll
        )  # (*B, L), (T, *B, L)
        ys = self._output(params, hs, xs, acc)  # (T, *B, H)
        if mask is not None:
            ys = jnp.where(mask[..., None], ys, jnp.zeros_like(ys))
        if K == 1 or T == 0:
            conv = carry.conv
        elif mask is None:
            conv = jnp.moveaxis(full[T:], 0, -2)  # (*B, K-1, L)
        else:
            valid = jnp.sum(mask, axis=0, dtype=jnp.int32)  # (*B,)
            index = valid[None] + jnp.arange(K - 1, dtype=jnp.int32).reshape((K - 1,) + (1,) * valid.ndim)  # (K-1, *B)
            conv = jnp.moveaxis(jnp.take_along_axis(full, index[..., None], axis=0), 0, -2)  # (*B, K-1, L)
        return keep_dtype(GriffinState(h=h_last, conv=conv), carry), ys
