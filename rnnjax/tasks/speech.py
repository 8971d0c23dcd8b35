"""Speaker identification from recorded speech features: the Japanese vowels set (optional data set).

Data: ``datasets/data/JapaneseVowels/JapaneseVowels_{TRAIN,TEST}.ts`` inside the ``sktime`` package (BSD-3;
the data are from the UCI repository, Kudo, Toyama & Shimbo 1999). Nine male speakers each said the vowel
pair /ae/; every utterance is 7–29 frames of 12 LPC cepstrum coefficients. The files are parsed here
directly, so sktime is never imported and ``pip install --no-deps sktime`` (8 MB wheel) is enough. Nothing
is downloaded; without sktime the task raises :class:`~rnnjax.tasks._common.MissingDataError` with that
install line.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from rnnjax.tasks._common import majority_accuracy, package_dir, pad_rows
from rnnjax.tasks.base import TRAIN_STREAM, Batch, Task, register, rng_for

MAX_FRAMES = 29
NUM_COEFFICIENTS = 12


def parse_ts(path: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Reads a multivariate ``.ts`` file (the sktime / UEA archive text format).

    Returns:
        ``(series, labels)``: one ``(T_i, C)`` float32 array per case and ``(N,)`` int32 labels from 0.
    """
    series, labels = [], []
    with open(path, encoding="utf-8") as file:
        in_data = False
        for line in file:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                in_data = line.lower() == "@data"
                continue
            *channels, label = line.split(":")
            series.append(np.array([[float(v) for v in c.split(",")] for c in channels], np.float32).T)
            labels.append(int(label) - 1)
    return series, np.array(labels, np.int32)


@functools.cache
def load_japanese_vowels() -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
    """``{"train": (series, labels), "test": (series, labels)}`` from sktime's copy of the data set."""
    directory = os.path.join(
        package_dir("sktime", "pip install --no-deps sktime"), "datasets", "data", "JapaneseVowels"
    )
    return {
        split: parse_ts(os.path.join(directory, f"JapaneseVowels_{split.upper()}.ts")) for split in ("train", "test")
    }


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Speech(Task):
    """Which of nine speakers said this vowel? Variable-length sequences of 12 cepstral coefficients.

    The data set's own split is kept: its 370 test utterances are the ``"test"`` split; of its 270 training
    utterances a fixed 50 (independent of ``seed``) are held out as ``"valid"`` and 220 train. Features are
    standardised with the training utterances' per-coefficient mean and deviation. The trivial baseline
    predicts the most frequent training speaker (0.24 on the test split, whose speakers are unbalanced).

    Shapes: ``inputs`` ``(B, 29, 12)`` float32 (zero past each length); ``targets`` ``(B,)`` int32 in
    ``[0, 9)``; ``lengths`` ``(B,)`` int32 in ``[7, 29]``.

    Attributes:
        seed, eval_size: see :class:`rnnjax.tasks.Task`.

    Example:
        >>> Speech().eval_batch("test").inputs.shape  # doctest: +SKIP
        (370, 29, 12)
    """

    name = "speech"
    kind = "classify"
    metric = "accuracy"
    higher_is_better = True
    # solved: at least 95% of the test utterances attributed to the right speaker (Kudo et al. 1999 report 94.1%)
    solved_at = 0.95
    bidirectional_ok = True

    @property
    def input_size(self) -> int:
        return NUM_COEFFICIENTS

    @property
    def output_size(self) -> int:
        return 9

    def _cases(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
        data = load_japanese_vowels()
        if split == "test":
            return data["test"]
        series, labels = data["train"]
        order = rng_for(0, 7919).permutation(len(labels))
        chosen = order[:50] if split == "valid" else order[50:]
        return [series[i] for i in chosen], labels[chosen]

    @functools.cached_property
    def _standardise(self) -> tuple[np.ndarray, np.ndarray]:
        frames = np.concatenate(self._cases("train")[0])  # (frames, C)
        return frames.mean(axis=0), frames.std(axis=0)

    def _rows(self, series: list[np.ndarray], labels: np.ndarray) -> Batch:
        mean, std = self._standardise
        inputs, lengths = pad_rows([(s - mean) / std for s in series], MAX_FRAMES, np.float32)
        return Batch(inputs, labels, lengths)

    def train_batch(self, step: int, batch_size: int) -> Batch:
        series, labels = self._cases("train")
        rows = rng_for(self.seed, TRAIN_STREAM, step).integers(0, len(labels), size=batch_size)
        return self._rows([series[i] for i in rows], labels[rows])

    def make_split(self, split: str) -> Batch:
        self.check_split(split)
        series, labels = self._cases(split)
        return self._rows(series[: self.eval_size], labels[: self.eval_size])

    def baseline_score(self, split: str) -> float:
        """Accuracy of always predicting the most frequent training speaker."""
        return majority_accuracy(self._cases("train")[1], self.eval_batch(split).targets)
