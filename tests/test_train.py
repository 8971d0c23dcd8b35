"""Training: optimiser config, the pure train step, the fit loop, non-finite losses, truncated BPTT, the CLI."""

import argparse
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rnnjax
from rnnjax import checkpoint, models, tasks, train
from rnnjax.__main__ import build_parser
from rnnjax.__main__ import main as cli_main
from rnnjax.attention import Transformer
from rnnjax.tasks import Batch
from rnnjax.train import tbptt

# A small per-step task, defined here as a user would (unregistered, so the registry stays as shipped): the
# target at step t is the input at step t - 2.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Echo(tasks.Task):
    name = "test-echo"
    kind = "per_step_regress"
    metric = "mse"
    seq_len: int = 12
    delay: int = 2

    @property
    def input_size(self):
        return 1

    @property
    def output_size(self):
        return 1

    def make_batch(self, rng, batch_size):
        x = rng.standard_normal((batch_size, self.seq_len, 1)).astype(np.float32)  # (B, T, 1)
        y = np.zeros((batch_size, self.seq_len), np.float32)  # (B, T)
        y[:, self.delay :] = x[:, : -self.delay, 0]
        return Batch(x, y)

    def baseline_score(self, split):
        return float(np.mean(self.eval_batch(split).targets ** 2))


# Tests share one small configuration: fit reuses the compiled step of an equal (model, optimiser, batch size).
BATCH = 8
OPTIMIZER = train.OptimizerConfig(learning_rate=1e-2)


def adding_setup():
    task = tasks.get("adding", seq_len=8, eval_size=200)
    return task, models.build_model(task, "gru", 8)


# Optimiser configuration.


