"""Which architectures track state, and which recall? Measured, and set beside what the papers report.

Trains every model (LSTM, GRU, sLSTM, minGRU, LRU, RG-LRU, Mamba-2, mLSTM, Gated DeltaNet with and without
negative eigenvalues, and a causal transformer) on state-tracking tasks — parity, the running sum modulo 3, the
word problems of S3, Z5, A5 and S5 — and on multi-query associative recall, each until it solves the task or
spends the task's step budget; scores it at the training length and on longer sequences; and writes into
``--out``:

* ``state_tracking.md``: a model × task table (accuracy at the training length and on the long split, whether
  the task was solved and after how many steps), what the papers report for each task, and a generated
  comparison naming every model whose measured result differs from the published expectation;
* ``state_tracking.csv`` (one row per task, model and split), ``length_accuracy.csv``, ``runs.jsonl``;
* ``accuracy_vs_length.png`` (one panel per task, one line per model) and ``solved.png``.

Usage::

    python experiments/state_tracking.py --quick --out results/state_tracking
    python experiments/state_tracking.py --quick --models lstm,gru,transformer --tasks parity,group_word_s5
    python experiments/state_tracking.py --full --out results/state_tracking_full

Learning rates: compare.py keeps swept rates in ``settings.json`` keyed by its own tasks; these tasks are not
there, so each (task, model) pair trains a small grid of peak rates (:data:`LR_GRID`) × ``seeds`` as members of
one :func:`rnnjax.train.train_seeds` call (stopping once every seed of some rate has solved the task, as
compare.py's sweep does) and reports the rate :func:`experiments.compare.choose` picks on the *validation*
split. Test and ``test_long`` play no part in the choice; "solved" (judged on validation) is a best-of-grid.

Models are compared at one width (hidden units, or the transformer's ``d_model``), not at matched parameter
counts: what a task asks of a model here is the size of its state; the parameter counts are in the CSV.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import sys
import time
import traceback
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `experiments` and `rnnjax` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import compare, zoo  # noqa: E402

# Models.


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of the comparison.

    Attributes:
        label: the name in tables and on the command line.
        cell: a registered cell name (:func:`rnnjax.cell_names`), or ``"transformer"``.
        options: cell options, as ``(name, value)`` pairs (``build_model(..., **dict(options))``).
        layers: recurrent layers; more than one are residual, behind an input embedding or projection of the
            model's width (as compare.py builds the parallel-scan cells, which have no dense recurrent matrix).
    """

    label: str
    cell: str
    options: tuple = ()
    layers: int = 1


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("lstm", "lstm"),
    ModelSpec("gru", "gru"),
    ModelSpec("slstm", "slstm"),
    ModelSpec("mingru", "mingru", layers=2),
    ModelSpec("lru", "lru", layers=2),
    ModelSpec("rglru", "rglru", layers=2),
    ModelSpec("mamba2", "mamba2", layers=2),
    ModelSpec("mlstm", "mlstm", layers=2),
    ModelSpec("gated_deltanet", "gated_deltanet", layers=2),
    ModelSpec("gated_deltanet_neg", "gated_deltanet", (("allow_negative_eigenvalues", True),), layers=2),
    ModelSpec("transformer", "transformer"),
)
"""Every model, in table order: nonlinear RNNs, then diagonal/linear recurrences, then attention."""
MODEL_BY_LABEL = {m.label: m for m in MODELS}


def registered(spec: ModelSpec) -> bool:
    """Whether the model's cell is registered in this installation (the transformer always is)."""
    import rnnjax

    return spec.cell == "transformer" or spec.cell in rnnjax.cell_names(aliases=True)


def model_spec(label: str) -> ModelSpec:
    """The spec of ``label``: a row of :data:`MODELS`, or any registered cell name as a one-layer model.

    Raises:
        ValueError: ``label`` is neither, or its cell is not registered; the message lists what is.
    """
    import rnnjax

    spec = MODEL_BY_LABEL.get(label)
    if spec is None and label in rnnjax.cell_names(aliases=True):
        spec = ModelSpec(label, label)
    known = f"models: {', '.join(m.label for m in MODELS)}; registered cells: {', '.join(rnnjax.cell_names())}"
    if spec is None:
        raise ValueError(f"unknown model {label!r}; {known}")
    if not registered(spec):
        raise ValueError(f"model {label!r} needs the cell {spec.cell!r}, which is not registered; {known}")
    return spec


def build(spec: ModelSpec, task, width: int):
    """The model ``spec`` for ``task`` at ``width`` (hidden units, or the transformer's ``d_model``)."""
    from rnnjax import models

    if spec.cell == "transformer":
        return zoo.build(task, "transformer", width)
    if spec.layers > 1:
        return models.build_model(
            task, spec.cell, width, num_layers=spec.layers, residual=True, embed_size=width, **dict(spec.options)
        )
    return models.build_model(task, spec.cell, width, **dict(spec.options))


# Tasks and sizes.


