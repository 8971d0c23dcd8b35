"""Conversion between PyTorch's ``torch.nn.RNN`` / ``LSTM`` / ``GRU`` modules and rnnjax :class:`~rnnjax.Stack`.

PyTorch is optional: it is imported when one of these functions is first called, not when rnnjax is imported.
Install it with ``pip install 'rnnjax[torch]'``.

A PyTorch module becomes a :class:`~rnnjax.Stack` with one layer per ``num_layers`` (a
:class:`~rnnjax.Bidirectional` layer with ``merge="concat"`` when ``bidirectional``), and
``time_major = not batch_first``, so the layer takes inputs in the module's own layout::

    module = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True)
    layer, params = from_torch(module)
    carry, ys = layer.apply(params, xs, lengths=lengths)      # xs: (B, T, 3) -> ys: (B, T, 10)
    h_n, c_n = to_torch_state(layer, carry)                    # each (2 * 2, B, 5), as PyTorch returns

Parameter mapping for layer ``k`` (suffix ``_l{k}``, plus ``_reverse`` for the backward direction)::

    PyTorch                          rnnjax
    weight_ih (G*H, I)               w_ih (I, G*H)          transposed
    weight_hh (G*H, P)               w_hh (P, G*H)          transposed
    bias_ih + bias_hh (G*H,)         b (G*H,)               summed (RNN, LSTM); GRU keeps b_ih and b_hh
    weight_hr (P, H)                 w_hr (H, P)            transposed (LSTM with proj_size)

with gate blocks in the same order (``i, f, g, o`` for LSTM, ``r, z, n`` for GRU). Going back, the summed
bias becomes ``bias_ih`` and ``bias_hh`` is zero, which computes the same function.

States: PyTorch's ``h_n`` / ``c_n`` are ``(num_layers * num_directions, *B, H)``, layer-major with the forward
direction first; the backward direction's entry is its state after processing ``t = 0``, which is what
:class:`~rnnjax.BidirectionalState`'s ``backward`` holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import _checks
from rnnjax.cells.gru import GRU, GRUState
from rnnjax.cells.lstm import LSTM, LSTMState
from rnnjax.cells.simple import SimpleRNN, SimpleRNNState
from rnnjax.layers import Bidirectional, BidirectionalState, Stack, StackState
from rnnjax.types import Carry, Params

__all__ = ["from_torch", "from_torch_state", "to_torch", "to_torch_state"]

_MODES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")
_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}
_STATE_TYPES = {"RNN_TANH": SimpleRNNState, "RNN_RELU": SimpleRNNState, "LSTM": LSTMState, "GRU": GRUState}


def _import_torch():
    """Imports PyTorch, or raises an ``ImportError`` that says how to install it."""
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "rnnjax.interop.torch needs PyTorch, which is not installed; install it with pip install 'rnnjax[torch]'"
        ) from error
    return torch


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The hyperparameters a PyTorch RNN module and an rnnjax stack share."""

    mode: str  # one of _MODES
    hidden_size: int  # H
    num_layers: int  # L
    bias: bool
    bidirectional: bool
    proj_size: int  # P for LSTM with projection, else 0
    batch_first: bool
    dropout: float

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """Per direction: ``P`` (size of ``h``)."""
        return self.proj_size or self.hidden_size


# PyTorch -> rnnjax.