def test_schedule_warmup_then_cosine():
    config = train.OptimizerConfig(learning_rate=1.0, warmup_steps=4, decay_steps=10, final_lr_fraction=0.1)
    lr = config.schedule()
    np.testing.assert_allclose([float(lr(s)) for s in range(4)], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    np.testing.assert_allclose(float(lr(9)), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)), rtol=1e-6)
    np.testing.assert_allclose(float(lr(14)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(lr(1000)), 0.1, rtol=1e-6)
    constant = train.OptimizerConfig(learning_rate=0.5).schedule()
    assert float(constant(0)) == float(constant(99)) == 0.5


@pytest.mark.parametrize("name", train.OPTIMIZERS)
def test_optimizers_build(name):
    extra = {"weight_decay": 0.01} if name == "adamw" else {"momentum": 0.9} if name == "sgd" else {}
    tx = train.OptimizerConfig(name, clip_value=0.5, **extra).build()
    params = {"w": jnp.ones((2, 2))}
    updates, _ = tx.update({"w": jnp.full((2, 2), 3.0)}, tx.init(params), params)
    assert updates["w"].shape == (2, 2)


def test_optimizer_config_validation():
    with pytest.raises(ValueError, match="name"):
        train.OptimizerConfig("lion")
    with pytest.raises(ValueError, match="adamw"):
        train.OptimizerConfig("adam", weight_decay=0.1)
    with pytest.raises(ValueError, match="clip_norm"):
        train.OptimizerConfig(clip_norm=0.0)


# The train step.


def quadratic_loss(params, batch, key):
    del key
    residual = batch["x"] @ params["w"] - batch["y"]  # (B, 1)
    return jnp.mean(residual**2), {"mean_residual": jnp.mean(residual)}


def quadratic_state(optimizer):
    params = {"w": jnp.array([[1.0], [-2.0]])}
    return train.create_train_state(params, train.step.Optimizer(optimizer).tx, jax.random.key(0))


QUADRATIC_BATCH = {"x": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "y": jnp.array([[10.0], [0.0]])}


def test_train_step_metrics_and_update():
    config = train.OptimizerConfig("sgd", learning_rate=0.1, clip_norm=2.0, warmup_steps=2)
    state = quadratic_state(config)
    step = train.make_train_step(quadratic_loss, config)
    grads = jax.grad(lambda p: quadratic_loss(p, QUADRATIC_BATCH, None)[0])(state.params)
    norm = float(optax.tree.norm(grads))
    assert norm > 2.0  # so clipping is active
    new, metrics = step(state, QUADRATIC_BATCH)
    assert set(metrics) == {"loss", "mean_residual", "grad_norm", "grad_norm_clipped", "lr"}
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm_clipped"], 2.0, rtol=1e-5)
    np.testing.assert_allclose(metrics["lr"], 0.05, rtol=1e-6)  # warmup step 0 of 2
    expected = state.params["w"] - 0.05 * grads["w"] * (2.0 / norm)
    np.testing.assert_allclose(new.params["w"], expected, rtol=1e-5)
    assert int(new.step) == 1
    assert not np.array_equal(jax.random.key_data(new.rng), jax.random.key_data(state.rng))
    # Pure: the same inputs give the same outputs.
    again, _ = step(state, QUADRATIC_BATCH)
    np.testing.assert_array_equal(again.params["w"], new.params["w"])


def test_per_value_clipping_is_applied_first():
    config = train.OptimizerConfig("sgd", learning_rate=1.0, clip_norm=None, clip_value=0.5)
    _, metrics = train.make_train_step(quadratic_loss, config)(quadratic_state(config), QUADRATIC_BATCH)
    np.testing.assert_allclose(metrics["grad_norm_clipped"], math.sqrt(2) * 0.5, rtol=1e-6)


def test_train_step_with_plain_optax():
    tx = optax.sgd(0.1)
    state = train.create_train_state({"w": jnp.zeros((2, 1))}, tx, jax.random.key(0))
    _, metrics = train.make_train_step(quadratic_loss, tx)(state, QUADRATIC_BATCH)
    assert set(metrics) == {"loss", "mean_residual", "grad_norm"}


# The loop.


def test_fit_learns_the_adding_problem(tmp_path):
    task, model = adding_setup()
    result = train.fit(
        model,
        task,
        steps=200,
        batch_size=BATCH,
        seed=0,
        eval_every=100,
        log_every=20,
        optimizer=OPTIMIZER,
        metrics_path=tmp_path / "m.jsonl",
    )
    assert result.status == "completed" and int(result.state.step) == 200
    assert [e["step"] for e in result.evals] == [100, 200]
    assert result.evals[-1]["mse"] < 0.3 * task.baseline_score("valid")
    assert [h["step"] for h in result.history] == list(range(20, 201, 20))
    assert {"loss", "grad_norm", "grad_norm_clipped", "lr", "mse", "time"} <= set(result.history[0])
    records = train.read_metrics(tmp_path / "m.jsonl")
    assert len(records) == len(result.history) + len(result.evals)
    assert {r["split"] for r in records} == {"train", "valid"}
    final = train.evaluate(model, result.state.params, task, "valid", batch_size=100)  # in two chunks
    np.testing.assert_allclose(final["mse"], result.evals[-1]["mse"], rtol=1e-5)


def test_progress_bar_is_quiet_off_a_terminal(capsys):
    task, model = adding_setup()
    train.fit(model, task, steps=3, batch_size=BATCH, optimizer=OPTIMIZER)
    assert capsys.readouterr().err == ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoisonedAdding(tasks.Adding):
    """The adding problem with NaN inputs at one step."""

    bad_step: int = -1

    def train_batch(self, step, batch_size):
        batch = super().train_batch(step, batch_size)
        if step == self.bad_step:
            batch = batch._replace(inputs=np.full_like(batch.inputs, np.nan))
        return batch


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    task = PoisonedAdding(bad_step=7, seq_len=8, eval_size=20)
    model = models.build_model(task, "gru", 8)
    with pytest.raises(
        train.NonFiniteLossError, match=r"non-finite loss or gradient \(nan\) at step 7.*checkpoint is step 5"
    ):
        train.fit(
            model,
            task,
            steps=20,
            batch_size=BATCH,
            optimizer=OPTIMIZER,
            ckpt_dir=tmp_path / "ckpt",
            save_every=5,
            metrics_path=tmp_path / "m.jsonl",
        )
    with checkpoint.CheckpointManager(tmp_path / "ckpt") as manager:
        assert manager.steps() == [5]
    restored = checkpoint.restore(tmp_path / "ckpt", train.initial_state(model, OPTIMIZER, 0))
    assert int(restored.step) == 5
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(restored.params))
    assert train.read_metrics(tmp_path / "m.jsonl")[-1]["event"] == "nonfinite"
    # "stop" returns the last good state instead of raising.
    result = train.fit(model, task, steps=20, batch_size=BATCH, optimizer=OPTIMIZER, on_nonfinite="stop")
    assert result.status == "nonfinite" and int(result.state.step) == 7 and "step 7" in result.message


