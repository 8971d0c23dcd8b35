"""experiments/compare.py: the model zoo (every head, matched sizes) and a tiny run end to end."""

import csv
import json
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `experiments`
pytest.importorskip("matplotlib")

from experiments import compare, zoo  # noqa: E402
from rnnjax import tasks  # noqa: E402

# One task of each kind (and a seq2seq one); all are generated, so no optional package is needed.
KIND_TASKS = {
    "classify": dict(name="parity", train_len=6, long_len=10),
    "regress": dict(name="adding", seq_len=8),
    "per_step_classify": dict(name="tagging", max_len=10),
    "per_step_regress": dict(name="mackey_glass", seq_len=8, warmup=2),
    "seq2seq": dict(name="translation"),
}


def kind_task(kind):
    options = dict(KIND_TASKS[kind])
    return tasks.get(options.pop("name"), eval_size=4, **options)


@pytest.mark.parametrize("model_name", ["simple", "jordan", "lstm", "gru", "bilstm", "transformer"])
@pytest.mark.parametrize("kind", list(KIND_TASKS))
def test_every_model_has_a_head_for_every_kind(kind, model_name):
    """Output and loss shapes of every zoo model on every task kind (traced with eval_shape: nothing compiles)."""
    task = kind_task(kind)
    ok, why = zoo.allows(task, model_name)
    if not ok:
        assert model_name == "bilstm" and why
        return
    model = zoo.build(task, model_name, 8)
    params = jax.eval_shape(model.init, jax.random.key(0))
    batch = task.eval_batch("valid")
    loss, metrics = jax.eval_shape(lambda p: model.loss_and_metrics(p, batch, task.kind), params)
    assert loss.shape == () and (task.metric in metrics or kind == "seq2seq")
    B = batch.batch_size
    if kind == "seq2seq":
        tokens = jax.eval_shape(
            lambda p: model.greedy_decode(p, batch.inputs, lengths=batch.lengths, num_steps=3), params
        )
        assert tokens.shape == (B, 3)
        return
    outputs = jax.eval_shape(lambda p: model.apply(p, batch.inputs, lengths=batch.lengths), params)
    assert outputs.shape == (
        (B, batch.inputs.shape[1], task.output_size) if kind.startswith("per_step") else (B, task.output_size)
    )


def test_bidirectional_models_are_kept_off_tasks_whose_targets_are_inputs():
    assert not zoo.allows(tasks.get("charlm", seq_len=8), "bilstm")[0]
    assert not zoo.allows(tasks.get("mackey_glass", seq_len=8, warmup=2), "bilstm")[0]
    assert zoo.allows(tasks.get("tagging"), "bilstm")[0]


@pytest.mark.parametrize("model_name", ["lstm", "simple", "transformer"])
def test_parameter_counts_are_matched(model_name):
    task = kind_task("regress")
    model, count = zoo.matched(task, model_name, 20_000)
    assert abs(count - 20_000) / 20_000 < 0.1
    assert count == zoo.count_params(model)


def test_bidirectional_models_do_not_stream():
    bilstm = zoo.build(zoo.BenchSpec(bidirectional_ok=True), "bilstm", 8)
    assert zoo.stream_fns(bilstm) is None
    assert zoo.stream_fns(zoo.build(zoo.BenchSpec(), "gru", 8)) is not None


