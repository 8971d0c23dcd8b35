"""Orbax checkpoints of pytrees: periodic, keep-last-N, atomic, verified on restore.

This module is storage only: it saves and restores any pytree of arrays (a
:class:`~rnnjax.train.TrainState`, a dict of parameters, ...) with JSON metadata, and knows nothing of
training. Restoring a training run from its directory, with the model rebuilt from the saved run config, is
:func:`rnnjax.train.restore_run`.

Layout of a checkpoint directory (Orbax's own)::

    ckpt_dir/
      <step>/state/...     the tree's arrays (typed PRNG keys as their uint32 key data)
      <step>/meta/...      JSON: step, a SHA-256 digest of every array, the PRNG implementation of every key,
                           the caller's config and extra data
      corrupt/<step>-<t>/  checkpoints that failed verification, moved aside by resuming (never loaded)

Atomicity is Orbax's: a step is written under a temporary name and renamed when complete, so a process
killed mid-save leaves only a temporary directory, which is ignored and later cleaned up. On top of that,
every restore recomputes the digest of the arrays it read and compares it with the one saved: a truncated,
edited or half-deleted checkpoint fails that check (or fails to load at all), is reported with a warning and
skipped in favour of the next older one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CORRUPT_DIR = "corrupt"
FORMAT_VERSION = 2
"""2: PRNG keys anywhere in the tree (``meta["prng_keys"]``); 1: one key at ``rng`` (``meta["rng_impl"]``)."""


class CheckpointWarning(UserWarning):
    """A checkpoint was found unreadable or corrupt and skipped."""


def _is_key(leaf) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _path_name(path) -> str:
    """A container-agnostic path: ``opt_state/1/0/mu`` for NamedTuples, tuples, dicts and lists alike."""
    return "/".join(_key_name(entry) for entry in path)


def to_storable(tree) -> tuple[Any, dict[str, str]]:
    """``tree`` with every typed PRNG key replaced by its ``uint32`` key data.

    Args:
        tree: any pytree of arrays.

    Returns:
        ``(storable, prng_keys)``: the tree, and the PRNG implementation of every key by its path
        (e.g. ``{"rng": "threefry2x32"}``).
    """
    impls = {}

    def store(path, leaf):
        if _is_key(leaf):
            impls[_path_name(path)] = str(jax.random.key_impl(leaf))
            return jax.random.key_data(leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(store, tree), impls


def from_storable(tree, prng_keys: Mapping[str, str]):
    """Inverse of :func:`to_storable`: wraps the key data at the paths of ``prng_keys`` into typed keys."""

    def load(path, leaf):
        name = _path_name(path)
        return jax.random.wrap_key_data(leaf, impl=prng_keys[name]) if name in prng_keys else leaf

    return jax.tree_util.tree_map_with_path(load, tree)


def _saved_keys(meta: Mapping) -> dict[str, str]:
    if "prng_keys" in meta:
        return dict(meta["prng_keys"])
    return {"rng": meta["rng_impl"]} if meta.get("rng_impl") else {}  # format 1


def _step_of(tree) -> int:
    found = tree.get("step") if isinstance(tree, Mapping) else getattr(tree, "step", None)
    if found is None:
        raise ValueError("step: the tree has no 'step' entry, so pass the checkpoint's step explicitly (step=...)")
    return int(jax.device_get(found))


def _host_value(leaf) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = leaf.addressable_data(0)  # this process's copy (the whole value for replicated arrays)
    return np.asarray(leaf)


def _key_name(entry) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def digest(tree) -> str:
    """SHA-256 over the path, dtype, shape and bytes of every array of ``tree``.

    Paths are written container-agnostically (``opt_state/1/0/mu/...``), so a tree restored as plain dicts and
    lists has the same digest as the NamedTuples and tuples it was saved from.
    """
    entries = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        entries.append(("/".join(_key_name(entry) for entry in path), _host_value(leaf)))
    hasher = hashlib.sha256()
    for name, value in sorted(entries, key=lambda entry: entry[0]):
        hasher.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        hasher.update(np.ascontiguousarray(value).tobytes())
    return hasher.hexdigest()


def _abstract(tree):
    def leaf_struct(leaf):
        sharding = getattr(leaf, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)

    return jax.tree.map(leaf_struct, tree)


class CheckpointManager:
    """Saves and restores pytree checkpoints (e.g. a :class:`~rnnjax.train.TrainState`) in one directory.

    Args:
        directory: where checkpoints live (created if missing).
        keep: number of most recent checkpoints kept (older ones are deleted after each save).
        async_save: write in a background thread (Orbax's asynchronous checkpointing); :meth:`close` or
            :meth:`wait` waits for it.

    Example:
        >>> with CheckpointManager("/tmp/run", keep=3) as manager:
        ...     manager.save(state, config={"lr": 1e-3})
        ...     state, meta = manager.restore(target=state)
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # Context manager.

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def wait(self) -> None:
        """Blocks until the last save is complete on disk."""
        self._manager.wait_until_finished()

    # Saving.

    def steps(self) -> list[int]:
        """Steps of the complete (finalised) checkpoints, ascending; not verified."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``; not verified."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(
        self,
        tree,
        *,
        step: int | None = None,
        config: Mapping[str, Any] | None = None,
        extra: Mapping | None = None,
    ) -> None:
        """Saves ``tree`` as checkpoint ``step`` (atomically; asynchronously if configured).

        Args:
            tree: any pytree of arrays; typed PRNG keys are stored as their key data and restored as keys.
            step: the checkpoint's number; default: the tree's ``step`` entry (attribute or key), as in a
                :class:`~rnnjax.train.TrainState`.
            config: JSON-serialisable description of the run, stored with the checkpoint (``meta["config"]``).
            extra: any other JSON-serialisable data to store (``meta["extra"]``).

        Raises:
            ValueError: if ``step`` is not given and ``tree`` has no ``step`` entry.
        """
        step = _step_of(tree) if step is None else int(step)
        storable, prng_keys = to_storable(tree)
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "digest": digest(storable),
            "prng_keys": prng_keys,
            "config": dict(config or {}),
            "extra": dict(extra or {}),
            "time": time.time(),
        }
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(storable), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    # Restoring.

    def read_meta(self, step: int) -> dict:
        """The JSON metadata saved with ``step`` (not verified)."""
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def latest_meta(self, step: int | None = None) -> dict | None:
        """The metadata of ``step``, or else of the newest step whose metadata is readable; ``None`` if none.

        Not verified: use it to decide how to restore (e.g. to rebuild the target from ``meta["config"]``).
        """
        candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
        for candidate in candidates:
            try:
                return self.read_meta(candidate)
            except Exception:  # noqa: BLE001  a corrupt step; restore() reports it
                continue
        return None

    def restore_step(self, step: int, target=None) -> tuple[Any, dict]:
        """Restores and verifies one step.

        Args:
            step: the checkpoint's step.
            target: a tree (of arrays or ``jax.ShapeDtypeStruct``) with the structure, dtypes and shardings to
                restore into, e.g. a freshly initialised ``TrainState``; ``None`` restores the saved structure
                as nested dicts and lists.

        Returns:
            ``(tree, meta)``: the tree in the structure of ``target`` (PRNG keys as typed keys).

        Raises:
            ValueError: if the checkpoint is incomplete, unreadable or fails its digest check.
        """
        meta = self.read_meta(step)
        if meta.get("step") != step or "digest" not in meta:
            raise ValueError(f"metadata of step {step} is inconsistent: {meta!r:.200}")
        prng_keys = _saved_keys(meta)
        if target is None:
            state_args = ocp.args.StandardRestore()
        else:
            storable, target_keys = to_storable(target)
            prng_keys = {**target_keys, **prng_keys}
            state_args = ocp.args.StandardRestore(_abstract(storable))
        restored = self._manager.restore(step, args=ocp.args.Composite(state=state_args)).state
        found = digest(restored)
        if found != meta["digest"]:
            raise ValueError(f"digest mismatch: saved {meta['digest'][:16]}..., read {found[:16]}...")
        return from_storable(restored, prng_keys), meta

    def restore(self, target=None, *, step: int | None = None, quarantine: bool = False) -> tuple[Any, dict] | None:
        """Restores the newest checkpoint that passes verification (or exactly ``step``).

        Checkpoints that fail are reported with a :class:`CheckpointWarning` and skipped; with ``quarantine``
        they are also moved to ``<directory>/corrupt/`` so that training can write those steps again.

        Args:
            target: see :meth:`restore_step`.
            step: restore this step only (no fallback).
            quarantine: move failing checkpoints aside.

        Returns:
            ``(tree, meta)``, or ``None`` if no checkpoint could be restored.
        """
        candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
        for candidate in candidates:
            try:
                return self.restore_step(candidate, target)
            except Exception as error:  # noqa: BLE001  any failure to read means "do not load"
                warnings.warn(
                    f"checkpoint step {candidate} in {self.directory} is unreadable or corrupt and was skipped "
                    f"({type(error).__name__}: {str(error)[:300]})",
                    CheckpointWarning,
                    stacklevel=2,
                )
                if quarantine:
                    self._quarantine(candidate)
        return None

    def _quarantine(self, step: int) -> None:
        source = os.path.join(self.directory, str(step))
        if not os.path.isdir(source):
            return
        destination = os.path.join(self.directory, CORRUPT_DIR, f"{step}-{int(time.time() * 1000)}")
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        shutil.move(source, destination)
        self._manager.reload()


def save(
    directory: str | os.PathLike,
    tree,
    *,
    step: int | None = None,
    config: Mapping | None = None,
    keep: int = 3,
) -> None:
    """Saves ``tree`` to ``directory`` synchronously (a one-off :meth:`CheckpointManager.save`)."""
    with CheckpointManager(directory, keep=keep, async_save=False) as manager:
        manager.save(tree, step=step, config=config)


def flat_arrays(tree) -> dict[str, np.ndarray]:
    """Every array of ``tree`` as a host array named by its path: ``{"core/w_ih": ..., "layers/0/b": ...}``.

    Names join the dict keys, sequence indices and attribute names on the way to each leaf with ``/``
    (``_path_name``), the names :func:`save_npz` writes.

    Raises:
        ValueError: a dict key contains ``/`` (its name would be ambiguous), or two leaves share a name.
    """
    arrays: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [_key_name(entry) for entry in path]
        if any("/" in part for part in parts):
            raise ValueError(f"tree: a key on the path {parts} contains '/', which names cannot hold")
        name = "/".join(parts)
        if name in arrays:
            raise ValueError(f"tree: two leaves are both named {name!r}")
        arrays[name] = _host_value(jax.random.key_data(leaf) if _is_key(leaf) else leaf)
    return arrays


def save_npz(path: str | os.PathLike, tree) -> None:
    """Writes the arrays of ``tree`` (e.g. a model's parameters) to a NumPy ``.npz`` file with flat names.

    Each array is stored under its path in the tree, parts joined by ``/`` (:func:`flat_arrays`), so
    ``{"core": {"w_ih": ...}, "layers": [{"b": ...}]}`` gives ``core/w_ih`` and ``layers/0/b``. Typed PRNG keys
    are stored as their ``uint32`` key data. This is what ``python -m rnnjax train --save-params`` writes.

    Example:
        >>> save_npz("params.npz", params)
        >>> sorted(np.load("params.npz"))          # ['core/b', 'core/w_hh', 'core/w_ih', 'head/b', 'head/w']
        >>> params = load_npz("params.npz", like=model.init(jax.random.key(0)))
    """
    with open(path, "wb") as file:  # a file object: np.savez would append .npz to another name
        np.savez(file, **flat_arrays(tree))


def load_npz(path: str | os.PathLike, like=None):
    """Reads a :func:`save_npz` file back.

    Args:
        path: the ``.npz`` file.
        like: a tree with the structure to restore into (e.g. ``model.init(key)``, or ``jax.eval_shape`` of
            it); its names must be exactly the file's, with the same shapes. ``None``: nested dicts, with
            lists where the keys of a level are ``0 .. n-1``.

    Returns:
        The tree of NumPy arrays, in the structure of ``like`` if given.

    Raises:
        ValueError: the file's names or shapes do not match ``like`` (the message lists the differences).
    """
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    if like is None:
        return _nest(arrays)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = ["/".join(_key_name(entry) for entry in leaf_path) for leaf_path, _ in leaves]
    missing, unexpected = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
    if missing or unexpected:
        raise ValueError(f"{path}: the names differ from like's: missing {missing}, unexpected {unexpected}")
    shapes = [
        f"{name}: {arrays[name].shape} in the file, {np.shape(leaf)} in like"
        for name, (_, leaf) in zip(names, leaves)
        if arrays[name].shape != np.shape(leaf)
    ]
    if shapes:
        raise ValueError(f"{path}: the shapes differ from like's: {'; '.join(shapes)}")
    return jax.tree_util.tree_unflatten(treedef, [arrays[name] for name in names])


def _nest(arrays: Mapping[str, np.ndarray]):
    """``{"a/0/b": x}`` -> ``{"a": [{"b": x}]}``: nested dicts, and lists where the keys are ``0 .. n-1``."""
    root: dict = {}
    for name, value in arrays.items():
        *parents, leaf = name.split("/")
        node = root
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def listify(node):
        if not isinstance(node, dict):
            return node
        node = {key: listify(child) for key, child in node.items()}
        if node and sorted(node) == sorted(str(i) for i in range(len(node))):
            return [node[str(i)] for i in range(len(node))]
        return node

    return listify(root)


def restore(directory: str | os.PathLike, target=None, *, step: int | None = None):
    """The latest valid checkpoint in ``directory`` (corrupt checkpoints are skipped with a warning).

    To restore a run written by :func:`rnnjax.train.run` or ``python -m rnnjax train`` with its structure
    and model rebuilt from the saved run config, use :func:`rnnjax.train.restore_run`.

    Args:
        directory: a checkpoint directory written by :class:`CheckpointManager`, :func:`rnnjax.train.fit` or
            ``rnnjax train``.
        target: a tree with the structure to restore into (e.g. ``rnnjax.train.initial_state(model,
            optimizer, seed)``); ``None``: the arrays come back as nested dicts and lists.
        step: restore exactly this step.

    Returns:
        The tree, in the structure of ``target``.

    Raises:
        FileNotFoundError: if ``directory`` does not exist or no checkpoint in it could be restored.
    """
    tree, _ = restore_with_meta(directory, target, step=step)
    return tree


def restore_with_meta(directory: str | os.PathLike, target=None, *, step: int | None = None) -> tuple[Any, dict]:
    """:func:`restore`, also returning the checkpoint's metadata (``step``, ``config``, ``extra``, ...)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    with CheckpointManager(directory, async_save=False) as manager:
        available = sorted(manager.steps())
        if step is not None and step not in available:
            raise FileNotFoundError(
                f"step {step} is absent from {directory}; steps there: {available if available else 'none'}"
            )
        restored = manager.restore(target, step=step)
    if restored is None:
        raise FileNotFoundError(f"no valid checkpoint in {directory} (steps there: {available or 'none'})")
    return restored
