"""Parity of a bit string, with a length-generalisation split: train on short strings, test on longer ones.

The data is generated, not downloaded: every batch is drawn from a seeded NumPy generator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from rnnjax.tasks._common import majority_accuracy
from rnnjax.tasks.base import SPLIT_IDS, Batch, Task, register, rng_for

TEST_LONG = 3
"""Stream id of the ``test_long`` split."""
SWEEP = 4
"""Stream id of :meth:`Parity.length_sweep` batches."""


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Parity(Task):
    """Is the number of ones in a bit string odd? One label per string, strings of varying length.

    A one-bit flip-flop solves it at any length, so a recurrent model that has found that solution
    generalises from the training lengths ``[min_len, train_len]`` to the ``test_long`` lengths
    ``(train_len, long_len]``; a model that has memorised patterns of the training lengths does not (a
    classic weakness of transformers, Hahn 2020; Delétang et al. 2023). Chance, and the majority-class
    baseline, is 0.5.

    Shapes: ``inputs`` ``(B, T, 1)`` float32 bits (zero past each row's length); ``targets`` ``(B,)`` int32 in
    ``{0, 1}``; ``lengths`` ``(B,)`` int32. ``T`` is ``train_len`` for ``train_batch``, ``"valid"`` and
    ``"test"``, and ``long_len`` for ``"test_long"``.

    Attributes:
        train_len: longest training string.
        min_len: shortest string.
        long_len: longest ``test_long`` string (its lengths are uniform in ``(train_len, long_len]``).
        seed, eval_size: see :class:`rnnjax.tasks.Task`.

    Example:
        >>> task = Parity(train_len=10, long_len=40)
        >>> task.eval_batch("test_long").inputs.shape[1]
        40
    """

    name = "parity"
    kind = "classify"
    metric = "accuracy"
    higher_is_better = True
    # solved: at least 99% right on the training lengths (``valid``); ``test_long`` then says whether it generalises
    solved_at = 0.99
    splits = ("valid", "test", "test_long")

    train_len: int = 20
    min_len: int = 1
    long_len: int = 60

    def __post_init__(self):
        if not 1 <= self.min_len <= self.train_len < self.long_len:
            raise ValueError(
                f"need 1 <= min_len <= train_len < long_len, got {self.min_len}, {self.train_len}, {self.long_len}"
            )

    @property
    def input_size(self) -> int:
        return 1

    @property
    def output_size(self) -> int:
        return 2

    def batch_of_lengths(self, rng: np.random.Generator, lengths: np.ndarray, num_steps: int) -> Batch:
        """Random strings with the given ``lengths`` ``(B,)``, padded to ``num_steps``."""
        lengths = np.asarray(lengths, np.int32)
        bits = rng.integers(0, 2, size=(len(lengths), num_steps))  # (B, T)
        bits = bits * (np.arange(num_steps)[None, :] < lengths[:, None])
        targets = (bits.sum(axis=1) % 2).astype(np.int32)  # (B,)
        return Batch(bits[..., None].astype(np.float32), targets, lengths)

    def make_batch(self, rng: np.random.Generator, batch_size: int) -> Batch:
        lengths = rng.integers(self.min_len, self.train_len + 1, size=batch_size)
        return self.batch_of_lengths(rng, lengths, self.train_len)

    def make_split(self, split: str) -> Batch:
        self.check_split(split)
        if split != "test_long":
            return self.make_batch(rng_for(self.seed, SPLIT_IDS[split]), self.eval_size)
        rng = rng_for(self.seed, TEST_LONG)
        lengths = rng.integers(self.train_len + 1, self.long_len + 1, size=self.eval_size)
        return self.batch_of_lengths(rng, lengths, self.long_len)

    def length_sweep(self, lengths: Sequence[int], per_length: int) -> Batch:
        """``per_length`` strings of each length in ``lengths``, padded to ``max(lengths)`` (for accuracy vs length).

        Returns:
            A batch of ``len(lengths) * per_length`` rows, length-major (rows ``i * per_length ..`` have
            length ``lengths[i]``).
        """
        row_lengths = np.repeat(np.asarray(lengths, np.int32), per_length)
        return self.batch_of_lengths(rng_for(self.seed, SWEEP), row_lengths, int(max(lengths)))

    def baseline_score(self, split: str) -> float:
        """Accuracy of always predicting the majority class of the training distribution (about 0.5)."""
        targets = self.eval_batch(split).targets
        return majority_accuracy(self.train_batch(0, 1000).targets, targets)
