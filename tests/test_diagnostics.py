"""Gradient-flow diagnostics: per-step state gradients against a reference, vanishing gradients, spectra."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from rnnjax import diagnostics, models, tasks

T, B, I, H = 40, 4, 3, 16


@pytest.fixture(scope="module")
def xs():
    return jax.random.normal(jax.random.key(1), (B, T, I))


def last_output_loss(ys):
    return jnp.sum(ys[:, -1] ** 2)


def all_outputs_loss(ys):
    return jnp.sum(jnp.sin(ys))


CELLS = {  # one cell per kind of state and output: h; (h, c); the fed-back y; an output computed from the state
    "simple": rnnjax.SimpleRNN(hidden_size=6),
    "lstm": rnnjax.LSTM(hidden_size=6),
    "jordan": rnnjax.JordanRNN(hidden_size=6, output_size=5),
    "lru": rnnjax.LRU(hidden_size=6, model_size=5),
}


@pytest.mark.parametrize("name", sorted(CELLS))
def test_state_gradients_match_a_split_run(name, key):
    """dL/ds_t equals the gradient of the loss with the run split at t and s_t fed in as a variable."""
    cell = CELLS[name]
    params = cell.init(key, I)
    xs = jax.random.normal(jax.random.key(2), (2, 6, I))
    checked = [0, 2, 5]  # steps compared with the reference (each costs two scans to compile)
    result = diagnostics.state_gradient_norms(cell, params, xs, all_outputs_loss)[""]

    def loss_from(state, t, ys_before):  # the loss as a function of s_t; the output at t is read off s_t
        pieces = [ys_before[:, :t], cell.readout(params, state, xs[:, t])[:, None]]
        if t < xs.shape[1] - 1:
            pieces.append(rnnjax.unroll(cell, params, xs[:, t + 1 :], state)[1])
        return all_outputs_loss(jnp.concatenate(pieces, axis=1))

    @jax.jit
    def reference():
        norms = []
        for t in checked:
            state, ys_before = rnnjax.unroll(cell, params, xs[:, : t + 1])
            grad = jax.grad(loss_from)(state, t, ys_before)
            norms.append(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad))))
        return jnp.stack(norms)

    np.testing.assert_allclose(np.asarray(result.norms)[checked], reference(), rtol=2e-4, atol=1e-6)
    assert result.per_example.shape == (2, 6) and result.recurrent.shape == (6,)
    np.testing.assert_allclose(np.sqrt(np.sum(np.asarray(result.per_example) ** 2, axis=0)), result.norms, rtol=1e-5)
    assert float(result.recurrent[-1]) == 0.0  # nothing flows back into the last state through the recurrence


@pytest.mark.parametrize("scale", [0.6, 0.9])
def test_tanh_rnn_gradient_decays_geometrically_below_unit_spectral_norm(xs, key, scale):
    """Pascanu et al. (2013): ||dL/dh_t|| <= ||dL/dh_T|| * sigma_max(W_hh)^(T-t) for tanh and sigma_max < 1."""
    cell = rnnjax.SimpleRNN(hidden_size=H)
    params = cell.init(key, I)
    params["w_hh"] = params["w_hh"] * scale  # orthogonal, so all singular values are `scale`
    sigma = diagnostics.spectral_stats(cell, params)["w_hh"].spectral_norm
    assert sigma == pytest.approx(scale, rel=1e-5)
    norms = np.asarray(diagnostics.state_gradient_norms(cell, params, xs, last_output_loss)[""].norms, np.float64)
    distance = np.arange(T - 1, -1, -1)  # steps back from the last state
    bound = norms[-1] * sigma**distance
    assert np.all(norms <= bound * (1 + 1e-4) + 1e-30)
    assert np.all(np.diff(norms) >= 0)  # monotonically smaller further back
    assert diagnostics.decay_rate(norms) <= sigma


def test_lstm_with_forget_bias_decays_far_more_slowly(xs, key):
    rnn = rnnjax.SimpleRNN(hidden_size=H)
    rnn_params = rnn.init(key, I)
    rnn_params["w_hh"] = rnn_params["w_hh"] * 0.9
    lstm = rnnjax.LSTM(hidden_size=H, forget_bias=1.0)
    lstm_params = lstm.init(key, I)
    rnn_norms = np.asarray(diagnostics.state_gradient_norms(rnn, rnn_params, xs, last_output_loss)[""].norms)
    lstm_norms = np.asarray(diagnostics.state_gradient_norms(lstm, lstm_params, xs, last_output_loss)[""].norms)
    rnn_ratio, lstm_ratio = rnn_norms[0] / rnn_norms[-1], lstm_norms[0] / lstm_norms[-1]
    assert lstm_ratio > 1e3 * rnn_ratio  # over 40 steps: about 1e-2 against 1e-7
    assert diagnostics.decay_rate(lstm_norms) > diagnostics.decay_rate(rnn_norms) + 0.1


def test_layers_bidirectional_and_stack(xs, key):
    layer = rnnjax.Stack([rnnjax.Bidirectional(rnnjax.GRU(hidden_size=5)), rnnjax.LSTM(hidden_size=4)])
    params = layer.init(key, I)
    lengths = jnp.array([T, 30, 12, 1])
    result = diagnostics.state_gradient_norms(layer, params, xs, all_outputs_loss, lengths=lengths)
    assert sorted(result) == ["layers/0/backward", "layers/0/forward", "layers/1"]
    for grads in result.values():
        per_example = np.asarray(grads.per_example)
        for row, n in enumerate(lengths.tolist()):
            assert np.all(per_example[row, n:] == 0) and np.all(per_example[row, :n] > 0)


def test_backward_direction_is_reported_in_time_order(key):
    cell = rnnjax.GRU(hidden_size=5)
    layer = rnnjax.Bidirectional(cell, merge="none")
    params = layer.init(key, I)
    xs = jax.random.normal(jax.random.key(3), (2, 10, I))
    result = diagnostics.state_gradient_norms(layer, params, xs, lambda ys: last_output_loss(ys[1][:, ::-1]))
    # The backward cell on xs equals the cell run forward on the time-reversed sequence.
    flipped = diagnostics.state_gradient_norms(cell, params["backward"], xs[:, ::-1], last_output_loss)[""]
    np.testing.assert_allclose(result["backward"].norms, np.asarray(flipped.norms)[::-1], rtol=1e-5)
    np.testing.assert_array_equal(result["forward"].norms, 0.0)  # the loss ignores the forward outputs


def test_model_state_gradients(key):
    task = tasks.get("adding", seq_len=12, min_len=6)
    model = models.build_model(task, "lstm", 8)
    params = model.init(key)
    batch = task.train_batch(0, 4)
    result = diagnostics.model_state_gradient_norms(model, params, batch, task.kind)[""]
    per_example = np.asarray(result.per_example)
    for row, n in enumerate(batch.lengths):
        assert per_example[row, n - 1] > 0 and np.all(per_example[row, n:] == 0)


def test_spectral_stats(key):
    layer = rnnjax.Stack([rnnjax.LSTM(hidden_size=4), rnnjax.JordanRNN(hidden_size=6, output_size=3)])
    params = layer.init(key, I)
    stats = diagnostics.spectral_stats(layer, params)
    assert sorted(stats) == [
        "layers/0/w_hh/f", "layers/0/w_hh/g", "layers/0/w_hh/i", "layers/0/w_hh/o", "layers/1/w_yh @ w_hy",
    ]  # fmt: skip
    forget = params["layers"][0]["w_hh"][:, 4:8]
    np.testing.assert_allclose(stats["layers/0/w_hh/f"].singular_values, np.linalg.svd(forget, compute_uv=False),
                               rtol=1e-5)  # fmt: skip
    assert stats["layers/0/w_hh/f"].spectral_radius == pytest.approx(1.0, abs=1e-5)  # orthogonal block
    loop = np.asarray(params["layers"][1]["w_yh"] @ params["layers"][1]["w_hy"])
    assert stats["layers/1/w_yh @ w_hy"].spectral_radius == pytest.approx(diagnostics.spectral_radius(loop))
    projected = rnnjax.LSTM(hidden_size=4, proj_size=2)
    rectangular = diagnostics.spectral_stats(projected, projected.init(key, I))["w_hh/i"]  # (2, 4)
    assert rectangular.singular_values.shape == (2,) and np.isnan(rectangular.spectral_radius)


def test_last_step_gradient_of_a_cell_whose_output_is_computed_from_its_state(key):
    """The LRU outputs Re(C h) + D x, no carry field: the last step's norm must be ||dL/dh_T||, not 0."""
    cell = rnnjax.LRU(hidden_size=6, model_size=5)
    params = cell.init(key, I)
    xs = jax.random.normal(jax.random.key(3), (2, 5, I))
    norms = diagnostics.state_gradient_norms(cell, params, xs, lambda ys: jnp.sum(ys[:, -1]))[""].norms
    state, _ = rnnjax.unroll(cell, params, xs)
    grad = jax.grad(lambda s: jnp.sum(cell.readout(params, s, xs[:, -1])))(state)
    expected = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad)))
    np.testing.assert_allclose(norms[-1], expected, rtol=1e-5)
    assert float(norms[-1]) > 0.0


@pytest.mark.parametrize("name", rnnjax.cell_names())
def test_every_registered_cell_declares_its_readout_and_recurrent_matrices(name, key):
    """readout of the carry a step returns is the step's output; recurrent_matrices is declared (maybe empty)."""
    cell = rnnjax.make_cell(name, hidden_size=4)
    params = cell.init(key, I)
    x = jax.random.normal(jax.random.key(4), (3, I))
    carry, y = cell.step(params, cell.initial_carry(3), x)
    np.testing.assert_allclose(cell.readout(params, carry, x), y, rtol=1e-6, atol=1e-6)
    for matrix in cell.recurrent_matrices(params).values():
        assert matrix.ndim == 2


def test_a_cell_without_a_declared_output_says_what_to_declare(key):
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Undeclared(rnnjax.SimpleRNN):
        output_field = None

    cell = Undeclared(hidden_size=3)
    params = cell.init(key, I)
    with pytest.raises(TypeError, match="output_field"):
        diagnostics.state_gradient_norms(cell, params, jnp.ones((1, 4, I)), jnp.sum)
