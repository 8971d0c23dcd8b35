"""Exported programs (rnnjax.export) against the models they came from: StableHLO, ONNX and the CLI.

Given a small model with random weights, When its step or sequence program is exported, reloaded and run,
Then states and outputs equal the model's own ``step`` / ``apply_with_carry`` / ``apply`` to 1e-5.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax import GRU, LSTM, MinGRU, export

pytest.importorskip("flatbuffers", reason="jax.export serialisation needs flatbuffers")
from rnnjax.attention import Transformer
from rnnjax.models import SequenceModel

V, H, B, T, L = 11, 8, 3, 7, 12
TOL = 1e-5
LENGTHS = np.array([7, 3, 1], np.int32)
CELLS = {"lstm": LSTM, "gru": GRU, "mingru": MinGRU}


def make_model(name: str, *, head: str = "per_step"):
    if name == "transformer":
        return Transformer(vocab_size=V, output_size=V, d_model=8, num_heads=2, num_layers=2, head=head)
    return SequenceModel(core=CELLS[name](hidden_size=H), vocab_size=V, embed_size=6, output_size=V, head=head)


@functools.cache
def model_and_params(name: str, head: str = "per_step"):
    """A model and its parameters, made once per test module (initialisation compiles)."""
    model = make_model(name, head=head)
    return model, jax.jit(model.init)(jax.random.key(0))


def tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


def reference_stream(model, params, xs):
    """The model's own step over ``xs`` ``(steps, B)``: final state (as export names it) and every output."""
    state = model.init_cache(xs.shape[1], L) if isinstance(model, Transformer) else model.initial_carry(xs.shape[1])
    ys = []
    step = jax.jit(model.step)
    for x in xs:
        state, y = step(params, state, jnp.asarray(x))
        ys.append(y)
    names = export._state_layout(model, L)[0]
    return dict(zip(names, jax.tree.leaves(state))), np.stack(ys)


def reference_sequence(model, params, x, lengths):
    if isinstance(model, Transformer):
        return {}, model.apply(params, x, lengths=lengths)
    carry, y = model.apply_with_carry(params, x, None, lengths=lengths)
    return dict(zip(export._state_layout(model, None)[0], jax.tree.leaves(carry))), y


def run_stream(step, model, xs):
    state = export.initial_state(model, xs.shape[1], max_len=L)
    ys = []
    for x in xs:
        state, y = step(state, x)
        ys.append(np.asarray(y))
    return state, np.stack(ys)


def assert_close(got_state, got_y, want_state, want_y):
    assert sorted(got_state) == sorted(want_state)
    for name in want_state:
        np.testing.assert_allclose(np.asarray(got_state[name]), np.asarray(want_state[name]), atol=TOL, err_msg=name)
    np.testing.assert_allclose(np.asarray(got_y), np.asarray(want_y), atol=TOL)


# StableHLO.


SLOW_TRANSFORMER = pytest.param("transformer", marks=pytest.mark.slow)  # about 5 s: two layers traced per shape


@pytest.mark.parametrize("name", ["lstm", "gru", "mingru", SLOW_TRANSFORMER])
def test_stablehlo_step_round_trip_any_batch(name):
    model, params = model_and_params(name)
    step = export.load_stablehlo(export.export_stablehlo(model, params, "step", max_len=L))
    for batch in (1, B):  # one artifact, symbolic batch
        xs = tokens((4, batch), seed=batch)
        assert_close(*run_stream(step, model, xs), *reference_stream(model, params, xs))


@pytest.mark.parametrize("name", ["lstm", "gru", SLOW_TRANSFORMER])
@pytest.mark.parametrize("head", ["per_step", "last"])
def test_stablehlo_sequence_round_trip_variable_lengths(name, head):
    model, params = model_and_params(name, head=head)
    sequence = export.load_stablehlo(export.export_stablehlo(model, params, "sequence"))
    for time in (T, 4):  # symbolic time
        x, lengths = tokens((B, time)), np.minimum(LENGTHS, time)
        assert_close(*sequence(x, lengths), *reference_sequence(model, params, x, lengths))