@dataclasses.dataclass(frozen=True)
class TaskRun:
    """One task of the comparison at one size.

    Attributes:
        task: the registry name (:func:`rnnjax.tasks.get`).
        options: the task's options.
        family: which published expectations apply (a key of :data:`EXPECTED`).
        steps: the step budget (a pair stops earlier once every seed of some learning rate has solved it).
        batch_size: sequences per step and member.
        eval_every: steps between validation points; divides ``steps``.
    """

    task: str
    options: dict
    family: str
    steps: int
    batch_size: int = 32
    eval_every: int = 100


def _state_tasks(train_len: int, long_len: int, steps: int, hard_steps: int, **kw) -> dict[str, TaskRun]:
    lengths = dict(train_len=train_len, long_len=long_len)
    return {
        "parity": TaskRun("parity", lengths, "parity", steps, **kw),
        "modular_sum": TaskRun("modular_sum", dict(modulus=3, **lengths), "modular_sum", steps, **kw),
        "group_word_s3": TaskRun("group_word", dict(group="S3", **lengths), "solvable_group", steps, **kw),
        "group_word_z5": TaskRun("group_word", dict(group="Z5", **lengths), "solvable_group", steps, **kw),
        "group_word_a5": TaskRun("group_word", dict(group="A5", **lengths), "a5", hard_steps, **kw),
        "group_word_s5": TaskRun("group_word", dict(group="S5", **lengths), "s5", hard_steps, **kw),
    }


QUICK_TASKS: dict[str, TaskRun] = {
    **_state_tasks(16, 64, steps=1000, hard_steps=1000),
    # Induction-style recall forms late: a d_model-32 transformer sat at 0.27 (one value of the row's four)
    # for 3,000 steps at vocabulary 64; a smaller vocabulary and a longer budget give it a chance.
    "mqar": TaskRun("mqar", dict(vocab_size=32, num_pairs=4, seq_len=32, long_pairs=8, long_len=64), "mqar", 2000),
}
FULL_TASKS: dict[str, TaskRun] = {
    **_state_tasks(32, 128, steps=4000, hard_steps=8000, eval_every=200),
    "mqar": TaskRun(
        "mqar", dict(vocab_size=128, num_pairs=8, seq_len=64, long_pairs=16, long_len=128), "mqar", 8000, 32, 200
    ),
}
TINY_TASKS: dict[str, TaskRun] = {
    **_state_tasks(6, 12, steps=20, hard_steps=20, batch_size=8, eval_every=10),
    "mqar": TaskRun("mqar", dict(vocab_size=16, num_pairs=2, seq_len=8, long_pairs=3, long_len=12), "mqar", 20, 8, 10),
}
PRESETS = {"tiny": TINY_TASKS, "quick": QUICK_TASKS, "full": FULL_TASKS}
TASK_ORDER = tuple(FULL_TASKS)

LR_GRID = {
    "quick": {"rnn": (3e-3, 1e-2), "transformer": (1e-3, 3e-3)},
    "full": {"rnn": (1e-3, 3e-3, 1e-2), "transformer": (3e-4, 1e-3, 3e-3)},
    "tiny": {"rnn": (3e-3,), "transformer": (1e-3,)},
}
"""Peak learning rates each pair trains (every rate with every seed), per size and family
(:func:`experiments.compare.lr_family`)."""


@dataclasses.dataclass
class Config:
    """Everything that defines a run."""

    tasks: tuple[str, ...] = TASK_ORDER  # task labels (keys of the preset's table)
    models: tuple[str, ...] = tuple(m.label for m in MODELS)  # model labels; unregistered table rows are skipped
    preset: str = "full"  # "tiny" (tests), "quick" or "full": the task table, learning-rate grid and sizes
    task_runs: dict = dataclasses.field(default_factory=lambda: dict(FULL_TASKS))  # label -> TaskRun
    width: int = 64  # hidden units of every recurrent layer, d_model of the transformer
    seeds: int = 3  # model seeds per learning rate (init and data order differ)
    steps: int | None = None  # overrides every task's step budget
    eval_size: int = 1000  # sequences per evaluation split
    warmup_fraction: float = 0.05  # linear warmup over this fraction of the budget, then cosine decay to zero
    clip_norm: float = 1.0  # global gradient-norm clipping threshold
    stop_when_solved: bool = True  # stop a pair once every seed of some learning rate has solved its task
    sweep_points: int = 16  # lengths in the accuracy-against-length sweep, up to the task's longest
    sweep_per_length: int = 200  # sequences per length in that sweep
    workers: int = 2  # processes training pairs in parallel, each watched for XLA:CPU stalls (0: this process)
    out: str = "results/state_tracking"  # output folder

    def run(self, task: str) -> TaskRun:
        """The task's run at this size, with the command line's step override."""
        run = self.task_runs[task]
        return dataclasses.replace(run, steps=self.steps) if self.steps else run

    def rates(self, model: str) -> tuple[float, ...]:
        """The learning-rate grid of ``model`` at this size."""
        return LR_GRID[self.preset][compare.lr_family(model)]


