"""Sequence models for tasks: input embedding or projection -> recurrent core -> head.

A model is a frozen dataclass with pure functions, like a cell::

    model = build_model(task, "lstm", hidden_size=64)
    params = model.init(key)
    outputs = model.apply(params, batch.inputs, lengths=batch.lengths)     # (B, O) or (B, T, O)
    loss, metrics = model.loss_and_metrics(params, batch, task.kind)       # what training and evaluation use

``loss_and_metrics`` is the whole interface :mod:`rnnjax.train` needs (:class:`rnnjax.model_protocol.TaskModel`);
every model family gets it from :class:`rnnjax.model_protocol.ScoredModel`, which scores ``apply``'s outputs with
:func:`rnnjax.metrics.compute_metrics`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import unrolling
from rnnjax.blocks import check_model_inputs, dense, dense_init, maybe_dropout
from rnnjax.cells import CELLS, make_cell, register_cell  # noqa: F401  (the registry, re-exported)
from rnnjax.layers import Bidirectional, Stack
from rnnjax.model_protocol import ScoredModel
from rnnjax.types import Array, Carry, Params, PRNGKey

Head = Literal["last", "per_step"]
HEADS: tuple[str, ...] = typing.get_args(Head)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceModel(ScoredModel):
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
    head: Head = "last"
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

    def step(self, params: Params, carry: Carry, x) -> tuple[Carry, Array]:
        """Consumes one element per row and returns the head's output there (streaming; no dropout).

        From :meth:`initial_carry`, a sequence of steps gives the outputs of :meth:`apply` with
        ``head="per_step"``, up to float rounding; :func:`rnnjax.generate` samples through it.

        Args:
            params: from :meth:`init`.
            carry: the core's state, from :meth:`initial_carry`, :meth:`apply_with_carry` or a previous step.
            x: ``(B,)`` token ids or ``(B, I)`` floats.

        Returns:
            ``(carry, y)`` with ``y`` ``(B, O)``.

        Raises:
            ValueError: the core cannot stream (a bidirectional layer needs whole rows), or ``x`` has the wrong
                shape.
        """
        if not getattr(self.core, "can_stream", hasattr(self.core, "step")):
            raise ValueError(f"the core ({type(self.core).__name__}) needs whole sequences and cannot stream")
        x = jnp.asarray(x)
        if x.ndim != (1 if self.vocab_size is not None else 2):
            layout = "(batch,) token ids" if self.vocab_size is not None else f"(batch, {self.input_size})"
            raise ValueError(f"x must have shape {layout}: one element per row, got shape {x.shape}")
        h = self.embed_inputs(params, x[:, None])[:, 0]  # (B, E)
        carry, y = self.core.step(params["core"], carry, h)  # (B, H)
        return carry, dense(params["head"], y)  # (B, O)

    def apply(self, params: Params, inputs, *, lengths=None, dropout_key: PRNGKey | None = None) -> Array:
        """Runs the model.

        Args:
            params: from :meth:`init`.
            inputs: ``(B, T, I)`` floats or ``(B, T)`` integer token ids.
            lengths: optional ``(B,)`` valid lengths.
            dropout_key: PRNG key for dropout (training); ``None`` disables dropout.

        Returns:
            ``(B, O)`` for the ``"last"`` head, ``(B, T, O)`` for ``"per_step"`` (past a row's length the
            outputs are the head's bias; :func:`rnnjax.metrics.compute_metrics` masks those steps).
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
        self.check_params(params)  # the whole tree, so a wrong core parameter is named params['core'][...]
        keys = jax.random.split(dropout_key, 3) if dropout_key is not None else (None, None, None)
        xs = self.embed_inputs(params, inputs)  # (B, T, E)
        xs = maybe_dropout(keys[0], xs, self.dropout)
        carry, ys = unrolling.unroll(
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
            ys = self.core.last_outputs(ys, lengths)  # (B, H)
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
    head: Head | None = None,
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
