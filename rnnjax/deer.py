"""Nonlinear recurrences evaluated parallel in time by Newton's method: DEER and quasi-DEER.

A cell's recurrence ``s_t = f(s_{t-1}, x_t)`` (``s`` the carry flattened to one vector of ``D`` numbers) is a
system of ``T`` equations in the whole trajectory ``s_1..s_T``. DEER (Lim et al. 2024, arXiv 2309.12252) solves it
with Newton's method. Linearised around a guess ``s^(k)``, the system becomes a *linear* recurrence, which an
associative scan solves in ``O(log T)`` depth::

    s = broadcast(s_0)                                  # the guess s^(0): the initial carry at every step
    for k in range(max_iter):
        prev = (s_0, s_1, ..., s_{T-1})                 # s^(k)_{t-1} for every t
        J_t = ∂f/∂s (prev_t, x_t)                       # (D, D), all t in parallel (jax.jacfwd)
        b_t = f(prev_t, x_t) - J_t prev_t
        s_new = solve  s_t = J_t s_{t-1} + b_t          # associative scan over affine maps
        done = all(|s_new - s| <= tol (1 + |s_new|))    # elementwise
        s = s_new
        if done or not all(isfinite(s)): break

Quasi-DEER (Gonzalez et al. 2024, arXiv 2407.19115) keeps only the diagonal of ``J_t``: the scan is elementwise,
``O(T·D)`` instead of ``O(T·D³)`` work and ``(T, D)`` instead of ``(T, D, D)`` memory, at the price of linear
rather than quadratic convergence, so more iterations. (The diagonal is read off ``jax.jacfwd``, ``D`` forward
passes per step as for the full Jacobian: a cell-specific diagonal would be cheaper, a generic one is not.)

Iterate ``k`` equals the sequential result at its first ``k`` steps (exact arithmetic), so ``T`` iterations
always suffice; ``max_iter`` defaults to ``T + 1`` so that the last one can confirm the update is below ``tol``.
Newton's method can still stall or overflow in floating point (products of Jacobians of an expanding cell); an
unconverged or non-finite result falls back to the sequential ``lax.scan`` unless ``fallback=False``.

The backward pass does not differentiate the iterations. At the solution the implicit-function theorem gives the
adjoint recurrence ``λ_t = g_t + J_{t+1}^T λ_{t+1}`` (``g`` the cotangent of the states): one linear recurrence,
backwards in time, solved with the same associative scan, then one vector-Jacobian product of ``f`` for the
gradients of the parameters, inputs and initial carry.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import _checks
from rnnjax.kernels import native
from rnnjax.linear_recurrence import masked_linear_scan
from rnnjax.protocol import SequenceCore
from rnnjax.types import Array, Carry, DType, Params
from rnnjax.unrolling import finish_sequence, prepare_sequence, register_method

Jacobian = Literal["full", "diagonal"]
JACOBIANS: tuple[str, ...] = typing.get_args(Jacobian)

# Default tol per state dtype: well above the rounding noise of the updates at the solution (measured between 1e-7
# and 1e-6 in float32 and below 1e-14 in float64, LSTM and Elman cells up to T = 2048), so the test is met.
DEFAULT_TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.float64): 1e-12}


class DeerInfo(NamedTuple):
    """How the Newton iteration went."""

    iterations: Array  # () int32: Newton iterations run (each one linear solve over the whole sequence)
    converged: Array  # () bool: the last update met tol and all states are finite (False: fell back, if allowed)


class _Layout(NamedTuple):
    """Where each leaf of one batch row's carry sits in the flat state vector ``s`` ``(D,)``."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]  # each leaf's shape without the batch axes
    dtypes: tuple[DType, ...]  # each leaf's dtype, restored on the way back
    dtype: DType  # the dtype of s: float64 if any leaf is, else float32

    @property
    def size(self) -> int:
        """``D``."""
        return sum(math.prod(shape) for shape in self.shapes)


class _System(NamedTuple):
    """The recurrence being solved: a cell and the layout of its state (static, hashable)."""

    cell: Any
    layout: _Layout


