"""The experiment scripts behind notebooks 3, 6 and 7 run end to end at a tiny size and write what they promise."""

import csv
import pathlib

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from experiments import gradient_flow, hopfield_capacity, streaming_latency  # noqa: E402


def read_csv(path: pathlib.Path) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_hopfield_capacity_tiny_run_writes_the_documented_csv(tmp_path):
    out = tmp_path / "hopfield"
    hopfield_capacity.main(["--tiny", "--out", str(out)])
    for name in ("hopfield.csv", "hopfield_detail.csv", "hopfield.md", "hopfield_capacity.png"):
        assert (out / name).stat().st_size > 0, name
    rows = read_csv(out / "hopfield.csv")
    assert list(rows[0]) == ["N", "load", "overlap"]
    sizes = sorted({int(r["N"]) for r in rows})
    assert sizes == [50, 100]  # several N, as the tiny preset asks
    overlaps = {(int(r["N"]), float(r["load"])): float(r["overlap"]) for r in rows}
    assert all(-1.0 <= v <= 1.0 for v in overlaps.values())
    # Far below the critical load 0.138 stored patterns are recalled almost perfectly; far above it they are not.
    assert overlaps[(100, 0.05)] > 0.95
    assert overlaps[(100, 0.3)] < overlaps[(100, 0.05)] - 0.1


def test_gradient_flow_tiny_run_shows_vanishing_and_exploding_gradients(tmp_path):
    out = tmp_path / "gradient_flow"
    gradient_flow.main(["--tiny", "--out", str(out)])
    for name in ("gradient_flow.csv", "gradient_summary.csv", "gradient_flow.md", "gradient_flow.png"):
        assert (out / name).stat().st_size > 0, name
    curves = read_csv(out / "gradient_flow.csv")
    assert list(curves[0]) == ["model", "inputs", "distance", "relative_norm"]

    def far(model, inputs="small (x0.1)"):  # relative norm at the largest distance (T - 1 = 11 steps back)
        points = [r for r in curves if r["model"] == model and r["inputs"] == inputs]
        return float(max(points, key=lambda r: int(r["distance"]))["relative_norm"])

    # Small inputs keep tanh near linear: the norm follows the spectral radius (0.5^11 ~ 5e-4, 1.5^11 ~ 86).
    assert far("tanh rho=0.5") < 1e-2
    assert far("tanh rho=1.5") > 1.0
    summary = {(r["model"], r["inputs"]): r for r in read_csv(out / "gradient_summary.csv")}
    row = summary[("tanh rho=0.5", "small (x0.1)")]
    # Pascanu et al. (2013): ||dL/ds_0|| / ||dL/ds_T|| <= sigma_max^(T-1) for a tanh RNN.
    assert float(row["back_T-1"]) <= float(row["pascanu_bound_T-1"]) * (1 + 1e-6)
    assert np.isclose(float(row["sigma_max"]), 0.5, rtol=1e-4)


def test_streaming_latency_tiny_run(tmp_path):
    out = tmp_path / "streaming"
    rows = streaming_latency.main(["--tiny", "--out", str(out)])
    for name in ("streaming_latency.csv", "streaming_latency.md", "streaming_latency.png"):
        assert (out / name).stat().st_size > 0, name
    table = read_csv(out / "streaming_latency.csv")
    assert list(table[0]) == ["model", "params", "context", "seconds_per_token", "state_bytes"]
    assert {(r["model"], int(r["context"])) for r in table} == {(m, c) for m in ("gru", "transformer") for c in (4, 32)}
    assert all(float(r["seconds_per_token"]) > 0 for r in table)
    carried = {(r["model"], r["context"]): r["state_bytes"] for r in rows}
    # The GRU's state does not grow with the context; the transformer's cache grows with every position.
    assert carried[("gru", 4)] == carried[("gru", 32)]
    assert carried[("transformer", 32)] > carried[("transformer", 4)]


def test_streaming_latency_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        streaming_latency.parse_args(["--models", "lstm,nonsense"])
    assert "--models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        streaming_latency.parse_args(["--contexts", "4,x"])
    assert "--contexts" in capsys.readouterr().err
