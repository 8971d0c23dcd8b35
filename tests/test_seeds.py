"""Seeds: ``fit(seed=...)``, ``--seed`` and ``train_seeds`` share one rule for the data order (and --data-seed)."""

import jax
import numpy as np
import pytest

from rnnjax import checkpoint, models, tasks, train
from rnnjax.__main__ import main as cli_main
from rnnjax.train.run import _saved_run_config

TASK = dict(seq_len=8, eval_size=50)
OPTIMIZER = train.OptimizerConfig(learning_rate=1e-2)
STEPS, BATCH = 6, 8


def setup():
    task = tasks.get("adding", **TASK)
    return task, models.build_model(task, "gru", 8)


def reference_params(model, params, batches):
    """Plain loop of the train step over given batches: the data order made explicit, independently of fit."""
    state = train.initial_state(model, OPTIMIZER, seed=0, params=params)
    step = train.make_train_step(train.model_loss_fn(model, "regress"), OPTIMIZER)
    for batch in batches:
        state, _ = step(state, batch)
    return state.params


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_two_fit_seeds_see_different_batches_by_default():
    """Same initial parameters, no dropout: only the data order can tell seed 0 from seed 1 apart."""
    task, model = setup()
    params = model.init(jax.random.key(0))
    runs = {
        seed: train.fit(model, task, steps=STEPS, batch_size=BATCH, optimizer=OPTIMIZER, seed=seed, params=params)
        for seed in (0, 1)
    }
    # Seed s trains on the task reseeded with task.seed + 1000 * s: spelled out with tasks.get.
    for seed, result in runs.items():
        reseeded = tasks.get("adding", **TASK, seed=task.seed + 1000 * seed)
        batches = [reseeded.train_batch(s, BATCH) for s in range(STEPS)]
        assert_trees_equal(result.state.params, reference_params(model, params, batches))
    first, second = (jax.tree.leaves(runs[s].state.params) for s in (0, 1))
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))


def test_data_seed_fixes_the_data_order_separately():
    task, model = setup()
    params = model.init(jax.random.key(0))
    options = dict(steps=STEPS, batch_size=BATCH, optimizer=OPTIMIZER, params=params)
    own = train.fit(model, task, seed=0, **options)
    pinned = train.fit(model, task, seed=1, data_seed=task.seed, **options)  # seed 1, the task's own batches
    assert_trees_equal(own.state.params, pinned.state.params)
    batches = [tasks.get("adding", **TASK, seed=7).train_batch(s, BATCH) for s in range(STEPS)]
    seven = train.fit(model, task, seed=0, data_seed=7, **options)
    assert_trees_equal(seven.state.params, reference_params(model, params, batches))
    # Evaluation splits are the task's own, whatever the seeds.
    with_evals = train.fit(model, task, seed=0, data_seed=7, eval_every=STEPS, **options)
    assert with_evals.evals[-1]["mse"] == pytest.approx(
        train.evaluate(model, with_evals.state.params, task, "valid")["mse"], rel=1e-6
    )


def test_data_seed_is_checked():
    task, model = setup()
    with pytest.raises(TypeError, match="data_seed must be an int"):
        train.fit(model, task, steps=1, data_seed="1")
    with pytest.raises(ValueError, match="data_seed must be >= 0"):
        train.fit(model, task, steps=1, data_seed=-1)
    with pytest.raises(ValueError, match="RunConfig.data_seed"):
        train.RunConfig(data_seed=-2)


def cli_args(tmp_path, *extra):
    return [
        "train", "--task", "adding", "--task-opt", "seq_len=8", "--task-opt", "eval_size=50", "--cell", "gru",
        "--hidden", "8", "--steps", str(STEPS), "--batch-size", str(BATCH), "--lr", "1e-2", "--no-progress",
        "--save-params", str(tmp_path / "params.npz"), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "extra, fit_seeds",
    [(["--seed", "3"], {"seed": 3}), (["--seed", "3", "--data-seed", "7"], {"seed": 3, "data_seed": 7})],
)
def test_cli_and_fit_with_the_same_arguments_give_bitwise_identical_params(tmp_path, capsys, extra, fit_seeds):
    assert cli_main(cli_args(tmp_path, *extra)) == 0
    capsys.readouterr()
    task, model = setup()
    optimizer = train.OptimizerConfig(learning_rate=1e-2, decay_steps=STEPS)  # the command line's cosine
    result = train.fit(model, task, steps=STEPS, batch_size=BATCH, optimizer=optimizer, **fit_seeds)
    assert_trees_equal(checkpoint.load_npz(tmp_path / "params.npz", like=result.state.params), result.state.params)


def test_run_configs_saved_before_data_seeds_rebuild_their_run():
    """Old runs seeded the task (data and evaluation splits) with ``seed``: restore_run keeps that meaning."""
    old = {k: v for k, v in train.RunConfig(task_options=TASK, seed=4).to_dict().items() if k != "data_seed"}
    config = _saved_run_config({"config": {"run": old}}, "runs/old")
    assert config.task_options == {**TASK, "seed": 4} and config.data_seed == 4
    assert config.build_task().seed == 4
    new = _saved_run_config({"config": {"run": train.RunConfig(task_options=TASK, seed=4).to_dict()}}, "runs/new")
    assert new.build_task().seed == 0 and new.data_seed is None
    assert new == train.RunConfig(task_options=TASK, seed=4)
