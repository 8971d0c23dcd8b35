"""Generating from trained models: sampling from language models, beam search for sequence-to-sequence models.

Language models (a :class:`rnnjax.models.SequenceModel` over tokens with a streaming core, or a
:class:`rnnjax.attention.Transformer` over tokens) continue a prompt::

    tokens = rnnjax.generate(model, params, prompt_ids, max_new_tokens=200, temperature=0.8, top_p=0.95,
                             key=jax.random.key(0))                              # (B, 200) or (200,)

The prompt is read whole in one pass (the recurrent model's fused sequence path, which leaves the carry after
each row's last token; the transformer's :meth:`~rnnjax.attention.Transformer.prefill`, which fills its key/value
cache), then a compiled ``lax.scan`` streams one token per step through the model's ``step``, carrying the
recurrent state or the cache. Each new token is drawn from ``softmax(logits / temperature)`` after top-k and
top-p (nucleus) filtering (:func:`filter_logits`); ``temperature=0`` takes the argmax (greedy). One program is
compiled per model and shapes: temperature, top-k and top-p are its arguments, not constants.

Sequence-to-sequence models (:class:`rnnjax.seq2seq.EncoderDecoder`, :class:`rnnjax.seq2seq.PrefixLM`) decode
with :func:`beam_search` (``beam_size=1`` is their ``greedy_decode``).

Shape letters: ``B`` batch, ``T`` prompt (or source) length, ``N`` new tokens, ``V`` vocabulary, ``K`` beams.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.attention import Transformer
from rnnjax.models import SequenceModel
from rnnjax.types import Array, Params, PRNGKey

# Filtering and sampling one step.


def filter_logits(logits, *, top_k=None, top_p=None) -> Array:
    """Sets the logits of every token outside the top-k and the top-p nucleus to ``-inf``.

    Top-k keeps the ``top_k`` largest logits (and any tied with the smallest of them). Top-p then keeps the most
    probable tokens of ``softmax(logits)`` (after top-k) in order until their probability mass reaches ``top_p``,
    the token that crosses it included, and any token as probable as the last one kept; at least the most
    probable token always remains. Both may be traced values.

    Args:
        logits: ``(..., V)``.
        top_k: an integer ``>= 1`` (values above ``V`` keep everything), or ``None`` for no top-k filter.
        top_p: a number in ``(0, 1]`` (``1``: keep everything), or ``None`` for no top-p filter.

    Returns:
        ``(..., V)`` logits, float32, ``-inf`` where filtered out.

    Example:
        >>> filter_logits(jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])), top_p=0.75)   # 0.5 + 0.3 reaches 0.75
        Array([-0.6931472, -1.2039728,       -inf,       -inf], dtype=float32)
    """
    logits = jnp.asarray(logits, jnp.float32)
    V = logits.shape[-1]
    removed = jnp.float32(-jnp.inf)
    if top_k is not None:
        k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, V)
        descending = -jnp.sort(-logits, axis=-1)  # (..., V)
        kth = jnp.take_along_axis(descending, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], axis=-1)
        logits = jnp.where(logits >= kth, logits, removed)  # (..., V)
    if top_p is not None:
        p = jnp.asarray(top_p, jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)  # (..., V)
        descending = -jnp.sort(-probs, axis=-1)  # (..., V)
        cumulative = jnp.cumsum(descending, axis=-1)
        before = jnp.concatenate([jnp.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], axis=-1)  # mass above
        kept = jnp.sum(before < p, axis=-1, keepdims=True)  # (..., 1), >= 1 as before[0] = 0 < p
        smallest_kept = jnp.take_along_axis(descending, kept - 1, axis=-1)  # (..., 1)
        logits = jnp.where((probs >= smallest_kept) | (p >= 1), logits, removed)
    return logits


def sample_logits(key: PRNGKey, logits, *, temperature=1.0, top_k=None, top_p=None) -> Array:
    """Draws one token per row: the argmax for ``temperature == 0``, else from the filtered, tempered softmax.

    ``jax.random.categorical(key, filter_logits(logits / temperature, top_k=top_k, top_p=top_p))``, where top-p
    applies to the tempered distribution. ``temperature``, ``top_k`` and ``top_p`` may be traced values.

    Args:
        key: a PRNG key (unused when ``temperature`` is the number 0).
        logits: ``(..., V)``.
        temperature: ``>= 0``; below 1 sharpens the distribution, above 1 flattens it.
        top_k, top_p: see :func:`filter_logits`.

    Returns:
        ``(...)`` int32 token ids.
    """
    logits = jnp.asarray(logits, jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if isinstance(temperature, numbers.Number) and temperature == 0:
        return greedy
    t = jnp.asarray(temperature, jnp.float32)
    scaled = logits / jnp.where(t > 0, t, jnp.float32(1.0))  # (..., V); t == 0 is answered by the argmax
    filtered = filter_logits(scaled, top_k=top_k, top_p=top_p)
    sampled = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    return jnp.where(t > 0, sampled, greedy)


# Language models.


def generate(
    model,
    params: Params,
    prompt,
    *,
    max_new_tokens: int,
    lengths=None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: PRNGKey | int | None = None,
) -> Array:
    """Continues each prompt by ``max_new_tokens`` tokens, drawn one at a time from the model's predictions.

    The prompt is read in one pass, then a compiled loop streams through the model's ``step``: for a recurrent
    model the carry (constant size), for the transformer its key/value cache (``T + N`` positions). Token ``i``
    of every row is drawn with :func:`sample_logits` from ``keys[i]``, ``keys = jax.random.split(key, N)``, so
    the output is a function of the key (and the whole batch) only.

    Args:
        model: a language model: a :class:`rnnjax.models.SequenceModel` over tokens whose core streams (not
            bidirectional), or a :class:`rnnjax.attention.Transformer` over tokens, with ``output_size`` equal
            to ``vocab_size`` (the next token's logits).
        params: the model's parameters.
        prompt: token ids: ``(T,)`` for one prompt, ``(B, T)`` for a batch (right-padded when ``lengths`` is
            given), or a list of ``B`` sequences of different lengths (padded here).
        max_new_tokens: ``N >= 0``.
        lengths: ``(B,)`` prompt lengths in ``[1, T]`` for a padded ``(B, T)`` prompt (default all ``T``).
        temperature: ``>= 0``; ``0`` is greedy decoding (the argmax at every step).
        top_k: keep only the ``top_k >= 1`` most likely tokens at each step (``None``: all).
        top_p: keep only the nucleus of probability mass ``top_p`` in ``(0, 1]`` at each step (``None``: all).
        key: a PRNG key (``jax.random.key(seed)``) or an integer seed; required when ``temperature > 0``.

    Returns:
        ``(B, N)`` int32 new tokens (``(N,)`` for a one-dimensional prompt).

    Raises:
        TypeError: the prompt is not integer ids, or ``key`` is missing for sampling.
        ValueError: an argument is out of range (the message names it), an empty prompt, ids outside
            ``[0, V)``, or a model that is not a streaming language model.

    Example:
        >>> task = rnnjax.tasks.get("charlm", seq_len=32)
        >>> model = rnnjax.models.build_model(task, "gru", hidden_size=32)
        >>> params = model.init(jax.random.key(0))
        >>> ids = rnnjax.generate(model, params, task.encode("The "), max_new_tokens=20, key=jax.random.key(1))
        >>> task.decode(ids)                                                      # 20 characters
    """
    vocab_size = check_language_model(model)
    check_sampling(temperature, top_k, top_p)
    _check_int("max_new_tokens", max_new_tokens, 0)
    prompt, lengths, single = _prompt_batch(prompt, lengths, vocab_size)
    if key is None:
        if temperature != 0:
            raise TypeError("key: sampling (temperature > 0) needs a PRNG key, e.g. key=jax.random.key(0), or a seed")
        key = jax.random.key(0)  # unused by greedy decoding
    elif isinstance(key, numbers.Integral):
        key = jax.random.key(int(key))
    if max_new_tokens == 0:
        tokens = jnp.zeros((prompt.shape[0], 0), jnp.int32)
    else:
        tokens = _generate(
            model,
            params,
            prompt,
            lengths,
            key,
            jnp.float32(temperature),
            jnp.int32(vocab_size if top_k is None else min(top_k, vocab_size)),
            jnp.float32(1.0 if top_p is None else top_p),
            max_new_tokens=max_new_tokens,
        )
    return tokens[0] if single else tokens


def check_language_model(model) -> int:
    """The vocabulary size ``V`` of a model :func:`generate` can sample from; ``ValueError`` naming what is wrong."""
    if isinstance(model, SequenceModel):
        if not getattr(model.core, "can_stream", hasattr(model.core, "step")):
            raise ValueError(
                f"model: its core ({type(model.core).__name__}) needs whole sequences and cannot stream, so it "
                "cannot generate (a bidirectional layer reads the future)"
            )
    elif not isinstance(model, Transformer):
        hint = " (a seq2seq model: use rnnjax.beam_search)" if hasattr(model, "decode_step") else ""
        raise ValueError(
            f"model must be a language model, a SequenceModel or a Transformer over tokens, got "
            f"{type(model).__name__}{hint}"
        )
    if model.vocab_size is None:
        raise ValueError("model reads float inputs (input_size set); generation needs token inputs (vocab_size)")
    if model.output_size != model.vocab_size:
        raise ValueError(
            f"model predicts {model.output_size} classes but reads {model.vocab_size} tokens; a language model "
            "predicts the next token (output_size == vocab_size)"
        )
    return model.vocab_size


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _generate(model, params, prompt, lengths, key, temperature, top_k, top_p, *, max_new_tokens: int) -> Array:
    """The compiled body of :func:`generate` (arguments checked): ``(B, N)`` int32."""
    N = max_new_tokens
    state, logits = _prefill(model, params, prompt, lengths, max_len=prompt.shape[1] + N)  # logits (B, V)
    keys = jax.random.split(key, N)
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    first = sample(keys[0], logits)  # (B,)

    def body(carry, step_key):
        state, token = carry
        state, logits = model.step(params, state, token)  # (B, V)
        token = sample(step_key, logits)
        return (state, token), token

    _, rest = jax.lax.scan(body, (state, first), keys[1:])  # (N - 1, B)
    return jnp.concatenate([first[:, None], rest.T], axis=1)  # (B, N)


def _prefill(model, params: Params, prompt: Array, lengths: Array, *, max_len: int) -> tuple[Any, Array]:
    """Reads whole prompts: the streaming state after each row's last token, and the logits there ``(B, V)``."""
    if isinstance(model, Transformer):
        state, outputs = model.prefill(params, prompt, max_len, lengths=lengths)  # outputs (B, T, V)
    else:
        state, outputs = model.apply_with_carry(params, prompt, None, lengths=lengths)  # (B, T, V) or (B, V)
    if outputs.ndim == 3:  # per-step head: the prediction after each row's last prompt token
        outputs = jnp.take_along_axis(outputs, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return state, outputs.astype(jnp.float32)


def _prompt_batch(prompt, lengths, vocab_size: int) -> tuple[Array, Array, bool]:
    """``(ids (B, T) int32, lengths (B,) int32, single)`` from the forms :func:`generate` accepts, checked."""
    if isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], numbers.Number):
        if lengths is not None:
            raise ValueError("lengths: give either a list of prompts or a padded (B, T) prompt with lengths")
        rows = [np.asarray(row) for row in prompt]
        if any(row.ndim != 1 for row in rows):
            raise ValueError("prompt: a list of prompts must hold one-dimensional sequences of token ids")
        lengths = [len(row) for row in rows]
        dtype = np.result_type(*[row for row in rows if row.size] or [np.int32])  # an empty row is float64
        prompt = np.zeros((len(rows), max(lengths)), dtype)
        for index, row in enumerate(rows):
            prompt[index, : len(row)] = row
    ids = np.asarray(prompt)
    if ids.size == 0:
        raise ValueError(f"prompt is empty (shape {ids.shape}); give at least one token per row")
    if ids.dtype == object or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"prompt must be integer token ids, got dtype {ids.dtype}")
    single = ids.ndim == 1
    if single:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"prompt must have shape (T,) or (batch, T) of token ids, got shape {ids.shape}")
    B, T = ids.shape
    if lengths is None:
        lengths = np.full((B,), T, np.int32)
    lengths = np.asarray(lengths)
    if single and lengths.ndim == 0:
        lengths = lengths[None]
    if not np.issubdtype(lengths.dtype, np.integer) or lengths.shape != (B,):
        raise ValueError(f"lengths must be ({B},) integers, got {lengths.dtype} of shape {lengths.shape}")
    if lengths.min() < 1 or lengths.max() > T:
        raise ValueError(
            f"lengths must lie in [1, {T}] (every prompt needs at least one token), got {lengths.min()} to "
            f"{lengths.max()}"
        )
    valid = np.arange(T)[None, :] < lengths[:, None]  # (B, T): padding is not checked
    if ids[valid].min() < 0 or ids[valid].max() >= vocab_size:
        raise ValueError(
            f"prompt must be token ids in [0, {vocab_size}) (the model's vocab_size), got values from "
            f"{ids[valid].min()} to {ids[valid].max()}"
        )
    ids = np.where(valid, ids, 0)  # padding as a valid id: the model never reads it
    return jnp.asarray(ids, jnp.int32), jnp.asarray(lengths, jnp.int32), single


