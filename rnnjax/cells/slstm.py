"""The sLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", arXiv 2405.04517, §2.2).

An LSTM with exponential input gating, a normaliser state ``n`` and a stabiliser state ``m``, whose recurrent
connections are block-diagonal over heads. The gates read ``h``, so the recurrence is nonlinear in the state and
is stepped: :func:`rnnjax.unroll` runs the base class's masked scan of :meth:`SLSTM.step`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import block_diag

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
from rnnjax.precision import matmul
from rnnjax.types import Array, DType, Params, PRNGKey

GATES = ("i", "f", "z", "o")
"""The order of the gate blocks in ``w_ih``, ``r`` and ``b`` (the official xlstm code's order)."""

ForgetGate = Literal["sigmoid", "exp"]
BiasInit = Literal["powerlaw_blockdependent", "small_init", "standard", "zeros"]
FORGET_GATES = ("sigmoid", "exp")
BIAS_INITS = ("powerlaw_blockdependent", "small_init", "standard", "zeros")


class SLSTMState(NamedTuple):
    """Carry of :class:`SLSTM`; all four leaves are float32 under bfloat16 compute."""

    h: Array  # (*B, H) hidden state, the output
    c: Array  # (*B, H) cell state, scaled by exp(-m)
    n: Array  # (*B, H) normaliser state, scaled by exp(-m); 0 marks an empty memory (the initial carry)
    m: Array  # (*B, H) stabiliser state: the log of the scale factored out of c and n


@register_cell("slstm")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SLSTM(Cell):
    """sLSTM: exponential gating with a normaliser and a stabiliser, block-diagonal recurrence over heads.

    With pre-activations stacked in the gate order ``i, f, z, o`` and ``R`` block-diagonal (one
    ``(H/heads, H/heads)`` block per head and gate):

    .. math::
        [\\tilde\\imath, \\tilde f, \\tilde z, \\tilde o] &= x_t W_{ih} + h_{t-1} R + b \\\\
        z_t &= \\tanh(\\tilde z), \\qquad o_t = \\sigma(\\tilde o), \\qquad
            \\log f_t = \\tilde f \\;(\\text{exp}) \\text{ or } \\log\\sigma(\\tilde f) \\;(\\text{sigmoid}) \\\\
        m_t &= \\max(\\log f_t + m_{t-1}, \\tilde\\imath) \\quad (m_t = \\tilde\\imath \\text{ where } n_{t-1} = 0) \\\\
        i'_t &= \\exp(\\tilde\\imath - m_t), \\qquad f'_t = \\min(\\exp(\\log f_t + m_{t-1} - m_t), 1) \\\\
        c_t &= f'_t \\odot c_{t-1} + i'_t \\odot z_t, \\qquad n_t = f'_t \\odot n_{t-1} + i'_t \\\\
        h_t &= o_t \\odot c_t / n_t

    and ``y_t = h_t``. ``c`` and ``n`` are the paper's unstabilised states times ``exp(−m)``, so ``h`` is the
    paper's ``o ⊙ c / n`` exactly while no exponential overflows. The zero initial carry holds ``n = 0`` ("no
    memory yet"): the first step then takes ``m_1 = ĩ_1`` (and clamps ``f'`` at 1, where only ``0 · f'`` is
    computed), as the official code does (``xlstm/blocks/slstm/src/vanilla/slstm.py``), so from the zero carry
    ``n_t ≥ 1`` (one of ``i'``, ``f'`` is 1) and ``h`` never divides by zero. (The official code tests
    ``n == 0`` over the whole batch at once; here it is per entry, which is the same from any carry it produced.)

    Parameters (``I`` inputs, ``H`` hidden, ``K = num_heads`` heads of ``D = H / K`` units; gate blocks ``i, f, z,
    o``; the paper's ``W`` and ``R`` transposed, ``(in, out)`` as elsewhere in rnnjax)::

        w_ih: (I, 4H)      input kernel, dense
        r:    (K, D, 4D)   recurrent kernel of each head: r[k] maps h[k*D:(k+1)*D] to that head's 4 gate blocks
        b:    (4H,)        bias

    Initialisation follows the official code (``xlstm`` 2.0.6: ``sLSTMCellBase.reset_parameters`` in
    ``xlstm/blocks/slstm/cell.py`` and ``sLSTMLayer.reset_parameters`` in ``xlstm/blocks/slstm/layer.py``):
    ``r = 0`` (``recurrent_weight_init="zeros"``); the forget bias of each head
    ``b_f[j] = 5 − 12 (j / (D − 1))^{0.3}`` (``"powerlaw_blockdependent"`` of a single block: from 5 down to −7),
    the other biases 0; and ``w_ih`` "small init" ``N(0, 2 / (5 I))`` (Nguyen & Salazar 2019). The official layer
    computes ``x W`` head-wise with a causal convolution in front of the ``i, f`` gates; this cell is the cell of
    §2.2, with a dense ``W``.

    Attributes:
        hidden_size: ``H``.
        num_heads: ``K``, the number of diagonal blocks of ``R``; must divide ``hidden_size`` (default 1: dense).
        forget_gate: ``"sigmoid"`` (``f = σ(f̃)``, the official code's) or ``"exp"`` (``f = exp(f̃)``); the paper
            allows both.
        bias_init: forget-bias initialisation of the official code: ``"powerlaw_blockdependent"`` (default),
            ``"small_init"`` (``linspace(3, 6, D)`` per head), ``"standard"`` (every bias
            ``U(−1/√H, 1/√H)``) or ``"zeros"``.
        kernel_init: ``"small_init"`` (default) or an initialiser name or callable for ``w_ih`` (per gate block).
        recurrent_init: ``"zeros"`` (default, as the official code), ``"standard"`` (``U(−1/√H, 1/√H)``), or an
            initialiser name or callable applied to each ``(D, D)`` block of ``r``.
        param_dtype: dtype of the parameters ``init`` creates.
        dtype: compute dtype of the matmuls (``None``: the parameters' dtype). Matmuls accumulate in float32 under
            bfloat16, and the gates and the states are computed in float32.

    Example:
        >>> cell = rnnjax.SLSTM(hidden_size=16, num_heads=4)
        >>> params = cell.init(jax.random.key(0), input_size=8)
        >>> carry, ys = rnnjax.unroll(cell, params, jnp.ones((2, 10, 8)), lengths=jnp.array([10, 3]))
        >>> ys.shape, carry.n.shape
        ((2, 10, 16), (2, 16))
    """

    hidden_size: int
    num_heads: int = 1
    forget_gate: ForgetGate = "sigmoid"
    bias_init: BiasInit = "powerlaw_blockdependent"
    kernel_init: Literal["small_init"] | InitializerName | Initializer = "small_init"
    recurrent_init: Literal["standard"] | InitializerName | Initializer = "zeros"
    param_dtype: DType = jnp.float32
    dtype: DType | None = None

    def __post_init__(self):
        self.check_hyperparameters()
        _checks.check_positive_int(self.num_heads, "num_heads")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads must divide hidden_size, got num_heads={self.num_heads} and hidden_size={self.hidden_size}"
            )
        _checks.check_choice(self.forget_gate, FORGET_GATES, "forget_gate")
        _checks.check_choice(self.bias_init, BIAS_INITS, "bias_init")
        if not callable(self.kernel_init) and self.kernel_init != "small_init":
            resolve_initializer(self.kernel_init, "kernel_init")  # raises naming kernel_init
        if not callable(self.recurrent_init) and self.recurrent_init != "standard":
            resolve_initializer(self.recurrent_init, "recurrent_init")

    @property
    def head_size(self) -> int:
        """``D = hidden_size / num_heads``."""
        return self.hidden_size // self.num_heads

    def init(self, key: PRNGKey, input_size: int) -> Params:
        """Parameters for inputs of ``I = input_size`` features.

        Returns:
            ``{"w_ih": (I, 4H), "r": (K, D, 4D), "b": (4H,)}`` in ``param_dtype``, gate blocks ``i, f, z, o``.
        """
        _checks.check_positive_int(input_size, "input_size")
        k_ih, k_r, k_b = jax.random.split(key, 3)
        H, K, D, pd = self.hidden_size, self.num_heads, self.head_size, self.param_dtype
        uniform = 1.0 / math.sqrt(H)  # the official "standard" range
        if self.kernel_init == "small_init":
            std = math.sqrt(2.0 / (5.0 * input_size))
            w_ih = (std * jax.random.normal(k_ih, (input_size, 4 * H), jnp.float32)).astype(pd)
        else:
            w_ih = init_blocks(resolve_initializer(self.kernel_init, "kernel_init"), k_ih, input_size, H, 4, pd)
        if self.recurrent_init == "standard":
            r = jax.random.uniform(k_r, (K, D, 4 * D), jnp.float32, -uniform, uniform).astype(pd)
        else:
            recurrent_init = resolve_initializer(self.recurrent_init, "recurrent_init")
            r = jnp.stack([init_blocks(recurrent_init, k, D, D, 4, pd) for k in jax.random.split(k_r, K)])
        b = jnp.zeros((4, K, D), jnp.float32)  # (gate, head, unit)
        ramp = jnp.linspace(0.0, 1.0, D, dtype=jnp.float32)  # j / (D - 1); [0] when D = 1
        if self.bias_init == "powerlaw_blockdependent":
            b = b.at[1].set(jnp.broadcast_to(5.0 - 12.0 * ramp**0.3, (K, D)))
        elif self.bias_init == "small_init":
            b = b.at[1].set(jnp.broadcast_to(3.0 + 3.0 * ramp, (K, D)))
        elif self.bias_init == "standard":
            b = jax.random.uniform(k_b, (4, K, D), jnp.float32, -uniform, uniform)
        return {"w_ih": w_ih, "r": r, "b": b.reshape(4 * H).astype(pd)}

    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32) -> SLSTMState:
        """The zero carry ``(h, c, n, m)``, each ``(*B, H)``; ``n = 0`` marks the memory empty (see the class)."""
        shape = (*batch_shape_tuple(batch_shape), self.hidden_size)
        return SLSTMState(*(jnp.zeros(shape, dtype) for _ in SLSTMState._fields))

    def input_size(self, params: Params) -> int:
        return params["w_ih"].shape[0]

    output_field = "h"

    def recurrent_matrices(self, params: Params) -> dict[str, Array]:
        """The block-diagonal ``R`` of each gate, dense: ``r/i``, ``r/f``, ``r/z``, ``r/o``, each ``(H, H)``.

        ``h_{t-1} @ matrices["r/f"]`` is the recurrent part of ``f̃``.
        """
        K, D = self.num_heads, self.head_size
        blocks = params["r"].reshape(K, D, 4, D)  # (head, in, gate, out)
        return {f"r/{gate}": block_diag(*(blocks[k, :, g] for k in range(K))) for g, gate in enumerate(GATES)}

    def step(self, params: Params, carry: SLSTMState, x: Array) -> tuple[SLSTMState, Array]:
        """One step: ``x`` ``(*B, I)``, states ``(*B, H)`` -> ``(carry, y)``, ``y = h_t`` ``(*B, H)``."""
        x = self.check_step_input(params, x, carry)
        dtype = self.compute_dtype(params)
        H, K, D = self.hidden_size, self.num_heads, self.head_size
        batch = carry.h.shape[:-1]
        wx = matmul(x, params["w_ih"], dtype)  # (*B, 4H)
        h_heads = carry.h.reshape(*batch, K, 1, D)  # (*B, K, 1, D)
        rh = matmul(h_heads, params["r"], dtype)  # (*B, K, 1, 4D): each head through its own block
        rh = jnp.swapaxes(rh.reshape(*batch, K, 4, D), -3, -2).reshape(*batch, 4 * H)  # (*B, 4H), gate-major
        pre = wx + rh + params["b"].astype(wx.dtype)  # (*B, 4H)
        i_pre, f_pre, z_pre, o_pre = jnp.split(pre, 4, axis=-1)  # each (*B, H)
        acc = pre.dtype  # float32 under bfloat16 compute
        c, n, m = (leaf.astype(acc) for leaf in (carry.c, carry.n, carry.m))  # (*B, H)
        log_f = f_pre if self.forget_gate == "exp" else jax.nn.log_sigmoid(f_pre)  # (*B, H)
        m_new = jnp.where(n == 0, i_pre, jnp.maximum(log_f + m, i_pre))  # (*B, H)
        i_gate = jnp.exp(i_pre - m_new)  # (*B, H), <= 1
        # <= 1; clamped before exp so that an empty memory (n = 0, m_new = ĩ) cannot overflow into 0 · inf
        f_gate = jnp.exp(jnp.minimum(log_f + m - m_new, 0.0))  # (*B, H)
        c_new = f_gate * c + i_gate * jnp.tanh(z_pre)  # (*B, H)
        n_new = f_gate * n + i_gate  # (*B, H)
        h_new = jax.nn.sigmoid(o_pre) * c_new / n_new  # (*B, H)
        new_carry = SLSTMState(h=h_new, c=c_new, n=n_new, m=m_new)
        return keep_dtype(new_carry, carry), h_new.astype(dtype)