def test_stablehlo_mingru_sequence_needs_fixed_time_or_stepped_path():
    model, params = model_and_params("mingru")
    with pytest.raises(ValueError, match="symbolic time axis"):
        export.export_stablehlo(model, params, "sequence")
    x = tokens((B, T))
    want = reference_sequence(model, params, x, LENGTHS)
    fixed = export.load_stablehlo(export.export_stablehlo(model, params, "sequence", time=T))
    assert_close(*fixed(x, LENGTHS), *want)
    stepped = export.load_stablehlo(export.export_stablehlo(model, params, "sequence", sequence_path="stepped"))
    assert_close(*stepped(x, LENGTHS), *want)


def test_stablehlo_float_inputs_last_head(key):
    model = SequenceModel(core=GRU(hidden_size=H), input_size=3, output_size=2, head="last")
    params = model.init(key)
    xs = np.random.default_rng(1).normal(size=(B, T, 3)).astype(np.float32)
    sequence = export.load_stablehlo(export.export_stablehlo(model, params, "sequence", batch_size=B, time=T))
    assert_close(*sequence(xs, LENGTHS), *reference_sequence(model, params, xs, LENGTHS))
    step = export.load_stablehlo(export.export_stablehlo(model, params, "step"))
    state, y = step(export.initial_state(model, B), xs[:, 0])
    _, want = model.step(params, model.initial_carry(B), xs[:, 0])
    np.testing.assert_allclose(y, want, atol=TOL)


def test_stablehlo_lengths_are_clipped_not_checked():
    model, params = model_and_params("gru")
    sequence = export.load_stablehlo(export.export_stablehlo(model, params, "sequence"))
    x = tokens((B, T))
    got = sequence(x, np.array([T + 5, -2, 3], np.int32))
    assert_close(*got, *reference_sequence(model, params, x, np.array([T, 0, 3], np.int32)))


