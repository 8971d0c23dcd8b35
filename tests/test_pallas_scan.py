"""rnnjax.kernels.pallas_scan and ``method="pallas"``: against a NumPy loop and the sequential solver.

On CPU the kernel runs in Pallas interpret mode (the only mode there), so shapes are small. Every case that
matters for the kernel's bookkeeping has more than one chunk, a last chunk that is only partly used, and (where
``block_size`` is set small) several programs with padded lanes. The Triton lowering is checked by lowering for
``cuda`` from this machine, which runs the lowering rules but neither compiles nor runs the kernel.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from rnnjax import linear_recurrence
from rnnjax.kernels import pallas_scan

T_CHUNKS = 11  # with chunk_size=4: chunks of 4, 4 and 3 used steps


def loop(a, b, h0):
    """Independent reference: ``h_t = a_t h_{t-1} + b_t`` as a float64 (complex128) NumPy loop; ``(T, *S)``."""
    wide = np.complex128 if np.iscomplexobj(b) else np.float64
    a, b = np.broadcast_to(np.asarray(a, wide), b.shape), np.asarray(b, wide)
    h, hs = np.asarray(h0, wide), np.zeros(b.shape, wide)
    for t in range(b.shape[0]):
        h = a[t] * h + b[t]
        hs[t] = h
    return hs


def loop_jax(a, b, h0):
    """The same loop in ``jax.numpy``, unrolled in Python: its autodiff is the gradient reference."""
    a = jnp.broadcast_to(a, b.shape)
    h, hs = h0, []
    for t in range(b.shape[0]):
        h = a[t] * h + b[t]
        hs.append(h)
    return jnp.stack(hs) if hs else jnp.zeros(b.shape, b.dtype)


def problem(num_steps, state_shape, a_shape=None, seed=0, dtype=np.float32):
    """``(a, b, h0, w)``: ``a`` in ``(0.5, 1)`` (complex: also a phase), signed ``b``, ``h0`` and loss weights."""
    rng = np.random.default_rng(seed)
    shape = (num_steps, *state_shape)
    a_shape = shape if a_shape is None else a_shape
    a, b = rng.uniform(0.5, 1.0, a_shape), rng.normal(size=shape)
    h0, w = rng.normal(size=state_shape), rng.normal(size=shape)
    if np.issubdtype(dtype, np.complexfloating):
        a = a * np.exp(1j * rng.uniform(0, 2, a_shape))
        b, h0 = b + 1j * rng.normal(size=shape), h0 + 1j * rng.normal(size=state_shape)
    return tuple(jnp.asarray(x, dtype) for x in (a, b, h0)) + (jnp.asarray(w, jnp.float32),)


def weighted(hs, w):
    """A real loss of the states (``|h|²`` weighted for complex ones)."""
    hs = jnp.abs(hs) ** 2 if jnp.iscomplexobj(hs) else hs
    return jnp.sum(hs * w.astype(hs.dtype))


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


# The kernel itself: values and gradients of a, b and h0.

KERNEL_CASES = {
    # name: (T, state shape, a's shape or None for (T, *S), chunk_size, block_size)
    "chunks-and-lanes-padded": (T_CHUNKS, (2, 3), None, 4, 4),
    "T-multiple-of-chunk": (8, (2, 3), None, 4, 128),
    "T=1": (1, (2, 3), None, 4, 128),
    "scalar-state": (T_CHUNKS, (), None, 4, 128),
    "a(S,)": (T_CHUNKS, (2, 3), (3,), 4, 4),
    "a(1,S)": (T_CHUNKS, (2, 3), (1, 3), 4, 4),
    "a(1,*S)": (T_CHUNKS, (2, 3), (1, 2, 3), 4, 128),
    "a(T,1,S)": (T_CHUNKS, (2, 3), (T_CHUNKS, 1, 3), 4, 128),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_matches_loop_values_and_gradients(case):
    # Given coefficients of the case's shapes, a nonzero initial state and a weighted loss
    num_steps, state_shape, a_shape, chunk_size, block_size = KERNEL_CASES[case]
    a, b, h0, w = problem(num_steps, state_shape, a_shape)
    options = dict(chunk_size=chunk_size, block_size=block_size, interpret=True)

    def loss(a, b, h0):
        return weighted(pallas_scan.solve(a, b, h0, **options), w)

    # When solved by the kernel, values and gradients under jit
    hs = jax.jit(lambda a, b, h0: pallas_scan.solve(a, b, h0, **options))(a, b, h0)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(a, b, h0)
    # Then they equal the NumPy loop and the autodiff of the plain loop, gradient shapes those of the inputs
    assert hs.shape == b.shape and hs.dtype == b.dtype
    assert_close(hs, loop(a, b, h0), 2e-5)
    expected = jax.grad(lambda a, b, h0: weighted(loop_jax(a, b, h0), w), argnums=(0, 1, 2))(a, b, h0)
    for got, want in zip(grads, expected):
        assert got.shape == want.shape
        assert_close(got, want, 5e-5)


@pytest.mark.parametrize("state_shape", [(2, 0), (0,)])
def test_empty_state_and_no_steps(state_shape):
    # Given an empty state, and separately no time steps
    for num_steps, shape in ((5, state_shape), (0, (2, 3))):
        a, b, h0, w = problem(num_steps, shape)

        def loss(a, b, h0, w=w):
            return weighted(pallas_scan.solve(a, b, h0, interpret=True), w)

        # When solved, and differentiated
        hs = pallas_scan.solve(a, b, h0, interpret=True)
        grads = jax.grad(loss, (0, 1, 2))(a, b, h0)
        # Then the outputs are empty and the gradients zeros of the inputs' shapes
        assert hs.shape == b.shape
        for got, x in zip(grads, (a, b, h0)):
            assert got.shape == x.shape and not np.any(np.asarray(got))


def test_float64(enable_x64):
    # Given float64 coefficients whose product over the sequence is far from float32's resolution
    a, b, h0, w = problem(T_CHUNKS, (3,), dtype=np.float64)
    w = w.astype(jnp.float64)
    a = a * (1 + 1e-9)
    options = dict(chunk_size=4, interpret=True)
    # When solved and differentiated in float64
    hs = pallas_scan.solve(a, b, h0, **options)
    grads = jax.jit(jax.grad(lambda a, b, h0: weighted(pallas_scan.solve(a, b, h0, **options), w), (0, 1, 2)))(a, b, h0)
    # Then it matches the loop to float64 rounding
    assert hs.dtype == jnp.float64
    assert_close(hs, loop(a, b, h0), 1e-12)
    expected = jax.grad(lambda a, b, h0: weighted(loop_jax(a, b, h0), w), (0, 1, 2))(a, b, h0)
    for got, want in zip(grads, expected):
        assert got.dtype == jnp.float64
        assert_close(got, want, 1e-12)


@pytest.mark.parametrize("a_shape", [None, (4,)], ids=["time-varying", "time-invariant"])
def test_complex_state(a_shape):
    # Given complex coefficients (an LRU's eigenvalues when time-invariant), inputs and initial state
    a, b, h0, w = problem(T_CHUNKS, (2, 4), a_shape, dtype=np.complex64)
    options = dict(chunk_size=4, interpret=True)

    # When solved by the kernel (in real and imaginary parts) and by the sequential solver
    def loss(solve):
        def value(a, b, h0):
            hs = solve(a, b, h0)
            return weighted(hs, w), hs

        return jax.jit(jax.grad(value, (0, 1, 2), has_aux=True))(a, b, h0)

    grads, hs = loss(lambda a, b, h0: pallas_scan.solve(a, b, h0, **options))
    grads_seq, hs_seq = loss(lambda a, b, h0: linear_recurrence.linear_scan(a, b, h0, method="sequential")[1])
    # Then values equal the complex loop, and gradients (JAX's complex convention) those of the sequential solver
    assert hs.dtype == jnp.complex64
    assert_close(hs, loop(a, b, h0), 2e-5)
    assert_close(hs, hs_seq, 2e-5)
    for got, want in zip(grads, grads_seq):
        assert got.dtype == jnp.complex64 and got.shape == want.shape
        assert_close(got, want, 5e-5)


# method="pallas" of rnnjax.linear_recurrence: lengths, reverse, initial state, against "sequential".


@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan_method_pallas_with_lengths(reverse):
    # Given three rows of 21 steps (three chunks of the default 8, the last partly padding), one of length 0
    a, b, h0, w = problem(21, (3, 4))
    lengths = np.array([21, 6, 0])

    def solve(method):
        def loss(a, b, h0):
            h_last, hs = linear_recurrence.linear_scan(a, b, h0, lengths=lengths, reverse=reverse, method=method)
            return weighted(hs, w) + jnp.sum(h_last**2), (h_last, hs)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(a, b, h0)

    # When solved with method="pallas" and with method="sequential"
    grads, (h_last, hs) = solve("pallas")
    grads_seq, (h_last_seq, hs_seq) = solve("sequential")
    # Then the values equal the NumPy loop row by row (zeros past each length), and everything equals "sequential"
    for row, length in enumerate(lengths):
        a_row, b_row = np.asarray(a[:length, row]), np.asarray(b[:length, row])  # (length, F)
        if reverse:
            want = loop(a_row[::-1], b_row[::-1], h0[row])[::-1]
        else:
            want = loop(a_row, b_row, h0[row])
        assert_close(hs[:length, row], want, 2e-5)
        assert not np.any(np.asarray(hs[length:, row]))
        assert_close(h_last[row], (want[0] if reverse else want[-1]) if length else h0[row], 2e-5)
    assert_close(hs, hs_seq, 2e-5)
    assert_close(h_last, h_last_seq, 2e-5)
    for got, want in zip(grads, grads_seq):
        assert_close(got, want, 5e-5)


def test_pallas_is_a_method_but_never_the_default():
    assert "pallas" in linear_recurrence.METHODS
    for backend in ("cpu", "gpu", "tpu"):
        for num_steps in (1, 256, 65536):
            assert linear_recurrence.default_method(num_steps, backend) != "pallas"


# Through the cells, with rnnjax.unroll.


def _cells():
    return {
        "mingru": (rnnjax.MinGRU(hidden_size=5, activation="identity"), 3),
        "lru": (rnnjax.LRU(hidden_size=4, model_size=3, r_min=0.5, r_max=0.95, max_phase=2.0), 3),
        "rglru": (rnnjax.RGLRU(hidden_size=4, num_heads=2), 4),
    }


@pytest.mark.parametrize("name", ["mingru", "lru", "rglru"])
def test_cells_with_method_pallas_equal_sequential(name):
    # Given a cell, inputs (B=3, T=19, I) with lengths, one of them 0, and a loss of outputs and final state
    cell, input_size = _cells()[name]
    params = cell.init(jax.random.key(0), input_size)
    xs = jax.random.normal(jax.random.key(1), (3, 19, input_size))
    lengths = np.array([19, 7, 0])

    def run(method):
        chosen = dataclasses.replace(cell, method=method)

        def loss(params, xs):
            carry, ys = rnnjax.unroll(chosen, params, xs, lengths=lengths)
            return jnp.sum(ys**2) + sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(carry)), (carry, ys)

        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, xs)

    # When unrolled with method="pallas" and method="sequential", under jit, with jax.grad
    grads, (carry, ys) = run("pallas")
    grads_seq, (carry_seq, ys_seq) = run("sequential")
    # Then outputs, final carries and gradients of parameters and inputs agree
    assert_close(ys, ys_seq, 2e-5)
    for got, want in zip(jax.tree.leaves(carry), jax.tree.leaves(carry_seq)):
        assert_close(got, want, 2e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_seq)):
        assert_close(got, want, 1e-4)


def test_mingru_pallas_under_vmap():
    # Given a minGRU and a stack of two independent batches of sequences
    cell, input_size = _cells()["mingru"]
    params = cell.init(jax.random.key(0), input_size)
    xs = jax.random.normal(jax.random.key(2), (2, 3, 19, input_size))  # (V, B, T, I)

    def outputs(method):
        chosen = dataclasses.replace(cell, method=method)
        return jax.jit(jax.vmap(lambda x: rnnjax.unroll(chosen, params, x)[1]))(xs)

    # When unrolled under vmap with method="pallas"
    # Then it equals the sequential solver under vmap
    assert_close(outputs("pallas"), outputs("sequential"), 2e-5)


# Modes, lowering, errors.


def test_interpret_mode_by_backend_and_environment(monkeypatch):
    monkeypatch.delenv(pallas_scan.INTERPRET_ENV, raising=False)
    assert pallas_scan.interpret_mode("cpu") and pallas_scan.interpret_mode("tpu")
    assert not pallas_scan.interpret_mode("gpu")
    monkeypatch.setenv(pallas_scan.INTERPRET_ENV, "1")
    assert pallas_scan.interpret_mode("gpu")
    monkeypatch.setenv(pallas_scan.INTERPRET_ENV, "0")
    assert not pallas_scan.interpret_mode("cpu")
    monkeypatch.setenv(pallas_scan.INTERPRET_ENV, "yes")
    with pytest.raises(ValueError, match="RNNJAX_PALLAS_INTERPRET must be 0 or 1"):
        pallas_scan.interpret_mode("cpu")


@pytest.mark.parametrize("dtype", [np.float32, np.complex64])
def test_lowers_to_triton_for_cuda(dtype):
    # Given the compiled (not interpreted) kernel, forward and backward, with a time-invariant a and padded lanes
    a, b, h0, w = problem(T_CHUNKS, (3, 5), (5,), dtype=dtype)

    def loss(a, b, h0):
        return weighted(pallas_scan.solve(a, b, h0, chunk_size=4, block_size=8, interpret=False), w)

    # When lowered for CUDA from this machine (Pallas's Triton lowering rules run; nothing is compiled)
    try:
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(a, b, h0).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as error:  # a jaxlib without the Triton dialect cannot lower for CUDA at all
        if "triton" in str(error).lower() and "power of 2" not in str(error):
            pytest.skip(f"no Triton lowering in this jaxlib: {error}")
        raise
    # Then both walks became Triton kernels
    assert text.count("rnnjax_linear_scan_adjoint") >= 1
    assert text.count("__gpu$xla.gpu.triton") == 2


def test_errors():
    a, b, h0, _ = problem(4, (3,))
    with pytest.raises(ValueError, match="method='pallas' solves float32, float64, complex64 or complex128"):
        pallas_scan.solve(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), h0.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="one dtype"):
        pallas_scan.solve(a.astype(jnp.complex64), b, h0)
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        pallas_scan.solve(a, b, h0, chunk_size=6)
    with pytest.raises(ValueError, match="must broadcast"):
        pallas_scan.solve(a[:, :2], b, h0)
    # 16-bit inputs reach the kernel in float32 through linear_scan
    _, hs = linear_recurrence.linear_scan(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), method="pallas")
    assert hs.dtype == jnp.float32
    # the LRU takes "pallas" (complex state) but not "log"
    assert rnnjax.LRU(hidden_size=2, method="pallas").method == "pallas"
    with pytest.raises(ValueError, match="method must be one of"):
        rnnjax.LRU(hidden_size=2, method="log")
