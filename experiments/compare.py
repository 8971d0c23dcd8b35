"""Which recurrent design, or attention, for this kind of sequence? A measured answer, task by task.

Trains every model (SimpleRNN, Jordan, LSTM, GRU, a bidirectional LSTM where the task allows one, minGRU,
minLSTM, LRU and a causal transformer) on every task at matched parameter counts and several seeds, each until
it solves the task or spends the task's step budget, and writes into ``--out``:

* ``compare.md`` and ``compare.csv``: one row per (task, model, split, metric) with the columns of
  :data:`CSV_COLUMNS` (``model = baseline`` rows hold the trivial predictor's score; ``solved`` counts the seeds
  that solved the task, ``steps_to_solve`` is their median steps-to-solve, ``steps`` where training stopped);
* ``learning_curves.png``, ``length_generalisation.png``, ``solved.png``, ``throughput.png``,
  ``streaming_latency.png``;
* ``curves.csv``, ``length_accuracy.csv``, ``speed.csv``, ``runs.jsonl``: the numbers behind the plots.

Usage::

    python experiments/compare.py --quick --out results/compare     # the lessons, minutes on 2 CPU cores
    python experiments/compare.py --out results/compare_full         # every task and model, CPU (hours)
    python experiments/compare.py --accelerator --out results/big    # larger sizes, for a GPU or TPU
    python experiments/compare.py --quick --sweep                    # re-choose the learning rates (below)

Learning rates are not guessed: ``--sweep`` trains every (task, model) pair of a size not yet swept at each rate
of :data:`LR_GRID` with :data:`SWEEP_SEEDS` (seeds the comparison itself never uses), picks per pair the rate
that solves the task on the *validation* split for the most seeds, then the fastest, then the best final
validation score, and writes the choice into ``experiments/settings.json``, which the comparison reads. Test
numbers play no part in the choice. The step budgets and task sizes are the preset tables below.

How runs are made fast: :func:`rnnjax.train.train_seeds` trains the seeds (or, in a sweep, every seed and
learning rate) of one (task, model) pair at once in one compiled program and stops when every seed has
solved the task; (task, model) pairs run in ``workers`` processes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import sys
import time
import traceback
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `experiments` and `rnnjax` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import zoo  # noqa: E402


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How one task is run at one size.

    Attributes:
        options: the task's options (``rnnjax.tasks.get(name, **options)``).
        params: the parameter count every model is matched to.
        steps: the step budget (a run stops earlier once every seed has solved the task).
        batch_size: sequences per step and seed.
        eval_every: steps between validation points (the learning curve's resolution, and that of
            steps-to-solve); divides ``steps``.
    """

    options: dict
    params: int
    steps: int
    batch_size: int = 32
    eval_every: int = 100


# The sizes. Quick: the three tasks that carry the lessons (gated against plain cells over long dependencies;
# recurrence against attention on length generalisation), sized as in the literature they reproduce
# (docs/experiments.md gives the published results beside ours). Full: every task, on 2 CPU cores in under two
# hours. Accelerator: the larger sizes, for a GPU or TPU.
QUICK_TASKS: dict[str, TaskSpec] = {
    "adding": TaskSpec(dict(seq_len=100), 12_000, steps=4000),
    "copy": TaskSpec(dict(delay=50, num_symbols=10), 12_000, steps=4000),
    "parity": TaskSpec(dict(train_len=16, long_len=64), 8_000, steps=4000),
}
QUICK_MODELS = ("simple", "lstm", "gru", "mingru", "transformer")
FULL_TASKS: dict[str, TaskSpec] = {
    **QUICK_TASKS,
    "selective_copy": TaskSpec(dict(seq_len=64, num_symbols=8), 12_000, steps=3000),
    "digits": TaskSpec(dict(mode="row"), 12_000, steps=1000),
    "charlm": TaskSpec(dict(seq_len=64), 50_000, steps=1500),
    "co2": TaskSpec(dict(seq_len=52), 8_000, steps=1000),
    "sunspots": TaskSpec(dict(), 5_000, steps=1000),
    "mackey_glass": TaskSpec(dict(seq_len=48), 8_000, steps=1000),
    "sentiment": TaskSpec(dict(max_len=40, vocab_size=2000), 50_000, steps=1000),
    "translation": TaskSpec(dict(), 25_000, steps=2000, eval_every=250),  # greedy decoding is slow to score
    "tagging": TaskSpec(dict(), 12_000, steps=1000),
    "speech": TaskSpec(dict(), 12_000, steps=1000, batch_size=16),
}
ACCELERATOR_TASKS: dict[str, TaskSpec] = {
    "adding": TaskSpec(dict(seq_len=200), 50_000, steps=20_000, batch_size=64, eval_every=250),
    "copy": TaskSpec(dict(delay=100, num_symbols=10), 50_000, steps=20_000, batch_size=64, eval_every=250),
    "selective_copy": TaskSpec(dict(seq_len=128, num_symbols=16), 50_000, 20_000, 64, 250),
    "parity": TaskSpec(dict(train_len=40, long_len=200), 30_000, steps=20_000, batch_size=64, eval_every=250),
    "digits": TaskSpec(dict(mode="pixel"), 50_000, steps=10_000, batch_size=64, eval_every=250),
    "charlm": TaskSpec(dict(seq_len=256), 300_000, steps=10_000, batch_size=64, eval_every=250),
    "co2": TaskSpec(dict(seq_len=104), 30_000, steps=5000, batch_size=64, eval_every=250),
    "sunspots": TaskSpec(dict(), 10_000, steps=5000, batch_size=64, eval_every=250),
    "mackey_glass": TaskSpec(dict(seq_len=128), 30_000, steps=5000, batch_size=64, eval_every=250),
    "sentiment": TaskSpec(dict(max_len=64, vocab_size=10_000), 400_000, steps=5000, batch_size=64, eval_every=250),
    "translation": TaskSpec(dict(), 100_000, steps=10_000, batch_size=64, eval_every=250),
    "tagging": TaskSpec(dict(max_len=40), 50_000, steps=5000, batch_size=64, eval_every=250),
    "speech": TaskSpec(dict(), 50_000, steps=2000, batch_size=32, eval_every=100),
}
TINY_TASKS: dict[str, TaskSpec] = {
    name: TaskSpec(spec.options, 2_000, steps=20, batch_size=8, eval_every=10) for name, spec in FULL_TASKS.items()
}
PRESETS = {"tiny": TINY_TASKS, "quick": QUICK_TASKS, "full": FULL_TASKS, "accelerator": ACCELERATOR_TASKS}
TASK_ORDER = tuple(FULL_TASKS)

