"""Sequential digit classification on scikit-learn's 8×8 handwritten digits, one row or one pixel per step.

Data: ``sklearn.datasets.load_digits()`` (1,797 images from the UCI "Optical Recognition of Handwritten
Digits" set, shipped inside scikit-learn; BSD-3). Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from rnnjax.tasks._common import FixedSplitClassification, MissingDataError
from rnnjax.tasks.base import Batch, Task, register

MODES = ("row", "pixel")


@functools.cache
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: ``(1797, 8, 8)`` float32 in ``[0, 1]`` and ``(1797,)`` int32."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:
        raise MissingDataError("the digits task needs scikit-learn: pip install scikit-learn") from error
    data = sklearn_load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int32)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Digits(FixedSplitClassification, Task):
    """Classify an 8×8 digit image read as a sequence: 8 rows of 8 pixels, or 64 single pixels.

    The pixel-by-pixel form is the small cousin of sequential MNIST (Le, Jaitly & Hinton 2015): the label
    depends on pixels up to 64 steps back. The 1,797 images are split once, independently of ``seed``, into
    1,437 train, 180 valid and 180 test images; ``seed`` only orders the training batches (drawn with
    replacement). The trivial baseline predicts the most frequent training class (about 0.1).

    Shapes: ``inputs`` ``(B, 8, 8)`` (``"row"``) or ``(B, 64, 1)`` (``"pixel"``) float32 in ``[0, 1]``;
    ``targets`` ``(B,)`` int32 in ``[0, 10)``; ``lengths`` ``None``. Evaluation splits hold all of their
    images (``eval_size`` caps them).

    Attributes:
        mode: ``"row"`` or ``"pixel"``.
        seed, eval_size: see :class:`rnnjax.tasks.Task`.

    Example:
        >>> task = Digits(mode="pixel")
        >>> task.eval_batch("test").inputs.shape
        (180, 64, 1)
    """

    name = "digits"
    kind = "classify"
    metric = "accuracy"
    higher_is_better = True
    solved_at = 0.95  # solved: at least 95% of the held-out digits right
    bidirectional_ok = True

    mode: str = "row"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def input_size(self) -> int:
        return 8 if self.mode == "row" else 1

    @property
    def output_size(self) -> int:
        return 10

    def _rows(self, indices: np.ndarray) -> Batch:
        images, labels = load_digits()
        inputs = images[indices].reshape(len(indices), -1, self.input_size)  # (B, T, I)
        return Batch(inputs, labels[indices])

    def _labels(self) -> np.ndarray:
        return load_digits()[1]
