"""Flax NNX modules for rnnjax cells and layers.

:class:`Recurrent` wraps any cell or layer (:class:`rnnjax.protocol.SequenceCore`, or an object with ``init``,
``initial_carry``, ``step`` and ``input_size``), runs it with :func:`rnnjax.unroll`, holds its parameters as
``nnx.Param`` leaves, and calls the pure core. The parameter tree is exactly the one ``core.init`` returns,
under the attribute ``params``::

    model = rnnjax.nnx.Recurrent(rnnjax.LSTM(hidden_size=16), 8, rngs=nnx.Rngs(0))
    carry, ys = model(xs, lengths=lengths)                  # xs: (*B, T, 8) -> ys: (*B, T, 16)
    nnx.state(model, nnx.Param)["params"]["w_ih"]           # Param of shape (8, 64), as LSTM.init names it
    model.core_params()                                     # the plain dict of arrays core functions take

Named classes (:class:`SimpleRNN`, :class:`LSTM`, :class:`Stack`, ...) are thin subclasses made by
:func:`adapter_class`, which builds the core object from keyword options::

    model = rnnjax.nnx.LSTM(8, 16, peepholes=True, rngs=nnx.Rngs(0))
    stack = rnnjax.nnx.Stack(8, [rnnjax.GRU(hidden_size=32)] * 2, dropout=0.1, rngs=nnx.Rngs(0, dropout=1))

Dropout (a :class:`rnnjax.Stack` with ``dropout > 0``, or any core whose ``uses_dropout`` is true)
draws its keys from the ``'dropout'`` stream of the ``rngs`` given to the constructor and is on unless the
module is deterministic: ``model.eval()`` / ``model.train()`` set the ``deterministic`` attribute, as for
``nnx.Dropout``; ``nnx.view(model, deterministic=True)`` and a ``deterministic=`` call argument work too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rnnjax import cells, layers, unrolling
from rnnjax.protocol import SequenceCore
from rnnjax.types import Array, Carry, DType, Params, PRNGKey

__all__ = [
    "GRU",
    "LSTM",
    "Bidirectional",
    "JordanRNN",
    "LRU",
    "MinGRU",
    "MinLSTM",
    "Recurrent",
    "SimpleRNN",
    "Stack",
    "adapter_class",
]


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _unwrap(tree: Params) -> Params:
    """Replaces every ``nnx.Variable`` leaf of ``tree`` by its value (other leaves pass through)."""
    return jax.tree.map(lambda v: v.get_value() if _is_variable(v) else v, tree, is_leaf=_is_variable)


def _check_protocol(core) -> None:
    """Raises ``TypeError`` unless ``core`` is a cell or layer (:class:`rnnjax.protocol.SequenceCore`)."""
    if isinstance(core, SequenceCore):
        return
    missing = [
        name for name in ("init", "input_size", "initial_carry", "step") if not callable(getattr(core, name, None))
    ]
    if missing:
        raise TypeError(
            f"Recurrent wraps an rnnjax cell or layer (rnnjax.protocol.SequenceCore), such as "
            f"rnnjax.LSTM(hidden_size=...), or an object with init, initial_carry, step and input_size; "
            f"got {type(core).__name__}, which lacks {missing}"
        )


def _uses_dropout(core) -> bool:
    return isinstance(core, SequenceCore) and core.uses_dropout


def _can_stream(core) -> bool:
    return core.can_stream if isinstance(core, SequenceCore) else True


def _check_params(core, params: Params) -> Params:
    """Checks ``params`` against the tree structure and shapes ``core.init`` makes; returns it as arrays.

    Args:
        core: a cell or layer.
        params: a pytree of arrays (or of ``nnx.Variable``), as ``core.init`` returns.

    Returns:
        ``params`` with ``jax.Array`` leaves.
    """
    params = jax.tree.map(jnp.asarray, _unwrap(params))
    try:
        input_size = int(core.input_size(params))
    except (KeyError, IndexError, TypeError, AttributeError) as error:
        raise ValueError(
            f"params do not look like {type(core).__name__}.init's output: {type(error).__name__}: {error}"
        ) from error
    expected = jax.eval_shape(lambda: core.init(jax.random.key(0), input_size))
    if jax.tree.structure(params) != jax.tree.structure(expected):
        raise ValueError(
            f"params must have the structure {type(core).__name__}.init gives, {jax.tree.structure(expected)}, "
            f"got {jax.tree.structure(params)}"
        )
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected)):
        if got.shape != want.shape:
            raise ValueError(f"params{jax.tree_util.keystr(path)} must have shape {want.shape}, got {got.shape}")
    return params


class Recurrent(nnx.Module):
    """An NNX module around any rnnjax cell or layer; parameters are ``nnx.Param`` leaves of ``params``.

    Cells and layers alike run with :func:`rnnjax.unroll`; a call returns ``(final_carry, ys)``. ``step`` and
    ``initial_carry`` stream one element at a time where the wrapped object can (cells, and
    :class:`rnnjax.Stack` of cells).

    Attributes:
        core: the wrapped cell or layer (static: hyperparameters only).
        params: the parameter tree of ``core.init`` with ``nnx.Param`` leaves (same names and nesting).
        time_major: layout of ``xs`` and ``ys``: ``(T, *B, F)`` if set, else ``(*B, T, F)``.
        deterministic: turns dropout off; set by ``.eval()`` / ``.train()`` and ``nnx.view``.
        rng_collection: the ``nnx.Rngs`` stream dropout keys come from.
        dropout_rngs: the ``nnx.RngStream`` forked from that stream, or ``None`` when there is no dropout.

    Example:
        >>> model = Recurrent(rnnjax.GRU(hidden_size=8), 3, rngs=nnx.Rngs(0))
        >>> carry, ys = model(jnp.ones((2, 5, 3)), lengths=jnp.array([5, 2]))
        >>> ys.shape, carry.h.shape
        ((2, 5, 8), (2, 8))
    """

    def __init__(
        self,
        core,
        input_size: int | None = None,
        *,
        rngs: nnx.Rngs | None = None,
        params: Params | None = None,
        time_major: bool | None = None,
        deterministic: bool = False,
        rng_collection: str = "dropout",
    ):
        """Initialises parameters with ``core.init``, or takes existing ``params``.

        Args:
            core: an object with the cell or the layer protocol, e.g. ``rnnjax.LSTM(hidden_size=16)``.
            input_size: ``I``, the number of input features; may be left out when ``params`` is given (if
                given, it must match them).
            rngs: ``nnx.Rngs``; its ``'params'`` stream initialises the parameters (unless ``params`` is
                given) and its ``rng_collection`` stream drives dropout.
            params: existing core parameters (a pytree as ``core.init`` returns) instead of new ones.
            time_major: layout of ``xs`` / ``ys``. ``None``: a layer's own ``time_major`` field, ``False`` for a
                cell.
            deterministic: start with dropout off (``.train()`` turns it on).
            rng_collection: name of the ``nnx.Rngs`` stream for dropout keys.
        """
        _check_protocol(core)
        if params is None:
            if input_size is None or rngs is None:
                raise TypeError("Recurrent needs input_size and rngs to create parameters, or existing params")
            params = core.init(rngs.params(), input_size)
        else:
            params = _check_params(core, params)
            if input_size is not None and input_size != core.input_size(params):
                raise ValueError(f"input_size is {input_size}, but params expect {core.input_size(params)} features")
        self.core = core
        self.params = nnx.data(jax.tree.map(nnx.Param, params))
        self.time_major = bool(getattr(core, "time_major", False) if time_major is None else time_major)
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        self.dropout_rngs = nnx.data(None)
        if _uses_dropout(core) and rngs is not None:
            try:
                self.dropout_rngs = rngs[rng_collection].fork()
            except KeyError:  # no such stream and no default: dropout needs rngs at call time
                pass

    @classmethod
    def from_params(cls, core, params: Params, *, rngs: nnx.Rngs | None = None, **options) -> Recurrent:
        """Builds a :class:`Recurrent` around ``core`` holding existing core ``params``.

        Args:
            core: a cell or layer.
            params: a pytree as ``core.init`` returns (checked against its structure and shapes).
            rngs: optional ``nnx.Rngs`` for dropout.
            **options: ``time_major``, ``deterministic``, ``rng_collection``, as for the constructor.

        Returns:
            A generic :class:`Recurrent` (also when called on a named subclass).
        """
        return Recurrent(core, rngs=rngs, params=params, **options)

    # Parameters.

    def core_params(self) -> Params:
        """The parameters as the plain pytree of arrays the core takes (``core.init``'s names and nesting)."""
        return _unwrap(self.params)

    def load_params(self, params: Params) -> None:
        """Replaces the parameter values in place by ``params`` (same structure and shapes, as from init)."""
        new = _check_params(self.core, params)
        current = jax.tree.leaves(self.params, is_leaf=_is_variable)
        for variable, value in zip(current, jax.tree.leaves(new)):
            variable.set_value(value)

    @property
    def input_size(self) -> int:
        """``I``, read off the parameters."""
        return self.core.input_size(self.core_params())

    @property
    def output_size(self) -> int:
        """``O``, the feature size of ``ys`` (per direction for a Bidirectional with ``merge="none"``)."""
        return self.core.output_size

    # Running.

    def __call__(
        self,
        xs,
        carry: Carry | None = None,
        *,
        lengths=None,
        reverse: bool = False,
        unroll: int | bool = 1,
        remat: bool = False,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | PRNGKey | None = None,
    ) -> tuple[Carry, Any]:
        """Runs the wrapped cell or layer over a sequence.

        Args:
            xs: inputs ``(*B, T, I)``, or ``(T, *B, I)`` when ``time_major``.
            carry: initial carry with leaves ``(*B, ...)``, or ``None`` for zeros.
            lengths: optional integer ``(*B,)`` valid lengths; outputs past them are zero.
            reverse: run each row from its last valid step to its first (outputs stay at their positions).
                For a layer, the whole layer runs on the reversed rows.
            unroll, remat: as for :func:`rnnjax.unroll`.
            deterministic: overrides the ``deterministic`` attribute for this call.
            rngs: overrides the dropout key source for this call: ``nnx.Rngs``, ``nnx.RngStream`` or a key.

        Returns:
            ``(final_carry, ys)`` with ``ys`` ``(*B, T, O)`` (``(T, *B, O)`` when ``time_major``).
        """
        return unrolling.unroll(
            self.core,
            self.core_params(),
            xs,
            carry,
            lengths=lengths,
            reverse=reverse,
            time_major=self.time_major,
            unroll=unroll,
            remat=remat,
            dropout_key=self._dropout_key(deterministic, rngs),
        )

    def step(self, carry: Carry, x) -> tuple[Carry, Array]:
        """One streaming step: ``x`` ``(*B, I)`` -> ``(carry, y)`` with ``y`` ``(*B, O)`` (no dropout).

        Raises:
            TypeError: the wrapped object cannot stream (e.g. :class:`rnnjax.Bidirectional`).
        """
        if not _can_stream(self.core):
            raise TypeError(f"{type(self.core).__name__} needs the whole sequence and cannot stream with step")
        return self.core.step(self.core_params(), carry, x)

    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32) -> Carry:
        """The zero carry for a batch of shape ``batch_shape``, leaves ``(*B, ...)`` in ``dtype``."""
        return self.core.initial_carry(batch_shape, dtype)

    # Dropout and modes.

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by ``nnx.view``.

        Args:
            deterministic: if True, disables dropout.
        """
        if deterministic is not None:
            self.deterministic = deterministic

    def _dropout_key(self, deterministic: bool | None, rngs) -> PRNGKey | None:
        """The key for this call's dropout, or ``None`` when dropout is off or absent."""
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or not _uses_dropout(self.core):
            return None
        source = self.dropout_rngs if rngs is None else rngs
        if source is None:
            raise ValueError(
                f"{type(self.core).__name__} applies dropout in training mode but has no '{self.rng_collection}' "
                f"random stream: pass rngs=nnx.Rngs({self.rng_collection}=...) to the constructor or the call, or "
                "call .eval() (or pass deterministic=True) to turn dropout off"
            )
        if isinstance(source, nnx.Rngs):
            return source[self.rng_collection]()
        if isinstance(source, nnx.RngStream):
            return source()
        return source