def from_torch(module) -> tuple[Stack, Params]:
    """Converts a ``torch.nn.RNN``, ``torch.nn.LSTM`` or ``torch.nn.GRU`` to an rnnjax layer and its parameters.

    Every PyTorch option is supported: ``num_layers``, ``bidirectional``, ``proj_size``, ``bias``,
    ``nonlinearity`` and ``batch_first``. ``layer.apply(params, xs, lengths=...)`` gives the numbers of
    ``module(xs)`` (of a packed sequence when ``lengths`` is given), zero past each row's length, with
    unbatched inputs ``(T, I)`` accepted as PyTorch accepts them. Dropout between layers applies only when
    ``apply`` gets a ``dropout_key``, as in ``module.train()``.

    Args:
        module: the PyTorch module; its parameters are copied (detached, on the CPU, as float32).

    Returns:
        ``(layer, params)``: a :class:`~rnnjax.Stack` of ``num_layers`` cells (or :class:`~rnnjax.Bidirectional`
        layers) with ``time_major = not module.batch_first`` and ``dropout = module.dropout``, and its
        parameters ``{"layers": [...]}`` as float32 ``jnp`` arrays.

    Raises:
        TypeError: ``module`` is not one of the three PyTorch RNN modules.
        ValueError: ``module.dropout`` is 1, which rnnjax does not allow.
    """
    torch = _import_torch()
    spec = _spec_of_module(torch, module)
    if not spec.dropout < 1.0:
        raise ValueError(f"module.dropout must be below 1 to convert (rnnjax's Stack needs it), got {spec.dropout}")
    layer = _make_stack(spec)
    params = {"layers": [_layer_params_from_module(torch, module, spec, k) for k in range(spec.num_layers)]}
    return layer, params


def _spec_of_module(torch, module) -> _Spec:
    """Reads the hyperparameters of a PyTorch RNN module, or raises ``TypeError`` naming ``module``."""
    mode = getattr(module, "mode", None)
    if not isinstance(module, torch.nn.RNNBase) or mode not in _MODES:
        raise TypeError(
            f"module must be a torch.nn.RNN, torch.nn.LSTM or torch.nn.GRU, got {type(module).__module__}."
            f"{type(module).__qualname__}"
        )
    return _Spec(
        mode=mode,
        hidden_size=int(module.hidden_size),
        num_layers=int(module.num_layers),
        bias=bool(module.bias),
        bidirectional=bool(module.bidirectional),
        proj_size=int(getattr(module, "proj_size", 0) or 0),
        batch_first=bool(module.batch_first),
        dropout=float(module.dropout),
    )


def _make_cell(spec: _Spec):
    """The rnnjax cell for one direction of one layer of ``spec``."""
    if spec.mode == "LSTM":
        return LSTM(hidden_size=spec.hidden_size, proj_size=spec.proj_size or None, use_bias=spec.bias)
    if spec.mode == "GRU":
        return GRU(hidden_size=spec.hidden_size, reset_after=True, use_bias=spec.bias)
    activation = "tanh" if spec.mode == "RNN_TANH" else "relu"
    return SimpleRNN(hidden_size=spec.hidden_size, activation=activation, use_bias=spec.bias)


def _make_stack(spec: _Spec) -> Stack:
    """The rnnjax :class:`Stack` equivalent to a PyTorch module with hyperparameters ``spec``."""
    time_major = not spec.batch_first
    cell = _make_cell(spec)
    layer = Bidirectional(cell, cell, merge="concat", time_major=time_major) if spec.bidirectional else cell
    return Stack([layer] * spec.num_layers, dropout=spec.dropout, residual=False, time_major=time_major)


def _torch_suffix(k: int, direction: int) -> str:
    """PyTorch's parameter-name suffix for layer ``k`` and direction 0 (forward) or 1 (backward)."""
    return f"_l{k}" + ("_reverse" if direction else "")


def _layer_params_from_module(torch, module, spec: _Spec, k: int) -> Params:
    """rnnjax parameters of layer ``k``: one cell's dict, or ``{"forward", "backward"}`` when bidirectional."""
    cells = [_cell_params_from_module(torch, module, spec, _torch_suffix(k, d)) for d in range(spec.num_directions)]
    return {"forward": cells[0], "backward": cells[1]} if spec.bidirectional else cells[0]