# Sequence-to-sequence models.


class BeamSearchResult(NamedTuple):
    """What :func:`beam_search` returns, best hypothesis first in each row.

    Attributes:
        tokens: ``(B, K, N)`` int32; after a hypothesis's EOS every token is EOS.
        scores: ``(B, K)`` float32, ``log_probs / ((5 + lengths) / 6) ** length_penalty``, descending.
        log_probs: ``(B, K)`` float32, the log-probability of each hypothesis (up to and including its EOS).
        lengths: ``(B, K)`` int32, tokens up to and including the first EOS (``N`` when there is none).
    """

    tokens: Array
    scores: Array
    log_probs: Array
    lengths: Array


def beam_search(
    model,
    params: Params,
    source,
    *,
    num_steps: int,
    beam_size: int,
    lengths=None,
    eos_id: int | None = None,
    length_penalty: float = 0.0,
) -> BeamSearchResult:
    """Beam search for a sequence-to-sequence model: the ``beam_size`` most probable outputs found per source.

    At each step every hypothesis is extended by every token and the ``K`` best of the ``K * V`` extensions, by
    total log-probability, are kept (the first step starts from the single empty hypothesis). A hypothesis that
    has emitted ``eos_id`` is finished: its only extension is EOS again, at no cost. After ``N`` steps the
    ``K`` hypotheses are ranked by ``log_prob / ((5 + length) / 6) ** length_penalty`` (Wu et al. 2016;
    ``length_penalty=0`` ranks by probability; larger values favour longer outputs). With ``beam_size=1``
    this is greedy decoding; with ``K >= V ** (N - 1)`` beams and no length penalty it is exact (the best
    of all ``V ** N`` outputs). Beams beyond the number of distinct outputs (``K > V`` at the first step) end at
    score ``-inf``. One program is compiled per model, shapes, ``beam_size`` and ``eos_id``.

    Args:
        model: a model with ``start_decoding(params, source, *, lengths, max_steps) -> (state, logits)`` and
            ``decode_step(params, state, token) -> (state, logits)``: :class:`rnnjax.seq2seq.EncoderDecoder`
            or :class:`rnnjax.seq2seq.PrefixLM`.
        params: the model's parameters.
        source: ``(B, T)`` source ids (right-padded).
        num_steps: ``N >= 0`` target tokens to produce.
        beam_size: ``K >= 1``.
        lengths: ``(B,)`` source lengths (default all ``T``).
        eos_id: the id that ends a hypothesis, or ``None`` (every hypothesis runs ``N`` tokens).
        length_penalty: ``>= 0``, the exponent of the length normalisation (used with ``eos_id``).

    Returns:
        A :class:`BeamSearchResult`.

    Example:
        >>> model = rnnjax.seq2seq.EncoderDecoder.build("gru", 32, source_vocab=40, target_vocab=40, bos_id=1)
        >>> params = model.init(jax.random.key(0))
        >>> result = rnnjax.beam_search(model, params, jnp.ones((2, 7), jnp.int32), num_steps=5, beam_size=4)
        >>> result.tokens.shape, result.scores.shape
        ((2, 4, 5), (2, 4))
    """
    if not (hasattr(model, "start_decoding") and hasattr(model, "decode_step")):
        hint = " (a language model: use rnnjax.generate)" if isinstance(model, (SequenceModel, Transformer)) else ""
        raise ValueError(
            f"model must be a seq2seq model with start_decoding and decode_step (EncoderDecoder, PrefixLM), got "
            f"{type(model).__name__}{hint}"
        )
    _check_int("num_steps", num_steps, 0)
    _check_int("beam_size", beam_size, 1)
    V = model.target_vocab
    if eos_id is not None:
        _check_int("eos_id", eos_id, 0)
        if eos_id >= V:
            raise ValueError(f"eos_id must be a target id in [0, {V}), got {eos_id}")
    if not (isinstance(length_penalty, numbers.Real) and 0 <= length_penalty < math.inf):
        raise ValueError(f"length_penalty must be a number >= 0, got {length_penalty!r}")
    source = np.asarray(source)
    if not np.issubdtype(source.dtype, np.integer) or source.ndim != 2 or 0 in source.shape:
        raise ValueError(f"source must be (batch, time) integer ids, got {source.dtype} of shape {source.shape}")
    if source.min() < 0 or source.max() >= model.source_vocab:
        raise ValueError(
            f"source must be ids in [0, {model.source_vocab}), got values from {source.min()} to {source.max()}"
        )
    B, T = source.shape
    lengths = np.full((B,), T, np.int32) if lengths is None else np.asarray(lengths)
    if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be ({B},) integers, got {lengths.dtype} of shape {lengths.shape}")
    if num_steps == 0:
        empty = jnp.zeros((B, beam_size), jnp.float32)
        return BeamSearchResult(jnp.zeros((B, beam_size, 0), jnp.int32), empty, empty, empty.astype(jnp.int32))
    return _beam_search(
        model,
        params,
        jnp.asarray(source, jnp.int32),
        jnp.asarray(lengths, jnp.int32),
        jnp.float32(length_penalty),
        num_steps=num_steps,
        beam_size=beam_size,
        eos_id=eos_id,
    )


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "beam_size", "eos_id"))
def _beam_search(model, params, source, lengths, length_penalty, *, num_steps, beam_size, eos_id):
    """The compiled body of :func:`beam_search` (arguments checked)."""
    B, K, N, V = source.shape[0], beam_size, num_steps, model.target_vocab
    start = functools.partial(model.start_decoding, lengths=lengths, max_steps=N)
    state, logits = start(params, source)  # logits (B, V)
    axes = _batch_axes(model, params, source, N)
    state = _map_rows(lambda leaf, axis: jnp.repeat(leaf, K, axis=axis), state, axes)
    logits = jnp.repeat(logits, K, axis=0)  # (B * K, V): row b * K + k is beam k of source b
    scores = jnp.where(jnp.arange(K) == 0, 0.0, -jnp.inf).astype(jnp.float32)  # only beam 0 starts alive
    initial = (
        state,
        logits,
        jnp.broadcast_to(scores, (B, K)),  # log-probabilities
        jnp.zeros((B, K), jnp.bool_),  # finished (emitted EOS)
        jnp.full((B, K), N, jnp.int32),  # lengths
        jnp.zeros((B, K, N), jnp.int32),  # tokens so far
    )
    if eos_id is not None:
        after_eos = jnp.where(jnp.arange(V) == eos_id, 0.0, -jnp.inf).astype(jnp.float32)  # (V,)

    def body(carry, t):
        state, logits, scores, finished, lengths, tokens = carry
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(B, K, V)
        if eos_id is not None:
            log_p = jnp.where(finished[..., None], after_eos, log_p)
        candidates = (scores[..., None] + log_p).reshape(B, K * V)
        scores, index = jax.lax.top_k(candidates, K)  # (B, K) each
        parent, token = index // V, (index % V).astype(jnp.int32)  # (B, K)
        tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1).at[:, :, t].set(token)
        was_finished = jnp.take_along_axis(finished, parent, axis=1)
        lengths = jnp.where(was_finished, jnp.take_along_axis(lengths, parent, axis=1), N)
        if eos_id is not None:
            lengths = jnp.where(~was_finished & (token == eos_id), t + 1, lengths)
            finished = was_finished | (token == eos_id)
        rows = (jnp.arange(B)[:, None] * K + parent).reshape(B * K)  # (B * K,)
        state = _map_rows(lambda leaf, axis: jnp.take(leaf, rows, axis=axis), state, axes)
        state, logits = model.decode_step(params, state, token.reshape(B * K))  # logits (B * K, V)
        return (state, logits, scores, finished, lengths, tokens), None

    (_, _, log_probs, _, lengths, tokens), _ = jax.lax.scan(body, initial, jnp.arange(N))
    scores = log_probs / ((5.0 + lengths.astype(jnp.float32)) / 6.0) ** length_penalty  # (B, K)
    order = jnp.argsort(-scores, axis=1, stable=True)  # best first
    pick = functools.partial(jnp.take_along_axis, indices=order, axis=1)
    return BeamSearchResult(
        jnp.take_along_axis(tokens, order[..., None], axis=1), pick(scores), pick(log_probs), pick(lengths)
    )


