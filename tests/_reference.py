"""Plain NumPy references for the core tests, written from the documented equations, plus shared helpers.

The references (``*_step``, ``run``, ``unroll``, ``bidirectional``, ``stack``) run in float64 NumPy with Python
loops over time and over batch rows; they share no code with rnnjax beyond reading a cell's hyperparameters.
Carries are tuples of arrays in the field order of the cell's NamedTuple (``(h,)``, ``(y,)``, ``(h, c)``);
use :func:`to_jax_carry` / :func:`to_np` to convert. The helpers at the end build test data and share one
jitted ``unroll`` so that equal calls in different tests compile once.

Shape letters as in rnnjax: ``B`` batch, ``T`` time, ``I`` input, ``H`` hidden, ``P`` projection, ``O`` output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax

# The cell grid used by most tests: every cell kind, and every option that changes the equations at least once.
CELLS = {
    "elman-tanh": rnnjax.SimpleRNN(hidden_size=4),
    "elman-relu-nobias": rnnjax.SimpleRNN(hidden_size=4, activation="relu", use_bias=False),
    "jordan": rnnjax.JordanRNN(hidden_size=4),
    "jordan-O3-identity-relu": rnnjax.JordanRNN(
        hidden_size=4, output_size=3, activation="relu", output_activation="identity"
    ),
    "jordan-sigmoid-nobias": rnnjax.JordanRNN(hidden_size=3, output_activation="sigmoid", use_bias=False),
    "lstm": rnnjax.LSTM(hidden_size=4),
    "lstm-peep": rnnjax.LSTM(hidden_size=4, peepholes=True),
    "lstm-peep-proj": rnnjax.LSTM(hidden_size=4, peepholes=True, proj_size=3),
    "lstm-proj-nobias": rnnjax.LSTM(hidden_size=4, proj_size=2, use_bias=False),
    "gru": rnnjax.GRU(hidden_size=4),
    "gru-reset-before": rnnjax.GRU(hidden_size=4, reset_after=False),
    "gru-nobias": rnnjax.GRU(hidden_size=4, use_bias=False),
    "gru-reset-before-nobias": rnnjax.GRU(hidden_size=4, reset_after=False, use_bias=False),
}
# A smaller grid for the expensive tests: one of each kind with its richest options, and the other GRU form.
CORE = ("elman-tanh", "jordan-O3-identity-relu", "lstm-peep-proj", "gru", "gru-reset-before")


def cell_grid(fast=CORE, names=tuple(CELLS)):
    """``pytest.param`` for each cell name in ``names``; those not in ``fast`` are marked slow."""
    return [pytest.param(name, marks=() if name in fast else pytest.mark.slow) for name in names]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


_PHI = {"tanh": np.tanh, "relu": lambda x: np.maximum(x, 0.0), "sigmoid": sigmoid, "identity": lambda x: x}


def to_np(tree):
    """Every leaf as a float64 NumPy array (tuples of a NamedTuple carry become plain tuples)."""
    if isinstance(tree, tuple):
        return tuple(to_np(leaf) for leaf in tree)
    if isinstance(tree, dict):
        return {k: to_np(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_np(v) for v in tree]
    return np.asarray(jnp.asarray(tree).astype(jnp.float32) if tree.dtype == jnp.bfloat16 else tree, np.float64)


def to_jax_carry(cell, carry, dtype=jnp.float32):
    """A NumPy carry (nested tuples) as the cell's (or layer's) carry NamedTuple of ``dtype`` arrays."""
    treedef = jax.tree.structure(cell.initial_carry(()))
    return jax.tree.unflatten(treedef, [jnp.asarray(leaf, dtype) for leaf in jax.tree.leaves(carry)])


def random_params(cell, seed: int, input_size: int, scale: float = 0.5, dtype=jnp.float32):
    """``cell.init`` parameters with every leaf replaced by normal noise (biases and peepholes start at zero)."""
    params = jax.eval_shape(lambda k: cell.init(k, input_size), jax.random.key(seed))  # names and shapes only
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [jnp.asarray(scale * rng.standard_normal(leaf.shape), dtype) for leaf in leaves])


def random_carry(cell, batch_shape, seed: int, scale: float = 0.5):
    """A random NumPy carry tuple with leaves ``(*B, ...)`` in the cell's carry layout."""
    rng = np.random.default_rng(seed)

    def fill(tree):
        if isinstance(tree, tuple):
            return tuple(fill(leaf) for leaf in tree)
        return scale * rng.standard_normal(tree.shape)

    return fill(to_np(cell.initial_carry(batch_shape)))