LR_GRID = {"rnn": (1e-3, 3e-3, 1e-2), "transformer": (3e-4, 1e-3, 3e-3)}
"""Peak learning rates a sweep tries: recurrent models, and the transformer (which tolerates less)."""
DEFAULT_LR = {"rnn": 3e-3, "transformer": 1e-3}
"""The learning rate of a pair that no sweep has chosen one for (the report marks it "default")."""
SWEEP_SEEDS = {"quick": (100, 101), "full": (100,)}
"""Model seeds of a sweep, per size (one seed per rate at the full size, for CPU time); the default is the
quick size's. Never the comparison's own seeds ``0 .. seeds - 1``."""


def sweep_seeds(preset: str) -> tuple[int, ...]:
    """The model seeds a sweep of size ``preset`` trains at each learning rate."""
    return SWEEP_SEEDS.get(preset, SWEEP_SEEDS["quick"])


SETTINGS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "settings.json")
"""The committed sweep results the comparison reads: preset -> task -> model -> chosen settings."""


def lr_family(model: str) -> str:
    """``"transformer"`` or ``"rnn"``: which learning-rate grid and default a model takes."""
    return "transformer" if model == "transformer" else "rnn"


@dataclasses.dataclass
class Config:
    """Everything that defines a comparison run."""

    tasks: tuple[str, ...] = TASK_ORDER  # task names (rnnjax.tasks registry); missing optional data is skipped
    models: tuple[str, ...] = zoo.ALL_MODELS  # model names (experiments/zoo.py); unavailable ones are skipped
    task_specs: dict = dataclasses.field(default_factory=lambda: dict(FULL_TASKS))  # name -> TaskSpec
    seeds: int = 3  # model seeds per (task, model): init, dropout and training-data order all differ
    steps: int | None = None  # overrides every task's step budget
    batch_size: int | None = None  # overrides every task's batch size
    eval_every: int | None = None  # overrides every task's evaluation interval
    eval_size: int = 512  # sequences per evaluation split (real data sets may hold fewer)
    warmup_fraction: float = 0.05  # linear warmup over this fraction of the budget, then cosine decay to zero
    clip_norm: float = 1.0  # global gradient-norm clipping threshold
    stop_when_solved: bool = True  # stop a pair once every seed has solved its task (on validation)
    sweep_per_length: int = 500  # strings per length in the accuracy-against-length sweep (parity)
    settings_path: str = SETTINGS_PATH  # the chosen learning rates (written by --sweep)
    bench_params: int = 25_000  # parameter count of the models timed for throughput and latency
    throughput_lengths: tuple[int, ...] = (32, 128, 512)  # sequence lengths of the throughput plot
    throughput_batch: int = 8  # batch size of the throughput measurement
    latency_contexts: tuple[int, ...] = (16, 128, 1024, 4096)  # context lengths of the latency plot
    workers: int = 2  # processes training (task, model) pairs in parallel
    speed: bool = True  # measure throughput and streaming latency (the last two plots)
    out: str = "results/compare"  # output folder
    preset: str = "full"  # "tiny" (tests), "quick", "full" or "accelerator": the row of settings.json read

    def spec(self, task: str) -> TaskSpec:
        """The task's spec at this size, with the command line's overrides."""
        spec = self.task_specs.get(task, TaskSpec({}, 10_000, steps=1000))
        overrides = {k: getattr(self, k) for k in ("steps", "batch_size", "eval_every") if getattr(self, k)}
        return dataclasses.replace(spec, **overrides)


