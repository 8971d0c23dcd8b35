"""Optimiser configuration: gradient clipping followed by Adam, AdamW or SGD with warmup and cosine decay."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclasses.dataclass(frozen=True)
class ScheduleSegment:
    """A later part of the learning-rate schedule, appended to continue a finished run (a warm restart).

    From update ``start`` on, the rate follows a fresh schedule of the same shape as the first one: a linear
    warmup to ``learning_rate`` over ``warmup_steps`` updates, then a cosine down to ``learning_rate *
    final_lr_fraction`` (the :class:`OptimizerConfig`'s fraction) that ends at ``start + steps`` — or the
    constant ``learning_rate`` when the config has no decay (``decay_steps=None``). Updates before ``start``
    keep the rates they had, so a run continued from step ``start`` takes exactly its earlier updates.

    Attributes:
        start: the update count at which the segment begins (the step the run is continued from).
        steps: the segment's length in updates.
        learning_rate: the segment's peak rate.
        warmup_steps: linear warmup at the segment's start (0: the segment starts at its peak rate).
    """

    start: int
    steps: int
    learning_rate: float
    warmup_steps: int = 0

    def __post_init__(self):
        for field, minimum in (("start", 0), ("steps", 1), ("warmup_steps", 0)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"ScheduleSegment.{field} must be an integer >= {minimum}, got {value!r}")
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"ScheduleSegment.warmup_steps must be at most steps ({self.steps}), got {self.warmup_steps}"
            )
        if not (isinstance(self.learning_rate, int | float) and math.isfinite(self.learning_rate)):
            raise ValueError(f"ScheduleSegment.learning_rate must be a finite number, got {self.learning_rate!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"ScheduleSegment.learning_rate must be positive, got {self.learning_rate!r}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Everything that defines the optimiser; :meth:`build` turns it into an Optax chain.

    The chain is ``[clip_by_value] -> [clip_by_global_norm] -> optimiser`` with the learning rate of
    :meth:`schedule`: a linear warmup to ``learning_rate`` over ``warmup_steps`` steps, then a cosine decay
    to ``learning_rate * final_lr_fraction`` over ``decay_steps`` steps (constant if ``decay_steps`` is None),
    followed by the ``segments`` a continued run appended (:meth:`extended`).

    Attributes:
        name: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        learning_rate: peak learning rate, reached at the end of the warmup.
        warmup_steps: length of the linear warmup; step ``s < warmup_steps`` uses ``lr * (s + 1) / warmup``.
        decay_steps: length of the cosine decay after the warmup; ``None`` keeps the peak rate.
        final_lr_fraction: the cosine ends at ``learning_rate * final_lr_fraction``.
        clip_norm: threshold of ``optax.clip_by_global_norm``; ``None`` disables it.
        clip_value: threshold of per-value clipping ``optax.clip`` (applied first); ``None`` disables it.
        weight_decay: decoupled weight decay (``"adamw"`` only; must be 0 otherwise).
        b1, b2, eps: Adam's moment decay rates and epsilon.
        momentum: SGD momentum (0: plain SGD).
        nesterov: Nesterov momentum for SGD.
        segments: later :class:`ScheduleSegment` s, in order of ``start`` (empty for a run never continued);
            lists of dicts, as read back from JSON, are converted.

    Example:
        >>> config = OptimizerConfig("adamw", learning_rate=3e-3, warmup_steps=100, decay_steps=900)
        >>> tx = config.build()
        >>> float(config.schedule()(99))
        0.003
    """

    name: str = "adam"
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    decay_steps: int | None = None
    final_lr_fraction: float = 0.0
    clip_norm: float | None = 1.0
    clip_value: float | None = None
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0
    nesterov: bool = False
    segments: tuple[ScheduleSegment, ...] = ()

    def __post_init__(self):
        segments = tuple(
            segment if isinstance(segment, ScheduleSegment) else ScheduleSegment(**segment) for segment in self.segments
        )
        object.__setattr__(self, "segments", segments)  # JSON gives lists of dicts; hashing needs a tuple
        starts = [segment.start for segment in segments]
        if starts != sorted(set(starts)):
            raise ValueError(f"segments must start at strictly increasing steps, got starts {starts}")
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.weight_decay and self.name != "adamw":
            raise ValueError(f"weight_decay needs name='adamw', got name={self.name!r}")
        if self.warmup_steps < 0 or (self.decay_steps is not None and self.decay_steps < 0):
            raise ValueError("warmup_steps and decay_steps must be non-negative")
        for field in ("clip_norm", "clip_value"):
            value = getattr(self, field)
            if value is not None and not value > 0:
                raise ValueError(f"{field} must be positive or None, got {value}")

    def schedule(self) -> optax.Schedule:
        """The learning rate as a function of the update count (a jittable ``optax.Schedule``)."""
        fraction = float(self.final_lr_fraction)
        first = (float(self.learning_rate), int(self.warmup_steps), self.decay_steps)
        later = [
            (
                segment.start,
                (
                    float(segment.learning_rate),
                    segment.warmup_steps,
                    None if self.decay_steps is None else max(segment.steps - segment.warmup_steps, 1),
                ),
            )
            for segment in self.segments
        ]

        def schedule(count):
            count = jnp.asarray(count, jnp.float32)
            lr = _warmup_cosine(count, *first, fraction)
            for start, shape in later:  # each segment replaces the rate from its start on
                lr = jnp.where(count >= start, _warmup_cosine(count - start, *shape, fraction), lr)
            return lr

        return schedule

    def schedule_end(self) -> int | None:
        """The update count at which the schedule reaches its final rate (``None``: a constant rate)."""
        if self.segments:
            return self.segments[-1].start + self.segments[-1].steps
        if self.decay_steps is None:
            return None
        return self.warmup_steps + self.decay_steps

    def extended(
        self, steps: int, *, learning_rate: float | None = None, warmup_steps: int = 0, start: int | None = None
    ) -> OptimizerConfig:
        """This config with a new :class:`ScheduleSegment` of ``steps`` updates: to train a finished run longer.

        Example (a run of 2,000 steps, continued to 3,000 with a fresh cosine from half the first peak)::

            longer = optimizer.extended(1000, learning_rate=optimizer.learning_rate / 2)
            train.fit(model, task, steps=3000, optimizer=longer, ckpt_dir=..., resume=True)

        Args:
            steps: the segment's length in updates.
            learning_rate: its peak rate (default: this config's ``learning_rate``).
            warmup_steps: its linear warmup (default 0).
            start: the update count it starts at (default :meth:`schedule_end`, where the schedule so far
                reaches its final rate; required when that is ``None``).

        Raises:
            ValueError: ``start`` is needed (a constant rate has no end), or a value is out of range.
        """
        if start is None:
            start = self.schedule_end()
            if start is None:
                raise ValueError("extended: the schedule has a constant rate and no end; pass start=<step>")
        learning_rate = self.learning_rate if learning_rate is None else learning_rate
        segment = ScheduleSegment(start, steps, learning_rate, warmup_steps)
        return dataclasses.replace(self, segments=(*self.segments, segment))

    def clipping(self) -> optax.GradientTransformation:
        """The (stateless) clipping part of the chain; the identity when both thresholds are ``None``."""
        parts = []
        if self.clip_value is not None:
            parts.append(optax.clip(self.clip_value))
        if self.clip_norm is not None:
            parts.append(optax.clip_by_global_norm(self.clip_norm))
        return optax.chain(*parts) if parts else optax.identity()

    def build(self) -> optax.GradientTransformation:
        """``optax.chain(clipping, optimiser)``, usable under strict dtype promotion."""
        lr = self.schedule()
        if self.name == "adam":
            optimizer = optax.adam(lr, b1=self.b1, b2=self.b2, eps=self.eps)
        elif self.name == "adamw":
            optimizer = optax.adamw(lr, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay)
        else:
            optimizer = optax.sgd(lr, momentum=self.momentum or None, nesterov=self.nesterov)
        return with_standard_promotion(optax.chain(self.clipping(), optimizer))

    def to_dict(self) -> dict:
        """JSON-friendly fields (``OptimizerConfig(**config.to_dict())`` rebuilds it)."""
        return dataclasses.asdict(self)


def _warmup_cosine(count, peak: float, warmup: int, decay: int | None, fraction: float):
    """A linear warmup to ``peak`` over ``warmup`` updates, then a cosine to ``peak * fraction`` over ``decay``."""
    end = peak * fraction
    lr = jnp.full_like(count, peak)
    if decay:
        progress = jnp.clip((count - warmup) / decay, 0.0, 1.0)
        lr = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    if warmup:
        lr = jnp.where(count < warmup, peak * (count + 1.0) / warmup, lr)
    return lr


def with_standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` with ``init`` and ``update`` traced under standard dtype promotion.

    Optax combines Python floats with int32 step counts, which ``jax_numpy_dtype_promotion="strict"`` rejects;
    rnnjax's own code is strict-clean, and this keeps the optimiser usable in a strict program.
    """

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(init, update)
