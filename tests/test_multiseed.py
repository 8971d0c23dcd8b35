"""rnnjax.train.train_seeds: several seeds and learning rates at once, equal to separate fit() runs."""

import dataclasses

import jax
import numpy as np
import pytest

from rnnjax import models, tasks, train
from rnnjax.train.multiseed import DATA_SEED_STRIDE, member_task


def small_setup(**task_options):
    task = tasks.get("adding", seq_len=6, eval_size=16, **task_options)
    model = models.build_model(task, "gru", hidden_size=5)
    optimizer = train.OptimizerConfig("adam", learning_rate=1e-2, warmup_steps=2, decay_steps=6)
    return task, model, optimizer


def test_each_member_equals_its_own_fit_run():
    """Member (seed s, rate r) ends with the parameters of fit(seed=s) (data seed task.seed + 1000 s) at rate r."""
    task, model, optimizer = small_setup()
    seeds, rates = (0, 1, 0), (1e-2, 1e-2, 3e-3)
    result = train.train_seeds(
        model, task, seeds=seeds, learning_rates=rates, steps=8, batch_size=4, optimizer=optimizer, eval_every=4
    )
    for i, (seed, rate) in enumerate(zip(seeds, rates)):
        reference = train.fit(
            model,
            task,
            steps=8,
            batch_size=4,
            optimizer=dataclasses.replace(optimizer, learning_rate=rate),
            seed=seed,
        )
        member = jax.tree.map(lambda leaf, i=i: leaf[i], result.params)
        for got, want in zip(jax.tree.leaves(member), jax.tree.leaves(reference.state.params)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    assert member_task(task, 2).seed == task.seed + 2 * DATA_SEED_STRIDE
    # Member 0 and member 2 share a seed but not a rate: different parameters.
    first, third = (jax.tree.leaves(jax.tree.map(lambda leaf, i=i: leaf[i], result.params)) for i in (0, 2))
    assert any(not np.allclose(a, b) for a, b in zip(first, third))


def test_curves_final_scores_and_shapes():
    task, model, optimizer = small_setup()
    result = train.train_seeds(model, task, seeds=(0, 1), steps=6, batch_size=4, optimizer=optimizer, eval_every=2)
    assert result.steps.tolist() == [2, 4, 6] and result.stopped_at == 6
    assert result.curve.shape == (3, 2) and result.train_loss.shape == (3, 2)
    assert set(result.final) == {"valid", "test"} and result.final["test"]["mse"].shape == (2,)
    # The last curve point is the final validation score, and matches an independent evaluation.
    np.testing.assert_allclose(result.curve[-1], result.final["valid"]["mse"])
    for i in range(2):
        params = jax.tree.map(lambda leaf, i=i: leaf[i], result.params)
        want = train.evaluate(model, params, task, "test")["mse"]
        np.testing.assert_allclose(result.final["test"]["mse"][i], want, rtol=1e-5)
    assert result.threshold == task.solved_at
    assert result.compile_seconds > 0 and result.train_seconds > 0


def test_stops_once_every_member_solved_and_records_steps_to_solve(monkeypatch):
    """With a threshold every model reaches at once, the run stops at the first evaluation."""
    task, model, optimizer = small_setup()
    monkeypatch.setattr(type(task), "solved_at", 10.0)  # any mse counts as solved
    result = train.train_seeds(model, task, seeds=(0, 1), steps=8, batch_size=4, optimizer=optimizer, eval_every=2)
    assert result.stopped_at == 2 and result.steps.tolist() == [2]
    assert result.steps_to_solve.tolist() == [2, 2] and result.solved.all()
    monkeypatch.setattr(type(task), "solved_at", 0.0)  # nothing reaches an mse of exactly 0
    result = train.train_seeds(model, task, seeds=(0,), steps=4, batch_size=4, optimizer=optimizer, eval_every=2)
    assert result.stopped_at == 4 and result.steps_to_solve.tolist() == [-1] and not result.solved.any()
    # Without early stopping the budget is trained and the first solving step still recorded.
    monkeypatch.setattr(type(task), "solved_at", 10.0)
    result = train.train_seeds(
        model, task, seeds=(0,), steps=4, batch_size=4, optimizer=optimizer, eval_every=2, stop_when_solved=False
    )
    assert result.stopped_at == 4 and result.steps_to_solve.tolist() == [2]


def test_seq2seq_and_extra_splits_are_scored():
    task = tasks.get("parity", train_len=4, long_len=8, eval_size=8)
    model = models.build_model(task, "lstm", hidden_size=4)
    result = train.train_seeds(model, task, seeds=(0,), steps=2, batch_size=4, eval_every=2)
    assert set(result.final) == {"valid", "test", "test_long"}
    translation = tasks.get("translation", eval_size=4)
    from rnnjax.seq2seq import EncoderDecoder

    seq2seq = EncoderDecoder.build(
        "gru", 8, source_vocab=translation.vocab_size, target_vocab=translation.output_size, bos_id=translation.bos_id
    )
    result = train.train_seeds(seq2seq, translation, seeds=(0,), steps=2, batch_size=2, eval_every=2)
    assert set(result.final["test"]) == {"exact_match", "token_accuracy"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seeds=()), "seeds"),
        (dict(seeds=(0, -1)), "seeds"),
        (dict(seeds=(0.5,)), "seeds"),
        (dict(seeds=(2**32,)), "seeds"),
        (dict(learning_rates=(1e-3,)), "learning_rates"),
        (dict(learning_rates=(1e-3, 0.0)), "learning_rates"),
        (dict(steps=0), "steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(eval_every=3), "multiple of eval_every"),
        (dict(monitor="train"), "splits"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    task, model, optimizer = small_setup()
    arguments = dict(seeds=(0, 1), steps=4, batch_size=2, eval_every=2, optimizer=optimizer) | kwargs
    with pytest.raises(ValueError, match=message):
        train.train_seeds(model, task, **arguments)


def test_solve_thresholds_follow_the_metric_direction():
    adding, parity = tasks.get("adding"), tasks.get("parity")
    assert adding.is_solved(0.005) and not adding.is_solved(0.02) and not adding.is_solved(float("nan"))
    assert parity.is_solved(0.995) and not parity.is_solved(0.9)
    co2 = tasks.get("co2")
    assert co2.solve_threshold("test") == pytest.approx(co2.solved_fraction * co2.baseline_score("test"))
    for name in tasks.names():  # every task defines when it counts as solved
        assert tasks.get(name).solve_threshold("valid") is not None, name