def preset_config(preset: str, **overrides) -> Config:
    """The config of a named size: ``"tiny"``, ``"quick"``, ``"full"`` or ``"accelerator"``."""
    base: dict[str, Any] = dict(task_specs=dict(PRESETS[preset]), preset=preset)
    if preset == "quick":
        base.update(tasks=tuple(QUICK_TASKS), models=QUICK_MODELS)
    elif preset == "tiny":
        base.update(
            seeds=2,
            eval_size=32,
            sweep_per_length=4,
            bench_params=2_000,
            throughput_lengths=(16,),
            throughput_batch=2,
            latency_contexts=(4, 16),
            workers=1,
        )
    elif preset == "accelerator":
        base.update(
            seeds=5,
            eval_size=1000,
            bench_params=100_000,
            throughput_lengths=(64, 256, 1024, 4096),
            throughput_batch=16,
            latency_contexts=(64, 256, 1024, 4096, 16384),
        )
    return Config(**{**base, **overrides})


# Settings chosen by the sweep.


def load_settings(path: str) -> dict:
    """The settings file (preset -> task -> model -> record), or ``{}`` when there is none."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        return {}


def chosen_learning_rate(config: Config, task: str, model: str) -> tuple[float, str]:
    """The learning rate of a pair and where it comes from (``"sweep"`` or ``"default"``).

    A sweep's choice is kept with the task's spec (options, size, budget, batch); it serves every size whose spec
    for that task is the same (the full size reuses the quick size's choices for the tasks they share).
    """
    settings = load_settings(config.settings_path)
    wanted = spec_record(config.spec(task))
    presets = [config.preset] + [p for p in settings if p != config.preset]
    for preset in presets:
        record = settings.get(preset, {}).get(task, {}).get(model)
        if record is not None and record.get("spec", wanted) == wanted:
            return float(record["learning_rate"]), "sweep"
    return DEFAULT_LR[lr_family(model)], "default"


def spec_record(spec: TaskSpec) -> dict:
    """A task spec as the JSON the settings file keeps."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def choose(candidates: list[dict]) -> dict:
    """The best learning rate of a sweep: most seeds solved, then fewest steps, then the best valid score.

    Args:
        candidates: one dict per rate with ``learning_rate``, ``solved`` (seeds that solved),
            ``steps_to_solve`` (median over those, or ``None``) and ``valid`` (mean final valid score, oriented
            so that lower is better).
    """

    def key(c):
        steps = c["steps_to_solve"] if c["steps_to_solve"] is not None else float("inf")
        score = c["valid"] if np.isfinite(c["valid"]) else float("inf")
        return (-c["solved"], steps, score)

    return min(candidates, key=key)


def any_rate_solved(rates: list[float]):
    """The stop rule of a sweep: stop once every seed of some learning rate has solved the task."""
    groups = [np.asarray(rates) == lr for lr in dict.fromkeys(rates)]

    def stop(steps_to_solve: np.ndarray) -> bool:
        return any(bool(np.all(steps_to_solve[group] >= 0)) for group in groups)

    return stop


# One (task, model) pair: train all seeds at once, evaluate, and measure what the plots need.


def make_task(config: Config, name: str):
    """The task ``name`` at the configured size."""
    from rnnjax import tasks

    return tasks.get(name, eval_size=config.eval_size, **config.spec(name).options)


def eval_splits(task) -> dict[str, Any]:
    """Every evaluation split of ``task`` (each holds at most the task's ``eval_size`` rows)."""
    return {split: task.eval_batch(split) for split in task.splits}


def run_job(config: Config, task_name: str, model_name: str, sweep: bool = False) -> dict:
    """Trains ``model_name`` on ``task_name`` for every seed (and, with ``sweep``, every rate) and evaluates it.

    Returns:
        A JSON-friendly record: ``params``, ``learning_rate`` and its ``lr_source``, ``results`` (split ->
        metric -> per-seed values where training stopped), ``steps_to_solve`` (per seed, -1: not solved),
        ``stopped_at``, ``curve`` (valid metric per seed every ``eval_every`` steps, and the mean training
        loss), ``sweep`` (accuracy per length, for tasks with ``length_sweep``), ``candidates`` (a sweep's
        score per rate), ``compile_seconds``, ``train_seconds``; or ``error`` with a traceback.
    """
    try:
        return _run_job(config, task_name, model_name, sweep)
    except Exception:  # one failing pair must not sink the whole comparison
        return {"task": task_name, "model": model_name, "error": traceback.format_exc()}


def _run_job(config: Config, task_name: str, model_name: str, sweep: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from rnnjax.train import OptimizerConfig, train_seeds

    job_cpu = time.process_time()
    task = make_task(config, task_name)
    spec = config.spec(task_name)
    model, num_params = zoo.matched(task, model_name, spec.params)
    if sweep:
        grid = LR_GRID[lr_family(model_name)]
        seeds = [s for _ in grid for s in sweep_seeds(config.preset)]
        rates = [lr for lr in grid for _ in sweep_seeds(config.preset)]
        lr, lr_source = None, "sweep"
    else:
        lr, lr_source = chosen_learning_rate(config, task_name, model_name)
        seeds, rates = list(range(config.seeds)), [lr] * config.seeds
    warmup = int(config.warmup_fraction * spec.steps)
    optimizer = OptimizerConfig(
        "adam", learning_rate=rates[0], warmup_steps=warmup, decay_steps=spec.steps - warmup, clip_norm=config.clip_norm
    )
    result = train_seeds(
        model,
        task,
        seeds=seeds,
        learning_rates=rates,
        steps=spec.steps,
        batch_size=spec.batch_size,
        optimizer=optimizer,
        eval_every=spec.eval_every,
        stop_when_solved=config.stop_when_solved and (any_rate_solved(rates) if sweep else True),
        final_splits=("valid",) if sweep else task.splits,
    )
    record = {
        "task": task_name,
        "model": model_name,
        "params": num_params,
        "metric": task.metric,
        "threshold": result.threshold,
        "learning_rate": lr,
        "lr_source": lr_source,
        "batch_size": spec.batch_size,
        "budget": spec.steps,
        "results": {s: {k: v.tolist() for k, v in by.items()} for s, by in result.final.items()},
        "steps_to_solve": result.steps_to_solve.tolist(),
        "stopped_at": result.stopped_at,
        "curve": {
            "steps": result.steps.tolist(),
            "valid": result.curve.tolist(),
            "train_loss": result.train_loss.tolist(),
        },
        "sweep": None,
        "candidates": None,
        "compile_seconds": result.compile_seconds,
        "train_seconds": result.train_seconds,
        "error": None,
    }
    if sweep:
        sign = -1.0 if task.higher_is_better else 1.0
        valid = np.asarray(result.final["valid"][task.metric])
        candidates = []
        for lr_value in dict.fromkeys(rates):
            members = np.asarray(rates) == lr_value
            solved = result.steps_to_solve[members]
            candidates.append(
                dict(
                    learning_rate=lr_value,
                    solved=int((solved >= 0).sum()),
                    steps_to_solve=float(np.median(solved[solved >= 0])) if (solved >= 0).any() else None,
                    valid=float(sign * np.nanmean(valid[members])) if np.isfinite(valid[members]).any() else np.inf,
                )
            )
        record["candidates"] = candidates
        record["learning_rate"] = choose(candidates)["learning_rate"]
        record["job_cpu_seconds"] = time.process_time() - job_cpu
        return record

    # The accuracy-against-length sweep (parity): per_length strings of 16 lengths up to the longest tested,
    # scored one length at a time (one compile: every length is padded to the longest), so memory stays small.
    if hasattr(task, "length_sweep") and task.kind == "classify":
        lengths = sorted({int(v) for v in np.linspace(1, task.long_len, 16).round()})
        batch = task.length_sweep(lengths, config.sweep_per_length)
        per_length = config.sweep_per_length

        @jax.jit
        def correct(params, inputs, row_lengths, targets):  # params: (S, ...) -> (S,) accuracy on these rows
            def one(p):
                logits = model.apply(p, inputs, lengths=row_lengths)  # (rows, C)
                return jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))

            return jax.vmap(one)(params)

        rows = [slice(i * per_length, (i + 1) * per_length) for i in range(len(lengths))]
        accuracy = np.stack(
            [np.asarray(correct(result.params, batch.inputs[r], batch.lengths[r], batch.targets[r])) for r in rows],
            axis=1,
        )  # (S, L)
        record["sweep"] = {
            "lengths": lengths,
            "accuracy": accuracy.tolist(),
            "train_len": task.train_len,
            "per_length": config.sweep_per_length,
        }
    record["job_cpu_seconds"] = time.process_time() - job_cpu
    return record


