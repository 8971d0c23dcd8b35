"""Training: a pure jitted ``train_step``, the :func:`fit` loop, truncated BPTT and run configs.

* :class:`TrainState` - params, optimiser state, step (= data position), PRNG key, carried state.
* :class:`OptimizerConfig` - clipping -> Adam / AdamW / SGD with warmup + cosine decay (and the
  :class:`ScheduleSegment` s of a run trained longer).
* :func:`make_train_step` - ``train_step(state, batch) -> (state, metrics)`` from ``loss_fn(params, batch, key)``.
* :func:`fit` - the loop: progress bar, evaluation, JSONL metrics, Orbax checkpoints, exact resume,
  non-finite loss detection, data parallelism.
* :func:`evaluate` - metrics of a model on a task's evaluation split.
* :func:`train_seeds` - several seeds (and learning rates) of one model at once, stopping when the task is
  solved; curves and steps-to-solve back.
* :mod:`rnnjax.train.tbptt` - truncated BPTT.
* :class:`RunConfig` / :func:`run` - a run as one config (what ``python -m rnnjax train`` executes): a
  recurrent network of any registered cell, or the transformer.
* :func:`restore_run` - the newest valid checkpoint of such a run, with its config, task and model rebuilt
  (storage itself is :mod:`rnnjax.checkpoint`, which knows nothing of training).
"""

from rnnjax.train.loop import (
    FitResult,
    MetricsLog,
    NonFiniteLossError,
    ResumeError,
    fit,
    initial_state,
    read_metrics,
)
from rnnjax.train.multiseed import SeedsResult, train_seeds
from rnnjax.train.optim import OPTIMIZERS, OptimizerConfig, ScheduleSegment
from rnnjax.train.run import MODELS, RestoredRun, RunConfig, restore_run, run
from rnnjax.train.state import TrainState, create_train_state, host_state
from rnnjax.train.step import LossFn, apply_gradients, evaluate, evaluate_batch, make_train_step, model_loss_fn
from rnnjax.train.tbptt import CarryLossFn, make_tbptt_step, model_carry_loss_fn, num_windows, window_of

__all__ = [
    "MODELS",
    "OPTIMIZERS",
    "CarryLossFn",
    "FitResult",
    "LossFn",
    "MetricsLog",
    "NonFiniteLossError",
    "OptimizerConfig",
    "RestoredRun",
    "ResumeError",
    "SeedsResult",
    "RunConfig",
    "ScheduleSegment",
    "TrainState",
    "apply_gradients",
    "create_train_state",
    "evaluate",
    "evaluate_batch",
    "fit",
    "host_state",
    "initial_state",
    "make_tbptt_step",
    "make_train_step",
    "model_carry_loss_fn",
    "model_loss_fn",
    "num_windows",
    "read_metrics",
    "restore_run",
    "run",
    "train_seeds",
    "window_of",
]
