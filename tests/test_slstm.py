"""Tests of :class:`rnnjax.cells.slstm.SLSTM` against independent references.

References: a plain float64 loop over the paper's equations (Beck et al. 2024, §2.2) written once for NumPy and
for ``jax.numpy`` (for gradients), in the *unstabilised* form ``c̄_t = f_t c̄_{t-1} + i_t z_t``,
``n̄_t = f_t n̄_{t-1} + i_t`` with ``i_t = exp(ĩ)``, which the cell's stabilised states must equal times
``exp(−m_t)``; and, when installed, the official ``xlstm`` package's sLSTM cell on its "vanilla" PyTorch backend
(``pip install --no-deps xlstm==2.0.6``), with the same weights copied in.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from rnnjax.cells.slstm import SLSTM, SLSTMState

B, T, I = 3, 7, 5  # batch, time steps, input features


def normal(seed, shape, scale=1.0):
    return scale * np.random.default_rng(seed).standard_normal(shape)


def make_params(cell, seed, dtype=jnp.float32):
    """Parameters moved off their initial values (``r`` starts at zero), so every term is exercised."""
    params = cell.init(jax.random.key(seed), I)
    return {
        k: jnp.asarray(np.asarray(v, np.float64) + normal(seed + j, v.shape, 0.4), dtype)
        for j, (k, v) in enumerate(sorted(params.items()))
    }


def make_carry(cell, seed, batch_shape=(B,), dtype=jnp.float32):
    """A nonzero carry with a positive normaliser ``n``, as any carry the cell produced has."""
    shape = (*batch_shape, cell.hidden_size)
    rng = np.random.default_rng(seed)
    return SLSTMState(
        h=jnp.asarray(rng.uniform(-0.9, 0.9, shape), dtype),
        c=jnp.asarray(rng.standard_normal(shape), dtype),
        n=jnp.asarray(rng.uniform(1.0, 3.0, shape), dtype),
        m=jnp.asarray(rng.standard_normal(shape), dtype),
    )


def dense_r(r, xp=np):
    """The block-diagonal ``(H, 4H)`` recurrent kernel from the per-head blocks ``r`` ``(K, D, 4D)``, by loops."""
    K, D, _ = r.shape
    H = K * D
    rows = []
    for k in range(K):
        row = []
        for g in range(4):
            for j in range(K):
                row.append(r[k, :, g * D : (g + 1) * D] if j == k else xp.zeros((D, D), r.dtype))
        rows.append(xp.concatenate(row, axis=1))
    dense = xp.concatenate(rows, axis=0)
    assert dense.shape == (H, 4 * H)
    return dense


def reference(params, xs, carry, forget_gate="sigmoid", xp=np):
    """The paper's sLSTM in float64, unstabilised, stepped over a batch ``xs`` ``(B, T, I)`` (``xp``: np or jnp).

    The carry ``(h, c, n, m)`` of the cell stands for the unstabilised ``c̄ = c e^m`` and ``n̄ = n e^m``.

    Returns:
        ``(h_T, c̄_T, n̄_T, ys, trace)`` with ``ys`` ``(B, T, H)`` and ``trace`` the list of
        ``(c̄_t, n̄_t, ĩ_t, log f_t)``, each ``(B, H)``.
    """
    w, r, b = (xp.asarray(params[k], xp.float64) for k in ("w_ih", "r", "b"))
    R = dense_r(r, xp)
    H = R.shape[0]
    h, c, n, m = (xp.asarray(leaf, xp.float64) for leaf in carry)
    c_bar, n_bar = c * xp.exp(m), n * xp.exp(m)
    ys, trace = [], []
    for t in range(xs.shape[1]):
        pre = xp.asarray(xs[:, t], xp.float64) @ w + h @ R + b  # (B, 4H)
        i_pre, f_pre, z_pre, o_pre = (pre[:, g * H : (g + 1) * H] for g in range(4))
        log_f = f_pre if forget_gate == "exp" else -xp.log1p(xp.exp(-f_pre))
        c_bar = xp.exp(log_f) * c_bar + xp.exp(i_pre) * xp.tanh(z_pre)
        n_bar = xp.exp(log_f) * n_bar + xp.exp(i_pre)
        h = 1.0 / (1.0 + xp.exp(-o_pre)) * c_bar / n_bar
        ys.append(h)
        trace.append((c_bar, n_bar, i_pre, log_f))
    return h, c_bar, n_bar, xp.stack(ys, axis=1), trace


def stabiliser(m0, n0, trace):
    """The paper's stabiliser ``m_t = max(log f_t + m_{t-1}, ĩ_t)``, ``m_t = ĩ_t`` while ``n_{t-1} = 0``."""
    m, empty = np.asarray(m0, np.float64), np.asarray(n0) == 0
    for _, _, i_pre, log_f in trace:
        m = np.where(empty, i_pre, np.maximum(log_f + m, i_pre))
        empty = np.zeros_like(empty)
    return m


