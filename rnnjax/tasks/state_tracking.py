"""State tracking: the running product of a word of group elements, and the running sum modulo ``m``.

Two per-step tasks whose target at every position is the state reached so far:

* ``group_word``: the product ``g_1 g_2 ... g_t`` of a word over a finite group (S5, A5, S3 or Z5). Composing
  permutations of five points (S5, A5) is NC1-complete (Barrington 1989), so no model confined to TC0 —
  transformers, and linear or Mamba-style SSMs of fixed depth (Merrill, Petty & Sabharwal 2024, "The Illusion of
  State in State-Space Models", arXiv 2404.08819) — can track it at every length, while a one-layer nonlinear
  RNN can; S3 and Z5 are solvable groups, the easier controls (Liu et al. 2023, "Transformers Learn Shortcuts to
  Automata", arXiv 2210.10749).
* ``modular_sum``: the running sum of tokens modulo ``m`` (parity with per-step targets is ``m = 2``). Linear RNNs
  whose state transitions have only positive eigenvalues cannot solve parity, and counting modulo 3 needs
  non-triangular transitions (Grazzi et al. 2024, "Unlocking State-Tracking in Linear RNNs Through Negative
  Eigenvalues", arXiv 2411.12537).

Both train on words of ``train_len`` symbols (every prefix scored) and have a ``test_long`` split of
``long_len`` symbols scored only past ``train_len``: the length-generalisation split. The data is generated, not
downloaded: every batch is drawn from a seeded NumPy generator.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from rnnjax.tasks._common import majority_accuracy, step_weights
from rnnjax.tasks.base import SPLIT_IDS, Batch, Task, register, rng_for

TEST_LONG = 3
"""Stream id of the ``test_long`` split."""
SWEEP = 4
"""Stream id of :meth:`RunningStateTask.length_sweep` batches."""

GROUPS = ("S3", "Z5", "A5", "S5")
"""The groups of :class:`GroupWord`, easiest first."""


# Groups as permutations. Convention: a permutation is the tuple ``p`` with ``p[x]`` the image of point ``x``,
# and products compose left to right: ``a · b`` applies ``a`` first, then ``b``, so ``(a · b)[x] = b[a[x]]``.


def permutations(group: str) -> np.ndarray:
    """The elements of ``group`` as permutations, ``(G, n)`` int64; element id = row; id 0 is the identity.

    ``S3``/``S5``: every permutation of 3/5 points in lexicographic order. ``A5``: the even permutations of 5
    points (an even number of inversions), in the same order. ``Z5``: the rotations ``x -> x + k mod 5``,
    ``k = 0 .. 4`` (the cyclic group of order 5).
    """
    if group in ("S3", "S5"):
        return np.array(list(itertools.permutations(range(int(group[1])))), np.int64)
    if group == "A5":
        perms = np.array(list(itertools.permutations(range(5))), np.int64)
        inversions = (perms[:, :, None] > perms[:, None, :]) & np.triu(np.ones((5, 5), bool), k=1)
        return perms[inversions.sum(axis=(1, 2)) % 2 == 0]
    if group == "Z5":
        return (np.arange(5)[None, :] + np.arange(5)[:, None]) % 5
    raise ValueError(f"group must be one of {GROUPS}, got {group!r}")


def multiplication_table(perms: np.ndarray) -> np.ndarray:
    """``(G, G)`` int32 table with ``table[a, b]`` the id of ``a · b`` (``a`` first, then ``b``).

    Args:
        perms: ``(G, n)`` the group's elements (:func:`permutations`); must be closed under composition.

    Raises:
        ValueError: a product is not among ``perms``.
    """
    G, n = perms.shape
    composed = perms[np.arange(G)[None, :, None], perms[:, None, :]]  # (G, G, n): composed[a, b, x] = b[a[x]]
    codes = perms @ (n ** np.arange(n))  # (G,) each permutation as a base-n number
    order = np.argsort(codes)
    found = np.searchsorted(codes[order], composed @ (n ** np.arange(n)))  # (G, G)
    found = np.minimum(found, G - 1)
    table = order[found]
    if not np.array_equal(perms[table], composed):
        raise ValueError("the permutations are not closed under composition")
    return table.astype(np.int32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunningStateTask(Task):
    """Base of the per-step state-tracking tasks: a word of symbols in, the state after each prefix out.

    Subclasses set ``num_symbols`` and ``output_size`` and implement :meth:`running_state`; this class draws
    uniform words and builds the splits.

    Shapes: ``inputs`` ``(B, T)`` int32 symbol ids; ``targets`` ``(B, T)`` int32 states; ``T`` is ``train_len``
    for ``train_batch``, ``"valid"`` and ``"test"`` (every step scored), and ``long_len`` for ``"test_long"``,
    whose ``mask`` scores only steps ``train_len .. long_len - 1`` (states after more symbols than any training
    word had). ``lengths`` is ``None`` except in :meth:`length_sweep`.

    Attributes:
        train_len: symbols per training word.
        long_len: symbols per ``test_long`` word (more than ``train_len``).
        seed, eval_size: see :class:`rnnjax.tasks.Task`.
    """

    kind = "per_step_classify"
    metric = "accuracy"
    higher_is_better = True
    # solved: at least 99% of the states right on the training length (``valid``); ``test_long`` then says whether
    # the solution generalises to longer words
    solved_at = 0.99
    splits = ("valid", "test", "test_long")

    train_len: int = 32
    long_len: int = 128

    def __post_init__(self):
        if not 1 <= self.train_len < self.long_len:
            raise ValueError(f"need 1 <= train_len < long_len, got {self.train_len}, {self.long_len}")

    @property
    def num_symbols(self) -> int:
        """Distinct input symbols."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return self.num_symbols

    def running_state(self, symbols: np.ndarray) -> np.ndarray:
        """``(B, T)`` int symbols -> ``(B, T)`` int32 state after each prefix."""
        raise NotImplementedError

    def words(self, rng: np.random.Generator, batch_size: int, num_steps: int) -> Batch:
        """``batch_size`` uniform words of ``num_steps`` symbols with their running states (every step scored)."""
        symbols = rng.integers(0, self.num_symbols, size=(batch_size, num_steps)).astype(np.int32)  # (B, T)
        return Batch(symbols, self.running_state(symbols))

    def make_batch(self, rng: np.random.Generator, batch_size: int) -> Batch:
        return self.words(rng, batch_size, self.train_len)

    def make_split(self, split: str) -> Batch:
        self.check_split(split)
        if split != "test_long":
            return self.make_batch(rng_for(self.seed, SPLIT_IDS[split]), self.eval_size)
        batch = self.words(rng_for(self.seed, TEST_LONG), self.eval_size, self.long_len)
        mask = np.zeros(batch.targets.shape, np.float32)
        mask[:, self.train_len :] = 1.0
        return batch._replace(mask=mask)

    def length_sweep(self, lengths: Sequence[int], per_length: int) -> Batch:
        """``per_length`` words of each length in ``lengths``, padded to ``max(lengths)``, for accuracy vs length.

        Only each word's last step is scored (``mask``): the accuracy at length ``L`` is that of the state after
        ``L`` symbols.

        Returns:
            A batch of ``len(lengths) * per_length`` rows, length-major (rows ``i * per_length ..`` have length
            ``lengths[i]``), with ``lengths`` and ``mask`` set.
        """
        row_lengths = np.repeat(np.asarray(lengths, np.int32), per_length)  # (R,)
        if row_lengths.min() < 1:
            raise ValueError(f"lengths must be at least 1, got {list(lengths)}")
        T = int(row_lengths.max())
        batch = self.words(rng_for(self.seed, SWEEP), len(row_lengths), T)
        mask = (np.arange(T)[None, :] == row_lengths[:, None] - 1).astype(np.float32)  # (R, T)
        return batch._replace(lengths=row_lengths, mask=mask)

    def baseline_score(self, split: str) -> float:
        """Accuracy of always predicting the most frequent training state (about ``1 / output_size``)."""
        batch = self.eval_batch(split)
        return majority_accuracy(self.train_batch(0, 256).targets, batch.targets, step_weights(batch))


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupWord(RunningStateTask):
    """The word problem of a finite group: the running product of a word of group elements.

    Input ``g_1 .. g_T`` (element ids, uniform over the group), target at step ``t`` the id of
    ``g_1 · g_2 · ... · g_t`` composed left to right (``a · b``: ``a`` first, then ``b``; see
    :func:`multiplication_table`), so ``state_t = table[state_{t-1}, g_t]``. ``|G|`` input symbols and classes;
    chance (and the majority baseline) is about ``1 / |G|``.

    Attributes:
        group: ``"S5"`` (120 elements, non-solvable), ``"A5"`` (60, the smallest non-solvable group), or the
            solvable controls ``"S3"`` (6) and ``"Z5"`` (5, the running sum modulo 5).
        train_len, long_len, seed, eval_size: see :class:`RunningStateTask`.

    Example:
        >>> task = GroupWord(group="A5", train_len=16, long_len=64)
        >>> task.vocab_size, task.output_size, task.eval_batch("test_long").inputs.shape[1]
        (60, 60, 64)
    """

    name = "group_word"

    group: str = "S5"

    def __post_init__(self):
        super().__post_init__()
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {self.group!r}")

    @property
    def table(self) -> np.ndarray:
        """``(G, G)`` the group's multiplication table (:func:`multiplication_table`)."""
        return _table(self.group)

    @property
    def num_symbols(self) -> int:
        return len(self.table)

    @property
    def output_size(self) -> int:
        return len(self.table)

    def running_state(self, symbols: np.ndarray) -> np.ndarray:
        table = self.table
        states = np.empty(symbols.shape, np.int32)  # (B, T)
        states[:, 0] = symbols[:, 0]
        for t in range(1, symbols.shape[1]):
            states[:, t] = table[states[:, t - 1], symbols[:, t]]
        return states


