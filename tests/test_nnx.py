"""Tests of the Flax NNX adapters in rnnjax.nnx: equivalence with the pure core, streaming, transforms, training,
split/merge, dropout modes and error reporting."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rnnjax
import rnnjax.nnx as rnx

B, T, I = 2, 5, 3
LENGTHS = jnp.array([5, 2])

# Options that change a cell's parameter tree, or make its output size differ from its hidden size. Every
# registered cell, with its default options, is checked against the core by tests/test_conformance.py.
CELLS = {
    "jordan": rnnjax.JordanRNN(hidden_size=4, output_size=3),
    "lstm": rnnjax.LSTM(hidden_size=4, peepholes=True, proj_size=3),
    "gru": rnnjax.GRU(hidden_size=4, reset_after=False),
    "lru": rnnjax.LRU(hidden_size=6, model_size=4),
}

LAYERS = {
    "bidirectional": rnnjax.Bidirectional(rnnjax.SimpleRNN(hidden_size=4), rnnjax.SimpleRNN(hidden_size=3)),
    "stack": rnnjax.Stack(
        [rnnjax.SimpleRNN(hidden_size=4), rnnjax.Bidirectional(rnnjax.SimpleRNN(hidden_size=2))], residual=True
    ),
}


def inputs(shape=(B, T, I), seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def assert_trees_close(actual, expected, atol=1e-5):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=atol, rtol=1e-5)


def assert_trees_differ(a, b):
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class LeakyState(NamedTuple):
    h: jax.Array  # (*B, H)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeakyCell:
    """A cell written outside rnnjax (no base class): h_t = a * h_{t-1} + x_t W. Stands for cells added later."""

    hidden_size: int

    @property
    def output_size(self):
        return self.hidden_size

    def init(self, key, input_size):
        return {"w": jax.random.normal(key, (input_size, self.hidden_size)), "a": jnp.full((self.hidden_size,), 0.5)}

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        return LeakyState(jnp.zeros((*batch_shape, self.hidden_size), dtype))

    def input_size(self, params):
        return params["w"].shape[0]

    def step(self, params, carry, x):
        h = params["a"] * carry.h + x @ params["w"]
        return LeakyState(h), h


# Equivalence with the core.


# Each eager scan compiles on its own, so these tests run few of them: the adapter passes lengths=None and
# reverse=False through like any other value, so one case with both set covers each cell.


@pytest.mark.parametrize("name", list(CELLS))
def test_cell_matches_core(name, key):
    cell = CELLS[name]
    params = cell.init(key, I)
    model = rnx.Recurrent.from_params(cell, params)
    xs = inputs()
    expected = rnnjax.unroll(cell, params, xs, lengths=LENGTHS, reverse=True)
    assert_trees_close(model(xs, lengths=LENGTHS, reverse=True), expected)


def test_cell_matches_core_without_lengths(key):
    cell = CELLS["gru"]
    params = cell.init(key, I)
    xs = inputs()
    assert_trees_close(rnx.Recurrent.from_params(cell, params)(xs, unroll=2), rnnjax.unroll(cell, params, xs))


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_matches_core(name, key):
    layer = LAYERS[name]
    params = layer.init(key, I)
    model = rnx.Recurrent.from_params(layer, params)
    xs = inputs()
    assert_trees_close(model(xs, lengths=LENGTHS), layer.apply(params, xs, lengths=LENGTHS))


def test_layer_reverse(key):
    # A reversed stack of cells is each cell reversed in turn; a reversed Bidirectional swaps the directions.
    stack = rnnjax.Stack([rnnjax.SimpleRNN(hidden_size=4), rnnjax.JordanRNN(hidden_size=3)])
    params = stack.init(key, I)
    xs = inputs()
    carry, ys = rnx.Recurrent.from_params(stack, params)(xs, lengths=LENGTHS, reverse=True)
    hidden, finals = xs, []
    for cell, cell_params in zip(stack.layers, params["layers"]):
        final, hidden = rnnjax.unroll(cell, cell_params, hidden, lengths=LENGTHS, reverse=True)
        finals.append(final)
    assert_trees_close((carry, ys), (rnnjax.StackState(tuple(finals)), hidden))

    bi = rnnjax.Bidirectional(rnnjax.JordanRNN(hidden_size=4), rnnjax.SimpleRNN(hidden_size=2), merge="none")
    params = bi.init(key, I)
    _, (ys_f, ys_b) = rnx.Recurrent.from_params(bi, params)(xs, lengths=LENGTHS, reverse=True)
    assert_trees_close(ys_f, rnnjax.unroll(bi.forward, params["forward"], xs, lengths=LENGTHS, reverse=True)[1])
    assert_trees_close(ys_b, rnnjax.unroll(bi.backward, params["backward"], xs, lengths=LENGTHS)[1])


@pytest.mark.parametrize(
    "make, core",
    [
        (lambda rngs: rx_simple(rngs), rnnjax.SimpleRNN(hidden_size=4, activation="relu")),
        (lambda rngs: rnx.JordanRNN(I, 4, output_size=2, rngs=rngs), rnnjax.JordanRNN(hidden_size=4, output_size=2)),
        (lambda rngs: rnx.LSTM(I, hidden_size=4, proj_size=2, rngs=rngs), rnnjax.LSTM(hidden_size=4, proj_size=2)),
        (lambda rngs: rnx.GRU(I, 4, rngs=rngs), rnnjax.GRU(hidden_size=4)),
        (
            lambda rngs: rnx.Bidirectional(I, rnnjax.GRU(hidden_size=2), merge="sum", rngs=rngs),
            rnnjax.Bidirectional(rnnjax.GRU(hidden_size=2), merge="sum"),
        ),
        (
            lambda rngs: rnx.Stack(I, [rnnjax.GRU(hidden_size=3)] * 2, dropout=0.2, rngs=rngs),
            rnnjax.Stack([rnnjax.GRU(hidden_size=3)] * 2, dropout=0.2),
        ),
    ],
)
def test_named_classes_build_the_core_and_its_params(make, core):
    model = make(nnx.Rngs(0))
    assert model.core == core
    assert isinstance(model, rnx.Recurrent) and type(model).__module__ == "rnnjax.nnx"
    assert model.input_size == I and model.output_size == core.output_size
    expected = core.init(nnx.Rngs(0).params(), I)  # the same key the module drew
    assert_trees_close(model.core_params(), expected, atol=0)
    leaves = jax.tree.leaves(model.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert all(type(leaf) is nnx.Param for leaf in leaves)


def rx_simple(rngs):
    return rnx.SimpleRNN(I, 4, activation="relu", rngs=rngs)


def test_param_state_has_the_core_names(key):
    lstm = rnx.LSTM(I, 4, peepholes=True, rngs=nnx.Rngs(0))
    state = nnx.state(lstm, nnx.Param)
    assert set(state["params"]) == {"w_ih", "w_hh", "b", "w_ci", "w_cf", "w_co"}
    assert state["params"]["w_ih"].shape == (I, 16)
    stack = rnx.Stack(I, [rnnjax.GRU(hidden_size=4), rnnjax.Bidirectional(rnnjax.GRU(hidden_size=2))], rngs=nnx.Rngs(0))
    state = nnx.state(stack, nnx.Param)
    assert state["params"]["layers"][1]["backward"]["w_hh"].shape == (2, 6)
    assert jax.tree.structure(stack.core_params()) == jax.tree.structure(stack.core.init(key, I))


def test_load_params(key):
    cell = rnnjax.GRU(hidden_size=4)
    model = rnx.GRU(I, 4, rngs=nnx.Rngs(0))
    new = cell.init(key, I)
    model.load_params(new)
    assert_trees_close(model.core_params(), new, atol=0)
    assert type(model.params["w_ih"]) is nnx.Param


# Streaming.


@pytest.mark.parametrize(
    "core",
    [rnnjax.LSTM(hidden_size=4), rnnjax.Stack([rnnjax.SimpleRNN(hidden_size=3)] * 2, residual=True)],
    ids=["lstm", "stack"],
)
def test_step_streams_like_the_whole_sequence(core):
    model = rx_model(core)
    xs = inputs()
    step = nnx.jit(lambda m, carry, x: m.step(carry, x))
    carry, ys = model.initial_carry((B,)), []
    for t in range(T):
        carry, y = step(model, carry, xs[:, t])
        ys.append(y)
    assert_trees_close((carry, jnp.stack(ys, axis=1)), model(xs))


def rx_model(core):
    return rnx.Recurrent(core, I, rngs=nnx.Rngs(0))


def test_step_needs_a_streamable_core():
    bi = rx_model(rnnjax.Bidirectional(rnnjax.GRU(hidden_size=2)))
    with pytest.raises(TypeError, match="cannot stream"):
        bi.step(bi.initial_carry((B,)), jnp.ones((B, I)))
    stack = rx_model(rnnjax.Stack([rnnjax.Bidirectional(rnnjax.GRU(hidden_size=2))]))
    with pytest.raises(TypeError, match="Stack needs the whole sequence"):
        stack.step(stack.initial_carry((B,)), jnp.ones((B, I)))


# Any cell following the protocol.


def test_generic_adapter_works_for_an_outside_cell(key):
    cell = LeakyCell(hidden_size=3)
    model = rnx.Recurrent(cell, I, rngs=nnx.Rngs(0))
    xs = inputs()
    expected = rnnjax.unroll(cell, model.core_params(), xs, lengths=LENGTHS, reverse=True)
    assert_trees_close(model(xs, lengths=LENGTHS, reverse=True), expected)
    carry, y = model.step(model.initial_carry(B), xs[:, 0])
    assert_trees_close((carry.h, y), (xs[:, 0] @ model.core_params()["w"],) * 2)

    Leaky = rnx.adapter_class(LeakyCell, "hidden_size", name="Leaky")
    named = Leaky(I, 3, rngs=nnx.Rngs(0))
    assert type(named).__name__ == "Leaky" and type(named).__module__ == __name__ and named.core == cell
    assert_trees_close(named.core_params(), model.core_params(), atol=0)
    assert_trees_close(nnx.jit(lambda m, x: m(x, lengths=LENGTHS, reverse=True))(named, xs), expected)


def test_time_major(key):
    xs_tm = inputs((T, B, I))
    gru = rnx.SimpleRNN(I, 4, time_major=True, rngs=nnx.Rngs(0))
    expected = rnnjax.unroll(gru.core, gru.core_params(), xs_tm, lengths=LENGTHS, time_major=True)
    assert_trees_close(gru(xs_tm, lengths=LENGTHS), expected)
    stack = rnnjax.Stack([rnnjax.SimpleRNN(hidden_size=3)])
    model = rnx.Recurrent(stack, I, time_major=True, rngs=nnx.Rngs(0))
    assert model.time_major and not model.core.time_major  # the module's layout; the core is left as given
    expected = dataclasses.replace(stack, time_major=True).apply(model.core_params(), xs_tm, lengths=LENGTHS)
    assert_trees_close(model(xs_tm, lengths=LENGTHS), expected)
    reversed_ys = model(xs_tm, lengths=LENGTHS, reverse=True)[1]
    assert reversed_ys.shape == (T, B, 3)
    np.testing.assert_array_equal(reversed_ys[2:, 1], 0.0)


# Transforms and training.


def sequence_loss(model, xs):
    _, ys = model(xs, lengths=LENGTHS, remat=True)
    return jnp.mean(ys**2)


def test_jit_and_value_and_grad_match_the_core(key):
    cell = rnnjax.GRU(hidden_size=4)
    params = cell.init(key, I)
    model = rnx.Recurrent.from_params(cell, params)
    xs = inputs()

    loss, grads = nnx.jit(nnx.value_and_grad(sequence_loss))(model, xs)  # with remat=True inside
    expected_loss, expected_grads = jax.jit(
        jax.value_and_grad(lambda p: jnp.mean(rnnjax.unroll(cell, p, xs, lengths=LENGTHS)[1] ** 2))
    )(params)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    assert_trees_close(nnx.to_pure_dict(grads)["params"], expected_grads)


def test_optimizer_step_reduces_the_loss():
    model = rnx.SimpleRNN(I, 4, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
    xs = inputs()
    target = jnp.tanh(xs[..., :1])  # (B, T, 1)

    def loss_fn(model):
        _, ys = model(xs)
        return jnp.mean((ys[..., :1] - target) ** 2)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes a Python float and an int32 count
        losses = [train_step(model, optimizer) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert int(optimizer.step[...]) == 4


def test_split_merge_round_trip():
    model = rnx.Stack(
        I, [rnnjax.SimpleRNN(hidden_size=3), rnnjax.SimpleRNN(hidden_size=3)], dropout=0.5, rngs=nnx.Rngs(0)
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    hash(graphdef)
    assert set(nnx.to_pure_dict(params)) == {"params"}
    assert "dropout_rngs" in nnx.to_pure_dict(rest)
    clone = nnx.merge(graphdef, params, rest)
    assert clone.core == model.core and type(clone) is type(model)
    assert_trees_close(clone.core_params(), model.core_params(), atol=0)
    assert isinstance(clone.core_params()["layers"], list)
    xs = inputs()
    run = nnx.jit(lambda m, x: m(x, deterministic=True))
    assert_trees_close(run(clone, xs), run(model, xs), atol=0)


# Dropout.


def test_dropout_in_train_mode_and_not_in_eval_mode():
    model = rnx.Stack(I, [rnnjax.SimpleRNN(hidden_size=4)] * 2, dropout=0.5, rngs=nnx.Rngs(params=0, dropout=1))
    core, params, xs = model.core, model.core_params(), inputs()
    apply = jax.jit(lambda p, x, k: core.apply(p, x, lengths=LENGTHS, dropout_key=k)[1])
    clean = apply(params, xs, None)
    run = nnx.jit(lambda m, x: m(x, lengths=LENGTHS)[1])  # compiled once per mode: the mode is static

    key = nnx.clone(model).dropout_rngs()  # the key the next training call will draw
    first = run(model, xs)
    assert_trees_close(first, apply(params, xs, key))
    assert_trees_differ(first, clean)
    assert_trees_differ(run(model, xs), first)  # the stream moved on, also under jit
    assert not model.deterministic

    model.eval()
    assert model.deterministic
    assert_trees_close(run(model, xs), clean)
    model.train()
    assert not model.deterministic
    assert_trees_close(run(nnx.view(model, deterministic=True), xs), clean)


def test_dropout_without_a_stream():
    model = rnx.Stack(I, [rnnjax.SimpleRNN(hidden_size=4)], dropout=0.5, rngs=nnx.Rngs(params=0))
    xs = inputs()
    with pytest.raises(ValueError, match="'dropout' random stream"):
        model(xs)
    assert model(xs, rngs=nnx.Rngs(dropout=3))[1].shape == (B, T, 4)
    assert_trees_close(model(xs, deterministic=True), model.core.apply(model.core_params(), xs))
    plain = rnx.Stack(I, [rnnjax.SimpleRNN(hidden_size=4)], rngs=nnx.Rngs(params=0))  # dropout 0: no stream needed
    assert plain.dropout_rngs is None


# Errors.


def test_bad_inputs_surface_core_errors():
    model = rnx.GRU(I, 4, rngs=nnx.Rngs(0))
    stack = rnx.Stack(I, [rnnjax.SimpleRNN(hidden_size=4)], rngs=nnx.Rngs(0))
    for m in (model, stack):
        with pytest.raises(ValueError, match="features"):
            m(jnp.ones((B, T, I + 1)))
        with pytest.raises(TypeError, match="floating-point"):
            m(jnp.ones((B, T, I), jnp.int32))
        for reverse in (False, True):
            with pytest.raises(ValueError, match="lengths must lie in"):
                m(inputs(), lengths=jnp.array([6, 1]), reverse=reverse)
            with pytest.raises(ValueError, match="batch shape"):
                m(inputs(), lengths=jnp.array([1, 2, 3]), reverse=reverse)
    with pytest.raises(ValueError, match="carry"):
        model(inputs(), rnnjax.GRUState(jnp.zeros((B, 5))))
    with pytest.raises(ValueError, match="features"):
        model.step(model.initial_carry(B), jnp.ones((B, I + 1)))
    with pytest.raises(ValueError, match="hidden_size"):
        rnx.LSTM(I, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="input_size"):
        rnx.LSTM(0, 4, rngs=nnx.Rngs(0))


def test_bad_construction(key):
    cell = rnnjax.GRU(hidden_size=4)
    params = cell.init(key, I)
    with pytest.raises(TypeError, match="cell"):
        rnx.Recurrent(object(), I, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="input_size and rngs"):
        rnx.Recurrent(cell, I)
    with pytest.raises(ValueError, match="structure"):
        rnx.Recurrent.from_params(cell, {**params, "extra": jnp.zeros(3)})
    with pytest.raises(ValueError, match="init's output"):
        rnx.Recurrent.from_params(cell, {"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        rnx.Recurrent.from_params(cell, {**params, "b_hh": jnp.zeros(5)})
    with pytest.raises(ValueError, match="input_size is 5"):
        rnx.GRU(5, 4, params=params)
    with pytest.raises(TypeError, match="positional"):
        rnx.GRU(I, 4, 5, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="both"):
        rnx.GRU(I, 4, hidden_size=4, rngs=nnx.Rngs(0))
    assert_trees_close(rnx.GRU(I, 4, params=params).core_params(), params, atol=0)


@pytest.mark.parametrize("name", ["MinGRU", "MinLSTM", "LRU"])
def test_named_adapters_for_parallel_cells(name):
    """``rnnjax.nnx.MinGRU(I, H, ...)`` builds the core cell and runs it like ``rnnjax.unroll``."""
    model = getattr(rnx, name)(I, 4, rngs=nnx.Rngs(0))
    assert model.core == getattr(rnnjax, name)(hidden_size=4)
    xs = inputs()
    expected = rnnjax.unroll(model.core, model.core_params(), xs, lengths=LENGTHS)
    assert_trees_close(model(xs, lengths=LENGTHS), expected)
