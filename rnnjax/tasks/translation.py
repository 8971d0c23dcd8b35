"""Sequence-to-sequence translation of dates written by people into ISO 8601 (a generated corpus).

No parallel corpus of useful size ships inside a Python package, so the pairs are *generated*: a uniformly
random date between 1900-01-01 and 2099-12-31 is rendered in one of nine human formats (the source) and in
ISO ``YYYY-MM-DD`` (the target). The mapping is a real, if small, translation problem: the model has to read
month names and abbreviations, ordinal suffixes and several field orders, and ignore weekday names.
"""

from __future__ import annotations

import dataclasses
import datetime

import numpy as np

from rnnjax.tasks._common import pad_rows
from rnnjax.tasks.base import Batch, Task, register, rng_for

PAD, BOS, EOS = 0, 1, 2
"""Reserved ids of the shared character vocabulary (BOS starts decoding, EOS ends every target)."""
CHARACTERS = " ,-./0123456789abcdefghijklmnopqrstuvwxyz"
VOCAB = ("<pad>", "<bos>", "<eos>") + tuple(CHARACTERS)
LOOKUP = {c: i for i, c in enumerate(VOCAB)}
MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december")  # fmt: skip
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
FIRST, SPAN = datetime.date(1900, 1, 1).toordinal(), 200 * 365 + 49  # 1900-01-01 .. 2099-12-31
TARGET_LEN = 11
"""``YYYY-MM-DD`` and EOS."""


def ordinal(day: int) -> str:
    """``1 -> "1st"``, ``2 -> "2nd"``, ``11 -> "11th"``, ``23 -> "23rd"``."""
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def render(date: datetime.date, style: int) -> str:
    """A date in one of the nine human formats (``style`` in ``[0, 9)``)."""
    d, m, y = date.day, date.month, date.year
    month, weekday = MONTHS[m - 1], WEEKDAYS[date.weekday()]
    return [
        f"{d} {month} {y}",  # 15 march 2024
        f"{month} {d}, {y}",  # march 15, 2024
        f"{d} {month[:3]} {y}",  # 15 mar 2024
        f"{month[:3]} {d} {y}",  # mar 15 2024
        f"{weekday}, {d} {month} {y}",  # friday, 15 march 2024
        f"{weekday[:3]}, {month[:3]} {d}, {y}",  # fri, mar 15, 2024
        f"{d:02d}.{m:02d}.{y}",  # 15.03.2024
        f"{d:02d}/{m:02d}/{y}",  # 15/03/2024 (day first)
        f"the {ordinal(d)} of {month}, {y}",  # the 15th of march, 2024
    ][style]


def encode(text: str) -> np.ndarray:
    """Characters to ids, ``(len(text),)`` int32."""
    return np.array([LOOKUP[c] for c in text], np.int32)


def decode(ids) -> str:
    """Ids back to text, stopping at the first EOS (PAD and BOS are dropped)."""
    out = []
    for i in np.asarray(ids).ravel():
        if i == EOS:
            break
        if i > EOS:
            out.append(VOCAB[i])
    return "".join(out)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class DateTranslation(Task):
    """Translate a date written by a person into ISO 8601, character by character (an encoder–decoder task).

    Source: one of nine formats chosen uniformly (``"15 march 2024"``, ``"fri, mar 15, 2024"``,
    ``"15/03/2024"``, ``"the 15th of march, 2024"``, ...); target: ``"2024-03-15"`` and EOS. Both sides share one
    character vocabulary (:data:`VOCAB`). Training uses teacher forcing (the decoder reads ``BOS`` and the
    target shifted right); evaluation decodes greedily, and the headline metric ``exact_match`` is the fraction
    of dates translated exactly (see :mod:`rnnjax.seq2seq`); ``token_accuracy``, the fraction of target
    characters right in place, is reported beside it. The trivial baseline outputs the most common
    target of a training sample for every input, which is almost never right (about 0.0).

    This task is of kind ``per_step_classify`` for the training loop (one target id per target step, scored by
    cross-entropy under teacher forcing); models for it are encoder–decoders (:attr:`seq2seq` is true).

    Shapes: ``inputs`` ``(B, max_source_len)`` int32 source ids (``PAD`` past each length); ``targets``
    ``(B, 11)`` int32; ``lengths`` ``(B,)`` int32 *source* lengths; ``mask`` ``None`` (all target steps
    count).

    Attributes:
        max_source_len: padded source length (the longest rendering has 28 characters).
        seed, eval_size: see :class:`rnnjax.tasks.Task`.

    Example:
        >>> task = DateTranslation()
        >>> batch = task.train_batch(0, 2)
        >>> batch.inputs.shape, batch.targets.shape
        ((2, 30), (2, 11))
    """

    name = "translation"
    kind = "per_step_classify"
    metric = "exact_match"
    higher_is_better = True
    solved_at = 0.95  # solved: at least 95% of the dates translated exactly
    seq2seq = True
    secondary_metrics = ("token_accuracy",)  # greedy-decoded characters right, in place (also reported)
    bos_id, eos_id, pad_id = BOS, EOS, PAD

    max_source_len: int = 30

    def __post_init__(self):
        if self.max_source_len < 28:
            raise ValueError(f"max_source_len must be at least 28 (the longest rendering), got {self.max_source_len}")

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    @property
    def output_size(self) -> int:
        return len(VOCAB)

    @property
    def target_len(self) -> int:
        """``T_out = 11``."""
        return TARGET_LEN

    def make_batch(self, rng: np.random.Generator, batch_size: int) -> Batch:
        days = rng.integers(0, SPAN, size=batch_size)
        styles = rng.integers(0, 9, size=batch_size)
        dates = [datetime.date.fromordinal(FIRST + int(d)) for d in days]
        sources, lengths = pad_rows([encode(render(d, int(s))) for d, s in zip(dates, styles)], self.max_source_len)
        targets = np.stack([np.append(encode(d.isoformat()), EOS) for d in dates]).astype(np.int32)
        return Batch(sources, targets, lengths)

    def baseline_score(self, split: str) -> float:
        """Exact-match rate of always answering the most common target of 1,000 training examples."""
        sample = self.make_batch(rng_for(self.seed, 5), 1000).targets
        values, counts = np.unique(sample, axis=0, return_counts=True)
        constant = values[np.argmax(counts)]
        return float(np.mean(np.all(self.eval_batch(split).targets == constant, axis=1)))