class _Options(NamedTuple):
    jacobian: str
    tol: float
    max_iter: int
    fallback: bool


def deer_unroll(
    cell,
    params: Params,
    xs,
    carry: Carry | None = None,
    *,
    lengths=None,
    reverse: bool = False,
    time_major: bool = False,
    jacobian: Jacobian = "full",
    tol: float | None = None,
    max_iter: int | None = None,
    fallback: bool = True,
) -> tuple[Carry, Array, DeerInfo]:
    """Runs a cell over a sequence like :func:`rnnjax.unroll`, solving for all time steps at once by Newton's method.

    With ``s_t`` one row's carry flattened to ``(D,)`` and ``f(s, x)`` the flattened new carry of
    ``cell.step``, Newton's method on the equations ``s_t = f(s_{t-1}, x_t)``, ``t = 1..T``, iterates

    .. math::
        s^{(k+1)}_t = J_t\\, s^{(k+1)}_{t-1} + f(s^{(k)}_{t-1}, x_t) - J_t\\, s^{(k)}_{t-1},
        \\qquad J_t = \\partial f / \\partial s\\,(s^{(k)}_{t-1}, x_t),

    from ``s^{(0)}_t = s_0``, each iteration a linear recurrence solved by an associative scan (``jacobian="full"``,
    DEER) or its diagonal version (``"diagonal"``, quasi-DEER). It stops when every element of the update meets
    ``|s^{(k+1)} - s^{(k)}| <= tol * (1 + |s^{(k+1)}|)`` (absolute for states below 1 in magnitude, relative
    above), or after ``max_iter`` iterations. See the module docstring for the algorithm and its gradient.

    Semantics are those of :func:`rnnjax.unroll`: outputs zero past each row's length, the final carry the carry
    after the row's last valid step, ``reverse`` within each row's length. Padded steps hold the state
    (``J = I``, ``b = 0``). One convergence test covers the whole batch. The step is traced with the native
    CPU kernels off (:mod:`rnnjax.kernels.native`): they have no forward-mode derivative, which ``jax.jacfwd``
    needs. Gradients are reverse-mode only (``jax.grad``, ``jax.vjp``); they take the full Jacobian whatever
    ``jacobian`` is, so they are exact for both. Under ``vmap`` the fallback's ``lax.cond`` becomes a select, so
    with ``fallback=True`` the sequential scan runs as well.

    Args:
        cell: a cell (anything with ``step``, ``initial_carry`` and ``input_size``) whose carry is real
            floating-point.
        params: its parameters.
        xs: inputs ``(*B, T, I)``, or ``(T, *B, I)`` when ``time_major``. ``*B`` may be empty.
        carry: initial carry with leaves ``(*B, ...)``; ``None`` means ``cell.initial_carry(B)``.
        lengths: optional integers ``(*B,)`` in ``[0, T]``: valid steps per row.
        reverse: run each row from its last valid step to its first.
        time_major: layout of ``xs`` and of the returned ``ys``.
        jacobian: ``"full"`` (DEER: ``(T, *B, D, D)`` Jacobians, quadratic convergence) or ``"diagonal"``
            (quasi-DEER: ``(T, *B, D)``, cheaper iterations, more of them).
        tol: tolerance of the update test above, ``> 0``; ``None``: ``1e-5`` for float32 states, ``1e-12`` for
            float64 (:data:`DEFAULT_TOL`). Full DEER converges quadratically, so its error is far below ``tol``;
            quasi-DEER converges linearly, and its error can exceed ``tol`` by a factor ``1 / (1 - rate)``.
        max_iter: most Newton iterations, ``>= 1``; ``None``: ``T + 1`` (``T`` make the iterate exact, one more
            confirms it).
        fallback: when the iteration has not converged after ``max_iter`` iterations, or went non-finite, return
            the sequential ``lax.scan`` result instead (``info.converged`` stays ``False``). ``False`` returns the
            last iterate.

    Returns:
        ``(final_carry, ys, info)``: ``final_carry`` as ``carry``; ``ys`` ``(*B, T, O)`` (``(T, *B, O)`` when
        ``time_major``), zero past each row's length; ``info`` a :class:`DeerInfo` of scalars.

    Raises:
        TypeError: ``cell`` has no ``step`` (or cannot stream), ``xs`` or ``lengths`` of the wrong dtype, a carry
            leaf that is not real floating-point, a ``tol`` that is not a number or a ``max_iter`` that is not
            an int.
        ValueError: an unknown ``jacobian``, ``tol <= 0``, ``max_iter < 1``, and every shape error of
            :func:`rnnjax.unroll` (``xs``, ``params``, ``carry``, ``lengths``).

    Example:
        >>> cell = rnnjax.GRU(hidden_size=8)
        >>> params = cell.init(jax.random.key(0), input_size=3)
        >>> carry, ys, info = deer_unroll(cell, params, jnp.ones((2, 16, 3)), lengths=jnp.array([16, 5]))
        >>> ys.shape, bool(info.converged)
        ((2, 16, 8), True)
    """
    with jax.named_scope(f"deer_unroll_{type(cell).__name__}"):
        method = Deer(jacobian, tol, max_iter, fallback)
        _check_cell(cell)
        seq = prepare_sequence(cell, params, xs, carry, lengths=lengths, reverse=reverse, time_major=time_major)
        carry, ys, info = method.solve(cell, params, seq.carry, seq.xs, seq.mask)
        return carry, finish_sequence(ys, seq.lengths, reverse=reverse, time_major=time_major), info


