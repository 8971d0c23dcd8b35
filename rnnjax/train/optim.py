"""Optimiser configuration: gradient clipping followed by Adam, AdamW or SGD with warmup and cosine decay."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Everything that defines the optimiser; :meth:`build` turns it into an Optax chain.

    The chain is ``[clip_by_value] -> [clip_by_global_norm] -> optimiser`` with the learning rate of
    :meth:`schedule`: a linear warmup to ``learning_rate`` over ``warmup_steps`` steps, then a cosine decay
    to ``learning_rate * final_lr_fraction`` over ``decay_steps`` steps (constant if ``decay_steps`` is None).

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

    def __post_init__(self):
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
        peak, warmup, decay = float(self.learning_rate), int(self.warmup_steps), self.decay_steps
        end = peak * float(self.final_lr_fraction)

        def schedule(count):
            count = jnp.asarray(count, jnp.float32)
            lr = jnp.full_like(count, peak)
            if decay:
                progress = jnp.clip((count - warmup) / decay, 0.0, 1.0)
                lr = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
            if warmup:
                lr = jnp.where(count < warmup, peak * (count + 1.0) / warmup, lr)
            return lr

        return schedule

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