def preset_config(preset: str, **overrides) -> Config:
    """The config of a named size: ``"tiny"``, ``"quick"`` or ``"full"``."""
    base: dict[str, Any] = dict(task_runs=dict(PRESETS[preset]), preset=preset)
    if preset == "quick":
        base.update(width=32, seeds=2, eval_size=256, sweep_per_length=64)
    elif preset == "tiny":
        base.update(width=8, seeds=2, eval_size=16, sweep_points=3, sweep_per_length=4, workers=0)
    return Config(**{**base, **overrides})


def make_task(config: Config, label: str):
    """The task ``label`` at the configured size."""
    from rnnjax import tasks

    run = config.run(label)
    return tasks.get(run.task, eval_size=config.eval_size, **run.options)


def train_length(task) -> int:
    """The longest training sequence of ``task`` (parity and the state tasks: ``train_len``; MQAR: ``seq_len``)."""
    return int(getattr(task, "train_len", None) or task.seq_len)


def sweep_lengths(task, points: int) -> list[int]:
    """``points`` lengths from the shortest to the task's longest (``long_len``) for the accuracy sweep."""
    shortest = 4 if task.name == "mqar" else 1
    return sorted({int(v) for v in np.linspace(shortest, task.long_len, points).round()})


# One (task, model) pair.


def run_job(config: Config, task_label: str, model_label: str) -> dict:
    """Trains one pair (every learning rate of the grid × seeds at once), keeps the rate chosen on validation,
    scores it on every split and against length.

    Returns:
        A JSON-friendly record (``task``, ``model``, ``params``, ``learning_rate``, ``candidates``, ``results``:
        split -> metric -> per-seed values of the chosen rate, ``steps_to_solve``, ``stopped_at``, ``budget``,
        ``curve``, ``sweep``, timings), or ``error`` with a traceback: one failing pair does not sink the run.
    """
    try:
        return _run_job(config, task_label, model_label)
    except Exception:
        return {"task": task_label, "model": model_label, "error": traceback.format_exc()}


def _run_job(config: Config, task_label: str, model_label: str) -> dict:
    import jax

    from rnnjax.train import OptimizerConfig, train_seeds

    task, run = make_task(config, task_label), config.run(task_label)
    model = build(model_spec(model_label), task, config.width)
    grid = config.rates(model_label)
    seeds = [s for _ in grid for s in range(config.seeds)]
    rates = [lr for lr in grid for _ in range(config.seeds)]
    warmup = int(config.warmup_fraction * run.steps)
    optimizer = OptimizerConfig(
        "adam", learning_rate=rates[0], warmup_steps=warmup, decay_steps=run.steps - warmup, clip_norm=config.clip_norm
    )
    result = train_seeds(
        model,
        task,
        seeds=seeds,
        learning_rates=rates,
        steps=run.steps,
        batch_size=run.batch_size,
        optimizer=optimizer,
        eval_every=run.eval_every,
        stop_when_solved=compare.any_rate_solved(rates) if config.stop_when_solved else False,
    )
    # The rate: most seeds solved on validation, then fewest steps, then the best final validation score.
    valid = np.asarray(result.final["valid"][task.metric])
    sign = -1.0 if task.higher_is_better else 1.0
    candidates = []
    for lr in grid:
        members = np.asarray(rates) == lr
        solved = result.steps_to_solve[members]
        candidates.append(
            dict(
                learning_rate=lr,
                solved=int((solved >= 0).sum()),
                steps_to_solve=float(np.median(solved[solved >= 0])) if (solved >= 0).any() else None,
                valid=float(sign * np.nanmean(valid[members])) if np.isfinite(valid[members]).any() else np.inf,
            )
        )
    lr = compare.choose(candidates)["learning_rate"]
    members = np.flatnonzero(np.asarray(rates) == lr)
    params = jax.tree.map(lambda leaf: leaf[members], result.params)
    return {
        "task": task_label,
        "task_name": task.name,
        "model": model_label,
        "params": zoo.count_params(model),
        "metric": task.metric,
        "threshold": result.threshold,
        "learning_rate": lr,
        "candidates": candidates,
        "batch_size": run.batch_size,
        "budget": run.steps,
        "train_len": train_length(task),
        "results": {s: {k: v[members].tolist() for k, v in by.items()} for s, by in result.final.items()},
        "steps_to_solve": result.steps_to_solve[members].tolist(),
        "stopped_at": result.stopped_at,
        "curve": {
            "steps": result.steps.tolist(),
            "valid": result.curve[:, members].tolist(),
            "train_loss": result.train_loss[:, members].tolist(),
        },
        "sweep": length_sweep(config, task, model, params),
        "compile_seconds": result.compile_seconds,
        "train_seconds": result.train_seconds,
        "error": None,
    }