@dataclasses.dataclass(frozen=True)
class Deer:
    """DEER as a method of :func:`rnnjax.unroll`: ``unroll(cell, params, xs, method=Deer(...))``.

    ``unroll(..., method="deer")`` is ``Deer()`` and ``method="quasi_deer"`` is ``Deer(jacobian="diagonal")``.
    The fields are :func:`deer_unroll`'s arguments of the same names, checked when the object is made.

    Example:
        >>> cell = rnnjax.GRU(hidden_size=8)
        >>> params = cell.init(jax.random.key(0), input_size=3)
        >>> carry, ys = rnnjax.unroll(cell, params, jnp.ones((2, 16, 3)), method=rnnjax.Deer(tol=1e-4))
        >>> ys.shape
        (2, 16, 8)
    """

    jacobian: Jacobian = "full"
    tol: float | None = None
    max_iter: int | None = None
    fallback: bool = True

    def __post_init__(self):
        _checks.check_choice(self.jacobian, JACOBIANS, "jacobian")
        _check_max_iter(self.max_iter)
        if self.tol is not None:
            _resolve_tol(self.tol, jnp.float32)
        if not isinstance(self.fallback, bool):
            raise TypeError(f"fallback must be a bool, got {self.fallback!r}")

    def run(self, core, params: Params, carry: Carry, xs: Array, mask: Array | None) -> tuple[Carry, Array]:
        """:class:`rnnjax.unrolling.SequenceMethod`: ``(final_carry, ys (T, *B, O))`` for time-major ``xs``."""
        _check_cell(core)
        carry, ys, _ = self.solve(core, params, carry, xs, mask)
        return carry, ys

    def solve(self, cell, params: Params, carry: Carry, xs: Array, mask: Array | None):
        """DEER on time-major ``xs`` ``(T, *B, I)``, ``mask`` ``(T, *B)`` or None: ``(carry, ys, info)``."""
        num_steps, batch_shape = xs.shape[0], xs.shape[1:-1]
        layout = _layout(carry, len(batch_shape))
        options = _Options(
            self.jacobian, _resolve_tol(self.tol, layout.dtype), self.max_iter or num_steps + 1, self.fallback
        )
        if mask is None:
            mask = jnp.ones((num_steps, *batch_shape), bool)  # (T, *B)
        return _run(_System(cell, layout), options, params, carry, xs, mask)


