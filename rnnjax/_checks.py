"""Input validation shared by cells and layers.

Every check here runs while JAX traces (shapes and dtypes are static), so jitted code pays nothing for it.
The exception is a value only known at run time (a tracer), such as a traced ``lengths`` array: it is checked by
:func:`checked_at_run_time`, which compares on the device and calls back to the host only when the value is
bad; the host raises, and the error reaches the caller (as a ``ValueError`` or a ``JaxRuntimeError`` whose
message contains the ``ValueError`` text). Good values cost one comparison, not a host round trip.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.types import Array, Carry


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


def _leaf_paths(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_lengths(lengths, batch_shape: Sequence[int], num_steps: int) -> Array:
    """Validates ``lengths`` against the batch shape and sequence length; returns it as an int32 array.

    Shape and dtype are checked at trace time. Values are checked immediately when concrete, and by a host
    callback at run time when ``lengths`` is traced (under ``jit``, ``vmap`` or ``grad``).

    Args:
        lengths: integer array of shape ``batch_shape`` with values in ``[0, num_steps]``.
        batch_shape: the leading batch axes of the inputs, ``*B``.
        num_steps: ``T``, the padded sequence length.

    Returns:
        ``lengths`` as an ``int32`` array of shape ``*B``.
    """
    batch_shape = tuple(batch_shape)
    if not hasattr(lengths, "dtype"):
        lengths = np.asarray(lengths)
    if not (jnp.issubdtype(lengths.dtype, jnp.integer) or jnp.issubdtype(lengths.dtype, jnp.unsignedinteger)):
        raise TypeError(f"lengths must have an integer dtype, got {lengths.dtype}")
    if tuple(np.shape(lengths)) != batch_shape:
        raise ValueError(f"lengths must have the batch shape {batch_shape}, got shape {tuple(np.shape(lengths))}")
    if not isinstance(lengths, jax.core.Tracer):
        _raise_if_out_of_range(np.asarray(lengths), num_steps)
        return jnp.asarray(lengths, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.size == 0:
        return lengths
    out_of_range = (jnp.min(lengths) < 0) | (jnp.max(lengths) > num_steps)
    # num_steps is bound statically: passed as an argument it would arrive as an array (int64 under x64).
    return checked_at_run_time(lengths, out_of_range, functools.partial(_raise_if_out_of_range, num_steps=num_steps))


def checked_at_run_time(value: Array, is_bad: Array, report: Callable[[np.ndarray], None]) -> Array:
    """Returns ``value``, having ``report(value)`` run on the host (where it raises) if ``is_bad`` is true.

    The host callback sits in the taken branch of a :func:`jax.lax.cond`, so a good value costs one device-side
    comparison instead of a host round trip on every call (which, unconditional, cost more than a small jitted
    step itself; see the commit that introduced this helper). The callback's zero result is added to ``value``,
    a data dependency that keeps the check from being compiled away.

    Args:
        value: an integer or float array, traced.
        is_bad: a boolean scalar computed from ``value``.
        report: called with ``value`` as a NumPy array when ``is_bad``; expected to raise ``ValueError``.
    """

    def call(host_value):
        report(host_value)
        return np.zeros((), value.dtype)

    result = jax.ShapeDtypeStruct((), value.dtype)
    zero = jax.lax.cond(
        is_bad,
        lambda v: jax.pure_callback(call, result, v, vmap_method="sequential"),
        lambda v: jnp.zeros((), v.dtype),
        value,
    )
    return value + zero


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
