"""Input validation shared by cells, layers and models (what each check raises: docs/errors.md).

Every check here runs while JAX traces (shapes and dtypes are static), so jitted code pays nothing for it.
Parameters are checked against the tree their owner's ``init`` declares (:func:`check_core_params`,
:func:`check_params`), read once per owner and input size with ``jax.eval_shape``.

The exception is a value only known at run time (a tracer), such as a traced ``lengths`` array: it is checked by
:func:`checked_at_run_time`, which compares on the device and calls back to the host only when the value is
bad. The host raises :class:`RunTimeCheckError` (a ``ValueError``); XLA aborts the computation and the caller
gets an error whose message ends with it (:func:`checked_at_run_time` says which). JAX's error log of the failed
callback is shortened to the check's message, so the first line the user sees names the argument. Good values
cost one comparison, not a host round trip.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.types import Array, Carry, Params


def as_float_array(value, name: str) -> Array:
    """Returns ``value`` as a floating-point JAX array, or raises ``TypeError`` naming ``name``."""
    try:
        array = jnp.asarray(value)
    except TypeError as error:
        raise TypeError(f"{name} must be an array of floats, got {type(value).__name__}") from error
    if not jnp.issubdtype(array.dtype, jnp.floating) and not jnp.issubdtype(array.dtype, jnp.complexfloating):
        raise TypeError(
            f"{name} must have a floating-point dtype, got {array.dtype}; cast integer inputs with "
            f"{name}.astype(jnp.float32) or embed tokens first"
        )
    return array


def check_rank(array: Array, name: str, min_rank: int, layout: str) -> None:
    """Raises ``ValueError`` unless ``array.ndim >= min_rank``; ``layout`` is the expected shape in words."""
    if array.ndim < min_rank:
        raise ValueError(f"{name} must have shape {layout} (rank >= {min_rank}), got shape {array.shape}")


def check_broadcasts_to(array: Array, target: Array, name: str, target_name: str) -> None:
    """Raises a ``ValueError`` naming ``name`` unless ``array`` broadcasts to ``target``'s shape unchanged."""
    try:
        broadcast = np.broadcast_shapes(np.shape(array), np.shape(target))
    except ValueError:
        broadcast = None
    if broadcast != np.shape(target):
        raise ValueError(
            f"{name} of shape {np.shape(array)} must broadcast to {target_name}'s shape {np.shape(target)}"
        )


def check_features(array: Array, expected: int, name: str) -> None:
    """Raises ``ValueError`` unless the last axis of ``array`` has ``expected`` entries."""
    if array.shape[-1] != expected:
        raise ValueError(
            f"{name} has {array.shape[-1]} features on its last axis, but the parameters expect {expected} "
            f"(shape {array.shape})"
        )


def check_carry(carry: Carry, expected: Carry, name: str = "carry") -> None:
    """Checks that ``carry`` has the tree structure and leaf shapes of ``expected``.

    Args:
        carry: the carry a user passed in.
        expected: a pytree of arrays or ``jax.ShapeDtypeStruct`` with the shapes the cell needs.
        name: the argument's name for the error message.
    """
    expected_def = jax.tree.structure(expected)
    carry_def = jax.tree.structure(carry)
    if carry_def != expected_def:
        raise ValueError(f"{name} must have the structure {expected_def}, got {carry_def}")
    for got, want, path in zip(jax.tree.leaves(carry), jax.tree.leaves(expected), _leaf_paths(expected)):
        got_shape = np.shape(got)
        if tuple(got_shape) != tuple(want.shape):
            raise ValueError(f"{name}{path} must have shape {tuple(want.shape)}, got {tuple(got_shape)}")
        if not jnp.issubdtype(jnp.result_type(got), jnp.inexact):
            raise TypeError(f"{name}{path} must have a floating-point dtype, got {jnp.result_type(got)}")


def carry_template(module, batch_shape: Sequence[int], dtype=None) -> Carry:
    """``module.initial_carry(batch_shape[, dtype])`` as a tree of ``jax.ShapeDtypeStruct`` (nothing computed).

    Cells and layers are hashable, so the template is cached per ``(module, batch_shape, dtype)``: tracing
    ``initial_carry`` costs about as much as an eager step, and ``cell.step`` checks its carry on every call.
    """
    batch_shape = tuple(int(n) for n in batch_shape)
    try:
        return _cached_carry_template(module, batch_shape, dtype)
    except TypeError:  # an unhashable module: build the template each time
        return _build_carry_template(module, batch_shape, dtype)


def _build_carry_template(module, batch_shape: tuple[int, ...], dtype) -> Carry:
    if dtype is None:
        return jax.eval_shape(lambda: module.initial_carry(batch_shape))
    return jax.eval_shape(lambda: module.initial_carry(batch_shape, dtype))


