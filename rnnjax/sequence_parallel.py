"""Sequence parallelism for linear recurrences: the time axis split over the devices of a mesh.

A recurrence linear in ``h``, ``h_t = a_t ⊙ h_{t-1} + b_t`` (minGRU, minLSTM, LRU, ...), composes: the solution
over a chunk of steps is an affine map of the state entering the chunk. So with time sharded over ``P`` devices
(``jax.shard_map``), shard ``p`` holding steps ``[pC, (p+1)C)``::

    ĥ_t = a_t ⊙ ĥ_{t-1} + b_t,  ĥ = 0 before the chunk     # 1. local solve from a zero state
    Π_t = a_t ⊙ Π_{t-1},        Π = 1 before the chunk     #    and the chunk's cumulative decay
    (Π⁽ᵖ⁾, ĥ⁽ᵖ⁾) = (Π_last, ĥ_last)                         # 2. summaries, all_gather-ed: (P, *S) each
    h_in⁽⁰⁾ = h_0,  h_in⁽ᵖ⁺¹⁾ = Π⁽ᵖ⁾ ⊙ h_in⁽ᵖ⁾ + ĥ⁽ᵖ⁾        # 3. exclusive prefix of the summaries
    h_t = ĥ_t + Π_t ⊙ h_in⁽ᵖ⁾                                # 4. correction, pointwise in time

Step 3 is the same linear recurrence over the ``P`` summaries, i.e. the exclusive scan of the associative
operator ``(Π₁, ĥ₁) ∘ (Π₂, ĥ₂) = (Π₁ Π₂, Π₂ ĥ₁ + ĥ₂)`` seeded with ``h_0``; it is ``P`` steps long and every shard
computes it redundantly (``O(P·S)`` work, one ``all_gather`` of ``2·S`` numbers per shard). Steps 1 and 4 are the
local ``O(T/P)`` work, solved with :func:`rnnjax.linear_recurrence.masked_linear_scan` (``"sequential"`` or
``"associative"``; the log-space solver does not trace inside ``shard_map`` yet: its cumulative sums start from
a constant typed as replicated).
This is the scheme of recurrentgemma's sharded scan.

Gradients are those of the single-device solve: JAX differentiates the ``shard_map`` (the ``all_gather``
transposes to a reduce-scatter), and each local solve brings its own custom VJP. Masked steps hold the state
(``a = 1``, ``b = 0``) and output zero, as in :func:`rnnjax.masked_scan`; ``T`` that is not a multiple of ``P`` is
padded at the end with masked steps, which change nothing.

Two entry points:

* :func:`linear_scan` solves given coefficients ``(a, b)``; :func:`linear_scan_shard` is its per-shard body for
  code that is already inside a ``shard_map``.
* :func:`unroll` runs a linear cell (minGRU, minLSTM, LRU, or any cell with ``linear_coefficients`` /
  ``linear_outputs`` methods, see :class:`LinearForm`) like :func:`rnnjax.unroll`, with the input projection,
  the scan and the readout all inside the ``shard_map``, so no device ever holds more than ``T/P`` steps.

Shapes: ``T`` time, ``B`` batch axes, ``I`` inputs, ``N`` state (``H`` for minGRU / minLSTM), ``S = (*B, N)``,
``P`` devices along the mesh axis, ``C = T/P`` steps per shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from rnnjax import _checks, linear_recurrence
from rnnjax.cells.base import keep_dtype
from rnnjax.cells.lru import LRU, LRUState
from rnnjax.cells.minimal import _MinimalCell
from rnnjax.kernels import minimal as minimal_kernel
from rnnjax.precision import matmul
from rnnjax.types import Array, Carry, Params
from rnnjax.unrolling import finish_sequence, prepare_sequence

__all__ = [
    "SHARDED_METHODS",
    "LinearForm",
    "linear_form",
    "linear_scan",
    "linear_scan_shard",
    "register_linear_form",
    "unroll",
]


# The exchange between shards.


def linear_scan_shard(
    a: Array, b: Array, h0: Array, mask: Array | None, *, axis_name: str, method: str = "sequential"
) -> tuple[Array, Array]:
    """One shard's part of a time-sharded linear scan; call it inside ``jax.shard_map``.

    Solves the shard's chunk from a zero state, exchanges ``(Π, ĥ)`` summaries with an ``all_gather`` over
    ``axis_name``, and corrects its states with ``Π_t ⊙ h_in`` (see the module docstring for the math).

    Args:
        a: this shard's coefficients ``(C, *S)``, or broadcastable to ``b`` (e.g. a time-invariant ``(N,)``).
        b: this shard's inputs ``(C, *S)`` in the dtype to solve in (see
            :func:`rnnjax.linear_recurrence.solve_dtype`); ``a`` and ``h0`` in the same dtype.
        h0: the state before the first step of the whole sequence, ``(*S)``, the same on every shard.
        mask: this shard's ``(C, *L)`` booleans (``L`` a prefix of ``S``), false where a step is padding; or
            ``None``.
        axis_name: the mesh axis time is sharded over; shards are in time order along it.
        method: the local solver, ``"sequential"`` or ``"associative"`` (:data:`SHARDED_METHODS`).

    Returns:
        ``(h_last, hs)``: this shard's final state ``(*S)`` (the sequence's final state on the last shard) and its
        states ``(C, *S)``, zero where masked.
    """
    _check_method(method)
    a, h0 = _varying(a, axis_name), _varying(h0, axis_name)  # a time-invariant a's gradient is then summed
    zeros, ones = jnp.zeros_like(h0), jnp.ones_like(h0)
    local_last, local = linear_recurrence.masked_linear_scan(a, b, zeros, mask, method)  # ĥ: (*S), (C, *S)
    decay_last, decay = linear_recurrence.masked_linear_scan(a, jnp.zeros_like(b), ones, mask, method)  # Π
    h_in = _incoming_state(decay_last, local_last, h0, axis_name)  # (*S)
    return local_last + decay_last * h_in, local + decay * h_in  # zero where masked: ĥ_t = Π_t = 0 there


def _incoming_state(decay_last: Array, local_last: Array, h0: Array, axis_name: str) -> Array:
    """``h_in⁽ᵖ⁾`` for this shard: the exclusive prefix of every shard's ``(Π⁽q⁾, ĥ⁽q⁾)`` applied to ``h0``."""
    decays = jax.lax.all_gather(decay_last, axis_name)  # (P, *S) Π⁽q⁾
    finals = jax.lax.all_gather(local_last, axis_name)  # (P, *S) ĥ⁽q⁾
    _, outgoing = linear_recurrence.masked_linear_scan(decays, finals, h0, None, "sequential")  # h_in⁽q⁺¹⁾
    incoming = jnp.concatenate([h0[None], outgoing[:-1]], axis=0)  # (P, *S) h_in⁽q⁾
    return incoming[jax.lax.axis_index(axis_name)]


