"""The training loop: :func:`fit` a model to a task, with evaluation, JSONL metrics and resumable checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from rnnjax import checkpoint
from rnnjax.train import sharding
from rnnjax.train import tbptt as tbptt_lib
from rnnjax.train.optim import OptimizerConfig
from rnnjax.train.state import TrainState, create_train_state
from rnnjax.train.step import LossFn, Optimizer, evaluate, make_train_step, model_loss_fn

NONFINITE_POLICIES = ("raise", "stop")

DATA_SEED_STRIDE = 1000
"""A run with seed ``s`` trains on data seed ``task.seed + DATA_SEED_STRIDE * s`` unless given one."""


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
        state: the final :class:`TrainState` (the last good one if training stopped on a non-finite loss).
        history: training records (``step``, ``loss``, ``grad_norm``, ``grad_norm_clipped``, ``lr``, task
            metrics, ``time``), one every ``log_every`` steps.
        evals: evaluation records (``step``, ``split`` and the task's metrics).
        status: ``"completed"`` or ``"nonfinite"``.
        message: why training stopped early, if it did.
        start_step: the step training started from (non-zero when resumed from a checkpoint).
    """

    state: TrainState
    history: list[dict]
    evals: list[dict]
    status: str = "completed"
    message: str = ""
    start_step: int = 0


class ResumeError(ValueError):
    """A checkpoint directory cannot be resumed by this run (its settings differ)."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; ``result`` holds the last good state and the history."""

    def __init__(self, message: str, result: FitResult):
        super().__init__(message)
        self.result = result


def initial_state(model, optimizer, seed: int, *, params=None, carry=None) -> TrainState:
    """The state :func:`fit` starts from: ``model.init`` and the step keys both derive from ``seed``."""
    init_key, train_key = jax.random.split(jax.random.key(seed))
    if params is None:
        params = model.init(init_key)
    optimizer = optimizer if isinstance(optimizer, Optimizer) else Optimizer(optimizer)
    return create_train_state(params, optimizer.tx, train_key, carry)


def data_seed_of(task, seed: int, data_seed: int | None = None) -> int | None:
    """The seed of a run's training batches: ``data_seed`` if given, else ``task.seed + 1000 * seed``.

    Seed 0 therefore trains on the task's own batches, and every other seed on an order of its own (the
    same rule as :func:`rnnjax.train.train_seeds` and ``python -m rnnjax train --seed``). A task without a
    ``seed`` field cannot be reseeded: ``None``, its own batches.
    """
    if data_seed is not None:
        return data_seed
    if getattr(task, "seed", None) is None:
        return None
    return int(task.seed) + DATA_SEED_STRIDE * int(seed)


def training_task(task, seed: int, data_seed: int | None = None):
    """``task`` with its seed replaced by :func:`data_seed_of`: the task whose ``train_batch`` a run trains on.

    Evaluation splits stay those of ``task`` itself, whatever the seeds.

    Raises:
        ValueError: ``data_seed`` is given but ``task`` has no ``seed`` field to replace.
    """
    resolved = data_seed_of(task, seed, data_seed)
    if resolved is None or resolved == getattr(task, "seed", None):
        return task
    if not (dataclasses.is_dataclass(task) and hasattr(task, "seed")):
        raise ValueError(
            f"data_seed={data_seed!r} needs a task with a seed field (a rnnjax.tasks.Task); "
            f"{type(task).__name__} has none"
        )
    return dataclasses.replace(task, seed=resolved)


