"""The attention baseline: a small causal pre-norm transformer with rotary positions and a key/value cache.

It has the model interface of :class:`rnnjax.model_protocol.TaskModel`, so the same training loop, tasks and
experiments use it unchanged::

    model = Transformer(vocab_size=V, output_size=V, d_model=64, num_heads=4, num_layers=2, head="per_step")
    params = model.init(key)
    outputs = model.apply(params, ids, lengths=lengths)                 # (B, T, O) or (B, O)
    loss, metrics = model.loss_and_metrics(params, batch, "per_step_classify")

and it streams like a cell, one element at a time, carrying a :class:`KVCache` instead of a hidden state::

    cache = model.init_cache(batch_size=B, max_len=T)
    for t in range(T):
        cache, y = model.step(params, cache, ids[:, t])                # y: (B, O) == apply(...)[:, t]

Each block is ``x + attn(ln(x))`` then ``x + mlp(ln(x))`` (pre-norm, as in GPT-2), with a final layer norm
before the head. Positions enter only through rotary embeddings (RoPE, Su et al. 2021) of queries and keys, so
the model has no maximum length and can be evaluated on sequences longer than it was trained on.

Shape letters: ``B`` batch, ``T`` time, ``I`` input features, ``D`` model width, ``N`` heads, ``K`` head size
(``D = N * K``), ``L`` cache length, ``O`` outputs, ``V`` vocabulary.

Right padding needs no attention mask: attention is causal, so a valid position never sees the padding that
follows it; the ``"last"`` head reads each row's output at ``lengths - 1``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import _checks
from rnnjax.blocks import check_model_inputs, dense, dense_init, maybe_dropout
from rnnjax.model_protocol import ScoredModel
from rnnjax.types import Array, Params, PRNGKey

HEADS = ("last", "per_step")


class KVCache(NamedTuple):
    """Streaming state of a :class:`Transformer`: every layer's keys and values, and each row's position.

    Attributes:
        k: ``(num_layers, B, L, N, K)`` rotated keys; entries at or past ``pos`` are not read.
        v: ``(num_layers, B, L, N, K)`` values.
        pos: ``(B,)`` int32, the number of elements each row has consumed (where the next one is written).
    """

    k: Array
    v: Array
    pos: Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Transformer(ScoredModel):
    """A causal pre-norm transformer (decoder-only) with rotary positions.

    .. code-block:: text

        inputs (B, T) ids ──embed──┐
        inputs (B, T, I) ──proj────┴─> (B, T, D) ─[block] x num_layers─> ln_f ─head─> (B, O) or (B, T, O)
        block: x += attn(ln1(x)) ; x += mlp(ln2(x))        attn: causal, N heads, RoPE on q and k

    Parameters::

        embed:      (V, D)                                  token embedding (vocab_size set)
        input_proj: {"w": (I, D), "b": (D,)}                input projection (input_size set)
        blocks:     [{"ln1": {"scale": (D,), "bias": (D,)},
                      "attn": {"w_qkv": (D, 3D), "b_qkv": (3D,), "w_out": (D, D), "b_out": (D,)},
                      "ln2": {...},
                      "mlp": {"w_in": (D, M), "b_in": (M,), "w_out": (M, D), "b_out": (D,)}}, ...]
        ln_f:       {"scale": (D,), "bias": (D,)}
        head:       {"w": (D, O), "b": (O,)}

    with ``M = mlp_ratio * D``.

    Attributes:
        output_size: ``O`` (classes for classification).
        input_size: ``I`` of float inputs (``None`` for token inputs).
        vocab_size: ``V`` of token inputs (``None`` for float inputs).
        d_model: ``D``; a multiple of ``2 * num_heads`` (rotary embeddings rotate pairs of features).
        num_heads: ``N``.
        num_layers: number of blocks.
        mlp_ratio: hidden width of the MLP as a multiple of ``D``.
        head: ``"last"`` (each row's output at its last valid step) or ``"per_step"``.
        dropout: dropout on the embedded inputs and on each residual branch (only with a ``dropout_key``).
        rope_base: the base of the rotary frequencies.

    Example:
        >>> model = Transformer(input_size=2, output_size=1, d_model=32, num_heads=4)
        >>> params = model.init(jax.random.key(0))
        >>> model.apply(params, jnp.ones((4, 10, 2))).shape
        (4, 1)
    """

    output_size: int
    input_size: int | None = None
    vocab_size: int | None = None
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    mlp_ratio: int = 4
    head: str = "last"
    dropout: float = 0.0
    rope_base: float = 10000.0

    def __post_init__(self):
        if (self.input_size is None) == (self.vocab_size is None):
            raise ValueError("set exactly one of input_size (float inputs) and vocab_size (token inputs)")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.d_model % (2 * self.num_heads):
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of 2 * num_heads ({2 * self.num_heads})")
        if self.num_layers < 1 or self.mlp_ratio < 1:
            raise ValueError("num_layers and mlp_ratio must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    @property
    def head_size(self) -> int:
        """``K = D / N``."""
        return self.d_model // self.num_heads

    # Parameters.

    def init(self, key: PRNGKey) -> Params:
        """Creates the parameters (see the class docstring for their names and shapes)."""
        D, M = self.d_model, self.mlp_ratio * self.d_model
        k_in, k_head, *k_blocks = jax.random.split(key, 2 + self.num_layers)
        params = {}
        if self.vocab_size is not None:
            params["embed"] = 0.02 * jax.random.normal(k_in, (self.vocab_size, D), jnp.float32)
        else:
            params["input_proj"] = dense_init(k_in, self.input_size, D)
        blocks = []
        for k in k_blocks:
            k_qkv, k_out, k_mlp_in, k_mlp_out = jax.random.split(k, 4)
            qkv, out = dense_init(k_qkv, D, 3 * D), dense_init(k_out, D, D)
            mlp_in, mlp_out = dense_init(k_mlp_in, D, M), dense_init(k_mlp_out, M, D)
            blocks.append(
                {
                    "ln1": _layer_norm_init(D),
                    "attn": {"w_qkv": qkv["w"], "b_qkv": qkv["b"], "w_out": out["w"], "b_out": out["b"]},
                    "ln2": _layer_norm_init(D),
                    "mlp": {"w_in": mlp_in["w"], "b_in": mlp_in["b"], "w_out": mlp_out["w"], "b_out": mlp_out["b"]},
                }
            )
        params["blocks"] = blocks
        params["ln_f"] = _layer_norm_init(D)
        params["head"] = dense_init(k_head, D, self.output_size)
        return params

    # Whole sequences.

    def apply(self, params: Params, inputs, *, lengths=None, dropout_key: PRNGKey | None = None) -> Array:
        """Runs the model over whole sequences.

        Args:
            params: from :meth:`init`.
            inputs: ``(B, T, I)`` floats or ``(B, T)`` integer token ids.
            lengths: optional ``(B,)`` valid lengths (used by the ``"last"`` head only; attention is causal).
            dropout_key: PRNG key for dropout (training); ``None`` disables dropout.

        Returns:
            ``(B, O)`` for the ``"last"`` head, ``(B, T, O)`` for ``"per_step"``.
        """
        hidden, _ = self.hidden_states(params, inputs, dropout_key=dropout_key)  # (B, T, D)
        if self.head == "last":
            T = hidden.shape[1]
            index = jnp.full(hidden.shape[:1], T - 1, jnp.int32) if lengths is None else _last_index(lengths)
            hidden = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]  # (B, D)
        return dense(params["head"], hidden)  # (B, O) or (B, T, O)

    def hidden_states(
        self, params: Params, inputs, *, dropout_key: PRNGKey | None = None, positions: Array | None = None
    ) -> tuple[Array, tuple[Array, Array]]:
        """The final layer-normed hidden states, and every layer's keys and values (for :meth:`prefill`).

        Args:
            params: from :meth:`init`.
            inputs: ``(B, T, I)`` floats or ``(B, T)`` token ids.
            dropout_key: PRNG key for dropout, or ``None``.
            positions: ``(B, T)`` or ``(T,)`` int32 rotary positions; default ``0 .. T-1``.

        Returns:
            ``(hidden, (k, v))`` with ``hidden`` ``(B, T, D)`` and ``k``, ``v`` ``(num_layers, B, T, N, K)``.
        """
        x = self.embed_inputs(params, inputs)  # (B, T, D)
        B, T = x.shape[:2]
        if positions is None:
            positions = jnp.arange(T, dtype=jnp.int32)
        positions = jnp.broadcast_to(positions, (B, T))  # (B, T)
        keys = list(jax.random.split(dropout_key, 1 + 2 * self.num_layers)) if dropout_key is not None else None
        x = maybe_dropout(keys.pop() if keys else None, x, self.dropout)
        causal = jnp.tril(jnp.ones((T, T), jnp.bool_))  # (T_q, T_k)
        ks, vs = [], []
        for block in params["blocks"]:
            q, k, v = self._qkv(block, x, positions)  # each (B, T, N, K)
            ks.append(k)
            vs.append(v)
            attended = _attention(q, k, v, causal[None, None])  # (B, T, N, K)
            update = dense(_out_params(block["attn"]), attended.reshape(B, T, self.d_model))  # (B, T, D)
            x = x + maybe_dropout(keys.pop() if keys else None, update, self.dropout)
            update = self._mlp(block, x)  # (B, T, D)
            x = x + maybe_dropout(keys.pop() if keys else None, update, self.dropout)
        return _layer_norm(params["ln_f"], x), (jnp.stack(ks), jnp.stack(vs))

    def embed_inputs(self, params: Params, inputs) -> Array:
        """Token ids ``(B, T)`` or floats ``(B, T, I)`` -> ``(B, T, D)``."""
        if self.vocab_size is not None:
            ids = check_model_inputs(inputs, vocab_size=self.vocab_size)
            return jnp.take(params["embed"], ids, axis=0)  # (B, T, D)
        xs = check_model_inputs(inputs, input_size=self.input_size)
        return dense(params["input_proj"], xs.astype(jnp.float32))  # (B, T, D)

    # Streaming.

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache for ``batch_size`` rows of up to ``max_len`` elements (``pos`` zero)."""
        shape = (self.num_layers, batch_size, max_len, self.num_heads, self.head_size)
        return KVCache(
            jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros((batch_size,), jnp.int32)
        )

    def prefill(self, params: Params, inputs, max_len: int, *, lengths=None) -> tuple[KVCache, Array]:
        """Runs whole prefixes at once and returns the cache a sequence of :meth:`step` calls would have built.

        Args:
            params: from :meth:`init`.
            inputs: ``(B, T)`` ids or ``(B, T, I)`` floats, right-padded.
            max_len: ``L >= T``, the cache length.
            lengths: ``(B,)`` valid lengths (default ``T``); each row's ``pos`` is set to its length, so the
                next :meth:`step` writes over the row's padding (which no later step can see).

        Returns:
            ``(cache, outputs)`` with ``outputs`` ``(B, T, O)``: the head at every position.
        """
        hidden, (k, v) = self.hidden_states(params, inputs)  # (B, T, D), (num_layers, B, T, N, K)
        T = k.shape[2]
        if max_len < T:
            raise ValueError(f"max_len ({max_len}) must be at least the prefix length ({T})")
        pad = [(0, 0), (0, 0), (0, max_len - T), (0, 0), (0, 0)]
        pos = jnp.full(k.shape[1:2], T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
        return KVCache(jnp.pad(k, pad), jnp.pad(v, pad), pos), dense(params["head"], hidden)

    def step(self, params: Params, cache: KVCache, x) -> tuple[KVCache, Array]:
        """Consumes one element per row and returns the head's output at that position.

        The result equals ``apply`` with ``head="per_step"`` at position ``cache.pos`` (and, at each row's last
        element, the ``"last"`` head's output), up to float rounding.

        Args:
            params: from :meth:`init`.
            cache: from :meth:`init_cache`, :meth:`prefill` or a previous step; each row needs ``pos < L``.
            x: ``(B,)`` token ids or ``(B, I)`` floats.

        Returns:
            ``(cache, y)`` with ``y`` ``(B, O)`` and every row's ``pos`` advanced by one.
        """
        x = jnp.asarray(x)
        if x.ndim != (1 if self.vocab_size is not None else 2):
            layout = "(batch,) token ids" if self.vocab_size is not None else f"(batch, {self.input_size})"
            raise ValueError(f"x must have shape {layout}: one element per row, got shape {x.shape}")
        h = self.embed_inputs(params, x[:, None])  # (B, 1, D)
        B, L = h.shape[0], cache.k.shape[2]
        pos = _check_cache_room(cache.pos, L)  # (B,)
        visible = (jnp.arange(L, dtype=jnp.int32)[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, L)
        new_k, new_v = [], []
        for index, block in enumerate(params["blocks"]):
            q, k, v = self._qkv(block, h, pos[:, None])  # each (B, 1, N, K)
            k_all = _write_rows(cache.k[index], k, pos)  # (B, L, N, K)
            v_all = _write_rows(cache.v[index], v, pos)
            new_k.append(k_all)
            new_v.append(v_all)
            attended = _attention(q, k_all, v_all, visible)  # (B, 1, N, K)
            h = h + dense(_out_params(block["attn"]), attended.reshape(B, 1, self.d_model))
            h = h + self._mlp(block, h)
        y = dense(params["head"], _layer_norm(params["ln_f"], h[:, 0]))  # (B, O)
        return KVCache(jnp.stack(new_k), jnp.stack(new_v), pos + 1), y

    # Pieces of a block.

    def _qkv(self, block: Params, x: Array, positions: Array) -> tuple[Array, Array, Array]:
        """Queries, keys (both rotated) and values ``(B, T, N, K)`` from ``x`` ``(B, T, D)``."""
        B, T = x.shape[:2]
        attn = block["attn"]
        qkv = _layer_norm(block["ln1"], x) @ attn["w_qkv"] + attn["b_qkv"]  # (B, T, 3D)
        q, k, v = jnp.split(qkv.reshape(B, T, 3, self.num_heads, self.head_size), 3, axis=2)  # (B, T, 1, N, K)
        cos, sin = rotary_angles(positions, self.head_size, self.rope_base)  # (B, T, 1, K/2)
        return rotate(q[:, :, 0], cos, sin), rotate(k[:, :, 0], cos, sin), v[:, :, 0]

    def _mlp(self, block: Params, x: Array) -> Array:
        """``w_out · gelu(w_in · ln2(x))``: ``(B, T, D)`` -> ``(B, T, D)``."""
        mlp = block["mlp"]
        hidden = jax.nn.gelu(_layer_norm(block["ln2"], x) @ mlp["w_in"] + mlp["b_in"])  # (B, T, M)
        return hidden @ mlp["w_out"] + mlp["b_out"]


# Functions shared by the whole-sequence and streaming paths.


def rotary_angles(positions: Array, head_size: int, base: float) -> tuple[Array, Array]:
    """``cos`` and ``sin`` of the rotary angles ``position * base^(-2i / K)``.

    Args:
        positions: ``(B, T)`` int positions.
        head_size: ``K`` (even).
        base: the frequency base.

    Returns:
        ``(cos, sin)``, each ``(B, T, 1, K/2)`` float32 (the unit axis broadcasts over heads).
    """
    exponents = jnp.arange(0, head_size, 2, dtype=jnp.float32) / jnp.float32(head_size)  # (K/2,)
    inv_freq = jnp.float32(base) ** -exponents  # (K/2,)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, K/2)
    return jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]


def rotate(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates feature pairs ``(x_i, x_{i + K/2})`` of ``x`` ``(B, T, N, K)`` by the rotary angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _attention(q: Array, k: Array, v: Array, visible: Array) -> Array:
    """Softmax attention: ``q`` ``(B, T, N, K)`` over ``k``, ``v`` ``(B, S, N, K)`` where ``visible``.

    ``visible`` broadcasts to ``(B, N, T, S)``. Scores and the softmax are float32.
    """
    scale = jnp.float32(1.0 / math.sqrt(q.shape[-1]))
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # (B, N, T, K), (B, N, S, K): plain batched matmuls
    scores = (q @ jnp.swapaxes(k, -1, -2)) * scale  # (B, N, T, S)
    scores = jnp.where(visible, scores, jnp.float32(-1e30))
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.swapaxes(weights @ v, 1, 2)  # (B, T, N, K)


def _check_cache_room(pos: Array, max_len: int) -> Array:
    """Returns ``pos`` ``(B,)``, raising ``ValueError`` if a row's cache is full (``pos >= max_len``).

    A write past the end would be lost, so a full cache is an error, never a silent clamp: checked at once for
    concrete positions and by :func:`rnnjax._checks.checked_at_run_time` under ``jit``, which costs a step with
    room one comparison.
    """
    if not isinstance(pos, jax.core.Tracer):
        _raise_if_full(np.asarray(pos), max_len)
        return pos
    return _checks.checked_at_run_time(pos, jnp.max(pos) >= max_len, functools.partial(_raise_if_full, max_len=max_len))


def _raise_if_full(pos, max_len: int) -> None:
    pos = np.asarray(pos)
    if pos.size and pos.max() >= max_len:
        raise ValueError(
            f"cache is full: a row is at position {pos.max()} but the cache holds max_len={max_len} elements; "
            "make the cache longer with init_cache(batch_size, max_len) or prefill(..., max_len)"
        )


def _write_rows(buffer: Array, values: Array, pos: Array) -> Array:
    """Writes ``values`` ``(B, 1, N, K)`` into ``buffer`` ``(B, L, N, K)`` at each row's own ``pos`` ``(B,)``."""

    def write(row, value, p):
        return jax.lax.dynamic_update_slice(row, value, (p, jnp.int32(0), jnp.int32(0)))

    return jax.vmap(write)(buffer, values.astype(buffer.dtype), pos)


def _out_params(attn: Params) -> Params:
    return {"w": attn["w_out"], "b": attn["b_out"]}


def _layer_norm_init(size: int) -> Params:
    return {"scale": jnp.ones((size,), jnp.float32), "bias": jnp.zeros((size,), jnp.float32)}


def _layer_norm(params: Params, x: Array, eps: float = 1e-5) -> Array:
    """Layer norm over the last axis: ``(..., D)`` -> ``(..., D)``."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + jnp.float32(eps)) * params["scale"] + params["bias"]


def _last_index(lengths) -> Array:
    """Index of each row's last valid step, ``(B,)`` int32 (0 for empty rows)."""
    return jnp.maximum(jnp.asarray(lengths).astype(jnp.int32) - 1, 0)
