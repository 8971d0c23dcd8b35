"""Running a cell or layer over a sequence: :func:`unroll`, and the masked scan it is built on.

``unroll`` is to a cell what ``lax.scan`` is to a step function, plus layouts, variable lengths and reverse::

    carry = cell.initial_carry(batch_shape) if carry is None else carry
    for t in range(T):                       # t in reversed(range(length)) when reverse=True
        new_carry, y = cell.step(params, carry, xs[t])
        carry = new_carry if t < length else carry
        ys[t] = y if t < length else 0
    return carry, ys

Variable-length semantics (``lengths``, one per batch row):

* outputs at ``t >= length`` are exactly zero;
* the final carry is the carry after the row's last valid step (the initial carry when ``length == 0``);
* ``reverse=True`` runs each row backwards *within its own length*: position ``length - 1`` is processed
  first, and the outputs are written back at their original positions;
* a padded batch gives the same numbers as running each row alone, unpadded.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

from rnnjax import _checks
from rnnjax.protocol import SequenceCore
from rnnjax.types import Array, Carry, DType, Params, PRNGKey

StepFn = Callable[[Params, Carry, Array], tuple[Carry, Array]]


def unroll(
    core,
    params: Params,
    xs,
    carry: Carry | None = None,
    *,
    lengths=None,
    reverse: bool = False,
    time_major: bool = False,
    unroll: int | bool = 1,
    remat: bool | int = False,
    dropout_key: PRNGKey | None = None,
    method: str | SequenceMethod | None = None,
) -> tuple[Carry, Array]:
    """Runs a cell or a layer over a sequence: the single entry point for anything recurrent.

    Checks the inputs, moves them time-major, turns ``lengths`` into a mask, reverses each row within its
    length when asked, and calls the core's :meth:`~rnnjax.protocol.SequenceCore.sequence` (for a cell, the
    masked ``lax.scan`` of its ``step`` or its whole-sequence fast path). An object with only ``step``,
    ``initial_carry`` and ``input_size`` is stepped with :func:`masked_scan`.

    Args:
        core: a cell (:class:`rnnjax.Cell`) or a layer (:class:`rnnjax.Bidirectional`, :class:`rnnjax.Stack`).
        params: its parameters.
        xs: inputs ``(*B, T, I)``, or ``(T, *B, I)`` when ``time_major``. ``*B`` may be empty.
        carry: initial carry with leaves ``(*B, ...)``; ``None`` means ``core.initial_carry(B)`` in float32
            (float64 for float64 inputs).
        lengths: optional integer array ``(*B,)`` of valid lengths in ``[0, T]``. Values known while tracing are
            checked at once; values known only at run time (traced by ``jit``) while the program runs (see Raises).
        reverse: run each sequence from its last valid step to its first.
        time_major: layout of ``xs`` and of the returned ``ys``.
        unroll: passed to ``lax.scan`` (steps per loop iteration).
        remat: memory for the backward pass of stepped cells. ``False``: autodiff keeps every step's activations
            (fastest). ``True``: each step is rematerialised (``jax.checkpoint``), so only the carries are kept:
            memory O(T * carry). An int ``k > 1``: checkpoint every ``k`` steps (a scan over chunks of ``k``),
            keeping T/k carries plus one chunk's activations: memory O((T/k + k) * carry), the classic sqrt(T)
            trade with ``k`` about sqrt(T), for one extra forward pass. The LSTM and GRU leave their fused
            kernels for stepping when it is set; the parallel-scan cells (minGRU, minLSTM, LRU) ignore it, as
            their solvers keep only ``(T, *B, H)``-sized values.
        dropout_key: PRNG key for dropout inside a layer (e.g. between the layers of a :class:`rnnjax.Stack`);
            ``None`` turns dropout off. Cells ignore it.
        method: how the sequence is solved. ``None``: the core's own ``sequence`` (for a cell, the masked
            ``lax.scan`` of its ``step``, its native kernel on the CPU, or its parallel scan). ``"deer"``: all time
            steps at once by Newton's method (DEER, with the exact Jacobian: :func:`rnnjax.deer_unroll`, whose
            defaults apply: tolerance ``1e-5`` in float32, at most ``T + 1`` iterations, the sequential scan as
            the fallback when it does not converge); ``"quasi_deer"``: the same with diagonal Jacobians; or a
            :class:`rnnjax.Deer` with other settings. These need a cell that steps (not a bidirectional layer),
            and ``remat`` and ``dropout_key`` unset; ``unroll`` does not apply to them. Use
            :func:`rnnjax.deer_unroll` to read the iteration count.

    Returns:
        ``(final_carry, ys)``: ``ys`` is ``(*B, T, O)`` (``(T, *B, O)`` when ``time_major``), zero past each
        row's length; a pair of such arrays for a bidirectional layer with ``merge="none"``.

    Raises:
        TypeError: at trace time: ``xs`` is not an array of floats, ``lengths`` has no integer dtype, a carry
            leaf is not floating-point, a parameter is not an array, or ``method`` is neither a name nor a method
            object; with a DEER method, a cell that cannot step.
        ValueError: at trace time (under ``jit`` too, before anything runs), naming the argument: ``xs`` of the
            wrong rank or feature size; ``params`` with a missing or unexpected key, a list of the wrong length or
            a leaf of the wrong shape, compared with ``core.init(key, I)`` for the ``I`` features of ``xs`` (the
            message gives the path, such as ``params['layers'][0]['w_hh']``, and the expected and actual shape);
            ``carry`` of the wrong structure or shapes; ``lengths`` of the wrong shape; a bad ``remat``; an unknown
            ``method``, or ``remat``/``dropout_key`` set with one; and
            ``lengths`` values outside ``[0, T]`` when they are known while tracing (concrete arrays, also
            under ``vmap`` outside ``jit``).
        jax.errors.JaxRuntimeError: ``lengths`` traced by ``jit`` (also ``vmap`` inside ``jit``) has a value
            outside ``[0, T]``: raised when the compiled program runs (a plain ``ValueError`` with the same message
            when JAX runs an already compiled program through its C++ fast path), the message ending with
            ``RunTimeCheckError: lengths must lie in [0, T] (the time axis of xs), got values from a to b``
            (:class:`rnnjax._checks.RunTimeCheckError` is the ``ValueError`` raised on the host). The line logged
            before it (``ERROR`` on the ``jax._src.callback`` logger) is that message alone. docs/errors.md lists
            every case.

    Example:
        >>> cell = rnnjax.LSTM(hidden_size=16)
        >>> params = cell.init(jax.random.key(0), input_size=4)
        >>> carry, ys = rnnjax.unroll(cell, params, jnp.ones((2, 10, 4)), lengths=jnp.array([10, 3]))
        >>> ys.shape, carry.h.shape
        ((2, 10, 16), (2, 16))
    """
    with jax.named_scope(f"unroll_{type(core).__name__}"):
        _check_remat(remat)
        solver = resolve_method(method)
        if solver is not None and (remat is not False or dropout_key is not None):
            argument = "remat" if remat is not False else "dropout_key"
            raise ValueError(f"{argument} must be left unset with method={method!r}: it applies to stepping alone")
        seq = prepare_sequence(core, params, xs, carry, lengths=lengths, reverse=reverse, time_major=time_major)
        if solver is None:
            carry, ys = run_time_major(
                core, params, seq.carry, seq.xs, seq.mask, unroll=unroll, remat=remat, dropout_key=dropout_key
            )
        else:
            carry, ys = solver.run(core, params, seq.carry, seq.xs, seq.mask)
        return carry, finish_sequence(ys, seq.lengths, reverse=reverse, time_major=time_major)


class PreparedSequence(NamedTuple):
    """A sequence checked and laid out for a core's ``sequence``: what :func:`prepare_sequence` returns."""

    xs: Array  # (T, *B, I): time-major, each row reversed within its length when asked
    carry: Carry  # leaves (*B, ...): the initial carry, checked or made
    mask: Array | None  # (T, *B): t < length, or None without lengths
    lengths: Array | None  # (*B,): checked lengths, or None

    @property
    def num_steps(self) -> int:
        """``T``."""
        return self.xs.shape[0]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """``*B``."""
        return self.xs.shape[1:-1]


