"""``rnnjax.deer.deer_unroll``: Newton (DEER) and quasi-Newton solves against sequential evaluation.

References: the NumPy loops of ``tests/_reference.py`` (no rnnjax code) for values, and ``rnnjax.unroll`` (the
sequential scan, and the native kernels for the LSTM and GRU) for values and gradients. Padded input positions
hold a large value (``make_case``), so a leak of padding into valid outputs or carries shows.
"""

import _reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import CELLS, INPUT_SIZE, assert_tree_close, jit_unroll, make_case, to_np

import rnnjax
from rnnjax import deer

TOL = 1e-5  # the agreement the module promises with sequential evaluation in float32

# One jitted entry point shared by every test, so that equal calls compile once.
_jit_deer = jax.jit(
    deer.deer_unroll,
    static_argnames=("cell", "reverse", "time_major", "jacobian", "tol", "max_iter", "fallback"),
)


def jit_deer(cell, params, xs, carry=None, *, lengths=None, reverse=False, time_major=False, **options):
    return _jit_deer(
        cell=cell, params=params, xs=xs, carry=carry, lengths=lengths, reverse=reverse, time_major=time_major, **options
    )


def assert_close(actual, expected, tol=TOL):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.shape == e.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=tol, atol=tol)


def max_difference(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def scaled(params, name: str, factor: float):
    """``params`` with the recurrent kernel ``params[name]`` multiplied by ``factor``."""
    return {**params, name: params[name] * factor}


CELLS = {**CELLS, "stack-lstm-gru": rnnjax.Stack(layers=[rnnjax.LSTM(hidden_size=3), rnnjax.GRU(hidden_size=4)])}
LENGTHS = np.array([7, 0, 4])  # a full row, an empty row and a padded one
VALUE_GRID = [
    pytest.param(name, reverse, id=f"{name}-{'reverse' if reverse else 'forward'}")
    for name, reverse in [
        ("elman-tanh", False),
        ("elman-tanh", True),
        ("lstm", False),
        ("lstm", True),
        ("gru", False),
        ("gru", True),
        ("lstm-peep-proj", False),  # a carry of two leaves of different sizes (h: P=3, c: H=4)
        ("jordan-O3-identity-relu", True),  # relu: a Jacobian with kinks
        ("stack-lstm-gru", False),  # a nested carry: StackState((LSTMState(h, c), GRUState(h)))
    ]
]


@pytest.mark.parametrize("name, reverse", VALUE_GRID)
def test_values_match_numpy_loop_and_unroll(name, reverse):
    # Given a cell, random parameters and carry, and rows of lengths T, 0 and 4 (padding holds a large value)
    cell = CELLS[name]
    params, xs, carry = make_case(cell, seed=1, num_steps=7, lengths=LENGTHS)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    # When solved by DEER
    final, ys, info = jit_deer(cell, params, xs, carry, lengths=lengths, reverse=reverse)
    # Then it converged within T + 1 iterations, to the NumPy loop and to the sequential unroll
    assert bool(info.converged) and 1 <= int(info.iterations) <= 8
    ref_final, ref_ys = ref.unroll(cell, params, xs, to_np(carry), LENGTHS, reverse)
    np.testing.assert_allclose(to_np(ys), ref_ys, rtol=2e-5, atol=2e-5)
    assert_tree_close(final, ref_final)
    seq_final, seq_ys = jit_unroll(cell, params, xs, carry, lengths=lengths, reverse=reverse)
    assert_close((final, ys), (seq_final, seq_ys))
    # And padding is exactly zero, and the empty row keeps its initial carry exactly
    np.testing.assert_array_equal(np.asarray(ys)[1], 0.0)
    np.testing.assert_array_equal(np.asarray(ys)[2, 4:], 0.0)
    for got, initial in zip(jax.tree.leaves(final), jax.tree.leaves(carry)):
        np.testing.assert_array_equal(np.asarray(got)[1], np.asarray(initial)[1])


@pytest.mark.parametrize(
    "batch_shape, num_steps, time_major",
    [
        pytest.param((1,), 1, False, id="B1-T1"),
        pytest.param((), 6, False, id="no-batch-axis"),
        pytest.param((2, 2), 5, True, id="two-batch-axes-time-major"),
        pytest.param((2,), 0, False, id="T0"),
    ],
)
def test_layouts_match_unroll(batch_shape, num_steps, time_major):
    # Given a GRU and inputs in one of unroll's layouts, with lengths when there is a batch
    cell = CELLS["gru"]
    params, xs, carry = make_case(cell, seed=2, batch_shape=batch_shape, num_steps=num_steps)
    lengths = None
    if batch_shape == (2, 2):
        lengths = jnp.array([[5, 0], [2, 4]], jnp.int32)  # (*B,)
    if time_major:
        xs = jnp.moveaxis(xs, -2, 0)  # (T, *B, I)
    # When solved by DEER and by unroll
    final, ys, info = jit_deer(cell, params, xs, carry, lengths=lengths, reverse=True, time_major=time_major)
    seq_final, seq_ys = jit_unroll(cell, params, xs, carry, lengths=lengths, reverse=True, time_major=time_major)
    # Then shapes and values agree
    assert bool(info.converged)
    assert_close((final, ys), (seq_final, seq_ys))


def test_full_and_diagonal_converge_to_the_same_trajectory():
    # Given an LSTM (H=8) at its default initialisation and T=64 random inputs
    cell = rnnjax.LSTM(hidden_size=8)
    params = cell.init(jax.random.key(0), INPUT_SIZE)
    xs = jax.random.normal(jax.random.key(1), (2, 64, INPUT_SIZE))  # (B, T, I)
    # When solved by DEER and by quasi-DEER, with a tolerance tight enough for linear convergence
    full = jit_deer(cell, params, xs, jacobian="full", tol=1e-6)
    diagonal = jit_deer(cell, params, xs, jacobian="diagonal", tol=1e-6)
    # Then both converge to the sequential result, Newton in far fewer iterations than T (measured 6 and 31)
    seq = jit_unroll(cell, params, xs)
    assert_close(full[:2], seq)
    assert_close(diagonal[:2], seq)
    assert bool(full[2].converged) and bool(diagonal[2].converged)
    assert int(full[2].iterations) <= 10 < int(diagonal[2].iterations) <= 65


def test_contractive_cell_converges_in_a_few_iterations():
    # Given an Elman cell whose recurrent weights are scaled down (every Jacobian has norm below 0.1)
    cell = rnnjax.SimpleRNN(hidden_size=8)
    params = scaled(cell.init(jax.random.key(0), INPUT_SIZE), "w_hh", 0.1)
    xs = jax.random.normal(jax.random.key(1), (2, 64, INPUT_SIZE))  # (B, T, I)
    # When solved by DEER
    final, ys, info = jit_deer(cell, params, xs)
    # Then a handful of Newton iterations suffice for T = 64
    assert bool(info.converged) and int(info.iterations) <= 5
    assert_close((final, ys), jit_unroll(cell, params, xs))


def _loss(run, weights):
    """A scalar touching every output and carry leaf: the function whose gradients are compared."""

    def loss(params, xs, carry):
        final, ys = run(params, xs, carry)[:2]
        return ref.weighted_sum(ys, final, weights)

    return loss


@pytest.mark.parametrize(
    "name, reverse, jacobian",
    [
        ("elman-tanh", False, "full"),
        ("lstm", True, "full"),
        ("gru", False, "full"),
        ("lstm", False, "diagonal"),  # the backward pass uses the full Jacobian whatever the forward iteration
    ],
)
def test_gradients_match_unroll(name, reverse, jacobian):
    # Given a cell, a padded batch and a loss on every output and the final carry
    cell = CELLS[name]
    params, xs, carry = make_case(cell, seed=3, num_steps=7, lengths=LENGTHS)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    seq_final, seq_ys = jit_unroll(cell, params, xs, carry, lengths=lengths, reverse=reverse)
    weights = [jnp.asarray(w, jnp.float32) for w in ref.loss_weights((seq_ys, seq_final), seed=4)]
    options = {"lengths": lengths, "reverse": reverse}
    deer_loss = _loss(lambda p, x, c: jit_deer(cell, p, x, c, jacobian=jacobian, tol=1e-6, **options), weights)
    seq_loss = _loss(lambda p, x, c: jit_unroll(cell, p, x, c, **options), weights)
    # When differentiated with respect to the parameters, the inputs and the initial carry
    grads = jax.jit(jax.grad(deer_loss, argnums=(0, 1, 2)))(params, xs, carry)
    expected = jax.grad(seq_loss, argnums=(0, 1, 2))(params, xs, carry)
    # Then every gradient equals the sequential one
    assert_close(grads, expected)
    assert max_difference(grads, jax.tree.map(jnp.zeros_like, grads)) > 0.1  # not trivially zero


def test_vmap_over_sequences():
    # Given a stack of independent batches (an extra leading axis that unroll would treat as batch)
    cell = CELLS["elman-tanh"]
    params, xs, carry = make_case(cell, seed=5, batch_shape=(4, 3), num_steps=6)
    # When DEER is vmapped over that axis under jit
    run = jax.jit(jax.vmap(lambda x, c: deer.deer_unroll(cell, params, x, c)))
    final, ys, info = run(xs, carry)
    # Then each slice equals the sequential result, and each slice reports its own convergence
    assert info.iterations.shape == (4,) and bool(jnp.all(info.converged))
    assert_close((final, ys), jit_unroll(cell, params, xs, carry))


def test_fallback_after_max_iter():
    # Given a GRU over 16 steps, allowed a single Newton iteration
    cell = CELLS["gru"]
    params, xs, carry = make_case(cell, seed=6, num_steps=16)
    seq_final, seq_ys = jit_unroll(cell, params, xs, carry)
    # When the iteration stops unconverged, with and without the fallback
    fell_back = jit_deer(cell, params, xs, carry, max_iter=1, fallback=True)
    raw = jit_deer(cell, params, xs, carry, max_iter=1, fallback=False)
    # Then both report it; the fallback returns the sequential result, the other the first Newton iterate
    for _, _, info in (fell_back, raw):
        assert int(info.iterations) == 1 and not bool(info.converged)
    assert_close(fell_back[:2], (seq_final, seq_ys))
    assert max_difference(raw[:2], (seq_final, seq_ys)) > 1e-2
    # And the first iterate is exact at the first step (Newton linearises around the true s_0)
    np.testing.assert_allclose(raw[1][:, 0], seq_ys[:, 0], rtol=TOL, atol=TOL)


def test_fallback_when_newton_overflows():
    # Given an Elman cell with large recurrent weights: at the zero guess every Jacobian has norm 100, so the
    # products of Jacobians in the scan overflow float32, while the tanh keeps the true trajectory bounded
    cell = rnnjax.SimpleRNN(hidden_size=4)
    params = scaled(cell.init(jax.random.key(0), INPUT_SIZE), "w_hh", 100.0)
    xs = jax.random.normal(jax.random.key(1), (2, 32, INPUT_SIZE))  # (B, T, I)
    # When solved with and without the fallback
    final, ys, info = jit_deer(cell, params, xs)
    _, raw_ys, raw_info = jit_deer(cell, params, xs, fallback=False)
    # Then the iteration stops early as non-finite, and the fallback gives the sequential result
    assert not bool(info.converged) and int(info.iterations) <= 3  # measured 1
    assert not bool(jnp.all(jnp.isfinite(raw_ys))) and not bool(raw_info.converged)
    assert_close((final, ys), jit_unroll(cell, params, xs))


def test_float64(enable_x64):
    # Given a float64 LSTM and inputs
    cell = rnnjax.LSTM(hidden_size=4, param_dtype=jnp.float64)
    params = cell.init(jax.random.key(0), INPUT_SIZE)
    xs = jax.random.normal(jax.random.key(1), (2, 12, INPUT_SIZE), jnp.float64)
    # When solved with the default tolerance (1e-12 for float64 states)
    final, ys, info = deer.deer_unroll(cell, params, xs, lengths=jnp.array([12, 5]))
    # Then the carry stays float64 and the result matches the sequential one to float64 precision
    assert ys.dtype == jnp.float64 and final.c.dtype == jnp.float64 and bool(info.converged)
    assert_close((final, ys), rnnjax.unroll(cell, params, xs, lengths=jnp.array([12, 5])), tol=1e-12)


class _IntegerCounter:
    """A step-only object whose carry is an integer count: DEER cannot differentiate by it."""

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        del dtype
        return (jnp.zeros((*batch_shape, 1), jnp.int32),)

    def input_size(self, params):
        return 2

    def step(self, params, carry, x):
        return (carry[0] + 1,), x


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"jacobian": "exact"}, ValueError, "jacobian must be one of"),
        ({"tol": 0.0}, ValueError, "tol must be a finite float > 0"),
        ({"tol": -1e-3}, ValueError, "tol must be a finite float > 0"),
        ({"tol": float("nan")}, ValueError, "tol must be a finite float > 0"),
        ({"tol": "1e-5"}, TypeError, "tol must be"),
        ({"max_iter": 0}, ValueError, "max_iter must be >= 1"),
        ({"max_iter": 2.5}, TypeError, "max_iter must be an int"),
        ({"lengths": jnp.array([3, 9])}, ValueError, "lengths must lie in"),
        ({"carry": rnnjax.SimpleRNNState(h=jnp.zeros((2, 5)))}, ValueError, "carry.*shape"),
    ],
)
def test_bad_arguments_are_named(options, error, match):
    cell = rnnjax.SimpleRNN(hidden_size=4)
    params = cell.init(jax.random.key(0), 2)
    with pytest.raises(error, match=match):
        deer.deer_unroll(cell, params, jnp.ones((2, 6, 2)), **options)


