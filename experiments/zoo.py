"""The models compared by ``compare.py``: built by lower-case name for any task, at a matched parameter count.

Names: ``simple`` (Elman), ``jordan``, ``lstm``, ``gru``, ``bilstm`` (bidirectional LSTM, only where the task
allows a backward pass), ``slstm`` (xLSTM's scalar-memory cell, one layer like the LSTM), ``mingru``,
``minlstm``, ``lru``, ``rglru``, ``griffin``, ``mamba2``, ``mlstm``, ``gated_deltanet`` (the cells without a
dense recurrent matrix: two residual layers behind an input projection) and ``transformer``
(:mod:`rnnjax.attention`).
Seq2seq tasks get encoder–decoders of the same cells, or the transformer as a prefix LM
(:mod:`rnnjax.seq2seq`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import rnnjax
from rnnjax import models
from rnnjax.attention import Transformer
from rnnjax.bench.timing import per_call_seconds
from rnnjax.blocks import dense
from rnnjax.layers import Bidirectional
from rnnjax.seq2seq import EncoderDecoder, PrefixLM

ALL_MODELS = (
    "simple",
    "jordan",
    "lstm",
    "gru",
    "bilstm",
    "slstm",
    "mingru",
    "minlstm",
    "lru",
    "rglru",
    "griffin",
    "mamba2",
    "mlstm",
    "gated_deltanet",
    "transformer",
)
"""Every model name, in table order."""

PARALLEL_SCAN_CELLS = ("mingru", "minlstm", "lru", "rglru", "griffin", "mamba2", "mlstm", "gated_deltanet")
"""Cells without a dense recurrent matrix, built as two residual layers (see :func:`build`)."""

TRANSFORMER_LAYERS = 2


def transformer_heads(d_model: int) -> int:
    """4 heads when ``d_model`` allows even head sizes, else 2 (widths step by 4 for finer size matching)."""
    return 4 if d_model % 8 == 0 else 2


def available(name: str) -> bool:
    """Whether ``name`` is a model of the comparison (a registered cell, ``bilstm`` or ``transformer``)."""
    return name in ALL_MODELS and (name in ("bilstm", "transformer") or name in rnnjax.cell_names(aliases=True))


def allows(task, name: str) -> tuple[bool, str]:
    """Whether model ``name`` may run on ``task``, and why not.

    A bidirectional model reads the future: it is allowed on whole-sequence tasks and on per-step tasks
    that say so (``bidirectional_ok``), never on language modelling or forecasting, where later inputs are
    the targets, nor on seq2seq tasks (the encoder–decoder here has a unidirectional encoder).
    """
    if not available(name):
        return False, f"model {name!r} is not registered"
    if name == "bilstm":
        if getattr(task, "seq2seq", False):
            return False, "no bidirectional encoder-decoder"
        ok = getattr(task, "bidirectional_ok", not task.kind.startswith("per_step"))
        if not ok:
            return False, "later inputs are the targets"
    return True, ""


def build(task, name: str, size: int):
    """Model ``name`` for ``task`` with width ``size`` (hidden units, or ``d_model`` for the transformer)."""
    if getattr(task, "seq2seq", False):
        vocab = dict(source_vocab=task.vocab_size, target_vocab=task.output_size, bos_id=task.bos_id)
        if name == "transformer":
            return PrefixLM.build(
                d_model=size, num_heads=transformer_heads(size), num_layers=TRANSFORMER_LAYERS, **vocab
            )
        return EncoderDecoder.build(name, size, **vocab)
    if name == "transformer":
        head = "per_step" if task.kind.startswith("per_step") else "last"
        return Transformer(
            input_size=task.input_size,
            vocab_size=task.vocab_size,
            output_size=task.output_size,
            d_model=size,
            num_heads=transformer_heads(size),
            num_layers=TRANSFORMER_LAYERS,
            head=head,
        )
    if name == "bilstm":
        return models.build_model(task, "lstm", size, bidirectional=True)
    if name in PARALLEL_SCAN_CELLS:
        # The parallel-scan cells have no (or a diagonal) recurrent matrix, so one layer over raw inputs holds
        # few parameters and little capacity; they are meant to be stacked. They run as two residual layers
        # behind an input projection (a width-``size`` embedding for token inputs).
        return models.build_model(task, name, size, num_layers=2, residual=True, embed_size=size)
    return models.build_model(task, name, size)


def count_params(model) -> int:
    """Number of parameters of ``model`` (from shapes only: nothing is computed)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))


