"""Sequence layers built from cells: :class:`Bidirectional` and :class:`Stack`.

Layers follow the same protocol as cells (:class:`rnnjax.protocol.SequenceCore`): ``init``, ``initial_carry``,
``input_size`` and ``sequence``, so :func:`rnnjax.unroll` runs a layer exactly as it runs a cell, and a layer
may hold cells or other layers. They declare their parts with ``children()``. ``apply`` is
:func:`rnnjax.unroll` with the layer's own ``time_major``::

    params = layer.init(key, input_size)
    final_carry, ys = layer.apply(params, xs, carry=None, *, lengths=None, ...)   # = unroll(layer, params, xs, ...)

``xs`` is ``(*B, T, I)``, or ``(T, *B, I)`` when the layer's ``time_major`` is set; ``ys`` has the same layout.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax import _checks, unrolling
from rnnjax.protocol import Child, SequenceCore
from rnnjax.types import Array, Carry, DType, Params, PRNGKey

MergeMode = Literal["concat", "sum", "mean", "none"]
MERGE_MODES: tuple[str, ...] = typing.get_args(MergeMode)


class Layer(SequenceCore):
    """Base of the layers: :meth:`apply` runs the layer with :func:`rnnjax.unroll` in its own layout."""

    time_major: bool

    def apply(
        self,
        params: Params,
        xs,
        carry: Carry | None = None,
        *,
        lengths=None,
        dropout_key: PRNGKey | None = None,
        unroll: int | bool = 1,
        remat: bool | int = False,
    ) -> tuple[Carry, Any]:
        """Runs the layer over a sequence: :func:`rnnjax.unroll` with ``time_major=self.time_major``.

        Args:
            params: from :meth:`init`.
            xs: ``(*B, T, I)`` (``(T, *B, I)`` when ``time_major``).
            carry: initial carry, or ``None`` for zeros.
            lengths: optional ``(*B,)`` valid lengths.
            dropout_key: PRNG key for dropout; ``None`` (evaluation) applies none.
            unroll, remat: as for :func:`rnnjax.unroll`.

        Returns:
            ``(final_carry, ys)`` with ``ys`` ``(*B, T, O)`` (``(T, *B, O)`` when ``time_major``).
        """
        return unrolling.unroll(
            self,
            params,
            xs,
            carry,
            lengths=lengths,
            time_major=self.time_major,
            unroll=unroll,
            remat=remat,
            dropout_key=dropout_key,
        )


class BidirectionalState(NamedTuple):
    """Carry of :class:`Bidirectional`."""

    forward: Carry  # forward cell's carry after each row's last valid step
    backward: Carry  # backward cell's carry after it has processed each row's first step


@dataclasses.dataclass(frozen=True)
class Bidirectional(Layer):
    """Runs one cell forward and another backward (within each row's length) and merges their outputs.

    Parameters: ``{"forward": forward cell's params, "backward": backward cell's params}``.

    Attributes:
        forward: the cell run forward in time.
        backward: the cell run in reverse; ``None`` means the same hyperparameters as ``forward`` (its
            parameters are still separate).
        merge: ``"concat"`` (``O = O_f + O_b``), ``"sum"``, ``"mean"`` (both need ``O_f == O_b``) or ``"none"``
            (``ys`` is the pair ``(ys_forward, ys_backward)``).
        time_major: layout of ``xs`` and ``ys``.

    Example:
        >>> layer = rnnjax.Bidirectional(rnnjax.GRU(hidden_size=8))
        >>> params = layer.init(jax.random.key(0), input_size=3)
        >>> carry, ys = layer.apply(params, jnp.ones((2, 5, 3)), lengths=jnp.array([5, 2]))
        >>> ys.shape
        (2, 5, 16)
    """

    forward: Any
    backward: Any = None
    merge: MergeMode = "concat"
    time_major: bool = False

    def __post_init__(self):
        _checks.check_choice(self.merge, MERGE_MODES, "merge")
        if self.backward is None:
            object.__setattr__(self, "backward", self.forward)
        if self.merge in ("sum", "mean") and self.forward.output_size != self.backward.output_size:
            raise ValueError(
                f"merge={self.merge!r} needs equal output sizes, got forward {self.forward.output_size} and "
                f"backward {self.backward.output_size}"
            )

    @property
    def output_size(self) -> int:
        """``O``: per direction for ``"none"``, the sum for ``"concat"``."""
        if self.merge == "concat":
            return self.forward.output_size + self.backward.output_size
        return self.forward.output_size

    def init(self, key: PRNGKey, input_size: int) -> Params:
        k_f, k_b = jax.random.split(key)
        return {"forward": self.forward.init(k_f, input_size), "backward": self.backward.init(k_b, input_size)}

    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32) -> BidirectionalState:
        return BidirectionalState(
            self.forward.initial_carry(batch_shape, dtype), self.backward.initial_carry(batch_shape, dtype)
        )

    def input_size(self, params: Params) -> int:
        return self.forward.input_size(params["forward"])

    def children(self) -> tuple[Child, ...]:
        return (Child(("forward",), self.forward), Child(("backward",), self.backward, reverse=True))

    def replace_children(self, cores: Sequence[Any]) -> Bidirectional:
        forward, backward = cores
        return dataclasses.replace(self, forward=forward, backward=backward)

    def sequence(self, params, carry, xs, mask, *, unroll=1, remat=False, dropout_key=None):
        """Both directions over time-major ``xs`` ``(T, *B, I)``; the backward one within each row's length.

        Returns:
            ``(BidirectionalState, ys)`` with ``ys`` ``(T, *B, O)``, or a pair of such arrays for ``"none"``.
        """
        lengths = None if mask is None else jnp.sum(mask, axis=0, dtype=jnp.int32)  # (*B,)
        key_f, key_b = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        options = dict(unroll=unroll, remat=remat)
        carry_f, ys_f = unrolling.run_time_major(
            self.forward, params["forward"], carry.forward, xs, mask, dropout_key=key_f, **options
        )
        xs_b = unrolling.reverse_sequences(xs, lengths)  # (T, *B, I), each row reversed within its length
        carry_b, ys_b = unrolling.run_time_major(
            self.backward, params["backward"], carry.backward, xs_b, mask, dropout_key=key_b, **options
        )
        ys_b = unrolling.reverse_sequences(ys_b, lengths)  # back to time order
        return BidirectionalState(carry_f, carry_b), merge_directions(ys_f, ys_b, self.merge)

    def last_outputs(self, ys: Array, lengths) -> Array:
        """The forward half at each row's last valid step, the backward half (``"concat"``) at step 0."""
        last = super().last_outputs(ys, lengths)  # (B, O)
        if self.merge != "concat":
            return last
        split = self.forward.output_size
        return jnp.concatenate([last[:, :split], ys[:, 0, split:]], axis=-1)  # (B, O)


def merge_directions(ys_f: Array, ys_b: Array, merge: str):
    """Merges forward and backward outputs ``(..., O)`` by ``merge`` (see :class:`Bidirectional`)."""
    if merge == "concat":
        return jnp.concatenate([ys_f, ys_b], axis=-1)
    if merge == "sum":
        return ys_f + ys_b
    if merge == "mean":
        return (ys_f + ys_b) * 0.5
    return ys_f, ys_b


class StackState(NamedTuple):
    """Carry of :class:`Stack`."""

    layers: tuple  # one carry per layer, bottom first


@dataclasses.dataclass(frozen=True)
class Stack(Layer):
    """Several recurrent layers, each feeding the next, with dropout between them and optional residuals.

    Parameters: ``{"layers": [params of layer 0, params of layer 1, ...]}``.

    Dropout (rate ``dropout``) is applied to the outputs of every layer but the last, as in PyTorch, and only
    when :meth:`apply` is given a ``dropout_key``. A residual connection ``y = layer(x) + x`` is added around
    each layer whose input and output sizes match (with ``residual=True``), typically every layer but the
    first; outputs past each row's length stay zero. A last :class:`Bidirectional` layer with ``merge="none"``
    returns the pair ``(ys_forward, ys_backward)`` and gets no residual.

    A stack of cells (no :class:`Bidirectional` layer) is itself a cell: :meth:`step` streams one element at
    a time through all layers and gives the same numbers as :meth:`apply` without dropout.

    Attributes:
        layers: cells or :class:`Bidirectional` layers, bottom first (a list is converted to a tuple).
        dropout: dropout rate between layers, in ``[0, 1)``.
        residual: add residual connections where sizes match.
        time_major: layout of ``xs`` and ``ys``.

    Example:
        >>> stack = rnnjax.Stack([rnnjax.LSTM(hidden_size=32)] * 2, dropout=0.1)
        >>> params = stack.init(jax.random.key(0), input_size=8)
        >>> carry, ys = stack.apply(params, jnp.ones((4, 20, 8)), dropout_key=jax.random.key(1))
        >>> ys.shape
        (4, 20, 32)
    """

    layers: Sequence[Any]
    dropout: float = 0.0
    residual: bool = False
    time_major: bool = False

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("layers must hold at least one cell or layer, got none")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        for index, layer in enumerate(self.layers[:-1]):
            if isinstance(layer, Bidirectional) and layer.merge == "none":
                raise ValueError(f"layers[{index}] is Bidirectional with merge='none', which cannot feed a layer")

    @property
    def output_size(self) -> int:
        return self.layers[-1].output_size

    def init(self, key: PRNGKey, input_size: int) -> Params:
        _checks.check_positive_int(input_size, "input_size")
        keys = jax.random.split(key, len(self.layers))
        params, size = [], input_size
        for layer, k in zip(self.layers, keys):
            params.append(layer.init(k, size))
            size = layer.output_size
        return {"layers": params}

    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32) -> StackState:
        return StackState(tuple(layer.initial_carry(batch_shape, dtype) for layer in self.layers))

    def input_size(self, params: Params) -> int:
        self._check_params(params)  # the first thing unroll reads, so a wrong tree is named here
        return self.layers[0].input_size(params["layers"][0])

    def _check_params(self, params: Params) -> None:
        layers = params.get("layers") if isinstance(params, dict) else None
        if not isinstance(layers, (list, tuple)) or len(layers) != len(self.layers):
            if isinstance(layers, (list, tuple)):
                got = f"{len(layers)} entries"
            else:
                got = f"keys {sorted(params)}" if isinstance(params, dict) else type(params).__name__
            raise ValueError(
                f"params must be {{'layers': [...]}} with {len(self.layers)} entries, as init returns; got {got}"
            )

    def children(self) -> tuple[Child, ...]:
        return tuple(Child(("layers", index), layer) for index, layer in enumerate(self.layers))

    def replace_children(self, cores: Sequence[Any]) -> Stack:
        return dataclasses.replace(self, layers=tuple(cores))

    @property
    def can_stream(self) -> bool:
        return all(_can_stream(layer) for layer in self.layers)

    @property
    def uses_dropout(self) -> bool:
        return self.dropout > 0.0 or super().uses_dropout

    def last_outputs(self, ys: Array, lengths) -> Array:
        top = self.layers[-1]
        return top.last_outputs(ys, lengths) if isinstance(top, SequenceCore) else super().last_outputs(ys, lengths)

    def sequence(self, params, carry, xs, mask, *, unroll=1, remat=False, dropout_key=None):
        """The layers bottom to top over time-major ``xs`` ``(T, *B, I)``, each over the whole sequence.

        Dropout (with ``dropout_key``) between layers; residuals where sizes match; outputs past each row's
        length stay zero.

        Returns:
            ``(StackState, ys)`` with ``ys`` ``(T, *B, O)``.
        """
        _checks.check_core_params(self, params, xs.shape[-1])  # names e.g. params['layers'][1]['w_hh']
        use_dropout = dropout_key is not None and self.dropout > 0.0
        keys = jax.random.split(dropout_key, len(self.layers)) if use_dropout else [None] * len(self.layers)
        hidden, final = xs, []
        for index, (layer, layer_params, layer_carry) in enumerate(zip(self.layers, params["layers"], carry.layers)):
            layer_carry, ys = unrolling.run_time_major(
                layer, layer_params, layer_carry, hidden, mask, unroll=unroll, remat=remat, dropout_key=None
            )
            if self.residual and not isinstance(ys, tuple) and ys.shape[-1] == hidden.shape[-1]:
                ys = ys + hidden.astype(ys.dtype)
                if mask is not None:  # padding in the layer's input must not leak past each row's length
                    ys = jnp.where(unrolling.expand_to(mask, ys), ys, jnp.zeros_like(ys))
            if use_dropout and index < len(self.layers) - 1:
                ys = dropout(keys[index], ys, self.dropout)
            final.append(layer_carry)
            hidden = ys  # (T, *B, O_l)
        return StackState(tuple(final)), hidden

    def step(self, params: Params, carry: StackState, x: Array) -> tuple[StackState, Array]:
        """Streams one element ``x`` ``(*B, I)`` through every layer (no dropout): ``y`` ``(*B, O)``."""
        x = _checks.as_float_array(x, "x")
        _checks.check_rank(x, "x", 1, "(*batch, input_size)")
        _checks.check_core_params(self, params, x.shape[-1])  # the whole tree, so paths start at params['layers']
        for index, layer in enumerate(self.layers):
            if not _can_stream(layer):
                raise ValueError(f"layers[{index}] ({type(layer).__name__}) needs the whole sequence and cannot stream")
        new_carry = []
        for layer, layer_params, layer_carry in zip(self.layers, params["layers"], carry.layers):
            layer_carry, y = layer.step(layer_params, layer_carry, x)
            if self.residual and y.shape[-1] == x.shape[-1]:
                y = y + jnp.asarray(x).astype(y.dtype)
            new_carry.append(layer_carry)
            x = y  # (*B, O_l)
        return StackState(tuple(new_carry)), x


def _can_stream(core) -> bool:
    """Whether ``core`` has a streaming ``step`` (an object with only the step protocol always has)."""
    return core.can_stream if isinstance(core, SequenceCore) else True


def dropout(key: PRNGKey, x: Array, rate: float) -> Array:
    """Inverted dropout: zeroes each entry of ``x`` with probability ``rate`` and scales the rest."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))