_cached_carry_template = functools.lru_cache(maxsize=1024)(_build_carry_template)


# Parameters: checked against the tree their owner's init declares.


class _Declaration(NamedTuple):
    """The parameter tree an owner's ``init`` makes (``jax.ShapeDtypeStruct`` leaves), flattened for a fast match."""

    tree: Params
    treedef: Any
    shapes: tuple[tuple[int, ...], ...]

    def matches(self, params) -> bool:
        """Whether ``params`` has exactly this tree structure and these leaf shapes (the common case, fast)."""
        leaves, treedef = jax.tree.flatten(params)
        return treedef == self.treedef and all(np.shape(leaf) == shape for leaf, shape in zip(leaves, self.shapes))


def declared_params(owner, *init_args) -> Params | None:
    """``owner.init(key, *init_args)`` as a tree of ``jax.ShapeDtypeStruct`` (nothing computed), or ``None``.

    ``None`` when ``init`` cannot run on these arguments (a wrapper around existing parameters that cannot be
    initialised, or an input size that ``init`` rejects): such parameters are not checked. Cached per
    ``(owner, init_args)``, as cells, layers and models are hashable.
    """
    declaration = _declaration(owner, init_args)
    return None if declaration is None else declaration.tree


def _declaration(owner, init_args: tuple) -> _Declaration | None:
    try:
        return _cached_declaration(owner, init_args)
    except TypeError:  # an unhashable owner: declare its parameters each time
        return _build_declaration(owner, init_args)


def _build_declaration(owner, init_args: tuple) -> _Declaration | None:
    try:
        tree = jax.eval_shape(lambda: owner.init(jax.random.key(0), *init_args))
    except Exception:  # init cannot run here: there is no declaration to check against
        return None
    leaves, treedef = jax.tree.flatten(tree)
    return _Declaration(tree, treedef, tuple(tuple(leaf.shape) for leaf in leaves))


_cached_declaration = functools.lru_cache(maxsize=1024)(_build_declaration)


def check_params(params: Params, owner, *init_args, name: str = "params") -> None:
    """Checks ``params`` against the tree ``owner.init(key, *init_args)`` makes: keys, list lengths, leaf shapes.

    Reads only structure and shapes, so under ``jit`` it costs nothing at run time. Dtypes are not compared:
    parameters stored in another float dtype than ``init``'s (bfloat16 for a float32 cell) are valid. Nothing
    is checked when ``owner`` cannot declare its parameters (see :func:`declared_params`).

    Raises:
        ValueError: naming the parameter paths (up to five) that are missing, unexpected or of the wrong shape,
            with the expected and the actual keys or shapes.
        TypeError: a leaf is not an array.
    """
    declaration = _declaration(owner, init_args)
    if declaration is None or declaration.matches(params):
        return
    error = _difference(params, declaration.tree, name, f"{_init_call(owner, init_args)} makes them")
    if error is not None:
        raise error


def check_core_params(core, params: Params, input_size: int, name: str = "params") -> None:
    """:func:`check_params` for a cell or layer whose inputs have ``input_size`` features.

    If the parameters do not fit ``input_size`` but do fit the input size they imply themselves
    (``core.input_size(params)``), they are consistent and the inputs are at fault: nothing is raised here, and
    the caller's :func:`check_features` names the inputs. Otherwise the parameters are wrong, and are named with
    the shapes ``input_size`` features need (a transposed ``w_ih`` is reported as ``params['w_ih']``).
    """
    declaration = _declaration(core, (input_size,))
    if declaration is not None and declaration.matches(params):
        return
    implied = _implied_input_size(core, params)
    if implied is not None and implied != input_size:
        other = _declaration(core, (implied,))
        if other is not None and other.matches(params):
            return  # parameters for inputs of `implied` features: check_features names the inputs
    if declaration is None:
        return
    source = f"{_init_call(core, (input_size,))} makes them for inputs of {input_size} features"
    error = _difference(params, declaration.tree, name, source)
    if error is not None:
        raise error


def _implied_input_size(core, params: Params) -> int | None:
    """``core.input_size(params)``, or ``None`` when the parameters are too broken to say."""
    try:
        size = core.input_size(params)
    except Exception:  # a missing key, a leaf that is not an array, ...
        return None
    return int(size) if isinstance(size, (int, np.integer)) and size > 0 else None


def _init_call(owner, init_args: tuple) -> str:
    return f"{type(owner).__name__}.init({', '.join(['key', *map(repr, init_args)])})"


