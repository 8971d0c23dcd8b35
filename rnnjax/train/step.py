"""The pure training step, and evaluation.

``train_step(state, batch) -> (state, metrics)`` is built once from a pure loss function and an optimiser::

    def loss_fn(params, batch, key):          # key: a PRNG key for dropout
        ...
        return loss, {"accuracy": ...}        # (scalar, dict of scalars)

    train_step = make_train_step(loss_fn, OptimizerConfig("adam", learning_rate=1e-3))
    state, metrics = train_step(state, batch)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rnnjax.metrics import aggregate_metrics
from rnnjax.tasks.base import Batch
from rnnjax.train.optim import OptimizerConfig
from rnnjax.train.state import TrainState
from rnnjax.types import Array, Params, PRNGKey

LossFn = Callable[[Params, Any, PRNGKey], tuple[Array, dict[str, Array]]]
"""``loss_fn(params, batch, key) -> (loss, aux)``: a scalar loss and a dict of scalar metrics."""


class Optimizer:
    """An Optax transformation with what the step reports about it: the clipping and the learning rate."""

    def __init__(self, optimizer: OptimizerConfig | optax.GradientTransformation):
        if isinstance(optimizer, OptimizerConfig):
            self.tx = optimizer.build()
            self.clipping = optimizer.clipping()
            self.schedule = optimizer.schedule()
        else:
            self.tx, self.clipping, self.schedule = optimizer, None, None


def apply_gradients(
    state: TrainState, grads: Params, optimizer: Optimizer, metrics: dict[str, Array]
) -> tuple[TrainState, dict[str, Array]]:
    """One Optax update of ``state.params``; adds ``grad_norm``, ``grad_norm_clipped`` and ``lr`` to metrics.

    ``grad_norm`` is the global norm of the raw gradient, ``grad_norm_clipped`` that of the gradient after the
    clipping transformations (equal when nothing was clipped), and ``lr`` the learning rate of this update.
    The step counter advances; ``rng`` and ``carry`` are the caller's to update.
    """
    metrics = dict(metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if optimizer.clipping is not None:
        clipped, _ = optimizer.clipping.update(grads, optimizer.clipping.init(state.params), state.params)
        metrics["grad_norm_clipped"] = optax.tree.norm(clipped)
    if optimizer.schedule is not None:
        metrics["lr"] = jnp.asarray(optimizer.schedule(state.step), jnp.float32)
    with jax.numpy_dtype_promotion("standard"):  # Optax mixes Python floats and int32 counts
        updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    return state._replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(
    loss_fn: LossFn, optimizer: OptimizerConfig | optax.GradientTransformation, *, jit: bool = True
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Array]]]:
    """Builds ``train_step(state, batch) -> (state, metrics)``, pure and (by default) jitted.

    Each step splits ``state.rng`` into the next state's key and the key given to ``loss_fn``, differentiates
    ``loss_fn`` with respect to ``state.params`` and applies the optimiser (:func:`apply_gradients`).

    Args:
        loss_fn: ``loss_fn(params, batch, key) -> (loss, aux)`` (see :data:`LossFn`).
        optimizer: an :class:`OptimizerConfig` (metrics then include the clipped norm and the learning rate)
            or any Optax transformation.
        jit: wrap the step in ``jax.jit``.

    Returns:
        The step function. ``metrics`` holds ``loss``, the entries of ``aux`` (except ``weight``),
        ``grad_norm`` and, for an :class:`OptimizerConfig`, ``grad_norm_clipped`` and ``lr``.
    """
    optimizer = optimizer if isinstance(optimizer, Optimizer) else Optimizer(optimizer)

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict[str, Array]]:
        rng, key = jax.random.split(state.rng)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        metrics = {k: v for k, v in aux.items() if k != "weight"}
        metrics["loss"] = loss
        state, metrics = apply_gradients(state, grads, optimizer, metrics)
        return state._replace(rng=rng), metrics

    return jax.jit(train_step) if jit else train_step


def model_loss_fn(model, kind: str) -> LossFn:
    """The :data:`LossFn` of a model for a task kind: ``model.loss_and_metrics`` with dropout from ``key``."""

    def loss_fn(params, batch, key):
        return model.loss_and_metrics(params, batch, kind, dropout_key=key)

    return loss_fn


@functools.cache
def _jitted_metrics(model, kind: str):
    return jax.jit(lambda params, batch: model.loss_and_metrics(params, batch, kind)[1])


def evaluate(model, params: Params, task, split: str = "valid", *, batch_size: int | None = 1000) -> dict[str, float]:
    """Loss and metrics of ``model`` on the evaluation split ``split`` of ``task`` (no dropout).

    Args:
        model: anything with ``loss_and_metrics(params, batch, kind)`` (e.g. :class:`rnnjax.models.SequenceModel`).
        params: the model's parameters.
        task: a :class:`rnnjax.tasks.Task`.
        split: one of ``task.splits``.
        batch_size: rows per forward pass (the last chunk may be smaller); ``None``: the whole split at once.

    Returns:
        Host floats, averaged over the split's rows (or valid steps for per-step tasks), and ``weight``.
    """
    return evaluate_batch(model, params, task.eval_batch(split), task.kind, batch_size=batch_size)


def evaluate_batch(model, params: Params, batch: Batch, kind: str, *, batch_size: int | None = 1000):
    """:func:`evaluate` on an explicit :class:`~rnnjax.tasks.Batch`."""
    n = batch.batch_size
    size = n if batch_size is None else min(batch_size, n)
    metrics_fn = _jitted_metrics(model, kind)
    chunks = []
    for start in range(0, n, size):
        chunk = jax.tree.map(lambda a, start=start: a[start : start + size], batch)
        chunks.append({k: float(v) for k, v in jax.device_get(metrics_fn(params, chunk)).items()})
    return aggregate_metrics(chunks)
