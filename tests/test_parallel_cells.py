"""MinGRU, MinLSTM and LRU: NumPy references, parallel paths equal to stepping, gradients, layers, init, bf16."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnjax
from rnnjax.cells.lru import LRU, LRUState
from rnnjax.cells.minimal import MinGRU, MinGRUState, MinLSTM
from rnnjax.unrolling import masked_scan, time_mask

# (cell factory, methods its sequence path supports)
CELLS = {
    "mingru": (lambda **kw: MinGRU(hidden_size=5, **kw), ["sequential", "associative", "log"]),
    "mingru_identity": (lambda **kw: MinGRU(hidden_size=5, activation="identity", **kw), ["sequential", "associative"]),
    "minlstm": (lambda **kw: MinLSTM(hidden_size=5, **kw), ["sequential", "associative", "log"]),
    "lru": (lambda **kw: LRU(hidden_size=4, model_size=5, r_min=0.5, r_max=0.95, max_phase=2.0, **kw), ["sequential"]),
}
GRID = [(name, method) for name, (_, methods) in CELLS.items() for method in methods] + [("lru", "associative")]
# Every cell and method reversed; the default path of minGRU also forwards.
REFERENCE_GRID = [(name, method, True) for name, method in GRID] + [("mingru", "sequential", False)]
# The cells' own code for each method (the solvers themselves are tested in test_scan.py).
STEPPING_GRID = [
    ("mingru", "sequential"),
    ("mingru", "associative"),
    ("mingru", "log"),
    ("mingru_identity", "sequential"),
    ("minlstm", "sequential"),
    ("minlstm", "log"),
    ("lru", "sequential"),
]


def make(name, method=None, **kw):
    return CELLS[name][0](method=method, **kw)


def perturbed_params(cell, input_size, key=0):
    """Parameters with nonzero biases, so that every term of the equations is exercised."""
    params = cell.init(jax.random.key(key), input_size)
    if "b_ih" in params:
        params["b_ih"] = 0.5 * jax.random.normal(jax.random.key(key + 1), params["b_ih"].shape)
    return params


# Independent NumPy references: the papers' equations, one row at a time.


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_g(x):
    return np.where(x >= 0, x + 0.5, np_sigmoid(x))


def reference(cell, params, xs, h0, length, reverse):
    """Loop over one row: ``xs`` (T, I), ``h0`` the initial state. Returns (final state, ys (T, O))."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    order = range(length - 1, -1, -1) if reverse else range(length)
    if isinstance(cell, LRU):
        lam = np.exp(-np.exp(p["nu_log"]) + 1j * np.exp(p["theta_log"]))
        gamma = np.exp(p["gamma_log"])
        b_mat, c_mat = p["B_re"] + 1j * p["B_im"], p["C_re"] + 1j * p["C_im"]
        h, ys = np.array(h0, complex), np.zeros((xs.shape[0], c_mat.shape[1]))
        for t in order:
            h = lam * h + gamma * (xs[t] @ b_mat)
            skip = p["D"] * xs[t] if p["D"].ndim == 1 else xs[t] @ p["D"]
            ys[t] = np.real(h @ c_mat) + skip
        return h, ys
    H = cell.hidden_size
    h, ys = np.array(h0, np.float64), np.zeros((xs.shape[0], H))
    act = np_g if cell.activation == "g" else (lambda v: v)
    for t in order:
        proj = xs[t] @ p["w_ih"] + p["b_ih"]
        if isinstance(cell, MinGRU):
            z = np_sigmoid(proj[:H])
            h = (1 - z) * h + z * act(proj[H:])
        else:
            f, i = np_sigmoid(proj[:H]), np_sigmoid(proj[H : 2 * H])
            h = f / (f + i) * h + i / (f + i) * act(proj[2 * H :])
        ys[t] = h
    return h, ys


def state_of(carry):
    if isinstance(carry, LRUState):
        return np.asarray(carry.h_re) + 1j * np.asarray(carry.h_im)
    return np.asarray(carry.h)


