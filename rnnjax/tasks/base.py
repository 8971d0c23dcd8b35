"""The task protocol: what a model is trained on, and how it is scored.

A task is a frozen dataclass of options (sequence length, seed, sizes) with deterministic data::

    task = rnnjax.tasks.get("adding", seq_len=100, seed=0)
    batch = task.train_batch(step, batch_size)   # a pure function of (task options, step)
    batch = task.eval_batch("valid")             # fixed evaluation sets: "valid", "test", ...
    task.baseline_score("test")                  # the trivial predictor's score, for reference

``train_batch`` depending on nothing but the step is what makes training exactly resumable: the data position
of a run is its step counter, saved with every checkpoint.

Batches are host (NumPy) arrays, so a batch can be generated once and then placed on one device or sharded
across many. Shapes (``B`` batch, ``T`` time, ``I`` input features, ``O`` outputs, ``C`` classes):

=====================  ================================  ======================================
``kind``               ``targets``                       model outputs
=====================  ================================  ======================================
``classify``           ``(B,)`` int32 class ids          ``(B, C)`` logits
``regress``            ``(B,)`` or ``(B, O)`` float32    ``(B, O)``
``per_step_classify``  ``(B, T)`` int32                  ``(B, T, C)`` logits
``per_step_regress``   ``(B, T)`` or ``(B, T, O)``       ``(B, T, O)``
=====================  ================================  ======================================
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, NamedTuple

import numpy as np

KINDS = ("classify", "regress", "per_step_classify", "per_step_regress")
"""The task kinds; ``per_step_*`` kinds have one target per time step."""


class Batch(NamedTuple):
    """One batch of sequences (host arrays; any field but ``inputs`` and ``targets`` may be ``None``).

    Attributes:
        inputs: ``(B, T, I)`` float32 features, or ``(B, T)`` int32 token ids.
        targets: see the module docstring for each kind.
        lengths: ``(B,)`` int32 valid lengths, or ``None`` when every row has length ``T``.
        mask: ``(B, T)`` float32 weights of per-step targets (1 = scored), or ``None`` for all valid steps.
            Combined with ``lengths``: a step is scored when it is within the row's length and its weight is
            non-zero.
    """

    inputs: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray | None = None
    mask: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        """``B``."""
        return int(self.inputs.shape[0])


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    """A NumPy generator that is a pure function of ``(seed, *stream)``.

    Tasks draw each training batch from ``rng_for(seed, TRAIN, step)`` and each evaluation split from
    ``rng_for(seed, SPLIT_ID)``, so no two streams overlap and any batch can be regenerated on its own.
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *map(int, stream)])))


TRAIN_STREAM = 0
"""Stream id of training batches in :func:`rng_for`; evaluation splits use ids from 1 (see ``SPLIT_IDS``)."""