@functools.partial(jax.jit, static_argnums=0)
def run(cell, params, xs, carry, lengths=None):
    return rnnjax.unroll(cell, params, xs, carry, lengths=lengths)


# Values against the paper.


@pytest.mark.parametrize(
    "forget_gate, num_heads, given_carry",
    [("sigmoid", 1, False), ("sigmoid", 2, True), ("exp", 4, False)],
    ids=["sigmoid-1-zero", "sigmoid-2-given", "exp-4-zero"],
)
def test_matches_the_papers_equations_in_float64(forget_gate, num_heads, given_carry):
    # Given a cell of 8 units in 1, 2 or 4 heads and float32 parameters, inputs and carry
    cell = SLSTM(hidden_size=8, num_heads=num_heads, forget_gate=forget_gate)
    params = make_params(cell, seed=num_heads)
    xs = jnp.asarray(normal(10, (B, T, I)), jnp.float32)
    carry = make_carry(cell, 20) if given_carry else cell.initial_carry((B,))
    # When unrolled, and run through the float64 unstabilised reference
    final, ys = run(cell, params, xs, carry)
    h, c_bar, n_bar, want_ys, trace = reference(params, np.asarray(xs), carry, forget_gate)
    # Then the outputs agree, and the stabilised states are the unstabilised ones times exp(−m)
    np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5)
    m = stabiliser(carry.m, carry.n, trace)
    np.testing.assert_allclose(final.m, m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final.c, c_bar * np.exp(-m), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final.n, n_bar * np.exp(-m), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final.h, h, rtol=1e-5, atol=1e-5)