@pytest.mark.parametrize("name,method,reverse", REFERENCE_GRID)
def test_unroll_matches_numpy_reference(name, method, reverse):
    # Given a batch with lengths 70, 33 and 0 (70 > one 64-step block of the fused kernel, plus a tail)
    cell = make(name, method)
    params = perturbed_params(cell, 3)
    xs = jax.random.normal(jax.random.key(2), (3, 70, 3))
    lengths = jnp.array([70, 33, 0])
    # When unrolled with lengths (and reversed within each length)
    run = jax.jit(lambda p, x, n: rnnjax.unroll(cell, p, x, lengths=n, reverse=reverse))
    carry, ys = run(params, xs, lengths)
    # Then each row equals the equations run alone, with zeros past its length
    zero = np.zeros(cell.hidden_size)
    for row in range(3):
        h_ref, ys_ref = reference(cell, params, np.asarray(xs[row], np.float64), zero, int(lengths[row]), reverse)
        tol = 2e-4 if method == "log" else 2e-5
        np.testing.assert_allclose(ys[row], ys_ref, atol=tol, rtol=tol)
        np.testing.assert_allclose(state_of(carry)[row], h_ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("name,method", STEPPING_GRID)
def test_sequence_equals_stepping_with_gradients(name, method):
    # Given a nonzero initial carry, two batch axes and a mask that ends rows early
    cell = make(name, method)
    params = perturbed_params(cell, 3, key=4)
    T = 67
    xs = jax.random.normal(jax.random.key(5), (T, 2, 2, 3))
    mask = time_mask(jnp.array([[67, 40], [1, 0]]), T)
    carry0 = jax.tree.map(lambda x: jax.random.normal(jax.random.key(6), x.shape), cell.initial_carry((2, 2)))
    weights = jax.random.normal(jax.random.key(7), (T, 2, 2, cell.output_size))

    def loss(run):
        def f(params, xs, carry):
            carry, ys = run(params, carry, xs)
            return jnp.sum(ys * weights) + sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(carry))

        return f

    def parallel(p, c, x):
        return cell.sequence(p, c, x, mask)

    def stepped(p, c, x):
        return masked_scan(cell.step, p, c, x, mask)

    # When run by the parallel path and by masked_scan over step
    (c_par, y_par), (c_step, y_step) = jax.jit(parallel)(params, carry0, xs), jax.jit(stepped)(params, carry0, xs)
    g_par = jax.jit(jax.grad(loss(parallel), argnums=(0, 1, 2)))(params, xs, carry0)
    g_step = jax.jit(jax.grad(loss(stepped), argnums=(0, 1, 2)))(params, xs, carry0)
    # Then outputs, final carries and all gradients agree
    tol = 1e-4 if method == "log" else 1e-5
    np.testing.assert_allclose(y_par, y_step, atol=tol, rtol=tol)
    for got, want in zip(jax.tree.leaves((c_par, g_par)), jax.tree.leaves((c_step, g_step))):
        np.testing.assert_allclose(got, want, atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("name,method", [("mingru", "sequential"), ("mingru", "log")])
def test_gradients_match_finite_differences(enable_x64, name, method):
    # Given float64 parameters and inputs, lengths and reverse (the custom backward passes: the fused kernel and
    # the log-space scan; the LRU's path is autodiff through rnnjax.linear_recurrence, whose VJPs test_scan.py checks)
    cell = make(name, method, param_dtype=jnp.float64)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), perturbed_params(cell, 3, key=8))
    xs = jax.random.normal(jax.random.key(9), (2, 66, 3), jnp.float64)
    weights = jax.random.normal(jax.random.key(10), (2, 66, cell.output_size), jnp.float64)

    @jax.jit
    def loss(params, xs):
        carry, ys = rnnjax.unroll(cell, params, xs, lengths=jnp.array([66, 5]), reverse=True)
        return jnp.sum(ys * weights) + sum(jnp.sum(leaf) for leaf in jax.tree.leaves(carry))

    # Then reverse-mode derivatives agree with central differences
    check_grads(loss, (params, xs), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_bidirectional_matches_reference():
    # Given a bidirectional minGRU over rows of different lengths
    layer = rnnjax.Bidirectional(MinGRU(hidden_size=4), MinLSTM(hidden_size=3))
    params = layer.init(jax.random.key(12), 3)
    xs = jax.random.normal(jax.random.key(13), (2, 8, 3))
    lengths = jnp.array([8, 5])
    _, ys = layer.apply(params, xs, lengths=lengths)
    # Then each half equals its cell run forward / backward within the row's length
    assert ys.shape == (2, 8, 7)
    for row in range(2):
        x = np.asarray(xs[row], np.float64)
        _, fwd = reference(layer.forward, params["forward"], x, np.zeros(4), int(lengths[row]), False)
        _, bwd = reference(layer.backward, params["backward"], x, np.zeros(3), int(lengths[row]), True)
        np.testing.assert_allclose(ys[row], np.concatenate([fwd, bwd], axis=-1), atol=2e-5)


def test_stack_of_parallel_cells_streams_and_trains():
    # Given a residual stack of parallel cells (LRU's output size equals its input size here)
    layers = [MinLSTM(hidden_size=6), LRU(hidden_size=8, model_size=6)]
    stack = rnnjax.Stack(layers, residual=True)
    params = stack.init(jax.random.key(14), 4)
    xs = jax.random.normal(jax.random.key(15), (2, 6, 4))
    # Then streaming equals the whole-sequence run
    _, ys = jax.jit(stack.apply)(params, xs)
    step = jax.jit(stack.step)
    carry, streamed = stack.initial_carry((2,)), []
    for t in range(6):
        carry, y = step(params, carry, xs[:, t])
        streamed.append(y)
    np.testing.assert_allclose(jnp.stack(streamed, axis=1), ys, atol=1e-5)
    # and gradients through all layers are finite and nonzero
    grads = jax.jit(jax.grad(lambda p: jnp.mean(stack.apply(p, xs, lengths=jnp.array([6, 3]))[1] ** 2)))(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)
    assert all(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in leaves)


def test_lru_initialisation_statistics():
    # Given the paper's ring initialisation with a restricted phase
    cell = LRU(hidden_size=4096, model_size=8, r_min=0.4, r_max=0.9, max_phase=math.pi / 10)
    params = cell.init(jax.random.key(16), 8)
    lam = np.asarray(cell.eigenvalues(params))
    modulus, phase = np.abs(lam), np.angle(lam)
    # Then |λ| lies on the ring, |λ|² is uniform on [r_min², r_max²], phases lie in [0, max_phase]
    assert modulus.min() >= 0.4 - 1e-6 and modulus.max() <= 0.9 + 1e-6
    np.testing.assert_allclose(np.mean(modulus**2), (0.4**2 + 0.9**2) / 2, atol=0.01)
    assert phase.min() >= 0 and phase.max() <= math.pi / 10 + 1e-6
    np.testing.assert_allclose(np.mean(phase), math.pi / 20, atol=0.01)
    # and γ normalises: γ = sqrt(1 − |λ|²)
    np.testing.assert_allclose(np.exp(params["gamma_log"]), np.sqrt(1 - modulus**2), rtol=1e-4)
    assert set(params) == {"nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im", "D"}
    assert params["B_re"].shape == (8, 4096) and params["C_re"].shape == (4096, 8) and params["D"].shape == (8,)
    np.testing.assert_allclose(np.std(params["B_re"]), 1 / math.sqrt(16), rtol=0.05)
    np.testing.assert_allclose(np.std(params["C_im"]), 1 / math.sqrt(4096), rtol=0.05)


@pytest.mark.parametrize("name", ["mingru", "minlstm", "lru"])
def test_bfloat16_compute(name):
    # Given bfloat16 compute with float32 parameters
    cell32, cell16 = make(name), make(name, dtype=jnp.bfloat16)
    params = perturbed_params(cell32, 3)
    xs = jax.random.normal(jax.random.key(17), (2, 70, 3))
    c32, y32 = jax.jit(lambda p, x: rnnjax.unroll(cell32, p, x))(params, xs)
    c16, y16 = jax.jit(lambda p, x: rnnjax.unroll(cell16, p, x))(params, xs.astype(jnp.bfloat16))
    # Then outputs are bfloat16, the carry stays float32, and the numbers are close to float32's
    assert y16.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(c16))
    np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=0.1, rtol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("cls", [MinGRU, MinLSTM])
