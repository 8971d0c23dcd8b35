"""rnnjax.hopfield: classical and modern Hopfield networks against plain NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax import hopfield

# Independent NumPy references: loops written straight from the definitions.


def np_hebbian(patterns):
    P, N = patterns.shape
    W = np.zeros((N, N))
    for i in range(N):
        for j in range(N):
            if i != j:
                W[i, j] = sum(patterns[mu, i] * patterns[mu, j] for mu in range(P)) / N
    return W


def np_energy(W, s):
    N = len(s)
    return -0.5 * sum(W[i, j] * s[i] * s[j] for i in range(N) for j in range(N))


def np_async_sweep(W, s, order):
    s = s.copy()
    for i in order:
        field = W[i] @ s
        if field > 0:
            s[i] = 1.0
        elif field < 0:
            s[i] = -1.0
    return s


def np_modern_update(X_rows, xi, beta):
    scores = beta * X_rows @ xi
    p = np.exp(scores - scores.max())
    p /= p.sum()
    return X_rows.T @ p


@pytest.fixture(scope="module")
def small():
    # An odd number of patterns and an even N: every local field is a sum of P odd multiples of 1/N, so never
    # zero, and float32 rounding cannot turn a tie into a flip.
    patterns = np.asarray(hopfield.random_patterns(jax.random.key(0), 5, 24), np.float64)
    return patterns, np_hebbian(patterns)


def test_random_patterns_are_binary_and_balanced():
    patterns = hopfield.random_patterns(jax.random.key(0), 50, 200)
    assert patterns.shape == (50, 200) and patterns.dtype == jnp.float32
    assert set(np.unique(np.asarray(patterns))) == {-1.0, 1.0}
    assert abs(float(patterns.mean())) < 0.02


def test_hebbian_weights_match_numpy_loop(small):
    patterns, W = small
    got = hopfield.hebbian_weights(patterns.astype(np.float32))
    np.testing.assert_allclose(got, W, rtol=1e-6, atol=1e-7)
    assert np.allclose(np.diag(got), 0) and np.allclose(got, np.asarray(got).T)


def test_energy_matches_numpy_loop(small):
    patterns, W = small
    states = np.asarray(hopfield.random_patterns(jax.random.key(3), 3, 24))
    got = hopfield.energy(W.astype(np.float32), states)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, [np_energy(W, s) for s in states], rtol=1e-5)


def test_async_sweep_matches_numpy_loop(small):
    patterns, W = small
    cues = np.asarray(hopfield.flip(jax.random.key(1), patterns, 0.3))
    order = np.asarray(jax.random.permutation(jax.random.key(2), 24))
    got = hopfield.async_update(W.astype(np.float32), cues, order=order)
    want = np.stack([np_async_sweep(W, cue, order) for cue in cues])
    np.testing.assert_array_equal(got, want)


def test_sync_update_is_sign_of_field(small):
    patterns, W = small
    cues = np.asarray(hopfield.flip(jax.random.key(1), patterns, 0.25))
    field = cues @ W
    want = np.where(field > 0, 1.0, np.where(field < 0, -1.0, cues))
    np.testing.assert_array_equal(hopfield.sync_update(W.astype(np.float32), cues), want)


def test_flip_changes_exactly_the_requested_number_of_units():
    patterns = hopfield.random_patterns(jax.random.key(0), 6, 50)
    noisy = hopfield.flip(jax.random.key(1), patterns, 0.2)
    assert np.all(np.sum(np.asarray(noisy) != np.asarray(patterns), axis=-1) == 10)
    np.testing.assert_allclose(hopfield.overlap(noisy, patterns), 0.6)


def test_energy_never_increases_under_single_unit_updates():
    """Each asynchronous single-unit update lowers the energy or leaves it unchanged (symmetric W, zero diagonal)."""
    N = 60
    patterns = hopfield.random_patterns(jax.random.key(0), 15, N)  # load 0.25: spurious minima, long descents
    W = hopfield.hebbian_weights(patterns)
    state = hopfield.random_patterns(jax.random.key(1), 8, N)
    energies = [hopfield.energy(W, state)]
    order = np.asarray(jax.random.permutation(jax.random.key(2), N))
    for i in np.concatenate([order, order[::-1]]):
        state = hopfield.async_update(W, state, order=np.array([i]))
        energies.append(hopfield.energy(W, state))
    energies = np.stack(energies)
    assert np.all(np.diff(energies, axis=0) <= 1e-5)
    assert np.any(energies[-1] < energies[0])


def test_stored_patterns_are_fixed_points_at_low_load():
    N, P = 200, 6  # load 0.03, far below 0.138
    patterns = hopfield.random_patterns(jax.random.key(0), P, N)
    W = hopfield.hebbian_weights(patterns)
    np.testing.assert_array_equal(hopfield.sync_update(W, patterns), patterns)
    result = hopfield.retrieve(W, patterns, key=jax.random.key(1))
    np.testing.assert_array_equal(result.state, patterns)
    assert bool(result.converged) and int(result.sweeps) == 1


def test_noisy_cues_are_cleaned_up_at_low_load_but_not_at_high_load():
    N = 200
    low = hopfield.random_patterns(jax.random.key(0), 10, N)  # load 0.05
    cues = hopfield.flip(jax.random.key(1), low, 0.15)
    result = hopfield.HopfieldNetwork.store(low).retrieve(cues, key=jax.random.key(2))
    assert bool(result.converged)
    assert float(hopfield.overlap(result.state, low).mean()) > 0.97
    high = hopfield.random_patterns(jax.random.key(0), 60, N)  # load 0.3: past capacity
    result = hopfield.retrieve(hopfield.hebbian_weights(high), high, key=jax.random.key(2))
    assert float(hopfield.overlap(result.state, high).mean()) < 0.8


def test_synchronous_retrieval_and_max_sweeps():
    patterns = hopfield.random_patterns(jax.random.key(0), 3, 100)
    W = hopfield.hebbian_weights(patterns)
    cues = hopfield.flip(jax.random.key(1), patterns, 0.1)
    result = hopfield.retrieve(W, cues, synchronous=True)
    np.testing.assert_array_equal(result.state, patterns)
    once = hopfield.retrieve(W, hopfield.random_patterns(jax.random.key(5), 4, 100), max_sweeps=1)
    assert int(once.sweeps) == 1


def test_modern_update_matches_numpy(small):
    patterns, _ = small
    xi = np.asarray(jax.random.normal(jax.random.key(4), (24,)))
    for beta in (0.05, 0.5, 4.0):
        got = hopfield.modern_update(patterns.astype(np.float32), xi.astype(np.float32), beta)
        np.testing.assert_allclose(got, np_modern_update(patterns, xi, beta), rtol=1e-4, atol=1e-5)


def test_modern_update_retrieves_a_pattern_in_one_step_and_lowers_energy():
    N, P = 64, 200  # P > 0.138 N: far beyond classical capacity
    patterns = hopfield.random_patterns(jax.random.key(0), P, N)
    cues = hopfield.flip(jax.random.key(1), patterns[:20], 0.2)
    retrieved = hopfield.modern_retrieve(patterns, cues, beta=1.0)
    np.testing.assert_allclose(retrieved, patterns[:20], atol=1e-3)
    before = hopfield.modern_energy(patterns, cues, beta=1.0)
    after = hopfield.modern_energy(patterns, retrieved, beta=1.0)
    assert np.all(np.asarray(after) <= np.asarray(before) + 1e-4)
    blurred = hopfield.modern_update(patterns, cues, beta=1e-4)  # tiny beta: the mean of all patterns
    np.testing.assert_allclose(blurred, jnp.broadcast_to(patterns.mean(0), blurred.shape), atol=0.02)


def test_functions_work_under_jit():
    patterns = hopfield.random_patterns(jax.random.key(0), 3, 32)
    W = jax.jit(hopfield.hebbian_weights)(patterns)
    np.testing.assert_array_equal(jax.jit(hopfield.sync_update)(W, patterns), patterns)
    np.testing.assert_allclose(jax.jit(hopfield.modern_update)(patterns, patterns, 8.0), patterns, atol=1e-4)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: hopfield.hebbian_weights(np.array([[1.0, 0.0, -1.0]])), ValueError, "patterns must contain only"),
        (lambda: hopfield.hebbian_weights(np.ones(5)), ValueError, r"patterns must have shape \(P, N\)"),
        (lambda: hopfield.hebbian_weights("abc"), TypeError, "patterns"),
        (lambda: hopfield.energy(np.ones((3, 4)), np.ones(3)), ValueError, "weights must be a square"),
        (lambda: hopfield.energy(np.ones((3, 3)), np.ones(4)), ValueError, "state must have shape"),
        (lambda: hopfield.sync_update(np.zeros((3, 3)), np.array([1.0, 0.5, -1.0])), ValueError, "state must"),
        (lambda: hopfield.async_update(np.zeros((3, 3)), np.ones(3), order=np.array([0, 3])), ValueError, "order"),
        (lambda: hopfield.async_update(np.zeros((3, 3)), np.ones(3), order=np.array([0.0])), TypeError, "order"),
        (lambda: hopfield.retrieve(np.zeros((3, 3)), np.ones(3), max_sweeps=0), ValueError, "max_sweeps"),
        (lambda: hopfield.modern_update(np.ones((2, 3)), np.ones(4)), ValueError, "state must have shape"),
        (lambda: hopfield.modern_update(np.ones((2, 3)), np.ones(3), beta=0.0), ValueError, "beta"),
        (lambda: hopfield.modern_retrieve(np.ones((2, 3)), np.ones(3), num_steps=0), ValueError, "num_steps"),
        (lambda: hopfield.random_patterns(jax.random.key(0), 0, 5), ValueError, "num_patterns"),
        (lambda: hopfield.flip(jax.random.key(0), np.ones(4), 1.5), ValueError, "fraction"),
        (lambda: hopfield.overlap(np.ones(4), np.ones(5)), ValueError, "same size"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()
