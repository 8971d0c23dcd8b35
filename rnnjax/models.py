"""Sequence models for tasks: input embedding or projection -> recurrent core -> head, with losses and metrics.

A model is a frozen dataclass with pure functions, like a cell::

    model = build_model(task, "lstm", hidden_size=64)
    params = model.init(key)
    outputs = model.apply(params, batch.inputs, lengths=batch.lengths)     # (B, O) or (B, T, O)
    loss, metrics = model.loss_and_metrics(params, batch, task.kind)       # what training and evaluation use

``loss_and_metrics`` is the whole interface :mod:`rnnjax.train` needs, so other model families (attention,
encoder-decoder) only have to provide ``init``, ``apply`` and ``loss_and_metrics`` to be trained by the same
loop; :func:`compute_metrics` gives them the standard losses and metrics of each task kind.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rnnjax import _checks, layers, unrolling
from rnnjax.cells import CELLS, make_cell, register_cell  # noqa: F401  (the registry, re-exported)
from rnnjax.layers import Bidirectional, Stack
from rnnjax.tasks.base import KINDS, Batch
from rnnjax.types import Array, Carry, Params, PRNGKey

HEADS = ("last", "per_step")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceModel:
    """Token embedding or input projection, a recurrent core, and a linear head.

    .. code-block:: text

        inputs (B, T) ids ──embed──┐
        inputs (B, T, I) ──[proj]──┴─> (B, T, E) ─core─> (B, T, H) ─head─> (B, O) or (B, T, O)

    Parameters::

        embed:      (V, E)                      token embedding (vocab_size set)
        input_proj: {"w": (I, E), "b": (E,)}    input projection (input_size and embed_size set)
        core:       the core's parameters
        head:       {"w": (H, O), "b": (O,)}    linear read-out (H = core.output_size)

    Attributes:
        core: a cell, :class:`rnnjax.Bidirectional` or :class:`rnnjax.Stack` (batch-major).
        output_size: ``O`` (classes for classification).
        input_size: ``I`` of float inputs (``None`` for token inputs).
        vocab_size: ``V`` of token inputs (``None`` for float inputs).
        embed_size: ``E``; required with ``vocab_size``; with ``input_size`` it adds a linear projection
            (``None``: the core reads the inputs directly).
        head: ``"last"`` reads each row's output at its last valid step (for a top-level bidirectional layer
            with ``merge="concat"``, the forward half at the last valid step and the backward half at step 0,
            where each has seen the whole row); ``"per_step"`` reads every step.
        dropout: dropout rate on the core's inputs and outputs (between-layer dropout is the Stack's own),
            applied only when a ``dropout_key`` is given.
        unroll, remat: passed to :func:`rnnjax.unroll`.

    Example:
        >>> model = SequenceModel(core=rnnjax.GRU(hidden_size=16), input_size=2, output_size=1)
        >>> params = model.init(jax.random.key(0))
        >>> model.apply(params, jnp.ones((4, 10, 2))).shape
        (4, 1)
    """

    core: Any
    output_size: int
    input_size: int | None = None
    vocab_size: int | None = None
    embed_size: int | None = None
    head: str = "last"
    dropout: float = 0.0
    unroll: int = 1
    remat: bool = False

    def __post_init__(self):
        if (self.input_size is None) == (self.vocab_size is None):
            raise ValueError("set exactly one of input_size (float inputs) and vocab_size (token inputs)")
        if self.vocab_size is not None and self.embed_size is None:
            raise ValueError("token inputs (vocab_size) need an embed_size")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if getattr(self.core, "time_major", False):
            raise ValueError("SequenceModel runs its core batch-major; build the core with time_major=False")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    @property
    def core_input_size(self) -> int:
        """Features the core reads: ``embed_size`` when set, else ``input_size``."""
        return self.embed_size if self.embed_size is not None else self.input_size

    def init(self, key: PRNGKey) -> Params:
        """Creates the parameters (see the class docstring for their names and shapes)."""
        k_in, k_core, k_head = jax.random.split(key, 3)
        params = {}
        if self.vocab_size is not None:
            params["embed"] = jax.random.normal(k_in, (self.vocab_size, self.embed_size), jnp.float32)
        elif self.embed_size is not None:
            params["input_proj"] = dense_init(k_in, self.input_size, self.embed_size)
        params["core"] = self.core.init(k_core, self.core_input_size)
        params["head"] = dense_init(k_head, self.core.output_size, self.output_size)
        return params

    def initial_carry(self, batch_size: int) -> Carry:
        """The core's zero state for ``batch_size`` rows (float32)."""
        return self.core.initial_carry((batch_size,), jnp.float32)

    def apply(self, params: Params, inputs, *, lengths=None, dropout_key: PRNGKey | None = None) -> Array:
        """Runs the model.

        Args:
            params: from :meth:`init`.
            inputs: ``(B, T, I)`` floats or ``(B, T)`` integer token ids.
            lengths: optional ``(B,)`` valid lengths.
            dropout_key: PRNG key for dropout (training); ``None`` disables dropout.

        Returns:
            ``(B, O)`` for the ``"last"`` head, ``(B, T, O)`` for ``"per_step"`` (past a row's length the
            outputs are the head's bias; :func:`compute_metrics` masks those steps).
        """
        _, outputs = self.apply_with_carry(params, inputs, None, lengths=lengths, dropout_key=dropout_key)
        return outputs

    def apply_with_carry(
        self, params: Params, inputs, carry: Carry | None, *, lengths=None, dropout_key: PRNGKey | None = None
    ) -> tuple[Carry, Array]:
        """:meth:`apply` from a given core state, also returning the final one (truncated BPTT, streaming).

        Args:
            params, inputs, lengths, dropout_key: as for :meth:`apply`.
            carry: the core's state before the first step (``None``: zeros).

        Returns:
            ``(final_carry, outputs)``.
        """
        keys = jax.random.split(dropout_key, 3) if dropout_key is not None else (None, None, None)
        xs = self.embed_inputs(params, inputs)  # (B, T, E)
        xs = maybe_dropout(keys[0], xs, self.dropout)
        carry, ys = run_core(
            self.core,
            params["core"],
            xs,
            carry,
            lengths=lengths,
            dropout_key=keys[1],
            unroll=self.unroll,
            remat=self.remat,
        )  # ys: (B, T, H)
        if self.head == "last":
            ys = last_valid(self.core, ys, lengths)  # (B, H)
        ys = maybe_dropout(keys[2], ys, self.dropout)
        return carry, dense(params["head"], ys)  # (B, O) or (B, T, O)

    def embed_inputs(self, params: Params, inputs) -> Array:
        """Token ids ``(B, T)`` -> ``(B, T, E)``; floats ``(B, T, I)`` -> ``(B, T, E)`` or unchanged."""
        if self.vocab_size is not None:
            ids = check_model_inputs(inputs, vocab_size=self.vocab_size)
            return jnp.take(params["embed"], ids, axis=0)  # (B, T, E)
        xs = check_model_inputs(inputs, input_size=self.input_size)
        if "input_proj" in params:
            xs = dense(params["input_proj"], xs)  # (B, T, E)
        return xs

    def loss_and_metrics(
        self, params: Params, batch: Batch, kind: str, *, dropout_key: PRNGKey | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """The training loss and the metrics of ``kind`` (:func:`compute_metrics`) on ``batch``."""
        outputs = self.apply(params, batch.inputs, lengths=batch.lengths, dropout_key=dropout_key)
        metrics = compute_metrics(kind, outputs, batch)
        return metrics["loss"], metrics


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


# Building blocks.


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


@functools.cache
def _accepts_dropout_key(core) -> bool:
    return "dropout_key" in inspect.signature(core.apply).parameters


def run_core(core, params: Params, xs: Array, carry: Carry | None, *, lengths=None, dropout_key=None, **options):
    """Runs a cell (with :func:`rnnjax.unroll`) or a layer (its ``apply``) over batch-major ``xs`` ``(B, T, I)``.

    Returns:
        ``(final_carry, ys)`` with ``ys`` ``(B, T, O)``.
    """
    if hasattr(core, "apply"):
        if _accepts_dropout_key(core):
            options["dropout_key"] = dropout_key
        return core.apply(params, xs, carry, lengths=lengths, **options)
    return unrolling.unroll(core, params, xs, carry, lengths=lengths, **options)


def last_valid(core, ys: Array, lengths) -> Array:
    """Each row's output at its last valid step: ``(B, T, O)`` -> ``(B, O)``.

    For a top-level bidirectional layer merged by ``"concat"`` the backward half is read at step 0 instead,
    where the backward direction has seen the whole row.
    """
    T = ys.shape[1]
    index = jnp.full(ys.shape[:1], T - 1) if lengths is None else jnp.maximum(jnp.asarray(lengths) - 1, 0)  # (B,)
    last = jnp.take_along_axis(ys, index.astype(jnp.int32)[:, None, None], axis=1)[:, 0]  # (B, O)
    top = core.layers[-1] if isinstance(core, Stack) else core
    if isinstance(top, Bidirectional) and top.merge == "concat":
        split = top.forward.output_size
        last = jnp.concatenate([last[:, :split], ys[:, 0, split:]], axis=-1)  # (B, O)
    return last


# Losses and metrics per task kind.

_DERIVED = {
    "bpc": lambda m: m["loss"] / math.log(2.0),
    "perplexity": lambda m: math.exp(min(m["loss"], 700.0)),
}
"""Metrics computed from aggregated ones after averaging over an evaluation set (they are not linear)."""


def step_weights(batch: Batch, num_steps: int) -> Array:
    """``(B, T)`` float32 weights of per-step targets: within each row's length, times ``batch.mask``."""
    B = batch.targets.shape[0]
    weights = jnp.ones((B, num_steps), jnp.float32)
    if batch.lengths is not None:
        weights = unrolling.time_mask(jnp.asarray(batch.lengths), num_steps).T.astype(jnp.float32)  # (B, T)
    if batch.mask is not None:
        weights = weights * jnp.asarray(batch.mask, jnp.float32)
    return weights


def compute_metrics(kind: str, outputs: Array, batch: Batch) -> dict[str, Array]:
    """Loss and metrics of one batch, each a scalar mean (over rows, or valid steps for per-step kinds).

    ========================  =========================================================
    kind                      metrics
    ========================  =========================================================
    ``classify``              ``loss`` (cross-entropy), ``accuracy``
    ``regress``               ``loss`` (= ``mse``), ``mse``, ``mae``
    ``per_step_classify``     ``loss`` (cross-entropy per step), ``accuracy``, ``bpc``, ``perplexity``
    ``per_step_regress``      ``loss`` (= ``mse``), ``mse``, ``mae``
    ========================  =========================================================

    Also ``weight``: the number of rows or valid steps the means are over (to average across batches).

    Args:
        kind: one of :data:`rnnjax.tasks.KINDS`.
        outputs: the model's outputs, ``(B, O)`` or ``(B, T, O)``.
        batch: targets and lengths (see :class:`rnnjax.tasks.Batch`).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    outputs = outputs.astype(jnp.float32)
    targets = jnp.asarray(batch.targets)
    per_step = kind.startswith("per_step")
    if per_step:
        weights = step_weights(batch, outputs.shape[1])  # (B, T)
    else:
        weights = jnp.ones(outputs.shape[:1], jnp.float32)  # (B,)
    total = jnp.sum(weights)
    denominator = jnp.maximum(total, 1.0)

    def mean(values):  # values: weights' shape
        return jnp.sum(values * weights) / denominator

    if kind.endswith("classify"):
        nll = optax.softmax_cross_entropy_with_integer_labels(outputs, targets)  # (B,) or (B, T)
        correct = (jnp.argmax(outputs, axis=-1) == targets).astype(jnp.float32)
        metrics = {"loss": mean(nll), "accuracy": mean(correct)}
        if per_step:
            metrics["bpc"] = metrics["loss"] / jnp.float32(math.log(2.0))
            metrics["perplexity"] = jnp.exp(metrics["loss"])
    else:
        predictions = outputs[..., 0] if targets.ndim == outputs.ndim - 1 else outputs
        error = predictions - targets.astype(jnp.float32)  # (B,) / (B, T), or with a trailing O
        squared, absolute = error**2, jnp.abs(error)
        if error.ndim > weights.ndim:
            squared, absolute = jnp.mean(squared, axis=-1), jnp.mean(absolute, axis=-1)
        metrics = {"loss": mean(squared), "mse": mean(squared), "mae": mean(absolute)}
    metrics["weight"] = total
    return metrics


def aggregate_metrics(chunks: list[dict[str, float]]) -> dict[str, float]:
    """Combines per-batch :func:`compute_metrics` results (host floats) into one set, weighted by ``weight``."""
    total = sum(chunk["weight"] for chunk in chunks)
    keys = [k for k in chunks[0] if k != "weight" and k not in _DERIVED]
    merged = {k: sum(c[k] * c["weight"] for c in chunks) / max(total, 1.0) for k in keys}
    for name, derive in _DERIVED.items():
        if name in chunks[0]:
            merged[name] = derive(merged)
    merged["weight"] = total
    return merged


# Building models for tasks.


def build_model(
    task,
    cell: str = "lstm",
    hidden_size: int = 64,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    layer_dropout: float = 0.0,
    residual: bool = False,
    dropout: float = 0.0,
    embed_size: int | None = None,
    head: str | None = None,
    unroll: int = 1,
    remat: bool = False,
    **cell_options,
) -> SequenceModel:
    """A :class:`SequenceModel` sized for ``task`` with a core of ``num_layers`` cells named ``cell``.

    Args:
        task: a :class:`rnnjax.tasks.Task` (its ``kind``, ``input_size``/``vocab_size`` and ``output_size``).
        cell: a registered cell name (:func:`rnnjax.cell_names`).
        hidden_size: ``H`` of every layer.
        num_layers: depth; more than one builds a :class:`rnnjax.Stack`.
        bidirectional: wrap each layer in :class:`rnnjax.Bidirectional` (concatenated outputs).
        layer_dropout: dropout between stacked layers.
        residual: residual connections between stacked layers of equal size.
        dropout: dropout on the core's inputs and outputs (see :class:`SequenceModel`).
        embed_size: embedding size for token inputs (default ``hidden_size``), or an input projection size.
        head: ``"last"`` or ``"per_step"``; default from the task's kind.
        unroll, remat: passed to :func:`rnnjax.unroll`.
        **cell_options: passed to the cell (e.g. ``forget_bias=1.0``).

    Example:
        >>> task = rnnjax.tasks.get("adding", seq_len=20)
        >>> model = build_model(task, "gru", hidden_size=32)
        >>> param_count(model.init(jax.random.key(0)))
        3489
    """

    def one_layer():
        made = make_cell(cell, hidden_size, **cell_options)
        return Bidirectional(made) if bidirectional else made

    core = (
        one_layer()
        if num_layers == 1
        else Stack([one_layer() for _ in range(num_layers)], dropout=layer_dropout, residual=residual)
    )
    vocab_size = getattr(task, "vocab_size", None)
    if vocab_size is not None and embed_size is None:
        embed_size = hidden_size
    if head is None:
        head = "per_step" if task.kind.startswith("per_step") else "last"
    return SequenceModel(
        core=core,
        output_size=task.output_size,
        input_size=None if vocab_size is not None else task.input_size,
        vocab_size=vocab_size,
        embed_size=embed_size,
        head=head,
        dropout=dropout,
        unroll=unroll,
        remat=remat,
    )


def param_count(params: Params) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))
