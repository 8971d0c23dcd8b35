"""docs/architecture.md adds a cell (IndRNN) in one small block: check it gets every feature for free."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax

DOC = pathlib.Path(__file__).parents[1] / "docs" / "architecture.md"


@pytest.fixture(scope="module")
def indrnn():
    """The IndRNN class defined by the documentation's code block, executed as written (and registered)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    source = next(block for block in blocks if "class IndRNN" in block)
    namespace: dict = {}
    exec(compile(source, str(DOC), "exec"), namespace)
    yield namespace["IndRNN"]
    rnnjax.cells.remove_cell("indrnn")


def reference(params, xs, length, reverse):
    """NumPy loop of h_t = relu(x_t W + u * h_{t-1} + b) over one row's valid prefix."""
    w, u, b = (np.asarray(params[name], np.float64) for name in ("w_ih", "u", "b"))
    h = np.zeros(w.shape[1])
    ys = np.zeros((xs.shape[0], w.shape[1]))
    order = range(length - 1, -1, -1) if reverse else range(length)
    for t in order:
        h = np.maximum(xs[t] @ w + u * h + b, 0.0)
        ys[t] = h
    return h, ys


@pytest.mark.parametrize("reverse", [False, True])
def test_unroll_with_lengths_matches_numpy(indrnn, key, reverse):
    cell = indrnn(hidden_size=6)
    params = cell.init(key, 3)
    xs = jax.random.normal(jax.random.key(1), (3, 7, 3))
    lengths = jnp.array([7, 4, 0])
    carry, ys = jax.jit(lambda p, x, n: rnnjax.unroll(cell, p, x, lengths=n, reverse=reverse))(params, xs, lengths)
    for row in range(3):
        h_ref, ys_ref = reference(params, np.asarray(xs[row], np.float64), int(lengths[row]), reverse)
        np.testing.assert_allclose(ys[row], ys_ref, atol=1e-5)
        np.testing.assert_allclose(carry.h[row], h_ref, atol=1e-5)


def test_layers_and_streaming(indrnn, key):
    cell = indrnn(hidden_size=5)
    xs = jax.random.normal(jax.random.key(2), (2, 6, 5))
    layer = rnnjax.Bidirectional(cell)
    _, ys = layer.apply(layer.init(key, 5), xs, lengths=jnp.array([6, 2]))
    assert ys.shape == (2, 6, 10)
    stack = rnnjax.Stack([cell, cell], residual=True)
    params = stack.init(key, 5)
    _, ys_whole = stack.apply(params, xs)
    carry, streamed = stack.initial_carry((2,)), []
    for t in range(6):
        carry, y = stack.step(params, carry, xs[:, t])
        streamed.append(y)
    np.testing.assert_allclose(jnp.stack(streamed, axis=1), ys_whole, atol=1e-6)


def test_nnx_adapter(indrnn, key):
    from flax import nnx

    cell = indrnn(hidden_size=4)
    module = rnnjax.nnx.Recurrent(cell, input_size=3, rngs=nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(3), (2, 5, 3))
    carry, ys = module(xs, lengths=jnp.array([5, 3]))
    want_carry, want_ys = rnnjax.unroll(cell, module.core_params(), xs, lengths=jnp.array([5, 3]))
    np.testing.assert_allclose(ys, want_ys, atol=1e-6)
    np.testing.assert_allclose(carry.h, want_carry.h, atol=1e-6)


def test_known_by_name_to_models_and_training(indrnn):
    from rnnjax import models, tasks, train

    assert "indrnn" in rnnjax.cell_names() and isinstance(rnnjax.make_cell("indrnn", 3), indrnn)
    task = tasks.get("adding", seq_len=6)
    model = models.build_model(task, "indrnn", hidden_size=8)
    result = train.fit(model, task, steps=3, batch_size=4, log_every=1)
    assert result.status == "completed" and len(result.history) == 3
    assert all(np.isfinite(record["loss"]) for record in result.history)


def test_diagnostics_read_the_declarations(indrnn, key):
    from rnnjax import diagnostics

    cell = indrnn(hidden_size=4)
    params = cell.init(key, 3)
    stats = diagnostics.spectral_stats(rnnjax.Bidirectional(cell), {"forward": params, "backward": params})
    assert set(stats) == {"forward/diag(u)", "backward/diag(u)"}
    np.testing.assert_allclose(stats["forward/diag(u)"].spectral_radius, float(jnp.max(params["u"])), rtol=1e-6)
    grads = diagnostics.state_gradient_norms(cell, params, jnp.ones((2, 5, 3)), lambda ys: ys[:, -1].sum())
    assert float(grads[""].norms[-1]) > 0.0