# Speed: forward throughput against length, streaming latency against context.


def run_speed(config: Config) -> list[dict]:
    """Tokens per second of the forward pass and seconds per streamed token, for each model.

    The models are built for :class:`zoo.BenchSpec` (a 64-symbol language model, one prediction per step)
    at ``bench_params`` parameters, with random weights (speed does not depend on training).
    """
    import jax

    spec = zoo.BenchSpec()
    rows = []
    for name in config.models:
        if not zoo.available(name):
            continue
        # A bidirectional model cannot stream, but its whole-sequence throughput is still worth a line.
        model, num_params = zoo.matched(dataclasses.replace(spec, bidirectional_ok=True), name, config.bench_params)
        params = model.init(jax.random.key(0))
        throughput = zoo.forward_throughput(model, params, list(config.throughput_lengths), config.throughput_batch)
        for T, value in zip(config.throughput_lengths, throughput):
            rows.append(dict(model=name, params=num_params, measure="tokens_per_second", length=T, value=value))
        latency = zoo.streaming_latency(model, params, list(config.latency_contexts))
        for c, value in zip(config.latency_contexts, latency):
            rows.append(dict(model=name, params=num_params, measure="seconds_per_token", length=c, value=value))
        print(f"  speed {name}: {throughput[-1]:,.0f} tokens/s at T={config.throughput_lengths[-1]}", flush=True)
    return rows


# Orchestration and reporting.

CSV_COLUMNS = (
    "task",
    "model",
    "params",
    "metric",
    "split",
    "mean",
    "std",
    "seeds",
    "solved",
    "steps_to_solve",
    "steps",
    "learning_rate",
    "train_seconds",
)
"""Columns of ``compare.csv``. ``solved``: seeds whose final score on ``split`` meets the task's threshold;
``steps_to_solve``: the median over seeds of the first validation step that met it (empty when none did);
``steps``: the step training stopped at (the most over seeds: the budget unless every seed solved);
``learning_rate``: the peak rate (chosen by the sweep, or the default)."""


def summarise(values: list[float]) -> tuple[float, float, int]:
    """``(mean, std, n)`` over the finite values (sample std; 0 for one value; NaN when none is finite)."""
    finite = np.asarray([v for v in values if np.isfinite(v)], np.float64)
    if finite.size == 0:
        return float("nan"), float("nan"), 0
    std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return float(finite.mean()), std, int(finite.size)


