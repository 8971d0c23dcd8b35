"""The native CPU kernels (rnnjax.kernels.native) against the pure-JAX path: values and every gradient.

The reference is ``masked_scan`` over ``cell.step`` with the kernels switched off: plain JAX operations that JAX
differentiates itself, sharing no code with the C++ kernels. PyTorch parity runs through the kernels too
(tests/test_torch_interop.py, with the kernels on by default).
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from rnnjax.kernels import native
from rnnjax.unrolling import masked_scan


def test_built_when_a_compiler_is_present():
    """`pip install` builds the library wherever a C++ compiler is on the PATH (as on CI)."""
    if shutil.which("c++") or shutil.which("g++") or shutil.which("clang++"):
        assert native.available(), native.status()
    assert isinstance(native.status(), str)


needs_native = pytest.mark.skipif(not native.available(), reason=native.status())

# (T, N, I, H): T * N <= 8 takes the unpacked path, larger the packed one; H not a multiple of any vector width,
# B = 1, T = 1.
SHAPES = [(1, 1, 1, 1), (1, 1, 3, 16), (2, 3, 5, 17), (6, 5, 3, 7), (9, 6, 2, 33), (12, 1, 4, 20)]
CELLS = [
    ("lstm", {}),
    ("lstm", {"use_bias": False}),
    ("gru", {}),
    ("gru", {"use_bias": False}),
]


def _isas():
    if not native.available():
        return ["none"]
    return list(native.ISAS[: native.ISAS.index(native.best_isa()) + 1])


@pytest.fixture(params=_isas())
def isa(request):
    if request.param == "none":
        pytest.skip(native.status())
    native.set_isa(request.param)
    yield request.param
    native.set_isa(None)


def _problem(name, options, T, N, I, H, seed=0):
    cell = rnnjax.make_cell(name, hidden_size=H, **options)
    keys = jax.random.split(jax.random.key(seed), 6)
    params = cell.init(keys[0], I)
    # Perturbed so that biases and every gate block matter.
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(keys[1], p.shape), params)
    xs = jax.random.normal(keys[2], (T, N, I))
    carry = jax.tree.map(lambda leaf: 0.5 * jax.random.normal(keys[3], leaf.shape), cell.initial_carry(N))
    mask = jax.random.bernoulli(keys[4], 0.7, (T, N))  # any pattern, not only prefixes
    mask = mask.at[:, 0].set(False) if N > 1 else mask  # an all-padding row
    weights = jax.random.normal(keys[5], (T, N, H))
    return cell, params, xs, carry, mask, weights


def _loss(run, cell, mask, weights):
    def loss(params, xs, carry):
        final, ys = run(cell, params, carry, xs, mask)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(final))

    return loss


def _native_run(cell, params, carry, xs, mask):
    return cell.sequence(params, carry, xs, mask)


def _reference_run(cell, params, carry, xs, mask):
    return masked_scan(cell.step, params, carry, xs, mask)


def _value_and_grads(run, flag, cell, params, xs, carry, mask, weights):
    with native.use_native(flag):
        fn = jax.jit(jax.value_and_grad(_loss(run, cell, mask, weights), argnums=(0, 1, 2)))
        hlo = fn.lower(params, xs, carry).as_text()
        return fn(params, xs, carry), hlo


def _assert_close(actual, expected):
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


def _check_every_isa_against_the_pure_jax_path(name, options, shape, *, project, targets):
    """Values and gradients of the native path, with the LSTM's input projection forced to ``project``, equal the
    pure-JAX path's on every instruction set this CPU runs; the compiled program calls every FFI target named."""
    cell, params, xs, carry, mask, weights = _problem(name, options, *shape)
    want, reference_hlo = _value_and_grads(_reference_run, False, cell, params, xs, carry, mask, weights)
    assert "rnnjax_" not in reference_hlo
    native.set_projection(project)
    try:
        with native.use_native(True):
            fn = jax.jit(jax.value_and_grad(_loss(_native_run, cell, mask, weights), argnums=(0, 1, 2)))
            hlo = fn.lower(params, xs, carry).as_text()
        assert all(target in hlo for target in targets), (targets, hlo[:2000])
        for isa in _isas():
            native.set_isa(isa)
            _assert_close(fn(params, xs, carry), want)
    finally:
        native.set_isa(None)
        native.set_projection(None)


