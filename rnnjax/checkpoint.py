"""Orbax checkpoints of a :class:`~rnnjax.train.TrainState`: periodic, keep-last-N, atomic, verified on restore.

Layout of a checkpoint directory (Orbax's own)::

    ckpt_dir/
      <step>/state/...     the TrainState arrays (params, opt_state, step, rng key data, carry)
      <step>/meta/...      JSON: step, a SHA-256 digest of every array, the run's config, library version
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

from rnnjax.train.state import TrainState

CORRUPT_DIR = "corrupt"
FORMAT_VERSION = 1


class CheckpointWarning(UserWarning):
    """A checkpoint was found unreadable or corrupt and skipped."""


def to_storable(state: TrainState) -> dict:
    """The state as a plain dict of arrays (the typed PRNG key as its ``uint32`` key data)."""
    return {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng),
        "carry": state.carry,
    }


def from_storable(tree: Mapping, rng_impl: str | None = None) -> TrainState:
    """Inverse of :func:`to_storable`; ``rng_impl`` names the key's PRNG implementation (default threefry)."""
    return TrainState(
        step=tree["step"],
        params=tree["params"],
        opt_state=tree["opt_state"],
        rng=jax.random.wrap_key_data(tree["rng"], impl=rng_impl),
        carry=tree.get("carry"),
    )


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
    """Saves and restores :class:`~rnnjax.train.TrainState` checkpoints in one directory.

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

    def save(self, state: TrainState, *, config: Mapping[str, Any] | None = None, extra: Mapping | None = None):
        """Saves ``state`` as step ``int(state.step)`` (atomically; asynchronously if configured).

        Args:
            state: the state to save.
            config: JSON-serialisable description of the run, stored with the checkpoint (see
                :func:`restore` without a target).
            extra: any other JSON-serialisable data to store.
        """
        step = int(jax.device_get(state.step))
        storable = to_storable(state)
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "digest": digest(storable),
            "rng_impl": str(jax.random.key_impl(state.rng)),
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

    def restore_step(self, step: int, target: TrainState | None = None) -> tuple[TrainState, dict]:
        """Restores and verifies one step.

        Args:
            step: the checkpoint's step.
            target: a state (or ``jax.ShapeDtypeStruct`` tree) with the structure, dtypes and shardings to
                restore into; ``None`` restores the saved structure as nested dicts and lists.

        Returns:
            ``(state, meta)``.

        Raises:
            ValueError: if the checkpoint is incomplete, unreadable or fails its digest check.
        """
        meta = self.read_meta(step)
        if meta.get("step") != step or "digest" not in meta:
            raise ValueError(f"metadata of step {step} is inconsistent: {meta!r:.200}")
        if target is None:
            state_args = ocp.args.StandardRestore()
        else:
            state_args = ocp.args.StandardRestore(_abstract(to_storable(target)))
        restored = self._manager.restore(step, args=ocp.args.Composite(state=state_args)).state
        found = digest(restored)
        if found != meta["digest"]:
            raise ValueError(f"digest mismatch: saved {meta['digest'][:16]}..., read {found[:16]}...")
        return from_storable(restored, meta.get("rng_impl")), meta

    def restore(
        self, target: TrainState | None = None, *, step: int | None = None, quarantine: bool = False
    ) -> tuple[TrainState, dict] | None:
        """Restores the newest checkpoint that passes verification (or exactly ``step``).

        Checkpoints that fail are reported with a :class:`CheckpointWarning` and skipped; with ``quarantine``
        they are also moved to ``<directory>/corrupt/`` so that training can write those steps again.

        Args:
            target: see :meth:`restore_step`.
            step: restore this step only (no fallback).
            quarantine: move failing checkpoints aside.

        Returns:
            ``(state, meta)``, or ``None`` if no checkpoint could be restored.
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


def save(directory: str | os.PathLike, state: TrainState, *, config: Mapping | None = None, keep: int = 3) -> None:
    """Saves ``state`` to ``directory`` synchronously (a one-off :meth:`CheckpointManager.save`)."""
    with CheckpointManager(directory, keep=keep, async_save=False) as manager:
        manager.save(state, config=config)


def restore(directory: str | os.PathLike, target: TrainState | None = None, *, step: int | None = None) -> TrainState:
    """The latest valid :class:`~rnnjax.train.TrainState` in ``directory`` (corrupt checkpoints are skipped).

    Args:
        directory: a checkpoint directory written by :class:`CheckpointManager` or ``rnnjax train``.
        target: a state with the structure to restore into. ``None``: for runs started by
            :func:`rnnjax.train.run` or ``python -m rnnjax train`` the structure is rebuilt from the
            saved run config; otherwise parameters and optimiser state come back as nested dicts and lists.
        step: restore exactly this step.

    Raises:
        FileNotFoundError: if no checkpoint in ``directory`` could be restored.
    """
    state, _ = restore_with_meta(directory, target, step=step)
    return state


def restore_with_meta(directory, target: TrainState | None = None, *, step: int | None = None):
    """:func:`restore`, also returning the checkpoint's metadata (``step``, ``config``, ``extra``, ...)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    with CheckpointManager(directory, async_save=False) as manager:
        if target is None:
            target = _target_from_config(manager, step)
        restored = manager.restore(target, step=step)
    if restored is None:
        raise FileNotFoundError(f"no valid checkpoint in {directory}")
    return restored


def _target_from_config(manager: CheckpointManager, step: int | None) -> TrainState | None:
    candidates = [step] if step is not None else sorted(manager.steps(), reverse=True)
    for candidate in candidates:
        try:
            config = manager.read_meta(candidate).get("config", {})
        except Exception:  # noqa: BLE001  a corrupt step; restore() reports it
            continue
        if "run" in config:
            from rnnjax.train.run import RunConfig

            return RunConfig.from_dict(config["run"]).initial_state()
        return None
    return None
