"""The linear recurrent unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long Sequences")."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax import _checks, linear_recurrence
from rnnjax.cells.base import Cell, batch_shape_tuple, keep_dtype
from rnnjax.cells.registry import register_cell
from rnnjax.precision import matmul
from rnnjax.types import Array, DType, Params, PRNGKey

COMPLEX_METHODS = tuple(m for m in linear_recurrence.METHODS if m != "log")
"""The solvers of :mod:`rnnjax.linear_recurrence` that take complex coefficients (all but the log-space one)."""


class LRUState(NamedTuple):
    """Carry of :class:`LRU`: the complex state ``h = h_re + i h_im`` as two real arrays."""

    h_re: Array  # (*B, N) real part, float32
    h_im: Array  # (*B, N) imaginary part, float32


@register_cell("lru")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LRU(Cell):
    """LRU: a complex diagonal linear recurrence with an exponential parameterisation and a real readout.

    .. math::
        \\lambda = \\exp(-e^{\\nu} + i e^{\\theta}), \\qquad \\gamma = e^{\\gamma_{\\log}} \\\\
        h_t = \\lambda \\odot h_{t-1} + \\gamma \\odot (x_t B), \\qquad
        y_t = \\mathrm{Re}(h_t C) + D \\odot x_t

    with ``B = B_re + i B_im`` and ``C = C_re + i C_im``; ``ν = nu_log``, ``θ = theta_log`` as in the paper's
    code. At initialisation ``|λ|`` is uniform on the ring ``r_min ≤ |λ| ≤ r_max`` (``|λ|²`` uniform on
    ``[r_min², r_max²]``), the phase ``arg λ`` uniform on ``[0, max_phase]``, and ``γ = sqrt(1 − |λ|²)`` (the
    normalisation that keeps ``h``'s variance independent of ``|λ|`` for white-noise inputs).

    The recurrence is linear in ``h``, so :meth:`sequence` (used by :func:`rnnjax.unroll`) projects the whole
    sequence with one matmul and solves it with :func:`rnnjax.linear_recurrence.linear_scan` (``"sequential"``,
    ``"associative"`` or ``"pallas"``; complex coefficients rule out ``"log"``).

    Sizes: ``N = hidden_size`` is the (complex) state size and ``O = model_size`` (default ``N``) the output
    size. The skip term ``D ⊙ x`` of the paper needs ``I == O``; for ``I != O``, ``D`` is a dense ``(I, O)``
    matrix instead.

    Parameters (``I`` inputs, ``N`` state, ``O`` outputs; kernels are ``(in, out)`` as elsewhere in rnnjax,
    i.e. the transposes of the paper's ``B`` and ``C``)::

        nu_log:    (N,)     log of −log|λ|
        theta_log: (N,)     log of the phase arg λ
        gamma_log: (N,)     log of the input normalisation γ
        B_re, B_im: (I, N)  input kernel (real, imaginary), N(0, 1/(2I)) entries
        C_re, C_im: (N, O)  output kernel (real, imaginary), N(0, 1/N) entries
        D:         (O,)     skip weights, N(0, 1) (or (I, O) when I != O)

    Attributes:
        hidden_size: ``N``.
        model_size: ``O``; ``None`` means ``N``.
        r_min, r_max: the ring of initial eigenvalue magnitudes, ``0 ≤ r_min ≤ r_max ≤ 1``.
        max_phase: initial phases are uniform on ``[0, max_phase]`` (default ``2π``).
        method: ``"sequential"``, ``"associative"`` or ``"pallas"``; ``None``:
            :func:`rnnjax.linear_recurrence.default_method`.
        param_dtype: dtype of the parameters ``init`` creates.
        dtype: compute dtype of the ``B`` and ``C`` matmuls (``None``: the parameters' dtype); ``λ``, ``γ`` and
            the recurrence are float32 (complex64).

    Example:
        >>> cell = rnnjax.LRU(hidden_size=64, r_min=0.9, r_max=0.999, max_phase=0.314)
        >>> params = cell.init(jax.random.key(0), input_size=64)
        >>> carry, ys = rnnjax.unroll(cell, params, jnp.ones((2, 1000, 64)))
        >>> ys.shape, carry.h_re.shape
        ((2, 1000, 64), (2, 64))
    """

    hidden_size: int
    model_size: int | None = None
    r_min: float = 0.0
    r_max: float = 1.0
    max_phase: float = 2 * math.pi
    method: linear_recurrence.Method | None = None
    param_dtype: DType = jnp.float32
    dtype: DType | None = None

    def __post_init__(self):
        self.check_hyperparameters()
        _checks.check_positive_int(self.model_size, "model_size", allow_none=True)
        if not 0.0 <= float(self.r_min) <= float(self.r_max) <= 1.0:
            raise ValueError(f"need 0 <= r_min <= r_max <= 1, got r_min={self.r_min}, r_max={self.r_max}")
        if not float(self.max_phase) > 0.0:
            raise ValueError(f"max_phase must be positive, got {self.max_phase}")
        if self.method is not None:
            _checks.check_choice(self.method, COMPLEX_METHODS, "method")

    @property
    def output_size(self) -> int:
        """``O``: ``model_size``, or ``hidden_size`` when unset."""
        return self.hidden_size if self.model_size is None else self.model_size

    def init(self, key: PRNGKey, input_size: int) -> Params:
        _checks.check_positive_int(input_size, "input_size")
        N, O, I = self.hidden_size, self.output_size, input_size
        k_nu, k_theta, k_bre, k_bim, k_cre, k_cim, k_d = jax.random.split(key, 7)
        tiny = float(jnp.finfo(jnp.float32).tiny)
        # |λ|² = u (r_max² − r_min²) + r_min², u ~ U(0, 1]; ν = log(−log|λ|) = log(−½ log |λ|²).
        u1 = jax.random.uniform(k_nu, (N,), jnp.float32, minval=tiny, maxval=1.0)
        modulus_sq = u1 * (self.r_max**2 - self.r_min**2) + self.r_min**2
        modulus_sq = jnp.clip(modulus_sq, tiny, 1.0 - 1e-7)  # |λ| < 1 keeps ν finite and γ > 0
        nu_log = jnp.log(-0.5 * jnp.log(modulus_sq))
        u2 = jax.random.uniform(k_theta, (N,), jnp.float32, minval=tiny, maxval=1.0)
        theta_log = jnp.log(self.max_phase * u2)
        gamma_log = 0.5 * jnp.log(1.0 - modulus_sq)  # log sqrt(1 − |λ|²)
        pd = self.param_dtype
        params = {
            "nu_log": nu_log.astype(pd),
            "theta_log": theta_log.astype(pd),
            "gamma_log": gamma_log.astype(pd),
            "B_re": (jax.random.normal(k_bre, (I, N), jnp.float32) / math.sqrt(2 * I)).astype(pd),
            "B_im": (jax.random.normal(k_bim, (I, N), jnp.float32) / math.sqrt(2 * I)).astype(pd),
            "C_re": (jax.random.normal(k_cre, (N, O), jnp.float32) / math.sqrt(N)).astype(pd),
            "C_im": (jax.random.normal(k_cim, (N, O), jnp.float32) / math.sqrt(N)).astype(pd),
            "D": jax.random.normal(k_d, (O,) if I == O else (I, O), jnp.float32).astype(pd),
        }
        return params

    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32) -> LRUState:
        shape = (*batch_shape_tuple(batch_shape), self.hidden_size)
        return LRUState(h_re=jnp.zeros(shape, dtype), h_im=jnp.zeros(shape, dtype))

    def input_size(self, params: Params) -> int:
        return params["B_re"].shape[0]

    def eigenvalues(self, params: Params) -> Array:
        """``λ = exp(−exp(ν) + i exp(θ))``, ``(N,)`` complex64 (complex128 for float64 parameters)."""
        real = _real_dtype(params)
        nu, theta = params["nu_log"].astype(real), params["theta_log"].astype(real)
        return jnp.exp(jax.lax.complex(-jnp.exp(nu), jnp.exp(theta)))

    # Shared by step and sequence so that both round the same way.

    def _input_kernel(self, params: Params) -> Array:
        """``γ ⊙ [B_re | B_im]``: ``(I, 2N)``, in float32 (the matmul casts it to the compute dtype)."""
        real = _real_dtype(params)
        gamma = jnp.exp(params["gamma_log"].astype(real))
        kernel = jnp.concatenate([params["B_re"], params["B_im"]], axis=-1).astype(real)
        return kernel * jnp.concatenate([gamma, gamma])

    def _readout(self, params: Params, h_re: Array, h_im: Array, x: Array) -> Array:
        """``Re(h C) + D ⊙ x`` = ``[h_re | h_im] [C_re; −C_im] + skip``: ``(..., N)`` -> ``(..., O)`` float32."""
        dtype, real = self.compute_dtype(params), _real_dtype(params)
        kernel = jnp.concatenate([params["C_re"], -params["C_im"]], axis=0)  # (2N, O)
        y = matmul(jnp.concatenate([h_re, h_im], axis=-1), kernel, dtype).astype(real)
        d = params["D"]
        if d.ndim == 1:
            return y + d.astype(real) * x.astype(real)
        return y + matmul(x, d, dtype).astype(real)

    def readout(self, params: Params, carry: LRUState, x: Array) -> Array:
        """``y = Re(h C) + D ⊙ x`` from the state ``carry`` and the step's input ``x``: ``(*B, O)``."""
        return self._readout(params, carry.h_re, carry.h_im, x).astype(self.compute_dtype(params))

    def recurrent_matrices(self, params: Params) -> dict[str, Array]:
        """``{"diag(lambda)": (N, N)}``, the complex diagonal transition."""
        return {"diag(lambda)": jnp.diag(self.eigenvalues(params))}

    def step(self, params: Params, carry: LRUState, x: Array) -> tuple[LRUState, Array]:
        """One step: ``x`` ``(*B, I)``, state ``(*B, N)`` -> ``(carry, y)``, ``y`` ``(*B, O)``."""
        x = self.check_step_input(params, x, carry)
        N = self.hidden_size
        acc = carry.h_re.dtype
        proj = matmul(x, self._input_kernel(params), self.compute_dtype(params)).astype(acc)  # (*B, 2N)
        lam = self.eigenvalues(params)
        lam_re, lam_im = jnp.real(lam).astype(acc), jnp.imag(lam).astype(acc)
        h_re = lam_re * carry.h_re - lam_im * carry.h_im + proj[..., :N]
        h_im = lam_re * carry.h_im + lam_im * carry.h_re + proj[..., N:]
        y = self._readout(params, h_re, h_im, x)
        return keep_dtype(LRUState(h_re, h_im), carry), y.astype(self.compute_dtype(params))

    def sequence(
        self, params: Params, carry: LRUState, xs: Array, mask: Array | None, *, unroll=1, remat=False, dropout_key=None
    ):
        """Whole-sequence path: one input matmul, a complex linear scan, one output matmul.

        Args:
            params: from :meth:`init`.
            carry: initial :class:`LRUState` ``(*B, N)``.
            xs: time-major ``(T, *B, I)``.
            mask: ``(T, *B)`` booleans or ``None``.
            unroll: steps per iteration of the sequential scan.
            remat: ignored (the scan stores only its ``(T, *B, N)`` states).

        Returns:
            ``(carry, ys)`` with ``ys`` ``(T, *B, O)`` in the compute dtype, zero where masked.
        """
        del remat, dropout_key
        xs = _checks.as_float_array(xs, "xs")
        _checks.check_features(xs, self.input_size(params), "xs")
        N = self.hidden_size
        acc = carry.h_re.dtype
        method = self.method or linear_recurrence.default_method(xs.shape[0])
        proj = matmul(xs, self._input_kernel(params), self.compute_dtype(params)).astype(acc)  # (T, *B, 2N)
        b = jax.lax.complex(proj[..., :N], proj[..., N:])  # (T, *B, N)
        h0 = jax.lax.complex(carry.h_re, carry.h_im)
        lam = self.eigenvalues(params).astype(b.dtype)
        h_last, hs = linear_recurrence.masked_linear_scan(lam, b, h0, mask, method, unroll=unroll)
        ys = self._readout(params, jnp.real(hs), jnp.imag(hs), xs)  # (T, *B, O)
        if mask is not None:
            ys = jnp.where(mask[..., None], ys, jnp.zeros_like(ys))
        new_carry = LRUState(jnp.real(h_last), jnp.imag(h_last))
        return keep_dtype(new_carry, carry), ys.astype(self.compute_dtype(params))


def _real_dtype(params: Params) -> DType:
    """float64 for float64 parameters, else float32 (the dtype of λ, γ and the recurrence)."""
    return jnp.float64 if params["nu_log"].dtype == jnp.float64 else jnp.float32