def _difference(params, declared, name: str, source: str) -> Exception | None:
    """One error listing where ``params`` differs from the ``declared`` tree (at most five places), or ``None``.

    Its type is that of the first difference: ``TypeError`` for a leaf that is not an array, else ``ValueError``.
    """
    found = list(_differences(params, declared, name))
    if not found:
        return None
    shown = [message for _, message in found[:5]]
    if len(found) > 5:
        shown.append(f"{len(found) - 5} more")
    return found[0][0](f"{'; '.join(shown)} (as {source})")


def _differences(got, want, path: str):
    """``(exception type, message)`` for every place where ``got`` differs from the declared tree ``want``."""
    if isinstance(want, Mapping):
        if not isinstance(got, Mapping):
            yield ValueError, f"{path} must be a dict with the keys {_keys(want)}, got {_kind(got)}"
            return
        missing = [f"{path}[{key!r}]" for key in _keys(want) if key not in got]
        unexpected = [f"{path}[{key!r}]" for key in _keys(got) if key not in want]
        if missing or unexpected:
            problems = []
            if missing:
                problems.append(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
            if unexpected:
                problems.append(f"{', '.join(unexpected)} {'is' if len(unexpected) == 1 else 'are'} unexpected")
            yield ValueError, f"{' and '.join(problems)}: keys {_keys(want)} expected, got {_keys(got)}"
            return
        children = [(f"{path}[{key!r}]", got[key], want[key]) for key in want]
    elif _is_namedtuple(want):
        if type(got) is not type(want):
            yield ValueError, f"{path} must be a {type(want).__name__}, got {_kind(got)}"
            return
        children = [(f"{path}.{field}", getattr(got, field), getattr(want, field)) for field in want._fields]
    elif isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or _is_namedtuple(got):
            yield ValueError, f"{path} must be a list of {len(want)} entries, got {_kind(got)}"
            return
        if len(got) != len(want):
            yield ValueError, f"{path} must be a list of {len(want)} entries, got {len(got)}"
            return
        children = [(f"{path}[{index}]", got[index], want[index]) for index in range(len(want))]
    elif want is None:
        if got is not None:
            yield ValueError, f"{path} must be None, got {_kind(got)}"
        return
    else:
        if not hasattr(got, "shape") and not isinstance(got, (int, float, complex, np.number)):
            yield TypeError, f"{path} must be an array, got {_kind(got)}"
        elif tuple(np.shape(got)) != tuple(want.shape):
            yield ValueError, f"{path} must have shape {tuple(want.shape)}, got {tuple(np.shape(got))}"
        return
    for child_path, child_got, child_want in children:
        yield from _differences(child_got, child_want, child_path)


def _keys(tree: Mapping) -> list:
    return sorted(tree, key=str)


def _kind(value) -> str:
    """``value`` in a few words for an error message: its type, and its shape for an array."""
    if hasattr(value, "shape"):
        return f"an array of shape {tuple(value.shape)}"
    return type(value).__name__


def _is_namedtuple(tree) -> bool:
    return isinstance(tree, tuple) and hasattr(type(tree), "_fields")


def _leaf_paths(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_lengths(lengths, batch_shape: Sequence[int], num_steps: int) -> Array:
    """Validates ``lengths`` against the batch shape and sequence length; returns it as an int32 array.

    Shape and dtype are checked at trace time. Values are checked at once when they are known while tracing
    (a concrete array, also under ``vmap`` outside ``jit``), and by a device-side comparison with a host
    callback (:func:`checked_at_run_time`) when they are only known at run time (``lengths`` traced by ``jit``).

    Args:
        lengths: integer array of shape ``batch_shape`` with values in ``[0, num_steps]``.
        batch_shape: the leading batch axes of the inputs, ``*B``.
        num_steps: ``T``, the padded sequence length.

    Returns:
        ``lengths`` as an ``int32`` array of shape ``*B``.

    Raises:
        TypeError: ``lengths`` does not have an integer dtype.
        ValueError: its shape is not ``batch_shape``, or a known value lies outside ``[0, num_steps]``.
        RunTimeCheckError: a traced value outside ``[0, num_steps]``, raised on the host while the compiled
            program runs; the caller gets the XLA error that carries it (see :func:`checked_at_run_time`).
    """
    batch_shape = tuple(batch_shape)
    if not hasattr(lengths, "dtype"):
        lengths = np.asarray(lengths)
    if not (jnp.issubdtype(lengths.dtype, jnp.integer) or jnp.issubdtype(lengths.dtype, jnp.unsignedinteger)):
        raise TypeError(f"lengths must have an integer dtype, got {lengths.dtype}")
    if tuple(np.shape(lengths)) != batch_shape:
        raise ValueError(f"lengths must have the batch shape {batch_shape}, got shape {tuple(np.shape(lengths))}")
    known = known_value(lengths)
    if known is not None:
        _raise_if_out_of_range(known, num_steps)
        return jnp.asarray(lengths, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.size == 0:
        return lengths
    out_of_range = (jnp.min(lengths) < 0) | (jnp.max(lengths) > num_steps)
    # num_steps is bound statically: passed as an argument it would arrive as an array (int64 under x64).
    return checked_at_run_time(lengths, out_of_range, functools.partial(_raise_if_out_of_range, num_steps=num_steps))


def known_value(value) -> np.ndarray | None:
    """``value`` as a NumPy array if it is known while tracing, else ``None``.

    A concrete array is known; so is the batched array under a ``vmap`` tracer outside ``jit`` (every row of it
    must pass the same check). Anything traced by ``jit`` (or ``vmap`` inside ``jit``) is not.
    """
    while isinstance(value, jax.core.Tracer):
        if not hasattr(value, "batch_dim"):  # not a vmap tracer: the value exists only at run time
            return None
        value = value.val  # the batched array the vmap tracer stands for
    return np.asarray(value)


class RunTimeCheckError(ValueError):
    """A bad value found while a compiled program runs (raised on the host by :func:`checked_at_run_time`).

    XLA aborts the computation and the caller gets an error whose message ends with this error's line
    (:func:`checked_at_run_time` says which).
    """


def checked_at_run_time(value: Array, is_bad: Array, report: Callable[[np.ndarray], None]) -> Array:
    """Returns ``value``, having ``report(value)`` run on the host (where it raises) if ``is_bad`` is true.

    The host callback sits in the taken branch of a :func:`jax.lax.cond`, so a good value costs one device-side
    comparison instead of a host round trip on every call (which, unconditional, cost more than a small jitted
    step itself). The callback's zero result is added to ``value``, a data dependency that keeps the check from
    being compiled away.

    What the user sees: the ``ValueError`` that ``report`` raises is re-raised as :class:`RunTimeCheckError`;
    JAX logs the failed callback at ``ERROR``, a log record this module shortens to the error's message alone
    (so that line, naming the argument, comes first); then the compiled call raises an error whose message
    starts ``INTERNAL: CpuCallback error calling callback:``, lists the host frames and ends with
    ``RunTimeCheckError: <the message>``. Its type is JAX's: ``jax.errors.JaxRuntimeError`` from a call that
    goes through JAX's Python dispatch (the call that compiles the program, and every call after a failed
    first one), a plain ``ValueError`` from a program already compiled by a good call (JAX's C++ fast path).

    Args:
        value: an integer or float array, traced.
        is_bad: a boolean scalar computed from ``value``.
        report: called with ``value`` as a NumPy array when ``is_bad``; expected to raise ``ValueError``.
    """

    def call(host_value):
        try:
            report(host_value)
        except ValueError as error:
            raise RunTimeCheckError(str(error)) from None
        return np.zeros((), value.dtype)

    result = jax.ShapeDtypeStruct((), value.dtype)
    zero = jax.lax.cond(
        is_bad,
        lambda v: jax.pure_callback(call, result, v, vmap_method="sequential"),
        lambda v: jnp.zeros((), v.dtype),
        value,
    )
    return value + zero


class _ShortenRunTimeCheckLog(logging.Filter):
    """Turns JAX's log record of a callback that raised :class:`RunTimeCheckError` into the error's message.

    JAX logs every failed callback as ``jax.pure_callback failed`` plus the whole host traceback, before the
    caller sees the exception; for a check that failed as designed, the message is all there is to
    say. Records of any other failure pass unchanged.
    """

    message = "%s (found while a compiled computation ran; the call fails with an XLA error carrying this message)"

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, RunTimeCheckError):
            record.msg = self.message
            record.args = (error,)
            record.exc_info, record.exc_text = None, None
        return True


# The logger jax.pure_callback reports failures to (jax/_src/callback.py); a renamed logger only loses brevity.
logging.getLogger("jax._src.callback").addFilter(_ShortenRunTimeCheckLog())


def _raise_if_out_of_range(lengths, num_steps: int) -> None:
    lengths = np.asarray(lengths)
    if lengths.size and (lengths.min() < 0 or lengths.max() > num_steps):
        raise ValueError(
            f"lengths must lie in [0, {num_steps}] (the time axis of xs), got values from {lengths.min()} "
            f"to {lengths.max()}"
        )


def check_choice(value, choices: Sequence, name: str) -> None:
    """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_positive_int(value, name: str, *, allow_none: bool = False) -> None:
    """Raises ``TypeError``/``ValueError`` unless ``value`` is a positive ``int`` (or ``None`` if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
