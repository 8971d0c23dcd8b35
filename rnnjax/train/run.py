"""A whole training run described by one JSON-serialisable config (what ``python -m rnnjax train`` runs)."""

from __future__ import annotations

import dataclasses
from typing import Any

from rnnjax import models, tasks
from rnnjax.train import sharding
from rnnjax.train.loop import FitResult, fit, initial_state
from rnnjax.train.optim import OptimizerConfig
from rnnjax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Task, model, optimiser and schedule of a run; saved with its checkpoints.

    Attributes:
        task: registered task name (``rnnjax.tasks.names()``).
        task_options: options of the task (e.g. ``{"seq_len": 100}``); the task's ``seed`` defaults to
            ``seed``.
        cell: cell name (``rnnjax.models.CELLS``).
        hidden_size: hidden units per layer.
        num_layers: stacked layers.
        bidirectional: bidirectional layers.
        dropout: dropout on the core's inputs and outputs.
        layer_dropout: dropout between stacked layers.
        cell_options: extra cell hyperparameters (e.g. ``{"forget_bias": 1.0}``).
        batch_size: global batch size.
        steps: total updates.
        seed: seeds the parameters, dropout and (unless ``task_options`` sets it) the data.
        optimizer: the optimiser and its schedule.
        eval_every: evaluate on the validation split every this many steps (0: only at the end).
        tbptt: truncated-BPTT window (per-step tasks), or ``None``.
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

    def build_task(self) -> tasks.Task:
        """The task, seeded with ``seed`` unless ``task_options`` names its own."""
        return tasks.get(self.task, **{"seed": self.seed, **self.task_options})

    def build_model(self, task: tasks.Task | None = None) -> models.SequenceModel:
        """The model for ``task`` (default: :meth:`build_task`)."""
        return models.build_model(
            task or self.build_task(),
            self.cell,
            self.hidden_size,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            dropout=self.dropout,
            layer_dropout=self.layer_dropout,
            **self.cell_options,
        )

    def initial_state(self) -> TrainState:
        """The state the run starts from (also a restore target with the right structure)."""
        task = self.build_task()
        model = self.build_model(task)
        carry = model.initial_carry(self.batch_size) if self.tbptt else None
        return initial_state(model, self.optimizer, self.seed, carry=carry)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (:meth:`from_dict` inverts it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Rebuilds a config from :meth:`to_dict` output (unknown keys are an error)."""
        data = dict(data)
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