def sizes(name: str) -> range:
    """Widths searched for ``name``: multiples of 4 for the transformer, any width for cells."""
    step = 4 if name == "transformer" else 1
    return range(step, 1025, step)


def matched(task, name: str, target: int) -> tuple[Any, int]:
    """The model ``name`` for ``task`` whose parameter count is closest to ``target``.

    The count grows with the width, so a binary search over :func:`sizes` finds the two neighbours of the
    target; the closer one wins.

    Returns:
        ``(model, params)``.
    """
    candidates = sizes(name)
    lo, hi = 0, len(candidates) - 1
    while lo < hi:  # first width whose count reaches the target
        mid = (lo + hi) // 2
        if count_params(build(task, name, candidates[mid])) < target:
            lo = mid + 1
        else:
            hi = mid
    options = [candidates[i] for i in {max(lo - 1, 0), lo}]
    scored = [(abs(count_params(build(task, name, s)) - target), s) for s in options]
    best = build(task, name, min(scored)[1])
    return best, count_params(best)


# Streaming: one token at a time, for the latency measurement.


def stream_fns(model) -> tuple[Callable, Callable] | None:
    """``(init_state(max_len), step(params, state, x))`` streaming one element per call, batch 1.

    For a :class:`~rnnjax.models.SequenceModel` the state is the core's carry (its size does not depend on
    the context); for a :class:`~rnnjax.attention.Transformer` it is a key/value cache of ``max_len``
    positions. ``None`` for models that cannot stream (bidirectional ones).
    """
    if isinstance(model, Transformer):
        return (lambda max_len: model.init_cache(1, max_len)), model.step
    if not isinstance(model, models.SequenceModel) or isinstance(model.core, Bidirectional):
        return None
    core = model.core

    def init_state(max_len):
        del max_len
        return core.initial_carry((1,), jnp.float32)

    def step(params, carry, x):
        h = model.embed_inputs(params, x[:, None])[:, 0]  # (1, E)
        carry, y = core.step(params["core"], carry, h)  # (1, H)
        return carry, dense(params["head"], y)  # (1, O)

    return init_state, step


def streaming_latency(model, params, contexts: list[int]) -> list[float]:
    """Seconds per streamed token after ``c`` tokens of context, for each ``c`` in ``contexts`` (batch 1).

    The transformer attends over a cache of ``c + 1`` positions (filled with random keys and values; the
    cost does not depend on their values); a recurrent model's state does not grow, so its latency should
    not either.
    """
    fns = stream_fns(model)
    if fns is None:
        return []
    init_state, step = fns
    x = jnp.zeros((1,), jnp.int32) if getattr(model, "vocab_size", None) else jnp.zeros((1, model.input_size))
    step = jax.jit(step)
    out = []
    for c in contexts:
        state = init_state(c + 1)
        if isinstance(model, Transformer):
            k = jax.random.normal(jax.random.key(c), state.k.shape, state.k.dtype)
            state = state._replace(k=k, v=k, pos=jnp.full_like(state.pos, c))
        out.append(per_call_seconds(step, params, state, x))
    return out


def forward_throughput(model, params, lengths: list[int], batch_size: int) -> list[float]:
    """Tokens per second of the jitted whole-sequence forward pass at each sequence length."""
    apply = jax.jit(model.apply)
    out = []
    for T in lengths:
        if getattr(model, "vocab_size", None):
            inputs = jnp.zeros((batch_size, T), jnp.int32)
        else:
            inputs = jnp.zeros((batch_size, T, model.input_size), jnp.float32)
        out.append(batch_size * T / per_call_seconds(apply, params, inputs))
    return out


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """A stand-in task for the speed measurements: token inputs, one prediction per step (a language model)."""

    vocab_size: int = 64
    output_size: int = 64
    kind: str = "per_step_classify"
    input_size: None = None
    bidirectional_ok: bool = False
