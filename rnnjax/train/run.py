"""A whole training run described by one JSON-serialisable config (what ``python -m rnnjax train`` runs).

* :class:`RunConfig` - task, model (a recurrent network of any registered cell, or the transformer),
  optimiser and schedule.
* :func:`run` - trains as a config says, saving the config with every checkpoint.
* :func:`restore_run` - the newest valid checkpoint of such a run, with its config, task and model rebuilt.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

from rnnjax import checkpoint, models, tasks
from rnnjax.attention import Transformer
from rnnjax.cells import cell_factory
from rnnjax.train import sharding
from rnnjax.train.loop import FitResult, fit, initial_state
from rnnjax.train.optim import OptimizerConfig
from rnnjax.train.state import TrainState

MODELS = ("rnn", "transformer")
"""Model families of :attr:`RunConfig.model`."""

RNN_ONLY = {"bidirectional": False, "layer_dropout": 0.0, "cell_options": {}, "tbptt": None}
"""Fields that apply to ``model="rnn"`` only, with the values a transformer run must leave them at."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Task, model, optimiser and schedule of a run; saved with its checkpoints.

    Two model families (``model``):

    * ``"rnn"``: :func:`rnnjax.models.build_model` with ``num_layers`` layers of the registered cell ``cell``
      (:func:`rnnjax.cell_names`), ``hidden_size`` units each.
    * ``"transformer"``: :class:`rnnjax.attention.Transformer` with ``d_model = hidden_size``, ``num_heads``
      heads and ``num_layers`` blocks, a per-step or last-step head from the task's kind, and ``dropout``.
      ``cell`` is ignored; ``bidirectional``, ``layer_dropout``, ``cell_options`` and ``tbptt`` must keep
      their defaults.

    Attributes:
        task: registered task name (``rnnjax.tasks.names()``).
        task_options: options of the task (e.g. ``{"seq_len": 100}``); its ``seed`` (default the task's, 0)
            seeds the evaluation splits and is the base of the data seed.
        cell: registered cell name or alias (:func:`rnnjax.cell_names`); recurrent models only.
        hidden_size: hidden units per layer (the transformer's ``d_model``).
        num_layers: stacked layers (the transformer's blocks).
        bidirectional: bidirectional layers.
        dropout: dropout on the core's inputs and outputs (the transformer's dropout).
        layer_dropout: dropout between stacked layers.
        cell_options: extra cell hyperparameters (e.g. ``{"forget_bias": 1.0}``).
        batch_size: global batch size.
        steps: total updates (with the optimiser's schedule segments, if the run was continued).
        seed: seeds the parameters, dropout and (unless ``data_seed`` is given) the order of the training data,
            as :func:`rnnjax.train.fit` does: data seed ``task seed + 1000 * seed``.
        optimizer: the optimiser and its schedule.
        eval_every: evaluate on the validation split every this many steps (0: only at the end).
        tbptt: truncated-BPTT window (per-step tasks, recurrent models), or ``None``.
        model: the model family, one of :data:`MODELS` (``"rnn"`` or ``"transformer"``).
        num_heads: attention heads of the transformer (``hidden_size`` must be a multiple of
            ``2 * num_heads``); ignored by recurrent models.
        data_seed: seed of the training batches (``None``: derived from ``seed``, see above).

    Raises:
        ValueError: a field has an invalid value (the message names the field).
    """

    task: str = "adding"
    task_options: dict = dataclasses.field(default_factory=dict)
    cell: str = "lstm"
    hidden_size: int = 64
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    layer_dropout: float = 0.0
    cell_options: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 32
    steps: int = 1000
    seed: int = 0
    optimizer: OptimizerConfig = OptimizerConfig()
    eval_every: int = 0
    tbptt: int | None = None
    model: str = "rnn"
    num_heads: int = 4
    data_seed: int | None = None

    def __post_init__(self):
        _check_choice("model", self.model, MODELS)
        try:
            cell_factory(self.cell)
        except ValueError as error:
            raise ValueError(f"RunConfig.cell: {error}") from None
        _check_int("hidden_size", self.hidden_size, 1)
        _check_int("num_layers", self.num_layers, 1)
        _check_int("num_heads", self.num_heads, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("steps", self.steps, 0)
        _check_int("eval_every", self.eval_every, 0)
        if self.tbptt is not None:
            _check_int("tbptt", self.tbptt, 1)
        if self.data_seed is not None:
            _check_int("data_seed", self.data_seed, 0)
        for name in ("dropout", "layer_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"RunConfig.{name} must lie in [0, 1), got {getattr(self, name)!r}")
        if self.model == "transformer":
            self._check_transformer()

    def _check_transformer(self) -> None:
        for name, default in RNN_ONLY.items():
            if getattr(self, name) != default:
                raise ValueError(
                    f"RunConfig.{name} applies to model='rnn' only; a transformer run must leave it at {default!r}, "
                    f"got {getattr(self, name)!r}"
                    + (" (the transformer carries no state between windows)" if name == "tbptt" else "")
                )
        if self.hidden_size % (2 * self.num_heads):
            raise ValueError(
                f"RunConfig.hidden_size is the transformer's d_model and must be a multiple of 2 * num_heads "
                f"= {2 * self.num_heads}, got {self.hidden_size}"
            )

    def build_task(self) -> tasks.Task:
        """The task with ``task_options`` (its evaluation splits; training reseeds it, see ``seed``)."""
        return tasks.get(self.task, **self.task_options)

    def build_model(self, task: tasks.Task | None = None) -> models.SequenceModel | Transformer:
        """The model for ``task`` (default: :meth:`build_task`): a recurrent network or the transformer."""
        task = task or self.build_task()
        if self.model == "transformer":
            return self._build_transformer(task)
        return models.build_model(
            task,
            self.cell,
            self.hidden_size,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            dropout=self.dropout,
            layer_dropout=self.layer_dropout,
            **self.cell_options,
        )

    def _build_transformer(self, task: tasks.Task) -> Transformer:
        vocab_size = getattr(task, "vocab_size", None)
        return Transformer(
            output_size=task.output_size,
            input_size=None if vocab_size is not None else task.input_size,
            vocab_size=vocab_size,
            d_model=self.hidden_size,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            head="per_step" if task.kind.startswith("per_step") else "last",
            dropout=self.dropout,
        )

    def initial_state(self, model=None) -> TrainState:
        """The state the run starts from (also a restore target with the right structure).

        Args:
            model: the run's model, if already built (default: :meth:`build_model`).
        """
        model = model if model is not None else self.build_model()
        carry = model.initial_carry(self.batch_size) if self.tbptt else None
        return initial_state(model, self.optimizer, self.seed, carry=carry)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (:meth:`from_dict` inverts it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Rebuilds a config from :meth:`to_dict` output (unknown keys are an error).

        Configs saved before a field existed get its default (``model="rnn"`` for older checkpoints).
        """
        data = dict(data)
        unknown = sorted(set(data) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"RunConfig: unknown fields {unknown}")
        if isinstance(data.get("optimizer"), dict):
            data["optimizer"] = OptimizerConfig(**data["optimizer"])
        return cls(**data)


def run(
    config: RunConfig,
    *,
    ckpt_dir=None,
    save_every: int = 0,
    keep: int = 3,
    resume: bool = False,
    metrics_path=None,
    progress: bool | None = None,
    log_every: int = 10,
    data_parallel: bool = False,
    on_nonfinite: str = "raise",
) -> FitResult:
    """Trains as ``config`` says (see :func:`rnnjax.train.fit` for the other arguments).

    Args:
        config: the run.
        data_parallel: shard each batch over all devices (:func:`rnnjax.train.sharding.make_mesh`).
    """
    task = config.build_task()
    model = config.build_model(task)
    return fit(
        model,
        task,
        steps=config.steps,
        batch_size=config.batch_size,
        optimizer=config.optimizer,
        seed=config.seed,
        data_seed=config.data_seed,
        tbptt=config.tbptt,
        eval_every=config.eval_every or config.steps,
        log_every=log_every,
        metrics_path=metrics_path,
        progress=progress,
        ckpt_dir=ckpt_dir,
        save_every=save_every,
        keep=keep,
        resume=resume,
        config={"run": config.to_dict()},
        mesh=sharding.make_mesh() if data_parallel else None,
        on_nonfinite=on_nonfinite,
    )


class RestoredRun(NamedTuple):
    """What :func:`restore_run` returns.

    Attributes:
        state: the restored :class:`TrainState` (bitwise the saved one).
        config: the run's :class:`RunConfig`.
        task: ``config.build_task()``.
        model: ``config.build_model(task)``, the model ``state.params`` belong to.
        meta: the checkpoint's metadata (``step``, ``config``, ``extra``, ...).
    """

    state: TrainState
    config: RunConfig
    task: tasks.Task
    model: Any
    meta: dict


def restore_run(directory: str | os.PathLike, *, step: int | None = None) -> RestoredRun:
    """The newest valid checkpoint of a run started by :func:`run` or ``python -m rnnjax train``.

    The config saved with the checkpoints rebuilds the task, the model and the exact structure of the state;
    corrupt checkpoints are skipped with a :class:`rnnjax.checkpoint.CheckpointWarning`.

    Example:
        >>> restored = restore_run("runs/adding-gru")
        >>> evaluate(restored.model, restored.state.params, restored.task, "test")

    Args:
        directory: the run's checkpoint directory.
        step: restore exactly this step.

    Returns:
        A :class:`RestoredRun`.

    Raises:
        FileNotFoundError: ``directory`` does not exist or holds no valid checkpoint.
        ValueError: the checkpoints hold no run config (written by :func:`rnnjax.train.fit` or
            :class:`rnnjax.checkpoint.CheckpointManager` directly: restore those with
            ``rnnjax.checkpoint.restore(directory, target=initial_state(model, optimizer, seed))``).
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    with checkpoint.CheckpointManager(directory, async_save=False) as manager:
        meta = manager.latest_meta(step)
        if meta is None:
            raise FileNotFoundError(f"no valid checkpoint in {directory}")
        config = _saved_run_config(meta, directory)
        task = config.build_task()
        model = config.build_model(task)
        restored = manager.restore(config.initial_state(model), step=step)
    if restored is None:
        raise FileNotFoundError(f"no valid checkpoint in {directory}")
    state, meta = restored
    return RestoredRun(state, config, task, model, meta)


def _saved_run_config(meta: dict, directory) -> RunConfig:
    run_config = meta.get("config", {}).get("run")
    if run_config is None:
        raise ValueError(
            f"the checkpoints in {directory} hold no run config (they were not written by rnnjax.train.run or "
            "python -m rnnjax train); restore them with rnnjax.checkpoint.restore(directory, target=...)"
        )
    if "data_seed" not in run_config:
        # Saved before data seeds existed, when ``seed`` also seeded the task (its data and evaluation splits)
        # unless task_options named a seed: rebuild exactly that run.
        options = {"seed": run_config.get("seed", 0), **run_config.get("task_options", {})}
        run_config = {**run_config, "task_options": options, "data_seed": options["seed"]}
    return RunConfig.from_dict(run_config)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"RunConfig.{name} must be one of {choices}, got {value!r}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"RunConfig.{name} must be an integer >= {minimum}, got {value!r}")