def test_bad_cells_are_named():
    xs = jnp.ones((2, 6, 2))
    with pytest.raises(TypeError, match="carry leaves must be real floating-point"):
        deer.deer_unroll(_IntegerCounter(), {}, xs)
    with pytest.raises(TypeError, match="cell must have step"):
        deer.deer_unroll(object(), {}, xs)
    with pytest.raises(TypeError, match="cell must have step"):  # a bidirectional layer has no step
        deer.deer_unroll(rnnjax.Bidirectional(forward=rnnjax.GRU(hidden_size=2)), {}, xs)
    stack = rnnjax.Stack(layers=[rnnjax.Bidirectional(forward=rnnjax.GRU(hidden_size=2))])
    with pytest.raises(TypeError, match="cell must run one step at a time"):
        deer.deer_unroll(stack, stack.init(jax.random.key(0), 2), xs)


# DEER as a method of rnnjax.unroll.

_jit_unroll_method = jax.jit(rnnjax.unroll, static_argnames=("core", "reverse", "time_major", "method"))


@pytest.mark.parametrize(
    "name, method",
    [("lstm", "deer"), ("gru", "quasi_deer"), ("elman-tanh", deer.Deer(tol=1e-6, max_iter=20))],
)
def test_unroll_method_matches_unroll_values_and_gradients(name, method):
    # Given a cell and a padded batch run backwards, with a loss on every output and the final carry
    cell = CELLS[name]
    params, xs, carry = make_case(cell, seed=5, num_steps=7, lengths=LENGTHS)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    options = {"lengths": lengths, "reverse": True}
    expected = jit_unroll(cell, params, xs, carry, **options)
    # When unroll solves it with a DEER method
    actual = _jit_unroll_method(core=cell, params=params, xs=xs, carry=carry, method=method, **options)
    # Then the values and the gradients equal the sequential scan's
    assert_close(actual, expected)
    weights = [jnp.asarray(w, jnp.float32) for w in ref.loss_weights((expected[1], expected[0]), seed=6)]
    method_loss = _loss(lambda p, x, c: _jit_unroll_method(cell, p, x, c, method=method, **options), weights)
    seq_loss = _loss(lambda p, x, c: jit_unroll(cell, p, x, c, **options), weights)
    grads = jax.grad(method_loss, argnums=(0, 1, 2))(params, xs, carry)
    assert_close(grads, jax.grad(seq_loss, argnums=(0, 1, 2))(params, xs, carry))