def prepare_sequence(
    core, params: Params, xs, carry: Carry | None, *, lengths=None, reverse: bool = False, time_major: bool = False
) -> PreparedSequence:
    """Checks the arguments of :func:`unroll` and lays them out time-major, as every way of running a core needs.

    Checks ``xs``, ``params`` against the core's declared shapes (before ``params`` are read, so a wrong tree is
    named and not blamed on ``xs``), ``carry`` and ``lengths``; moves ``xs`` time-major; makes the initial carry
    when ``carry`` is ``None``; turns ``lengths`` into a mask; reverses each row within its length when
    ``reverse``. :func:`finish_sequence` undoes the layout on the outputs.

    Raises:
        TypeError, ValueError: as :func:`unroll` does, naming the argument.
    """
    xs = check_inputs(xs, time_major)
    if isinstance(core, SequenceCore):
        _checks.check_core_params(core, params, xs.shape[-1])
    xs_tm = to_time_major(xs, core.input_size(params), time_major)  # (T, *B, I)
    num_steps, batch_shape = xs_tm.shape[0], xs_tm.shape[1:-1]
    carry = prepare_carry(core, carry, batch_shape, xs_tm.dtype)
    mask = None
    if lengths is not None:
        lengths = _checks.check_lengths(lengths, batch_shape, num_steps)  # (*B,)
        mask = time_mask(lengths, num_steps)  # (T, *B)
    if reverse:
        xs_tm = reverse_sequences(xs_tm, lengths)
    return PreparedSequence(xs_tm, carry, mask, lengths)


