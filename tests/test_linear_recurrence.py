"""rnnjax.linear_recurrence: the three solvers against a plain NumPy loop, with lengths, reverse, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rnnjax import linear_recurrence

METHODS = ["sequential", "associative", "log"]


def reference(a, b, h0, lengths=None, reverse=False):
    """NumPy loop of h_t = a_t h_{t-1} + b_t per row of (T, R, F) arrays, within each row's length."""
    a = np.broadcast_to(a, b.shape)
    hs, h_last = np.zeros_like(b), np.array(h0, copy=True)
    for row in range(b.shape[1]):
        length = b.shape[0] if lengths is None else int(lengths[row])
        h = np.array(h0[row], copy=True)
        for t in range(length - 1, -1, -1) if reverse else range(length):
            h = a[t, row] * h + b[t, row]
            hs[t, row] = h
        h_last[row] = h
    return h_last, hs


def coefficients(T=9, R=3, F=4, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.2, 0.99, (T, R, F))
    b = rng.normal(size=(T, R, F))
    h0 = rng.normal(size=(R, F))
    return a, b, h0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_matches_numpy_loop(method, reverse, with_lengths):
    # Given coefficients in (0, 1), signed inputs and a nonzero initial state
    a, b, h0 = coefficients()
    lengths = np.array([9, 4, 0]) if with_lengths else None
    # When solved with each method
    a, b, h0 = (x.astype(np.float32) for x in (a, b, h0))
    h_last, hs = linear_recurrence.linear_scan(a, b, h0, lengths=lengths, reverse=reverse, method=method)
    # Then it equals the loop: zeros past each length, the state after the last valid step
    ref_last, ref_hs = reference(a, b, h0, lengths, reverse)
    np.testing.assert_allclose(hs, ref_hs, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(h_last, ref_last, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("method", ["sequential", "associative"])
def test_complex_time_invariant_coefficients(method):
    # Given one complex coefficient per feature (an LRU's eigenvalues), broadcast over time and rows
    rng = np.random.default_rng(1)
    lam = rng.uniform(0.5, 0.95, 4) * np.exp(1j * rng.uniform(0, 3, 4))
    b = rng.normal(size=(7, 2, 4)) + 1j * rng.normal(size=(7, 2, 4))
    h_last, hs = linear_recurrence.linear_scan(
        lam.astype(np.complex64), b.astype(np.complex64), lengths=np.array([7, 3])
    )
    ref_last, ref_hs = reference(lam, b, np.zeros((2, 4), complex), [7, 3])
    assert hs.dtype == jnp.complex64
    np.testing.assert_allclose(hs, ref_hs, atol=1e-5)
    np.testing.assert_allclose(h_last, ref_last, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_finite_differences(enable_x64, method):
    # Given float64 coefficients, lengths and reverse (every branch of the custom backward passes)
    a, b, h0 = coefficients(T=6, R=2, F=3, seed=2)
    weights = np.random.default_rng(3).normal(size=b.shape)

    def loss(a, b, h0):
        h_last, hs = linear_recurrence.linear_scan(a, b, h0, lengths=np.array([6, 4]), reverse=True, method=method)
        return jnp.sum(hs * weights) + jnp.sum(h_last**2)

    # Then reverse-mode derivatives agree with central differences
    args = (jnp.asarray(a), jnp.asarray(b), jnp.asarray(h0))
    check_grads(jax.jit(loss), args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["sequential", "associative"])
def test_complex_gradients_match_autodiff_of_a_plain_scan(method):
    rng = np.random.default_rng(4)
    lam = jnp.asarray((rng.uniform(0.5, 0.9, 3) * np.exp(1j * rng.uniform(0, 3, 3))).astype(np.complex64))
    b = jnp.asarray((rng.normal(size=(5, 2, 3)) + 1j * rng.normal(size=(5, 2, 3))).astype(np.complex64))
    weights = jnp.asarray(rng.normal(size=(5, 2, 3)).astype(np.complex64))

    def plain(lam, b):
        def step(h, b_t):
            h = lam * h + b_t
            return h, h

        return jax.lax.scan(step, jnp.zeros((2, 3), jnp.complex64), b)[1]

    def loss(solve):
        return lambda lam, b: jnp.sum(jnp.real(solve(lam, b) * weights))

    ours = jax.jit(
        jax.grad(loss(lambda lam, b: linear_recurrence.linear_scan(lam, b, method=method)[1]), argnums=(0, 1))
    )(lam, b)
    theirs = jax.jit(jax.grad(loss(plain), argnums=(0, 1)))(lam, b)
    for x, y in zip(ours, theirs):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_log_linear_scan_takes_log_coefficients_and_zero_inputs():
    # Given log a and log b with b = 0 (log b = -inf) at some steps
    a, b, h0 = coefficients(seed=5)
    b = np.abs(b)
    b[2:5] = 0.0
    with np.errstate(divide="ignore"):
        log_b = np.log(b)
    h_last, hs = linear_recurrence.log_linear_scan(np.log(a), log_b, h0, lengths=np.array([9, 6, 1]))
    ref_last, ref_hs = reference(a, b, h0, [9, 6, 1])
    np.testing.assert_allclose(hs, ref_hs, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(h_last, ref_last, atol=2e-5, rtol=2e-5)
    # and the gradient is finite where log b = -inf
    grads = jax.grad(lambda la, lb: jnp.sum(linear_recurrence.log_linear_scan(la, lb, h0)[1]), argnums=(0, 1))(
        jnp.log(jnp.asarray(a, jnp.float32)), jnp.asarray(log_b, jnp.float32)
    )
    assert all(bool(jnp.all(jnp.isfinite(grad))) for grad in grads)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_log_space_is_finite_at_16384_steps(dtype):
    # Given gates near 0.5 over T=16,384 steps: the product of the a_t underflows any float by far
    T = 16384
    u = jax.random.normal(jax.random.key(0), (T, 2, 4)).astype(dtype)
    log_a = -jax.nn.softplus(u)
    log_b = -jax.nn.softplus(-u) + jax.random.normal(jax.random.key(1), (T, 2, 4)).astype(dtype)

    def loss(log_a, log_b):
        return jnp.sum(linear_recurrence.log_linear_scan(log_a, log_b, jnp.ones((2, 4), dtype))[1] ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(log_a, log_b)
    # Then values and gradients stay finite, and the states match the sequential solver up to the log-space
    # precision loss (about |sum log a| * eps relative, here ~1e-3)
    assert bool(jnp.isfinite(value)) and all(bool(jnp.all(jnp.isfinite(x))) for x in grads)
    hs_log = jax.jit(lambda la, lb: linear_recurrence.log_linear_scan(la, lb, jnp.ones((2, 4)))[1])(log_a, log_b)
    a, b = jnp.exp(log_a.astype(jnp.float32)), jnp.exp(log_b.astype(jnp.float32))
    hs_seq = jax.jit(lambda a, b: linear_recurrence.linear_scan(a, b, jnp.ones((2, 4)))[1])(a, b)
    np.testing.assert_allclose(hs_log, hs_seq, rtol=1e-2, atol=1e-4)


def test_sixteen_bit_inputs_are_solved_in_float32():
    a, b, h0 = coefficients()
    _, hs = linear_recurrence.linear_scan(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))
    assert hs.dtype == jnp.float32


def test_default_method_per_backend():
    assert linear_recurrence.default_method(16384, "cpu") == "sequential"
    assert linear_recurrence.default_method(64, "gpu") == "sequential"
    assert linear_recurrence.default_method(4096, "gpu") == "associative"
    assert linear_recurrence.default_method(4096, "tpu") == "associative"


def test_invalid_arguments_raise():
    a, b, h0 = coefficients()
    with pytest.raises(ValueError, match="method must be one of"):
        linear_recurrence.linear_scan(a, b, method="parallel")
    with pytest.raises(ValueError, match="must broadcast"):
        linear_recurrence.linear_scan(a[:, :2], b)
    with pytest.raises(ValueError, match="h0 must have shape"):
        linear_recurrence.linear_scan(a, b, h0[:2])
    with pytest.raises(ValueError, match="real coefficients"):
        linear_recurrence.linear_scan(a.astype(np.complex64), b.astype(np.complex64), method="log")
    with pytest.raises(ValueError, match="lengths must lie in"):
        linear_recurrence.linear_scan(a, b, lengths=np.array([10, 1, 1]))