def _run(system: _System, options: _Options, params: Params, carry: Carry, xs: Array, mask: Array):
    """DEER on time-major ``xs`` ``(T, *B, I)`` and ``mask`` ``(T, *B)``: ``(final_carry, ys (T, *B, O), info)``."""
    num_steps, batch_shape = xs.shape[0], xs.shape[1:-1]
    rows = math.prod(batch_shape)
    s0 = _flatten(system.layout, carry, len(batch_shape)).reshape(rows, system.layout.size)  # (N, D)
    xs = xs.reshape(num_steps, rows, xs.shape[-1])  # (T, N, I)
    mask = mask.reshape(num_steps, rows)  # (T, N)
    if num_steps == 0:
        row_s = jax.ShapeDtypeStruct((system.layout.size,), system.layout.dtype)  # (D,)
        row_x = jax.ShapeDtypeStruct(xs.shape[-1:], xs.dtype)  # (I,)
        y = jax.eval_shape(lambda s, x: _row_step(system, params, s, x)[1], row_s, row_x)
        ys = jnp.zeros((0, *batch_shape, *y.shape), y.dtype)  # (0, *B, O)
        return carry, ys, DeerInfo(jnp.zeros((), jnp.int32), jnp.ones((), bool))
    nograd = jax.lax.stop_gradient
    states, info = _solve(system, options, nograd(params), nograd(xs), mask, nograd(s0))  # (T, N, D)
    states = _with_implicit_gradient(system, params, xs, mask, s0, states)  # (T, N, D)
    prev = _shift_in(s0, states)  # (T, N, D)
    _, ys = _map_rows(functools.partial(_row_step, system), params, prev, xs)  # (T, N, O)
    ys = jnp.where(mask[..., None], ys, jnp.zeros_like(ys))  # (T, N, O)
    final = _unflatten(system.layout, states[-1].reshape(*batch_shape, system.layout.size))  # leaves (*B, ...)
    return final, ys.reshape(num_steps, *batch_shape, *ys.shape[2:]), info


# The flat state: one row's carry as a vector of D numbers.


def _layout(carry: Carry, batch_ndim: int) -> _Layout:
    leaves, treedef = jax.tree.flatten(carry)
    dtypes = tuple(jnp.dtype(jnp.result_type(leaf)) for leaf in leaves)
    for dtype in dtypes:
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"carry leaves must be real floating-point for DEER (it differentiates the step by the state), "
                f"got {dtype} in {treedef}"
            )
    wide = any(dtype == jnp.dtype(jnp.float64) for dtype in dtypes)
    shapes = tuple(tuple(np.shape(leaf)[batch_ndim:]) for leaf in leaves)
    return _Layout(treedef, shapes, dtypes, jnp.dtype(jnp.float64 if wide else jnp.float32))


def _flatten(layout: _Layout, carry: Carry, batch_ndim: int) -> Array:
    """Carry with leaves ``(*B, ...)`` -> ``(*B, D)`` in ``layout.dtype``."""
    leaves = jax.tree.leaves(carry)
    batch_shape = np.shape(leaves[0])[:batch_ndim] if leaves else ()
    parts = [
        jnp.reshape(leaf, (*batch_shape, math.prod(shape))).astype(layout.dtype)
        for leaf, shape in zip(leaves, layout.shapes)
    ]
    return jnp.concatenate(parts, axis=-1) if parts else jnp.zeros((*batch_shape, 0), layout.dtype)


def _unflatten(layout: _Layout, s: Array) -> Carry:
    """``(*B, D)`` -> carry with leaves ``(*B, ...)`` in their own dtypes."""
    splits = np.cumsum([math.prod(shape) for shape in layout.shapes])[:-1]
    parts = jnp.split(s, splits, axis=-1) if layout.shapes else []
    leaves = [
        part.reshape(*s.shape[:-1], *shape).astype(dtype)
        for part, shape, dtype in zip(parts, layout.shapes, layout.dtypes)
    ]
    return jax.tree.unflatten(layout.treedef, leaves)


# The recurrence s_t = f(s_{t-1}, x_t) on one row, and over all (t, row) pairs at once.


def _row_step(system: _System, params: Params, s: Array, x: Array) -> tuple[Array, Array]:
    """``cell.step`` on one row: ``s`` ``(D,)``, ``x`` ``(I,)`` -> ``(f(s, x) (D,), y (O,))``."""
    with native.use_native(False):  # the native kernels are custom VJPs: no jacfwd through them
        carry, y = system.cell.step(params, _unflatten(system.layout, s), x)
    return _flatten(system.layout, carry, 0), y


