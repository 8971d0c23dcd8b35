"""Multi-process data parallelism for real: 2 processes joined by ``jax.distributed`` on the loopback interface.

Each process owns one CPU device; gradients are all-reduced across the processes by the CPU collectives
(Gloo) that :func:`rnnjax.train.sharding.initialize` selects. Trained on the same global batch, the 2-process
run must end with the parameters of a single process, through the Python API (``fit(mesh=make_mesh())``) and
through ``python -m rnnjax train --distributed``, checkpoints included.
"""

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import numpy as np
import pytest

from rnnjax import checkpoint, train
from rnnjax.train import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = 2
TIMEOUT = 180  # seconds for the whole job; a hang (e.g. a process waiting on a collective) fails the test
RTOL, ATOL = 1e-5, 1e-6  # the 2-process all-reduce sums the gradient in another order than one device

CONFIG = dict(
    task_options={"seq_len": 10, "eval_size": 32},
    cell="gru",
    hidden_size=8,
    dropout=0.1,
    batch_size=16,
    steps=8,
    seed=3,
    optimizer={"learning_rate": 1e-2, "warmup_steps": 2, "decay_steps": 6},
)


def run_config():
    return train.RunConfig.from_dict(CONFIG)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict:
    """One CPU device per process: no forced device count, no accelerator, modest threading."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        flag for flag in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in flag
    )
    for name in list(env):  # no cluster to detect (a CI job under SLURM or Open MPI), only the explicit options
        if name.startswith(("SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR", "JAX_LOCAL_DEVICE", "JAX_NUM_CPU")):
            del env[name]
    env.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]))
    return env


def launch(commands: list[list[str]], cwd) -> list[str]:
    """Starts every command at once and waits for all; kills all of them if any fails or time runs out."""
    logs = [tempfile.TemporaryFile("w+") for _ in commands]  # files, not pipes: a full pipe would block a process
    procs = [
        subprocess.Popen(command, cwd=cwd, env=child_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
        for command, log in zip(commands, logs)
    ]
    deadline = time.monotonic() + TIMEOUT
    try:
        while True:
            codes = [proc.poll() for proc in procs]  # every process, so that one that failed is seen at once
            if None not in codes or any(codes) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    report = "\n".join(
        f"--- process {i} (exit {p.returncode}):\n{out[-3000:]}" for i, (p, out) in enumerate(zip(procs, outputs))
    )
    timed_out = time.monotonic() > deadline
    assert not timed_out and all(p.returncode == 0 for p in procs), (
        f"{'timed out after ' + str(TIMEOUT) + ' s; ' if timed_out else ''}the job failed:\n{report}"
    )
    return outputs


def assert_same_params(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=name)


def reference():
    """The single-process run on the same global batch (no mesh: the default device)."""
    config = run_config()
    return train.run(config, log_every=1)


WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from rnnjax.train import sharding
    sharding.initialize("127.0.0.1:{port}", num_processes={n}, process_id=int(sys.argv[1]))

    import jax
    import json
    from rnnjax import checkpoint, train
    from test_multiprocess import run_config

    assert jax.process_count() == {n} and jax.device_count() == {n} and jax.local_device_count() == 1, jax.devices()
    config = run_config()
    task = config.build_task()
    mesh = sharding.make_mesh()
    assert mesh.devices.size == {n}
    batch = sharding.shard_batch(task.train_batch(0, config.batch_size), mesh)
    assert [s.data.shape[0] for s in batch.inputs.addressable_shards] == [config.batch_size // {n}]
    result = train.fit(
        config.build_model(task), task, steps=config.steps, batch_size=config.batch_size,
        optimizer=config.optimizer, seed=config.seed, eval_every=config.steps, log_every=1,
        mesh=mesh, ckpt_dir="ckpt", save_every=4, metrics_path="metrics-%d.jsonl" % jax.process_index(),
    )
    assert len(result.state.params["core"]["w_ih"].sharding.device_set) == {n}
    if sharding.is_main_process():
        checkpoint.save_npz("params.npz", result.state.params)
        with open("history.json", "w") as file:
            json.dump([result.history, result.evals], file)
    """
)


