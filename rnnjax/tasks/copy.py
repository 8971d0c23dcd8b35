"""The copy memory problem (Hochreiter & Schmidhuber 1997, in the form of Arjovsky, Shah & Bengio 2016).

The data is generated, not downloaded: every batch is drawn from a seeded NumPy generator.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rnnjax.tasks._common import majority_accuracy, step_weights
from rnnjax.tasks.base import Batch, Task, register


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class CopyMemory(Task):
    """Remember a string of symbols over a long delay and replay it on a cue.

    An input row of ``T = num_symbols + delay + num_symbols`` token ids::

        s_1 .. s_S   0 .. 0   D   0 .. 0           s_i uniform in {1 .. alphabet}, 0 blank, D = alphabet + 1
        <-- S -->   delay-1   ^   <-- S -->
                             cue

    and the target at every step: blank (0) everywhere except the last ``S`` steps, which must reproduce
    ``s_1 .. s_S``. Only those last ``S`` steps are scored (``mask``), so the metric is the accuracy of the
    recalled symbols; a model without memory can do no better than the most frequent symbol, an accuracy
    of about ``1 / alphabet``.

    Shapes: ``inputs`` ``(B, T)`` int32 ids in ``[0, alphabet + 2)``; ``targets`` ``(B, T)`` int32 in
    ``[0, alphabet + 1)``; ``mask`` ``(B, T)`` float32, 1 on the last ``S`` steps; ``lengths`` ``None``.

    Attributes:
        delay: steps from the last data symbol to the cue, inclusive of the cue (Arjovsky et al.'s ``T``).
        num_symbols: ``S``, symbols to remember.
        alphabet: number of distinct data symbols.
        seed, eval_size: see :class:`rnnjax.tasks.Task`.

    Example:
        >>> task = CopyMemory(delay=20, num_symbols=5)
        >>> batch = task.train_batch(step=0, batch_size=4)
        >>> batch.inputs.shape, batch.targets.shape
        ((4, 30), (4, 30))
    """

    name = "copy"
    kind = "per_step_classify"
    metric = "accuracy"
    higher_is_better = True
    solved_at = 0.99  # solved: at least 99% of the recalled symbols right
    bidirectional_ok = True  # no target is ever an input, so a backward pass leaks nothing

    delay: int = 50
    num_symbols: int = 10
    alphabet: int = 8

    def __post_init__(self):
        if self.delay < 1 or self.num_symbols < 1 or self.alphabet < 2:
            raise ValueError("delay and num_symbols must be at least 1 and alphabet at least 2")

    @property
    def seq_len(self) -> int:
        """``T = 2 * num_symbols + delay``."""
        return 2 * self.num_symbols + self.delay

    @property
    def vocab_size(self) -> int:
        return self.alphabet + 2

    @property
    def output_size(self) -> int:
        return self.alphabet + 1

    def make_batch(self, rng: np.random.Generator, batch_size: int) -> Batch:
        B, S, T = batch_size, self.num_symbols, self.seq_len
        symbols = rng.integers(1, self.alphabet + 1, size=(B, S))  # (B, S)
        inputs = np.zeros((B, T), np.int32)
        inputs[:, :S] = symbols
        inputs[:, S + self.delay - 1] = self.alphabet + 1  # the cue
        targets = np.zeros((B, T), np.int32)
        targets[:, T - S :] = symbols
        mask = np.zeros((B, T), np.float32)
        mask[:, T - S :] = 1.0
        return Batch(inputs, targets, None, mask)

    def baseline_score(self, split: str) -> float:
        """Accuracy of always recalling the most frequent symbol (about ``1 / alphabet``)."""
        batch = self.eval_batch(split)
        weights = step_weights(batch)
        return majority_accuracy(batch.targets[weights > 0], batch.targets, weights)
