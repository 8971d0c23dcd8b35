"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient
Language Models", arXiv 2312.04927), in the layout of Zoology's ``multiquery_ar`` generator.

The data is generated, not downloaded: every batch is drawn from a seeded NumPy generator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from rnnjax.tasks._common import majority_accuracy, step_weights
from rnnjax.tasks.base import SPLIT_IDS, Batch, Task, register, rng_for

TEST_LONG = 3
"""Stream id of the ``test_long`` split."""
SWEEP = 4
"""Stream id of :meth:`MQAR.length_sweep` batches."""


def _sample_without_replacement(rng: np.random.Generator, log_p: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(B, k)`` indices into ``log_p`` ``(N,)``, each row ``k`` distinct ones drawn one after another with
    probability proportional to ``exp(log_p)`` among those left (the Gumbel top-k trick; ``numpy``'s
    ``choice(replace=False, p=...)``, row by row, draws from the same distribution)."""
    B, k = shape
    scores = log_p[None, :] + rng.gumbel(size=(B, len(log_p)))  # (B, N)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class MQAR(Task):
    """Recall the value bound to each queried key, several queries per sequence.

    A row of ``T`` token ids: ``D`` key–value pairs, then a query region in which every key appears once more,
    at an even offset, and the rest is filler::

        k_1 v_1 k_2 v_2 .. k_D v_D | f f k_2 f f f k_1 f ..       keys in [1, V/2), values in [V/2, V)
        <------- 2 D -------->    <------ T - 2 D ------->       f: random filler (never a key of the row), or 0

    The target at a query position is the value bound to that key (Zoology's labels, shifted to the query's
    own position); only those ``D`` positions are scored (``mask``). Keys are distinct within a row, values
    too, both uniform from disjoint halves of the vocabulary; the query offsets are drawn without replacement
    with probability proportional to ``power_a * g ** (power_a - 1)`` over the gap ``g = 1, 2, ...`` (Zoology's
    power law: most queries come soon after the pairs). A model without memory can at best guess one value:
    an accuracy of about ``2 / V``.

    Shapes: ``inputs`` ``(B, T)`` int32 in ``[0, V)``; ``targets`` ``(B, T)`` int32 (0 where not scored);
    ``mask`` ``(B, T)`` float32; ``lengths`` ``None`` (except in :meth:`length_sweep`). ``T, D`` are
    ``seq_len, num_pairs`` for ``train_batch``, ``"valid"`` and ``"test"``, and ``long_len, long_pairs`` for
    ``"test_long"`` (more pairs to hold, longer rows: the length-generalisation split).

    Attributes:
        vocab_size: ``V``, input tokens and output classes (Zoology's ``vocab_size``).
        num_pairs: ``D``, key–value pairs per training row (Zoology's ``num_kv_pairs``).
        seq_len: ``T`` of training rows (Zoology's ``input_seq_len``); at least ``4 D``.
        long_pairs: pairs per ``test_long`` row.
        long_len: ``T`` of ``test_long`` rows; at least ``4 * long_pairs``.
        power_a: the power law of the query offsets (Zoology's default 0.01; 1.0 is uniform).
        random_fill: random filler tokens, as Zoology's ``random_non_queries`` (``False``: token 0). Zoology
            draws them from the whole vocabulary, where at its 8,192 tokens a filler rarely repeats a key; at
            small vocabularies that would bind a key to a second value, so a filler that would equal one of
            the row's keys is redrawn from the value half.
        seed, eval_size: see :class:`rnnjax.tasks.Task`.

    Example:
        >>> task = MQAR(vocab_size=64, num_pairs=4, seq_len=32)
        >>> batch = task.train_batch(step=0, batch_size=2)
        >>> batch.inputs.shape, int(batch.mask.sum())
        ((2, 32), 8)
    """

    name = "mqar"
    kind = "per_step_classify"
    metric = "accuracy"
    higher_is_better = True
    solved_at = 0.99  # solved: at least 99% of the queried values recalled
    splits = ("valid", "test", "test_long")

    vocab_size: int = 64
    num_pairs: int = 8
    seq_len: int = 64
    long_pairs: int = 16
    long_len: int = 128
    power_a: float = 0.01
    random_fill: bool = True

    def __post_init__(self):
        if self.num_pairs < 1 or self.long_pairs < self.num_pairs:
            raise ValueError(f"need 1 <= num_pairs <= long_pairs, got {self.num_pairs}, {self.long_pairs}")
        if self.seq_len < 4 * self.num_pairs or self.long_len < 4 * self.long_pairs:
            raise ValueError(
                "rows need room for the pairs and one query per pair at even offsets: seq_len >= 4 * num_pairs and "
                f"long_len >= 4 * long_pairs, got {self.seq_len}, {self.num_pairs}, {self.long_len}, {self.long_pairs}"
            )
        if self.long_len <= self.seq_len:
            raise ValueError(f"long_len must exceed seq_len, got {self.long_len} <= {self.seq_len}")
        if self.vocab_size // 2 - 1 < self.long_pairs:
            raise ValueError(
                f"vocab_size {self.vocab_size} holds {self.vocab_size // 2 - 1} distinct keys, fewer than long_pairs "
                f"({self.long_pairs})"
            )
        if not self.power_a > 0:
            raise ValueError(f"power_a must be positive, got {self.power_a}")

    @property
    def output_size(self) -> int:
        return self.vocab_size

    def rows(self, rng: np.random.Generator, batch_size: int, num_steps: int, num_pairs: int) -> Batch:
        """``batch_size`` rows of ``num_steps`` tokens holding ``num_pairs`` pairs (see the class docstring)."""
        B, T, D, V = batch_size, num_steps, num_pairs, self.vocab_size
        if T < 4 * D:
            raise ValueError(f"{T} steps cannot hold {D} pairs and their queries (need at least {4 * D})")
        half = V // 2
        keys = 1 + _sample_without_replacement(rng, np.zeros(half - 1), (B, D))  # (B, D) in [1, V/2)
        values = half + _sample_without_replacement(rng, np.zeros(V - half), (B, D))  # (B, D) in [V/2, V)
        space = (T - 2 * D) // 2  # even offsets available for queries
        gaps = np.arange(1, space + 1, dtype=np.float64)
        log_p = np.log(self.power_a) + (self.power_a - 1.0) * np.log(gaps)  # unnormalised: only ratios matter
        query_at = 2 * D + 2 * _sample_without_replacement(rng, log_p, (B, D))  # (B, D) positions of the queries

        if self.random_fill:
            inputs = rng.integers(0, V, size=(B, T)).astype(np.int32)
            # A filler equal to one of the row's keys would bind it to a second value: redraw it from the values.
            clash = (inputs[:, :, None] == keys[:, None, :]).any(axis=2)  # (B, T)
            inputs[clash] = rng.integers(half, V, size=int(clash.sum()))
        else:
            inputs = np.zeros((B, T), np.int32)
        inputs[:, 0 : 2 * D : 2] = keys
        inputs[:, 1 : 2 * D : 2] = values
        rows = np.arange(B)[:, None]
        inputs[rows, query_at] = keys
        targets = np.zeros((B, T), np.int32)
        targets[rows, query_at] = values
        mask = np.zeros((B, T), np.float32)
        mask[rows, query_at] = 1.0
        return Batch(inputs, targets, None, mask)

    def make_batch(self, rng: np.random.Generator, batch_size: int) -> Batch:
        return self.rows(rng, batch_size, self.seq_len, self.num_pairs)

    def make_split(self, split: str) -> Batch:
        self.check_split(split)
        if split != "test_long":
            return self.make_batch(rng_for(self.seed, SPLIT_IDS[split]), self.eval_size)
        return self.rows(rng_for(self.seed, TEST_LONG), self.eval_size, self.long_len, self.long_pairs)

    def pairs_at(self, length: int) -> int:
        """Pairs in a row of ``length`` tokens in :meth:`length_sweep`: the training density ``num_pairs /
        seq_len``, at least 1, at most what the row and the key vocabulary hold."""
        wanted = round(self.num_pairs * length / self.seq_len)
        return int(max(1, min(wanted, length // 4, self.vocab_size // 2 - 1)))

    def length_sweep(self, lengths: Sequence[int], per_length: int) -> Batch:
        """``per_length`` rows of each length in ``lengths`` (pairs growing with length, :meth:`pairs_at`),
        padded to ``max(lengths)``, for accuracy against length.

        Returns:
            A batch of ``len(lengths) * per_length`` rows, length-major (rows ``i * per_length ..`` have length
            ``lengths[i]``), with ``lengths`` and ``mask`` (the queries) set.
        """
        if min(lengths) < 4:
            raise ValueError(f"lengths must be at least 4 (one pair and its query), got {list(lengths)}")
        rng, T = rng_for(self.seed, SWEEP), int(max(lengths))
        inputs = np.zeros((len(lengths) * per_length, T), np.int32)
        targets, mask = np.zeros_like(inputs), np.zeros(inputs.shape, np.float32)
        for i, length in enumerate(lengths):
            block = self.rows(rng, per_length, int(length), self.pairs_at(int(length)))
            rows = slice(i * per_length, (i + 1) * per_length)
            inputs[rows, :length], targets[rows, :length], mask[rows, :length] = block.inputs, block.targets, block.mask
        return Batch(inputs, targets, np.repeat(np.asarray(lengths, np.int32), per_length), mask)

    def baseline_score(self, split: str) -> float:
        """Accuracy of always answering the most frequent training value (about ``2 / vocab_size``)."""
        batch = self.eval_batch(split)
        train = self.train_batch(0, 256)
        weights = step_weights(batch)
        return majority_accuracy(train.targets[train.mask > 0], batch.targets, weights)