def _transition(system: _System, params: Params, s: Array, x: Array, valid: Array) -> Array:
    """``f(s, x)`` where the step is valid, ``s`` (held) where it is padding: ``(D,)``."""
    return jnp.where(valid, _row_step(system, params, s, x)[0], s)


def _map_rows(fn, params: Params, *row_args):
    """``fn(params, *row_args)`` for every ``(t, n)``: each row argument ``(T, N, ...)``."""
    in_axes = (None,) + (0,) * len(row_args)
    return jax.vmap(jax.vmap(fn, in_axes=in_axes), in_axes=in_axes)(params, *row_args)


def _linearise(system: _System, params: Params, prev: Array, xs: Array, mask: Array, diagonal: bool):
    """``(f(prev_t, x_t), J_t)`` for every ``(t, n)``: ``(T, N, D)`` and ``(T, N, D, D)`` (``(T, N, D)`` diagonal)."""

    def row(params, s, x, valid):
        def f(s):
            value = _transition(system, params, s, x, valid)  # (D,)
            return value, value

        jac, value = jax.jacfwd(f, has_aux=True)(s)  # (D, D), (D,)
        return value, (jnp.diagonal(jac) if diagonal else jac)

    return _map_rows(row, params, prev, xs, mask)


def _shift_in(s0: Array, states: Array) -> Array:
    """``s_{t-1}`` for every ``t``: ``(s0, s_1, ..., s_{T-1})``, ``(T, N, D)``."""
    return jnp.concatenate([s0[None], states[:-1]], axis=0)


# Linear recurrences s_t = A_t s_{t-1} + b_t with matrix A_t.


# Full float32 products: at the solution J_t s_{t-1} must cancel between the scan and b_t to rounding, which
# reduced-precision matmuls (TF32, the default for float32 on recent GPUs) would not do.
_matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def _matvec(a: Array, v: Array) -> Array:
    """``A v`` over leading axes: ``a`` ``(..., D, D)``, ``v`` ``(..., D)`` -> ``(..., D)``."""
    return _matmul(a, v[..., None])[..., 0]


def _compose(earlier, later):
    """The affine map ``s -> A s + b`` of ``earlier`` followed by ``later``: ``(A2 A1, A2 b1 + b2)``."""
    a1, b1 = earlier  # (..., D, D), (..., D)
    a2, b2 = later
    return _matmul(a2, a1), _matvec(a2, b1) + b2


def _matrix_linear_scan(a: Array, b: Array, s0: Array, reverse: bool = False) -> Array:
    """Solves ``s_t = A_t s_{t-1} + b_t`` from ``s0`` (the step before the first, or after the last if ``reverse``).

    Args:
        a: ``(T, N, D, D)``.
        b: ``(T, N, D)``.
        s0: ``(N, D)``.
        reverse: run from ``t = T`` down to ``t = 1``.

    Returns:
        ``(T, N, D)``: every ``s_t``.
    """
    first = -1 if reverse else 0
    b = b.at[first].add(_matvec(a[first], s0))  # fold s0 into the first step
    return jax.lax.associative_scan(_compose, (a, b), reverse=reverse, axis=0)[1]


# The forward solve: Newton iterations in a while loop, then the sequential fallback.


def _newton_step(system, options, params, xs, mask, s0, states):
    """One Newton (DEER) or quasi-Newton (quasi-DEER) iteration: ``states`` ``(T, N, D)`` -> the next iterate."""
    prev = _shift_in(s0, states)  # (T, N, D)
    diagonal = options.jacobian == "diagonal"
    value, jac = _linearise(system, params, prev, xs, mask, diagonal)  # (T, N, D), (T, N, D[, D])
    if diagonal:
        b = value - jac * prev  # (T, N, D)
        return masked_linear_scan(jac, b, s0, None, "associative")[1]
    b = value - _matvec(jac, prev)  # (T, N, D)
    return _matrix_linear_scan(jac, b, s0)