def test_unroll_method_is_the_registered_deer():
    assert set(rnnjax.unrolling.method_names()) >= {"deer", "quasi_deer"}
    assert rnnjax.unrolling.resolve_method("quasi_deer") == deer.Deer(jacobian="diagonal")
    assert rnnjax.unrolling.resolve_method(None) is None


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"method": "newton"}, ValueError, "method must be None, one of"),
        ({"method": 3}, TypeError, "method must be None, a name in"),
        ({"method": "deer", "remat": True}, ValueError, "remat must be left unset with method='deer'"),
        ({"method": "deer", "dropout_key": jax.random.key(0)}, ValueError, "dropout_key must be left unset"),
    ],
)
def test_unroll_method_errors_are_named(options, error, match):
    cell = rnnjax.SimpleRNN(hidden_size=4)
    with pytest.raises(error, match=match):
        rnnjax.unroll(cell, cell.init(jax.random.key(0), 2), jnp.ones((2, 6, 2)), **options)


def test_deer_objects_check_their_fields():
    with pytest.raises(ValueError, match="jacobian must be one of"):
        deer.Deer(jacobian="exact")
    with pytest.raises(ValueError, match="tol must be a finite float > 0"):
        deer.Deer(tol=0.0)
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        deer.Deer(max_iter=0)
    with pytest.raises(TypeError, match="fallback must be a bool"):
        deer.Deer(fallback=1)
    layer = rnnjax.Bidirectional(forward=rnnjax.GRU(hidden_size=2))
    with pytest.raises(TypeError, match="cell must have step"):  # a layer that cannot step is refused by name
        rnnjax.unroll(layer, layer.init(jax.random.key(0), 2), jnp.ones((2, 6, 2)), method="deer")
