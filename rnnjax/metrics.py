"""Losses and metrics per task kind: what every model family is trained and evaluated on.

:func:`compute_metrics` scores one batch of a model's outputs against its targets; :func:`aggregate_metrics`
combines the host-side results of many batches into one set::

    metrics = compute_metrics("per_step_classify", outputs, batch)     # scalars, including "weight"
    merged = aggregate_metrics([jax.device_get(m) for m in per_batch])  # weighted by "weight"
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from rnnjax import unrolling
from rnnjax.tasks.base import KINDS, Batch
from rnnjax.types import Array

_DERIVED = {
    "bpc": lambda m: m["loss"] / math.log(2.0),
    "perplexity": lambda m: math.exp(min(m["loss"], 700.0)),
}
"""Metrics computed from aggregated ones after averaging over an evaluation set (they are not linear)."""


def step_weights(batch: Batch, num_steps: int) -> Array:
    """``(B, T)`` float32 weights of per-step targets: within each row's length, times ``batch.mask``."""
    B = batch.targets.shape[0]
    weights = jnp.ones((B, num_steps), jnp.float32)
    if batch.lengths is not None:
        weights = unrolling.time_mask(jnp.asarray(batch.lengths), num_steps).T.astype(jnp.float32)  # (B, T)
    if batch.mask is not None:
        weights = weights * jnp.asarray(batch.mask, jnp.float32)
    return weights


def compute_metrics(kind: str, outputs: Array, batch: Batch) -> dict[str, Array]:
    """Loss and metrics of one batch, each a scalar mean (over rows, or valid steps for per-step kinds).

    ========================  =========================================================
    kind                      metrics
    ========================  =========================================================
    ``classify``              ``loss`` (cross-entropy), ``accuracy``
    ``regress``               ``loss`` (= ``mse``), ``mse``, ``mae``
    ``per_step_classify``     ``loss`` (cross-entropy per step), ``accuracy``, ``bpc``, ``perplexity``
    ``per_step_regress``      ``loss`` (= ``mse``), ``mse``, ``mae``
    ========================  =========================================================

    Also ``weight``: the number of rows or valid steps the means are over (to average across batches).

    Args:
        kind: one of :data:`rnnjax.tasks.KINDS`.
        outputs: the model's outputs, ``(B, O)`` or ``(B, T, O)``.
        batch: targets and lengths (see :class:`rnnjax.tasks.Batch`).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    outputs = outputs.astype(jnp.float32)
    targets = jnp.asarray(batch.targets)
    per_step = kind.startswith("per_step")
    if per_step:
        weights = step_weights(batch, outputs.shape[1])  # (B, T)
    else:
        weights = jnp.ones(outputs.shape[:1], jnp.float32)  # (B,)
    total = jnp.sum(weights)
    denominator = jnp.maximum(total, 1.0)

    def mean(values):  # values: weights' shape
        return jnp.sum(values * weights) / denominator

    if kind.endswith("classify"):
        nll = optax.softmax_cross_entropy_with_integer_labels(outputs, targets)  # (B,) or (B, T)
        correct = (jnp.argmax(outputs, axis=-1) == targets).astype(jnp.float32)
        metrics = {"loss": mean(nll), "accuracy": mean(correct)}
        if per_step:
            metrics["bpc"] = metrics["loss"] / jnp.float32(math.log(2.0))
            metrics["perplexity"] = jnp.exp(metrics["loss"])
    else:
        predictions = outputs[..., 0] if targets.ndim == outputs.ndim - 1 else outputs
        error = predictions - targets.astype(jnp.float32)  # (B,) / (B, T), or with a trailing O
        squared, absolute = error**2, jnp.abs(error)
        if error.ndim > weights.ndim:
            squared, absolute = jnp.mean(squared, axis=-1), jnp.mean(absolute, axis=-1)
        metrics = {"loss": mean(squared), "mse": mean(squared), "mae": mean(absolute)}
    metrics["weight"] = total
    return metrics


def aggregate_metrics(chunks: list[dict[str, float]]) -> dict[str, float]:
    """Combines per-batch :func:`compute_metrics` results (host floats) into one set, weighted by ``weight``."""
    total = sum(chunk["weight"] for chunk in chunks)
    keys = [k for k in chunks[0] if k != "weight" and k not in _DERIVED]
    merged = {k: sum(c[k] * c["weight"] for c in chunks) / max(total, 1.0) for k in keys}
    for name, derive in _DERIVED.items():
        if name in chunks[0]:
            merged[name] = derive(merged)
    merged["weight"] = total
    return merged
