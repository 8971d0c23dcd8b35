"""Gradient-flow diagnostics: how far back the gradient reaches, and the spectra that decide it.

**Per-step state gradients.** For a loss ``L`` of a recurrent network with states ``s_t``,
``||dL/ds_t||`` as a function of ``t`` is the picture of vanishing and exploding gradients (Bengio, Simard &
Frasconi 1994; Pascanu, Mikolov & Bengio 2013): with ``ds_{t+1}/ds_t = diag(phi'(.)) W^T`` for a tanh network,
the gradient shrinks at least like ``sigma_max(W)^k`` over ``k`` steps when ``sigma_max(W) < 1``.

:func:`state_gradient_norms` computes ``dL/ds_t`` for every step and every cell of a layer in *one* backward
pass. Each cell is wrapped in a probe that adds a zero perturbation ``e_t`` to the state entering step
``t + 1`` and another ``u_t`` to the output ``y_t``; then

.. math::
    \\frac{dL}{ds_t} = \\frac{\\partial L}{\\partial e_t}
        + \\frac{\\partial L}{\\partial u_t}\\Big|_{\\text{output field}}

the first term being the gradient that flows back through the recurrence and the second the one that
reaches ``s_t`` through the cell's output (the built-in cells output a field of their state: ``h``, or ``y``
for the Jordan network). ``s_t`` is the whole carry (``h`` and ``c`` for an LSTM).

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

from rnnjax import unrolling
from rnnjax.cells import GRU, LSTM, JordanRNN, SimpleRNN
from rnnjax.layers import Bidirectional, Stack
from rnnjax.types import Array, Carry, DType, Params

# Probing.


@dataclasses.dataclass(frozen=True)
class _Probe:
    """A cell wrapper whose step adds perturbations, read from its params, to the incoming state and output.

    Params: ``{"cell": the cell's params, "carry_eps": carry-shaped (T, *B, ...), "y_eps": (T, *B, O)}``. The
    carry gains a float32 step counter (processing order) that selects the perturbation of each step.
    """

    cell: Any

    @property
    def output_size(self) -> int:
        return self.cell.output_size

    @property
    def hidden_size(self) -> int:
        return self.cell.hidden_size

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
        inner = jax.tree.map(lambda c, e: c + _take_step(e, index).astype(c.dtype), inner, params["carry_eps"])
        inner, y = self.cell.step(params["cell"], inner, x)
        y = y + _take_step(params["y_eps"], index).astype(y.dtype)
        return (inner, counter + 1.0), y


def _take_step(values: Array, index: Array) -> Array:
    """``values[index[b], b, ...]`` for every batch position: ``(T, *B, ...)``, ``(*B,)`` -> ``(*B, ...)``."""
    index = jnp.clip(index, 0, values.shape[0] - 1)
    index = index.reshape((1,) + index.shape + (1,) * (values.ndim - 1 - index.ndim))
    return jnp.take_along_axis(values, index, axis=0)[0]


def _is_cell(layer) -> bool:
    return not isinstance(layer, (Stack, Bidirectional))


def _probe(layer):
    """``layer`` with every cell wrapped in a :class:`_Probe`."""
    if isinstance(layer, Stack):
        return dataclasses.replace(layer, layers=tuple(_probe(sub) for sub in layer.layers))
    if isinstance(layer, Bidirectional):
        return dataclasses.replace(layer, forward=_probe(layer.forward), backward=_probe(layer.backward))
    return _Probe(layer)


def _cells(layer, prefix: str = "", reverse: bool = False) -> list[tuple[str, Any, bool]]:
    """``(path, cell, runs_in_reverse)`` for every cell of ``layer``; paths like ``layers/1/backward``."""
    if isinstance(layer, Stack):
        found = []
        for index, sub in enumerate(layer.layers):
            found += _cells(sub, f"{prefix}layers/{index}/", reverse)
        return found
    if isinstance(layer, Bidirectional):
        return _cells(layer.forward, f"{prefix}forward/", reverse) + _cells(layer.backward, f"{prefix}backward/", True)
    return [(prefix.rstrip("/"), layer, reverse)]


def _get(params: Params, path: str) -> Params:
    for part in filter(None, path.split("/")):
        params = params[int(part)] if isinstance(params, (list, tuple)) else params[part]
    return params


def _with_probes(layer, params: Params, eps: dict[str, dict], prefix: str = "") -> Params:
    """Rebuilds ``params`` for the probed layer, inserting each cell's perturbations."""
    if isinstance(layer, Stack):
        return {
            **params,
            "layers": [
                _with_probes(sub, sub_params, eps, f"{prefix}layers/{index}/")
                for index, (sub, sub_params) in enumerate(zip(layer.layers, params["layers"]))
            ],
        }
    if isinstance(layer, Bidirectional):
        return {
            "forward": _with_probes(layer.forward, params["forward"], eps, f"{prefix}forward/"),
            "backward": _with_probes(layer.backward, params["backward"], eps, f"{prefix}backward/"),
        }
    return {"cell": params, **eps[prefix.rstrip("/")]}


def output_field(cell, carry: Carry) -> str | None:
    """Name of the carry field that the cell outputs (``h``, or ``y`` for :class:`rnnjax.JordanRNN`).

    A cell may declare it as ``output_field``; otherwise a field named ``h`` or ``y`` is assumed to be the
    output. ``None`` when neither exists.
    """
    declared = getattr(cell, "output_field", None)
    if declared is not None:
        return declared
    fields = getattr(carry, "_fields", ())
    for name in ("h", "y"):
        if name in fields:
            return name
    return None


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
    probed = _probe(layer)
    cells = _cells(layer)

    eps = {}
    for path, cell, _ in cells:
        state = cell.initial_carry(batch_shape, jnp.float32)
        eps[path] = {
            "carry_eps": jax.tree.map(lambda leaf: jnp.zeros((T, *leaf.shape), leaf.dtype), state),
            "y_eps": jnp.zeros((T, *batch_shape, cell.output_size), jnp.float32),
        }
    if carry is not None:
        carry = _probe_carry(layer, carry, batch_shape)

    def loss_of(eps):
        probed_params = _with_probes(layer, params, eps)
        if _is_cell(layer):
            _, ys = unrolling.unroll(probed, probed_params, xs, carry, lengths=lengths, time_major=time_major)
        else:
            _, ys = probed.apply(probed_params, xs, carry, lengths=lengths)
        return loss_fn(ys)

    grads = jax.grad(loss_of)(eps)
    return {path: _combine(cell, grads[path], reverse, lengths, batch_shape) for path, cell, reverse in cells}


def _probe_carry(layer, carry, batch_shape):
    """Adds the probes' step counters to a user-given carry."""
    counter = jnp.zeros(batch_shape, jnp.float32)
    if isinstance(layer, Stack):
        return type(carry)(tuple(_probe_carry(sub, c, batch_shape) for sub, c in zip(layer.layers, carry.layers)))
    if isinstance(layer, Bidirectional):
        return type(carry)(
            _probe_carry(layer.forward, carry.forward, batch_shape),
            _probe_carry(layer.backward, carry.backward, batch_shape),
        )
    return carry, counter


def _squared_norms(tree, batch_rank: int) -> Array:
    """Per-step, per-row squared norm over all features of all leaves: leaves ``(T, *B, ...)`` -> ``(T, *B)``."""
    return sum(jnp.sum(g.reshape(g.shape[: 1 + batch_rank] + (-1,)) ** 2, axis=-1) for g in jax.tree.leaves(tree))


def _combine(cell, grads: dict, reverse: bool, lengths, batch_shape) -> StateGradients:
    """``dL/ds_t`` from the probe gradients of one cell, in time order."""
    carry_g = grads["carry_eps"]  # leaves (T, *B, ...): gradient at the state entering step k (processing order)
    y_g = grads["y_eps"]  # (T, *B, O): gradient at the output of step k
    # The state after step k is the state entering step k + 1 (nothing enters a step after the last).
    after = jax.tree.map(lambda g: jnp.concatenate([g[1:], jnp.zeros_like(g[:1])], axis=0), carry_g)
    recurrent = _squared_norms(after, len(batch_shape))  # (T, *B)
    total = recurrent
    name = output_field(cell, cell.initial_carry(batch_shape, jnp.float32))
    if name is not None:
        total = _squared_norms(after._replace(**{name: getattr(after, name) + y_g}), len(batch_shape))  # (T, *B)
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
    from rnnjax.models import compute_metrics, dense, last_valid

    xs = model.embed_inputs(params, batch.inputs)  # (B, T, E)

    def loss_fn(ys):
        if model.head == "last":
            ys = last_valid(model.core, ys, batch.lengths)  # (B, H)
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

    ``SimpleRNN``: ``w_hh``. ``LSTM``: the four gate blocks ``w_hh/i``, ``w_hh/f``, ``w_hh/g``, ``w_hh/o``.
    ``GRU``: ``w_hh/r``, ``w_hh/z``, ``w_hh/n``. ``JordanRNN``: the output loop ``w_yh @ w_hy`` ``(O, O)``.
    Other cells may define ``recurrent_matrices(params) -> dict``.
    """
    found = {}
    for path, cell, _ in _cells(layer):
        cell_params = _get(params, path)
        prefix = f"{path}/" if path else ""
        for name, matrix in _cell_matrices(cell, cell_params).items():
            found[prefix + name] = matrix
    return found


def _cell_matrices(cell, params: Params) -> dict[str, Array]:
    if hasattr(cell, "recurrent_matrices"):
        return dict(cell.recurrent_matrices(params))
    if isinstance(cell, SimpleRNN):
        return {"w_hh": params["w_hh"]}
    if isinstance(cell, LSTM):
        return dict(zip(("w_hh/i", "w_hh/f", "w_hh/g", "w_hh/o"), jnp.split(params["w_hh"], 4, axis=-1)))
    if isinstance(cell, GRU):
        return dict(zip(("w_hh/r", "w_hh/z", "w_hh/n"), jnp.split(params["w_hh"], 3, axis=-1)))
    if isinstance(cell, JordanRNN):
        return {"w_yh @ w_hy": params["w_yh"] @ params["w_hy"]}
    raise TypeError(f"no known recurrent matrices for {type(cell).__name__}; define recurrent_matrices(params)")


def spectral_stats(layer, params: Params) -> dict[str, SpectralStats]:
    """:class:`SpectralStats` of every matrix of :func:`recurrent_matrices`."""
    stats = {}
    for name, matrix in recurrent_matrices(layer, params).items():
        matrix = np.asarray(matrix, np.float64)
        singular = np.linalg.svd(matrix, compute_uv=False)
        radius = float(np.max(np.abs(np.linalg.eigvals(matrix)))) if matrix.shape[0] == matrix.shape[1] else np.nan
        stats[name] = SpectralStats(jnp.asarray(singular), float(singular[0]), radius)
    return stats


def spectral_radius(matrix) -> float:
    """Largest eigenvalue modulus of a square matrix."""
    return float(np.max(np.abs(np.linalg.eigvals(np.asarray(matrix, np.float64)))))