# ---------------------------------------------------------------------------------------------------------
# One step of each cell, for one example (no batch axis): x (I,), carry leaves (H,) / (P,) / (O,).
# ---------------------------------------------------------------------------------------------------------


def elman_step(cell, p, carry, x):
    (h,) = carry
    z = x @ p["w_ih"] + h @ p["w_hh"]
    if cell.use_bias:
        z = z + p["b"]
    h = _PHI[cell.activation](z)
    return (h,), h


def jordan_step(cell, p, carry, x):
    (y,) = carry
    a = x @ p["w_ih"] + y @ p["w_yh"]
    if cell.use_bias:
        a = a + p["b_h"]
    h = _PHI[cell.activation](a)
    o = h @ p["w_hy"]
    if cell.use_bias:
        o = o + p["b_y"]
    y = _PHI[cell.output_activation](o)
    return (y,), y


def lstm_step(cell, p, carry, x):
    h, c = carry
    H = cell.hidden_size
    gates = {}
    for k, name in enumerate("ifgo"):
        cols = slice(k * H, (k + 1) * H)
        gates[name] = x @ p["w_ih"][:, cols] + h @ p["w_hh"][:, cols] + (p["b"][cols] if cell.use_bias else 0.0)
    i_pre, f_pre = gates["i"], gates["f"]
    if cell.peepholes:
        i_pre = i_pre + p["w_ci"] * c
        f_pre = f_pre + p["w_cf"] * c
    c_new = sigmoid(f_pre) * c + sigmoid(i_pre) * np.tanh(gates["g"])
    o_pre = gates["o"] + (p["w_co"] * c_new if cell.peepholes else 0.0)
    h_new = sigmoid(o_pre) * np.tanh(c_new)
    if cell.proj_size is not None:
        h_new = h_new @ p["w_hr"]
    return (h_new, c_new), h_new


def gru_step(cell, p, carry, x):
    (h,) = carry
    H = cell.hidden_size
    r_, z_, n_ = slice(0, H), slice(H, 2 * H), slice(2 * H, 3 * H)
    b_ih = p["b_ih"] if cell.use_bias else np.zeros(3 * H)
    b_hh = p["b_hh"] if cell.use_bias else np.zeros(3 * H)
    W_ih, W_hh = p["w_ih"], p["w_hh"]
    r = sigmoid(x @ W_ih[:, r_] + b_ih[r_] + h @ W_hh[:, r_] + b_hh[r_])
    z = sigmoid(x @ W_ih[:, z_] + b_ih[z_] + h @ W_hh[:, z_] + b_hh[z_])
    if cell.reset_after:
        n = np.tanh(x @ W_ih[:, n_] + b_ih[n_] + r * (h @ W_hh[:, n_] + b_hh[n_]))
    else:
        n = np.tanh(x @ W_ih[:, n_] + b_ih[n_] + (r * h) @ W_hh[:, n_] + b_hh[n_])
    h = (1.0 - z) * n + z * h
    return (h,), h


def step(cell, params, carry, x):
    """One step of any rnnjax cell (or unidirectional Stack) on one example, in NumPy."""
    if isinstance(cell, rnnjax.Stack):  # carry: (layer carries,), as StackState
        new = []
        for layer, layer_params, layer_carry in zip(cell.layers, params["layers"], carry[0]):
            layer_carry, y = step(layer, layer_params, layer_carry, x)
            if cell.residual and y.shape[-1] == x.shape[-1]:
                y = y + x
            new.append(layer_carry)
            x = y
        return (tuple(new),), x
    fn = {rnnjax.SimpleRNN: elman_step, rnnjax.JordanRNN: jordan_step, rnnjax.LSTM: lstm_step, rnnjax.GRU: gru_step}
    return fn[type(cell)](cell, params, carry, x)


# ---------------------------------------------------------------------------------------------------------
# Sequences: Python loops over time and over batch rows.
# ---------------------------------------------------------------------------------------------------------


def run(cell, params, xs, carry):
    """Runs one example ``xs`` ``(T, I)`` from ``carry``: returns ``(carry, ys)`` with ``ys`` ``(T, O)``."""
    ys = []
    for x in xs:
        carry, y = step(cell, params, carry, x)
        ys.append(y)
    return carry, (np.stack(ys) if ys else np.zeros((0, cell.output_size)))


