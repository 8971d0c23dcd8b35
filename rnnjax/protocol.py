"""The one protocol every recurrent object follows: :class:`SequenceCore`.

Cells (:class:`rnnjax.Cell`) and layers (:class:`rnnjax.Bidirectional`, :class:`rnnjax.Stack`) are both
sequence cores: frozen dataclasses of hyperparameters with pure methods::

    params = core.init(key, input_size)
    carry = core.initial_carry(batch_shape, dtype)
    carry, ys = core.sequence(params, carry, xs, mask, *, unroll, remat, dropout_key)   # time-major

:func:`rnnjax.unroll` is the single entry point that runs any of them: it checks inputs, converts layouts, turns
``lengths`` into ``mask`` and handles ``reverse``, then calls :meth:`SequenceCore.sequence`. A layer declares
the cores it is made of with :meth:`SequenceCore.children`, so code that walks a model (diagnostics, the NNX
adapter) needs no knowledge of particular layers.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.types import Array, Carry, DType, Params, PRNGKey

Path = tuple[str | int, ...]


class Child(NamedTuple):
    """One core inside a layer, as :meth:`SequenceCore.children` declares it.

    Attributes:
        path: where the child's parameters and carry sit inside the layer's: ``("forward",)`` means
            ``params["forward"]`` and ``carry.forward``; ``("layers", 1)`` means ``params["layers"][1]`` and
            ``carry.layers[1]``.
        core: the child (a cell or a layer).
        reverse: whether the child processes each row backwards in time relative to its parent.
    """

    path: Path
    core: Any
    reverse: bool = False


class SequenceCore(abc.ABC):
    """Anything recurrent that :func:`rnnjax.unroll` runs: cells and layers alike."""

    @property
    @abc.abstractmethod
    def output_size(self) -> int:
        """``O``, the feature size of the outputs."""

    @abc.abstractmethod
    def init(self, key: PRNGKey, input_size: int) -> Params:
        """Creates parameters for inputs with ``input_size`` features."""

    @abc.abstractmethod
    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32) -> Carry:
        """The zero state for a batch of shape ``batch_shape``."""

    @abc.abstractmethod
    def input_size(self, params: Params) -> int:
        """``I``, read off ``params``."""

    @abc.abstractmethod
    def sequence(
        self,
        params: Params,
        carry: Carry,
        xs: Array,
        mask: Array | None,
        *,
        unroll: int | bool = 1,
        remat: bool | int = False,
        dropout_key: PRNGKey | None = None,
    ) -> tuple[Carry, Any]:
        """Runs a whole time-major sequence.

        Args:
            params: from :meth:`init`.
            carry: the state before the first step, leaves ``(*B, ...)`` (never ``None`` here).
            xs: ``(T, *B, I)``, already checked by :func:`rnnjax.unroll`.
            mask: ``(T, *B)`` booleans, a prefix of ``True`` per row (``t < length``), or ``None``.
            unroll, remat: as for :func:`rnnjax.unroll`.
            dropout_key: PRNG key for dropout inside the core (training); ``None`` turns dropout off.

        Returns:
            ``(final_carry, ys)`` with ``ys`` ``(T, *B, O)`` (a pair of such arrays for a bidirectional layer
            with ``merge="none"``), zero where ``mask`` is false; the carry is held past each row's length.
        """

    def param_shapes(self, input_size: int) -> Params:
        """The parameter tree :meth:`init` makes for ``input_size`` features, as ``jax.ShapeDtypeStruct`` leaves.

        Nothing is computed. :func:`rnnjax.unroll` and ``step`` check the parameters they are given against this
        tree (keys and shapes, not dtypes) while tracing, and name the first path that differs.
        """
        return jax.eval_shape(lambda: self.init(jax.random.key(0), input_size))

    def children(self) -> tuple[Child, ...]:
        """The cores this one is made of (none for a cell)."""
        return ()

    def replace_children(self, cores: Sequence[Any]) -> SequenceCore:
        """A copy with the cores of :meth:`children` replaced, in the same order (used to wrap every cell)."""
        if cores:
            raise TypeError(f"{type(self).__name__} has no children to replace")
        return self

    @property
    def can_stream(self) -> bool:
        """Whether it has a ``step`` for one element at a time (a bidirectional layer needs the whole row)."""
        return False

    @property
    def uses_dropout(self) -> bool:
        """Whether :meth:`sequence` draws from ``dropout_key`` (so a training call needs one)."""
        return any(child.core.uses_dropout for child in self.children() if isinstance(child.core, SequenceCore))

    def last_outputs(self, ys: Array, lengths: Array | None) -> Array:
        """Each row's summary output: the output at its last valid step, ``(B, T, O)`` -> ``(B, O)``.

        Layers whose outputs summarise the row elsewhere override this (a bidirectional layer reads its backward
        half at step 0, where the backward direction has seen the whole row).
        """
        num_steps = ys.shape[1]
        if lengths is None:
            index = jnp.full(ys.shape[:1], num_steps - 1, jnp.int32)  # (B,)
        else:
            index = jnp.maximum(jnp.asarray(lengths).astype(jnp.int32) - 1, 0)  # (B,)
        return jnp.take_along_axis(ys, index[:, None, None], axis=1)[:, 0]  # (B, O)


# Paths into parameter and carry trees.


def get_path(tree, path: Path):
    """``tree`` at ``path``: dict keys, sequence indices and NamedTuple field names, in turn."""
    for key in path:
        tree = getattr(tree, key) if isinstance(key, str) and _is_namedtuple(tree) else tree[key]
    return tree


def set_path(tree, path: Path, value):
    """A copy of ``tree`` with the entry at ``path`` replaced by ``value`` (``tree`` itself is not changed)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(key, str) and _is_namedtuple(tree):
        return tree._replace(**{key: set_path(getattr(tree, key), rest, value)})
    if isinstance(tree, dict):
        return {**tree, key: set_path(tree[key], rest, value)}
    items = list(tree)
    items[key] = set_path(items[key], rest, value)
    return type(tree)(items) if isinstance(tree, list) else tuple(items)


def _is_namedtuple(tree) -> bool:
    return isinstance(tree, tuple) and hasattr(type(tree), "_fields")


def walk_cells(core, path: Path = (), reverse: bool = False) -> list[tuple[Path, Any, bool]]:
    """``(path, cell, runs_in_reverse)`` for every cell (core without children) inside ``core``."""
    children = core.children() if isinstance(core, SequenceCore) else ()
    if not children:
        return [(path, core, reverse)]
    found = []
    for child in children:
        found += walk_cells(child.core, path + child.path, reverse != child.reverse)
    return found


def map_cells(core, fn):
    """``core`` with every cell replaced by ``fn(cell)`` (layers rebuilt through their children)."""
    children = core.children() if isinstance(core, SequenceCore) else ()
    if not children:
        return fn(core)
    return core.replace_children([map_cells(child.core, fn) for child in children])