@needs_native
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}N{}I{}H{}".format(*s))
@pytest.mark.parametrize("name,options", CELLS, ids=lambda c: str(c))
def test_values_and_gradients_equal_the_pure_jax_path(name, options, shape):
    """Every instruction set this CPU runs (the choice is made inside the kernel: one compiled function); the
    LSTM's input part step by step (the projected one is tested below)."""
    targets = (f"rnnjax_{name}_forward_train", f"rnnjax_{name}_backward")
    _check_every_isa_against_the_pure_jax_path(name, options, shape, project=False, targets=targets)


# The LSTM's input part multiplied step by step in the kernel (False) or projected first by one XLA matmul (True).
KINDS = [("lstm", False), ("lstm", True), ("gru", None)]


@pytest.fixture
def projection(request):
    native.set_projection(request.param)
    yield request.param
    native.set_projection(None)


@needs_native
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}N{}I{}H{}".format(*s))
@pytest.mark.parametrize("options", [{}, {"use_bias": False}], ids=["bias", "no_bias"])
def test_lstm_input_projection_equals_the_pure_jax_path(options, shape):
    """The projected input part (x W_ih + b before the kernel) on every instruction set, with and without bias."""
    targets = ("rnnjax_lstm_forward_projected_train", "rnnjax_lstm_backward")
    _check_every_isa_against_the_pure_jax_path("lstm", options, shape, project=True, targets=targets)


@needs_native
def test_the_input_projection_is_chosen_by_shape():
    """Projected at one or two rows (weight-bound steps), step by step from four rows and for streaming steps."""
    assert native.projects_inputs(128, 1, 64, 256) and native.projects_inputs(128, 2, 64, 256)
    assert not native.projects_inputs(128, 32, 64, 256) and not native.projects_inputs(128, 4, 64, 256)
    assert not native.projects_inputs(1, 1, 64, 256) and not native.projects_inputs(8, 1, 64, 256)
    cell = rnnjax.LSTM(hidden_size=8)
    params = cell.init(jax.random.key(0), 3)
    for batch, projected in [(1, True), (5, False)]:
        xs = jnp.ones((batch, 12, 3))
        with native.use_native(True):
            hlo = jax.jit(lambda p, x: rnnjax.unroll(cell, p, x)).lower(params, xs).as_text()
        assert ("rnnjax_lstm_forward_projected" in hlo) == projected, batch


@needs_native
@pytest.mark.parametrize("name,projection", KINDS, indirect=["projection"])
def test_unroll_uses_the_kernels_on_cpu_and_the_switch_turns_them_off(name, projection):
    cell = rnnjax.make_cell(name, hidden_size=5)
    params = cell.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (2, 7, 3))
    lengths = jnp.array([7, 0])

    def run(params, xs):
        return rnnjax.unroll(cell, params, xs, lengths=lengths)

    # The switch is read when a function is traced; JAX caches traces per Python function, so each setting
    # gets its own function here.
    with native.use_native(True):
        on = jax.jit(lambda params, xs: run(params, xs))
        assert f"rnnjax_{name}_forward" in on.lower(params, xs).as_text()
        carry_on, ys_on = on(params, xs)
    with native.use_native(False):
        off = jax.jit(lambda params, xs: run(params, xs))
        assert "rnnjax_" not in off.lower(params, xs).as_text()
        carry_off, ys_off = off(params, xs)
    _assert_close((carry_on, ys_on), (carry_off, ys_off))
    assert np.all(np.asarray(ys_on)[1] == 0.0)  # the length-0 row: zero outputs, initial carry kept
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(carry_on)[0])[1], 0.0)


@needs_native
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_streaming_step_and_its_gradient(isa, name):
    cell = rnnjax.make_cell(name, hidden_size=19)
    params = cell.init(jax.random.key(0), 6)
    carry = jax.tree.map(lambda leaf: jax.random.normal(jax.random.key(2), leaf.shape), cell.initial_carry((2, 3)))
    x = jax.random.normal(jax.random.key(1), (2, 3, 6))  # two batch axes

    def loss(params, carry, x):
        new, y = cell.step(params, carry, x)
        return jnp.sum(y**2) + jnp.sum(jnp.cos(jax.tree.leaves(new)[-1]))

    results = {}
    for flag in (True, False):
        with native.use_native(flag):
            fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            assert (f"rnnjax_{name}_forward" in fn.lower(params, carry, x).as_text()) == flag
            results[flag] = (fn(params, carry, x), jax.jit(cell.step)(params, carry, x))
    _assert_close(results[True], results[False])