def test_cli_nonfinite_exit_status(tmp_path, capsys):
    status = cli_main(
        [
            "train",
            "--task",
            "adding",
            "--task-opt",
            "seq_len=6",
            "--cell",
            "simple",
            "--hidden",
            "4",
            "--steps",
            "30",
            "--batch-size",
            "4",
            "--optimizer",
            "sgd",
            "--lr",
            "1e30",
            "--clip-norm",
            "0",
            "--ckpt-dir",
            str(tmp_path / "ckpt"),
            "--save-every",
            "1",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert status == 3
    assert "non-finite loss" in err and "last good checkpoint is step" in err


def test_cli_arguments_map_to_run_config():
    from rnnjax.train.cli import config_from_args

    args = build_parser().parse_args(
        [
            "train",
            "--task",
            "adding",
            "--task-opt",
            "seq_len=30",
            "--cell",
            "lstm",
            "--steps",
            "50",
            "--cell-opt",
            "forget_bias=2.0",
            "--optimizer",
            "adamw",
            "--weight-decay",
            "0.1",
            "--warmup",
            "5",
            "--clip-norm",
            "0",
            "--clip-value",
            "0.5",
        ]
    )
    config = config_from_args(args)
    assert config.task_options == {"seq_len": 30} and config.cell_options == {"forget_bias": 2.0}
    assert config.optimizer == train.OptimizerConfig(
        "adamw",
        learning_rate=1e-3,
        warmup_steps=5,
        decay_steps=45,
        clip_norm=None,
        clip_value=0.5,
        weight_decay=0.1,
    )
    assert train.RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# Truncated BPTT.


def test_window_of_splits_and_pads():
    batch = Batch(
        np.arange(2 * 7).reshape(2, 7, 1).astype(np.float32), np.ones((2, 7), np.float32), np.array([7, 4], np.int32)
    )
    windows = [tbptt.window_of(batch, i, 3) for i in range(tbptt.num_windows(7, 3))]
    assert len(windows) == 3 and all(w.inputs.shape == (2, 3, 1) for w in windows)
    np.testing.assert_array_equal(windows[1].inputs[0, :, 0], [3, 4, 5])
    np.testing.assert_array_equal(windows[2].inputs[0, :, 0], [6, 0, 0])
    assert [w.lengths.tolist() for w in windows] == [[3, 3], [3, 1], [1, 0]]


def test_tbptt_forward_matches_full_sequence_and_stops_gradient(key):
    task = Echo(seq_len=12)
    model = models.build_model(task, "lstm", 6)
    params = model.init(key)
    batch = task.train_batch(0, 3)
    windows = [tbptt.window_of(batch, i, 4) for i in range(3)]
    loss_fn = tbptt.model_carry_loss_fn(model, task.kind)
    run = jax.jit(model.apply_with_carry)

    # Forward: windows with the carried state reproduce the whole sequence.
    _, full = run(params, batch.inputs, model.initial_carry(3))  # (B, T, 1)
    carry, pieces = model.initial_carry(3), []
    for window in windows:
        carry, out = run(params, window.inputs, carry)
        pieces.append(out)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-6)

    # One TBPTT step on window 1 with SGD(lr=1) exposes the gradient: params - new_params.
    config = train.OptimizerConfig("sgd", learning_rate=1.0, clip_norm=None)
    step = tbptt.make_tbptt_step(loss_fn, config, model.initial_carry(3), windows_per_sequence=3)
    first, _ = run(params, windows[0].inputs, model.initial_carry(3))
    state = train.create_train_state(params, config.build(), key, carry=first)._replace(step=jnp.int32(1))
    new, _ = step(state, windows[1])
    got = jax.tree.map(lambda a, b: a - b, params, new.params)

    @jax.jit
    def gradients(p):
        truncated = jax.grad(lambda q: loss_fn(q, windows[1], None, first)[0])(p)

        def through_both(q):  # full BPTT across the window boundary
            c, _ = model.apply_with_carry(q, windows[0].inputs, model.initial_carry(3))
            return loss_fn(q, windows[1], None, c)[0]

        return truncated, jax.grad(through_both)(p)

    truncated, full_grad = gradients(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got, truncated)
    assert not np.allclose(full_grad["core"]["w_ih"], truncated["core"]["w_ih"], rtol=1e-3)
    # The new state carries the window's final carry.
    expected_carry, _ = run(params, windows[1].inputs, first)
    np.testing.assert_allclose(new.carry.h, expected_carry.h, rtol=1e-5, atol=1e-6)


def test_fit_with_tbptt_learns_and_resumes_exactly(tmp_path):
    task = Echo(seq_len=12, eval_size=64)
    model = models.build_model(task, "gru", 8)
    options = dict(batch_size=8, tbptt=4, optimizer=train.OptimizerConfig(learning_rate=5e-2), log_every=1)
    straight = train.fit(model, task, steps=60, **options)
    losses = [h["loss"] for h in straight.history]
    assert np.mean(losses[-6:]) < 0.3 * np.mean(losses[:6])
    ckpt = tmp_path / "ckpt"
    train.fit(model, task, steps=16, ckpt_dir=ckpt, save_every=8, **options)  # ends mid-sequence: 16 = 5*3 + 1
    resumed = train.fit(model, task, steps=60, ckpt_dir=ckpt, resume=True, **options)
    assert int(resumed.state.step) == 60 and resumed.history[0]["step"] == 17
    expected, got = train.host_state(straight.state), train.host_state(resumed.state)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)


