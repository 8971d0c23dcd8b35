"""Which recurrent design, or attention, for this kind of sequence? A measured answer, task by task.

Trains every model (SimpleRNN, Jordan, LSTM, GRU, a bidirectional LSTM where the task allows one, the
parallel-scan cells when they exist, and a causal transformer) on every task at matched parameter counts and
several seeds, and writes into ``--out``:

* ``compare.md`` and ``compare.csv``: one row per (task, model, split) with the columns
  ``task, model, params, metric, split, mean, std, seeds, train_seconds`` (``model = baseline`` rows hold the
  trivial predictor's score; a length-generalisation split is named so, e.g. ``test_long``);
* ``learning_curves.png``, ``length_generalisation.png``, ``throughput.png``, ``streaming_latency.png``;
* ``curves.csv``, ``length_accuracy.csv``, ``speed.csv``, ``runs.jsonl``: the numbers behind the plots.

Usage::

    python experiments/compare.py --quick --out results/compare          # about 6.5 minutes on 2 CPU cores
    python experiments/compare.py --out results/compare_full              # the full size, for accelerators
    python experiments/compare.py --quick --tasks parity,copy --models lstm,transformer --out /tmp/cmp

How runs are made fast: the seeds of one (task, model) are trained together, ``jax.vmap`` over the seed
axis of the training state and of the data, and ``lax.scan`` runs ``eval_every`` optimiser steps
(``rnnjax.train.make_train_step``) per call, so each (task, model) compiles one training function and one
evaluation function; (task, model) pairs run in ``workers`` processes.
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

# Per-task sizes: task options and the parameter count every model is matched to.
QUICK_TASKS: dict[str, tuple[dict, int]] = {
    "adding": (dict(seq_len=50), 12_000),
    "copy": (dict(delay=20, num_symbols=5), 12_000),
    "selective_copy": (dict(seq_len=24, num_symbols=4), 12_000),
    "parity": (dict(train_len=8, long_len=32), 8_000),
    "digits": (dict(mode="row"), 12_000),
    "charlm": (dict(seq_len=32), 25_000),
    "co2": (dict(seq_len=52), 8_000),
    "sunspots": (dict(), 5_000),
    "mackey_glass": (dict(seq_len=48), 8_000),
    "sentiment": (dict(max_len=40, vocab_size=2000), 50_000),
    "translation": (dict(), 25_000),
    "tagging": (dict(), 12_000),
    "speech": (dict(), 12_000),
}
FULL_TASKS: dict[str, tuple[dict, int]] = {
    "adding": (dict(seq_len=200), 50_000),
    "copy": (dict(delay=100, num_symbols=10), 50_000),
    "selective_copy": (dict(seq_len=128, num_symbols=16), 50_000),
    "parity": (dict(train_len=40, long_len=200), 30_000),
    "digits": (dict(mode="pixel"), 50_000),
    "charlm": (dict(seq_len=256), 300_000),
    "co2": (dict(seq_len=104), 30_000),
    "sunspots": (dict(), 10_000),
    "mackey_glass": (dict(seq_len=128), 30_000),
    "sentiment": (dict(max_len=64, vocab_size=10_000), 400_000),
    "translation": (dict(), 100_000),
    "tagging": (dict(max_len=40), 50_000),
    "speech": (dict(), 50_000),
}
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
"""XLA options for functions run once (initialisation): compile fast, run slower."""
TINY_TASKS = {name: (options, 2_000) for name, (options, _) in QUICK_TASKS.items()}
TASK_ORDER = tuple(QUICK_TASKS)


@dataclasses.dataclass
class Config:
    """Everything that defines a comparison run."""

    tasks: tuple[str, ...] = TASK_ORDER  # task names (rnnjax.tasks registry); missing optional data is skipped
    models: tuple[str, ...] = zoo.ALL_MODELS  # model names (experiments/zoo.py); unavailable ones are skipped
    task_sizes: dict = dataclasses.field(default_factory=lambda: dict(FULL_TASKS))  # name -> (options, params)
    seeds: int = 5  # model seeds per (task, model): init, dropout and training-data order all differ
    steps: int = 5000  # optimiser steps per run
    batch_size: int = 64  # sequences per step and seed
    eval_every: int = 250  # steps between validation points (learning curves); divides steps
    eval_size: int = 1000  # sequences per evaluation split (real data sets may hold fewer)
    learning_rate: float = 3e-3  # peak Adam learning rate of the recurrent models
    transformer_learning_rate: float = 1e-3  # peak learning rate of the transformer (it is less tolerant)
    warmup_fraction: float = 0.05  # linear warmup over this fraction of steps, then cosine decay to zero
    clip_norm: float = 1.0  # global gradient-norm clipping threshold
    sweep_per_length: int = 200  # strings per length in the accuracy-against-length sweep (parity)
    bench_params: int = 100_000  # parameter count of the models timed for throughput and latency
    throughput_lengths: tuple[int, ...] = (64, 256, 1024, 4096)  # sequence lengths of the throughput plot
    throughput_batch: int = 16  # batch size of the throughput measurement
    latency_contexts: tuple[int, ...] = (64, 256, 1024, 4096, 16384)  # context lengths of the latency plot
    workers: int = 2  # processes training (task, model) pairs in parallel
    speed: bool = True  # measure throughput and streaming latency (the last two plots)
    out: str = "results/compare"  # output folder
    preset: str = "full"  # "quick", "full" or "tiny" (tests), for the record


def quick_config(**overrides) -> Config:
    """The ``--quick`` size: minutes on 2 CPU cores."""
    base = dict(
        task_sizes=dict(QUICK_TASKS),
        seeds=3,
        steps=200,
        batch_size=32,
        eval_every=50,
        eval_size=512,
        sweep_per_length=64,
        bench_params=25_000,
        throughput_lengths=(32, 128, 512),
        throughput_batch=8,
        latency_contexts=(16, 128, 1024, 4096),
        preset="quick",
    )
    return Config(**{**base, **overrides})


def tiny_config(**overrides) -> Config:
    """A smoke-test size (seconds per run), used by the tests."""
    base = dict(
        task_sizes=dict(TINY_TASKS),
        seeds=2,
        steps=20,
        batch_size=8,
        eval_every=10,
        eval_size=32,
        sweep_per_length=4,
        bench_params=2_000,
        throughput_lengths=(16,),
        throughput_batch=2,
        latency_contexts=(4, 16),
        workers=1,
        preset="tiny",
    )
    return Config(**{**base, **overrides})


# One (task, model) pair: train all seeds at once, evaluate, and measure what the plots need.


def make_task(config: Config, name: str):
    """The task ``name`` at the configured size."""
    from rnnjax import tasks

    options, _ = config.task_sizes.get(name, ({}, 0))
    return tasks.get(name, eval_size=config.eval_size, **options)


def eval_splits(task) -> dict[str, Any]:
    """Every evaluation split of ``task`` (each holds at most the task's ``eval_size`` rows)."""
    return {split: task.eval_batch(split) for split in task.splits}


def stack(trees: list) -> Any:
    """Stacks matching pytrees of host arrays along a new leading axis (``None`` leaves stay ``None``)."""
    import jax

    return jax.tree.map(lambda *leaves: np.stack(leaves), *trees)


def run_job(config: Config, task_name: str, model_name: str) -> dict:
    """Trains ``model_name`` on ``task_name`` for every seed at once and evaluates it.

    Returns:
        A JSON-friendly record: ``params``, ``results`` (split -> metric -> per-seed values; the task's
        ``metric`` and any ``secondary_metrics``),
        ``curve`` (valid metric per seed every ``eval_every`` steps, and the mean training loss),
        ``sweep`` (accuracy per length, for tasks with ``length_sweep``), ``compile_seconds``,
        ``train_seconds``; or ``error`` with a traceback.
    """
    try:
        return _run_job(config, task_name, model_name)
    except Exception:  # one failing pair must not sink the whole comparison
        return {"task": task_name, "model": model_name, "error": traceback.format_exc()}


def _run_job(config: Config, task_name: str, model_name: str) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from rnnjax.seq2seq import decode_metrics
    from rnnjax.train import OptimizerConfig, create_train_state, make_train_step, model_loss_fn

    job_cpu = time.process_time()
    task = make_task(config, task_name)
    _, target = config.task_sizes.get(task_name, ({}, 10_000))
    model, num_params = zoo.matched(task, model_name, target)
    S, K = config.seeds, config.eval_every
    seq2seq = getattr(task, "seq2seq", False)

    lr = config.transformer_learning_rate if model_name == "transformer" else config.learning_rate
    warmup = int(config.warmup_fraction * config.steps)
    optimizer = OptimizerConfig(
        "adam", learning_rate=lr, warmup_steps=warmup, decay_steps=config.steps - warmup, clip_norm=config.clip_norm
    )
    # The optimiser sees the parameters as one flat vector (P,): Adam and clipping are elementwise or global, so
    # the numbers are those of the pytree, but the compiled update is a handful of ops instead of a few per leaf,
    # which halves the compile time of small models (compilation dominates a --quick run).
    template = jax.eval_shape(model.init, jax.random.key(0))
    _, unravel = ravel_pytree(jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), template))
    model_loss = model_loss_fn(model, task.kind)
    train_step = make_train_step(lambda flat, batch, key: model_loss(unravel(flat), batch, key), optimizer, jit=False)
    tx = optimizer.build()

    def init(key):
        k_params, k_train = jax.random.split(key)
        return create_train_state(ravel_pytree(model.init(k_params))[0], tx, k_train)

    reported = (task.metric, *getattr(task, "secondary_metrics", ()))

    def evaluate(flat, batch):  # one seed's parameters (P,); the batch is shared
        params = unravel(flat)
        _, metrics = model.loss_and_metrics(params, batch, task.kind)
        if seq2seq:
            tokens = model.greedy_decode(params, batch.inputs, lengths=batch.lengths, num_steps=task.target_len)
            metrics = {**metrics, **decode_metrics(tokens, batch.targets, batch.mask)}
        return {name: metrics[name] for name in reported}  # name -> scalar

    def train_chunk(states, batches, eval_batches):  # batches: leaves (K, S, B, ...)
        """K steps for every seed, then the metric on each evaluation batch: one compiled call."""

        def body(states, batch):
            states, metrics = jax.vmap(train_step)(states, batch)
            return states, metrics["loss"]  # (S,)

        states, losses = jax.lax.scan(body, states, batches)  # losses: (K, S)
        scores = {split: jax.vmap(evaluate, in_axes=(0, None))(states.params, b) for split, b in eval_batches.items()}
        return states, losses, scores  # scores: split -> (S,)

    seed_tasks = [dataclasses.replace(task, seed=task.seed + 1000 * s) for s in range(S)]

    def chunk_batches(chunk: int):
        steps = range(chunk * K, (chunk + 1) * K)
        return stack([stack([t.train_batch(step, config.batch_size) for t in seed_tasks]) for step in steps])

    splits = eval_splits(task)
    periodic = {split: splits[split] for split in ("valid", "test")}  # the other splits are scored once, at the end

    start, cpu_start = time.perf_counter(), time.process_time()
    keys = jax.random.split(jax.random.key(0), S)
    states = jax.jit(jax.vmap(init)).lower(keys).compile(compiler_options=FAST_COMPILE)(keys)
    init_cpu = time.process_time() - cpu_start
    batches = chunk_batches(0)
    train_compiled = jax.jit(train_chunk).lower(states, batches, periodic).compile()
    compile_seconds, compile_cpu = time.perf_counter() - start, time.process_time() - cpu_start - init_cpu

    curve_steps, curve_valid, curve_loss = [], [], []
    train_seconds = 0.0
    for chunk in range(config.steps // K):
        if chunk:
            batches = chunk_batches(chunk)
        start = time.perf_counter()
        states, losses, scores = train_compiled(states, batches, periodic)
        losses = np.asarray(losses)  # blocks until the chunk is done
        train_seconds += time.perf_counter() - start
        curve_loss.append(losses.mean(axis=0))
        curve_steps.append((chunk + 1) * K)
        curve_valid.append(np.asarray(scores["valid"][task.metric]))
    results = {split: {k: np.asarray(v).tolist() for k, v in scores[split].items()} for split in periodic}

    # Splits beyond valid/test (e.g. test_long) and the accuracy-against-length sweep: one more compile.
    extra = {split: batch for split, batch in splits.items() if split not in periodic}
    sweep, has_sweep = None, hasattr(task, "length_sweep") and task.kind == "classify"
    if has_sweep:
        lengths = sorted({int(v) for v in np.linspace(1, task.long_len, 16).round()})
        sweep_batch = task.length_sweep(lengths, config.sweep_per_length)
    if extra or has_sweep:

        def final(flat):  # one seed's parameters (P,)
            scores = {split: evaluate(flat, batch) for split, batch in extra.items()}
            if has_sweep:
                logits = model.apply(unravel(flat), sweep_batch.inputs, lengths=sweep_batch.lengths)  # (B, C)
                scores["_sweep"] = (jnp.argmax(logits, axis=-1) == sweep_batch.targets).astype(jnp.float32)  # (B,)
            return scores

        scores = jax.tree.map(np.asarray, jax.jit(jax.vmap(final))(states.params))
        results.update({split: {k: np.asarray(v).tolist() for k, v in scores[split].items()} for split in extra})
        if "_sweep" in scores:
            accuracy = scores["_sweep"].reshape(S, len(lengths), config.sweep_per_length).mean(axis=2)  # (S, L)
            sweep = {"lengths": lengths, "accuracy": accuracy.tolist(), "train_len": task.train_len}

    return {
        "task": task_name,
        "model": model_name,
        "params": num_params,
        "metric": task.metric,
        "results": results,
        "curve": {
            "steps": curve_steps,
            "valid": np.stack(curve_valid).tolist(),
            "train_loss": np.stack(curve_loss).tolist(),
        },
        "sweep": sweep,
        "compile_seconds": compile_seconds,
        "compile_cpu_seconds": {"init": init_cpu, "train": compile_cpu},
        "job_cpu_seconds": time.process_time() - job_cpu,
        "train_seconds": train_seconds,
        "error": None,
    }


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

CSV_COLUMNS = ("task", "model", "params", "metric", "split", "mean", "std", "seeds", "train_seconds")


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
            cost = splits["valid"].inputs.shape[1]
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


def run_all(config: Config, jobs: list[tuple[str, str]]) -> list[dict]:
    """Runs the jobs, in ``config.workers`` processes (1: in this process), printing progress."""
    records, start = [], time.perf_counter()

    def report(record):
        records.append(record)
        done = f"[{len(records)}/{len(jobs)}] {record['task']} / {record['model']}"
        if record["error"]:
            print(f"{done}: FAILED\n{record['error']}", flush=True)
        else:
            valid = summarise(record["results"]["valid"][record["metric"]])[0]
            print(
                f"{done}: params {record['params']:,}, valid {record['metric']} {valid:.4g}, "
                f"compile {record['compile_seconds']:.1f}s, train {record['train_seconds']:.1f}s "
                f"({time.perf_counter() - start:.0f}s elapsed)",
                flush=True,
            )

    if config.workers <= 1:
        for task, model in jobs:
            report(run_job(config, task, model))
        return records
    context = multiprocessing.get_context("spawn")  # JAX is not fork-safe
    with context.Pool(config.workers) as pool:
        pending = [pool.apply_async(run_job, (config, task, model)) for task, model in jobs]
        for result in pending:
            report(result.get())
    return records


def table_rows(config: Config, records: list[dict], baselines: dict) -> list[dict]:
    """The rows of ``compare.csv``: baselines first, then models in configured order, per task."""
    rows = []
    by_key = {(r["task"], r["model"]): r for r in records if not r["error"]}
    for name in config.tasks:
        if name not in baselines:
            continue
        metric = make_task(config, name).metric
        for split, value in baselines[name].items():
            rows.append(
                dict(
                    task=name,
                    model="baseline",
                    params=0,
                    metric=metric,
                    split=split,
                    mean=value,
                    std=0.0,
                    seeds=1,
                    train_seconds=0.0,
                )
            )
        for model in config.models:
            record = by_key.get((name, model))
            if record is None:
                continue
            for split, by_metric in record["results"].items():
                for metric_name, values in by_metric.items():
                    mean, std, n = summarise(values)
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
                    loss = curve["train_loss"][i - 1][seed] if i else ""
                    writer.writerow([r["task"], r["model"], r["metric"], step, seed, value, loss])
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
    plots.throughput(speed, os.path.join(out, "throughput.png"))
    plots.streaming_latency(speed, os.path.join(out, "streaming_latency.png"))
    with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as file:
        file.write(markdown(config, rows, meta, speed, skipped, records, wall_seconds, command))


def markdown(config, rows, meta, speed, skipped, records, wall_seconds, command) -> str:
    """The report: provenance, a pivot table (mean ± std per model), the long table and the plots."""
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
        f"Each cell of the table is the mean ± sample standard deviation over {config.seeds} seeds (model init, "
        f"dropout and data order) after {config.steps} Adam steps of batch {config.batch_size}, models matched "
        "in parameter count per task (the `params` column of compare.csv). `baseline` is the trivial predictor; "
        "↑ higher is better, ↓ lower is better.",
        "",
        "| task | metric | split | " + " | ".join(models) + " |",
        "|---|---|---|" + "---|" * len(models),
    ]
    cells = {(r["task"], r["split"], r["metric"], r["model"]): r for r in rows}
    for name, task in meta.items():
        arrow = "↑" if task.higher_is_better else "↓"
        for metric in (task.metric, *getattr(task, "secondary_metrics", ())):
            for split in task.splits:
                entries = []
                for m in models:
                    r = cells.get((name, split, metric, m))
                    if r is None:
                        entries.append("")
                    elif m == "baseline":
                        entries.append(f"{r['mean']:.3g}")
                    else:
                        entries.append(f"{r['mean']:.3g} ± {r['std']:.2g}")
                lines.append(f"| {name} | {metric} {arrow} | {split} | " + " | ".join(entries) + " |")
    lines += ["", "Parameters per model (matched to each task's target):", ""]
    lines += [
        "| task | " + " | ".join(m for m in models if m != "baseline") + " |",
        "|---|" + "---|" * (len(models) - 1),
    ]
    for name in meta:
        entries = []
        for m in models[1:]:
            r = cells.get((name, "valid", meta[name].metric, m))
            entries.append(f"{r['params']:,}" if r else "")
        lines.append(f"| {name} | " + " | ".join(entries) + " |")
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
        lines.append("|---|" + "---|" * (len(lengths) + len(contexts)))
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
        "workers); `train_seconds` is the wall time of one (task, model) pair's training, all seeds at once, "
        "compilation excluded.",
    ]
    failed = [r for r in records if r["error"]]
    if failed or skipped:
        lines += ["", "Skipped or failed:", ""]
        lines += [f"- {s}" for s in skipped]
        lines += [f"- {r['model']} on {r['task']}: failed ({r['error'].strip().splitlines()[-1]})" for r in failed]
    lines += [
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


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the CPU size: about 6.5 minutes on 2 cores")
    size.add_argument("--tiny", action="store_true", help="a smoke test of a few seconds per pair (for tests)")
    parser.add_argument("--tasks", help=f"comma-separated task names (default: all of {','.join(TASK_ORDER)})")
    parser.add_argument("--models", help=f"comma-separated model names (default: all of {','.join(zoo.ALL_MODELS)})")
    parser.add_argument("--out", default="results/compare", help="output folder (default: results/compare)")
    parser.add_argument("--seeds", type=int, help="seeds per (task, model)")
    parser.add_argument("--steps", type=int, help="training steps (a multiple of the evaluation interval)")
    parser.add_argument("--eval-every", type=int, help="steps between validation points")
    parser.add_argument("--batch-size", type=int, help="sequences per step and seed")
    parser.add_argument("--workers", type=int, help="parallel training processes (default 2)")
    parser.add_argument("--no-speed", action="store_true", help="skip the throughput and latency measurements")
    args = parser.parse_args(argv)
    overrides = {"out": args.out}
    for field in ("seeds", "steps", "eval_every", "batch_size", "workers"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    if args.tasks:
        overrides["tasks"] = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if args.models:
        overrides["models"] = tuple(m.strip().lower() for m in args.models.split(",") if m.strip())
    config = quick_config(**overrides) if args.quick else tiny_config(**overrides) if args.tiny else Config(**overrides)
    unknown = [m for m in config.models if m not in zoo.ALL_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(zoo.ALL_MODELS)}")
    from rnnjax import tasks

    unknown = [t for t in config.tasks if t not in tasks.names()]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {', '.join(tasks.names())}")
    if config.steps % config.eval_every:
        parser.error(f"steps ({config.steps}) must be a multiple of eval_every ({config.eval_every})")
    config.speed = config.speed and not args.no_speed
    return config


def main(argv: list[str] | None = None) -> Config:
    """Runs the comparison and writes the report; returns the config it ran."""
    start = time.perf_counter()
    config = parse_args(argv)
    command = "python experiments/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    jobs, skipped, baselines = plan(config)
    print(f"{len(jobs)} (task, model) pairs x {config.seeds} seeds, {config.workers} worker(s)", flush=True)
    records = run_all(config, jobs)
    speed = run_speed(config) if config.speed else []
    rows = table_rows(config, records, baselines)
    write_outputs(config, records, rows, speed, skipped, time.perf_counter() - start, command.strip())
    print(f"wrote {config.out}/compare.md ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    return config


if __name__ == "__main__":
    main()