def finish_sequence(ys, lengths: Array | None, *, reverse: bool, time_major: bool):
    """Time-major outputs ``(T, *B, O)`` (or a pytree of them) back in the caller's layout and time order."""
    if reverse:
        ys = jax.tree.map(lambda y: reverse_sequences(y, lengths), ys)
    return ys if time_major else jax.tree.map(lambda y: jnp.moveaxis(y, 0, -2), ys)


# Ways of running a sequence other than the core's own ``sequence`` (``unroll(method=...)``).


@typing.runtime_checkable
class SequenceMethod(Protocol):
    """A solver for a whole sequence of a core, chosen with ``unroll(method=...)``: e.g. :class:`rnnjax.Deer`."""

    def run(self, core, params: Params, carry: Carry, xs: Array, mask: Array | None) -> tuple[Carry, Array]:
        """``(final_carry, ys (T, *B, O))`` for time-major ``xs`` ``(T, *B, I)`` and ``mask`` ``(T, *B)`` or None,
        with the semantics of :func:`masked_scan` over ``core.step``."""
        ...


_METHODS: dict[str, SequenceMethod] = {}


def register_method(name: str, method: SequenceMethod) -> None:
    """Makes ``unroll(method=name)`` run ``method`` (modules that define a method register its names)."""
    if name in _METHODS:
        raise ValueError(f"name {name!r} is already a registered unroll method")
    _METHODS[name] = method


def method_names() -> tuple[str, ...]:
    """The names ``unroll(method=...)`` takes."""
    return tuple(sorted(_METHODS))


def resolve_method(method) -> SequenceMethod | None:
    """``None`` (the core's own ``sequence``), a registered name, or a :class:`SequenceMethod` -> the solver."""
    if method is None:
        return None
    if isinstance(method, str):
        if method not in _METHODS:
            raise ValueError(f"method must be None, one of {method_names()} or a method object, got {method!r}")
        return _METHODS[method]
    if isinstance(method, SequenceMethod):
        return method
    raise TypeError(f"method must be None, a name in {method_names()} or an object with a run method, got {method!r}")


def run_time_major(core, params: Params, carry: Carry, xs: Array, mask: Array | None, **options):
    """``core.sequence(params, carry, xs, mask, **options)`` (a step-only object: :func:`masked_scan` of its step).

    Layers call this on their children: ``xs`` ``(T, *B, I)`` and ``mask`` ``(T, *B)`` as in
    :meth:`rnnjax.protocol.SequenceCore.sequence`.
    """
    if isinstance(core, SequenceCore):
        return core.sequence(params, carry, xs, mask, **options)
    options.pop("dropout_key", None)
    return masked_scan(core.step, params, carry, xs, mask, **options)


def masked_scan(
    step: StepFn,
    params: Params,
    carry: Carry,
    xs: Array,
    mask: Array | None,
    *,
    unroll: int | bool = 1,
    remat: bool | int = False,
) -> tuple[Carry, Array]:
    """``lax.scan`` of ``step`` over time-major ``xs``, holding the carry and zeroing outputs where masked.

    This is the reference semantics that any cell's ``sequence`` fast path must reproduce.

    Args:
        step: ``step(params, carry, x) -> (carry, y)``.
        params: passed to ``step`` unchanged.
        carry: initial carry, leaves ``(*B, ...)``.
        xs: ``(T, *B, I)``.
        mask: ``(T, *B)`` booleans, ``True`` where a step is valid; ``None`` means all valid.
        unroll: passed to ``lax.scan``.
        remat: ``True`` checkpoints each step, an int ``k > 1`` every chunk of ``k`` steps (see :func:`unroll`).

    Returns:
        ``(final_carry, ys)`` with ``ys`` ``(T, *B, O)``.
    """

    def body(carry, inputs):
        x, valid = inputs  # (*B, I), (*B,) or None
        new_carry, y = step(params, carry, x)
        if valid is not None:
            new_carry = jax.tree.map(lambda n, o: jnp.where(expand_to(valid, n), n, o), new_carry, carry)
            y = jnp.where(expand_to(valid, y), y, jnp.zeros_like(y))
        return new_carry, y

    _check_remat(remat)
    if remat is True or remat == 1:
        return jax.lax.scan(jax.checkpoint(body), carry, (xs, mask), unroll=unroll)
    if remat:
        return _chunked_scan(body, carry, xs, mask, int(remat), unroll)
    return jax.lax.scan(body, carry, (xs, mask), unroll=unroll)


