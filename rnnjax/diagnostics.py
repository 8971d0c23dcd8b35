"""Gradient-flow diagnostics: how far back the gradient reaches, and the spectra that decide it.

**Per-step state gradients.** For a loss ``L`` of a recurrent network with states ``s_t``,
``||dL/ds_t||`` as a function of ``t`` is the picture of vanishing and exploding gradients (Bengio, Simard &
Frasconi 1994; Pascanu, Mikolov & Bengio 2013): with ``ds_{t+1}/ds_t = diag(phi'(.)) W^T`` for a tanh network,
the gradient shrinks at least like ``sigma_max(W)^k`` over ``k`` steps when ``sigma_max(W) < 1``.

:func:`state_gradient_norms` computes ``dL/ds_t`` for every step and every cell of a layer in *one* backward
pass. Each cell is wrapped in a probe that adds a zero perturbation ``e_t`` to the state ``s_t`` after step
``t``, reads the step's output again from the perturbed state (the cell's declared ``readout``: its
``output_field``, or the LRU's ``Re(C h) + D x``), and adds a second perturbation ``r_t`` to the state passed
on to step ``t + 1`` only; then

.. math::
    \\frac{dL}{ds_t} = \\frac{\\partial L}{\\partial e_t}, \\qquad
    \\frac{\\partial L}{\\partial s_{t+1}} \\frac{\\partial s_{t+1}}{\\partial s_t} = \\frac{\\partial L}{\\partial r_t}

the total gradient (through the output and the recurrence) and the part that flows back through the
recurrence alone. ``s_t`` is the whole carry (``h`` and ``c`` for an LSTM). Layers are walked through their
declared ``children()``, so any cell or layer on the protocol is probed without code of its own here.

**Spectra.** :func:`spectral_stats` gives the singular values, spectral norm and spectral radius of every
recurrent weight matrix of a cell or layer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import protocol, unrolling
from rnnjax.blocks import dense
from rnnjax.metrics import compute_metrics
from rnnjax.protocol import Path
from rnnjax.types import Array, Carry, DType, Params

# Probing.


@dataclasses.dataclass(frozen=True)
class _Probe:
    """A cell wrapper whose step perturbs the new state, reads the output from it, and perturbs what goes on.

    Params: ``{"cell": the cell's params, "total_eps": carry-shaped (T, *B, ...), "recurrent_eps": the same}``.
    The carry gains a float32 step counter (processing order) that selects each step's perturbations.
    """

    cell: Any

    @property
    def output_size(self) -> int:
        return self.cell.output_size

    def init(self, key, input_size: int):
        raise TypeError("a probe wraps existing parameters; it cannot be initialised")

    def input_size(self, params: Params) -> int:
        return self.cell.input_size(params["cell"])

    def initial_carry(self, batch_shape: Sequence[int] | int = (), dtype: DType = jnp.float32):
        inner = self.cell.initial_carry(batch_shape, dtype)
        batch = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        return inner, jnp.zeros(batch, jnp.float32)

    def step(self, params: Params, carry, x: Array):
        inner, counter = carry  # counter: (*B,) steps processed so far
        index = counter.astype(jnp.int32)
        state, y = self.cell.step(params["cell"], inner, x)
        state = jax.tree.map(lambda c, e: c + _take_step(e, index).astype(c.dtype), state, params["total_eps"])
        y = self.cell.readout(params["cell"], state, x).astype(y.dtype)  # (*B, O), now a function of e_t
        passed = jax.tree.map(lambda c, e: c + _take_step(e, index).astype(c.dtype), state, params["recurrent_eps"])
        return (passed, counter + 1.0), y


def _take_step(values: Array, index: Array) -> Array:
    """``values[index[b], b, ...]`` for every batch position: ``(T, *B, ...)``, ``(*B,)`` -> ``(*B, ...)``."""
    index = jnp.clip(index, 0, values.shape[0] - 1)
    index = index.reshape((1,) + index.shape + (1,) * (values.ndim - 1 - index.ndim))
    return jnp.take_along_axis(values, index, axis=0)[0]


def _name(path: Path) -> str:
    """``("layers", 1, "backward")`` -> ``"layers/1/backward"``."""
    return "/".join(str(part) for part in path)


class StateGradients(NamedTuple):
    """Result of :func:`state_gradient_norms` for one cell.

    Attributes:
        norms: ``(T,)`` ``||dL/ds_t||`` over the whole batch (Frobenius norm over rows and state features),
            in time order (also for cells that run backwards).
        per_example: ``(*B, T)`` the norm for each row separately.
        recurrent: ``(T,)`` the norm of the part that flows back through the recurrence only.
    """

    norms: Array
    per_example: Array
    recurrent: Array


def state_gradient_norms(
    layer,
    params: Params,
    xs,
    loss_fn: Callable[[Array], Array],
    *,
    lengths=None,
    carry: Carry | None = None,
) -> dict[str, StateGradients]:
    """Per-step norms ``||dL/ds_t||`` of every cell of ``layer``, in one backward pass.

    Args:
        layer: a cell, :class:`rnnjax.Bidirectional` or :class:`rnnjax.Stack`.
        params: its parameters.
        xs: inputs ``(*B, T, I)`` (``(T, *B, I)`` for a time-major layer).
        loss_fn: maps the layer's outputs ``ys`` (as :func:`rnnjax.unroll` or ``layer.apply`` return them) to
            a scalar loss.
        lengths: optional ``(*B,)`` valid lengths; steps past a row's length have zero gradient.
        carry: initial carry (``None``: zeros).

    Returns:
        ``{path: StateGradients}`` with one entry per cell: ``""`` for a lone cell, else paths such as
        ``"forward"``, ``"backward"``, ``"layers/0"`` or ``"layers/1/backward"``.

    Example:
        >>> cell = rnnjax.SimpleRNN(hidden_size=16)
        >>> params = cell.init(jax.random.key(0), input_size=3)
        >>> grads = state_gradient_norms(cell, params, jnp.ones((4, 50, 3)), lambda ys: ys[:, -1].sum())
        >>> grads[""].norms.shape
        (50,)
    """
    lengths = None if lengths is None else jnp.asarray(lengths)
    return _state_gradients(layer, loss_fn, params, jnp.asarray(xs), lengths, carry)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _state_gradients(layer, loss_fn, params, xs, lengths, carry):
    time_major = getattr(layer, "time_major", False)
    xs_tm = xs if time_major else jnp.moveaxis(xs, -2, 0)  # (T, *B, I)
    T, batch_shape = xs_tm.shape[0], xs_tm.shape[1:-1]
    cells = protocol.walk_cells(layer)
    probed = protocol.map_cells(layer, _Probe)

    eps = {}
    for path, cell, _ in cells:
        state = cell.initial_carry(batch_shape, jnp.float32)
        zeros = jax.tree.map(lambda leaf: jnp.zeros((T, *leaf.shape), leaf.dtype), state)
        eps[path] = {"total_eps": zeros, "recurrent_eps": zeros}
    if carry is not None:
        for path, _, _ in cells:  # the probes' carries hold a step counter beside the cell's
            carry = protocol.set_path(carry, path, (protocol.get_path(carry, path), jnp.zeros(batch_shape)))

    def loss_of(eps):
        probed_params = params
        for path, _, _ in cells:
            probed_params = protocol.set_path(
                probed_params, path, {"cell": protocol.get_path(params, path), **eps[path]}
            )
        _, ys = unrolling.unroll(probed, probed_params, xs, carry, lengths=lengths, time_major=time_major)
        return loss_fn(ys)

    grads = jax.grad(loss_of)(eps)
    return {_name(path): _combine(grads[path], reverse, lengths, batch_shape) for path, _, reverse in cells}


def _squared_norms(tree, batch_rank: int) -> Array:
    """Per-step, per-row squared norm over all features of all leaves: leaves ``(T, *B, ...)`` -> ``(T, *B)``."""
    return sum(jnp.sum(g.reshape(g.shape[: 1 + batch_rank] + (-1,)) ** 2, axis=-1) for g in jax.tree.leaves(tree))


def _combine(grads: dict, reverse: bool, lengths, batch_shape) -> StateGradients:
    """``dL/ds_t`` from the probe gradients of one cell (processing order), in time order."""
    total = _squared_norms(grads["total_eps"], len(batch_shape))  # (T, *B)
    recurrent = _squared_norms(grads["recurrent_eps"], len(batch_shape))  # (T, *B)
    if reverse:  # processing order -> time order
        total = unrolling.reverse_sequences(total[..., None], lengths)[..., 0]
        recurrent = unrolling.reverse_sequences(recurrent[..., None], lengths)[..., 0]
    T = total.shape[0]
    return StateGradients(
        norms=jnp.sqrt(jnp.sum(total.reshape(T, -1), axis=-1)),  # (T,)
        per_example=jnp.moveaxis(jnp.sqrt(total), 0, -1),  # (*B, T)
        recurrent=jnp.sqrt(jnp.sum(recurrent.reshape(T, -1), axis=-1)),  # (T,)
    )


def model_state_gradient_norms(model, params: Params, batch, kind: str) -> dict[str, StateGradients]:
    """:func:`state_gradient_norms` of a :class:`rnnjax.models.SequenceModel`'s core under its task loss.

    Args:
        model: the model.
        params: its parameters.
        batch: a :class:`rnnjax.tasks.Batch`.
        kind: the task kind (selects the loss).
    """
    xs = model.embed_inputs(params, batch.inputs)  # (B, T, E)

    def loss_fn(ys):
        if model.head == "last":
            ys = model.core.last_outputs(ys, batch.lengths)  # (B, H)
        return compute_metrics(kind, dense(params["head"], ys), batch)["loss"]

    return state_gradient_norms(model.core, params["core"], xs, loss_fn, lengths=batch.lengths)


def decay_rate(norms: Array, *, start: int = 0, stop: int | None = None) -> float:
    """Mean per-step factor by which ``norms`` (``(T,)``, largest at the end) shrink going back in time.

    ``exp(slope)`` of a least-squares line through ``log(norms[t])`` against ``T - 1 - t`` over
    ``[start, stop)``: 0.5 means the gradient halves with every step it travels back; 1.0 means no decay.
    """
    values = np.asarray(norms, np.float64)[start:stop]
    distance = np.arange(len(values))[::-1].astype(np.float64)
    logs = np.log(np.maximum(values, np.finfo(np.float64).tiny))
    slope = np.polyfit(distance, logs, 1)[0]
    return float(np.exp(slope))


# Spectra of recurrent weights.


class SpectralStats(NamedTuple):
    """Spectrum of one recurrent matrix.

    Attributes:
        singular_values: ``(min(M, N),)`` descending.
        spectral_norm: the largest singular value.
        spectral_radius: the largest eigenvalue modulus (NaN for non-square matrices).
    """

    singular_values: Array
    spectral_norm: float
    spectral_radius: float


def recurrent_matrices(layer, params: Params) -> dict[str, Array]:
    """The recurrent (state-to-state) weight matrices of every cell of ``layer``, by path.

    Each cell declares its own (``Cell.recurrent_matrices``): ``SimpleRNN``: ``w_hh``. ``LSTM``: the four
    gate blocks ``w_hh/i``, ``w_hh/f``, ``w_hh/g``, ``w_hh/o``. ``GRU``: ``w_hh/r``, ``w_hh/z``, ``w_hh/n``.
    ``JordanRNN``: the output loop ``w_yh @ w_hy`` ``(O, O)``. ``LRU``: ``diag(lambda)`` (complex). minGRU and
    minLSTM: none.
    """
    found = {}
    for path, cell, _ in protocol.walk_cells(layer):
        prefix = f"{_name(path)}/" if path else ""
        for name, matrix in cell.recurrent_matrices(protocol.get_path(params, path)).items():
            found[prefix + name] = matrix
    return found


def spectral_stats(layer, params: Params) -> dict[str, SpectralStats]:
    """:class:`SpectralStats` of every matrix of :func:`recurrent_matrices`."""
    stats = {}
    for name, matrix in recurrent_matrices(layer, params).items():
        matrix = np.asarray(matrix)
        matrix = matrix.astype(np.complex128 if np.iscomplexobj(matrix) else np.float64)
        singular = np.linalg.svd(matrix, compute_uv=False)
        radius = float(np.max(np.abs(np.linalg.eigvals(matrix)))) if matrix.shape[0] == matrix.shape[1] else np.nan
        stats[name] = SpectralStats(jnp.asarray(singular), float(singular[0]), radius)
    return stats


def spectral_radius(matrix) -> float:
    """Largest eigenvalue modulus of a square matrix."""
    matrix = np.asarray(matrix)
    matrix = matrix.astype(np.complex128 if np.iscomplexobj(matrix) else np.float64)
    return float(np.max(np.abs(np.linalg.eigvals(matrix))))