@needs_native
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_unbatched_step(name):
    cell = rnnjax.make_cell(name, hidden_size=4)
    params = cell.init(jax.random.key(0), 2)
    x = jnp.array([0.5, -1.0])
    outs = {}
    for flag in (True, False):
        with native.use_native(flag):
            outs[flag] = jax.jit(cell.step)(params, cell.initial_carry(), x)
    assert outs[True][1].shape == (4,)
    _assert_close(outs[True], outs[False])


@needs_native
def test_vmap_over_parameters_equals_a_loop():
    cell = rnnjax.LSTM(hidden_size=9)
    params = jax.vmap(lambda k: cell.init(k, 4))(jax.random.split(jax.random.key(0), 3))  # 3 models
    xs = jax.random.normal(jax.random.key(1), (5, 6, 4))
    lengths = jnp.array([6, 3, 0, 1, 6])

    def loss(p):
        _, ys = rnnjax.unroll(cell, p, xs, lengths=lengths)
        return jnp.mean(ys**2)

    with native.use_native(True):
        got = jax.jit(jax.vmap(jax.value_and_grad(loss)))(params)
    with native.use_native(False):
        want = [jax.value_and_grad(loss)(jax.tree.map(lambda p, i=i: p[i], params)) for i in range(3)]
    want = jax.tree.map(lambda *leaves: jnp.stack(leaves), *want)
    _assert_close(got, want)


@needs_native
@pytest.mark.parametrize("name,projection", KINDS, indirect=["projection"])
def test_thread_count_does_not_change_a_bit(name, projection):
    cell, params, xs, carry, mask, weights = _problem(name, {}, 20, 24, 8, 96)  # enough work for 3 threads
    results = []
    for count in (1, 2, 3):
        native.set_threads(count)
        try:
            with native.use_native(True):
                results.append(jax.jit(jax.value_and_grad(_loss(_native_run, cell, mask, weights)))(params, xs, carry))
        finally:
            native.set_threads(None)
    for other in results[1:]:
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_native
def test_other_dtypes_and_options_stay_on_the_jax_path():
    xs = jnp.ones((3, 2, 4))
    for cell, dtype in [
        (rnnjax.LSTM(hidden_size=8), jnp.bfloat16),
        (rnnjax.LSTM(hidden_size=8, peepholes=True), jnp.float32),
        (rnnjax.LSTM(hidden_size=8, dtype=jnp.bfloat16), jnp.float32),
        (rnnjax.GRU(hidden_size=8, reset_after=False), jnp.float32),
    ]:
        params = jax.tree.map(lambda p, dtype=dtype: p.astype(dtype), cell.init(jax.random.key(0), 4))
        with native.use_native(True):
            hlo = jax.jit(lambda p, x, cell=cell: rnnjax.unroll(cell, p, x)).lower(params, xs.astype(dtype)).as_text()
        assert "rnnjax_" not in hlo, cell


def test_switches_name_their_arguments():
    with pytest.raises(ValueError, match="count must be a positive int"):
        native.set_threads(0)
    with pytest.raises(TypeError, match="flag must be a bool"):
        native.set_enabled(1)
    with pytest.raises(TypeError, match="flag must be a bool or None"):
        native.set_projection(1)
    if native.available():
        with pytest.raises(ValueError, match="name must be one of"):
            native.set_isa("sse9")
        assert native.isa() in native.ISAS
        assert native.isa() in native.status()


def test_without_the_library_the_pure_jax_path_runs(monkeypatch):
    """An install without a C++ compiler has no library: rnnjax says so and runs the LSTM in JAX."""
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setenv("RNNJAX_NATIVE_LIBRARY", "/nonexistent/_native.so")
    assert not native.available() and not native.enabled()
    assert "unavailable" in native.status() and "was not built" in native.status()
    cell = rnnjax.LSTM(hidden_size=4)
    params = cell.init(jax.random.key(0), 2)
    xs = jnp.ones((1, 3, 2))
    fn = jax.jit(lambda p, x: rnnjax.unroll(cell, p, x))
    assert "rnnjax_" not in fn.lower(params, xs).as_text()
    assert np.all(np.isfinite(np.asarray(fn(params, xs)[1])))