@pytest.mark.slow
def test_fit_on_two_processes_matches_one(tmp_path):
    port = free_port()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=os.path.join(ROOT, "tests"), port=port, n=PROCESSES))
    launch([[sys.executable, str(script), str(i)] for i in range(PROCESSES)], cwd=tmp_path)

    want = reference()
    want_params = checkpoint.flat_arrays(want.state.params)
    assert_same_params(dict(np.load(tmp_path / "params.npz")), want_params)

    # Only process 0 writes metrics; the losses it logged are the global batch's.
    assert not (tmp_path / "metrics-1.jsonl").exists()
    logged = train.read_metrics(tmp_path / "metrics-0.jsonl")
    losses = [r["loss"] for r in logged if r["split"] == "train"]
    np.testing.assert_allclose(losses, [r["loss"] for r in want.history], rtol=1e-5)
    evals = [r for r in logged if r["split"] == "valid"]
    assert len(evals) == 1
    np.testing.assert_allclose(evals[0]["loss"], want.evals[-1]["loss"], rtol=1e-5)

    # Both processes took part in the (Orbax) checkpoints: one directory, readable by a single process.
    with checkpoint.CheckpointManager(tmp_path / "ckpt", async_save=False) as manager:
        assert manager.steps() == [4, 8]
        restored, meta = manager.restore(target=want.state)
    assert meta["step"] == 8
    assert_same_params(checkpoint.flat_arrays(restored.params), want_params)


OPTIONS = (
    "--task adding --task-opt seq_len=10 --task-opt eval_size=32 --cell gru --hidden 8 --dropout 0.1 "
    "--batch-size 16 --seed 3 --lr 1e-2 --warmup 2 --log-every 1 --no-progress --save-params params.npz "
    "--ckpt-dir ckpt --save-every 2"
).split()


def cli(*extra):
    return [sys.executable, "-m", "rnnjax", "train", *OPTIONS, *extra]


def distributed(port, *extra):
    """The command line of every process of a 2-process job on the loopback interface."""
    flags = ["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(PROCESSES)]
    return [cli(*extra, *flags, "--process-id", str(i)) for i in range(PROCESSES)]


@pytest.mark.slow
def test_cli_distributed_on_two_processes_matches_one(tmp_path):
    """8 steps in one process, against 4 + 4 steps (stopped, then resumed from the checkpoint) in two."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    (out,) = launch([cli("--steps", "4", "--extend-steps", "4")], cwd=single)
    assert "rnnjax train: done step=8" in out

    first = launch(distributed(free_port(), "--steps", "4"), cwd=multi)
    assert "rnnjax train: done step=4" in first[0]
    outputs = launch(distributed(free_port(), "--steps", "4", "--extend-steps", "4", "--resume"), cwd=multi)
    assert "rnnjax train: resumed from step 4" in outputs[0]
    assert "rnnjax train: trained data-parallel on 2 devices of 2 processes" in outputs[0]
    assert "rnnjax train: done step=8" in outputs[0]
    assert "rnnjax train: done" not in first[1] + outputs[1]  # the summary and the files come from process 0 alone

    want = dict(np.load(single / "params.npz"))
    assert_same_params(dict(np.load(multi / "params.npz")), want)
    restored = train.restore_run(multi / "ckpt")
    assert int(restored.meta["step"]) == 8
    assert_same_params(checkpoint.flat_arrays(restored.state.params), want)
    # Training records (the interrupted run also evaluated at its end, step 4): the global batch's losses.
    single_log, multi_log = (
        [r for r in train.read_metrics(d / "ckpt" / "metrics.jsonl") if r["split"] == "train"] for d in (single, multi)
    )
    assert [r["step"] for r in multi_log] == [r["step"] for r in single_log] == list(range(1, 9))
    np.testing.assert_allclose([r["loss"] for r in multi_log], [r["loss"] for r in single_log], rtol=1e-5)


def test_launch_kills_the_job_when_a_process_fails(tmp_path):
    started = time.monotonic()
    with pytest.raises(AssertionError, match="the job failed"):
        launch(
            [[sys.executable, "-c", "import time; time.sleep(60)"], [sys.executable, "-c", "raise SystemExit(1)"]],
            tmp_path,
        )
    assert time.monotonic() - started < 30


def test_cli_process_options_need_distributed(tmp_path):
    from rnnjax.__main__ import main

    assert main(["train", "--steps", "1", "--num-processes", "2"]) == 2


def test_initialize_selects_gloo_unless_chosen():
    name = "jax_cpu_collectives_implementation"
    before = getattr(jax.config, name)
    try:
        jax.config.update(name, None)  # unset, as in JAX versions without a default
        sharding.use_cpu_collectives()
        assert getattr(jax.config, name) == "gloo"
        jax.config.update(name, "mpi")  # the user's choice is kept
        sharding.use_cpu_collectives()
        assert getattr(jax.config, name) == "mpi"
    finally:
        jax.config.update(name, before)