def _cell_params_from_module(torch, module, spec: _Spec, suffix: str) -> Params:
    """rnnjax parameters of one direction of one layer (PyTorch names ending in ``suffix``)."""

    def read(name: str) -> np.ndarray:
        return getattr(module, name + suffix).detach().to(device="cpu", dtype=torch.float32).numpy()

    params = {"w_ih": read("weight_ih").T, "w_hh": read("weight_hh").T}  # (I, G*H), (P, G*H)
    if spec.bias:
        if spec.mode == "GRU":
            params["b_ih"], params["b_hh"] = read("bias_ih"), read("bias_hh")  # (3H,) each
        else:
            params["b"] = read("bias_ih") + read("bias_hh")  # (G*H,)
    if spec.proj_size:
        params["w_hr"] = read("weight_hr").T  # (H, P)
    return {name: jnp.array(np.ascontiguousarray(value)) for name, value in params.items()}  # copies


# rnnjax -> PyTorch.


def to_torch(layer: Stack, params: Params):
    """Converts an rnnjax :class:`~rnnjax.Stack` and its parameters to the equivalent PyTorch module.

    The stack must be one PyTorch can represent: every layer a :class:`~rnnjax.SimpleRNN`,
    :class:`~rnnjax.LSTM` (no peepholes) or :class:`~rnnjax.GRU` (``reset_after=True``), all with the same
    hyperparameters, either all unidirectional or all :class:`~rnnjax.Bidirectional` with ``merge="concat"``
    and matching directions, and ``residual=False``. ``batch_first`` is ``not layer.time_major``. The cells'
    compute ``dtype`` is not carried over: the module computes in its parameters' dtype (float32, or float64
    for float64 parameters).

    Args:
        layer: the :class:`~rnnjax.Stack` (wrap a single cell or :class:`~rnnjax.Bidirectional` as
            ``Stack([cell])``).
        params: its parameters, as ``layer.init`` returns them.

    Returns:
        A new ``torch.nn.RNN``, ``torch.nn.LSTM`` or ``torch.nn.GRU`` on the CPU holding a copy of ``params``,
        in training mode like every new PyTorch module (call ``.eval()`` to turn its dropout off).

    Raises:
        TypeError: ``layer`` is not a :class:`~rnnjax.Stack`.
        ValueError: PyTorch cannot represent ``layer``, or ``params`` does not fit it.
    """
    torch = _import_torch()
    spec = _spec_of_stack(layer)
    tensors = _torch_tensors(spec, params)  # name -> array in PyTorch's layout
    dtype = torch.float64 if any(value.dtype == np.float64 for value in tensors.values()) else torch.float32
    input_size = tensors["weight_ih_l0"].shape[1]
    module = _make_module(torch, spec, input_size, dtype)
    expected = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(expected[name].shape):
                raise ValueError(
                    f"params do not fit the stack: PyTorch's {name} must have shape {tuple(expected[name].shape)}, "
                    f"got {tuple(value.shape)} (check the input sizes of the layers)"
                )
            expected[name].copy_(torch.from_numpy(value))
    return module


def _make_module(torch, spec: _Spec, input_size: int, dtype):
    """A new PyTorch RNN module with hyperparameters ``spec``."""
    options = dict(
        num_layers=spec.num_layers,
        bias=spec.bias,
        batch_first=spec.batch_first,
        dropout=spec.dropout,
        bidirectional=spec.bidirectional,
        dtype=dtype,
    )
    if spec.mode == "LSTM":
        return torch.nn.LSTM(input_size, spec.hidden_size, proj_size=spec.proj_size, **options)
    if spec.mode == "GRU":
        return torch.nn.GRU(input_size, spec.hidden_size, **options)
    nonlinearity = "tanh" if spec.mode == "RNN_TANH" else "relu"
    return torch.nn.RNN(input_size, spec.hidden_size, nonlinearity=nonlinearity, **options)