def test_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "compare"
    settings = tmp_path / "settings.json"
    args = ["--tiny", "--tasks", "parity", "--models", "gru,transformer", "--out", str(out), "--workers", "1"]
    compare.main(args + ["--settings", str(settings)])
    for name in (
        "compare.md",
        "compare.csv",
        "curves.csv",
        "length_accuracy.csv",
        "speed.csv",
        "runs.jsonl",
        "learning_curves.png",
        "length_generalisation.png",
        "solved.png",
        "throughput.png",
        "streaming_latency.png",
    ):
        assert (out / name).exists() and os.path.getsize(out / name) > 0, name
    with open(out / "compare.csv", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == compare.CSV_COLUMNS
    assert {(r["model"], r["split"]) for r in rows} == {
        (m, s) for m in ("baseline", "gru", "transformer") for s in ("valid", "test", "test_long")
    }
    for row in rows:
        assert row["task"] == "parity" and row["metric"] == "accuracy" and 0 <= float(row["mean"]) <= 1
        assert int(row["seeds"]) == (1 if row["model"] == "baseline" else 2)
        if row["model"] != "baseline":  # 20 steps solve nothing: the whole budget is spent
            assert row["solved"] == "0" and row["steps_to_solve"] == "" and row["steps"] == "20"
            assert float(row["learning_rate"]) == compare.DEFAULT_LR[compare.lr_family(row["model"])]
    report = (out / "compare.md").read_text(encoding="utf-8")
    assert "| parity | accuracy ↑ | ≥ 0.99 | test_long |" in report and "Device:" in report
    assert "✗ (20)" in report  # not solved within the 20-step budget, said in the table
    with open(out / "speed.csv", encoding="utf-8") as file:
        speed = list(csv.DictReader(file))
    assert {r["measure"] for r in speed} == {"tokens_per_second", "seconds_per_token"}
    with open(out / "length_accuracy.csv", encoding="utf-8") as file:
        sweep = list(csv.DictReader(file))
    lengths = {int(r["length"]) for r in sweep}
    assert min(lengths) == 1 and max(lengths) == compare.TINY_TASKS["parity"].options["long_len"]
    assert all(0 <= float(r["accuracy"]) <= 1 for r in sweep)

    # A sweep writes the chosen rate of each pair into the settings file, and the next run reads it.
    compare.main(args + ["--settings", str(settings), "--sweep"])
    chosen = json.loads(settings.read_text(encoding="utf-8"))["tiny"]["parity"]
    for model in ("gru", "transformer"):
        rates = [c["learning_rate"] for c in chosen[model]["candidates"]]
        assert rates == list(compare.LR_GRID[compare.lr_family(model)])
        assert chosen[model]["learning_rate"] in rates
    compare.main(args + ["--settings", str(settings), "--no-speed"])
    with open(out / "compare.csv", encoding="utf-8") as file:
        rows = [r for r in csv.DictReader(file) if r["model"] == "gru"]
    assert float(rows[0]["learning_rate"]) == chosen["gru"]["learning_rate"]


def test_the_sweep_prefers_solving_then_speed_then_the_validation_score():
    candidates = [
        dict(learning_rate=1e-3, solved=1, steps_to_solve=100.0, valid=0.5),
        dict(learning_rate=3e-3, solved=2, steps_to_solve=900.0, valid=0.9),
        dict(learning_rate=1e-2, solved=2, steps_to_solve=400.0, valid=0.9),
    ]
    assert compare.choose(candidates)["learning_rate"] == 1e-2
    unsolved = [dict(learning_rate=lr, solved=0, steps_to_solve=None, valid=v) for lr, v in ((1e-3, 0.2), (3e-3, 0.1))]
    assert compare.choose(unsolved)["learning_rate"] == 3e-3
    assert (
        compare.choose([*unsolved, dict(learning_rate=1e-2, solved=0, steps_to_solve=None, valid=float("inf"))])[
            "learning_rate"
        ]
        == 3e-3
    )
    stop = compare.any_rate_solved([1e-3, 1e-3, 3e-3, 3e-3])
    assert not stop(np.array([10, -1, -1, 20])) and stop(np.array([10, -1, 30, 20]))


def test_quick_size_covers_the_lessons():
    config = compare.preset_config("quick")
    assert set(config.tasks) == {"adding", "copy", "parity"}
    assert {"simple", "lstm", "gru", "transformer"} <= set(config.models)
    assert all(config.spec(t).steps % config.spec(t).eval_every == 0 for t in compare.TASK_ORDER)
    assert config.sweep_per_length >= 500


def test_a_sweep_choice_serves_every_size_with_the_same_task_spec(tmp_path):
    path = tmp_path / "settings.json"
    spec = compare.spec_record(compare.QUICK_TASKS["adding"])
    path.write_text(json.dumps({"quick": {"adding": {"lstm": {"learning_rate": 0.01, "spec": spec}}}}))
    quick = compare.preset_config("quick", settings_path=str(path))
    full = compare.preset_config("full", settings_path=str(path))
    assert compare.chosen_learning_rate(quick, "adding", "lstm") == (0.01, "sweep")
    assert compare.chosen_learning_rate(full, "adding", "lstm") == (0.01, "sweep")  # same spec in both sizes
    assert compare.chosen_learning_rate(full, "adding", "gru") == (compare.DEFAULT_LR["rnn"], "default")
    longer = compare.preset_config("full", settings_path=str(path), steps=8000)  # another budget: not swept
    assert compare.chosen_learning_rate(longer, "adding", "lstm") == (compare.DEFAULT_LR["rnn"], "default")
    accelerator = compare.preset_config("accelerator", settings_path=str(path))
    assert compare.chosen_learning_rate(accelerator, "adding", "transformer")[1] == "default"


def test_worker_cpu_time_is_read_for_the_stall_watchdog():
    used = compare.cpu_seconds(os.getpid())
    if used is None:
        pytest.skip("no /proc on this system: the watchdog is off")
    sum(i * i for i in range(2_000_000))  # burn a little CPU
    assert compare.cpu_seconds(os.getpid()) > used
    assert compare.cpu_seconds(2**31 - 1) is None  # no such process


@pytest.mark.parametrize("model_name", ["mingru", "minlstm", "lru"])
def test_parallel_scan_cells_build_for_seq2seq(model_name):
    """The registry knows every shipped cell from ``import rnnjax`` on: no registration order to get wrong."""
    model = zoo.build(kind_task("seq2seq"), model_name, 8)
    assert zoo.count_params(model) > 0


def test_jobs_in_worker_processes_come_back_in_job_order():
    """The process-per-job path (workers > 1) returns every record, in the order of the jobs, without errors."""
    config = compare.preset_config("tiny", workers=2, tasks=("parity", "adding"), models=("gru",))
    jobs = [("parity", "gru"), ("adding", "gru")]
    records = compare.run_all(config, jobs)
    assert [(r["task"], r["model"]) for r in records] == jobs
    assert all(r["error"] is None for r in records), [r["error"] for r in records]
    assert all(r["stopped_at"] == compare.TINY_TASKS[r["task"]].steps for r in records)