def _sequential(system, params, xs, mask, s0):
    """The reference: ``lax.scan`` of the masked step over time, ``(T, N, D)``."""

    def body(s, inputs):
        x, valid = inputs  # (N, I), (N,)
        s = jax.vmap(functools.partial(_transition, system), in_axes=(None, 0, 0, 0))(params, s, x, valid)
        return s, s

    return jax.lax.scan(body, s0, (xs, mask))[1]


def _solve(system, options, params, xs, mask, s0) -> tuple[Array, DeerInfo]:
    """The trajectory ``(T, N, D)`` of ``s_t = f(s_{t-1}, x_t)`` by Newton's method, and how it went."""

    def keep_going(loop):
        k, _, done, finite = loop
        return (k < options.max_iter) & ~done & finite

    def iterate(loop):
        k, states, _, _ = loop
        new = _newton_step(system, options, params, xs, mask, s0, states)  # (T, N, D)
        done = jnp.all(jnp.abs(new - states) <= options.tol * (1 + jnp.abs(new)))
        return k + 1, new, done, jnp.all(jnp.isfinite(new))

    guess = jnp.broadcast_to(s0, (xs.shape[0], *s0.shape))  # (T, N, D)
    start = (jnp.zeros((), jnp.int32), guess, jnp.zeros((), bool), jnp.ones((), bool))
    iterations, states, done, finite = jax.lax.while_loop(keep_going, iterate, start)
    converged = done & finite
    if options.fallback:
        states = jax.lax.cond(converged, lambda: states, lambda: _sequential(system, params, xs, mask, s0))
    return states, DeerInfo(iterations, converged)


# The backward pass: one reverse linear recurrence with the Jacobians at the solution.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _with_implicit_gradient(system, params, xs, mask, s0, states):
    """``states`` (the solution, computed without gradients), given the gradient the implicit function has."""
    del system, params, xs, mask, s0
    return states


def _implicit_fwd(system, params, xs, mask, s0, states):
    del system
    return states, (params, xs, mask, s0, states)


def _implicit_bwd(system, residuals, g):
    params, xs, mask, s0, states = residuals
    prev = _shift_in(s0, states)  # (T, N, D)
    _, jac = _linearise(system, params, prev, xs, mask, diagonal=False)  # (T, N, D, D)
    # λ_t = g_t + J_{t+1}^T λ_{t+1}: a reverse recurrence with the transposed Jacobians shifted by one step.
    jac_next = jnp.concatenate([jnp.swapaxes(jac[1:], -1, -2), jnp.zeros_like(jac[:1])], axis=0)  # (T, N, D, D)
    adjoint = _matrix_linear_scan(jac_next, g, jnp.zeros_like(s0), reverse=True)  # (T, N, D)
    transition = functools.partial(_transition, system)
    _, pullback = jax.vjp(lambda p, s, x: _map_rows(transition, p, s, x, mask), params, prev, xs)
    d_params, d_prev, d_xs = pullback(adjoint)
    return d_params, d_xs, None, d_prev[0], jnp.zeros_like(states)


_with_implicit_gradient.defvjp(_implicit_fwd, _implicit_bwd)


# Argument checks.


def _check_cell(cell) -> None:
    if not callable(getattr(cell, "step", None)) or not callable(getattr(cell, "initial_carry", None)):
        raise TypeError(f"cell must have step and initial_carry methods (a cell), got {type(cell).__name__}")
    if isinstance(cell, SequenceCore) and not cell.can_stream:
        raise TypeError(f"cell must run one step at a time; {type(cell).__name__} needs the whole sequence")


def _check_max_iter(max_iter) -> None:
    if max_iter is None:
        return
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)):
        raise TypeError(f"max_iter must be an int >= 1 or None, got {max_iter!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")


def _resolve_tol(tol, dtype: DType) -> float:
    if tol is None:
        return DEFAULT_TOL[jnp.dtype(dtype)]
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating, np.integer)):
        raise TypeError(f"tol must be a positive float or None, got {tol!r}")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite float > 0, got {tol}")
    return float(tol)


register_method("deer", Deer())
register_method("quasi_deer", Deer(jacobian="diagonal"))
