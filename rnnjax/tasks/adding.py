"""The adding problem (Hochreiter & Schmidhuber 1997, in the form of Le, Jaitly & Hinton 2015).

The data is generated, not downloaded: every batch is drawn from a seeded NumPy generator.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rnnjax.tasks.base import Batch, Task, register


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Adding(Task):
    """Sum the two marked numbers of a long sequence.

    Each step has two input channels: a value drawn uniformly from ``[0, 1)`` and a marker that is 1 at exactly
    two steps, one in the first half of the (valid part of the) sequence and one in the second half, and 0
    elsewhere. The target is the sum of the two marked values, a number in ``[0, 2)``. Predicting the mean,
    1.0, whatever the input gives a mean squared error of ``Var(U1 + U2) = 1/6 ≈ 0.167``; a model has learned
    the task when it does much better, which needs memory over about ``seq_len / 2`` steps.

    Shapes: ``inputs`` ``(B, T, 2)`` float32 (channel 0 values, channel 1 markers); ``targets`` ``(B,)``
    float32; ``lengths`` ``(B,)`` int32 when ``min_len`` is set (inputs past a row's length are zero), else
    ``None``.

    Attributes:
        seq_len: ``T``.
        min_len: if set, each row's length is drawn uniformly from ``[min_len, seq_len]``.
        seed, eval_size: see :class:`rnnjax.tasks.Task`.

    Example:
        >>> task = Adding(seq_len=20, seed=0)
        >>> batch = task.train_batch(step=0, batch_size=4)
        >>> batch.inputs.shape, batch.targets.shape
        ((4, 20, 2), (4,))
    """

    name = "adding"
    kind = "regress"
    metric = "mse"
    higher_is_better = False
    # solved: MSE at most 0.01 (6% of the trivial predictor's 1/6): both marked values are read and added
    solved_at = 0.01

    seq_len: int = 50
    min_len: int | None = None

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.min_len is not None and not 2 <= self.min_len <= self.seq_len:
            raise ValueError(f"min_len must lie in [2, seq_len={self.seq_len}], got {self.min_len}")

    @property
    def input_size(self) -> int:
        return 2

    @property
    def output_size(self) -> int:
        return 1

    def make_batch(self, rng: np.random.Generator, batch_size: int) -> Batch:
        B, T = batch_size, self.seq_len
        if self.min_len is None:
            lengths = np.full((B,), T, np.int64)
        else:
            lengths = rng.integers(self.min_len, T + 1, size=B)  # (B,)
        values = rng.random((B, T), dtype=np.float32)  # (B, T)
        half = lengths // 2  # (B,)
        first = np.floor(rng.random(B) * half).astype(np.int64)  # (B,) in [0, half)
        second = half + np.floor(rng.random(B) * (lengths - half)).astype(np.int64)  # (B,) in [half, length)
        rows = np.arange(B)
        markers = np.zeros((B, T), np.float32)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        valid = np.arange(T)[None, :] < lengths[:, None]  # (B, T)
        inputs = np.stack([values * valid, markers], axis=-1).astype(np.float32)  # (B, T, 2)
        targets = (values[rows, first] + values[rows, second]).astype(np.float32)  # (B,)
        return Batch(inputs, targets, None if self.min_len is None else lengths.astype(np.int32))

    def baseline_score(self, split: str) -> float:
        """MSE of always predicting 1.0 (about 1/6)."""
        targets = self.eval_batch(split).targets
        return float(np.mean((targets - 1.0) ** 2))
