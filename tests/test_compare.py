"""experiments/compare.py: the model zoo (every head, matched sizes) and a tiny run end to end."""

import csv
import os
import sys

import jax
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
    args = ["--tiny", "--tasks", "parity", "--models", "gru,transformer", "--out", str(out), "--workers", "1"]
    compare.main(args)
    for name in (
        "compare.md",
        "compare.csv",
        "curves.csv",
        "length_accuracy.csv",
        "speed.csv",
        "runs.jsonl",
        "learning_curves.png",
        "length_generalisation.png",
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
    report = (out / "compare.md").read_text(encoding="utf-8")
    assert "| parity | accuracy ↑ | test_long |" in report and "Device:" in report
    with open(out / "speed.csv", encoding="utf-8") as file:
        speed = list(csv.DictReader(file))
    assert {r["measure"] for r in speed} == {"tokens_per_second", "seconds_per_token"}