def _batch_axes(model, params, source: Array, max_steps: int):
    """The batch axis of each leaf of the model's decoding state (``None`` for a leaf without one).

    Read from the state's shapes at batch sizes 1 and 2 (a key/value cache keeps its batch on axis 1).
    """

    def shapes(batch):
        src = jax.ShapeDtypeStruct((batch, source.shape[1]), source.dtype)
        lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
        return jax.eval_shape(
            lambda p, s, n: model.start_decoding(p, s, lengths=n, max_steps=max_steps)[0], params, src, lengths
        )

    def axis(one, two):
        differ = [i for i, (a, b) in enumerate(zip(one.shape, two.shape)) if a != b]
        return differ[0] if differ else None

    return jax.tree.map(axis, shapes(1), shapes(2))


def _map_rows(fn, state, axes):
    """``fn(leaf, axis)`` on every leaf of ``state`` that has a batch axis (``axes`` from :func:`_batch_axes`)."""
    return jax.tree.map(
        lambda axis, leaf: leaf if axis is None else fn(leaf, axis), axes, state, is_leaf=lambda x: x is None
    )


# Argument checks.


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_sampling(temperature, top_k=None, top_p=None) -> None:
    """Raises ``ValueError`` naming ``temperature``, ``top_k`` or ``top_p`` if it is not what :func:`generate` takes."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None:
        _check_int("top_k", top_k, 1)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