def device_description() -> str:
    """The JAX device and, on CPU, the processor model and core count."""
    import jax

    device = jax.devices()[0]
    text = f"{device.platform.upper()} ({device.device_kind})"
    if device.platform == "cpu":
        model = platform.processor() or ""
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as file:
                model = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), model)
        except OSError:
            pass
        text += f", {model}, {os.cpu_count()} cores" if model else f", {os.cpu_count()} cores"
    return text


def plan(config: Config) -> tuple[list[tuple[str, str]], list[str], dict]:
    """The (task, model) jobs to run, the reasons for everything skipped, and each task's baseline rows."""
    from rnnjax.tasks._common import MissingDataError

    jobs, skipped, baselines = [], [], {}
    missing = [m for m in config.models if not zoo.available(m)]
    if missing:
        skipped.append(f"models {', '.join(missing)}: not available in this installation (their module is missing)")
    for name in config.tasks:
        try:
            task = make_task(config, name)
            splits = eval_splits(task)
            baselines[name] = {s: float(task.baseline_score(s)) for s in splits}
            cost = splits["valid"].inputs.shape[1] * config.spec(name).steps  # time steps x budget
        except MissingDataError as error:
            skipped.append(f"task {name}: {error}")
            print(f"skipping task {name}: {error}", flush=True)
            continue
        for model in config.models:
            ok, why = zoo.allows(task, model)
            if ok:
                jobs.append((cost, name, model))
            elif model not in missing:
                skipped.append(f"{model} on {name}: {why}")
    jobs.sort(key=lambda job: (-job[0], job[1], job[2]))  # long sequences first, for load balance
    return [(t, m) for _, t, m in jobs], skipped, baselines


STALL_SECONDS = 120.0
"""A worker process whose CPU time has not grown for this long is taken as hung, killed and its job rerun."""
MAX_TRIES = 3
"""Attempts per job before it is reported as failed."""


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (from ``/proc``), or ``None`` where that is unavailable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _job_process(conn, config: Config, task: str, model: str, sweep: bool) -> None:
    conn.send(run_job(config, task, model, sweep))
    conn.close()


def run_all(config: Config, jobs: list[tuple[str, str]], sweep: bool = False) -> list[dict]:
    """Runs the jobs (of a sweep, with ``sweep``), each in its own process, ``config.workers`` at a time.

    With ``workers <= 1`` the jobs run one after another in this process. Otherwise each job gets a fresh
    spawned process, watched: one whose CPU time stops growing for :data:`STALL_SECONDS` is killed and its job
    rerun (up to :data:`MAX_TRIES` attempts). XLA:CPU (jax 0.10.2) now and then never finishes a computation
    when two processes share two cores — every XLA thread waits for work; seen 4 times in about 150 jobs
    while the committed results were made — and a comparison of a hundred jobs must not hang on one. Records
    come back in ``jobs`` order.
    """
    records, start = {}, time.perf_counter()

    def report(job, record):
        records[job] = record
        done = f"[{len(records)}/{len(jobs)}] {record['task']} / {record['model']}"
        if record["error"]:
            print(f"{done}: FAILED\n{record['error']}", flush=True)
        else:
            valid = summarise(record["results"]["valid"][record["metric"]])[0]
            solved = sum(s >= 0 for s in record["steps_to_solve"])
            print(
                f"{done}: params {record['params']:,}, lr {record['learning_rate']:g}, valid {record['metric']} "
                f"{valid:.4g}, solved {solved}/{len(record['steps_to_solve'])}, stopped at {record['stopped_at']}, "
                f"compile {record['compile_seconds']:.1f}s, train {record['train_seconds']:.1f}s "
                f"({time.perf_counter() - start:.0f}s elapsed)",
                flush=True,
            )

    if config.workers <= 1:
        for job in jobs:
            report(job, run_job(config, *job, sweep))
        return [records[job] for job in jobs]

    def failed(job, why):
        return {"task": job[0], "model": job[1], "error": why}

    context = multiprocessing.get_context("spawn")  # JAX is not fork-safe
    queue = [(job, 1) for job in jobs]
    running: dict = {}  # process -> [job, tries, connection, cpu seconds, time of the last CPU progress]
    try:
        while queue or running:
            while queue and len(running) < config.workers:
                job, tries = queue.pop(0)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_job_process, args=(send, config, *job, sweep), daemon=True)
                process.start()
                send.close()
                running[process] = [job, tries, receive, 0.0, time.monotonic()]
            time.sleep(0.5)
            for process, state in list(running.items()):
                job, tries, receive, cpu, since = state
                if receive.poll():
                    try:
                        record = receive.recv()
                    except EOFError:
                        record = failed(job, f"worker process ended without a result (exit code {process.exitcode})")
                    process.join()
                    del running[process]
                    report(job, record)
                    continue
                if not process.is_alive():
                    del running[process]
                    report(job, failed(job, f"worker process died (exit code {process.exitcode})"))
                    continue
                now, used = time.monotonic(), cpu_seconds(process.pid)
                if used is None or used > cpu + 0.5:
                    state[3:] = [used or cpu, now]
                elif now - since > STALL_SECONDS:
                    process.kill()
                    process.join()
                    del running[process]
                    message = f"{job[0]} / {job[1]}: no progress for {STALL_SECONDS:.0f} s (attempt {tries})"
                    if tries < MAX_TRIES:
                        print(f"{message}; restarting it", flush=True)
                        queue.insert(0, (job, tries + 1))
                    else:
                        report(job, failed(job, f"{message}; giving up"))
    finally:
        for process in running:
            process.kill()
    return [records[job] for job in jobs]