def test_tbptt_rejects_sequence_level_tasks():
    task, model = adding_setup()
    with pytest.raises(ValueError, match="per-step"):
        train.fit(model, task, steps=1, tbptt=4)


def test_custom_loss_fn_and_params(key):
    task, model = adding_setup()
    params = model.init(key)

    def loss_fn(p, batch, k):
        out = model.apply(p, batch.inputs)
        return jnp.mean(jnp.abs(out[:, 0] - batch.targets)), {}

    result = train.fit(model, task, steps=2, batch_size=BATCH, params=params, loss_fn=loss_fn, log_every=1)
    assert set(result.history[0]) == {"step", "split", "loss", "grad_norm", "grad_norm_clipped", "lr", "time"}


def test_fit_with_tbptt_uses_the_users_carry_loss():
    """A custom loss with tbptt is the loss trained on: a zero-gradient loss leaves the parameters unchanged."""
    task = Echo(seq_len=12, eval_size=16)
    model = models.build_model(task, "gru", 8)
    calls = []

    def zero_loss(params, batch, key, carry):
        calls.append(1)  # traced once per compile
        carry, outputs = model.apply_with_carry(params, batch.inputs, carry, lengths=batch.lengths)
        return 0.0 * jnp.sum(outputs), (carry, {"zero": jnp.float32(0)})

    start = train.initial_state(model, OPTIMIZER, 0)
    result = train.fit(
        model, task, steps=4, batch_size=BATCH, tbptt=4, optimizer=OPTIMIZER, loss_fn=zero_loss, log_every=1
    )
    assert calls and result.history[0]["zero"] == 0.0 and result.history[0]["grad_norm"] == 0.0
    for before, after in zip(jax.tree.leaves(start.params), jax.tree.leaves(result.state.params)):
        np.testing.assert_array_equal(before, after)


