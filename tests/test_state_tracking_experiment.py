"""experiments/state_tracking.py: the table and the comparison with the papers (on synthetic results, fast),
the command line, and one tiny end-to-end run (slow)."""

import csv
import os

import pytest

from experiments import state_tracking as st


def record(task, model, valid, long, steps_to_solve, test=None):
    """A run_job-shaped record with two seeds."""
    test = valid if test is None else test
    return {
        "task": task,
        "model": model,
        "params": 1234,
        "metric": "accuracy",
        "threshold": 0.99,
        "learning_rate": 3e-3,
        "budget": 1000,
        "stopped_at": 1000 if min(steps_to_solve) < 0 else max(steps_to_solve),
        "steps_to_solve": steps_to_solve,
        "results": {
            "valid": {"accuracy": valid},
            "test": {"accuracy": test},
            "test_long": {"accuracy": long},
        },
        "sweep": {"lengths": [1, 8, 16], "accuracy": [[1.0, 0.9, 0.5], [1.0, 0.8, 0.6]], "train_len": 8},
        "compile_seconds": 1.0,
        "train_seconds": 2.0,
        "error": None,
    }


SYNTHETIC = [
    record("parity", "lstm", [1.0, 1.0], [1.0, 0.995], [300, 400]),  # solves, as published
    record("parity", "mingru", [1.0, 1.0], [1.0, 1.0], [200, 200]),  # solves, published: fails -> a sentence
    record("parity", "transformer", [1.0, 0.995], [0.6, 0.55], [500, 600]),  # short only: agrees with "fails"
    record("parity", "gru", [0.6, 0.55], [0.5, 0.5], [-1, -1]),  # fails, published: solves -> a sentence
    record("mqar", "transformer", [1.0, 1.0], [0.4, 0.5], [300, 300]),  # MQAR judged at the training length
    record("mqar", "lstm", [0.3, 0.2], [0.1, 0.1], [-1, -1]),  # no published verdict
]
BASELINES = {
    "parity": {"valid": 0.5, "test": 0.5, "test_long": 0.5},
    "mqar": {"valid": 0.03, "test": 0.03, "test_long": 0.02},
}


def synthetic_config(tmp_path=None):
    config = st.preset_config("tiny", tasks=("parity", "mqar"), models=("lstm", "gru", "mingru", "transformer"))
    if tmp_path is not None:
        config.out = str(tmp_path)
    return config


def test_verdicts():
    by = {(r["task"], r["model"]): r for r in SYNTHETIC}
    assert st.verdict(by["parity", "lstm"], "parity") == "solves"
    assert st.verdict(by["parity", "transformer"], "parity") == "short only"
    assert st.verdict(by["parity", "gru"], "parity") == "fails"
    assert st.verdict(by["mqar", "transformer"], "mqar") == "solves"  # the long split does not count for MQAR
    half = record("parity", "lstm", [1.0, 0.5], [1.0, 0.5], [300, -1])
    assert st.verdict(half, "parity") == "short only"  # one of two seeds is "most"; the long mean is 0.75
    assert st.agrees("fails", "short only") and not st.agrees("solves", "short only")


def test_comparison_names_exactly_the_disagreements():
    lines = st.comparison_lines(synthetic_config(), SYNTHETIC)
    text = "\n".join(lines)
    assert "arXiv 2411.12537" in text and "arXiv 2312.04927" in text  # the published sentences per task
    mismatches = [line for line in lines if line.startswith("- ") and "expect" in line]
    assert len(mismatches) == 2
    assert any(
        line.startswith("- mingru:") and "expect it to fail" in line and "and beyond" in line for line in mismatches
    )
    assert any(
        line.startswith("- gru:") and "expect it to solve" in line and "within 1,000 steps" in line
        for line in mismatches
    )
    assert "- As published: lstm, transformer." in lines
    assert "- As published: transformer." in lines  # mqar
    assert "- No published verdict at this setting: lstm (fails)." in lines


