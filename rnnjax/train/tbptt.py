"""Truncated backpropagation through time (Williams & Peng 1990; Sutskever 2013, §2.8).

A long sequence is cut into windows of ``k`` steps. Each training step processes one window, starting from
the recurrent state that the previous window ended with, but treats that state as a constant: the gradient
flows back at most ``k`` steps. Memory is O(k) instead of O(T) and the state still carries information
across windows in the forward pass.

Data position: step ``s`` trains on window ``s % n`` of sequence ``s // n``, where ``n = ceil(T / k)``
windows make one sequence (``task.train_batch(s // n, batch_size)``). The carried state is reset to zeros at
the first window of every sequence and lives in :attr:`TrainState.carry`, so checkpoints resume exactly.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rnnjax.metrics import compute_metrics
from rnnjax.tasks.base import Batch
from rnnjax.train.optim import OptimizerConfig
from rnnjax.train.state import TrainState
from rnnjax.train.step import Optimizer, apply_gradients
from rnnjax.types import Array, Carry, Params, PRNGKey

CarryLossFn = Callable[[Params, Any, PRNGKey, Carry], tuple[Array, tuple[Carry, dict[str, Array]]]]
"""``loss_fn(params, batch, key, carry) -> (loss, (final_carry, aux))``.

``batch`` is one window (time axis ``k``), ``carry`` the state at its start (leaves ``(B, ...)``), and
``final_carry`` the state at its end, with the same structure; ``aux`` is a dict of scalar metrics. Any
function of this signature can be given to :func:`rnnjax.train.fit` as ``loss_fn`` together with ``tbptt``.
"""


def takes_carry(loss_fn: Callable) -> bool:
    """Whether ``loss_fn`` can be called as a :data:`CarryLossFn`, with four positional arguments.

    Functions whose signature cannot be read (some builtins and C extensions) are given the benefit of the
    doubt.
    """
    return accepts_positional(loss_fn, 4)


def accepts_positional(function: Callable, count: int) -> bool:
    """Whether ``function`` can be called with ``count`` positional arguments (``True`` if unknowable)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(*[None] * count)
    except TypeError:
        return False
    return True


def num_windows(num_steps: int, window: int) -> int:
    """Windows of ``window`` steps needed to cover ``num_steps`` (the last one may be padded)."""
    return math.ceil(num_steps / window)


def window_of(batch: Batch, index: int, window: int) -> Batch:
    """Window ``index`` (steps ``[index * window, (index + 1) * window)``) of a per-step batch.

    A last window that runs past ``T`` is zero-padded to ``window`` steps, with ``lengths`` marking the real
    ones. ``lengths`` of a window are each row's valid steps inside it, in ``[0, window]``.

    Args:
        batch: inputs ``(B, T, ...)`` and per-step targets ``(B, T, ...)``.
        index: the window, in ``[0, ceil(T / window))``.
        window: ``k``.

    Returns:
        A :class:`~rnnjax.tasks.Batch` with time axis ``k``.
    """
    T = batch.inputs.shape[1]
    start, stop = index * window, min((index + 1) * window, T)
    if not 0 <= start < T:
        raise ValueError(f"window {index} of {window} steps starts outside the sequence of {T} steps")
    pad = window - (stop - start)

    def cut(array):
        if array is None:
            return None
        part = np.asarray(array)[:, start:stop]
        if pad:
            part = np.pad(part, [(0, 0), (0, pad)] + [(0, 0)] * (part.ndim - 2))
        return part

    lengths = batch.lengths
    if lengths is not None:
        lengths = np.clip(np.asarray(lengths) - start, 0, stop - start).astype(np.int32)
    elif pad:
        lengths = np.full((batch.batch_size,), stop - start, np.int32)
    return Batch(cut(batch.inputs), cut(batch.targets), lengths, cut(batch.mask))


def model_carry_loss_fn(model, kind: str) -> CarryLossFn:
    """The :data:`CarryLossFn` of a :class:`~rnnjax.models.SequenceModel` with a per-step head."""
    if not kind.startswith("per_step"):
        raise ValueError(f"truncated BPTT needs a per-step task (one target per step), got kind {kind!r}")

    def loss_fn(params, batch, key, carry):
        carry, outputs = model.apply_with_carry(params, batch.inputs, carry, lengths=batch.lengths, dropout_key=key)
        metrics = compute_metrics(kind, outputs, batch)
        return metrics["loss"], (carry, metrics)

    return loss_fn


def make_tbptt_step(
    loss_fn: CarryLossFn,
    optimizer: OptimizerConfig | optax.GradientTransformation,
    initial_carry: Carry,
    windows_per_sequence: int,
    *,
    jit: bool = True,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Array]]]:
    """Builds ``train_step(state, window_batch) -> (state, metrics)`` for truncated BPTT.

    The step starts from ``stop_gradient(state.carry)``, or from ``initial_carry`` when
    ``state.step % windows_per_sequence == 0`` (a new sequence), and stores the window's final carry in the
    new state. Metrics are those of :func:`rnnjax.train.make_train_step`.

    Args:
        loss_fn: ``loss_fn(params, batch, key, carry) -> (loss, (carry, aux))``.
        optimizer: an :class:`OptimizerConfig` or an Optax transformation.
        initial_carry: the state at the start of each sequence (leaves ``(B, ...)``).
        windows_per_sequence: ``n``, windows per sequence.
        jit: wrap the step in ``jax.jit``.
    """
    optimizer = optimizer if isinstance(optimizer, Optimizer) else Optimizer(optimizer)

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict[str, Array]]:
        rng, key = jax.random.split(state.rng)
        reset = state.step % windows_per_sequence == 0
        carry = jax.tree.map(
            lambda c, z: jnp.where(reset, z.astype(c.dtype), jax.lax.stop_gradient(c)), state.carry, initial_carry
        )
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (carry, aux)), grads = grad_fn(state.params, batch, key, carry)
        metrics = {k: v for k, v in aux.items() if k != "weight"}
        metrics["loss"] = loss
        state, metrics = apply_gradients(state, grads, optimizer, metrics)
        return state._replace(rng=rng, carry=carry), metrics

    return jax.jit(train_step) if jit else train_step