def adapter_class(core_class: type, *positional: str, name: str | None = None) -> type[Recurrent]:
    """Makes a named :class:`Recurrent` subclass whose constructor builds ``core_class`` from its options.

    The class is called as ``Name(in_features, *args, rngs=..., **options)``: ``args`` fill the fields named in
    ``positional``; ``time_major``, ``deterministic``, ``rng_collection`` and ``params`` go to
    :class:`Recurrent`; every other option goes to ``core_class``.

    Args:
        core_class: a cell or layer class, e.g. ``rnnjax.LSTM``.
        *positional: names of ``core_class`` fields that may be given positionally after ``in_features``.
        name: the class name (default: ``core_class.__name__``).

    Returns:
        The subclass of :class:`Recurrent`.

    Example:
        >>> MyCellNNX = adapter_class(MyCell, "hidden_size")  # MyCell: any class following the cell protocol
        >>> model = MyCellNNX(4, 32, rngs=nnx.Rngs(0))
    """
    name = name or core_class.__name__
    signature = ", ".join(("in_features", *positional))

    def __init__(
        self,
        in_features: int | None = None,
        *args,
        rngs: nnx.Rngs | None = None,
        params: Params | None = None,
        time_major: bool | None = None,
        deterministic: bool = False,
        rng_collection: str = "dropout",
        **options,
    ):
        if len(args) > len(positional):
            raise TypeError(f"{name}({signature}, ...) takes at most {len(positional) + 1} positional arguments")
        for field, value in zip(positional, args):
            if field in options:
                raise TypeError(f"{name} got {field!r} both positionally and as a keyword")
            options[field] = value
        Recurrent.__init__(
            self,
            core_class(**options),
            in_features,
            rngs=rngs,
            params=params,
            time_major=time_major,
            deterministic=deterministic,
            rng_collection=rng_collection,
        )

    __init__.__doc__ = f"Builds ``{core_class.__name__}(**options)``; see :func:`adapter_class` for the arguments."
    doc = (
        f"NNX module for :class:`{core_class.__module__}.{core_class.__name__}`: ``{name}({signature}, *, rngs, "
        f"**options)``.\n\nA :class:`Recurrent` whose core is built from ``options``; see both classes."
    )
    module = sys._getframe(1).f_globals.get("__name__", __name__)  # the caller's module, as namedtuple does
    return type(name, (Recurrent,), {"__init__": __init__, "__doc__": doc, "__module__": module})


SimpleRNN = adapter_class(cells.SimpleRNN, "hidden_size")
JordanRNN = adapter_class(cells.JordanRNN, "hidden_size")
LSTM = adapter_class(cells.LSTM, "hidden_size")
GRU = adapter_class(cells.GRU, "hidden_size")
MinGRU = adapter_class(cells.MinGRU, "hidden_size")
MinLSTM = adapter_class(cells.MinLSTM, "hidden_size")
LRU = adapter_class(cells.LRU, "hidden_size")
Bidirectional = adapter_class(layers.Bidirectional, "forward", "backward")
Stack = adapter_class(layers.Stack, "layers")
