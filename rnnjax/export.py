"""Exporting a trained model for deployment: a serialised StableHLO program, or an ONNX graph.

Two programs can be exported from a recurrent :class:`rnnjax.models.SequenceModel` (any cell that streams) or a
:class:`rnnjax.attention.Transformer`, with the trained parameters baked in as constants::

    step:      (state, x)       -> (new_state, y)        one element per row; the state in, the state out
    sequence:  (x, lengths)     -> (final_state, y)      whole right-padded rows with their lengths

``state`` is a flat ``dict`` of arrays named after the model's carry (``{"h": (B, H), "c": (B, H)}`` for an LSTM,
``{"layers.0.h": ..., "layers.1.h": ...}`` for a stack, ``{"k", "v", "pos"}`` for the transformer's key/value
cache, :class:`rnnjax.attention.KVCache`); its initial value is all zeros (:func:`initial_state`). ``x`` is
``(B,)`` token ids or ``(B, I)`` floats for a step, ``(B, T)`` or ``(B, T, I)`` for a sequence; ``y`` is what
the model's ``step`` / ``apply`` returns, ``(B, O)``, ``(B, T, O)`` or ``(B, O)``. A transformer's sequence
program returns an empty state (stream after a prompt by feeding it through the step program).

* :func:`export_stablehlo` -> ``bytes`` (``jax.export``): :func:`load_stablehlo` (or plain
  ``jax.export.deserialize(data).call``) runs it without rnnjax. Batch and time are symbolic by default.
* :func:`export_onnx` -> an ``.onnx`` file (``jax2onnx``); :func:`onnx_callable` runs it with onnxruntime.
  Inputs are named ``state.<name>``, ``x``, ``lengths``; outputs ``new_state.<name>`` and ``y``.

How the programs are traced (what differs from calling the model in Python):

* The pure-JAX path: the native CPU kernels of the LSTM and GRU are FFI custom calls that exist only in an
  rnnjax process, so tracing runs under :func:`rnnjax.kernels.native.use_native` ``(False)``; the cuDNN LSTM
  (a custom call ``jax.export`` does not serialise) under :func:`rnnjax.kernels.cudnn.use_mode` ``("never")``.
* No host callbacks: rnnjax checks run-time values (``lengths`` in ``[0, T]``, token ids, a full key/value
  cache) with a host callback (:func:`rnnjax._checks.checked_at_run_time`), which neither a serialised program
  nor ONNX can carry; it is replaced by the identity while tracing. The exported programs instead clip
  ``lengths`` to ``[0, T]``; token ids must lie in ``[0, V)`` and a cache row's ``pos`` below its length ``L``
  (the caller's contract, unchecked).
* Symbolic batch: rnnjax's trace-time checks need concrete batch sizes, so every program is the model's
  program for one row, ``jax.vmap`` -ed over a batch axis that the model's Python code never sees.
* ONNX only: jax2onnx 0.17 converts ``lax.scan`` and ``while`` but not the minGRU/minLSTM fused kernel (a
  ``fori_loop`` inside a ``custom_vjp`` whose body closes over traced arrays) nor ``lax.associative_scan``
  (interior padding), and not the batched scatter that ``vmap`` of ``dynamic_update_slice`` makes in the
  transformer's cache write. So a recurrent model's ONNX sequence program is the reference semantics of
  :func:`rnnjax.unrolling.masked_scan` over the core's ``step`` (``sequence_path="stepped"``, equal to the fused
  path to float rounding), and the cache write is a select (``where(position == pos, new, old)``), equal to
  the model's write for ``pos < L``.

Shape letters: ``B`` batch, ``T`` time, ``I`` input features, ``O`` outputs, ``L`` cache length.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import _checks, attention, unrolling
from rnnjax.attention import Transformer
from rnnjax.blocks import dense
from rnnjax.kernels import cudnn, native
from rnnjax.models import SequenceModel
from rnnjax.types import Array, Params

Kind = Literal["step", "sequence"]
KINDS: tuple[str, ...] = ("step", "sequence")
SequencePath = Literal["model", "stepped"]
DEFAULT_MAX_LEN = 256
"""Key/value cache length ``L`` of an exported transformer step when none is given."""

_tracing_lock = threading.Lock()  # the substitutions below are module attributes: one export traces at a time


# The state as a flat dict of named arrays.


def initial_state(model, batch_size: int, *, max_len: int | None = None) -> dict[str, np.ndarray]:
    """The zero state an exported step program starts from, as NumPy arrays named as the program's inputs.

    Args:
        model: the exported model.
        batch_size: ``B``.
        max_len: the transformer's cache length ``L`` (the one given to the export; default
            :data:`DEFAULT_MAX_LEN`); ignored by recurrent models.

    Returns:
        ``{name: zeros}``, e.g. ``{"h": (B, H), "c": (B, H)}`` float32 for an LSTM.
    """
    names, _, _ = _state_layout(model, max_len)
    template = _state_template(model, batch_size, max_len)
    return {name: np.zeros(leaf.shape, leaf.dtype) for name, leaf in zip(names, jax.tree.leaves(template))}


def _state_template(model, batch_size: int, max_len: int | None):
    if isinstance(model, Transformer):
        return model.init_cache(batch_size, max_len or DEFAULT_MAX_LEN)
    return model.initial_carry(batch_size)


def _state_layout(model, max_len: int | None) -> tuple[list[str], Any, list[int | None]]:
    """``(names, treedef, batch_axes)`` of the model's streaming state (batch axis read off batch sizes 1, 2)."""
    one = jax.eval_shape(lambda: _state_template(model, 1, max_len))
    two = jax.eval_shape(lambda: _state_template(model, 2, max_len))
    paths, treedef = jax.tree_util.tree_flatten_with_path(one)
    names = [_path_name(path) for path, _ in paths]
    axes = []
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        differ = [i for i, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n]
        axes.append(differ[0] if differ else None)
    return names, treedef, axes