def median_steps(steps_to_solve: list[int]) -> float | None:
    """Median steps-to-solve over the seeds that solved, or ``None`` when none did."""
    solved = [s for s in steps_to_solve if s >= 0]
    return float(np.median(solved)) if solved else None


def table_rows(config: Config, records: list[dict], baselines: dict) -> list[dict]:
    """The rows of ``compare.csv``: baselines first, then models in configured order, per task."""
    rows = []
    by_key = {(r["task"], r["model"]): r for r in records if not r["error"]}
    empty = dict(solved="", steps_to_solve="", steps="", learning_rate="", train_seconds=0.0)
    for name in config.tasks:
        if name not in baselines:
            continue
        task = make_task(config, name)
        for split, value in baselines[name].items():
            row = dict(task=name, model="baseline", params=0, metric=task.metric, split=split, mean=value, std=0.0)
            rows.append({**row, "seeds": 1, **empty})
        for model in config.models:
            record = by_key.get((name, model))
            if record is None:
                continue
            steps = median_steps(record["steps_to_solve"])
            for split, by_metric in record["results"].items():
                for metric_name, values in by_metric.items():
                    mean, std, n = summarise(values)
                    solved = sum(task.is_solved(v, split) for v in values) if metric_name == task.metric else ""
                    rows.append(
                        dict(
                            task=name,
                            model=model,
                            params=record["params"],
                            metric=metric_name,
                            split=split,
                            mean=mean,
                            std=std,
                            seeds=n,
                            solved=solved,
                            steps_to_solve="" if steps is None else steps,
                            steps=record["stopped_at"],
                            learning_rate=record["learning_rate"],
                            train_seconds=round(record["train_seconds"], 2),
                        )
                    )
    return rows


