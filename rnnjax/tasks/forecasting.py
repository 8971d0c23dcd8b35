"""Time-series forecasting: real series shipped in statsmodels, and the chaotic Mackey–Glass series.

Data (nothing is downloaded):

* ``co2``: weekly atmospheric CO2 at Mauna Loa, 1958–2001 (2,284 weeks; the 59 missing weeks are filled by
  linear interpolation), the file ``statsmodels/datasets/co2/co2.csv`` (statsmodels is BSD-3; the data are
  public, from NOAA / Scripps).
* ``sunspots``: yearly mean sunspot numbers 1700–2008 (309 years), ``statsmodels/datasets/sunspots/sunspots.csv``
  (public data, SIDC).

Both files are read without importing statsmodels, so ``pip install --no-deps statsmodels`` suffices.
* ``mackey_glass``: *generated* by integrating the Mackey–Glass delay differential equation (see
  :func:`mackey_glass`); deterministic, no package needed.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
from typing import ClassVar

import numpy as np

from rnnjax.tasks._common import package_dir
from rnnjax.tasks.base import TRAIN_STREAM, Batch, Task, register, rng_for


@functools.cache
def load_statsmodels_series(name: str) -> np.ndarray:
    """``(N,)`` float64 values of the statsmodels data set ``"co2"`` or ``"sunspots"``.

    The CSV files are read straight from the installed package (statsmodels is not imported, so
    ``pip install --no-deps statsmodels`` is enough). Missing CO2 weeks are filled by linear interpolation.
    """
    column = {"co2": "co2", "sunspots": "SUNACTIVITY"}
    if name not in column:
        raise ValueError(f"unknown statsmodels series {name!r}")
    directory = package_dir("statsmodels", "pip install statsmodels (or pip install --no-deps statsmodels)")
    with open(os.path.join(directory, "datasets", name, f"{name}.csv"), encoding="utf-8") as file:
        values = np.array([float(row[column[name]] or "nan") for row in csv.DictReader(file)])
    missing = np.isnan(values)
    if missing.any():
        index = np.arange(len(values))
        values[missing] = np.interp(index[missing], index[~missing], values[~missing])
    return values


@functools.cache
def mackey_glass(
    length: int = 6000, tau: float = 17.0, beta: float = 0.2, gamma: float = 0.1, n: float = 10.0, dt: float = 0.1
) -> np.ndarray:
    """The Mackey–Glass series (Mackey & Glass 1977), sampled once per time unit.

    ``dx/dt = beta * x(t - tau) / (1 + x(t - tau)^n) - gamma * x(t)``, chaotic for ``tau = 17``. Integrated by
    fourth-order Runge–Kutta with step ``dt`` (the delayed term held at its grid value) from the constant
    history ``x = 1.2``; the first 500 time units (the transient) are dropped.

    Returns:
        ``(length,)`` float64.
    """
    per_unit = int(round(1.0 / dt))
    delay = int(round(tau / dt))
    total = (length + 500) * per_unit
    x = np.full(total + delay + 1, 1.2)

    def f(value, delayed):
        return beta * delayed / (1.0 + delayed**n) - gamma * value

    for i in range(delay, total + delay):
        lagged, lagged_next = x[i - delay], x[i - delay + 1]
        mid = 0.5 * (lagged + lagged_next)
        k1 = f(x[i], lagged)
        k2 = f(x[i] + 0.5 * dt * k1, mid)
        k3 = f(x[i] + 0.5 * dt * k2, mid)
        k4 = f(x[i] + dt * k3, lagged_next)
        x[i + 1] = x[i] + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x[delay + 500 * per_unit :: per_unit][:length].copy()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Forecast(Task):
    """Forecast a series ``horizon`` steps ahead, at every step of a window (base class of the series tasks).

    The series is split chronologically: the first 70% trains, the next 15% validates, the last 15% tests.
    A window of ``T = seq_len`` steps starting at ``o`` gives, at step ``t``, the input
    ``(x[o + t] - x[o]) / scale`` and the target ``(x[o + t + horizon] - x[o]) / scale``: values are taken
    relative to the window's first value (so trends do not push the test region out of the training range)
    and ``scale`` is the standard deviation of the ``horizon``-step change ``x[t + horizon] - x[t]`` over the
    training region. The first ``warmup`` steps of each window are not scored (``mask``): there is too little
    history there.

    The trivial baseline is persistence (the naive forecast, "tomorrow equals today"): predict ``x[o + t]``
    for ``x[o + t + horizon]``. In these units its mean squared error is about 1 on the training region.

    Shapes: ``inputs`` ``(B, T, 1)`` float32; ``targets`` ``(B, T)`` float32; ``mask`` ``(B, T)`` float32;
    ``lengths`` ``None``. Training windows start at random offsets in the training region; an evaluation
    split is up to ``eval_size`` windows at evenly spaced offsets in its region.

    Attributes:
        seq_len: ``T``.
        horizon: steps ahead.
        warmup: leading steps of each window that are not scored.
        seed, eval_size: see :class:`rnnjax.tasks.Task`.
    """

    kind = "per_step_regress"
    metric = "mse"
    higher_is_better = False
    bidirectional_ok = False  # later inputs are the targets
    solved_fraction: ClassVar[float] = 0.5  # solved: mse at most this fraction of persistence's on the split

    seq_len: int = 64
    horizon: int = 1
    warmup: int = 8

    def __post_init__(self):
        if self.seq_len < 2 or self.horizon < 1 or not 0 <= self.warmup < self.seq_len:
            raise ValueError("need seq_len >= 2, horizon >= 1 and 0 <= warmup < seq_len")
        for split in ("train", "valid", "test"):
            if len(self.region(split)) < self.seq_len + self.horizon:
                raise ValueError(f"the {split} region is shorter than seq_len + horizon")

    def series(self) -> np.ndarray:
        """The raw ``(N,)`` series; subclasses implement this."""
        raise NotImplementedError

    @property
    def input_size(self) -> int:
        return 1

    @property
    def output_size(self) -> int:
        return 1

    def region(self, split: str) -> np.ndarray:
        """The chronological ``"train"``, ``"valid"`` or ``"test"`` part of the series."""
        x = self.series()
        a, b = int(0.7 * len(x)), int(0.85 * len(x))
        return {"train": x[:a], "valid": x[a:b], "test": x[b:]}[split]

    @property
    def scale(self) -> float:
        """Standard deviation of the ``horizon``-step change over the training region."""
        train = self.region("train")
        return float(np.std(train[self.horizon :] - train[: -self.horizon]))

    def windows(self, values: np.ndarray, starts: np.ndarray) -> Batch:
        """The windows of ``values`` starting at ``starts`` ``(B,)``, as a batch."""
        T, h = self.seq_len, self.horizon
        rows = values[starts[:, None] + np.arange(T + h)]  # (B, T + h)
        rows = (rows - rows[:, :1]) / self.scale
        mask = np.ones((len(starts), T), np.float32)
        mask[:, : self.warmup] = 0.0
        return Batch(rows[:, :T, None].astype(np.float32), rows[:, h:].astype(np.float32), None, mask)

    def train_batch(self, step: int, batch_size: int) -> Batch:
        train = self.region("train")
        last = len(train) - self.seq_len - self.horizon
        starts = rng_for(self.seed, TRAIN_STREAM, step).integers(0, last + 1, size=batch_size)
        return self.windows(train, starts)

    def make_split(self, split: str) -> Batch:
        self.check_split(split)
        values = self.region(split)
        last = len(values) - self.seq_len - self.horizon
        starts = np.unique(np.linspace(0, last, num=min(self.eval_size, last + 1)).round().astype(np.int64))
        return self.windows(values, starts)

    def solve_threshold(self, split: str = "valid") -> float:
        """Solved at an MSE of at most ``solved_fraction`` times persistence's on ``split``."""
        return self.solved_fraction * self.baseline_score(split)

    def baseline_score(self, split: str) -> float:
        """Mean squared error of persistence (predict the current value) on the scored steps."""
        batch = self.eval_batch(split)
        error = (batch.inputs[..., 0] - batch.targets) ** 2
        return float((error * batch.mask).sum() / batch.mask.sum())


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class CO2(Forecast):
    """Weekly Mauna Loa CO2 (statsmodels), a quarter-year ahead: a trend plus a yearly cycle.

    Example:
        >>> CO2(seq_len=52).eval_batch("test").inputs.shape[1:]
        (52, 1)
    """

    name = "co2"
    solved_fraction = 0.25  # solved: the yearly cycle is learned, not only the trend
    seq_len: int = 104
    horizon: int = 13
    warmup: int = 13

    def series(self) -> np.ndarray:
        return load_statsmodels_series("co2")


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Sunspots(Forecast):
    """Yearly sunspot numbers (statsmodels), one year ahead: an irregular ~11-year cycle, 309 points.

    Example:
        >>> Sunspots().eval_batch("test").inputs.shape[1:]
        (24, 1)
    """

    name = "sunspots"
    seq_len: int = 24
    horizon: int = 1
    warmup: int = 4

    def series(self) -> np.ndarray:
        return load_statsmodels_series("sunspots")


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class MackeyGlass(Forecast):
    """The chaotic Mackey–Glass series (generated, ``tau = 17``), ``horizon`` time units ahead.

    Attributes:
        length: number of samples generated (one per time unit).

    Example:
        >>> MackeyGlass(seq_len=32).train_batch(0, 4).targets.shape
        (4, 32)
    """

    name = "mackey_glass"
    solved_fraction = 0.1  # solved: the (deterministic) dynamics are learned
    seq_len: int = 64
    horizon: int = 10
    warmup: int = 16
    length: int = 4000

    def series(self) -> np.ndarray:
        return mackey_glass(self.length)