def test_table_and_csv_rows():
    config = synthetic_config()
    table = st.results_table(config, SYNTHETIC, BASELINES)
    assert table[0] == "| model | parity | mqar |"
    assert "| baseline | 0.500 / 0.500 | 0.030 / 0.020 |" in table
    assert "| lstm | 1.000 / 0.998 ✓ @350 | 0.250 / 0.100 ✗ (1,000) |" in table
    assert "| transformer | 0.998 / 0.575 ✓ @550 | 1.000 / 0.450 ✓ @300 |" in table
    rows = st.table_rows(config, SYNTHETIC, BASELINES)
    mingru = [r for r in rows if r["model"] == "mingru" and r["split"] == "test_long"]
    assert mingru[0]["verdict"] == "solves" and mingru[0]["expected"] == "fails" and mingru[0]["solved"] == 2
    assert len([r for r in rows if r["model"] == "baseline"]) == 6


def test_unknown_model_lists_the_registered_ones():
    import rnnjax

    with pytest.raises(ValueError, match="registered cells: .*lstm"):
        st.model_spec("no_such_cell")
    assert st.model_spec("lstm").layers == 1
    assert st.model_spec("gru") == st.MODEL_BY_LABEL["gru"]
    if "gated_deltanet" not in rnnjax.cell_names(aliases=True):
        with pytest.raises(ValueError, match="not registered"):
            st.model_spec("gated_deltanet_neg")
    with pytest.raises(SystemExit):
        st.parse_args(["--tiny", "--models", "lstm,no_such_cell"])
    with pytest.raises(SystemExit):
        st.parse_args(["--tiny", "--tasks", "no_such_task"])
    config, _ = st.parse_args(["--quick", "--models", "lstm,transformer", "--tasks", "parity,mqar"])
    assert config.models == ("lstm", "transformer") and config.tasks == ("parity", "mqar") and config.width == 32


def test_presets_are_consistent():
    from rnnjax import tasks

    for name, table in st.PRESETS.items():
        assert set(table) == set(st.TASK_ORDER)
        for run in table.values():
            assert run.steps % run.eval_every == 0 and run.family in st.EXPECTED
            task = tasks.get(run.task, eval_size=4, **run.options)
            assert "test_long" in task.splits and hasattr(task, "length_sweep")
            assert st.sweep_lengths(task, 4)[-1] == task.long_len
        assert set(st.LR_GRID[name]) == {"rnn", "transformer"}
    for family, expected in st.EXPECTED.items():
        assert all(
            m in st.MODEL_BY_LABEL and e in ("solves", "fails") and s in st.SOURCES for m, (e, s) in expected.items()
        )
        assert all(s in st.SOURCES for s in st.FAMILY_SOURCES[family])


def test_outputs_from_synthetic_records(tmp_path):
    config = synthetic_config(tmp_path)
    st.write_outputs(config, SYNTHETIC, BASELINES, ["models x: not registered"], 12.0, "python experiments/x.py")
    for name in (
        "state_tracking.md",
        "state_tracking.csv",
        "length_accuracy.csv",
        "runs.jsonl",
        "accuracy_vs_length.png",
        "solved.png",
    ):
        assert os.path.getsize(tmp_path / name) > 0
    report = (tmp_path / "state_tracking.md").read_text()
    assert "## Measured against published" in report and "models x: not registered" in report
    with open(tmp_path / "length_accuracy.csv") as file:
        assert len(list(csv.DictReader(file))) == len(SYNTHETIC) * 2 * 3


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
    # --workers 1: each pair in a spawned, watched process (the path --quick takes)
    argv = ["--tiny", "--workers", "1", "--models", "lstm,transformer", "--tasks", "modular_sum,mqar"]
    config = st.main([*argv, "--out", str(tmp_path)])
    assert config.models == ("lstm", "transformer") and config.workers == 1
    with open(tmp_path / "state_tracking.csv") as file:
        rows = list(csv.DictReader(file))
    assert {(r["task"], r["model"]) for r in rows} == {
        (t, m) for t in ("modular_sum", "mqar") for m in ("baseline", "lstm", "transformer")
    }
    assert all(0.0 <= float(r["accuracy_mean"]) <= 1.0 for r in rows)
    report = (tmp_path / "state_tracking.md").read_text()
    assert "failed" not in report and "| lstm |" in report and "| transformer |" in report
    for name in ("accuracy_vs_length.png", "solved.png", "length_accuracy.csv", "runs.jsonl"):
        assert os.path.getsize(tmp_path / name) > 0