def test_first_step_from_the_zero_carry_starts_the_memory():
    # Given the zero carry (n = 0: an empty memory)
    cell = SLSTM(hidden_size=4, num_heads=2)
    params = make_params(cell, seed=3)
    x = jnp.asarray(normal(4, (B, I)), jnp.float32)
    carry, y = jax.jit(cell.step)(params, cell.initial_carry((B,)), x)
    # Then m_1 = ĩ_1, n_1 = 1, c_1 = tanh(z̃_1) and h_1 = σ(õ_1) tanh(z̃_1)
    pre = np.asarray(x, np.float64) @ np.asarray(params["w_ih"], np.float64) + np.asarray(params["b"], np.float64)
    i_pre, _, z_pre, o_pre = np.split(pre, 4, axis=-1)
    np.testing.assert_allclose(carry.m, i_pre, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(carry.n, 1.0)
    np.testing.assert_allclose(carry.c, np.tanh(z_pre), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, np.tanh(z_pre) / (1 + np.exp(-o_pre)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("forget_gate, input_shift", [("sigmoid", 100.0), ("exp", 100.0), ("sigmoid", -100.0)])
def test_stabilisation_keeps_float32_finite_where_exp_overflows(forget_gate, input_shift):
    # Given input-gate pre-activations near ±100 (exp(100) overflows float32, exp(-100) underflows it) and a
    # strongly open forget gate; from the empty memory, ĩ ≈ -100 makes exp(log f + m_0 - m_1) ≈ exp(100)
    cell = SLSTM(hidden_size=4, forget_gate=forget_gate)
    params = make_params(cell, seed=5)
    params["b"] = params["b"].at[:4].add(input_shift).at[4:8].add(20.0)
    xs = jnp.asarray(normal(6, (B, 20, I)), jnp.float32)
    zero = cell.initial_carry((B,))
    # When unrolled in float32 and run through the float64 unstabilised reference (which does not overflow)
    final, ys = run(cell, params, xs, zero)
    want_ys = reference(params, np.asarray(xs), zero, forget_gate)[3]
    # Then the float32 outputs are finite and equal the float64 ones
    assert np.isfinite(np.asarray(ys)).all() and all(np.isfinite(np.asarray(leaf)).all() for leaf in final)
    np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5)
    if input_shift < 0:  # and so are the gradients through the clamped f' of the empty memory
        grads = jax.jit(jax.grad(lambda p: jnp.sum(run(cell, p, xs, zero)[1])))(params)
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_recurrent_matrices_are_the_block_diagonal_r_of_each_gate():
    cell = SLSTM(hidden_size=6, num_heads=3)
    params = make_params(cell, seed=7)
    matrices = cell.recurrent_matrices(params)
    want = dense_r(np.asarray(params["r"]))  # (H, 4H)
    assert list(matrices) == ["r/i", "r/f", "r/z", "r/o"]
    for g, name in enumerate(matrices):
        np.testing.assert_array_equal(matrices[name], want[:, g * 6 : (g + 1) * 6])
        off_blocks = np.kron(1 - np.eye(3), np.ones((2, 2))).astype(bool)
        np.testing.assert_array_equal(np.asarray(matrices[name])[off_blocks], 0.0)


# Gradients.


@pytest.mark.usefixtures("enable_x64")
@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_gradients_equal_those_of_the_unstabilised_reference(forget_gate):
    # Given float64 parameters, inputs and carry, and a loss of the outputs and of h and c / n at the end
    cell = SLSTM(hidden_size=4, num_heads=2, forget_gate=forget_gate)
    params = make_params(cell, seed=8, dtype=jnp.float64)
    xs = jnp.asarray(normal(9, (2, 4, I)), jnp.float64)
    carry = make_carry(cell, 11, (2,), jnp.float64)
    weights = jnp.asarray(normal(12, (2, 4, 4)))

    def loss(args):
        final, ys = rnnjax.unroll(cell, *args)
        return jnp.sum(ys * weights) + jnp.sum(jnp.sin(final.h)) + jnp.sum(final.c / final.n)

    def reference_loss(args):
        h, c_bar, n_bar, ys, _ = reference(*args, forget_gate, xp=jnp)
        return jnp.sum(ys * weights) + jnp.sum(jnp.sin(h)) + jnp.sum(c_bar / n_bar)

    # When both are differentiated with respect to (params, xs, carry)
    args = (params, xs, carry)
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    value, grads = value_and_grad(args)
    want_value, want = jax.jit(jax.value_and_grad(reference_loss))(args)
    # Then the losses and every gradient agree, m's included (it is the log scale of c and n)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-11)
    # and a central difference along one direction agrees too
    direction = jax.tree.map(lambda leaf: jnp.asarray(normal(13, leaf.shape)), args)
    eps = 1e-6
    shifted = [jax.tree.map(lambda a, d, s=s: a + s * eps * d, args, direction) for s in (1, -1)]
    numeric = (value_and_grad(shifted[0])[0] - value_and_grad(shifted[1])[0]) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


# The protocol: stepping, lengths, batch shapes, bfloat16.


@pytest.mark.parametrize("batch_shape", [(), (2, 3)], ids=["none", "2x3"])
def test_stepping_equals_unroll(batch_shape):
    cell = SLSTM(hidden_size=8, num_heads=2)
    params = make_params(cell, seed=14)
    xs = jnp.asarray(normal(15, (*batch_shape, T, I)), jnp.float32)
    carry = make_carry(cell, 16, batch_shape)
    final, ys = run(cell, params, xs, carry)
    stepped, want, step = carry, [], jax.jit(cell.step)
    for t in range(T):
        stepped, y = step(params, stepped, xs[..., t, :])
        want.append(y)
    np.testing.assert_allclose(ys, jnp.stack(want, axis=-2), rtol=1e-6, atol=1e-6)
    for got, expected in zip(final, stepped):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_variable_lengths_equal_each_row_alone_and_length_zero_keeps_the_carry():
    cell = SLSTM(hidden_size=4, num_heads=2)
    params = make_params(cell, seed=17)
    xs = jnp.asarray(normal(18, (B, T, I)), jnp.float32)
    carry = make_carry(cell, 19)
    lengths = (T, 3, 0)
    final, ys = run(cell, params, xs, carry, jnp.array(lengths))
    for b, n in enumerate(lengths):
        row_carry = jax.tree.map(lambda leaf, b=b: leaf[b : b + 1], carry)
        if n:
            want_final, want_ys = run(cell, params, xs[b : b + 1, :n], row_carry)
            np.testing.assert_allclose(ys[b, :n], want_ys[0], rtol=1e-6, atol=1e-6)
        else:
            want_final = row_carry
        for got, expected in zip(final, want_final):
            np.testing.assert_allclose(got[b], expected[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(ys[b, n:], 0.0)
    # and the partial row agrees with the float64 reference on its prefix
    want_ys = reference(params, np.asarray(xs[1:2, :3]), jax.tree.map(lambda leaf: leaf[1:2], carry))[3]
    np.testing.assert_allclose(ys[1:2, :3], want_ys, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_a_float32_carry_and_stays_close():
    cell32 = SLSTM(hidden_size=8, num_heads=2)
    cell16 = SLSTM(hidden_size=8, num_heads=2, dtype=jnp.bfloat16)
    params = make_params(cell32, seed=21)
    xs = jnp.asarray(normal(22, (B, T, I)), jnp.float32)
    carry = make_carry(cell32, 23)
    final32, ys32 = run(cell32, params, xs, carry, jnp.array([T, 4, 0]))
    final16, ys16 = run(cell16, params, xs, carry, jnp.array([T, 4, 0]))
    assert ys16.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in final16)
    np.testing.assert_allclose(ys16.astype(jnp.float32), ys32, rtol=3e-2, atol=3e-2)
    for got, expected in zip(final16, final32):
        np.testing.assert_allclose(got, expected, rtol=3e-2, atol=3e-2)
    # bfloat16 parameters too: the carry still holds its float32
    params16 = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), params)
    final, ys = run(SLSTM(hidden_size=8, num_heads=2, param_dtype=jnp.bfloat16), params16, xs, carry)
    assert ys.dtype == jnp.bfloat16 and all(leaf.dtype == jnp.float32 for leaf in final)
    assert np.isfinite(np.asarray(ys.astype(jnp.float32))).all()


# Initialisation and hyperparameters.


def test_init_follows_the_official_code():
    # Given the default cell and one of each init option, initialised in one compiled program
    cells = {
        "default": SLSTM(hidden_size=8, num_heads=2),
        "one unit": SLSTM(hidden_size=2, num_heads=2),
        "small": SLSTM(hidden_size=4, bias_init="small_init"),
        "standard": SLSTM(hidden_size=4, bias_init="standard", recurrent_init="standard"),
        "orthogonal": SLSTM(hidden_size=4, recurrent_init="orthogonal", kernel_init="zeros"),
        "bfloat16": SLSTM(hidden_size=4, param_dtype=jnp.bfloat16),
    }
    inits = jax.jit(lambda key: {name: cell.init(key, 40) for name, cell in cells.items()})(jax.random.key(0))
    params = inits["default"]
    assert {k: v.shape for k, v in params.items()} == {"w_ih": (40, 32), "r": (2, 4, 16), "b": (32,)}
    assert all(v.dtype == jnp.float32 for v in params.values())
    np.testing.assert_array_equal(params["r"], 0.0)  # recurrent_weight_init="zeros"
    b = np.asarray(params["b"]).reshape(4, 2, 4)  # (gate, head, unit)
    np.testing.assert_array_equal(b[[0, 2, 3]], 0.0)
    # the forget bias of each head falls from 5 to -7 as 5 - 12 (j / (D - 1))^0.3
    np.testing.assert_allclose(b[1], np.tile(5 - 12 * (np.arange(4) / 3) ** 0.3, (2, 1)), rtol=1e-6)
    assert abs(np.std(params["w_ih"]) - np.sqrt(2 / (5 * 40))) < 0.02  # "small init" N(0, 2 / (5 I))
    # the other options
    np.testing.assert_array_equal(inits["one unit"]["b"], [0, 0, 5, 5, 0, 0, 0, 0])  # D = 1: the ramp's start
    np.testing.assert_allclose(inits["small"]["b"][4:8], [3, 4, 5, 6], rtol=1e-6)
    standard = inits["standard"]
    assert np.all(np.abs(standard["b"]) <= 0.5) and np.all(np.abs(standard["r"]) <= 0.5)
    assert np.any(standard["r"] != 0.0)
    orthogonal = inits["orthogonal"]
    np.testing.assert_array_equal(orthogonal["w_ih"], 0.0)
    for block in np.split(np.asarray(orthogonal["r"][0]), 4, axis=-1):
        np.testing.assert_allclose(block @ block.T, np.eye(4), atol=1e-5)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in inits["bfloat16"].values())


def test_registered_and_hashable():
    cell = rnnjax.make_cell("slstm", hidden_size=4)
    assert cell == SLSTM(hidden_size=4) and hash(cell) == hash(SLSTM(hidden_size=4))
    assert cell.num_heads == 1 and cell.forget_gate == "sigmoid" and cell.output_size == 4


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"num_heads": 3}, ValueError, r"^num_heads must divide hidden_size, got num_heads=3 and hidden_size=4"),
        ({"num_heads": 0}, ValueError, r"^num_heads must be a positive int"),
        ({"num_heads": 2.0}, TypeError, r"^num_heads must be a positive int"),
        ({"forget_gate": "tanh"}, ValueError, r"^forget_gate must be one of \('sigmoid', 'exp'\)"),
        ({"bias_init": "ones"}, ValueError, r"^bias_init must be one of"),
        ({"kernel_init": "uniform"}, ValueError, r"^kernel_init must be one of"),
        ({"recurrent_init": "identity"}, ValueError, r"^recurrent_init must be one of"),
        ({"hidden_size": 0}, ValueError, r"^hidden_size must be a positive int"),
        ({"dtype": jnp.int32}, TypeError, r"^dtype must be a floating-point dtype"),
    ],
)
def test_bad_hyperparameters_name_the_argument(options, error, message):
    with pytest.raises(error, match=message):
        SLSTM(**{"hidden_size": 4, **options})