def _index(carry, idx):
    if isinstance(carry, tuple):
        return tuple(_index(leaf, idx) for leaf in carry)
    return carry[idx]


def _assign(target, idx, value):
    if isinstance(target, tuple):
        for t, v in zip(target, value):
            _assign(t, idx, v)
    else:
        target[idx] = value


def _copy(carry):
    return tuple(_copy(leaf) for leaf in carry) if isinstance(carry, tuple) else np.array(carry, np.float64)


def unroll(cell, params, xs, carry, lengths=None, reverse=False):
    """Reference for ``rnnjax.unroll`` (batch-major): each row run alone on its valid prefix.

    Args:
        xs: ``(*B, T, I)``; carry: NumPy carry with leaves ``(*B, ...)``; lengths: ``(*B,)`` or ``None``.

    Returns:
        ``(final_carry, ys)`` with ``ys`` ``(*B, T, O)``, zero past each row's length; with ``reverse`` each
        row's valid prefix is run backwards and its outputs are written back at their original positions.
    """
    params = to_np(params)
    xs = np.asarray(xs, np.float64)
    batch_shape, num_steps = xs.shape[:-2], xs.shape[-2]
    ys = np.zeros((*batch_shape, num_steps, cell.output_size))
    final = _copy(carry)
    for idx in np.ndindex(*batch_shape):
        length = num_steps if lengths is None else int(np.asarray(lengths)[idx])
        seq = xs[idx][:length]
        row_carry, row_ys = run(cell, params, seq[::-1] if reverse else seq, _index(carry, idx))
        ys[idx][:length] = row_ys[::-1] if reverse else row_ys
        _assign(final, idx, row_carry)
    return final, ys


def bidirectional(layer, params, xs, carry, lengths=None):
    """Reference for ``Bidirectional.apply`` (batch-major), from two independent loops."""
    carry_f, ys_f = unroll(layer.forward, params["forward"], xs, carry[0], lengths)
    carry_b, ys_b = unroll(layer.backward, params["backward"], xs, carry[1], lengths, reverse=True)
    merged = {
        "concat": lambda: np.concatenate([ys_f, ys_b], axis=-1),
        "sum": lambda: ys_f + ys_b,
        "mean": lambda: (ys_f + ys_b) / 2.0,
        "none": lambda: (ys_f, ys_b),
    }[layer.merge]()
    return (carry_f, carry_b), merged


def stack(layer, params, xs, carry, lengths=None):
    """Reference for ``Stack.apply`` without dropout (batch-major); ``carry`` is ``(layer carries,)``."""
    xs = np.asarray(xs, np.float64)
    batch_shape, num_steps = xs.shape[:-2], xs.shape[-2]
    valid = np.ones((*batch_shape, num_steps, 1))
    if lengths is not None:
        valid = (np.arange(num_steps) < np.asarray(lengths)[..., None])[..., None].astype(np.float64)
    finals, hidden = [], xs
    for sub, sub_params, sub_carry in zip(layer.layers, params["layers"], carry[0]):
        if isinstance(sub, rnnjax.Bidirectional):
            sub_carry, ys = bidirectional(sub, to_np(sub_params), hidden, sub_carry, lengths)
        else:
            sub_carry, ys = unroll(sub, sub_params, hidden, sub_carry, lengths)
        if layer.residual and not isinstance(ys, tuple) and ys.shape[-1] == hidden.shape[-1]:
            ys = (ys + hidden) * valid
        finals.append(sub_carry)
        hidden = ys
    return (tuple(finals),), hidden


def assert_tree_close(actual, expected, rtol=2e-5, atol=2e-5):
    """Compares a JAX pytree (e.g. a NamedTuple carry) with a NumPy tuple tree leaf by leaf."""
    actual_leaves = jax.tree.leaves(actual)
    expected_leaves = jax.tree.leaves(expected)
    assert len(actual_leaves) == len(expected_leaves)
    for a, e in zip(actual_leaves, expected_leaves):
        assert a.shape == e.shape
        np.testing.assert_allclose(to_np(a), e, rtol=rtol, atol=atol)


