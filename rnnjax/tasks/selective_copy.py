"""Selective copying (Gu & Dao 2023, the Mamba paper's synthetic task).

The data is generated, not downloaded: every batch is drawn from a seeded NumPy generator.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rnnjax.tasks._common import majority_accuracy, step_weights
from rnnjax.tasks.base import Batch, Task, register


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class SelectiveCopy(Task):
    """Copy the symbols scattered among blanks, in order, ignoring where they were.

    Unlike :class:`~rnnjax.tasks.copy.CopyMemory`, the symbols sit at random positions, so a model cannot
    solve it with a fixed delay line (or a time-invariant convolution): it must decide, from the content, what
    to keep. An input row of ``T = seq_len + num_symbols`` ids::

        0 s_1 0 0 s_2 ... s_S 0   D   0 .. 0        S symbols at random sorted positions in [0, seq_len - 1)
        <------ seq_len - 1 -->   ^   <- S ->       D = alphabet + 1 is the cue, at step seq_len - 1
                                 cue

    The target on the last ``S`` steps is ``s_1 .. s_S`` in order (only those steps are scored, ``mask``); a
    model without memory scores about ``1 / alphabet``.

    Shapes: ``inputs`` ``(B, T)`` int32 ids in ``[0, alphabet + 2)``; ``targets`` ``(B, T)`` int32 in
    ``[0, alphabet + 1)``; ``mask`` ``(B, T)`` float32; ``lengths`` ``None``.

    Attributes:
        seq_len: length of the region holding the symbols, cue included.
        num_symbols: ``S``.
        alphabet: number of distinct data symbols.
        seed, eval_size: see :class:`rnnjax.tasks.Task`.

    Example:
        >>> task = SelectiveCopy(seq_len=32, num_symbols=4)
        >>> task.train_batch(step=0, batch_size=2).inputs.shape
        (2, 36)
    """

    name = "selective_copy"
    kind = "per_step_classify"
    metric = "accuracy"
    higher_is_better = True
    solved_at = 0.99  # solved: at least 99% of the recalled symbols right
    bidirectional_ok = True  # no target is ever an input

    seq_len: int = 64
    num_symbols: int = 8
    alphabet: int = 8

    def __post_init__(self):
        if self.num_symbols < 1 or self.alphabet < 2:
            raise ValueError("num_symbols must be at least 1 and alphabet at least 2")
        if self.seq_len - 1 < self.num_symbols:
            raise ValueError(f"seq_len ({self.seq_len}) must exceed num_symbols ({self.num_symbols})")

    @property
    def total_len(self) -> int:
        """``T = seq_len + num_symbols``."""
        return self.seq_len + self.num_symbols

    @property
    def vocab_size(self) -> int:
        return self.alphabet + 2

    @property
    def output_size(self) -> int:
        return self.alphabet + 1

    def make_batch(self, rng: np.random.Generator, batch_size: int) -> Batch:
        B, S, T = batch_size, self.num_symbols, self.total_len
        symbols = rng.integers(1, self.alphabet + 1, size=(B, S))  # (B, S)
        # S distinct sorted positions per row in [0, seq_len - 1): the first S of a random permutation.
        positions = np.sort(np.argsort(rng.random((B, self.seq_len - 1)), axis=1)[:, :S], axis=1)  # (B, S)
        inputs = np.zeros((B, T), np.int32)
        np.put_along_axis(inputs, positions, symbols, axis=1)
        inputs[:, self.seq_len - 1] = self.alphabet + 1
        targets = np.zeros((B, T), np.int32)
        targets[:, T - S :] = symbols
        mask = np.zeros((B, T), np.float32)
        mask[:, T - S :] = 1.0
        return Batch(inputs, targets, None, mask)

    def baseline_score(self, split: str) -> float:
        """Accuracy of always answering the most frequent symbol (about ``1 / alphabet``)."""
        batch = self.eval_batch(split)
        weights = step_weights(batch)
        return majority_accuracy(batch.targets[weights > 0], batch.targets, weights)
