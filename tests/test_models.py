"""Tasks (registry, determinism, the adding problem) and sequence models (heads, losses, metrics)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from rnnjax import models, tasks
from rnnjax.metrics import aggregate_metrics
from rnnjax.metrics import compute_metrics as eager_compute_metrics
from rnnjax.tasks import Batch

# Tasks.


def test_registry_lists_and_builds_adding():
    assert "adding" in tasks.names()
    task = tasks.get("adding", seq_len=30, seed=4)
    assert isinstance(task, tasks.Adding) and task.seq_len == 30 and task.seed == 4
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get("no-such-task")
    with pytest.raises(TypeError, match="no option"):
        tasks.get("adding", sequence_length=3)


def test_register_rejects_bad_kind_and_name_clash():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Bad(tasks.Task):
        name = "bad-kind"
        kind = "cluster"

    with pytest.raises(ValueError, match="kind"):
        tasks.register(Bad)

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Clash(tasks.Task):
        name = "adding"

    with pytest.raises(ValueError, match="taken"):
        tasks.register(Clash)


def test_train_batches_are_pure_functions_of_seed_and_step():
    task = tasks.get("adding", seq_len=16, seed=1)
    a, b = task.train_batch(7, 8), task.train_batch(7, 8)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.targets, b.targets)
    assert not np.array_equal(a.inputs, task.train_batch(8, 8).inputs)
    assert not np.array_equal(a.inputs, tasks.get("adding", seq_len=16, seed=2).train_batch(7, 8).inputs)
    valid, test = task.eval_batch("valid"), task.eval_batch("test")
    assert valid is task.eval_batch("valid")  # cached
    assert not np.array_equal(valid.inputs, test.inputs)
    with pytest.raises(ValueError, match="splits"):
        task.eval_batch("train")


@pytest.mark.parametrize("min_len", [None, 6])
def test_adding_problem_structure(min_len):
    task = tasks.get("adding", seq_len=20, min_len=min_len, eval_size=500)
    batch = task.train_batch(0, 64)
    assert batch.inputs.shape == (64, 20, 2) and batch.inputs.dtype == np.float32
    assert batch.targets.shape == (64,) and batch.targets.dtype == np.float32
    values, markers = batch.inputs[..., 0], batch.inputs[..., 1]
    np.testing.assert_array_equal(markers.sum(axis=1), 2.0)
    np.testing.assert_allclose((values * markers).sum(axis=1), batch.targets, rtol=1e-6)
    lengths = np.full(64, 20) if min_len is None else batch.lengths
    assert (batch.lengths is None) == (min_len is None)
    for row in range(64):
        first, second = np.flatnonzero(markers[row])
        half = lengths[row] // 2
        assert first < half <= second < lengths[row]
        assert np.all(values[row, lengths[row] :] == 0)
    # The trivial baseline (predict 1.0) has MSE Var(U1 + U2) = 1/6.
    assert task.baseline_score("test") == pytest.approx(1 / 6, abs=0.03)


# Models. Applications are jitted: an eager scan compiles on every call.


def _batch(task, n=4):
    return task.train_batch(0, n)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, inputs, lengths, dropout_key):
    return model.apply(params, inputs, lengths=lengths, dropout_key=dropout_key)


def apply(model, params, inputs, lengths=None, dropout_key=None):
    return _apply(model, params, inputs, lengths, dropout_key)


@pytest.mark.parametrize("cell", ["lstm", "gru", "simple", "jordan"])
def test_build_model_for_adding(cell, key):
    task = tasks.get("adding", seq_len=12)
    model = models.build_model(task, cell, hidden_size=8)
    params = model.init(key)
    batch = _batch(task)
    out = apply(model, params, batch.inputs)
    assert out.shape == (4, 1) and out.dtype == jnp.float32
    loss, metrics = jax.jit(model.loss_and_metrics, static_argnums=2)(params, batch, task.kind)
    assert set(metrics) == {"loss", "mse", "mae", "weight"}
    np.testing.assert_allclose(loss, np.mean((np.asarray(out)[:, 0] - batch.targets) ** 2), rtol=1e-5)
    assert models.param_count(params) == sum(np.size(x) for x in jax.tree.leaves(params))


def test_last_head_reads_last_valid_step(key):
    """A padded batch gives each row the output it gets alone, unpadded."""
    task = tasks.get("adding", seq_len=10, min_len=3)
    model = models.build_model(task, "gru", hidden_size=8)
    params = model.init(key)
    batch = _batch(task)
    out = apply(model, params, batch.inputs, batch.lengths)
    for row in range(batch.batch_size):
        n = int(batch.lengths[row])
        alone = apply(model, params, batch.inputs[row : row + 1, :n])
        np.testing.assert_allclose(out[row], alone[0], rtol=1e-5, atol=1e-6)


def test_bidirectional_last_head_sees_whole_row(key):
    task = tasks.get("adding", seq_len=10, min_len=3)
    model = models.build_model(task, "gru", hidden_size=4, bidirectional=True, num_layers=2)
    params = model.init(key)
    batch = _batch(task)
    out = apply(model, params, batch.inputs, batch.lengths)
    row, n = 0, int(batch.lengths[0])
    alone = apply(model, params, batch.inputs[:1, :n])
    np.testing.assert_allclose(out[row], alone[0], rtol=1e-5, atol=1e-6)
    # Changing the first input changes the output through the backward half.
    changed = batch.inputs.copy()
    changed[:, 0, 0] += 1.0
    assert not np.allclose(apply(model, params, changed, batch.lengths), out)


def test_token_inputs_and_per_step_head(key):
    model = models.SequenceModel(
        core=rnnjax.Stack([rnnjax.LSTM(hidden_size=8)] * 2), vocab_size=11, embed_size=6, output_size=11,
        head="per_step",
    )  # fmt: skip
    params = model.init(key)
    assert params["embed"].shape == (11, 6)
    ids = jax.random.randint(key, (3, 7), 0, 11)
    out = apply(model, params, ids)
    assert out.shape == (3, 7, 11)
    np.testing.assert_allclose(out[1, :3], apply(model, params, ids[1:2, :3])[0], rtol=1e-5, atol=1e-6)


def test_input_projection(key):
    model = models.SequenceModel(core=rnnjax.GRU(hidden_size=5), input_size=3, embed_size=4, output_size=2)
    params = model.init(key)
    assert params["input_proj"]["w"].shape == (3, 4)
    assert apply(model, params, jnp.ones((2, 6, 3))).shape == (2, 2)


def test_model_validation():
    with pytest.raises(ValueError, match="exactly one"):
        models.SequenceModel(core=rnnjax.GRU(hidden_size=4), output_size=1)
    with pytest.raises(ValueError, match="embed_size"):
        models.SequenceModel(core=rnnjax.GRU(hidden_size=4), vocab_size=5, output_size=1)
    with pytest.raises(ValueError, match="head"):
        models.SequenceModel(core=rnnjax.GRU(hidden_size=4), input_size=2, output_size=1, head="mean")
    with pytest.raises(ValueError, match="unknown cell"):
        models.make_cell("transformer", 4)


def test_every_shipped_cell_is_registered_and_builds_a_model():
    shipped = {"simple", "jordan", "lstm", "gru", "mingru", "minlstm", "lru"}
    assert shipped <= set(rnnjax.cell_names())
    for name in shipped:
        model = models.build_model(tasks.get("adding", seq_len=5), name, hidden_size=3)
        assert model.core.hidden_size == 3


def test_register_cell():
    rnnjax.cells.add_cell("tiny-gru", lambda hidden_size, **kw: rnnjax.GRU(hidden_size=hidden_size, **kw))
    try:
        model = models.build_model(tasks.get("adding"), "tiny-gru", hidden_size=3)
        assert isinstance(model.core, rnnjax.GRU) and model.core.hidden_size == 3
        with pytest.raises(ValueError, match="already registered"):
            rnnjax.register_cell("tiny-gru")(rnnjax.LSTM)
    finally:
        rnnjax.cells.remove_cell("tiny-gru")
    assert "tiny-gru" not in rnnjax.cell_names()


def test_every_model_family_follows_the_task_model_protocol():
    from rnnjax.attention import Transformer
    from rnnjax.model_protocol import ScoredModel, TaskModel
    from rnnjax.seq2seq import EncoderDecoder, PrefixLM

    families = [
        models.build_model(tasks.get("adding", seq_len=5), "gru", 4),
        Transformer(input_size=2, output_size=1, d_model=8, num_heads=2, num_layers=1),
        EncoderDecoder.build("gru", hidden_size=4, source_vocab=6, target_vocab=6, bos_id=1),
        PrefixLM.build(source_vocab=6, target_vocab=6, bos_id=1, d_model=8, num_heads=2, num_layers=1),
    ]
    for model in families:
        assert isinstance(model, TaskModel) and isinstance(model, ScoredModel), type(model).__name__
        assert "loss_and_metrics" not in vars(type(model))  # one shared definition, not a copy per family


# Losses and metrics (jitted: one compilation instead of one per eager operation).

compute_metrics = jax.jit(eager_compute_metrics, static_argnums=0)


def test_classify_metrics():
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    batch = Batch(np.zeros((3, 1, 1), np.float32), np.array([0, 0, 0], np.int32))
    metrics = compute_metrics("classify", logits, batch)
    expected = -np.mean(np.asarray(jax.nn.log_softmax(logits))[:, 0])
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 2 / 3, rtol=1e-6)


def test_per_step_metrics_are_masked_by_lengths_and_mask():
    logits = jax.random.normal(jax.random.key(0), (2, 4, 5))
    targets = np.array([[1, 2, 3, 4], [0, 1, 2, 3]], np.int32)
    mask = np.array([[1, 1, 0, 1], [1, 1, 1, 1]], np.float32)
    batch = Batch(np.zeros((2, 4), np.int32), targets, np.array([4, 2], np.int32), mask)
    metrics = compute_metrics("per_step_classify", logits, batch)
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), targets[..., None], -1)[..., 0]
    valid = np.array([[1, 1, 0, 1], [1, 1, 0, 0]], bool)
    np.testing.assert_allclose(metrics["loss"], nll[valid].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["bpc"], nll[valid].mean() / np.log(2), rtol=1e-5)
    np.testing.assert_allclose(metrics["perplexity"], np.exp(nll[valid].mean()), rtol=1e-5)
    assert float(metrics["weight"]) == 5


def test_per_step_regress_with_channels_and_aggregation():
    outputs = jnp.arange(24, dtype=jnp.float32).reshape(2, 4, 3)
    targets = np.zeros((2, 4, 3), np.float32)
    batch = Batch(np.zeros((2, 4, 1), np.float32), targets, np.array([4, 1], np.int32))
    metrics = compute_metrics("per_step_regress", outputs, batch)
    valid = np.asarray(outputs)[[0, 0, 0, 0, 1], [0, 1, 2, 3, 0]]
    np.testing.assert_allclose(metrics["mse"], np.mean(valid**2), rtol=1e-6)
    # Aggregating two halves weighted by their counts equals the whole.
    halves = []
    for i in range(2):
        half = Batch(batch.inputs[i : i + 1], targets[i : i + 1], batch.lengths[i : i + 1])
        halves.append({k: float(v) for k, v in compute_metrics("per_step_regress", outputs[i : i + 1], half).items()})
    merged = aggregate_metrics(halves)
    np.testing.assert_allclose(merged["mse"], float(metrics["mse"]), rtol=1e-6)


def test_model_inputs_are_validated_naming_the_argument(key):
    task = tasks.get("adding", seq_len=6)
    model = models.build_model(task, "gru", 4)
    params = model.init(key)
    with pytest.raises(ValueError, match=r"inputs has 3 features .* expect 2"):
        model.apply(params, jnp.ones((2, 6, 3)))
    with pytest.raises(ValueError, match=r"inputs must have shape \(batch, time, 2\), got shape \(6, 2\)"):
        model.apply(params, jnp.ones((6, 2)))
    with pytest.raises(TypeError, match="floating-point dtype, got int32"):
        model.apply(params, jnp.ones((2, 6, 2), jnp.int32))
    token_model = models.build_model(tasks.get("copy"), "gru", 4)
    with pytest.raises(TypeError, match="inputs must be integer token ids"):
        token_model.apply(token_model.init(key), jnp.ones((2, 6)))