def _from_last_shard(x: Array, axis_name: str) -> Array:
    """The last shard's ``x`` on every shard (a ``psum`` of ``x`` there and zeros elsewhere), typed invariant."""
    last = jax.lax.axis_index(axis_name) == jax.lax.axis_size(axis_name) - 1
    return jax.lax.psum(jnp.where(last, x, jnp.zeros_like(x)), axis_name)


def _varying(x: Array, axis_name: str) -> Array:
    """``x`` typed as varying over ``axis_name`` (a scan carry must be, once it meets sharded values)."""
    if axis_name in jax.typeof(x).manual_axis_type.varying:
        return x
    return jax.lax.pcast(x, (axis_name,), to="varying")


def linear_scan(
    a,
    b,
    h0=None,
    *,
    mesh: Mesh,
    axis_name: str | None = None,
    lengths=None,
    mask=None,
    method: linear_recurrence.Method | None = None,
) -> tuple[Array, Array]:
    """Solves ``h_t = a_t ⊙ h_{t-1} + b_t`` with the time axis sharded over ``axis_name`` of ``mesh``.

    The same numbers as :func:`rnnjax.linear_recurrence.linear_scan` up to rounding, values and gradients; each
    device solves ``C = ⌈T/P⌉`` steps and exchanges two ``(*S)`` arrays (module docstring). Every other mesh
    axis holds a replica.

    Args:
        a: coefficients ``(T, *S)``, or broadcastable to ``b`` (a time-invariant ``(*S)``-like array such as the
            LRU's ``(N,)`` is replicated); real or complex.
        b: inputs ``(T, *S)``.
        h0: initial state ``(*S)``; ``None`` means zeros.
        mesh: the device mesh.
        axis_name: the mesh axis to shard time over; ``None`` for a one-axis mesh.
        lengths: optional integers ``(*L)`` (``L`` a prefix of ``S``): valid steps per row.
        mask: optional booleans ``(T, *L)``, false where a step holds the state (``a = 1``, ``b = 0``) and outputs
            zero; not together with ``lengths``.
        method: the local solver, ``"sequential"`` or ``"associative"``; ``None``:
            :func:`rnnjax.linear_recurrence.default_method` for ``C`` steps.

    Returns:
        ``(h_last, hs)``: ``(*S)`` and ``(T, *S)``, ``hs`` sharded over time, float32 for 16-bit inputs
        (complex64 for complex ones).

    Raises:
        ValueError: naming ``axis_name`` (not an axis of ``mesh``), ``a``, ``b``, ``h0``, ``lengths`` or ``mask``
            (shapes), or ``method``.

    Example:
        >>> mesh = jax.make_mesh((jax.device_count(),), ("time",))
        >>> a = jnp.full((8, 3), 0.5); b = jnp.ones((8, 3))
        >>> h_last, hs = rnnjax.sequence_parallel.linear_scan(a, b, mesh=mesh)
        >>> hs[:4, 0]
        Array([1.   , 1.5  , 1.75 , 1.875], dtype=float32)
    """
    axis_name = _mesh_axis(mesh, axis_name)
    shards = mesh.shape[axis_name]
    b_array = _checks.as_float_array(b, "b")
    _checks.check_rank(b_array, "b", 1, "(time, *state)")
    num_steps = b_array.shape[0]
    if method is None:
        method = linear_recurrence.default_method(-(-num_steps // shards))
    _check_method(method)
    if lengths is not None and mask is not None:
        raise ValueError("give lengths or mask, not both")
    a, b, h0, _, length_mask, method = linear_recurrence._prepare(a, b, h0, lengths, method, "a", "b")
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_ or mask.ndim < 1 or mask.shape != b.shape[: mask.ndim]:
            raise ValueError(
                f"mask must be booleans (T, *L) with (T, *L) a prefix of b's shape {b.shape}, "
                f"got {mask.dtype} {mask.shape}"
            )
    else:
        mask = length_mask
    if num_steps == 0:
        return h0, jnp.zeros(b.shape, h0.dtype)
    time_varying = a.ndim == b.ndim
    if time_varying:
        a = jnp.broadcast_to(a, (num_steps, *a.shape[1:]))
        (a, b), mask = _pad_time((a, b), mask, (num_steps,), shards, fill=(1, 0))
    else:
        (b,), mask = _pad_time((b,), mask, (num_steps,), shards, fill=(0,))
    time = PartitionSpec(axis_name)

    def body(a, b, h0, mask):
        h_last, hs = linear_scan_shard(a, b, h0, mask, axis_name=axis_name, method=method)
        return _from_last_shard(h_last, axis_name), hs

    sharded = jax.shard_map(
        body,
        mesh=_automatic(mesh),
        in_specs=(time if time_varying else PartitionSpec(), time, PartitionSpec(), time),
        out_specs=(PartitionSpec(), time),
    )
    h_last, hs = sharded(a, b, h0, mask)
    return h_last, hs[:num_steps]


# Linear cells: coefficients inside the shard, then the shared exchange.


class LinearForm(NamedTuple):
    """How :func:`unroll` runs a cell as a linear recurrence (two functions of the cell and its parameters).

    ``coefficients(cell, params, carry, xs) -> (a, b, h0)``: from time-major inputs ``xs`` ``(C, *B, I)`` (one
    shard's chunk) and the initial carry, the recurrence's ``a`` (broadcastable to ``b``), ``b`` ``(C, *B, N)`` and
    ``h0`` ``(*B, N)``, all in the dtype to solve in. Must be pointwise in time.

    ``outputs(cell, params, carry, h_last, hs, xs, mask) -> (carry, ys)``: the new carry (with the dtypes of the
    initial ``carry``) from the final state ``h_last`` ``(*B, N)``, and the outputs ``ys`` ``(C, *B, O)`` from the
    states ``hs`` ``(C, *B, N)`` (zero where ``mask`` ``(C, *B)`` is false; ``mask`` may be ``None``).

    A cell may instead define the methods ``linear_coefficients(params, carry, xs)`` and
    ``linear_outputs(params, carry, h_last, hs, xs, mask)`` with the same meaning.
    """

    coefficients: Callable[..., tuple[Array, Array, Array]]
    outputs: Callable[..., tuple[Carry, Array]]


_FORMS: dict[type, LinearForm] = {}


def register_linear_form(cell_type: type, form: LinearForm) -> None:
    """Tells :func:`unroll` how to run ``cell_type`` (and its subclasses) as a linear recurrence."""
    _FORMS[cell_type] = form


def linear_form(cell) -> LinearForm:
    """The :class:`LinearForm` of ``cell``: its own ``linear_coefficients`` / ``linear_outputs`` methods, else
    the one registered for its class or nearest base class.

    Raises:
        TypeError: naming ``cell``, if it is not a linear recurrence this module knows.
    """
    if hasattr(cell, "linear_coefficients") and hasattr(cell, "linear_outputs"):
        return LinearForm(lambda c, *args: c.linear_coefficients(*args), lambda c, *args: c.linear_outputs(*args))
    for cls in type(cell).__mro__:
        if cls in _FORMS:
            return _FORMS[cls]
    known = ", ".join(sorted(cls.__name__ for cls in _FORMS))
    raise TypeError(
        f"cell: {type(cell).__name__} is not a linear recurrence that sequence parallelism can run (known: "
        f"{known}, and cells with linear_coefficients / linear_outputs methods; see register_linear_form)"
    )


def _minimal_coefficients(cell: _MinimalCell, params: Params, carry, xs: Array):
    """minGRU / minLSTM: ``a = 1 − z = σ(−u)``, ``b = z ⊙ v`` (the cells' own gate algebra)."""
    H = cell.hidden_size
    h0 = carry.h  # (*B, H)
    proj = cell._project(params, xs, h0.dtype)  # (C, *B, kH)
    z, v = minimal_kernel.gate_and_candidate(cell._kind, cell.activation, proj, H)  # (C, *B, H) each
    a = jax.nn.sigmoid(-minimal_kernel.gate_logit(cell._kind, proj, H))  # 1 − z without the cancellation
    return a, z * v, h0


def _minimal_outputs(cell: _MinimalCell, params: Params, carry, h_last, hs, xs, mask):
    del xs, mask  # y = h, already zero where masked
    return keep_dtype(cell._state(h_last), carry), hs.astype(cell.compute_dtype(params))


def _lru_coefficients(cell: LRU, params: Params, carry: LRUState, xs: Array):
    """LRU: ``a = λ`` ``(N,)`` (time-invariant, complex), ``b = γ ⊙ (x B)``."""
    N = cell.hidden_size
    acc = carry.h_re.dtype
    proj = matmul(xs, cell._input_kernel(params), cell.compute_dtype(params)).astype(acc)  # (C, *B, 2N)
    b = jax.lax.complex(proj[..., :N], proj[..., N:])  # (C, *B, N)
    return cell.eigenvalues(params).astype(b.dtype), b, jax.lax.complex(carry.h_re, carry.h_im)


def _lru_outputs(cell: LRU, params: Params, carry: LRUState, h_last, hs, xs, mask):
    ys = cell._readout(params, jnp.real(hs), jnp.imag(hs), xs)  # (C, *B, O)
    if mask is not None:
        ys = jnp.where(mask[..., None], ys, jnp.zeros_like(ys))
    new_carry = LRUState(jnp.real(h_last), jnp.imag(h_last))
    return keep_dtype(new_carry, carry), ys.astype(cell.compute_dtype(params))


register_linear_form(_MinimalCell, LinearForm(_minimal_coefficients, _minimal_outputs))
register_linear_form(LRU, LinearForm(_lru_coefficients, _lru_outputs))


def unroll(
    cell,
    params: Params,
    xs,
    mesh: Mesh,
    carry: Carry | None = None,
    *,
    axis_name: str | None = None,
    lengths=None,
    reverse: bool = False,
    time_major: bool = False,
    method: linear_recurrence.Method | None = None,
) -> tuple[Carry, Array]:
    """:func:`rnnjax.unroll` for a linear cell, with the time axis sharded over ``axis_name`` of ``mesh``.

    Inside one ``jax.shard_map``, each device projects its ``C = ⌈T/P⌉`` steps of ``xs`` (pointwise in time),
    solves them with :func:`linear_scan_shard` (the only exchange between devices) and reads its outputs out.
    Parameters and the initial carry are replicated; every other mesh axis holds a replica. The numbers equal
    :func:`rnnjax.unroll` on one device up to rounding, values and gradients, with the same variable-length and
    ``reverse`` semantics.

    Args:
        cell: :class:`rnnjax.MinGRU`, :class:`rnnjax.MinLSTM`, :class:`rnnjax.LRU`, or a cell with a
            :class:`LinearForm` (registered or as methods).
        params: its parameters.
        xs: inputs ``(*B, T, I)``, or ``(T, *B, I)`` when ``time_major``.
        mesh: the device mesh.
        carry: initial carry ``(*B, ...)``; ``None``: ``cell.initial_carry(B)``.
        axis_name: the mesh axis to shard time over; ``None`` for a one-axis mesh.
        lengths: optional integers ``(*B,)`` in ``[0, T]``.
        reverse: run each row from its last valid step to its first.
        time_major: layout of ``xs`` and of the returned ``ys``.
        method: the local solver, ``"sequential"`` or ``"associative"``; ``None``: the cell's ``method`` if it
            is one of those, else :func:`rnnjax.linear_recurrence.default_method` for ``C`` steps (a cell's
            ``"log"`` or ``"pallas"`` is a choice of solver, so it falls back too; the numbers agree up to
            rounding).

    Returns:
        ``(final_carry, ys)``, ``ys`` ``(*B, T, O)`` (``(T, *B, O)`` when ``time_major``), zero past each row's
        length.

    Raises:
        TypeError: naming ``cell`` when it is not a linear recurrence (see :func:`linear_form`).
        ValueError: naming ``axis_name``, ``xs``, ``params``, ``carry``, ``lengths`` or ``method``.

    Example:
        >>> mesh = jax.make_mesh((jax.device_count(),), ("time",))
        >>> cell = rnnjax.MinGRU(hidden_size=16)
        >>> params = cell.init(jax.random.key(0), input_size=4)
        >>> carry, ys = rnnjax.sequence_parallel.unroll(cell, params, jnp.ones((2, 64, 4)), mesh)
        >>> ys.shape
        (2, 64, 16)
    """
    form = linear_form(cell)
    axis_name = _mesh_axis(mesh, axis_name)
    shards = mesh.shape[axis_name]
    with jax.named_scope(f"sequence_parallel_unroll_{type(cell).__name__}"):
        seq = prepare_sequence(cell, params, xs, carry, lengths=lengths, reverse=reverse, time_major=time_major)
        xs, carry, mask, num_steps = seq.xs, seq.carry, seq.mask, seq.num_steps  # xs (T, *B, I), mask (T, *B)
        if method is None:
            method = getattr(cell, "method", None)
            if method not in SHARDED_METHODS:  # unset, "log" or "pallas": a solver choice, not other numbers
                method = linear_recurrence.default_method(-(-num_steps // shards))
        _check_method(method)
        if num_steps == 0 or math.prod(seq.batch_shape) == 0:
            ys = jnp.zeros((*xs.shape[:-1], cell.output_size), cell.compute_dtype(params))  # (T, *B, O)
            return carry, finish_sequence(ys, seq.lengths, reverse=reverse, time_major=time_major)
        (xs,), mask = _pad_time((xs,), mask, xs.shape[:-1], shards, fill=(0,))
        time = PartitionSpec(axis_name)

        def body(params, carry, xs, mask):
            a, b, h0 = form.coefficients(cell, params, carry, xs)  # (C, *B, N) or broadcastable, (C, *B, N), (*B, N)
            h_last, hs = linear_scan_shard(a, b, h0, mask, axis_name=axis_name, method=method)
            new_carry, ys = form.outputs(cell, params, carry, h_last, hs, xs, mask)
            return jax.tree.map(lambda leaf: _from_last_shard(leaf, axis_name), new_carry), ys  # ys (C, *B, O)

        sharded = jax.shard_map(
            body,
            mesh=_automatic(mesh),
            in_specs=(PartitionSpec(), PartitionSpec(), time, time),
            out_specs=(PartitionSpec(), time),
        )
        carry, ys = sharded(params, carry, xs, mask)
        return carry, finish_sequence(ys[:num_steps], seq.lengths, reverse=reverse, time_major=time_major)


# Plumbing.


SHARDED_METHODS = ("sequential", "associative")
"""The local solvers that run inside ``shard_map``: the log-space one starts its cumulative sums from a constant
that ``shard_map``'s type check sees as replicated, so it fails to trace there (see the module docstring); the
Pallas kernel's outputs carry no varying mesh axes, which the same check rejects (and interpret mode's slices
mix varying and replicated operands)."""


def _check_method(method) -> None:
    if method == "log":
        raise ValueError(
            "method='log' cannot run inside shard_map yet (its cumulative sums start from an unsharded constant); "
            "use 'sequential' or 'associative'"
        )
    if method == "pallas":
        raise ValueError(
            "method='pallas' cannot run inside shard_map yet (pallas_call gives its outputs no varying mesh axes); "
            "use 'sequential' or 'associative'"
        )
    _checks.check_choice(method, SHARDED_METHODS, "method")


def _mesh_axis(mesh: Mesh, axis_name: str | None) -> str:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"axis_name: the mesh has axes {mesh.axis_names}; name the one to shard time over")
        return mesh.axis_names[0]
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh, whose axes are {mesh.axis_names}")
    return axis_name


def _automatic(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis automatic (the default of ``jax.make_mesh`` is explicit).

    The ``shard_map`` places the scan by hand either way; automatic axes let the padding, the slicing and the
    per-row reversal around it be partitioned by XLA, which explicit sharding types refuse for uneven slices
    and gathers along a sharded axis.
    """
    if all(kind == jax.sharding.AxisType.Auto for kind in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))


def _pad_time(arrays: tuple[Array, ...], mask: Array | None, mask_shape: tuple[int, ...], shards: int, fill: tuple):
    """Pads the time axis of ``arrays`` (with ``fill``) and of ``mask`` (with false) to a multiple of ``shards``.

    Padded steps are masked, so they hold the state and output zero; a mask of ``mask_shape`` ``(T, ...)`` is
    made when there is none and padding is needed.
    """
    pad = -mask_shape[0] % shards
    if not pad:
        return arrays, mask
    if mask is None:
        mask = jnp.ones(mask_shape, bool)
    padded = tuple(
        jnp.concatenate([x, jnp.full((pad, *x.shape[1:]), value, x.dtype)], axis=0) for x, value in zip(arrays, fill)
    )
    mask = jnp.concatenate([mask, jnp.zeros((pad, *mask.shape[1:]), bool)], axis=0)
    return padded, mask