def test_stablehlo_runs_in_a_process_without_rnnjax(tmp_path):
    model, params = model_and_params("lstm")
    (tmp_path / "step.bin").write_bytes(export.export_stablehlo(model, params, "step"))
    state = export.initial_state(model, B)
    x = tokens((B,))
    np.savez(tmp_path / "inputs.npz", x=x, **{f"state.{k}": v for k, v in state.items()})
    script = textwrap.dedent(
        """
        import sys, numpy as np, jax
        step = jax.export.deserialize(bytearray(open("step.bin", "rb").read())).call
        inputs = np.load("inputs.npz")
        state = {k.removeprefix("state."): inputs[k] for k in inputs.files if k.startswith("state.")}
        state, y = step(state, inputs["x"])
        state, y = step(state, inputs["x"])
        assert not any(m == "rnnjax" or m.startswith("rnnjax.") for m in sys.modules), "rnnjax was imported"
        np.savez("outputs.npz", y=np.asarray(y), **{k: np.asarray(v) for k, v in state.items()})
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, env=env, timeout=120)
    outputs = np.load(tmp_path / "outputs.npz")
    want_state, want_ys = reference_stream(model, params, np.stack([x, x]))
    assert_close({k: outputs[k] for k in want_state}, outputs["y"], want_state, want_ys[-1])


def test_export_rejects_bad_arguments():
    model, params = model_and_params("gru")
    with pytest.raises(ValueError, match="kind"):
        export.export_stablehlo(model, params, "whole")
    with pytest.raises(TypeError, match="SequenceModel or a Transformer"):
        export.export_stablehlo(GRU(hidden_size=4), params)


# ONNX (jax2onnx converts, onnxruntime runs). Marked slow: importing jax2onnx's plugins takes about 15 s.


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lstm", "gru", "mingru", "transformer"])
def test_onnx_step_round_trip(name, tmp_path):
    pytest.importorskip("jax2onnx")
    pytest.importorskip("onnxruntime")
    model, params = model_and_params(name)
    path = export.export_onnx(model, params, tmp_path / "step.onnx", "step", max_len=L)
    step = export.onnx_callable(path)
    for batch in (1, B):  # dynamic batch
        xs = tokens((4, batch), seed=batch)
        assert_close(*run_stream(step, model, xs), *reference_stream(model, params, xs))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lstm", "gru", "mingru"])
@pytest.mark.parametrize("head", ["per_step", "last"])
def test_onnx_sequence_round_trip_variable_lengths(name, head, tmp_path):
    pytest.importorskip("jax2onnx")
    pytest.importorskip("onnxruntime")
    model, params = model_and_params(name, head=head)
    sequence = export.onnx_callable(export.export_onnx(model, params, tmp_path / "seq.onnx", "sequence"))
    for time in (T, 4):  # dynamic time
        x, lengths = tokens((B, time)), np.minimum(LENGTHS, time)
        assert_close(*sequence(x, lengths), *reference_sequence(model, params, x, lengths))


@pytest.mark.slow
def test_onnx_transformer_sequence_needs_fixed_time(tmp_path):
    pytest.importorskip("jax2onnx")
    pytest.importorskip("onnxruntime")
    model, params = model_and_params("transformer", head="last")
    with pytest.raises(ValueError, match="time=T"):
        export.export_onnx(model, params, tmp_path / "seq.onnx", "sequence")
    sequence = export.onnx_callable(export.export_onnx(model, params, tmp_path / "seq.onnx", "sequence", time=T))
    x = tokens((B, T))
    assert_close(*sequence(x, LENGTHS), *reference_sequence(model, params, x, LENGTHS))


# The CLI on a tiny trained run.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from rnnjax.train import RunConfig, run

    directory = tmp_path_factory.mktemp("run") / "adding-gru"
    config = RunConfig(task="adding", task_options={"seq_len": 6}, cell="gru", hidden_size=8, batch_size=4, steps=2)
    run(config, ckpt_dir=str(directory), progress=False)
    return str(directory)


@pytest.mark.parametrize("what", ["step", "sequence"])
def test_cli_exports_a_trained_run_as_stablehlo(tiny_run, what, tmp_path, capsys):
    from rnnjax.__main__ import main
    from rnnjax.train import restore_run

    out = tmp_path / f"{what}.stablehlo"
    assert main(["export", "--run-dir", tiny_run, "--format", "stablehlo", "--what", what, "--out", str(out)]) == 0
    assert "adding run" in capsys.readouterr().err
    restored = restore_run(tiny_run)
    model, params = restored.model, restored.state.params
    program = export.load_stablehlo(out.read_bytes())
    xs = np.random.default_rng(0).uniform(size=(B, 6, 2)).astype(np.float32)
    if what == "step":
        _, y = program(export.initial_state(model, B), xs[:, 0])
        np.testing.assert_allclose(y, model.step(params, model.initial_carry(B), xs[:, 0])[1], atol=TOL)
    else:
        lengths = np.array([6, 2, 4], np.int32)
        assert_close(*program(xs, lengths), *reference_sequence(model, params, xs, lengths))


@pytest.mark.slow
def test_cli_exports_a_trained_run_as_onnx(tiny_run, tmp_path):
    pytest.importorskip("jax2onnx")
    from rnnjax.__main__ import main
    from rnnjax.train import restore_run

    out = tmp_path / "step.onnx"
    assert main(["export", "--run-dir", tiny_run, "--format", "onnx", "--what", "step", "--out", str(out)]) == 0
    restored = restore_run(tiny_run)
    x = np.random.default_rng(0).uniform(size=(B, 2)).astype(np.float32)
    _, y = export.onnx_callable(out)(export.initial_state(restored.model, B), x)
    _, want = restored.model.step(restored.state.params, restored.model.initial_carry(B), x)
    np.testing.assert_allclose(y, want, atol=TOL)


def test_cli_errors_exit_2(tmp_path, capsys):
    from rnnjax.__main__ import main

    args = ["export", "--run-dir", str(tmp_path / "none"), "--format", "stablehlo", "--out", str(tmp_path / "x")]
    assert main(args) == 2
    assert "rnnjax export: error: no checkpoint directory" in capsys.readouterr().err
    assert main([*args[:-2], "--time", "0", "--out", str(tmp_path / "x")]) == 2


def test_initial_state_names_and_shapes():
    lstm = make_model("lstm")
    assert {k: v.shape for k, v in export.initial_state(lstm, 2).items()} == {"h": (2, H), "c": (2, H)}
    cache = export.initial_state(make_model("transformer"), 2, max_len=5)
    assert {k: v.shape for k, v in cache.items()} == {"k": (2, 2, 5, 2, 4), "v": (2, 2, 5, 2, 4), "pos": (2,)}
    assert cache["pos"].dtype == np.int32
    json.dumps(sorted(cache))  # plain names