def _spec_of_stack(layer) -> _Spec:
    """The PyTorch hyperparameters of an rnnjax stack, or a clear error why PyTorch cannot represent it."""
    if not isinstance(layer, Stack):
        raise TypeError(
            f"layer must be an rnnjax.Stack, got {type(layer).__name__}; wrap a single cell or Bidirectional "
            f"layer as rnnjax.Stack([layer])"
        )
    if layer.residual:
        raise ValueError("layer has residual=True, which PyTorch's RNN modules cannot represent")
    directions = [_directions(sub, f"layer.layers[{k}]") for k, sub in enumerate(layer.layers)]
    bidirectional = len(directions[0]) == 2
    for k, cells in enumerate(directions):
        if (len(cells) == 2) != bidirectional:
            raise ValueError(
                f"layer mixes Bidirectional and unidirectional layers (layer.layers[0] and layer.layers[{k}]), "
                f"which PyTorch's RNN modules cannot represent"
            )
    first = _cell_signature(directions[0][0], "layer.layers[0]")
    for k, cells in enumerate(directions):
        for d, cell in enumerate(cells):
            where = f"layer.layers[{k}]" + ((".backward" if d else ".forward") if bidirectional else "")
            signature = _cell_signature(cell, where)
            if signature != first:
                raise ValueError(
                    f"{where} is {_describe(signature)} but layer.layers[0] is {_describe(first)}; PyTorch's RNN "
                    f"modules need every layer and direction to have the same cell type and sizes"
                )
    mode, hidden_size, proj_size, bias = first
    return _Spec(
        mode=mode,
        hidden_size=hidden_size,
        num_layers=len(layer.layers),
        bias=bias,
        bidirectional=bidirectional,
        proj_size=proj_size,
        batch_first=not layer.time_major,
        dropout=float(layer.dropout),
    )


def _directions(sub, where: str) -> tuple:
    """The cells of one stack layer: ``(cell,)``, or ``(forward, backward)`` for a concatenating Bidirectional."""
    if isinstance(sub, Bidirectional):
        if sub.merge != "concat":
            raise ValueError(f"{where} is Bidirectional with merge={sub.merge!r}; PyTorch always concatenates")
        return (sub.forward, sub.backward)
    return (sub,)


def _cell_signature(cell, where: str) -> tuple[str, int, int, bool]:
    """``(mode, hidden_size, proj_size, use_bias)`` of a cell PyTorch can represent; raises otherwise."""
    if type(cell) is SimpleRNN:
        return ("RNN_TANH" if cell.activation == "tanh" else "RNN_RELU", cell.hidden_size, 0, cell.use_bias)
    if type(cell) is LSTM:
        if cell.peepholes:
            raise ValueError(f"{where} is an LSTM with peepholes=True, which PyTorch's LSTM does not have")
        return ("LSTM", cell.hidden_size, cell.proj_size or 0, cell.use_bias)
    if type(cell) is GRU:
        if not cell.reset_after:
            raise ValueError(f"{where} is a GRU with reset_after=False; PyTorch's GRU only has the reset-after form")
        return ("GRU", cell.hidden_size, 0, cell.use_bias)
    raise ValueError(
        f"{where} is a {type(cell).__name__}; PyTorch's RNN modules only represent SimpleRNN, LSTM and GRU cells"
    )


def _describe(signature: tuple[str, int, int, bool]) -> str:
    mode, hidden_size, proj_size, bias = signature
    return f"{mode}(hidden_size={hidden_size}, proj_size={proj_size}, bias={bias})"


def _torch_tensors(spec: _Spec, params: Params) -> dict[str, np.ndarray]:
    """All of PyTorch's parameters, named as in ``module.named_parameters()``, from rnnjax ``params``."""
    layers = params.get("layers") if isinstance(params, dict) else None
    if not isinstance(layers, (list, tuple)) or len(layers) != spec.num_layers:
        raise ValueError(f"params must be {{'layers': [...]}} with {spec.num_layers} entries, as layer.init returns")
    tensors = {}
    for k, layer_params in enumerate(layers):
        for d in range(spec.num_directions):
            path = f"params['layers'][{k}]"
            cell_params = layer_params
            if spec.bidirectional:
                direction = "backward" if d else "forward"
                path += f"[{direction!r}]"
                cell_params = layer_params.get(direction) if isinstance(layer_params, dict) else None
            tensors.update(_cell_tensors(spec, cell_params, path, _torch_suffix(k, d)))
    return tensors