# The official implementation (xlstm, vanilla PyTorch backend).


def official_cell(cell, params):
    """The ``xlstm`` sLSTM cell (vanilla backend, float32) holding ``params``'s ``r`` and ``b``."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("xlstm")
    from xlstm.blocks.slstm.cell import sLSTMCell, sLSTMCellConfig

    K, D = cell.num_heads, cell.hidden_size // cell.num_heads
    config = sLSTMCellConfig(
        hidden_size=cell.hidden_size, num_heads=K, backend="vanilla", output_shape="BSH", dtype="float32"
    )
    official = sLSTMCell(config)
    if params is not None:
        r = torch.from_numpy(np.array(params["r"], np.float32).reshape(K, D, 4, D))  # (head, in, gate, out)
        b = torch.from_numpy(np.array(params["b"], np.float32).reshape(4, K, D)).permute(1, 0, 2)  # (head, gate, D)
        with torch.no_grad():
            official._recurrent_kernel_.copy_(official._recurrent_kernel_ext2int(r))
            official._bias_.copy_(official._bias_ext2int(b))
    return torch, official


@pytest.mark.parametrize("num_heads, given_carry", [(1, False), (2, True)], ids=["1-zero-carry", "2-given-carry"])
def test_matches_the_official_xlstm_cell(num_heads, given_carry):
    # Given our cell's parameters copied into the official cell, which takes x_t W_ih as its input
    cell = SLSTM(hidden_size=8, num_heads=num_heads)
    params = make_params(cell, seed=30 + num_heads)
    torch, official = official_cell(cell, params)
    xs = jnp.asarray(normal(31, (B, 12, I)), jnp.float32)
    carry = make_carry(cell, 32) if given_carry else cell.initial_carry((B,))
    # When both run the sequence
    final, ys = run(cell, params, xs, carry)
    wx = torch.from_numpy(np.asarray(xs) @ np.asarray(params["w_ih"]))  # (B, T, 4H)
    state = torch.from_numpy(np.stack([np.asarray(leaf) for leaf in carry]))  # (4, B, H): h, c, n, m
    with torch.no_grad():
        want_ys, want_state = official(wx, state)
    # Then outputs and the four states agree in float32
    np.testing.assert_allclose(ys, want_ys.numpy(), rtol=1e-5, atol=1e-5)
    for got, expected in zip(final, want_state.numpy()):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_default_init_equals_the_official_cells():
    cell = SLSTM(hidden_size=8, num_heads=2)
    _, official = official_cell(cell, None)
    params = cell.init(jax.random.key(0), 3)
    np.testing.assert_allclose(params["b"], official._bias_.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(official._recurrent_kernel_.detach().numpy(), 0.0)
    np.testing.assert_array_equal(params["r"], 0.0)