def length_sweep(config: Config, task, model, params) -> dict:
    """The task's metric against sequence length for each member (``params``: leaves with a leading ``(S,)``).

    Every length is padded to the longest, so one compiled scorer serves all of them.
    """
    import jax

    lengths = sweep_lengths(task, config.sweep_points)
    per_length = config.sweep_per_length
    batch = task.length_sweep(lengths, per_length)

    @jax.jit
    def score(params, rows):  # -> (S,) metric on these rows
        return jax.vmap(lambda p: model.loss_and_metrics(p, rows, task.kind)[1][task.metric])(params)

    accuracy = []
    for i in range(len(lengths)):
        rows = slice(i * per_length, (i + 1) * per_length)
        part = jax.tree.map(lambda x, rows=rows: x[rows], batch)  # None fields stay None
        accuracy.append(np.asarray(score(params, part)))
    return {
        "lengths": lengths,
        "accuracy": np.stack(accuracy, axis=1).tolist(),  # (S, L)
        "train_len": train_length(task),
        "per_length": per_length,
    }


# What the papers report, and how a measured result is judged against it.

SOURCES = {
    "merrill": (
        "Merrill, Petty & Sabharwal 2024, arXiv 2404.08819",
        "transformers and linear or Mamba-style SSMs of fixed depth lie in TC0 and cannot express the A5/S5 word "
        "problem at every length; in their experiments an RNN learns it with one layer, while transformers and "
        "Mamba need more layers as the words grow, and struggle on easier state-tracking problems too",
    ),
    "grazzi": (
        "Grazzi et al. 2024, arXiv 2411.12537",
        "linear RNNs whose state transitions have only positive eigenvalues (Mamba, mLSTM, DeltaNet, ... as "
        "usually built) cannot solve parity, and counting modulo 3 needs non-triangular transitions; Mamba and "
        "DeltaNet with eigenvalues in [-1, 1] solve parity and do better on modular arithmetic",
    ),
    "xlstm": (
        "Beck et al. 2024 (xLSTM), arXiv 2405.04517, Sec. 4.1",
        "sLSTM, with memory mixing, solves parity and the other regular-language tasks it was tested on; models "
        "without memory mixing (mLSTM-only xLSTM, Mamba, transformers) do not solve parity",
    ),
    "deletang": (
        "Delétang et al. 2023, arXiv 2207.02098",
        "LSTMs solve parity and modular arithmetic on strings longer than any trained on; transformers do not",
    ),
    "zoology": (
        "Arora et al. 2023 (Zoology), arXiv 2312.04927",
        "attention solves MQAR at every width tried; gated-convolution and recurrent models need a model width "
        "(state) that grows with the number of key-value pairs and the sequence length",
    ),
}
"""Short citation and what each paper reports that the table is compared with."""

_NONLINEAR = {"lstm": ("solves", "deletang"), "gru": ("solves", "merrill"), "slstm": ("solves", "xlstm")}
_POSITIVE = ("mingru", "rglru", "mamba2", "mlstm", "gated_deltanet")  # diagonal or Householder, eigenvalues >= 0
EXPECTED: dict[str, dict[str, tuple[str, str]]] = {
    "parity": {
        **_NONLINEAR,
        **{m: ("fails", "grazzi") for m in _POSITIVE},
        "gated_deltanet_neg": ("solves", "grazzi"),
        "transformer": ("fails", "deletang"),
    },
    "modular_sum": {
        **_NONLINEAR,
        **{m: ("fails", "grazzi") for m in _POSITIVE},
        "transformer": ("fails", "deletang"),
    },
    "solvable_group": {
        "lstm": ("solves", "merrill"),
        "gru": ("solves", "merrill"),
        **{m: ("fails", "grazzi") for m in _POSITIVE},
        "transformer": ("fails", "merrill"),
    },
    "a5": {
        "lstm": ("solves", "merrill"),
        "gru": ("solves", "merrill"),
        **{m: ("fails", "merrill") for m in ("lru", "mingru", "rglru", "mamba2", "mlstm")},
        "transformer": ("fails", "merrill"),
    },
    "s5": {
        "lstm": ("solves", "merrill"),
        "gru": ("solves", "merrill"),
        **{m: ("fails", "merrill") for m in ("lru", "mingru", "rglru", "mamba2", "mlstm")},
        "gated_deltanet": ("fails", "grazzi"),  # S5 determines the sign of the permutation: parity
        "transformer": ("fails", "merrill"),
    },
    "mqar": {"transformer": ("solves", "zoology")},
}
"""Per task family and model: the published expectation (``"solves"``: at the training length and beyond;
``"fails"``: not at every length) and its source (a key of :data:`SOURCES`). Pairs absent have no published
verdict at this setting. MQAR is judged at the training length only, as Zoology measures it."""
FAMILY_SOURCES = {
    "parity": ("grazzi", "xlstm", "deletang"),
    "modular_sum": ("grazzi", "deletang"),
    "solvable_group": ("merrill", "grazzi"),
    "a5": ("merrill",),
    "s5": ("merrill", "grazzi"),
    "mqar": ("zoology",),
}


def solved_seeds(record: dict) -> int:
    """Seeds of the chosen rate that met the threshold on validation during training."""
    return sum(s >= 0 for s in record["steps_to_solve"])