def _cell_tensors(spec: _Spec, cell_params: Params, path: str, suffix: str) -> dict[str, np.ndarray]:
    """PyTorch's parameters (names ending in ``suffix``) for one direction of one layer."""
    expected = {"w_ih", "w_hh"}
    if spec.bias:
        expected |= {"b_ih", "b_hh"} if spec.mode == "GRU" else {"b"}
    if spec.proj_size:
        expected.add("w_hr")
    if not isinstance(cell_params, dict) or set(cell_params) != expected:
        got = sorted(cell_params) if isinstance(cell_params, dict) else type(cell_params).__name__
        raise ValueError(f"{path} must be a dict with keys {sorted(expected)}, got {got}")
    value = {name: _to_numpy(array) for name, array in cell_params.items()}
    tensors = {f"weight_ih{suffix}": value["w_ih"].T, f"weight_hh{suffix}": value["w_hh"].T}  # (G*H, I), (G*H, P)
    if spec.bias and spec.mode == "GRU":
        tensors[f"bias_ih{suffix}"], tensors[f"bias_hh{suffix}"] = value["b_ih"], value["b_hh"]  # (3H,) each
    elif spec.bias:
        tensors[f"bias_ih{suffix}"] = value["b"]  # (G*H,)
        tensors[f"bias_hh{suffix}"] = np.zeros_like(value["b"])  # (G*H,)
    if spec.proj_size:
        tensors[f"weight_hr{suffix}"] = value["w_hr"].T  # (P, H)
    return {name: np.ascontiguousarray(array) for name, array in tensors.items()}


def _to_numpy(array) -> np.ndarray:
    """A writable float32 (or float64) NumPy copy of a JAX or NumPy array."""
    array = np.asarray(array)
    dtype = np.float64 if array.dtype == np.float64 else np.float32
    return np.array(array, dtype=dtype)


# States.


def to_torch_state(layer: Stack, carry: Carry):
    """Converts the carry of a PyTorch-representable stack to PyTorch's ``h_n`` (or ``(h_n, c_n)``).

    Args:
        layer: the :class:`~rnnjax.Stack` (as :func:`from_torch` returns, or any stack :func:`to_torch` accepts).
        carry: its :class:`~rnnjax.StackState`, e.g. the final carry of ``layer.apply``.

    Returns:
        ``h_n`` ``(L * D, *B, P)`` for RNN and GRU stacks, ``(h_n, c_n)`` with ``c_n`` ``(L * D, *B, H)`` for LSTM
        stacks, as float32 ``torch.Tensor`` (float64 for a float64 carry), layer-major with the forward
        direction first (``D`` = 2 when bidirectional, else 1).

    Raises:
        TypeError: ``layer`` is not a :class:`~rnnjax.Stack`.
        ValueError: PyTorch cannot represent ``layer``, or ``carry`` is not a carry of it.
    """
    torch = _import_torch()
    spec = _spec_of_stack(layer)
    _check_stack_carry(layer, carry)
    per_direction = []  # L * D cell carries, PyTorch's order
    for layer_carry in carry.layers:
        per_direction.extend([layer_carry.forward, layer_carry.backward] if spec.bidirectional else [layer_carry])
    h_n = torch.from_numpy(np.stack([_to_numpy(state.h) for state in per_direction]))  # (L*D, *B, P)
    if spec.mode != "LSTM":
        return h_n
    c_n = torch.from_numpy(np.stack([_to_numpy(state.c) for state in per_direction]))  # (L*D, *B, H)
    return h_n, c_n


