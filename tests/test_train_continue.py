"""Training a finished run longer: a schedule segment appended to the optimiser, resumable bitwise itself."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from rnnjax import models, tasks, train
from rnnjax.__main__ import main as cli_main

BATCH = 8
BASE = train.OptimizerConfig(learning_rate=1e-2, warmup_steps=2, decay_steps=6)  # ends at step 8
LONGER = BASE.extended(6, learning_rate=5e-3, warmup_steps=1)  # steps 8 .. 14


def setup():
    task = tasks.get("adding", seq_len=8, eval_size=50)
    return task, models.build_model(task, "gru", 8)


def states_equal(a, b):
    for x, y in zip(jax.tree.leaves(train.host_state(a)), jax.tree.leaves(train.host_state(b))):
        np.testing.assert_array_equal(x, y)


def cosine(count, peak, warmup, decay, end):
    """The schedule's formula, written out: linear warmup, then cosine from ``peak`` to ``end``."""
    if count < warmup:
        return peak * (count + 1) / warmup
    progress = min(max((count - warmup) / decay, 0.0), 1.0)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def test_segments_restart_the_schedule_from_their_start():
    config = train.OptimizerConfig(learning_rate=1.0, warmup_steps=2, decay_steps=8, final_lr_fraction=0.1)
    longer = config.extended(5, learning_rate=0.5, warmup_steps=1).extended(4, learning_rate=0.2)
    assert [(s.start, s.steps) for s in longer.segments] == [(10, 5), (15, 4)] and longer.schedule_end() == 19
    lr = longer.schedule()
    for count in range(25):
        if count < 10:
            want = cosine(count, 1.0, 2, 8, 0.1)
        elif count < 15:
            want = cosine(count - 10, 0.5, 1, 4, 0.05)
        else:
            want = cosine(count - 15, 0.2, 0, 4, 0.02)
        np.testing.assert_allclose(float(lr(count)), want, rtol=1e-6, err_msg=f"count {count}")
    constant = train.OptimizerConfig(learning_rate=0.5).extended(3, learning_rate=0.1, start=7).schedule()
    assert [float(constant(c)) for c in (6, 7, 20)] == [0.5, pytest.approx(0.1), pytest.approx(0.1)]
    with pytest.raises(ValueError, match="constant rate and no end; pass start="):
        train.OptimizerConfig().extended(10)
    with pytest.raises(ValueError, match="strictly increasing"):
        longer.extended(3, start=12)
    with pytest.raises(ValueError, match="ScheduleSegment.steps must be an integer >= 1"):
        config.extended(0)
    # Saved as JSON, read back as the same config.
    assert train.OptimizerConfig(**train.RunConfig(optimizer=longer).to_dict()["optimizer"]) == longer


def test_a_continued_run_resumes_bitwise_and_equals_an_uninterrupted_continuation(tmp_path):
    task, model = setup()
    options = dict(batch_size=BATCH, log_every=1)
    finished, interrupted = tmp_path / "finished", tmp_path / "interrupted"
    for directory in (finished, interrupted):
        train.fit(model, task, steps=8, optimizer=BASE, ckpt_dir=directory, save_every=4, **options)
    # Continued in one go from the finished run ...
    straight = train.fit(model, task, steps=14, optimizer=LONGER, ckpt_dir=finished, resume=True, **options)
    assert straight.start_step == 8 and [h["step"] for h in straight.history] == list(range(9, 15))
    lrs = [h["lr"] for h in straight.history]  # update 8 + i uses the segment's rate at i
    np.testing.assert_allclose(lrs, [cosine(i, 5e-3, 1, 5, 0.0) for i in range(6)], rtol=1e-6, atol=1e-12)
    # ... and stopped at step 11 in the middle of the continuation (as a killed process would), then resumed.
    train.fit(model, task, steps=11, optimizer=LONGER, ckpt_dir=interrupted, save_every=4, resume=True, **options)
    resumed = train.fit(model, task, steps=14, optimizer=LONGER, ckpt_dir=interrupted, resume=True, **options)
    assert resumed.start_step == 11
    states_equal(resumed.state, straight.state)
    # A run trained under the longer schedule from the start takes the same updates (to rounding).
    fresh = train.fit(model, task, steps=14, optimizer=LONGER, **options)
    for a, b in zip(jax.tree.leaves(fresh.state.params), jax.tree.leaves(straight.state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_changed_settings_are_still_refused(tmp_path):
    task, model = setup()
    options = dict(batch_size=BATCH, ckpt_dir=tmp_path, resume=True)
    train.fit(model, task, steps=8, optimizer=BASE, ckpt_dir=tmp_path, save_every=8, batch_size=BATCH)
    with pytest.raises(train.ResumeError, match=r"optimizer.decay_steps: saved 6, now 12.*optimizer.extended"):
        train.fit(model, task, steps=14, optimizer=dataclasses.replace(BASE, decay_steps=12), **options)
    with pytest.raises(train.ResumeError, match="batch_size: saved 8, now 4"):
        train.fit(model, task, steps=14, optimizer=LONGER, **{**options, "batch_size": 4})
    early = BASE.extended(6, start=4)  # would change the rates of updates 4 .. 7, already taken
    with pytest.raises(train.ResumeError, match=r"optimizer.segments \(may only be appended from step 8 on\)"):
        train.fit(model, task, steps=14, optimizer=early, **options)
    train.fit(model, task, steps=10, optimizer=LONGER, **options)
    with pytest.raises(train.ResumeError, match="optimizer.segments"):  # the continued run without its segment
        train.fit(model, task, steps=14, optimizer=BASE, **options)


def cli(tmp_path, steps=8, *extra):
    return [
        "train", "--task", "adding", "--task-opt", "seq_len=8", "--task-opt", "eval_size=50", "--cell", "gru",
        "--hidden", "8", "--batch-size", "8", "--lr", "1e-2", "--warmup", "2", "--steps", str(steps),
        "--save-every", "4", "--no-progress", "--ckpt-dir", str(tmp_path / "run"), *extra,
    ]  # fmt: skip


def test_cli_extends_a_finished_run(tmp_path, capsys):
    assert cli_main(cli(tmp_path)) == 0
    assert cli_main(cli(tmp_path, 14, "--resume")) == 2  # the command: still refused, with the way out
    assert "--extend-steps N" in capsys.readouterr().err
    extend = ["--extend-steps", "6", "--extend-lr", "5e-3", "--extend-warmup", "1"]
    assert cli_main(cli(tmp_path, 8, *extend, "--resume")) == 0
    out = capsys.readouterr().out
    assert "resumed from step 8" in out and "done step=14" in out
    restored = train.restore_run(tmp_path / "run")
    assert restored.config.steps == 14 and restored.config.optimizer == LONGER
    assert int(restored.state.step) == 14
    assert cli_main(cli(tmp_path, 8, "--extend-lr", "1e-3")) == 2
    assert "--extend-lr and --extend-warmup need --extend-steps" in capsys.readouterr().err