def write_outputs(config: Config, records, rows, speed, skipped, wall_seconds: float, command: str) -> None:
    """Writes the CSV files, ``runs.jsonl``, ``compare.md`` and the plots into ``config.out``."""
    from experiments import plots

    out = config.out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.csv"), "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with open(os.path.join(out, "runs.jsonl"), "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    with open(os.path.join(out, "curves.csv"), "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["task", "model", "metric", "step", "seed", "valid", "train_loss"])
        for r in records:
            if r["error"]:
                continue
            curve = r["curve"]
            for i, step in enumerate(curve["steps"]):
                for seed, value in enumerate(curve["valid"][i]):
                    writer.writerow(
                        [r["task"], r["model"], r["metric"], step, seed, value, curve["train_loss"][i][seed]]
                    )
    with open(os.path.join(out, "length_accuracy.csv"), "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["task", "model", "length", "seed", "accuracy", "train_len"])
        for r in records:
            if r["error"] or not r["sweep"]:
                continue
            for seed, accuracies in enumerate(r["sweep"]["accuracy"]):
                for length, value in zip(r["sweep"]["lengths"], accuracies):
                    writer.writerow([r["task"], r["model"], length, seed, value, r["sweep"]["train_len"]])
    with open(os.path.join(out, "speed.csv"), "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, ["model", "params", "measure", "length", "value"])
        writer.writeheader()
        writer.writerows(speed)

    meta = {name: make_task(config, name) for name in config.tasks if any(r["task"] == name for r in rows)}
    plots.learning_curves(records, meta, rows, os.path.join(out, "learning_curves.png"))
    plots.length_generalisation(records, os.path.join(out, "length_generalisation.png"))
    plots.solved_map(records, meta, list(config.models), os.path.join(out, "solved.png"))
    plots.throughput(speed, os.path.join(out, "throughput.png"))
    plots.streaming_latency(speed, os.path.join(out, "streaming_latency.png"))
    with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as file:
        file.write(markdown(config, rows, meta, speed, skipped, records, wall_seconds, command))


def format_steps(steps: float) -> str:
    """``1,200`` or ``12k``: a step count for a table cell."""
    return f"{steps / 1000:.0f}k" if steps >= 10_000 else f"{steps:,.0f}"


def table_cell(row: dict, seeds: int, first_split: bool) -> str:
    """``mean ± std`` and the solved count (with the median steps-to-solve on the first split's row)."""
    text = f"{row['mean']:.3g} ± {row['std']:.2g}"
    if row["solved"] == "":
        return text
    if row["solved"] == 0:
        return text + (f" ✗ ({format_steps(row['steps'])})" if first_split else " ✗")
    mark = "✓" if row["solved"] == seeds else f"✓ {row['solved']}/{seeds}"
    if first_split and row["steps_to_solve"] != "":
        mark += f" @{format_steps(row['steps_to_solve'])}"
    return f"{text} {mark}"


def results_table(rows: list[dict], meta: dict, models: list[str], seeds: int, splits=None) -> list[str]:
    """The pivot table (one row per task and split of the headline metric), as Markdown lines."""
    lines = [
        "| task | metric | solved at | split | " + " | ".join(models) + " |",
        "|---|---|---|---|" + "---:|" * len(models),
    ]
    cells = {(r["task"], r["split"], r["metric"], r["model"]): r for r in rows}
    for name, task in meta.items():
        arrow = "↑" if task.higher_is_better else "↓"
        threshold = task.solve_threshold("test")
        for i, split in enumerate(s for s in task.splits if splits is None or s in splits):
            entries = [cells.get((name, split, task.metric, m)) for m in models]
            scored = [
                e["mean"] for e in entries if e is not None and e["model"] != "baseline" and np.isfinite(e["mean"])
            ]
            best = (max if task.higher_is_better else min)(scored) if scored else None
            texts = []
            for m, entry in zip(models, entries):
                if entry is None:
                    texts.append("–")
                    continue
                text = f"{entry['mean']:.3g}" if m == "baseline" else table_cell(entry, seeds, i == 0)
                if m != "baseline" and entry["mean"] == best:
                    text = f"**{text}**"
                texts.append(text)
            at = f"{'≥' if task.higher_is_better else '≤'} {threshold:.3g}" if threshold is not None else "–"
            lines.append(f"| {name} | {task.metric} {arrow} | {at} | {split} | " + " | ".join(texts) + " |")
    return lines


def markdown(config, rows, meta, speed, skipped, records, wall_seconds, command) -> str:
    """The report: provenance, a pivot table (mean ± std and solved seeds per model), the settings and plots."""
    import jax

    models = [m for m in ("baseline",) + tuple(config.models) if any(r["model"] == m for r in rows)]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# RNNs vs attention: comparison",
        "",
        f"Command: `{command}`",
        "",
        f"Device: {device_description()}; jax {jax.__version__}; date {now}; wall time {wall_seconds / 60:.1f} min "
        f"({config.preset} size, {config.workers} worker process(es)).",
        "",
        f"Each cell is the mean ± sample standard deviation over {config.seeds} seeds (model init, dropout and data "
        "order) where training stopped: at the task's step budget, or once every seed had solved the task on the "
        "validation split. ✓ means every seed's score on that split meets the task's threshold (`solved at`; "
        "✓ 2/3: two seeds of three), ✗ none; `@1,200` is the median step at which the seeds first met it on "
        "validation, `(4,000)` the budget spent without solving. Models are matched in parameter count per task; "
        "`baseline` is the trivial predictor; ↑ higher is better, ↓ lower is better; best mean in bold.",
        "",
        *results_table(rows, meta, models, config.seeds),
        "",
        "Settings per task and model (parameters; peak Adam learning rate, `*` where no sweep chose it; batch):",
        "",
        "| task | budget | batch | " + " | ".join(m for m in models if m != "baseline") + " |",
        "|---|---:|---:|" + "---|" * (len(models) - 1),
    ]
    by_key = {(r["task"], r["model"]): r for r in records if not r["error"]}
    for name in meta:
        spec = config.spec(name)
        entries = []
        for m in models[1:]:
            r = by_key.get((name, m))
            star = "" if r is None or r["lr_source"] == "sweep" else "*"
            entries.append(f"{r['params']:,}; {r['learning_rate']:g}{star}" if r else "")
        lines.append(f"| {name} | {spec.steps:,} | {spec.batch_size} | " + " | ".join(entries) + " |")
    if speed:
        lines += ["", f"Speed (random weights, {speed[0]['params']:,}-ish parameters, a 64-symbol language model):", ""]
        lengths = sorted({s["length"] for s in speed if s["measure"] == "tokens_per_second"})
        contexts = sorted({s["length"] for s in speed if s["measure"] == "seconds_per_token"})
        lines.append(
            "| model | "
            + " | ".join(f"tok/s T={t}" for t in lengths)
            + " | "
            + " | ".join(f"µs/token @{c}" for c in contexts)
            + " |"
        )
        lines.append("|---|" + "---:|" * (len(lengths) + len(contexts)))
        for m in dict.fromkeys(s["model"] for s in speed):
            values = {(s["measure"], s["length"]): s["value"] for s in speed if s["model"] == m}
            tps = [f"{values[('tokens_per_second', t)]:,.0f}" for t in lengths]
            lat = [
                f"{values[('seconds_per_token', c)] * 1e6:.0f}" if ("seconds_per_token", c) in values else "–"
                for c in contexts
            ]
            lines.append(f"| {m} | " + " | ".join(tps + lat) + " |")
    compile_total = sum(r.get("compile_seconds", 0.0) for r in records if not r["error"])
    train_total = sum(r.get("train_seconds", 0.0) for r in records if not r["error"])
    lines += [
        "",
        f"Compilation took {compile_total:.0f} s and training {train_total:.0f} s in all (summed over "
        "workers); `train_seconds` in compare.csv is the wall time of one (task, model) pair's training, all "
        "seeds at once, compilation excluded.",
    ]
    failed = [r for r in records if r["error"]]
    if failed or skipped:
        lines += ["", "Skipped or failed:", ""]
        lines += [f"- {s}" for s in skipped]
        lines += [f"- {r['model']} on {r['task']}: failed ({r['error'].strip().splitlines()[-1]})" for r in failed]
    lines += [
        "",
        "![which model solved which task](solved.png)",
        "",
        "![learning curves](learning_curves.png)",
        "",
        "![accuracy against length](length_generalisation.png)",
        "",
        "![throughput](throughput.png)",
        "",
        "![streaming latency](streaming_latency.png)",
        "",
        "Full table: [compare.csv](compare.csv).",
        "",
    ]
    return "\n".join(lines)


def write_settings(config: Config, records: list[dict]) -> None:
    """Merges a sweep's choices into ``config.settings_path`` (other presets and pairs are kept)."""
    settings = load_settings(config.settings_path)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    preset = settings.setdefault(config.preset, {})
    for r in records:
        if r["error"]:
            continue
        preset.setdefault(r["task"], {})[r["model"]] = {
            "learning_rate": r["learning_rate"],
            "candidates": r["candidates"],
            "sweep_seeds": list(sweep_seeds(config.preset)),
            "spec": spec_record(config.spec(r["task"])),
            "date": now,
        }
    settings[config.preset] = {t: dict(sorted(m.items())) for t, m in sorted(preset.items())}
    with open(config.settings_path, "w", encoding="utf-8") as file:
        json.dump(dict(sorted(settings.items())), file, indent=1)
        file.write("\n")


def parse_args(argv: list[str] | None) -> tuple[Config, bool]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the lessons on CPU: under 10 minutes on 2 cores")
    size.add_argument("--tiny", action="store_true", help="a smoke test of a few seconds per pair (for tests)")
    size.add_argument("--accelerator", action="store_true", help="the larger sizes, for a GPU or TPU")
    parser.add_argument("--sweep", action="store_true", help="choose each pair's learning rate and write settings")
    parser.add_argument(
        "--tasks", help=f"comma-separated task names (default: the size's; all: {','.join(TASK_ORDER)})"
    )
    parser.add_argument(
        "--models", help=f"comma-separated model names (default: the size's; all: {','.join(zoo.ALL_MODELS)})"
    )
    parser.add_argument("--out", default="results/compare", help="output folder (default: results/compare)")
    parser.add_argument("--seeds", type=int, help="seeds per (task, model)")
    parser.add_argument("--steps", type=int, help="step budget of every task (a multiple of the evaluation interval)")
    parser.add_argument("--eval-every", type=int, help="steps between validation points")
    parser.add_argument("--batch-size", type=int, help="sequences per step and seed")
    parser.add_argument("--workers", type=int, help="parallel training processes (default 2)")
    parser.add_argument("--settings", help=f"the settings file read (and written by --sweep); default {SETTINGS_PATH}")
    parser.add_argument("--no-early-stop", action="store_true", help="train every pair for its whole budget")
    parser.add_argument("--no-speed", action="store_true", help="skip the throughput and latency measurements")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"out": args.out}
    for field in ("seeds", "steps", "eval_every", "batch_size", "workers"):
        value = getattr(args, field)
        if value is not None:
            if value < 1:
                parser.error(f"--{field.replace('_', '-')} must be a positive integer, got {value}")
            overrides[field] = value
    if args.settings:
        overrides["settings_path"] = args.settings
    if args.tasks:
        overrides["tasks"] = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if args.models:
        overrides["models"] = tuple(m.strip().lower() for m in args.models.split(",") if m.strip())
    preset = "quick" if args.quick else "tiny" if args.tiny else "accelerator" if args.accelerator else "full"
    config = preset_config(preset, **overrides)
    config.stop_when_solved = not args.no_early_stop
    unknown = [m for m in config.models if m not in zoo.ALL_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(zoo.ALL_MODELS)}")
    from rnnjax import tasks

    unknown = [t for t in config.tasks if t not in tasks.names()]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {', '.join(tasks.names())}")
    for name in config.tasks:
        spec = config.spec(name)
        if spec.steps % spec.eval_every:
            parser.error(f"{name}: steps ({spec.steps}) must be a multiple of eval_every ({spec.eval_every})")
    config.speed = config.speed and not args.no_speed and not args.sweep
    return config, args.sweep