def verdict(record: dict, family: str) -> str:
    """``"solves"`` (at least half the seeds solved on validation and, except for MQAR, the long split's mean
    accuracy meets the threshold too), ``"short only"`` (solved at the training length, not beyond) or ``"fails"``."""
    seeds = len(record["steps_to_solve"])
    if 2 * solved_seeds(record) < seeds or seeds == 0:
        return "fails"
    if family == "mqar":
        return "solves"
    long = compare.summarise(record["results"]["test_long"][record["metric"]])[0]
    return "solves" if np.isfinite(long) and long >= record["threshold"] else "short only"


def agrees(expected: str, measured: str) -> bool:
    """Whether a measured verdict matches a published one (a "fails" is met by anything short of "solves")."""
    return measured == "solves" if expected == "solves" else measured != "solves"


def comparison_lines(config: Config, records: list[dict]) -> list[str]:
    """For each task: what the papers report, then each model whose measured verdict differs, in sentences."""
    by_key = {(r["task"], r["model"]): r for r in records if not r["error"]}
    lines = []
    for label in config.tasks:
        family = config.run(label).family
        ran = [m for m in config.models if (label, m) in by_key]
        if not ran:
            continue
        published = " ".join(f"{SOURCES[s][0]}: {SOURCES[s][1]}." for s in FAMILY_SOURCES[family])
        lines += ["", f"**{label}**. Published — {published}"]
        matched, unjudged = [], []
        for model in ran:
            record = by_key[(label, model)]
            measured = verdict(record, family)
            expected = EXPECTED[family].get(model)
            if expected is None:
                unjudged.append(f"{model} ({measured})")
                continue
            if agrees(expected[0], measured):
                matched.append(model)
                continue
            valid = compare.summarise(record["results"]["valid"][record["metric"]])[0]
            long = compare.summarise(record["results"]["test_long"][record["metric"]])[0]
            budget = compare.format_steps(record["budget"])
            what = {
                "solves": "solved it at the training length and beyond",
                "short only": "solved it at the training length but not on longer sequences",
                "fails": f"did not solve it within {budget} steps",
            }[measured]
            lines.append(
                f"- {model}: {SOURCES[expected[1]][0]} lead(s) us to expect it to "
                f"{'solve' if expected[0] == 'solves' else 'fail'} this task; here it {what} "
                f"({solved_seeds(record)}/{len(record['steps_to_solve'])} seeds solved on validation; validation "
                f"accuracy {valid:.3f}, {long:.3f} on the long split; width {config.width})."
            )
        if matched:
            lines.append(f"- As published: {', '.join(matched)}.")
        if unjudged:
            lines.append(f"- No published verdict at this setting: {', '.join(unjudged)}.")
    return lines


# Reporting.

CSV_COLUMNS = (
    "task",
    "model",
    "params",
    "learning_rate",
    "split",
    "accuracy_mean",
    "accuracy_std",
    "seeds",
    "solved",
    "steps_to_solve",
    "stopped_at",
    "budget",
    "verdict",
    "expected",
    "source",
)
"""Columns of ``state_tracking.csv``: one row per (task, model, split); ``model = baseline`` rows hold the trivial
predictor. ``solved``: seeds whose final score on ``split`` meets the threshold; ``steps_to_solve``: median
validation step at which the seeds first met it; ``verdict``/``expected``/``source``: :func:`verdict` and
:data:`EXPECTED`."""


def table_rows(config: Config, records: list[dict], baselines: dict) -> list[dict]:
    """The rows of ``state_tracking.csv``."""
    rows = []
    for label in config.tasks:
        if label not in baselines:
            continue
        family = config.run(label).family
        for split, value in baselines[label].items():
            rows.append(dict(task=label, model="baseline", split=split, accuracy_mean=value, accuracy_std=0.0))
        for r in records:
            if r["task"] != label or r["error"]:
                continue
            expected = EXPECTED[family].get(r["model"], ("", ""))
            steps = compare.median_steps(r["steps_to_solve"])
            for split, by_metric in r["results"].items():
                values = by_metric[r["metric"]]
                mean, std, n = compare.summarise(values)
                rows.append(
                    dict(
                        task=label,
                        model=r["model"],
                        params=r["params"],
                        learning_rate=r["learning_rate"],
                        split=split,
                        accuracy_mean=mean,
                        accuracy_std=std,
                        seeds=n,
                        solved=sum(v >= r["threshold"] for v in values),
                        steps_to_solve="" if steps is None else steps,
                        stopped_at=r["stopped_at"],
                        budget=r["budget"],
                        verdict=verdict(r, family),
                        expected=expected[0],
                        source=SOURCES[expected[1]][0] if expected[1] else "",
                    )
                )
    return rows


