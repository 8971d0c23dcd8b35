"""Checkpoints: round trips, keep-last-N, corrupt and partial checkpoints, exact resume after SIGKILL."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax import checkpoint, models, tasks, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The configuration of test_train.py, so that fit reuses compiled steps across the two files.
OPTIMIZER = train.OptimizerConfig(learning_rate=1e-2)


def small_run():
    task = tasks.get("adding", seq_len=8, eval_size=200)
    return task, models.build_model(task, "gru", 8)


def states_equal(a, b):
    a, b = train.host_state(a), train.host_state(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def shifted(state, step):
    """A distinguishable state at ``step``."""
    return state._replace(step=jnp.int32(step), params=jax.tree.map(lambda p: p + step, state.params))


@pytest.fixture
def state():
    _, model = small_run()
    return train.initial_state(model, OPTIMIZER, seed=0)


def test_round_trip_is_bitwise(tmp_path, state):
    with checkpoint.CheckpointManager(tmp_path) as manager:
        manager.save(shifted(state, 3), config={"note": "x"})
    restored, meta = checkpoint.restore_with_meta(tmp_path, state)
    states_equal(restored, shifted(state, 3))
    assert meta["step"] == 3 and meta["config"] == {"note": "x"}
    assert jax.random.key_impl(restored.rng) == jax.random.key_impl(state.rng)
    # Without a target the arrays come back in plain containers, the PRNG key as a typed key.
    raw = checkpoint.restore(tmp_path)
    np.testing.assert_array_equal(raw["params"]["head"]["w"], shifted(state, 3).params["head"]["w"])
    assert jax.random.key_impl(raw["rng"]) == jax.random.key_impl(state.rng)
    np.testing.assert_array_equal(jax.random.key_data(raw["rng"]), jax.random.key_data(state.rng))


def test_any_pytree_round_trips_with_keys_anywhere(tmp_path):
    tree = {
        "w": jnp.arange(6.0).reshape(2, 3),
        "keys": [jax.random.key(1), jax.random.key(2, impl="rbg")],
        "n": jnp.int32(7),
    }
    checkpoint.save(tmp_path, tree, step=4)
    restored, meta = checkpoint.restore_with_meta(tmp_path)
    assert meta["step"] == 4 and meta["prng_keys"] == {"keys/0": "threefry2x32", "keys/1": "rbg"}
    assert jax.random.key_impl(restored["keys"][1]) == jax.random.key_impl(tree["keys"][1])
    for a, b in zip(jax.tree.leaves(restored["keys"]), jax.tree.leaves(tree["keys"])):
        np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
    np.testing.assert_array_equal(restored["w"], tree["w"])
    with pytest.raises(ValueError, match="step: the tree has no 'step' entry"):
        checkpoint.save(tmp_path / "other", {"w": tree["w"]})


def test_reads_format_1_metadata(tmp_path, state):
    """Checkpoints written before format 2 recorded one PRNG key, at ``rng``, as ``meta["rng_impl"]``."""
    checkpoint.save(tmp_path, shifted(state, 2))
    path = tmp_path / "2" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["format"], meta["rng_impl"] = 1, meta.pop("prng_keys")["rng"]
    path.write_text(json.dumps(meta))
    states_equal(checkpoint.restore(tmp_path, state), shifted(state, 2))
    assert jax.random.key_impl(checkpoint.restore(tmp_path)["rng"]) == jax.random.key_impl(state.rng)


def test_storage_does_not_import_training():
    """rnnjax.checkpoint is storage: importing it loads nothing of rnnjax.train (no import cycle)."""
    code = "import sys, rnnjax.checkpoint; print(sorted(m for m in sys.modules if m.startswith('rnnjax.train')))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    assert out.strip() == "[]"


def test_keeps_the_last_n(tmp_path, state):
    with checkpoint.CheckpointManager(tmp_path, keep=2) as manager:
        for step in range(1, 6):
            manager.save(shifted(state, step))
        manager.wait()
        assert manager.steps() == [4, 5]
    assert int(checkpoint.restore(tmp_path, state).step) == 5


def _data_files(step_dir):
    return [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if os.path.isfile(f)]


def truncate_files(step_dir):
    for path in _data_files(step_dir):
        with open(path, "r+b") as file:
            file.truncate(os.path.getsize(path) // 2)


def flip_bytes(step_dir):
    for path in _data_files(step_dir):
        if os.sep + "d" + os.sep in path:
            data = bytearray(open(path, "rb").read())
            data[len(data) // 2] ^= 0xFF
            open(path, "wb").write(bytes(data))


def delete_state_item(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state"))


def truncate_meta(step_dir):
    with open(os.path.join(step_dir, "meta", "metadata"), "r+b") as file:
        file.truncate(7)


def wrong_digest(step_dir):
    """Well-formed files whose contents no longer match what was saved (silent corruption)."""
    path = os.path.join(step_dir, "meta", "metadata")
    meta = json.load(open(path))
    meta["digest"] = "0" * 64
    json.dump(meta, open(path, "w"))


# When a read fails inside Orbax, its asyncio machinery may report a closed event loop at garbage collection.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [truncate_files, flip_bytes, delete_state_item, truncate_meta, wrong_digest])
def test_corrupt_latest_checkpoint_is_skipped_with_a_warning(tmp_path, state, corrupt):
    with checkpoint.CheckpointManager(tmp_path, keep=5) as manager:
        manager.save(shifted(state, 1))
        manager.save(shifted(state, 2))
    corrupt(str(tmp_path / "2"))
    with pytest.warns(checkpoint.CheckpointWarning, match="step 2 .* corrupt"):
        restored = checkpoint.restore(tmp_path, state)
    states_equal(restored, shifted(state, 1))


def test_partial_checkpoint_is_ignored(tmp_path, state):
    with checkpoint.CheckpointManager(tmp_path) as manager:
        manager.save(shifted(state, 1))
    partial = tmp_path / "2.orbax-checkpoint-tmp-1234567" / "state"  # what a kill during a save leaves
    partial.mkdir(parents=True)
    (partial / "junk").write_bytes(b"\x00" * 10)
    states_equal(checkpoint.restore(tmp_path, state), shifted(state, 1))


def test_nothing_to_restore(tmp_path, state):
    with pytest.raises(FileNotFoundError):
        checkpoint.restore(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no valid checkpoint"):
        checkpoint.restore(tmp_path / "empty", state)


def test_fit_resumes_exactly_and_quarantines_corrupt_steps(tmp_path):
    task, model = small_run()
    options = dict(batch_size=8, optimizer=OPTIMIZER, log_every=2)
    straight = train.fit(model, task, steps=12, **options)
    ckpt = tmp_path / "ckpt"
    train.fit(model, task, steps=8, ckpt_dir=ckpt, save_every=4, metrics_path=tmp_path / "m.jsonl", **options)
    truncate_files(str(ckpt / "8"))
    with pytest.warns(checkpoint.CheckpointWarning, match="step 8"):
        resumed = train.fit(
            model,
            task,
            steps=12,
            ckpt_dir=ckpt,
            save_every=4,
            resume=True,
            metrics_path=tmp_path / "m.jsonl",
            **options,
        )
    assert resumed.history[0]["step"] == 6  # resumed from step 4, the newest valid checkpoint
    states_equal(resumed.state, straight.state)
    assert os.listdir(ckpt / checkpoint.CORRUPT_DIR)[0].startswith("8-")
    with checkpoint.CheckpointManager(ckpt) as manager:
        assert manager.steps() == [4, 8, 12]
    steps = [r["step"] for r in train.read_metrics(tmp_path / "m.jsonl")]
    assert steps == [2, 4, 6, 8, 10, 12]  # the lines after step 4 were rewritten, not duplicated


def test_fit_refuses_to_mix_runs(tmp_path):
    task, model = small_run()
    options = dict(batch_size=8, optimizer=OPTIMIZER, ckpt_dir=tmp_path, save_every=2)
    train.fit(model, task, steps=2, **options)
    with pytest.raises(FileExistsError, match="resume"):
        train.fit(model, task, steps=4, **options)
    with pytest.raises(train.ResumeError, match="batch_size: saved 8, now 4"):
        train.fit(model, task, steps=4, resume=True, **{**options, "batch_size": 4})


@pytest.mark.parametrize("cell", ["gru", "mingru"])
def test_restore_run_rebuilds_a_run(tmp_path, cell):
    config = train.RunConfig(
        task_options={"seq_len": 8, "eval_size": 200},
        cell=cell,
        hidden_size=8,
        batch_size=8,
        steps=3,
        optimizer=OPTIMIZER,
    )
    result = train.run(config, ckpt_dir=tmp_path)
    restored = train.restore_run(tmp_path)  # the structure comes from the saved run config
    states_equal(restored.state, result.state)
    assert restored.config == config and restored.meta["step"] == 3
    assert restored.model == config.build_model(restored.task)
    scores = train.evaluate(restored.model, restored.state.params, restored.task)
    assert np.isfinite(scores["mse"])


def test_restore_run_needs_a_run_config(tmp_path, state):
    checkpoint.save(tmp_path, shifted(state, 1))
    with pytest.raises(ValueError, match="hold no run config"):
        train.restore_run(tmp_path)
    with pytest.raises(FileNotFoundError):
        train.restore_run(tmp_path / "missing")


# Exact resume after a real SIGKILL.

CLI = [
    sys.executable, "-m", "rnnjax", "train", "--task", "adding", "--task-opt", "seq_len=20", "--cell", "lstm",
    "--hidden", "16", "--batch-size", "16", "--steps", "200", "--seed", "3", "--save-every", "40", "--keep", "2",
    "--eval-every", "100", "--log-every", "10", "--lr", "3e-3", "--dropout", "0.1", "--no-progress",
]  # fmt: skip


def run_cli(ckpt_dir, *extra, wait=True):
    # The three runs share a persistent compilation cache: the second and third start in half the time, and
    # loading a cached executable changes nothing in the numbers.
    cache = os.path.join(os.path.dirname(ckpt_dir), "jax-cache")
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": ROOT,
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    process = subprocess.Popen(
        [*CLI, "--ckpt-dir", str(ckpt_dir), *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if wait:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        return out
    return process


def test_sigkill_then_resume_gives_bitwise_identical_parameters(tmp_path):
    """Kill the CLI (SIGKILL) right after its first checkpoint appears, resume, compare with a clean run."""
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    process = run_cli(killed_dir, wait=False)
    deadline = time.monotonic() + 240
    while not (killed_dir / "40").is_dir():  # with asynchronous saves, a step may appear only as the next begins
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    latest = max(int(name) for name in os.listdir(killed_dir) if name.isdigit())
    assert latest < 200, "the run finished before it could be killed"

    out = run_cli(killed_dir, "--resume")
    resumed_from = int(out.split("resumed from step ")[1].split()[0])
    assert 40 <= resumed_from <= latest and "done step=200" in out
    run_cli(clean_dir)

    killed, clean = train.restore_run(killed_dir).state, train.restore_run(clean_dir).state
    assert int(killed.step) == int(clean.step) == 200
    states_equal(killed, clean)  # params, optimiser state, step and RNG, bitwise

    def records(path):
        return [{k: v for k, v in r.items() if k != "time"} for r in train.read_metrics(path / "metrics.jsonl")]

    assert records(killed_dir) == records(clean_dir)