def check_gradients(fn, reference_fn, args, seed: int = 0, directions: int = 3, eps: float = 1e-6):
    """Checks ``jax.grad(fn)`` against central differences of the NumPy ``reference_fn`` (float64).

    The finite differences are taken on the independent NumPy reference, so this checks both that ``fn``
    computes the reference's value and that its gradient is right, along a few random directions.

    Args:
        fn: scalar JAX function of the pytree ``args`` (float64 leaves; run under the ``enable_x64`` fixture).
        reference_fn: the same function in NumPy, taking ``args`` with NumPy leaves in the same structure.
        args: the point at which to check.
    """
    leaves, treedef = jax.tree.flatten(args)
    assert all(leaf.dtype == jnp.float64 for leaf in leaves), "run gradient checks in float64"
    value, grad = jax.jit(jax.value_and_grad(fn))(args)
    np_leaves = [np.asarray(leaf) for leaf in leaves]
    np.testing.assert_allclose(float(value), reference_fn(jax.tree.unflatten(treedef, np_leaves)), rtol=1e-9)
    grad_leaves = [np.asarray(g) for g in jax.tree.leaves(grad)]
    rng = np.random.default_rng(seed)
    for _ in range(directions):
        v = [rng.standard_normal(leaf.shape) for leaf in np_leaves]
        plus = jax.tree.unflatten(treedef, [leaf + eps * d for leaf, d in zip(np_leaves, v)])
        minus = jax.tree.unflatten(treedef, [leaf - eps * d for leaf, d in zip(np_leaves, v)])
        numeric = (reference_fn(plus) - reference_fn(minus)) / (2 * eps)
        analytic = sum(float(np.sum(g * d)) for g, d in zip(grad_leaves, v))
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), (numeric, analytic)


def weighted_sum(ys, carry, weights):
    """A scalar loss touching every output and carry leaf, for gradient checks; works on JAX and NumPy trees."""
    leaves = jax.tree.leaves((ys, carry))
    return sum((leaf * w).sum() for leaf, w in zip(leaves, weights))


def loss_weights(ys_and_carry, seed: int):
    """Random weights shaped like the leaves of ``(ys, carry)``."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(np.shape(leaf)) for leaf in jax.tree.leaves(ys_and_carry)]


# ---------------------------------------------------------------------------------------------------------
# Canonical test data. Tests share these shapes so that compiled computations are reused across tests.
# ---------------------------------------------------------------------------------------------------------

BATCH, STEPS, INPUT_SIZE = 3, 5, 3
PADDING_VALUE = 50.0  # written into padded positions: any leak into valid outputs or carries is visible

_jit_unroll = jax.jit(rnnjax.unroll, static_argnames=("core", "reverse", "time_major", "unroll", "remat"))


def jit_unroll(cell, params, xs, carry=None, *, lengths=None, reverse=False, time_major=False, unroll=1, remat=False):
    """``rnnjax.unroll`` under one shared ``jax.jit`` (the cell static, ``lengths`` traced).

    Every option is passed explicitly so that equal calls hit the same compiled program across tests.
    """
    return _jit_unroll(
        core=cell,
        params=params,
        xs=xs,
        carry=carry,
        lengths=lengths,
        reverse=reverse,
        time_major=time_major,
        unroll=unroll,
        remat=remat,
    )


def full_lengths(xs):
    """``lengths`` ``(*B,)`` int32 saying every step of batch-major ``xs`` is valid."""
    return jnp.full(xs.shape[:-2], xs.shape[-2], jnp.int32)


def make_case(cell, seed: int, batch_shape=(BATCH,), num_steps: int = STEPS, lengths=None, input_size=INPUT_SIZE):
    """Random float32 params, inputs ``(*B, T, I)`` (padding set to PADDING_VALUE) and a random carry.

    Returns:
        ``(params, xs, carry)``: params and xs as JAX float32 arrays, carry as the cell's NamedTuple. Use
        :func:`to_np` to hand exactly these values to the NumPy reference.
    """
    params = random_params(cell, seed, input_size)
    xs = np.random.default_rng(seed + 1).standard_normal((*batch_shape, num_steps, input_size))
    if lengths is not None:
        xs = np.where(np.arange(num_steps)[:, None] < np.asarray(lengths)[..., None, None], xs, PADDING_VALUE)
    carry = to_jax_carry(cell, random_carry(cell, batch_shape, seed + 2))
    return params, jnp.asarray(xs, jnp.float32), carry