def cell_text(record: dict | None) -> str:
    """``0.998 / 0.61 ✓ @300``: accuracy at the training length (test) / on the long split, solved seeds, steps."""
    if record is None:
        return "–"
    if record["error"]:
        return "failed"
    metric, seeds = record["metric"], len(record["steps_to_solve"])
    test = compare.summarise(record["results"]["test"][metric])[0]
    long = compare.summarise(record["results"]["test_long"][metric])[0]
    solved = solved_seeds(record)
    if solved == 0:
        mark = f"✗ ({compare.format_steps(record['budget'])})"
    else:
        mark = "✓" if solved == seeds else f"✓ {solved}/{seeds}"
        mark += f" @{compare.format_steps(compare.median_steps(record['steps_to_solve']))}"
    return f"{test:.3f} / {long:.3f} {mark}"


def results_table(config: Config, records: list[dict], baselines: dict) -> list[str]:
    """Models × tasks, as Markdown lines (a ``baseline`` row first)."""
    by_key = {(r["task"], r["model"]): r for r in records}
    labels = [t for t in config.tasks if t in baselines]
    models = [m for m in config.models if any((t, m) in by_key for t in labels)]
    lines = ["| model | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    chance = [f"{baselines[t]['test']:.3f} / {baselines[t]['test_long']:.3f}" for t in labels]
    lines.append("| baseline | " + " | ".join(chance) + " |")
    for m in models:
        lines.append(f"| {m} | " + " | ".join(cell_text(by_key.get((t, m))) for t in labels) + " |")
    return lines


def markdown(config: Config, records, baselines, skipped, wall_seconds: float, command: str) -> str:
    """The report: provenance, the table, the settings, the comparison with the papers, the plots."""
    import jax

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ok = [r for r in records if not r["error"]]
    lines = [
        "# State tracking and recall: which architectures do which",
        "",
        f"Command: `{command}`",
        "",
        f"Device: {compare.device_description()}; jax {jax.__version__}; date {now}; wall time "
        f"{wall_seconds / 60:.1f} min ({config.preset} size).",
        "",
        f"Each cell: accuracy at the training length (`test` split) / on the long split (`test_long`: longer "
        f"sequences, scored past the training length; for MQAR more pairs), mean over {config.seeds} seeds of the "
        "learning rate chosen on validation; ✓ every seed reached the task's threshold (0.99) on validation "
        "(✓ 1/2: one seed of two), `@300` the median step at which they did, ✗ `(1,000)` none within the budget. "
        f"Width {config.width} (hidden units; the transformer's d_model); `baseline` is the most frequent class.",
        "",
        *results_table(config, records, baselines),
        "",
        "Tasks and budgets:",
        "",
        "| task | options | budget | batch | learning rates |",
        "|---|---|---:|---:|---|",
    ]
    for label in config.tasks:
        if label not in baselines:
            continue
        run = config.run(label)
        options = ", ".join(f"{k}={v}" for k, v in run.options.items())
        rates = "; ".join(f"{f}: {', '.join(f'{lr:g}' for lr in g)}" for f, g in LR_GRID[config.preset].items())
        lines.append(f"| {label} | `{run.task}` {options} | {run.steps:,} | {run.batch_size} | {rates} |")
    lines += [
        "",
        "Models: "
        + "; ".join(
            f"{m.label} = {m.cell}"
            + (f"({', '.join(f'{k}={v}' for k, v in m.options)})" if m.options else "")
            + (f" × {m.layers} residual layers" if m.layers > 1 else "")
            for m in map(model_spec, dict.fromkeys(r["model"] for r in ok))
        )
        + " (the transformer: compare.py's, 2 blocks).",
        "",
        "## Measured against published",
        "",
        "A model *solves* a task when at least half its seeds reach 0.99 on validation and the long split's mean "
        "accuracy is 0.99 too (MQAR: at the training length only, as Zoology measures it); *short only* when it "
        "solves at the training length alone. A published 'fails' is met by anything short of *solves*: the "
        "papers' negative results are about every length. Our budgets are small, so 'did not solve' is weaker "
        "evidence than 'solved'.",
        *comparison_lines(config, records),
    ]
    if skipped or len(ok) < len(records):
        lines += ["", "Skipped or failed:", ""]
        lines += [f"- {s}" for s in skipped]
        lines += [
            f"- {r['model']} on {r['task']}: failed ({r['error'].strip().splitlines()[-1]})"
            for r in records
            if r["error"]
        ]
    compile_total = sum(r["compile_seconds"] for r in ok)
    train_total = sum(r["train_seconds"] for r in ok)
    lines += [
        "",
        f"Compilation took {compile_total:.0f} s and training {train_total:.0f} s in all.",
        "",
        "![accuracy against length](accuracy_vs_length.png)",
        "",
        "![which model solved which task](solved.png)",
        "",
        "Full table: [state_tracking.csv](state_tracking.csv); accuracy per length: "
        "[length_accuracy.csv](length_accuracy.csv).",
        "",
    ]
    return "\n".join(lines)


def plot_accuracy_vs_length(records: list[dict], baselines: dict, labels: list[str], path: str) -> None:
    """One panel per task: accuracy against length, one line per model (mean over seeds), training lengths shaded."""
    import math

    import matplotlib.pyplot as plt

    from experiments import plots

    labels = [t for t in labels if any(r["task"] == t and not r["error"] for r in records)]
    if not labels:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.text(0.5, 0.5, "no task ran", ha="center", va="center")
        ax.axis("off")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    cols = min(3, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows + 0.7), squeeze=False)
    extra = iter(plt.get_cmap("tab20").colors)
    colours: dict[str, Any] = {}
    for ax, label in zip(axes.flat, labels):
        train_len = None
        for r in records:
            if r["task"] != label or r["error"]:
                continue
            sweep = r["sweep"]
            train_len = sweep["train_len"]
            if r["model"] not in colours:
                colours[r["model"]] = plots.STYLE.get(r["model"], (None,))[0] or next(extra)
            accuracy = np.asarray(sweep["accuracy"])  # (S, L)
            ax.plot(
                sweep["lengths"],
                accuracy.mean(axis=0),
                marker="o",
                markersize=2.5,
                color=colours[r["model"]],
                label=r["model"],
            )
        if train_len is not None:
            ax.axvspan(0, train_len + 0.5, color="gray", alpha=0.15)
        if label in baselines:
            ax.axhline(baselines[label]["test"], color="black", linestyle=":", linewidth=1)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(labels) :]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 6), frameon=False)
    fig.suptitle("Accuracy against length (shaded: training lengths; dotted: most frequent class)", fontsize=10)
    fig.tight_layout(rect=(0, 0.7 / (3.3 * rows + 0.7) + 0.03, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(config: Config, records, baselines, skipped, wall_seconds: float, command: str) -> None:
    """Writes the CSV files, ``runs.jsonl``, ``state_tracking.md`` and the plots into ``config.out``."""
    from experiments import plots

    out = config.out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "state_tracking.csv"), "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, CSV_COLUMNS)
        writer.writeheader()
        for row in table_rows(config, records, baselines):
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with open(os.path.join(out, "length_accuracy.csv"), "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["task", "model", "length", "seed", "accuracy", "train_len"])
        for r in records:
            if r["error"]:
                continue
            for seed, accuracies in enumerate(r["sweep"]["accuracy"]):
                for length, value in zip(r["sweep"]["lengths"], accuracies):
                    writer.writerow([r["task"], r["model"], length, seed, f"{value:.6g}", r["sweep"]["train_len"]])
    with open(os.path.join(out, "runs.jsonl"), "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    labels = [t for t in config.tasks if t in baselines]
    plot_accuracy_vs_length(records, baselines, labels, os.path.join(out, "accuracy_vs_length.png"))
    plots.solved_map(records, {t: None for t in labels}, list(config.models), os.path.join(out, "solved.png"))
    with open(os.path.join(out, "state_tracking.md"), "w", encoding="utf-8") as file:
        file.write(markdown(config, records, baselines, skipped, wall_seconds, command))


# Orchestration.


def _job_process(conn, config: Config, task: str, model: str) -> None:
    conn.send(run_job(config, task, model))
    conn.close()


def run_jobs(config: Config, jobs: list[tuple[str, str]], report) -> dict:
    """Runs ``run_job`` for every (task, model) job and calls ``report(job, record)`` as each finishes.

    ``config.workers == 0``: one after another in this process (tests). Otherwise each job gets a fresh spawned
    process, ``workers`` at a time, watched as compare.py watches its own: XLA:CPU (jax 0.10.2) now and then
    never finishes a computation when other processes share the two cores — every XLA thread asleep — so a
    process whose CPU time has not grown for ``compare.STALL_SECONDS`` is killed and its job rerun, up to
    ``compare.MAX_TRIES`` attempts. (compare.run_all holds the same loop but runs only compare.run_job.)
    """
    import multiprocessing

    records: dict = {}
    if config.workers == 0:
        for job in jobs:
            records[job] = run_job(config, *job)
            report(job, records[job])
        return records
    context = multiprocessing.get_context("spawn")  # JAX is not fork-safe
    queue = [(job, 1) for job in jobs]
    running: dict = {}  # process -> [job, tries, connection, cpu seconds, time of the last CPU progress]

    def finish(process, job, record):
        process.join()
        del running[process]
        records[job] = record
        report(job, record)

    try:
        while queue or running:
            while queue and len(running) < config.workers:
                job, tries = queue.pop(0)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_job_process, args=(send, config, *job), daemon=True)
                process.start()
                send.close()
                running[process] = [job, tries, receive, 0.0, time.monotonic()]
            time.sleep(0.5)
            for process, (job, tries, receive, cpu, since) in list(running.items()):
                failed = {"task": job[0], "model": job[1], "error": None}
                if receive.poll():
                    try:
                        finish(process, job, receive.recv())
                    except EOFError:
                        finish(process, job, {**failed, "error": f"worker ended without a result ({process.exitcode})"})
                    continue
                if not process.is_alive():
                    finish(process, job, {**failed, "error": f"worker process died (exit code {process.exitcode})"})
                    continue
                now, used = time.monotonic(), compare.cpu_seconds(process.pid)
                if used is None or used > cpu + 0.5:
                    running[process][3:] = [used or cpu, now]
                elif now - since > compare.STALL_SECONDS:
                    process.kill()
                    message = f"{job[0]} / {job[1]}: no progress for {compare.STALL_SECONDS:.0f} s (attempt {tries})"
                    if tries < compare.MAX_TRIES:
                        process.join()
                        del running[process]
                        print(f"{message}; restarting it", flush=True)
                        queue.insert(0, (job, tries + 1))
                    else:
                        finish(process, job, {**failed, "error": f"{message}; giving up"})
    finally:
        for process in running:
            process.kill()
    return records


def run_all(config: Config) -> tuple[list[dict], dict]:
    """Trains every (task, model) pair (:func:`run_jobs`); returns the records, in table order, and the baselines."""
    baselines = {}
    for label in config.tasks:
        task = make_task(config, label)
        baselines[label] = {s: float(task.baseline_score(s)) for s in task.splits}
    jobs = [(t, m) for t in config.tasks for m in config.models]
    start, done = time.perf_counter(), []

    def report(job, record):
        done.append(job)
        head = f"[{len(done)}/{len(jobs)}] {job[0]} / {job[1]}"
        if record["error"]:
            print(f"{head}: FAILED\n{record['error']}", flush=True)
            return
        print(
            f"{head}: {cell_text(record)}, lr {record['learning_rate']:g}, stopped at {record['stopped_at']}, "
            f"compile {record['compile_seconds']:.1f}s, train {record['train_seconds']:.1f}s "
            f"({time.perf_counter() - start:.0f}s elapsed)",
            flush=True,
        )

    records = run_jobs(config, jobs, report)
    return [records[job] for job in jobs], baselines


def parse_args(argv: list[str] | None) -> tuple[Config, list[str]]:
    """The config, and what was left out (table models whose cell is not registered)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small widths and budgets: minutes on 2 CPU cores")
    size.add_argument("--tiny", action="store_true", help="a smoke test of seconds per pair (for tests)")
    size.add_argument("--full", action="store_true", help="the default size: longer words, larger budgets")
    parser.add_argument("--tasks", help=f"comma-separated task labels (default all: {','.join(TASK_ORDER)})")
    parser.add_argument("--models", help=f"comma-separated model labels (default: {','.join(MODEL_BY_LABEL)})")
    parser.add_argument("--out", default="results/state_tracking", help="output folder")
    parser.add_argument("--seeds", type=int, help="model seeds per learning rate")
    parser.add_argument("--steps", type=int, help="step budget of every task (a multiple of its eval interval)")
    parser.add_argument("--width", type=int, help="hidden units / d_model of every model")
    parser.add_argument("--workers", type=int, help="parallel training processes (default 2; 0: in this process)")
    parser.add_argument("--no-early-stop", action="store_true", help="train every pair for its whole budget")
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else "tiny" if args.tiny else "full"
    overrides: dict[str, Any] = {"out": args.out}
    if args.workers is not None:
        if args.workers < 0:
            parser.error(f"--workers must be 0 or more, got {args.workers}")
        overrides["workers"] = args.workers
    for field in ("seeds", "steps", "width"):
        value = getattr(args, field)
        if value is not None:
            if value < 1:
                parser.error(f"--{field} must be a positive integer, got {value}")
            overrides[field] = value
    config = preset_config(preset, **overrides)
    config.stop_when_solved = not args.no_early_stop
    if args.tasks:
        config.tasks = tuple(t.strip().lower() for t in args.tasks.split(",") if t.strip())
        unknown = [t for t in config.tasks if t not in config.task_runs]
        if unknown:
            parser.error(f"unknown task(s) {unknown}; known: {', '.join(config.task_runs)}")
    skipped = []
    if args.models:
        config.models = tuple(m.strip().lower() for m in args.models.split(",") if m.strip())
        for m in config.models:
            try:
                model_spec(m)
            except ValueError as error:
                parser.error(str(error))
    else:
        missing = [m.label for m in MODELS if not registered(m)]
        config.models = tuple(m.label for m in MODELS if registered(m))
        if missing:
            skipped.append(f"models {', '.join(missing)}: their cells are not registered in this installation")
    for label in config.tasks:
        run = config.run(label)
        if run.steps % run.eval_every:
            parser.error(f"{label}: steps ({run.steps}) must be a multiple of eval_every ({run.eval_every})")
    return config, skipped


def main(argv: list[str] | None = None) -> Config:
    """Runs the comparison and writes the report."""
    start = time.perf_counter()
    config, skipped = parse_args(argv)
    command = "python experiments/state_tracking.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for line in skipped:
        print(f"skipping {line}", flush=True)
    print(f"{len(config.tasks)} tasks x {len(config.models)} models ({config.preset} size)", flush=True)
    records, baselines = run_all(config)
    write_outputs(config, records, baselines, skipped, time.perf_counter() - start, command.strip())
    print(f"wrote {config.out}/state_tracking.md ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    return config


if __name__ == "__main__":
    main()