def test_log_space_cells_are_finite_at_16384_steps(cls, dtype):
    # Given the log-space form over T=16,384 steps in float32 and in bfloat16
    cell = cls(hidden_size=8, method="log", dtype=dtype, param_dtype=dtype)
    params = perturbed_params(cell, 4)
    xs = (2.0 * jax.random.normal(jax.random.key(18), (2, 16384, 4))).astype(dtype)

    def loss(params, xs):
        return jnp.mean(rnnjax.unroll(cell, params, xs)[1].astype(jnp.float32) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, xs)
    # Then the loss and every gradient are finite
    assert bool(jnp.isfinite(value))
    assert all(bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32)))) for leaf in jax.tree.leaves(grads))


def test_cells_are_hashable_and_validate():
    assert hash(MinGRU(hidden_size=4)) == hash(MinGRU(hidden_size=4))
    assert MinLSTM(hidden_size=4).output_size == 4
    assert LRU(hidden_size=4).output_size == 4 and LRU(hidden_size=4, model_size=7).output_size == 7
    assert isinstance(MinGRU(hidden_size=2).initial_carry(3), MinGRUState)
    with pytest.raises(ValueError, match="needs activation='g'"):
        MinGRU(hidden_size=4, activation="identity", method="log")
    with pytest.raises(ValueError, match="method must be one of"):
        MinLSTM(hidden_size=4, method="parallel")
    with pytest.raises(ValueError, match="r_min <= r_max"):
        LRU(hidden_size=4, r_min=0.9, r_max=0.5)
    with pytest.raises(ValueError, match="max_phase"):
        LRU(hidden_size=4, max_phase=0.0)
    with pytest.raises(ValueError, match="method must be one of"):
        LRU(hidden_size=4, method="log")
