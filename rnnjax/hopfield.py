"""Hopfield networks: associative memory, classical (binary) and modern (continuous).

Shape letters (see :mod:`rnnjax.types`): ``*B`` any leading batch axes, plus ``N`` units (pattern size) and
``P`` stored patterns.

**Classical Hopfield network** (Hopfield 1982). ``P`` patterns ``xi^mu`` in ``{-1, +1}^N`` are stored by the
Hebbian rule

.. math::
    W_{ij} = \\frac{1}{N} \\sum_\\mu \\xi^\\mu_i \\xi^\\mu_j, \\qquad W_{ii} = 0,

and a state ``s`` is updated unit by unit, ``s_i <- sign(sum_j W_ij s_j)`` (asynchronous), or all units at
once (synchronous). Asynchronous updates never increase the energy ``E(s) = -1/2 s^T W s``, so the network
slides into a fixed point; at a load ``P/N`` below about ``0.138`` (Amit, Gutfreund & Sompolinsky 1985) the
stored patterns are (close to) such fixed points, above it retrieval collapses. A tie (``sum_j W_ij s_j = 0``)
keeps the unit's current value, which keeps the energy argument exact.

**Modern continuous Hopfield network** (Ramsauer et al. 2020, "Hopfield Networks is All You Need"). With
the patterns as the columns of ``X`` (``N x P``) and an inverse temperature ``beta``, the update

.. math::
    \\xi \\leftarrow X \\, \\mathrm{softmax}(\\beta X^T \\xi)

decreases the energy ``E(xi) = -lse(beta, X^T xi) + 1/2 xi^T xi + beta^{-1} log P + 1/2 M^2`` (``M`` the
largest pattern norm) and, for well separated patterns, retrieves a pattern in one step; it stores
exponentially many patterns in ``N``. It is the attention update with the query ``xi`` and keys = values
``X``.

Patterns are passed row-wise throughout, as ``(P, N)`` arrays; states as ``(*B, N)``. Everything is a pure
function of arrays; :class:`HopfieldNetwork` bundles the classical functions for a fixed weight matrix.

Example:
    >>> patterns = random_patterns(jax.random.key(0), num_patterns=5, size=100)
    >>> weights = hebbian_weights(patterns)
    >>> noisy = flip(jax.random.key(1), patterns, fraction=0.1)
    >>> result = retrieve(weights, noisy, key=jax.random.key(2))
    >>> float(overlap(result.state, patterns).mean()) > 0.95
    True
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.types import Array, PRNGKey

__all__ = [
    "HopfieldNetwork",
    "Retrieval",
    "async_update",
    "capacity_overlaps",
    "energy",
    "flip",
    "hebbian_weights",
    "modern_energy",
    "modern_retrieve",
    "modern_update",
    "overlap",
    "random_patterns",
    "retrieve",
    "sync_update",
    "theory_overlap",
]


# Validation.


def _as_array(value, name: str) -> Array:
    try:
        array = jnp.asarray(value)
    except TypeError as error:
        raise TypeError(f"{name} must be an array, got {type(value).__name__}") from error
    if not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
        raise TypeError(f"{name} must have a real (float or integer) dtype, got {array.dtype}")
    return array


def _float(array: Array) -> Array:
    return array if jnp.issubdtype(array.dtype, jnp.floating) else array.astype(jnp.float32)


def _check_binary(array: Array, name: str) -> None:
    """Raises ``ValueError`` unless every entry is -1 or +1 (skipped for traced values)."""
    if isinstance(array, jax.core.Tracer):
        return
    values = np.asarray(array)
    if not np.all((values == 1) | (values == -1)):
        bad = values[(values != 1) & (values != -1)]
        raise ValueError(f"{name} must contain only -1 and +1, found e.g. {bad.ravel()[:3].tolist()}")


def _check_patterns(patterns, name: str = "patterns", binary: bool = True) -> Array:
    patterns = _as_array(patterns, name)
    if patterns.ndim != 2:
        raise ValueError(f"{name} must have shape (P, N) (one pattern per row), got shape {patterns.shape}")
    if patterns.shape[0] < 1 or patterns.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one pattern of at least one unit, got shape {patterns.shape}")
    if binary:
        _check_binary(patterns, name)
    return _float(patterns)


def _check_weights(weights) -> Array:
    weights = _as_array(weights, "weights")
    if weights.ndim != 2 or weights.shape[0] != weights.shape[1]:
        raise ValueError(f"weights must be a square (N, N) matrix, got shape {weights.shape}")
    return _float(weights)


def _check_state(state, size: int, name: str = "state", binary: bool = True) -> Array:
    state = _as_array(state, name)
    if state.ndim < 1 or state.shape[-1] != size:
        raise ValueError(f"{name} must have shape (*B, N) with N = {size}, got shape {state.shape}")
    if binary:
        _check_binary(state, name)
    return _float(state)


# Patterns.


def random_patterns(key: PRNGKey, num_patterns: int, size: int, dtype=jnp.float32) -> Array:
    """``num_patterns`` independent random ``±1`` patterns of ``size`` units, each unit ``+1`` with probability 1/2.

    Returns:
        ``(P, N)`` array of ``-1.0`` and ``+1.0``.
    """
    if not isinstance(num_patterns, (int, np.integer)) or num_patterns < 1:
        raise ValueError(f"num_patterns must be a positive int, got {num_patterns!r}")
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    bits = jax.random.bernoulli(key, 0.5, (int(num_patterns), int(size)))
    return jnp.where(bits, 1.0, -1.0).astype(dtype)


def flip(key: PRNGKey, states, fraction: float) -> Array:
    """Flips the sign of exactly ``round(fraction * N)`` randomly chosen units of every state.

    Args:
        key: PRNG key.
        states: ``(*B, N)`` ``±1`` states.
        fraction: share of units to flip, in ``[0, 1]``.

    Returns:
        ``(*B, N)`` corrupted copies (each row with its own random units).
    """
    states = _float(_as_array(states, "states"))
    if states.ndim < 1:
        raise ValueError(f"states must have shape (*B, N), got shape {states.shape}")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    N = states.shape[-1]
    count = int(round(float(fraction) * N))
    ranks = jnp.argsort(jax.random.uniform(key, states.shape), axis=-1)  # a random permutation per row
    flipped = ranks < count  # (*B, N) exactly `count` True per row
    return jnp.where(flipped, -states, states)


def overlap(states, patterns) -> Array:
    """The overlap ``m = (1/N) sum_i s_i xi_i`` between states and patterns (broadcasting on ``*B``).

    ``m = 1`` for identical ``±1`` vectors, ``-1`` for opposite ones, about ``0`` for unrelated random ones.

    Args:
        states: ``(*B, N)``.
        patterns: ``(*B, N)`` (or anything broadcastable against ``states``).

    Returns:
        ``(*B,)`` overlaps.
    """
    states, patterns = _float(_as_array(states, "states")), _float(_as_array(patterns, "patterns"))
    if states.shape[-1:] != patterns.shape[-1:]:
        raise ValueError(f"states and patterns must have the same size N, got {states.shape} and {patterns.shape}")
    dtype = jnp.promote_types(states.dtype, patterns.dtype)
    return jnp.mean(states.astype(dtype) * patterns.astype(dtype), axis=-1)


# Classical Hopfield network.


def hebbian_weights(patterns) -> Array:
    """Hebbian storage: ``W = (1/N) sum_mu xi^mu xi^mu^T`` with a zero diagonal.

    Args:
        patterns: ``(P, N)`` patterns of ``-1`` and ``+1``, one per row.

    Returns:
        ``(N, N)`` symmetric weights.

    Raises:
        ValueError: if ``patterns`` is not 2-D or holds values other than ``±1``.
    """
    patterns = _check_patterns(patterns)
    N = patterns.shape[1]
    weights = patterns.T @ patterns / N  # (N, N)
    return weights * (1.0 - jnp.eye(N, dtype=weights.dtype))


def energy(weights, state) -> Array:
    """The Hopfield energy ``E(s) = -1/2 s^T W s``.

    Args:
        weights: ``(N, N)``.
        state: ``(*B, N)`` (any real values; ``±1`` for the classical network).

    Returns:
        ``(*B,)`` energies.
    """
    weights = _check_weights(weights)
    state = _check_state(state, weights.shape[0], binary=False)
    return -0.5 * jnp.sum((state @ weights) * state, axis=-1)


def _sign_keep(field: Array, current: Array) -> Array:
    """``sign(field)``, keeping ``current`` where the field is exactly zero."""
    return jnp.where(field > 0, 1.0, jnp.where(field < 0, -1.0, current)).astype(current.dtype)


def sync_update(weights, state) -> Array:
    """One synchronous update: every unit at once, ``s <- sign(W s)`` (ties keep the current value).

    Synchronous updates can end in a 2-cycle instead of a fixed point; the energy need not decrease.

    Args:
        weights: ``(N, N)``.
        state: ``(*B, N)`` of ``±1``.

    Returns:
        ``(*B, N)`` the new state.
    """
    weights = _check_weights(weights)
    state = _check_state(state, weights.shape[0])
    return _sync(weights, state)


def _sync(weights: Array, state: Array) -> Array:
    return _sign_keep(state @ weights, state)  # W is symmetric: (W s)_i = (s W)_i


def async_update(weights, state, *, key: PRNGKey | None = None, order=None) -> Array:
    """One asynchronous sweep: units updated one at a time, each seeing the changes made before it.

    .. code-block:: python

        for i in order:                     # a permutation of range(N)
            s[i] = sign(W[i] @ s)           # a tie keeps s[i]

    Args:
        weights: ``(N, N)`` symmetric with a zero diagonal (e.g. :func:`hebbian_weights`).
        state: ``(*B, N)`` of ``±1``; every row is updated in the same order.
        key: if given (and ``order`` is not), the order is a random permutation drawn from it.
        order: ``(K,)`` integer unit indices to update in turn (need not be a permutation).
            Default: ``range(N)``.

    Returns:
        ``(*B, N)`` the state after the sweep.
    """
    weights = _check_weights(weights)
    N = weights.shape[0]
    state = _check_state(state, N)
    order = _resolve_order(N, key, order)
    return _async(weights, state, order)


def _resolve_order(N: int, key: PRNGKey | None, order) -> Array:
    if order is not None:
        order = jnp.asarray(order)
        if order.ndim != 1 or not jnp.issubdtype(order.dtype, jnp.integer):
            raise TypeError(f"order must be a 1-D integer array of unit indices, got {order.dtype} {order.shape}")
        if not isinstance(order, jax.core.Tracer) and order.size and (int(order.min()) < 0 or int(order.max()) >= N):
            raise ValueError(f"order must hold unit indices in [0, {N}), got values in [{order.min()}, {order.max()}]")
        return order.astype(jnp.int32)
    if key is not None:
        return jax.random.permutation(key, N).astype(jnp.int32)
    return jnp.arange(N, dtype=jnp.int32)


@jax.jit
def _async(weights: Array, state: Array, order: Array) -> Array:
    def body(k, s):
        i = order[k]
        field = s @ weights[:, i]  # (*B,)
        return s.at[..., i].set(_sign_keep(field, s[..., i]))

    return jax.lax.fori_loop(0, order.shape[0], body, state)


class Retrieval(NamedTuple):
    """Result of :func:`retrieve`."""

    state: Array  # (*B, N) the final state
    sweeps: Array  # () int32 sweeps (or synchronous steps) run
    converged: Array  # () bool: the last sweep changed no unit of any row


def retrieve(
    weights,
    state,
    *,
    key: PRNGKey | None = None,
    max_sweeps: int = 100,
    synchronous: bool = False,
) -> Retrieval:
    """Runs the network from ``state`` until nothing changes (a fixed point) or ``max_sweeps`` is reached.

    Args:
        weights: ``(N, N)``.
        state: ``(*B, N)`` of ``±1``: the cue(s).
        key: asynchronous mode: a fresh random unit order per sweep is drawn from it; ``None`` sweeps the units
            in index order. Ignored in synchronous mode.
        max_sweeps: upper bound on sweeps (an asynchronous sweep updates every unit once).
        synchronous: update all units at once (can end in a 2-cycle, then ``converged`` is False).

    Returns:
        :class:`Retrieval` ``(state, sweeps, converged)``.
    """
    weights = _check_weights(weights)
    N = weights.shape[0]
    state = _check_state(state, N)
    if not isinstance(max_sweeps, (int, np.integer)) or max_sweeps < 1:
        raise ValueError(f"max_sweeps must be a positive int, got {max_sweeps!r}")
    if key is None:
        key = jax.random.key(0)
        random_order = False
    else:
        random_order = True
    return _retrieve(weights, state, key, int(max_sweeps), bool(synchronous), random_order)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _retrieve(weights, state, key, max_sweeps, synchronous, random_order):
    N = weights.shape[0]

    def cond(loop):
        _, sweeps, changed, _ = loop
        return (sweeps < max_sweeps) & changed

    def body(loop):
        s, sweeps, _, key = loop
        if synchronous:
            new = _sync(weights, s)
        else:
            key, sub = jax.random.split(key)
            order = jax.random.permutation(sub, N) if random_order else jnp.arange(N)
            new = _async(weights, s, order.astype(jnp.int32))
        return new, sweeps + 1, jnp.any(new != s), key

    start = (state, jnp.asarray(0, jnp.int32), jnp.asarray(True), key)
    final, sweeps, changed, _ = jax.lax.while_loop(cond, body, start)
    return Retrieval(state=final, sweeps=sweeps, converged=~changed)


@dataclasses.dataclass(frozen=True)
class HopfieldNetwork:
    """A classical Hopfield network holding its Hebbian weights (a convenience over the pure functions).

    Attributes:
        weights: ``(N, N)`` symmetric weights with a zero diagonal.

    Example:
        >>> net = HopfieldNetwork.store(random_patterns(jax.random.key(0), 3, 64))
        >>> net.size
        64
    """

    weights: Array

    @classmethod
    def store(cls, patterns) -> HopfieldNetwork:
        """A network storing ``patterns`` ``(P, N)`` by the Hebbian rule."""
        return cls(weights=hebbian_weights(patterns))

    @property
    def size(self) -> int:
        """``N``, the number of units."""
        return int(self.weights.shape[0])

    def energy(self, state) -> Array:
        """:func:`energy` of ``state`` ``(*B, N)`` -> ``(*B,)``."""
        return energy(self.weights, state)

    def retrieve(self, state, **options) -> Retrieval:
        """:func:`retrieve` from ``state`` ``(*B, N)``."""
        return retrieve(self.weights, state, **options)


# Capacity.


def capacity_overlaps(
    key: PRNGKey,
    size: int,
    loads,
    *,
    trials: int = 1,
    max_sweeps: int = 50,
    cue_noise: float = 0.0,
) -> np.ndarray:
    """Mean retrieval overlap of a Hebbian network of ``size`` units at each load ``P / N``.

    For every load and trial: store ``P = round(load * N)`` fresh random patterns, start the network at each
    stored pattern (with ``cue_noise`` of its units flipped), run asynchronous sweeps in random order until a
    fixed point (or ``max_sweeps``), and average the overlap between each pattern and the state retrieved from
    it. Below the capacity ``~0.138 N`` the overlap stays near 1; above it, errors avalanche and it drops to
    about 0.3 (for large ``N``; finite networks blur the transition).

    All loads share one compiled retrieval: the states are padded to the largest ``P``.

    Args:
        key: PRNG key.
        size: ``N``.
        loads: ``(L,)`` loads ``P / N``, each giving at least one pattern.
        trials: independent networks per load.
        max_sweeps: sweep limit of each retrieval.
        cue_noise: fraction of units flipped in each cue (``0``: start at the pattern itself).

    Returns:
        ``(L, trials)`` NumPy array of mean overlaps.
    """
    loads = np.asarray(loads, np.float64).reshape(-1)
    counts = np.maximum(1, np.round(loads * size).astype(int))
    if not isinstance(size, (int, np.integer)) or size < 2:
        raise ValueError(f"size must be an int >= 2, got {size!r}")
    if not isinstance(trials, (int, np.integer)) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    if not 0.0 <= float(cue_noise) <= 1.0:
        raise ValueError(f"cue_noise must be in [0, 1], got {cue_noise!r}")
    P_max = int(counts.max())
    results = np.zeros((len(loads), trials))
    for li, P in enumerate(counts):
        for trial in range(trials):
            key, sub = jax.random.split(key)
            results[li, trial] = float(
                _capacity_trial(sub, jnp.asarray(P, jnp.int32), int(size), P_max, int(max_sweeps), float(cue_noise))
            )
    return results


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _capacity_trial(key, P, N, P_max, max_sweeps, cue_noise):
    """One network with ``P`` (traced) of ``P_max`` pattern slots used: the mean retrieval overlap."""
    k_pat, k_cue, k_run = jax.random.split(key, 3)
    used = jnp.arange(P_max) < P  # (P_max,)
    patterns = random_patterns(k_pat, P_max, N)  # (P_max, N); rows >= P are not stored
    stored = patterns * used[:, None].astype(patterns.dtype)
    weights = (stored.T @ stored / N) * (1.0 - jnp.eye(N, dtype=patterns.dtype))  # hebbian_weights of the used rows
    cues = flip(k_cue, patterns, cue_noise) if cue_noise > 0 else patterns
    final = _retrieve(weights, cues, k_run, max_sweeps, False, True).state
    overlaps = overlap(final, patterns)  # (P_max,)
    return jnp.sum(jnp.where(used, overlaps, 0.0)) / P.astype(overlaps.dtype)


def theory_overlap(load: float) -> float:
    """The zero-temperature retrieval overlap of Amit, Gutfreund & Sompolinsky (1985) at load ``P / N``.

    Solves ``erf(y) = y (sqrt(2 load) + 2/sqrt(pi) exp(-y^2))`` for its largest root ``y`` and returns
    ``m = erf(y)`` (about 0.967 just below the critical load 0.138), or ``0.0`` where only ``y = 0`` solves it:
    the retrieval state no longer exists (large ``N`` limit).
    """
    import math

    if load <= 0:
        return 1.0
    ys = np.linspace(1e-3, 6.0, 6000)
    erf = np.array([math.erf(y) for y in ys])
    gap = erf - ys * (math.sqrt(2.0 * load) + 2.0 / math.sqrt(math.pi) * np.exp(-(ys**2)))
    positive = np.nonzero(gap > 0)[0]
    if len(positive) == 0:
        return 0.0
    return float(erf[positive[-1]])


# Modern continuous Hopfield network.


def _check_beta(beta) -> None:
    if not isinstance(beta, jax.core.Tracer) and not float(beta) > 0:
        raise ValueError(f"beta must be positive, got {beta!r}")


def modern_update(patterns, state, beta: float = 1.0) -> Array:
    """One update of the modern Hopfield network: ``xi <- X softmax(beta X^T xi)``.

    Args:
        patterns: ``(P, N)`` stored patterns (any real values), one per row (the columns of ``X``).
        state: ``(*B, N)`` query states ``xi``.
        beta: inverse temperature (``> 0``); large ``beta`` retrieves single patterns, small ``beta`` averages.

    Returns:
        ``(*B, N)`` the new state, a convex combination of the patterns.
    """
    patterns = _check_patterns(patterns, binary=False)
    state = _check_state(state, patterns.shape[1], binary=False)
    _check_beta(beta)
    return _modern_update(patterns, state, beta)


def _modern_update(patterns, state, beta):
    dtype = jnp.promote_types(patterns.dtype, state.dtype)
    patterns, state = patterns.astype(dtype), state.astype(dtype)
    scores = jnp.asarray(beta, dtype) * (state @ patterns.T)  # (*B, P)
    return jax.nn.softmax(scores, axis=-1) @ patterns  # (*B, N)


def modern_retrieve(patterns, state, beta: float = 1.0, num_steps: int = 1) -> Array:
    """``num_steps`` applications of :func:`modern_update` (one usually suffices).

    Returns:
        ``(*B, N)`` the retrieved state.
    """
    patterns = _check_patterns(patterns, binary=False)
    state = _check_state(state, patterns.shape[1], binary=False)
    _check_beta(beta)
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    for _ in range(int(num_steps)):
        state = _modern_update(patterns, state, beta)
    return state


def modern_energy(patterns, state, beta: float = 1.0) -> Array:
    """The energy of the modern Hopfield network (Ramsauer et al. 2020, eq. 2).

    .. math::
        E(\\xi) = -\\beta^{-1} \\log \\sum_\\mu e^{\\beta x_\\mu^T \\xi} + \\tfrac12 \\xi^T\\xi
                  + \\beta^{-1}\\log P + \\tfrac12 M^2

    Args:
        patterns: ``(P, N)``.
        state: ``(*B, N)``.
        beta: inverse temperature (``> 0``).

    Returns:
        ``(*B,)`` energies; :func:`modern_update` never increases them.
    """
    patterns = _check_patterns(patterns, binary=False)
    state = _check_state(state, patterns.shape[1], binary=False)
    _check_beta(beta)
    dtype = jnp.promote_types(patterns.dtype, state.dtype)
    patterns, state = patterns.astype(dtype), state.astype(dtype)
    beta = jnp.asarray(beta, dtype)
    P = patterns.shape[0]
    lse = jax.nn.logsumexp(beta * (state @ patterns.T), axis=-1) / beta  # (*B,)
    M = jnp.max(jnp.linalg.norm(patterns, axis=-1))
    return -lse + 0.5 * jnp.sum(state * state, axis=-1) + jnp.log(jnp.asarray(P, dtype)) / beta + 0.5 * M**2