def _check_stack_carry(layer: Stack, carry: Carry) -> None:
    """Raises ``ValueError`` naming ``carry`` unless it is a carry of ``layer`` (any batch shape)."""
    if not isinstance(carry, StackState) or len(carry.layers) != len(layer.layers):
        raise ValueError(
            f"carry must be a StackState with {len(layer.layers)} layer carries, as layer.apply returns, "
            f"got {type(carry).__name__}"
        )
    leaves = jax.tree.leaves(carry)
    if not leaves or np.ndim(leaves[0]) < 1:
        raise ValueError("carry must hold arrays of shape (*B, H), as layer.apply returns")
    batch_shape = tuple(np.shape(leaves[0]))[:-1]
    _checks.check_carry(carry, _checks.carry_template(layer, batch_shape), "carry")


def from_torch_state(layer: Stack, h_0, c_0=None) -> StackState:
    """Converts PyTorch's initial state ``h_0`` (and ``c_0`` for LSTM) to the carry of a stack.

    ``layer.apply(params, xs, from_torch_state(layer, h_0, c_0))`` equals ``module(xs, (h_0, c_0))`` (or
    ``module(xs, h_0)`` for RNN and GRU).

    Args:
        layer: the :class:`~rnnjax.Stack` (as :func:`from_torch` returns, or any stack :func:`to_torch` accepts).
        h_0: ``(L * D, *B, P)`` ``torch.Tensor`` or array (NumPy and JAX arrays need no PyTorch), layer-major
            with the forward direction first. For LSTM stacks, the pair ``(h_0, c_0)`` may be passed here
            instead, as PyTorch's LSTM takes it.
        c_0: ``(L * D, *B, H)`` cell state, as ``h_0``; required for LSTM stacks, not allowed otherwise.

    Returns:
        A :class:`~rnnjax.StackState` with float32 leaves ``(*B, ...)``.

    Raises:
        TypeError: ``layer`` is not a :class:`~rnnjax.Stack`, or a state is not an array.
        ValueError: PyTorch cannot represent ``layer``, or a state has the wrong shape or is missing.
    """
    spec = _spec_of_stack(layer)
    if spec.mode == "LSTM" and c_0 is None and isinstance(h_0, (tuple, list)) and len(h_0) == 2:
        h_0, c_0 = h_0
    if spec.mode == "LSTM" and c_0 is None:
        raise ValueError("c_0 is required for an LSTM stack: pass from_torch_state(layer, h_0, c_0)")
    if spec.mode != "LSTM" and c_0 is not None:
        raise ValueError(f"c_0 is only for LSTM stacks, but this stack's cells are {spec.mode}; pass h_0 alone")
    size = spec.num_layers * spec.num_directions
    h = _state_array(h_0, "h_0", size, spec.output_size)  # (L*D, *B, P)
    states = [h]
    if c_0 is not None:
        c = _state_array(c_0, "c_0", size, spec.hidden_size)  # (L*D, *B, H)
        if c.shape[1:-1] != h.shape[1:-1]:
            raise ValueError(f"c_0 has batch shape {c.shape[1:-1]} but h_0 has {h.shape[1:-1]}; they must match")
        states.append(c)
    state_type = _STATE_TYPES[spec.mode]
    cell_carries = [state_type(*(s[index] for s in states)) for index in range(size)]  # leaves (*B, ...)
    if spec.bidirectional:
        pairs = zip(cell_carries[0::2], cell_carries[1::2])
        return StackState(tuple(BidirectionalState(forward, backward) for forward, backward in pairs))
    return StackState(tuple(cell_carries))


def _state_array(value: Any, name: str, num_states: int, size: int) -> jax.Array:
    """Validates a PyTorch state ``(L * D, *B, size)`` and returns it as a float32 ``jnp`` array (a copy)."""
    if hasattr(value, "detach"):  # a torch.Tensor
        value = value.detach().cpu().float().numpy()
    try:
        array = np.array(value, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a torch.Tensor or an array of floats, got {type(value).__name__}") from error
    if array.ndim < 2 or array.shape[0] != num_states or array.shape[-1] != size:
        raise ValueError(
            f"{name} must have shape (num_layers * num_directions = {num_states}, *batch, {size}), got {array.shape}"
        )
    return jnp.array(array)