def _path_name(path) -> str:
    parts = []
    for key in path:
        for attribute in ("name", "key", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
    return ".".join(parts)


# The programs, for one row, vmapped over the batch.


def _check_model(model) -> None:
    if isinstance(model, Transformer):
        return
    if not isinstance(model, SequenceModel):
        raise TypeError(f"model must be a SequenceModel or a Transformer, got {type(model).__name__}")


def _step_program(model, params: Params, max_len: int | None) -> Callable:
    """``step(state: dict, x) -> (state: dict, y)`` over any batch size."""
    names, treedef, axes = _state_layout(model, max_len)
    if not getattr(getattr(model, "core", None), "can_stream", True):
        raise ValueError(f"the model's core ({type(model.core).__name__}) needs whole sequences and cannot stream")

    def one_row(state, x):  # state leaves and x without their batch axis
        leaves = [state[n] if axis is None else jnp.expand_dims(state[n], axis) for n, axis in zip(names, axes)]
        carry, y = model.step(params, jax.tree.unflatten(treedef, leaves), x[None])
        flat = jax.tree.leaves(carry)
        return {n: leaf if axis is None else leaf.squeeze(axis) for n, leaf, axis in zip(names, flat, axes)}, y[0]

    state_axes = dict(zip(names, axes))
    return jax.vmap(one_row, in_axes=(state_axes, 0), out_axes=(state_axes, 0))


def _sequence_program(model, params: Params, path: SequencePath) -> Callable:
    """``sequence(x, lengths) -> (final_state: dict, y)`` over any batch size (and time, where it traces)."""
    if isinstance(model, Transformer):
        state_axes = {}

        def run(inputs, lengths):
            return {}, model.apply(params, inputs, lengths=lengths)

    else:
        names, _, axes = _state_layout(model, None)
        state_axes = dict(zip(names, axes))
        stepped = path == "stepped" and getattr(model.core, "can_stream", True)

        def run(inputs, lengths):
            if stepped:
                carry, y = _stepped_apply(model, params, inputs, lengths)
            else:
                carry, y = model.apply_with_carry(params, inputs, None, lengths=lengths)
            flat = jax.tree.leaves(carry)
            return {n: leaf if axis is None else leaf.squeeze(axis) for n, leaf, axis in zip(names, flat, axes)}, y

    def one_row(inputs, length):
        length = jnp.clip(length, 0, inputs.shape[0]).astype(jnp.int32)
        state, y = run(inputs[None], length[None])
        return state, y[0]

    return jax.vmap(one_row, out_axes=(state_axes, 0))


def _stepped_apply(model: SequenceModel, params: Params, inputs, lengths) -> tuple[Any, Array]:
    """``model.apply_with_carry(params, inputs, None, lengths=lengths)`` with the core run as a masked scan of
    its ``step`` (:func:`rnnjax.unrolling.masked_scan`, the reference every fast path reproduces)."""
    xs = model.embed_inputs(params, inputs)  # (B, T, E)
    B, T = xs.shape[:2]
    mask = unrolling.time_mask(lengths, T)  # (T, B)
    carry = model.initial_carry(B)
    carry, ys = unrolling.masked_scan(model.core.step, params["core"], carry, jnp.swapaxes(xs, 0, 1), mask)
    ys = jnp.swapaxes(ys, 0, 1)  # (B, T, H)
    if model.head == "last":
        ys = model.core.last_outputs(ys, lengths)  # (B, H)
    return carry, dense(params["head"], ys)  # (B, O) or (B, T, O)


def _input_specs(model, kind: Kind, batch_size, time, max_len) -> tuple:
    """Abstract inputs of the program, with symbolic ``b`` / ``t`` where ``batch_size`` / ``time`` is None."""
    b, t = jax.export.symbolic_shape("b, t")
    B = b if batch_size is None else int(batch_size)
    T = t if time is None else int(time)
    x_dtype = jnp.int32 if model.vocab_size is not None else jnp.float32
    features = () if model.vocab_size is not None else (model.input_size,)
    if kind == "step":
        names, _, axes = _state_layout(model, max_len)
        template = jax.eval_shape(lambda: _state_template(model, 1, max_len))
        state = {}
        for name, leaf, axis in zip(names, jax.tree.leaves(template), axes):
            shape = list(leaf.shape)
            if axis is not None:
                shape[axis] = B
            state[name] = jax.ShapeDtypeStruct(tuple(shape), leaf.dtype)
        return state, jax.ShapeDtypeStruct((B, *features), x_dtype)
    return jax.ShapeDtypeStruct((B, T, *features), x_dtype), jax.ShapeDtypeStruct((B,), jnp.int32)


def _program(model, params, kind: Kind, max_len, path: SequencePath) -> Callable:
    _check_model(model)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if path not in ("model", "stepped"):
        raise ValueError(f"sequence_path must be 'model' or 'stepped', got {path!r}")
    if isinstance(model, Transformer) and max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    if kind == "step":
        return _step_program(model, params, max_len)
    return _sequence_program(model, params, path)


@contextlib.contextmanager
def _tracing_for_export(*, onnx: bool = False) -> Iterator[None]:
    """Traces the pure-JAX path without host callbacks (and, for ONNX, with a select-based cache write)."""
    with _tracing_lock, native.use_native(False), cudnn.use_mode("never"):
        saved_check, saved_write = _checks.checked_at_run_time, attention._write_rows
        _checks.checked_at_run_time = lambda value, is_bad, report: value
        if onnx:
            attention._write_rows = _write_rows_by_select
        try:
            yield
        finally:
            _checks.checked_at_run_time, attention._write_rows = saved_check, saved_write


def _write_rows_by_select(buffer: Array, values: Array, pos: Array) -> Array:
    """:func:`rnnjax.attention._write_rows` as a select: ``buffer`` ``(B, L, N, K)`` with row ``b``'s position
    ``pos[b]`` set to ``values[b, 0]`` (nothing written where ``pos >= L``)."""
    at = jnp.arange(buffer.shape[1], dtype=jnp.int32)[None, :, None, None] == pos[:, None, None, None]
    return jnp.where(at, values.astype(buffer.dtype), buffer)  # (B, L, N, K)


# StableHLO.


def export_stablehlo(
    model,
    params: Params,
    kind: Kind = "step",
    *,
    batch_size: int | None = None,
    time: int | None = None,
    max_len: int | None = None,
    sequence_path: SequencePath = "model",
    platforms: tuple[str, ...] | None = None,
) -> bytes:
    """Serialises the model's step or sequence program (parameters included) with ``jax.export``.

    Args:
        model: a :class:`rnnjax.models.SequenceModel` (its core must stream for ``kind="step"``) or a
            :class:`rnnjax.attention.Transformer`.
        params: its parameters (baked into the program as constants).
        kind: ``"step"`` or ``"sequence"`` (see the module docstring for their signatures).
        batch_size: a fixed ``B``, or ``None`` for a symbolic batch (any size at call time).
        time: a fixed ``T`` for ``"sequence"``, or ``None`` for a symbolic one. The minGRU/minLSTM fused
            kernel needs a fixed ``T`` (it blocks time statically); ``sequence_path="stepped"`` does not.
        max_len: the transformer step's cache length ``L`` (default :data:`DEFAULT_MAX_LEN`).
        sequence_path: ``"model"`` (the model's own whole-sequence path, fused kernels included) or
            ``"stepped"`` (a masked scan of the core's ``step``); ignored for the transformer.
        platforms: lowering platforms, e.g. ``("cpu", "cuda")`` (default: JAX's default backend).

    Returns:
        The bytes of ``jax.export.Exported.serialize()``.

    Example:
        >>> data = export_stablehlo(model, params, "step")
        >>> step = load_stablehlo(data)
        >>> state, y = step(initial_state(model, 4), x)                        # y: (4, O)
    """
    program = _program(model, params, kind, max_len, sequence_path)
    specs = _input_specs(model, kind, batch_size, time, max_len)
    with _tracing_for_export():
        try:
            exported = jax.export.export(jax.jit(program), platforms=platforms)(*specs)
        except jax.errors.InconclusiveDimensionOperation as error:
            raise ValueError(
                f"this program cannot be exported with a symbolic time axis ({error.args[0].splitlines()[0]}); "
                "give time=T (the padded length; --time), or sequence_path='stepped' (--sequence-path stepped)"
            ) from None
    return bytes(exported.serialize())


def load_stablehlo(data: bytes | bytearray) -> Callable:
    """The callable of a serialised program from :func:`export_stablehlo` (needs only JAX, not rnnjax).

    ``jax.jit(jax.export.deserialize(bytearray(data)).call)``: ``step(state, x)`` or ``sequence(x, lengths)``,
    returning ``(state, y)``; compiled once per input shape (without ``jit`` every call pays JAX's dispatch).
    """
    return jax.jit(jax.export.deserialize(bytearray(data)).call)


# ONNX.


def export_onnx(
    model,
    params: Params,
    path: str | os.PathLike,
    kind: Kind = "step",
    *,
    batch_size: int | None = None,
    time: int | None = None,
    max_len: int | None = None,
    sequence_path: SequencePath = "stepped",
    opset: int = 23,
) -> str:
    """Converts the model's step or sequence program to an ONNX file with jax2onnx (``pip install jax2onnx``).

    Inputs are named ``state.<name>`` (one per state array, see :func:`initial_state`) and ``x`` for a step,
    ``x`` and ``lengths`` for a sequence; outputs ``new_state.<name>`` and ``y``. Batch and time are dynamic
    (``b``, ``t``) unless fixed. Weights are initializers.

    Args:
        model, params, kind, batch_size, time, max_len: as for :func:`export_stablehlo`.
        path: the ``.onnx`` file to write.
        sequence_path: ``"stepped"`` (default: the only one jax2onnx converts for the minGRU and minLSTM, see
            the module docstring) or ``"model"``.
        opset: ONNX opset.

    Returns:
        ``path`` as a string.

    Raises:
        ImportError: jax2onnx is not installed.
    """
    import jax2onnx

    if isinstance(model, Transformer) and kind == "sequence" and time is None:
        raise ValueError(
            "jax2onnx cannot convert the transformer's sequence program with a dynamic time axis (it fails to "
            "broadcast the causal mask); give time=T"
        )
    program = _program(model, params, kind, max_len, sequence_path)
    specs = _input_specs(model, kind, batch_size, time, max_len)
    if kind == "step":
        state_specs, x_spec = specs
        names = list(state_specs)
        flat_specs = [*state_specs.values(), x_spec]
        input_names = [f"state.{n}" for n in names] + ["x"]

        def flat(*args):
            state, y = program(dict(zip(names, args[:-1])), args[-1])
            return (*(state[n] for n in names), y)

    else:
        names = [] if isinstance(model, Transformer) else _state_layout(model, None)[0]
        flat_specs = list(specs)
        input_names = ["x", "lengths"]

        def flat(inputs, lengths):
            state, y = program(inputs, lengths)
            return (*(state[n] for n in names), y)

    output_names = [f"new_state.{n}" for n in names] + ["y"]
    with _tracing_for_export(onnx=True), _quiet_jax2onnx_examples():
        proto = jax2onnx.to_onnx(
            flat,
            flat_specs,
            model_name=f"rnnjax_{type(model).__name__}_{kind}",
            opset=opset,
            input_names=input_names,
            output_names=output_names,
        )
    path = os.fspath(path)
    with open(path, "wb") as file:
        file.write(proto.SerializeToString())
    return path


@contextlib.contextmanager
def _quiet_jax2onnx_examples() -> Iterator[None]:
    """Drops jax2onnx's warnings (with tracebacks) about example plugins whose optional packages are missing
    (``jax2onnx.plugins.examples.*``, e.g. dm_pix); the converters rnnjax needs are not examples."""

    def keep(record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not any(isinstance(arg, str) and arg.startswith("jax2onnx.plugins.examples") for arg in args)

    logger = logging.getLogger("jax2onnx.plugins.plugin_system")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def onnx_callable(path: str | os.PathLike, *, threads: int | None = None) -> Callable:
    """Runs an ONNX file from :func:`export_onnx` with onnxruntime, with the signature of the JAX programs.

    Returns:
        ``step(state: dict, x) -> (state: dict, y)`` or ``sequence(x, lengths) -> (state: dict, y)``,
        taking and returning NumPy arrays.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    state_names = [n.removeprefix("new_state.") for n in outputs[:-1]]

    def call(*args):
        if inputs[-1] == "x":  # a step: (state, x)
            state, x = args
            feeds = {f"state.{n}": np.asarray(state[n]) for n in state_names}
            feeds["x"] = np.asarray(x)
        else:
            x, lengths = args
            feeds = {"x": np.asarray(x), "lengths": np.asarray(lengths, np.int32)}
        results = session.run(outputs, feeds)
        return dict(zip(state_names, results[:-1])), results[-1]

    return call
