"""Building blocks shared by the model families (recurrent, attention, encoder-decoder).

Input validation (:func:`check_model_inputs`), a linear layer (:func:`dense_init`, :func:`dense`) and optional
dropout (:func:`maybe_dropout`), each a pure function on explicit parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import _checks, layers
from rnnjax.types import Array, Params, PRNGKey


def check_model_inputs(inputs, *, vocab_size: int | None = None, input_size: int | None = None, name="inputs"):
    """Validates a model's inputs while tracing and returns them as an array.

    Args:
        inputs: ``(B, T)`` integer token ids when ``vocab_size`` is set, else ``(B, T, I)`` floats.
        vocab_size: ``V`` of a token model, or ``None``.
        input_size: ``I`` of a float model (``None``: any).
        name: the argument's name, for the error message.

    Raises:
        TypeError: token ids that are not integers, or float inputs that are not floating point.
        ValueError: the wrong rank, or the wrong number of features.
    """
    if vocab_size is not None:
        ids = jnp.asarray(inputs)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"{name} must be integer token ids (vocab_size={vocab_size}), got dtype {ids.dtype}")
        if ids.ndim != 2:
            raise ValueError(f"{name} must have shape (batch, time) of token ids, got shape {ids.shape}")
        return _check_token_range(ids, vocab_size, name)
    xs = _checks.as_float_array(inputs, name)
    if xs.ndim != 3:
        raise ValueError(f"{name} must have shape (batch, time, {input_size or 'features'}), got shape {xs.shape}")
    if input_size is not None:
        _checks.check_features(xs, input_size, name)
    return xs


def _check_token_range(ids: Array, vocab_size: int, name: str) -> Array:
    """``ids`` unchanged, or ``ValueError`` if one lies outside ``[0, vocab_size)`` (``jnp.take`` would clamp it)."""

    def report(values):
        values = np.asarray(values)
        if values.size and (values.min() < 0 or values.max() >= vocab_size):
            raise ValueError(
                f"{name} must be token ids in [0, {vocab_size}), got values from {values.min()} to {values.max()}"
            )

    if not isinstance(ids, jax.core.Tracer):
        report(ids)
        return ids
    if ids.size == 0:
        return ids
    return _checks.checked_at_run_time(ids, (jnp.min(ids) < 0) | (jnp.max(ids) >= vocab_size), report)


def dense_init(key: PRNGKey, fan_in: int, fan_out: int) -> Params:
    """``{"w": (fan_in, fan_out) Glorot-uniform, "b": (fan_out,) zeros}``."""
    w = jax.nn.initializers.glorot_uniform()(key, (fan_in, fan_out), jnp.float32)
    return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}


def dense(params: Params, x: Array) -> Array:
    """``x @ w + b`` over the last axis: ``(..., fan_in)`` -> ``(..., fan_out)``."""
    return x @ params["w"].astype(x.dtype) + params["b"].astype(x.dtype)


def maybe_dropout(key: PRNGKey | None, x: Array, rate: float) -> Array:
    """Inverted dropout when ``key`` is given and ``rate > 0``; the identity otherwise."""
    if key is None or rate == 0.0:
        return x
    return layers.dropout(key, x, rate)