def _check_int(name: str, value, *, minimum: int | None = None) -> None:
    """Raises naming ``name`` unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def fit(
    model,
    task,
    *,
    steps: int,
    batch_size: int = 32,
    optimizer: OptimizerConfig | optax.GradientTransformation | None = None,
    seed: int = 0,
    data_seed: int | None = None,
    params=None,
    loss_fn: LossFn | tbptt_lib.CarryLossFn | None = None,
    tbptt: int | None = None,
    eval_every: int = 0,
    eval_splits: Sequence[str] = ("valid",),
    eval_batch_size: int | None = 1000,
    log_every: int = 10,
    metrics_path: str | os.PathLike | None = None,
    progress: bool | None = None,
    ckpt_dir: str | os.PathLike | None = None,
    save_every: int = 0,
    keep: int = 3,
    resume: bool = False,
    config: dict | None = None,
    mesh: jax.sharding.Mesh | None = None,
    on_nonfinite: str = "raise",
) -> FitResult:
    """Trains ``model`` on ``task`` for ``steps`` updates.

    Step ``s`` trains on batch ``s`` of the task reseeded with the data seed (``train_batch(s, batch_size)``,
    or a window of it with ``tbptt``), so a run is a pure function of its arguments: resuming from a
    checkpoint (``resume=True``) continues on exactly the batches, dropout keys and optimiser state an
    uninterrupted run would have used, and ends with bitwise the same parameters on the same machine.

    Seeds: ``seed`` seeds the initial parameters and the dropout keys, and by default also the data order
    (data seed ``task.seed + 1000 * seed``: seed 0 trains on the task's own batches, every other seed on an
    order of its own), as ``python -m rnnjax train --seed`` and :func:`rnnjax.train.train_seeds` do.
    ``data_seed`` fixes the data order separately. Evaluation splits are the task's own, shared by all seeds.

    To train a finished run longer, resume it with ``steps`` raised and the optimiser extended by a schedule
    segment (:meth:`OptimizerConfig.extended`); every other setting must stay as it was.

    Args:
        model: a :class:`rnnjax.models.SequenceModel` or anything with ``init(key)`` and
            ``loss_and_metrics(params, batch, kind, dropout_key=...)``.
        task: a :class:`rnnjax.tasks.Task`.
        steps: total number of updates (a resumed run continues up to this total).
        batch_size: rows per update (the global batch with ``mesh``).
        optimizer: an :class:`OptimizerConfig` or any Optax transformation (default ``OptimizerConfig()``:
            Adam at 1e-3 with global-norm clipping at 1).
        seed: seeds the initial parameters and the dropout keys, and the data order unless ``data_seed`` is
            given.
        data_seed: seed of the training batches (the task's ``seed`` replaced by it); ``None``: ``task.seed +
            1000 * seed`` (:func:`data_seed_of`). Needs a task with a ``seed`` field when given.
        params: initial parameters instead of ``model.init``.
        loss_fn: a loss instead of the model's own: ``loss_fn(params, batch, key) -> (loss, aux)``
            (:data:`~rnnjax.train.LossFn`), or with ``tbptt`` a loss that takes and returns the carried state,
            ``loss_fn(params, batch, key, carry) -> (loss, (carry, aux))``
            (:data:`~rnnjax.train.tbptt.CarryLossFn`; ``batch`` is one window, ``carry`` the state the previous
            window ended with, already cut from the gradient).
        tbptt: train with truncated BPTT in windows of this many steps (per-step tasks and models with
            ``initial_carry`` and ``apply_with_carry`` only; see :mod:`rnnjax.train.tbptt`).
        eval_every: evaluate on ``eval_splits`` every this many steps and at the end (0: never).
        eval_splits: splits to evaluate.
        eval_batch_size: rows per evaluation forward pass.
        log_every: record training metrics every this many steps (the loss is checked every step).
        metrics_path: append every record as a JSON line to this file.
        progress: show a tqdm progress bar; ``None`` shows it only on a terminal.
        ckpt_dir: checkpoint directory (``None``: no checkpoints).
        save_every: checkpoint every this many steps (and always at the end when ``ckpt_dir`` is set).
        keep: checkpoints kept.
        resume: continue from the newest valid checkpoint in ``ckpt_dir`` (starting fresh if there is none).
            Without it, a ``ckpt_dir`` that already holds checkpoints is an error; with it, changed settings
            are a :class:`ResumeError`, except schedule segments added from the checkpoint's step on.
        config: JSON-serialisable description of the run, saved with every checkpoint.
        mesh: train data-parallel over this mesh (see :mod:`rnnjax.train.sharding`); ``None``: the default device.
        on_nonfinite: on a NaN or infinite loss or gradient norm, ``"raise"`` :class:`NonFiniteLossError`
            or ``"stop"`` and return with ``status="nonfinite"``. Either way the bad update is discarded and no
            checkpoint is written after it, so the newest checkpoint is the last good one.

    Returns:
        A :class:`FitResult`.

    Raises:
        TypeError: an argument of the wrong type (named in the message).
        ValueError: invalid arguments (named in the message), e.g. ``batch_size=0``, ``tbptt`` with a
            sequence-level task, a model without a carried state, a ``loss_fn`` that does not take the carry,
            or one that needs it without ``tbptt``, or a ``data_seed`` for a task without a ``seed`` field.
        ResumeError: ``resume=True`` and the checkpoint's settings differ (named in the message).
        FileExistsError: ``ckpt_dir`` holds checkpoints and ``resume`` is false.
    """
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
    _check_int("steps", steps, minimum=0)
    _check_int("batch_size", batch_size, minimum=1)
    _check_int("seed", seed)
    if data_seed is not None:
        _check_int("data_seed", data_seed, minimum=0)
    _check_int("eval_every", eval_every, minimum=0)
    _check_int("log_every", log_every, minimum=1)
    _check_int("save_every", save_every, minimum=0)
    _check_int("keep", keep, minimum=1)
    if eval_batch_size is not None:
        _check_int("eval_batch_size", eval_batch_size, minimum=1)
    if tbptt is not None:
        _check_int("tbptt", tbptt, minimum=0)  # 0 or None: full backpropagation through time
    if isinstance(eval_splits, str):
        raise TypeError(f"eval_splits must be a sequence of split names such as ('valid',), got {eval_splits!r}")
    if (resume or save_every) and ckpt_dir is None:
        raise ValueError("resume and save_every need a ckpt_dir")
    if tbptt:
        _check_tbptt(model, task, loss_fn, tbptt)
    elif loss_fn is not None and not tbptt_lib.accepts_positional(loss_fn, 3):
        raise ValueError(
            f"loss_fn {getattr(loss_fn, '__qualname__', loss_fn)!r} cannot be called as loss_fn(params, batch, key); "
            "a loss that takes the carry, loss_fn(params, batch, key, carry), needs tbptt=k"
        )
    optimizer = OptimizerConfig() if optimizer is None else optimizer
    optimizer_obj = Optimizer(optimizer)
    is_main = jax.process_index() == 0

    # Data: step -> host batch, from the task reseeded with the data seed (evaluation uses the task itself).
    batch_fn, windows = _batch_source(training_task(task, seed, data_seed), batch_size, tbptt)
    carry = model.initial_carry(batch_size) if tbptt else None

    state = initial_state(model, optimizer_obj, seed, params=params, carry=carry)
    step_fn = _compiled_step(model, task.kind, optimizer, loss_fn, windows if tbptt else 0, batch_size, mesh)
    if mesh is not None:
        state = _place_state(state, mesh)
        place = functools.partial(sharding.shard_batch, mesh=mesh)
    else:
        place = _identity

    fingerprint = _fingerprint(
        model, task, batch_size, optimizer, seed, data_seed_of(task, seed, data_seed), tbptt, loss_fn
    )
    manager = None
    if ckpt_dir is not None:
        manager = checkpoint.CheckpointManager(ckpt_dir, keep=keep)
        state = _maybe_resume(manager, state, resume, fingerprint)
    start = int(jax.device_get(state.step))

    log = MetricsLog(metrics_path if is_main else None, keep_until=start if resume else None)
    history: list[dict] = []
    evals: list[dict] = []
    quiet = (not is_main) or (None if progress is None else not progress)  # None: quiet unless on a terminal
    bar = tqdm(total=steps, initial=start, desc=getattr(task, "name", None) or "train", disable=quiet)
    started = time.perf_counter()

    def run_evals(step: int) -> None:
        for split in eval_splits:
            scores = evaluate(model, state.params, task, split, batch_size=eval_batch_size)
            record = {"step": step, "split": split, **scores}
            evals.append(record)
            log.write(record)

    def save(step: int) -> None:
        if manager is not None and manager.latest_step() != step:
            manager.save(state, config=config, extra={"fingerprint": fingerprint})

    try:
        for s in range(start, steps):
            new_state, metrics = step_fn(state, place(batch_fn(s)))
            loss, grad_norm = (float(v) for v in jax.device_get((metrics["loss"], metrics["grad_norm"])))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # a NaN gradient would poison the params
                message = _nonfinite_message(loss if not math.isfinite(loss) else grad_norm, s, manager)
                log.write({"step": s + 1, "split": "train", "event": "nonfinite", "loss": loss})
                result = FitResult(state, history, evals, "nonfinite", message, start)
                if on_nonfinite == "raise":
                    raise NonFiniteLossError(message, result)
                return result
            state, done = new_state, s + 1
            if done % log_every == 0 or done == steps:
                record = {"step": done, "split": "train", **_floats(metrics)}
                record["time"] = round(time.perf_counter() - started, 4)
                history.append(record)
                log.write(record)
                bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            if eval_every and (done % eval_every == 0 or done == steps):
                run_evals(done)
            if save_every and done % save_every == 0:
                save(done)
            bar.update(1)
        save(int(jax.device_get(state.step)))
    finally:
        bar.close()
        log.close()
        if manager is not None:
            manager.close()
    return FitResult(state, history, evals, start_step=start)


# Helpers.


def _identity(batch):
    return batch


def _check_tbptt(model, task, loss_fn, window) -> None:
    """Raises a ValueError naming the argument when truncated BPTT cannot run with these arguments."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"tbptt must be a positive number of steps, got {window!r}")
    if not task.kind.startswith("per_step"):
        raise ValueError(f"truncated BPTT needs a per-step task (one target per step), got kind {task.kind!r}")
    if not hasattr(model, "initial_carry"):
        raise ValueError(
            f"tbptt needs a model with a carried state (initial_carry and apply_with_carry); "
            f"{type(model).__name__} has none"
        )
    if loss_fn is None and not hasattr(model, "apply_with_carry"):
        raise ValueError(
            f"tbptt needs model.apply_with_carry or a loss_fn taking the carry; {type(model).__name__} has neither"
        )
    if loss_fn is not None and not tbptt_lib.takes_carry(loss_fn):
        raise ValueError(
            "with tbptt, loss_fn must take and return the carried state: "
            "loss_fn(params, batch, key, carry) -> (loss, (carry, aux)) (see rnnjax.train.tbptt.CarryLossFn); "
            f"{getattr(loss_fn, '__qualname__', loss_fn)!r} takes (params, batch, key)"
        )


def _batch_source(task, batch_size: int, window: int | None) -> tuple[Callable[[int], Any], int]:
    """``(batch_fn, windows per sequence)``: ``batch_fn(step)`` is the host batch of ``step``."""
    if not window:
        return (lambda step: task.train_batch(step, batch_size)), 1
    if window < 1:
        raise ValueError(f"tbptt must be a positive number of steps, got {window}")
    num_steps = task.train_batch(0, batch_size).inputs.shape[1]
    windows = tbptt_lib.num_windows(num_steps, window)
    cache: dict[int, Any] = {}

    def batch_fn(step: int):
        sequence, index = divmod(step, windows)
        if sequence not in cache:
            cache.clear()
            cache[sequence] = task.train_batch(sequence, batch_size)
        return tbptt_lib.window_of(cache[sequence], index, window)

    return batch_fn, windows


def _compiled_step(model, kind, optimizer, loss_fn, windows: int, batch_size: int, mesh):
    """The jitted step for these settings, reused across :func:`fit` calls when they are hashable."""
    try:
        return _cached_step(model, kind, optimizer, loss_fn, windows, batch_size, mesh)
    except TypeError:  # unhashable model, optimizer or loss function: build afresh
        return _cached_step.__wrapped__(model, kind, optimizer, loss_fn, windows, batch_size, mesh)


@functools.lru_cache(maxsize=64)
def _cached_step(model, kind, optimizer, loss_fn, windows, batch_size, mesh):
    optimizer = Optimizer(optimizer)
    if windows:
        carry_loss = loss_fn or tbptt_lib.model_carry_loss_fn(model, kind)
        initial = model.initial_carry(batch_size)
        step_fn = tbptt_lib.make_tbptt_step(carry_loss, optimizer, initial, windows, jit=False)
    else:
        step_fn = make_train_step(loss_fn or model_loss_fn(model, kind), optimizer, jit=False)
    if mesh is None:
        return jax.jit(step_fn)
    replicated, rows = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    carry = rows if windows else None
    shardings = TrainState(replicated, replicated, replicated, replicated, carry)
    return jax.jit(step_fn, out_shardings=(shardings, replicated))


def _place_state(state: TrainState, mesh) -> TrainState:
    """Replicates the state over ``mesh``; the carried state (truncated BPTT) is split by rows instead."""
    carry = None if state.carry is None else sharding.shard_batch(state.carry, mesh)
    return sharding.replicate(state._replace(carry=None), mesh)._replace(carry=carry)


def _fingerprint(model, task, batch_size, optimizer, seed, data_seed, tbptt, loss_fn) -> dict:
    """What must not change between a run and its resumption (schedule segments may be appended)."""
    options = task.options() if hasattr(task, "options") else repr(task)
    return {
        "model": repr(model),
        "task": [getattr(task, "name", type(task).__name__), options],
        "batch_size": batch_size,
        "optimizer": optimizer.to_dict() if isinstance(optimizer, OptimizerConfig) else repr(optimizer),
        "seed": seed,
        "data_seed": data_seed,
        "tbptt": tbptt,
        "loss_fn": None if loss_fn is None else getattr(loss_fn, "__qualname__", repr(loss_fn)),
    }


def _maybe_resume(manager, state: TrainState, resume: bool, fingerprint: dict) -> TrainState:
    if not resume:
        if manager.steps():
            raise FileExistsError(
                f"{manager.directory} already holds checkpoints (steps {manager.steps()}); pass resume=True "
                "(--resume) to continue that run, or choose another directory"
            )
        return state
    restored = manager.restore(target=state, quarantine=True)
    if restored is None:
        return state
    restored_state, meta = restored
    saved = json.loads(json.dumps(meta.get("extra", {}).get("fingerprint", fingerprint)))
    current = json.loads(json.dumps(fingerprint))
    if "data_seed" not in saved:  # written before data seeds existed, when runs trained on the task's own seed
        saved["data_seed"] = saved["task"][1].get("seed") if isinstance(saved["task"][1], dict) else None
    changed = _segment_differences(saved, current, int(meta["step"]))  # first: removes the segments
    changed += _differences(saved, current)
    if changed:
        details = "; ".join(f"{key}: saved {old!r:.100}, now {new!r:.100}" for key, old, new in changed)
        hint = ""
        if any(key == "optimizer.decay_steps" for key, _, _ in changed):
            hint = (
                ". To train a finished run longer, keep its schedule and append a segment: --extend-steps N on "
                "the command line, optimizer.extended(N) in Python (docs/training.md)"
            )
        raise ResumeError(f"cannot resume from {manager.directory}: the run's settings changed ({details}){hint}")
    return restored_state


def _segment_differences(saved: dict, current: dict, step: int) -> list[tuple[str, object, object]]:
    """Removes the schedule segments from both fingerprints' optimisers and reports them if they conflict.

    A resumed run may append segments that start at or after the restored ``step`` (the updates before it
    keep their rates); dropping, changing or inserting earlier segments is a change of settings.
    """
    saved_opt, current_opt = saved.get("optimizer"), current.get("optimizer")
    if not (isinstance(saved_opt, dict) and isinstance(current_opt, dict)):
        return []
    before, now = saved_opt.pop("segments", []), current_opt.pop("segments", [])
    if now[: len(before)] == before and all(segment["start"] >= step for segment in now[len(before) :]):
        return []
    return [(f"optimizer.segments (may only be appended from step {step} on)", before, now)]


def _differences(saved, current, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, saved value, current value)`` for every leaf that differs between two JSON objects."""
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(saved) | set(current)):
            found += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return found
    return [] if saved == current else [(prefix.rstrip("."), saved, current)]


def _nonfinite_message(value: float, step: int, manager) -> str:
    where = "no checkpoint was written"
    if manager is not None:
        latest = manager.latest_step()
        where = (
            f"the last good checkpoint is step {latest} in {manager.directory}"
            if latest is not None
            else f"no checkpoint had been written to {manager.directory} yet"
        )
    return (
        f"non-finite loss or gradient ({value}) at step {step}: training stopped and the update was discarded; "
        f"{where}. Lower the learning rate, enable gradient clipping (clip_norm) or check the inputs."
    )


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


class MetricsLog:
    """Appends records to a JSON-lines file (one object per line, flushed at once).

    Args:
        path: the file; ``None`` makes every method a no-op.
        keep_until: when resuming from step ``k``, records with ``step > k`` (written after the checkpoint
            by the interrupted run) and any torn last line are dropped first, so that the file reads as if
            the run had never been interrupted. ``None`` starts a new file.
    """

    def __init__(self, path, *, keep_until: int | None = None):
        self._file = None
        if path is None:
            return
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = []
        if keep_until is not None and os.path.exists(path):
            with open(path) as file:
                for line in file:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if record.get("step", 0) <= keep_until:
                        kept.append(line if line.endswith("\n") else line + "\n")
        temporary = path + ".tmp"
        with open(temporary, "w") as file:
            file.writelines(kept)
        os.replace(temporary, path)
        self._file = open(path, "a")  # noqa: SIM115  closed by close()

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path) -> list[dict]:
    """The records of a metrics JSON-lines file."""
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]