SPLIT_IDS = {"valid": 1, "test": 2}
"""Stream ids of the standard evaluation splits; tasks add their own (e.g. ``"test_long": 3``)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """Base class of tasks (see the module docstring).

    Subclasses are ``@dataclasses.dataclass(frozen=True, kw_only=True)`` with hashable, JSON-friendly options
    (numbers, strings, tuples), set the class attributes below, implement :meth:`make_batch` (or override
    :meth:`train_batch` and :meth:`make_split`), and are registered with :func:`rnnjax.tasks.register`.

    Class attributes:
        name: registry name.
        kind: one of :data:`KINDS`.
        metric: the headline metric, a key of :func:`rnnjax.metrics.compute_metrics` for this kind
            (``"mse"``, ``"accuracy"``, ``"bpc"``, ...).
        higher_is_better: direction of ``metric``.
        splits: evaluation splits :meth:`eval_batch` accepts.
        solved_at: the value of ``metric`` at which the task counts as solved (reached or passed in the
            direction of ``higher_is_better``), or ``None`` when it defines none; see :meth:`solve_threshold`.

    Attributes:
        seed: seeds every batch; two tasks with equal options produce identical data.
        eval_size: number of sequences in each evaluation split.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "regress"
    metric: ClassVar[str] = "mse"
    higher_is_better: ClassVar[bool] = False
    splits: ClassVar[tuple[str, ...]] = ("valid", "test")
    solved_at: ClassVar[float | None] = None

    seed: int = 0
    eval_size: int = 1000

    # Sizes. Token tasks set vocab_size and leave input_size None.

    @property
    def input_size(self) -> int | None:
        """``I`` of float inputs, or ``None`` for token inputs."""
        return None

    @property
    def vocab_size(self) -> int | None:
        """Number of input tokens for token inputs, or ``None`` for float inputs."""
        return None

    @property
    def output_size(self) -> int:
        """``O`` (regression) or ``C`` (classes) of the model's output."""
        raise NotImplementedError

    # Data.

    def make_batch(self, rng: np.random.Generator, batch_size: int) -> Batch:
        """Draws ``batch_size`` examples from ``rng``; subclasses implement this (or the two methods below)."""
        raise NotImplementedError

    def train_batch(self, step: int, batch_size: int) -> Batch:
        """The training batch of step ``step``: a pure function of the task's options and ``step``."""
        return self.make_batch(rng_for(self.seed, TRAIN_STREAM, step), batch_size)

    def eval_batch(self, split: str) -> Batch:
        """The fixed evaluation set ``split`` (one of :attr:`splits`), ``eval_size`` rows."""
        return self._eval_batch_cached(split)

    @functools.cache  # noqa: B019  frozen dataclasses are hashable; the cache lives as long as the class
    def _eval_batch_cached(self, split: str) -> Batch:
        return self.make_split(split)

    def make_split(self, split: str) -> Batch:
        """Builds split ``split``; the default draws ``eval_size`` rows from the split's own stream."""
        self.check_split(split)
        return self.make_batch(rng_for(self.seed, SPLIT_IDS.get(split, _split_id(split))), self.eval_size)

    def baseline_score(self, split: str) -> float:
        """Score of the trivial predictor on ``split`` (e.g. predict the mean, or the majority class)."""
        raise NotImplementedError

    def solve_threshold(self, split: str = "valid") -> float | None:
        """The value of ``metric`` on ``split`` at which the task counts as solved (``None``: never defined).

        The default is the class attribute :attr:`solved_at`; tasks whose scale depends on the data (the
        forecasts: a fraction of the persistence baseline) override this.
        """
        self.check_split(split)
        return self.solved_at

    def is_solved(self, value: float, split: str = "valid") -> bool:
        """Whether a score ``value`` of ``metric`` on ``split`` reaches :meth:`solve_threshold` (NaN never does)."""
        threshold = self.solve_threshold(split)
        if threshold is None or not np.isfinite(value):
            return False
        return bool(value >= threshold) if self.higher_is_better else bool(value <= threshold)

    def check_split(self, split: str) -> None:
        """Raises ``ValueError`` unless ``split`` is one of :attr:`splits`."""
        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has splits {self.splits}, got {split!r}")

    def options(self) -> dict:
        """The task's options as a JSON-friendly dict (``get(task.name, **task.options())`` rebuilds it)."""
        return dataclasses.asdict(self)


def _split_id(split: str) -> int:
    """A stable stream id for a split name outside :data:`SPLIT_IDS` (not Python's salted ``hash``)."""
    return 1000 + int.from_bytes(split.encode()[:8].ljust(8, b"\0"), "little") % 1_000_000


# The registry. Task modules register their classes on import; ``get`` and ``names`` import every module of
# this package first, so a new task needs nothing but a file ``rnnjax/tasks/<name>.py``.

_REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator adding a :class:`Task` subclass to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} must set the class attribute `name` to be registered")
    if cls.kind not in KINDS:
        raise ValueError(f"{cls.__qualname__}.kind must be one of {KINDS}, got {cls.kind!r}")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"task name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    import importlib
    import pkgutil

    import rnnjax.tasks as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{package.__name__}.{info.name}")


def names() -> list[str]:
    """Sorted names of all registered tasks."""
    _discover()
    return sorted(_REGISTRY)


def get(name: str, **options) -> Task:
    """Builds the task registered as ``name`` with ``options`` (its dataclass fields, e.g. ``seq_len``)."""
    if name not in _REGISTRY:
        _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(_REGISTRY)}")
    cls = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"task {name!r} has no option(s) {unknown}; its options are {sorted(fields)}")
    return cls(**options)