def _check_remat(remat) -> None:
    if isinstance(remat, bool):
        return
    if not isinstance(remat, int) or remat < 1:
        raise ValueError(f"remat must be True, False or a chunk length >= 1, got {remat!r}")


def _chunked_scan(body, carry, xs, mask, chunk: int, unroll):
    """Scan over chunks of ``chunk`` steps, each chunk checkpointed: keeps only the carries between chunks.

    ``T`` is padded up to a multiple of ``chunk`` with masked steps, which hold the carry and emit zeros, so
    the padding changes nothing.
    """
    num_steps = xs.shape[0]
    num_chunks = -(-num_steps // chunk)
    pad = num_chunks * chunk - num_steps
    if pad:
        if mask is None:
            mask = jnp.ones(xs.shape[:-1], bool)  # (T, *B)
        xs = jnp.concatenate([xs, jnp.zeros((pad, *xs.shape[1:]), xs.dtype)])
        mask = jnp.concatenate([mask, jnp.zeros((pad, *mask.shape[1:]), bool)])
    chunked = jax.tree.map(lambda a: a.reshape(num_chunks, chunk, *a.shape[1:]), (xs, mask))

    @jax.checkpoint
    def run_chunk(carry, inputs):
        return jax.lax.scan(body, carry, inputs, unroll=unroll)

    carry, ys = jax.lax.scan(run_chunk, carry, chunked)
    ys = ys.reshape(num_chunks * chunk, *ys.shape[2:])  # (T + pad, *B, O)
    return carry, ys[:num_steps]


def to_time_major(xs, input_size: int, time_major: bool, name: str = "xs") -> Array:
    """Validates inputs and returns them time-major.

    Args:
        xs: ``(*B, T, I)``, or ``(T, *B, I)`` when ``time_major``.
        input_size: the ``I`` the parameters expect.
        time_major: the layout of ``xs``.
        name: the argument's name for error messages.

    Returns:
        ``(T, *B, I)``.
    """
    xs = check_inputs(xs, time_major, name)
    _checks.check_features(xs, input_size, name)
    return xs if time_major else jnp.moveaxis(xs, -2, 0)


def check_inputs(xs, time_major: bool, name: str = "xs") -> Array:
    """Returns ``xs`` as an array, having checked that it is floating-point and has a time and a feature axis."""
    xs = _checks.as_float_array(xs, name)
    _checks.check_rank(xs, name, 2, "(time, *batch, features)" if time_major else "(*batch, time, features)")
    return xs


def default_carry_dtype(input_dtype: DType) -> DType:
    """Carries are float32 (the numerically sensitive state), or float64 for float64 inputs."""
    return jnp.float64 if jnp.dtype(input_dtype) == jnp.float64 else jnp.float32


def prepare_carry(cell, carry: Carry | None, batch_shape: tuple[int, ...], input_dtype: DType) -> Carry:
    """Returns ``carry``, checked against ``cell.initial_carry(batch_shape)``, or that initial carry."""
    dtype = default_carry_dtype(input_dtype)
    if carry is None:
        return cell.initial_carry(batch_shape, dtype)
    _checks.check_carry(carry, _checks.carry_template(cell, batch_shape, dtype))
    return carry


def time_mask(lengths: Array, num_steps: int) -> Array:
    """``mask[t, *b] = t < lengths[*b]``: ``(T, *B)`` booleans from ``lengths`` ``(*B,)``."""
    # Both sides int32: under jax_enable_x64 a default (int64) arange does not promote with int32 lengths.
    steps = jnp.arange(num_steps, dtype=jnp.int32).reshape((num_steps,) + (1,) * lengths.ndim)  # (T, 1, ...)
    return steps < lengths.astype(jnp.int32)  # (T, *B)


def reverse_sequences(xs: Array, lengths: Array | None) -> Array:
    """Reverses each sequence of time-major ``xs`` ``(T, *B, F)`` within its own length.

    Position ``t < length`` goes to ``length - 1 - t``; padding positions stay where they are. Applying this
    twice is the identity.
    """
    if lengths is None:
        return jnp.flip(xs, axis=0)
    lengths = jnp.asarray(lengths).astype(jnp.int32)  # (*B,); int32 on both sides, as in time_mask
    num_steps = xs.shape[0]
    steps = jnp.arange(num_steps, dtype=jnp.int32).reshape((num_steps,) + (1,) * lengths.ndim)  # (T, 1, ...)
    source = jnp.where(steps < lengths, lengths - 1 - steps, steps)  # (T, *B)
    return jnp.take_along_axis(xs, source[..., None], axis=0)


def expand_to(mask: Array, like: Array) -> Array:
    """Appends trailing unit axes to ``mask`` ``(*B,)`` so that it broadcasts against ``like`` ``(*B, ...)``."""
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))
