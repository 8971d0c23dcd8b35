"""``python -m rnnjax.bench.deer`` runs end to end at one tiny length and records what it measured.

A smoke test of the harness, not a speed check: which contender is faster is never asserted on a shared machine.
"""

import json

import pytest

from rnnjax.bench import deer as bench_deer


@pytest.mark.slow
def test_quick_run_records_times_iterations_and_differences(tmp_path, capsys):
    # Given the quickest settings: every cell, one short length, one timed call per contender
    out = tmp_path / "deer.json"

    # When the benchmark runs
    returned = bench_deer.main(["--quick", "--times", "16", "--repeats", "1", "--out", str(out)])

    # Then the record names the machine and settings, and holds one row per cell with every contender timed
    record = json.loads(out.read_text())
    assert record["records"] == json.loads(json.dumps(returned["records"]))
    assert {"device", "platform", "backend", "date", "versions", "native_kernels"} <= set(record["environment"])
    assert record["settings"]["times"] == [16] and record["settings"]["repeats"] == 1
    assert [(r["cell"], r["T"]) for r in record["records"]] == [("lstm", 16), ("gru", 16), ("elman", 16)]
    for r in record["records"]:
        assert {"sequential", "deer_full", "deer_diagonal"} <= set(r["forward_s"])
        assert {"sequential", "deer_full"} <= set(r["grad_s"])
        assert ("sequential_pure_jax" in r["forward_s"]) == r["native_used"]
        assert all(seconds > 0 for seconds in (*r["forward_s"].values(), *r["grad_s"].values()))
        assert r["forward_ratio"]["deer_full"] == pytest.approx(
            r["forward_s"]["deer_full"] / r["forward_s"]["sequential"]
        )
        assert r["skipped"] == []
        # And each DEER variant converged in a whole number of Newton iterations to the sequential outputs
        for jacobian in ("full", "diagonal"):
            info = r["deer"][jacobian]
            assert isinstance(info["iterations"], int) and 1 <= info["iterations"] <= 16 + 1
            assert info["converged"] is True
            assert info["max_abs_diff"] < 1e-4
        assert r["grad_max_abs_diff"] < 1e-4 * max(1.0, r["grad_max_abs"])
    assert record["records"][2]["native_used"] is False  # no native kernel for the Elman cell
    # And the summary answers "from which T" for every cell and DEER variant
    assert set(record["beats_sequential_from"]) == {"lstm", "gru", "elman"}
    for per_contender in record["beats_sequential_from"].values():
        assert set(per_contender) == {"forward/deer_full", "forward/deer_diagonal", "grad/deer_full"}
        for verdict in per_contender.values():
            assert verdict["sequential"]["measured"] == [16]
            assert verdict["sequential"]["from"] in (None, 16)
    printed = capsys.readouterr().out
    assert "ELMAN (D = 16)" in printed and "LSTM (D = 32)" in printed and "×seq" in printed


def test_wins_reports_the_smallest_faster_length_or_none():
    records = [
        {"cell": "lstm", "T": 64, "forward_s": {"sequential": 1.0, "deer_full": 2.0}},
        {"cell": "lstm", "T": 256, "forward_s": {"sequential": 1.0, "deer_full": 0.5}},
        {"cell": "lstm", "T": 1024, "forward_s": {"sequential": 1.0, "deer_full": 0.9}},
        {"cell": "gru", "T": 64, "forward_s": {"sequential": 1.0, "deer_full": 1.5}},
        {"cell": "gru", "T": 256, "forward_s": {"sequential": 1.0}},  # DEER skipped at this length
    ]
    assert bench_deer.wins(records, "lstm", "forward", "deer_full") == {
        "from": 256,
        "at": [256, 1024],
        "measured": [64, 256, 1024],
    }
    assert bench_deer.wins(records, "gru", "forward", "deer_full") == {"from": None, "at": [], "measured": [64]}
    lines = bench_deer.summary_lines(
        {"gru": {"forward/deer_full": {"sequential": bench_deer.wins(records, "gru", "forward", "deer_full")}}}
    )
    assert lines[0].endswith("none in the grid (T = 64)")


def test_rejects_unknown_cells_and_bad_lengths(capsys):
    with pytest.raises(SystemExit):
        bench_deer.parse_args(["--cells", "lstm,transformer"])
    assert "--cells" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_deer.parse_args(["--times", "16,x"])
    assert "--times" in capsys.readouterr().err
    settings, out = bench_deer.parse_args(["--quick", "--repeats", "3"])
    assert settings.times == (16, 64) and settings.repeats == 3 and out is None  # explicit values win over --quick
