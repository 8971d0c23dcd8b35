"""The fused LSTM/GRU sequence paths and chunked remat equal plain stepping, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from rnnjax.unrolling import masked_scan, time_mask

FUSED_CELLS = {
    "lstm": lambda dtype: rnnjax.LSTM(hidden_size=5, param_dtype=dtype),
    "lstm_nobias": lambda dtype: rnnjax.LSTM(hidden_size=5, use_bias=False, param_dtype=dtype),
    "gru": lambda dtype: rnnjax.GRU(hidden_size=5, param_dtype=dtype),
    "gru_nobias": lambda dtype: rnnjax.GRU(hidden_size=5, use_bias=False, param_dtype=dtype),
}


def _perturbed(cell, key, input_size, dtype):
    """Parameters moved off their initial values (biases are zero at init) so every gradient path is exercised."""
    params = cell.init(key, input_size)
    return jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(a.size), a.shape, dtype), params)


def _loss(run, params, xs, carry, mask):
    final, ys = run(params, carry, xs, mask)
    return jnp.sum(ys**3) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(final))


@pytest.mark.parametrize("name", sorted(FUSED_CELLS))
@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_equals_stepping_with_gradients(enable_x64, name, with_mask):
    cell = FUSED_CELLS[name](jnp.float64)
    params = _perturbed(cell, jax.random.key(0), 3, jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (6, 2, 3, 3), jnp.float64)  # (T, *B, I) with two batch axes
    carry = jax.tree.map(lambda a: 0.5 * jnp.ones_like(a), cell.initial_carry((2, 3), jnp.float64))
    mask = time_mask(jnp.array([[6, 3, 0], [1, 5, 2]], jnp.int32), 6) if with_mask else None

    def stepped(p, c, x, m):
        return masked_scan(cell.step, p, c, x, m)

    def fused(p, c, x, m):
        return cell.sequence(p, c, x, m)

    want = jax.value_and_grad(_loss, argnums=(1, 2, 3))(stepped, params, xs, carry, mask)
    got = jax.value_and_grad(_loss, argnums=(1, 2, 3))(fused, params, xs, carry, mask)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), got, want)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_fused_bfloat16_compute_close_to_float32(key, name):
    cell32 = FUSED_CELLS[name](jnp.float32)
    cell16 = type(cell32)(hidden_size=5, dtype=jnp.bfloat16)
    params = cell32.init(key, 4)
    xs = jax.random.normal(jax.random.key(3), (2, 9, 4))
    lengths = jnp.array([9, 4])

    def loss(cell, p):
        carry, ys = rnnjax.unroll(cell, p, xs, lengths=lengths)
        return jnp.mean(ys.astype(jnp.float32) ** 2), (carry, ys)

    (l32, (c32, y32)), g32 = jax.value_and_grad(lambda p: loss(cell32, p), has_aux=True)(params)
    (l16, (c16, y16)), g16 = jax.value_and_grad(lambda p: loss(cell16, p), has_aux=True)(params)
    assert y16.dtype == jnp.bfloat16 and all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(c16))
    np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=3e-2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=3e-2), g16, g32)


def test_fused_under_vmap_and_jit(key):
    cell = rnnjax.LSTM(hidden_size=4)
    params = cell.init(key, 3)
    xs = jax.random.normal(jax.random.key(4), (3, 2, 5, 3))  # vmapped axis, then (B, T, I)

    def run(x):
        return rnnjax.unroll(cell, params, x, lengths=jnp.array([5, 2]), reverse=True)[1]

    batched = jax.jit(jax.vmap(run))(xs)
    for row in range(3):  # reverse with lengths is checked against NumPy in test_sequence; here vmap == no vmap
        np.testing.assert_allclose(batched[row], run(xs[row]), atol=1e-6)


@pytest.mark.parametrize("remat", [True, 1, 3, 4, 16])
def test_remat_gives_same_values_and_gradients(key, remat):
    cell = rnnjax.LSTM(hidden_size=4, peepholes=True)  # stepping path
    params = cell.init(key, 3)
    xs = jax.random.normal(jax.random.key(5), (2, 10, 3))
    lengths = jnp.array([10, 6])

    def loss(p, remat):
        carry, ys = rnnjax.unroll(cell, p, xs, lengths=lengths, remat=remat)
        return jnp.sum(ys**2) + jnp.sum(carry.c)

    want = jax.value_and_grad(loss)(params, False)
    got = jax.value_and_grad(loss)(params, remat)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


@pytest.mark.parametrize("remat", [0, -2, 2.5, "yes"])
def test_bad_remat_is_rejected(key, remat):
    cell = rnnjax.GRU(hidden_size=3)
    with pytest.raises(ValueError, match="remat must be"):
        rnnjax.unroll(cell, cell.init(key, 2), jnp.ones((1, 4, 2)), remat=remat)