def main(argv: list[str] | None = None) -> Config:
    """Runs the comparison (or, with ``--sweep``, the learning-rate sweep) and writes the report."""
    start = time.perf_counter()
    config, sweep = parse_args(argv)
    command = "python experiments/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    jobs, skipped, baselines = plan(config)
    if sweep:  # a pair whose task spec already has a chosen rate (in any size) is not swept again
        done = [job for job in jobs if chosen_learning_rate(config, *job)[1] == "sweep"]
        jobs = [job for job in jobs if job not in done]
        if done:
            print(f"{len(done)} pair(s) already swept at this spec (remove them from the settings to re-sweep)")
    what = f"rates {LR_GRID['rnn']} (transformer {LR_GRID['transformer']}) x seeds {sweep_seeds(config.preset)}"
    what = what if sweep else ""
    print(
        f"{len(jobs)} (task, model) pairs x {what or f'{config.seeds} seeds'}, {config.workers} worker(s)", flush=True
    )
    records = run_all(config, jobs, sweep)
    if sweep:
        write_settings(config, records)
        print(f"wrote {config.settings_path} ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
        return config
    speed = run_speed(config) if config.speed else []
    rows = table_rows(config, records, baselines)
    write_outputs(config, records, rows, speed, skipped, time.perf_counter() - start, command.strip())
    print(f"wrote {config.out}/compare.md ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    return config


if __name__ == "__main__":
    main()