def test_fit_with_tbptt_rejects_a_loss_without_the_carry():
    task = Echo(seq_len=12, eval_size=16)
    model = models.build_model(task, "gru", 8)

    def plain_loss(params, batch, key):
        return model.loss_and_metrics(params, batch, task.kind)

    with pytest.raises(ValueError, match=r"with tbptt, loss_fn must take and return the carried state.*plain_loss"):
        train.fit(model, task, steps=1, batch_size=BATCH, tbptt=4, loss_fn=plain_loss)

    def carry_loss(params, batch, key, carry):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match=r"carry_loss.* cannot be called as loss_fn\(params, batch, key\).*tbptt"):
        train.fit(model, task, steps=1, batch_size=BATCH, loss_fn=carry_loss)


def test_fit_with_tbptt_rejects_a_model_without_a_carry():
    task = Echo(seq_len=12, eval_size=16)
    model = train.RunConfig(model="transformer", hidden_size=8, num_heads=2).build_model(task)
    with pytest.raises(ValueError, match="tbptt needs a model with a carried state"):
        train.fit(model, task, steps=1, batch_size=BATCH, tbptt=4)


# The command line with every registered cell, and the transformer.

TINY = ["--task-opt", "seq_len=6", "--task-opt", "eval_size=16", "--hidden", "4", "--batch-size", "4"]


def test_cli_trains_every_registered_cell_family(tmp_path, capsys):
    status = cli_main(["train", *TINY, "--cell", "lru", "--steps", "2", "--no-progress", "--ckpt-dir", str(tmp_path)])
    assert status == 0 and "done step=2" in capsys.readouterr().out
    restored = train.restore_run(tmp_path)
    assert restored.config.cell == "lru" and int(restored.state.step) == 2
    assert type(restored.model.core) is rnnjax.LRU


def test_cli_cell_choices_come_from_the_registry(capsys):
    parser = build_parser()
    subcommands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    train_parser = subcommands.choices["train"]
    cell = next(action for action in train_parser._actions if action.dest == "cell")
    assert list(cell.choices) == rnnjax.cell_names(aliases=True)
    assert all(name in train_parser.format_help() for name in ("mingru", "minlstm", "lru", "elman"))
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["train", "--cell", "nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and all(name in err for name in rnnjax.cell_names(aliases=True))


def test_cli_trains_and_restores_the_transformer(tmp_path, capsys):
    args = ["train", "--task", "copy", "--task-opt", "delay=3", "--task-opt", "eval_size=16", "--model"]
    args += ["transformer", "--hidden", "8", "--heads", "2", "--layers", "1", "--no-decay", "--batch-size", "4"]
    args += ["--steps", "2"]
    status = cli_main([*args, "--no-progress", "--ckpt-dir", str(tmp_path)])
    assert status == 0 and "done step=2" in capsys.readouterr().out
    restored = train.restore_run(tmp_path)
    assert restored.config.model == "transformer" and restored.config.num_heads == 2
    assert isinstance(restored.model, Transformer)
    assert (restored.model.d_model, restored.model.num_heads, restored.model.head) == (8, 2, "per_step")
    assert restored.model.vocab_size == restored.task.vocab_size and restored.model.input_size is None
    # Resuming rebuilds the same transformer and continues.
    assert cli_main([*args[:-1], "4", "--no-progress", "--ckpt-dir", str(tmp_path), "--resume"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "transformer", "--cell", "gru"], "--cell applies to --model rnn only"),
        (["--model", "transformer", "--bidirectional", "--tbptt", "2"], "--bidirectional, --tbptt apply to"),
        (["--heads", "2"], "--heads applies to --model transformer only"),
        (["--model", "transformer", "--hidden", "6", "--heads", "2"], "hidden_size is the transformer's d_model"),
    ],
)
def test_cli_rejects_options_of_the_other_model(extra, message, capsys):
    assert cli_main(["train", *TINY, "--steps", "1", *extra]) == 2
    assert message in capsys.readouterr().err
