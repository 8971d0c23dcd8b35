"""The benchmark scripts run end to end at tiny sizes and record what docs/benchmarks.md reads from them.

These are smoke tests of the harnesses, not speed checks: speed goals are measured by running the scripts
(docs/benchmarks.md), never asserted in tests on a shared machine.
"""

import json

import jax
import jax.numpy as jnp
import pytest

from rnnjax.bench import __main__ as bench_main
from rnnjax.bench import breakdown, cells, helper_start, longseq, parallel_scan, timing


@pytest.mark.parametrize(
    "kinds, peers",
    [
        ("lstm", "rnnjax,torch,cudnn"),
        pytest.param("lstm,gru", "rnnjax,flax.linen,flax.nnx,equinox,torch,cudnn", marks=pytest.mark.slow),
    ],
    ids=["lstm-rnnjax-torch", "every-peer"],
)
def test_peer_benchmark_quick_run_writes_a_record(tmp_path, capsys, kinds, peers):
    out = tmp_path / "peers.json"
    bench_main.main(["--quick", "--kinds", kinds, "--peers", peers, "--out", str(out)])
    record = json.loads(out.read_text())
    assert {"device", "date", "versions", "cpu"} <= set(record["environment"])
    assert record["environment"]["versions"]["jax"]
    kinds_run = [entry["problem"]["kind"] for entry in record["results"]]
    assert kinds_run == kinds.split(",")
    for entry in record["results"]:
        measured = {r["peer"]: r for r in entry["records"] if "train_s" in r}
        assert "rnnjax" in measured
        assert measured["rnnjax"]["train_ratio"] == pytest.approx(1.0)
        for r in measured.values():
            assert r["train_s"] > 0 and r["forward_s"] > 0 and r["stream_us_per_token"] > 0
    table = capsys.readouterr().out
    assert "| rnnjax |" in table and "×rnnjax" in table


def test_peer_benchmark_rejects_unknown_peers_and_kinds(capsys):
    with pytest.raises(SystemExit):
        bench_main.parse_args(["--peers", "rnnjax,keras"])
    assert "--peers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_main.parse_args(["--kinds", "transformer"])
    assert "--kinds" in capsys.readouterr().err


def test_cell_benchmark_quick_run_times_each_cell_and_length(tmp_path, capsys):
    out = tmp_path / "cells.json"
    cells.main(["--quick", "--cells", "lstm,mingru", "--out", str(out)])
    record = json.loads(out.read_text())
    sequence = [(r["cell"], r["T"]) for r in record["records"] if r["kind"] == "sequence"]
    assert sorted(sequence) == [("lstm", 16), ("lstm", 64), ("mingru", 16), ("mingru", 64)]
    for r in record["records"]:
        if r["kind"] == "sequence":
            assert r["train_s"] > 0 and r["forward_s"] > 0 and r["compile_s"] > 0
        else:
            assert r["step_s"] > 0 and r["carry_bytes"] == 16 * 4 * (2 if r["cell"] == "lstm" else 1)
    assert "| mingru |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cells.main(["--cells", "lstm,nosuchcell"])
    assert "nosuchcell" in capsys.readouterr().err


def test_long_sequence_benchmark_quick_compile_only(tmp_path):
    out = tmp_path / "longseq.json"
    longseq.main(["--quick", "--no-run", "--out", str(out)])
    record = json.loads(out.read_text())
    memory = {str(row["remat"]): row["memory_bytes"] for row in record["memory"]}
    if memory["False"] is not None:  # the CPU backend reports XLA's estimate
        assert memory["True"] < memory["False"]  # checkpointing every step keeps less than keeping everything
    assert [row["T"] for row in record["compile"]] == [16, 64]
    assert all(row["compile_s"] > 0 for row in record["compile"])


@pytest.mark.slow
def test_parallel_cell_sweep_at_one_short_length():
    rows = parallel_scan.sweep((16,), repeats=1, torch_threads=(1,), max_torch_t=0, max_seconds=60.0)
    assert [row["T"] for row in rows] == [16]
    results = rows[0]["results"]
    assert {"mingru", "minlstm", "lru", "gru", "lstm", "floor", "scan_sequential"} <= set(results)
    assert all(r["wall_s"] > 0 for r in results.values())


def test_breakdown_runs_every_part_and_the_unroll_sweep(tmp_path):
    out = tmp_path / "breakdown.json"
    args = ["--batch", "2", "--time", "8", "--inputs", "3", "--hidden", "4", "--repeats", "1", "--unroll", "1,2"]
    record = breakdown.main([*args, "--out", str(out)])
    assert {"scan_matmul", "scan_lstm", "scan_hoisted", "rnnjax", "one_matmul", "gates_all"} <= set(record["parts_ms"])
    assert [row["unroll"] for row in record["unroll"]] == [1, 2]
    assert json.loads(out.read_text())["parts_ms"] == pytest.approx(record["parts_ms"])
    with pytest.raises(SystemExit):
        breakdown.main(["--unroll", "1,x"])


def test_interleaved_samples_take_turns_and_honour_per_callable_counts():
    calls = []
    contenders = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    samples = timing.interleaved_samples(contenders, {"a": 3, "b": 1}, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "a"]  # warm-up, then round by round; b sits out after its one
    assert [len(samples[name].wall) for name in "ab"] == [3, 1] and len(samples["a"].cpu) == 3
    medians = timing.interleaved_medians(contenders, repeats=2, warmup=0)
    assert set(medians) == {"a", "b"} and all(seconds >= 0 for seconds in medians.values())


def test_per_call_seconds_times_short_calls_in_batches():
    add = jax.jit(lambda x: x + 1.0)
    assert timing.per_call_seconds(add, jnp.ones(3), repeats=2, min_seconds=0.01) > 0


def test_helper_start_prints_both_settings(capsys):
    helper_start.main(["--calls", "2", "--pause", "0.01", "--batch", "4", "--time", "8", "--hidden", "16"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pause")]
    assert [line.split(":")[0] for line in lines] == ["pause 0.0", "pause 0.01"]
    assert all(len(line.split(":")[1].split("(")[0].split()) == 2 for line in lines)  # two timed calls each