_TABLES: dict[str, np.ndarray] = {}


def _table(group: str) -> np.ndarray:
    if group not in _TABLES:
        _TABLES[group] = multiplication_table(permutations(group))
    return _TABLES[group]


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class ModularSum(RunningStateTask):
    """The running sum of a string of numbers modulo ``modulus``.

    Input ``x_1 .. x_T`` uniform in ``[0, symbols)``, target at step ``t`` ``(x_1 + ... + x_t) mod modulus``.
    ``modulus = 2`` with bits is parity at every prefix; with ``symbols == modulus`` the task is the word
    problem of the cyclic group ``Z_modulus``. Chance (and the majority baseline) is about ``1 / modulus``.

    The default ``modulus = 3`` is the smallest count that is not a power of two: Grazzi et al. (2024) prove
    that a finite-precision linear RNN needs non-triangular state transitions (so no diagonal SSM, whatever
    the sign of its eigenvalues) to count modulo 3, while parity only needs negative eigenvalues. ``Z5`` of
    :class:`GroupWord` covers ``modulus = 5``.

    Attributes:
        modulus: ``m``, at least 2.
        symbols: input numbers are ``0 .. symbols - 1`` (``None``: ``modulus``); a larger alphabet makes
            the model map numbers to residues first.
        train_len, long_len, seed, eval_size: see :class:`RunningStateTask`.

    Example:
        >>> task = ModularSum(modulus=3, train_len=8, long_len=32)
        >>> task.vocab_size, task.output_size
        (3, 3)
    """

    name = "modular_sum"

    modulus: int = 3
    symbols: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.modulus < 2:
            raise ValueError(f"modulus must be at least 2, got {self.modulus}")
        if self.symbols is not None and self.symbols < 2:
            raise ValueError(f"symbols must be at least 2 (or None: the modulus), got {self.symbols}")

    @property
    def num_symbols(self) -> int:
        return self.modulus if self.symbols is None else self.symbols

    @property
    def output_size(self) -> int:
        return self.modulus

    def running_state(self, symbols: np.ndarray) -> np.ndarray:
        return (np.cumsum(symbols, axis=1) % self.modulus).astype(np.int32)
