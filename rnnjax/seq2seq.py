"""Sequence-to-sequence models: a recurrent encoder–decoder, and a transformer read as a prefix language model.

Both have the model interface of :class:`rnnjax.model_protocol.TaskModel` (``init``, ``apply``,
``loss_and_metrics``), so :mod:`rnnjax.train` trains them unchanged, plus decoding::

    model = EncoderDecoder.build("lstm", hidden_size=64, source_vocab=V, target_vocab=V, bos_id=1)
    params = model.init(key)
    logits = model.apply(params, source, lengths=lengths, targets=targets)   # (B, T_out, V_out), teacher forcing
    loss, metrics = model.loss_and_metrics(params, batch, "per_step_classify")
    tokens = model.greedy_decode(params, source, lengths=lengths, num_steps=T_out)   # (B, T_out)
    beams = rnnjax.beam_search(model, params, source, lengths=lengths, num_steps=T_out, beam_size=4)
    decode_metrics(tokens, batch.targets)        # {"exact_match": ..., "token_accuracy": ...}

A batch of a seq2seq task (:class:`rnnjax.tasks.translation.DateTranslation`) holds ``inputs`` ``(B, T_in)``
source ids, ``lengths`` ``(B,)`` source lengths, ``targets`` ``(B, T_out)`` target ids ending in EOS, and an
optional ``mask`` ``(B, T_out)`` of scored target steps.

Teacher forcing: the decoder reads ``BOS, y_1 .. y_{T_out - 1}`` and is trained to output
``y_1 .. y_{T_out}``. Decoding feeds back its own choices instead, through two methods each model has:
``start_decoding`` (read the source and BOS: the decoder's state and the logits of ``y_1``) and
``decode_step`` (one more target id: the next state and logits); :func:`rnnjax.beam_search` runs on them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax import unrolling
from rnnjax.attention import Transformer
from rnnjax.blocks import dense, dense_init
from rnnjax.cells import make_cell
from rnnjax.layers import Stack
from rnnjax.model_protocol import ScoredModel
from rnnjax.tasks.base import Batch
from rnnjax.types import Array, Params, PRNGKey

KIND = "per_step_classify"
"""The task kind seq2seq models are trained as: one class per target step, under teacher forcing."""


def teacher_forcing_inputs(targets: Array, bos_id: int) -> Array:
    """``BOS, y_1 .. y_{T-1}``: targets ``(B, T)`` shifted right by one, ``(B, T)``."""
    targets = jnp.asarray(targets)
    bos = jnp.full(targets.shape[:1] + (1,), bos_id, targets.dtype)
    return jnp.concatenate([bos, targets[:, :-1]], axis=1)


def target_batch(batch: Batch) -> Batch:
    """The target side of a seq2seq batch, for :func:`rnnjax.metrics.compute_metrics` (source lengths dropped)."""
    return Batch(None, batch.targets, None, batch.mask)


def decode_metrics(tokens: Array, targets: Array, mask: Array | None = None) -> dict[str, Array]:
    """Scores of decoded sequences against the targets.

    Args:
        tokens: ``(B, T_out)`` decoded ids.
        targets: ``(B, T_out)`` reference ids (with EOS).
        mask: optional ``(B, T_out)`` weights of the target steps that count (default all).

    Returns:
        ``exact_match`` (the fraction of rows right at every counted step) and ``token_accuracy`` (the
        fraction of counted steps right), scalars.
    """
    targets = jnp.asarray(targets)
    weights = jnp.ones(targets.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    right = (jnp.asarray(tokens) == targets).astype(jnp.float32)  # (B, T_out)
    wrong_steps = jnp.sum((1.0 - right) * weights, axis=1)  # (B,)
    return {
        "exact_match": jnp.mean((wrong_steps == 0).astype(jnp.float32)),
        "token_accuracy": jnp.sum(right * weights) / jnp.maximum(jnp.sum(weights), 1.0),
    }


class _TeacherForcedScoring(ScoredModel):
    """What the seq2seq models score: teacher-forced ``apply`` against the targets (see :func:`target_batch`)."""

    def outputs_to_score(
        self, params: Params, batch: Batch, *, dropout_key: PRNGKey | None = None
    ) -> tuple[Array, Batch]:
        """Teacher-forced logits ``(B, T_out, V_out)`` and the target side of ``batch`` they are scored on."""
        logits = self.apply(params, batch.inputs, lengths=batch.lengths, targets=batch.targets, dropout_key=dropout_key)
        return logits, target_batch(batch)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderDecoder(_TeacherForcedScoring):
    """A recurrent encoder reads the source; its final carry starts a recurrent decoder over the target.

    .. code-block:: text

        source (B, T_in) ─src_embed─> encoder ──final carry──┐
        BOS, y_1 .. y_{T-1} ─tgt_embed─> decoder (from that carry) ─head─> (B, T_out, V_out)

    Encoder and decoder must have carries of the same structure (e.g. both LSTMs of one size, or two equal
    :class:`rnnjax.Stack` s of cells); the decoder must stream (a cell or a stack of cells). This is the
    model of Sutskever, Vinyals & Le (2014) and Cho et al. (2014), without attention.

    Parameters::

        src_embed: (V_in, E)            tgt_embed: (V_out, E)
        encoder, decoder: the cores' parameters
        head: {"w": (H, V_out), "b": (V_out,)}

    Attributes:
        encoder: a cell or layer (batch-major).
        decoder: a cell or a :class:`rnnjax.Stack` of cells.
        source_vocab: ``V_in``.
        target_vocab: ``V_out``.
        embed_size: ``E``.
        bos_id: the target id that starts decoding.

    Example:
        >>> model = EncoderDecoder.build("gru", hidden_size=16, source_vocab=40, target_vocab=40, bos_id=1)
        >>> params = model.init(jax.random.key(0))
        >>> model.apply(params, jnp.ones((2, 7), jnp.int32), targets=jnp.ones((2, 5), jnp.int32)).shape
        (2, 5, 40)
    """

    encoder: Any
    decoder: Any
    source_vocab: int
    target_vocab: int
    embed_size: int
    bos_id: int

    def __post_init__(self):
        enc = jax.eval_shape(lambda: self.encoder.initial_carry((1,)))
        dec = jax.eval_shape(lambda: self.decoder.initial_carry((1,)))
        if jax.tree.structure(enc) != jax.tree.structure(dec) or jax.tree.leaves(enc) != jax.tree.leaves(dec):
            raise ValueError("encoder and decoder carries must have the same structure and shapes")
        if not hasattr(self.decoder, "step"):
            raise ValueError("the decoder must stream: a cell or a Stack of cells")

    @classmethod
    def build(
        cls,
        cell: str,
        hidden_size: int,
        *,
        source_vocab: int,
        target_vocab: int,
        bos_id: int,
        embed_size: int | None = None,
        num_layers: int = 1,
        **cell_options,
    ) -> EncoderDecoder:
        """An encoder–decoder of two cells of ``hidden_size`` named ``cell`` (see :func:`rnnjax.cell_names`)."""

        def core():
            cells = [make_cell(cell, hidden_size, **cell_options) for _ in range(num_layers)]
            return cells[0] if num_layers == 1 else Stack(cells)

        return cls(
            encoder=core(),
            decoder=core(),
            source_vocab=source_vocab,
            target_vocab=target_vocab,
            embed_size=embed_size or hidden_size,
            bos_id=bos_id,
        )

    def init(self, key: PRNGKey) -> Params:
        """Creates the parameters (see the class docstring)."""
        k_src, k_tgt, k_enc, k_dec, k_head = jax.random.split(key, 5)
        return {
            "src_embed": jax.random.normal(k_src, (self.source_vocab, self.embed_size), jnp.float32),
            "tgt_embed": jax.random.normal(k_tgt, (self.target_vocab, self.embed_size), jnp.float32),
            "encoder": self.encoder.init(k_enc, self.embed_size),
            "decoder": self.decoder.init(k_dec, self.embed_size),
            "head": dense_init(k_head, self.decoder.output_size, self.target_vocab),
        }

    def encode(self, params: Params, inputs, lengths=None):
        """The encoder's final carry (leaves ``(B, ...)``) after each row's last valid source step."""
        xs = jnp.take(params["src_embed"], jnp.asarray(inputs), axis=0)  # (B, T_in, E)
        carry, _ = unrolling.unroll(self.encoder, params["encoder"], xs, None, lengths=lengths)
        return carry

    def apply(self, params: Params, inputs, *, lengths=None, targets=None, dropout_key=None) -> Array:
        """Teacher-forced logits.

        Args:
            params: from :meth:`init`.
            inputs: ``(B, T_in)`` source ids.
            lengths: ``(B,)`` source lengths (default all ``T_in``).
            targets: ``(B, T_out)`` target ids (required).
            dropout_key: unused (no dropout); accepted for the model interface.

        Returns:
            ``(B, T_out, V_out)`` logits of ``y_1 .. y_{T_out}``.
        """
        del dropout_key
        if targets is None:
            raise ValueError("teacher forcing needs targets; use greedy_decode to generate")
        carry = self.encode(params, inputs, lengths)
        ys_in = jnp.take(params["tgt_embed"], teacher_forcing_inputs(targets, self.bos_id), axis=0)  # (B, T_out, E)
        _, hidden = unrolling.unroll(self.decoder, params["decoder"], ys_in, carry)  # (B, T_out, H)
        return dense(params["head"], hidden)

    def start_decoding(self, params: Params, inputs, *, lengths=None, max_steps: int) -> tuple[Any, Array]:
        """The decoder's state after reading BOS, and the logits of ``y_1``.

        Args:
            params: from :meth:`init`.
            inputs: ``(B, T_in)`` source ids.
            lengths: ``(B,)`` source lengths (default all ``T_in``).
            max_steps: how many :meth:`decode_step` calls the state must have room for (unused: a recurrent
                state does not grow).

        Returns:
            ``(state, logits)``: the decoder's carry (leaves ``(B, ...)``) and ``(B, V_out)``.
        """
        del max_steps
        carry = self.encode(params, inputs, lengths)
        return self.decode_step(params, carry, jnp.full(jnp.shape(inputs)[:1], self.bos_id, jnp.int32))

    def decode_step(self, params: Params, state, token) -> tuple[Any, Array]:
        """Feeds one target id per row ``(B,)`` to the decoder: ``(state, logits)`` with logits ``(B, V_out)``."""
        x = jnp.take(params["tgt_embed"], token, axis=0)  # (B, E)
        state, h = self.decoder.step(params["decoder"], state, x)  # (B, H)
        return state, dense(params["head"], h)

    def greedy_decode(self, params: Params, inputs, *, lengths=None, num_steps: int) -> Array:
        """Generates ``num_steps`` ids per row, each the argmax given the previous ones: ``(B, num_steps)``."""
        return _greedy(self, params, inputs, lengths, num_steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixLM(_TeacherForcedScoring):
    """A decoder-only transformer used for seq2seq: it reads ``source, BOS, target`` as one causal sequence.

    Source ids keep their values; target-side ids are offset by ``source_vocab`` so the two sides have
    separate embeddings. For a row with source length ``L`` the sequence is::

        x_1 .. x_L  BOS  y_1 .. y_{T_out - 1}  (padding)        predicted: y_j at position L + j - 1

    Greedy decoding prefills a :class:`rnnjax.attention.KVCache` with ``x_1 .. x_L BOS`` and then streams one
    token at a time, each row at its own position (rows have different source lengths).

    Attributes:
        transformer: a :class:`rnnjax.attention.Transformer` with ``vocab_size = source_vocab + target_vocab``,
            ``output_size = target_vocab`` and ``head="per_step"`` (see :meth:`build`).
        source_vocab: ``V_in``.
        target_vocab: ``V_out``.
        bos_id: the target id that starts decoding.
    """

    transformer: Transformer
    source_vocab: int
    target_vocab: int
    bos_id: int

    def __post_init__(self):
        t = self.transformer
        if t.vocab_size != self.source_vocab + self.target_vocab or t.output_size != self.target_vocab:
            raise ValueError(
                "the transformer needs vocab_size = source_vocab + target_vocab, output_size = target_vocab"
            )
        if t.head != "per_step":
            raise ValueError("the transformer needs head='per_step'")

    @classmethod
    def build(cls, *, source_vocab: int, target_vocab: int, bos_id: int, **transformer_options) -> PrefixLM:
        """A prefix LM over a :class:`~rnnjax.attention.Transformer` built from ``transformer_options``."""
        transformer = Transformer(
            vocab_size=source_vocab + target_vocab, output_size=target_vocab, head="per_step", **transformer_options
        )
        return cls(transformer=transformer, source_vocab=source_vocab, target_vocab=target_vocab, bos_id=bos_id)

    def init(self, key: PRNGKey) -> Params:
        """The transformer's parameters."""
        return self.transformer.init(key)

    def _source_lengths(self, inputs, lengths) -> Array:
        B, T_in = jnp.shape(inputs)
        return jnp.full((B,), T_in, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)

    def joint_sequence(self, inputs, lengths, targets) -> tuple[Array, Array]:
        """``(sequence, lengths)``: ``(B, T_in + T_out)`` ids ``x_1..x_L BOS y_1..y_{T_out-1}`` and ``L`` ``(B,)``."""
        inputs, targets = jnp.asarray(inputs, jnp.int32), jnp.asarray(targets, jnp.int32)
        lengths = self._source_lengths(inputs, lengths)
        T_in, T_out = inputs.shape[1], targets.shape[1]
        shifted = teacher_forcing_inputs(targets, self.bos_id) + self.source_vocab  # (B, T_out)
        pos = jnp.arange(T_in + T_out, dtype=jnp.int32)[None, :]  # (1, T)
        from_source = jnp.take_along_axis(inputs, jnp.clip(pos, 0, T_in - 1), axis=1)  # (B, T)
        target_index = pos - lengths[:, None]  # (B, T): index into `shifted`
        from_target = jnp.take_along_axis(shifted, jnp.clip(target_index, 0, T_out - 1), axis=1)
        sequence = jnp.where(pos < lengths[:, None], from_source, jnp.where(target_index < T_out, from_target, 0))
        return sequence, lengths

    def apply(self, params: Params, inputs, *, lengths=None, targets=None, dropout_key=None) -> Array:
        """Teacher-forced logits ``(B, T_out, V_out)`` (arguments as :meth:`EncoderDecoder.apply`)."""
        if targets is None:
            raise ValueError("teacher forcing needs targets; use greedy_decode to generate")
        sequence, lengths = self.joint_sequence(inputs, lengths, targets)
        logits = self.transformer.apply(params, sequence, dropout_key=dropout_key)  # (B, T_in + T_out, V_out)
        index = lengths[:, None] + jnp.arange(jnp.shape(targets)[1], dtype=jnp.int32)[None, :]  # (B, T_out)
        return jnp.take_along_axis(logits, index[..., None], axis=1)

    def start_decoding(self, params: Params, inputs, *, lengths=None, max_steps: int) -> tuple[Any, Array]:
        """Prefills the cache with ``x_1 .. x_L BOS``; returns it and the logits of ``y_1``.

        Args:
            params: from :meth:`init`.
            inputs: ``(B, T_in)`` source ids.
            lengths: ``(B,)`` source lengths (default all ``T_in``).
            max_steps: how many :meth:`decode_step` calls the cache must have room for.

        Returns:
            ``(cache, logits)``: a :class:`rnnjax.attention.KVCache` and ``(B, V_out)``.
        """
        inputs = jnp.asarray(inputs, jnp.int32)
        lengths = self._source_lengths(inputs, lengths)
        T_in = inputs.shape[1]
        pos = jnp.arange(T_in + 1, dtype=jnp.int32)[None, :]
        padded = jnp.pad(inputs, [(0, 0), (0, 1)])  # (B, T_in + 1)
        prefix = jnp.where(pos == lengths[:, None], self.bos_id + self.source_vocab, padded)  # BOS after the source
        cache, logits = self.transformer.prefill(params, prefix, T_in + 1 + max_steps, lengths=lengths + 1)
        return cache, jnp.take_along_axis(logits, lengths[:, None, None], axis=1)[:, 0]  # (B, V_out) at BOS

    def decode_step(self, params: Params, state, token) -> tuple[Any, Array]:
        """Feeds one target id per row ``(B,)`` through the cache: ``(cache, logits)`` with logits ``(B, V_out)``."""
        return self.transformer.step(params, state, jnp.asarray(token, jnp.int32) + self.source_vocab)

    def greedy_decode(self, params: Params, inputs, *, lengths=None, num_steps: int) -> Array:
        """Greedy decoding through the key/value cache: ``(B, num_steps)`` ids."""
        return _greedy(self, params, inputs, lengths, num_steps)


def _greedy(model, params: Params, inputs, lengths, num_steps: int) -> Array:
    """Greedy decoding through a model's ``start_decoding`` and ``decode_step``: ``(B, num_steps)`` ids."""
    state, logits = model.start_decoding(params, inputs, lengths=lengths, max_steps=max(num_steps - 1, 0))
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # (B,)

    def body(carry, _):
        state, token = carry
        state, logits = model.decode_step(params, state, token)  # (B, V_out)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (state, token), token

    _, rest = jax.lax.scan(body, (state, first), None, length=max(num_steps - 1, 0))  # (num_steps - 1, B)
    return jnp.concatenate([first[:, None], rest.T], axis=1)[:, :num_steps]
