"""Sequence parallelism: time sharded over 4 (simulated) CPU devices gives the one-device values and gradients.

The 4-device grid runs once, in a subprocess started with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
(the flag must be set before JAX starts); each case is then one test here. Argument errors and the one-device
mesh run in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import rnnjax
from rnnjax import linear_recurrence, sequence_parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = dict(rtol=1e-5, atol=1e-5)

CELLS = {
    "mingru": lambda: rnnjax.MinGRU(hidden_size=4),
    "minlstm": lambda: rnnjax.MinLSTM(hidden_size=4, activation="identity"),
    "lru": lambda: rnnjax.LRU(hidden_size=4, model_size=3, r_min=0.9, r_max=0.999),  # long memory, complex state
}
# (cell, T, lengths or None, reverse). On 4 devices T=14 is padded to 16 (4 steps a shard): the row of length 3
# ends inside the first shard, the row of length 0 never leaves its initial carry.
UNROLL_CASES = {
    "mingru-lengths": ("mingru", 14, [14, 3, 0], False),
    "minlstm-lengths": ("minlstm", 14, [14, 3, 0], False),
    "lru-lengths": ("lru", 14, [14, 3, 0], False),
    "mingru-reverse-lengths": ("mingru", 16, [16, 3, 0], True),
    "lru-reverse": ("lru", 16, None, True),
}
SCAN_CASES = ("complex-invariant-mask-associative", "real-lengths-sequential")


def _weights(tree, seed):
    """Fixed random weights shaped like ``tree``, for a loss whose gradients are O(1)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, leaf.shape, jnp.float32).astype(leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def _weighted_sum(tree, weights):
    return sum(jnp.real(jnp.sum(leaf * w)) for leaf, w in zip(jax.tree.leaves(tree), jax.tree.leaves(weights)))


def _check_close(name, got, want):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves), name
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        assert g.shape == w.shape, f"{name}[{i}]: {g.shape} != {w.shape}"
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg=f"{name}[{i}]", **TOL)


def compare_unroll(case: str, mesh: Mesh) -> dict:
    """Values, final carry and gradients (params, xs, carry) of :func:`sequence_parallel.unroll` on ``mesh``
    against :func:`rnnjax.unroll` on one device; raises on a mismatch, returns facts about the sharded run."""
    name, T, lengths, reverse = UNROLL_CASES[case]
    cell = CELLS[name]()
    params = cell.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (3, T, 3))  # (B, T, I)
    carry = _weights(cell.initial_carry((3,)), 2)  # a non-zero initial state: h_in of shard 0 matters
    lengths = None if lengths is None else jnp.array(lengths)
    out_weights = _weights(jax.eval_shape(lambda: rnnjax.unroll(cell, params, xs, carry)), 3)

    def loss(run, params, xs, carry):
        out = run(params, xs, carry)
        return _weighted_sum(out, out_weights), out

    def one(params, xs, carry):
        return rnnjax.unroll(cell, params, xs, carry, lengths=lengths, reverse=reverse)

    def sharded(params, xs, carry):
        return sequence_parallel.unroll(cell, params, xs, mesh, carry, lengths=lengths, reverse=reverse)

    grad = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)
    (_, want), want_grads = grad(one, params, xs, carry)
    run = jax.jit(lambda *args: grad(sharded, *args))
    (_, got), got_grads = run(params, xs, carry)
    _check_close(f"{case} values", got, want)
    _check_close(f"{case} gradients", got_grads, want_grads)
    hlo = jax.jit(sharded).lower(params, xs, carry).as_text()
    return {"devices": len(got[1].sharding.device_set), "all_gather": "all_gather" in hlo or "all-gather" in hlo}


def compare_scan(case: str, mesh: Mesh) -> dict:
    """:func:`sequence_parallel.linear_scan` against the one-device solvers, values and gradients."""
    keys = jax.random.split(jax.random.key(4), 4)
    T, B, N = 14, 3, 2
    if case == "complex-invariant-mask-associative":  # a time-invariant (N,) complex a, an explicit mask
        a = jnp.exp(jax.lax.complex(jnp.full((N,), -0.05), jnp.array([0.3, 1.0])))  # |a| ≈ 0.95
        b = jax.lax.complex(jax.random.normal(keys[0], (T, B, N)), jax.random.normal(keys[1], (T, B, N)))
        h0 = jax.lax.complex(jnp.ones((B, N)), -jnp.ones((B, N)))
        mask = jax.random.bernoulli(keys[2], 0.7, (T, B))
        options = dict(mask=mask, method="associative")

        def reference(a, b, h0):
            return linear_recurrence.masked_linear_scan(a, b, h0, mask, "sequential")
    else:  # time-varying a, lengths
        a = jax.random.uniform(keys[0], (T, B, N), minval=0.3, maxval=1.0)
        b = jax.random.normal(keys[1], (T, B, N))
        h0 = jax.random.normal(keys[2], (B, N))
        lengths = jnp.array([14, 3, 0])
        options = dict(lengths=lengths, method="sequential")

        def reference(a, b, h0):
            return linear_recurrence.linear_scan(a, b, h0, lengths=lengths, method="associative")

    weights = _weights((h0, b), 5)

    def loss(run, a, b, h0):
        out = run(a, b, h0)
        return _weighted_sum(out, weights), out

    def sharded(a, b, h0):
        return sequence_parallel.linear_scan(a, b, h0, mesh=mesh, **options)

    grad = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)
    (_, want), want_grads = grad(reference, a, b, h0)
    (_, got), got_grads = jax.jit(lambda *args: grad(sharded, *args))(a, b, h0)
    _check_close(f"{case} values", got, want)
    _check_close(f"{case} gradients", got_grads, want_grads)
    return {"devices": len(got[1].sharding.device_set)}


SCRIPT = textwrap.dedent(
    """
    import json, sys, traceback
    import jax
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    sys.path.insert(0, {tests!r})
    import test_sequence_parallel as t

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("time",))
    results = {{}}
    for case in t.UNROLL_CASES:
        try:
            results[case] = t.compare_unroll(case, mesh)
        except Exception:
            results[case] = traceback.format_exc(limit=-3)
    for case in t.SCAN_CASES:
        try:
            results[case] = t.compare_scan(case, mesh)
        except Exception:
            results[case] = traceback.format_exc(limit=-3)
    with open({out!r}, "w") as f:
        json.dump(results, f)
    """
)


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    """Runs every case on 4 forced CPU devices once; ``case -> facts`` (a dict) or a traceback (a str)."""
    out = tmp_path_factory.mktemp("sequence_parallel") / "results.json"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": ROOT,
    }
    script = SCRIPT.format(tests=os.path.join(ROOT, "tests"), out=str(out))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", list(UNROLL_CASES))
def test_unroll_on_four_devices_matches_one_device(four_devices, case):
    """Given a linear cell and 4 devices, when time is sharded, then values and gradients equal one device's."""
    result = four_devices[case]
    assert isinstance(result, dict), result
    assert result["devices"] == 4  # the outputs really are spread over the 4 devices
    assert result["all_gather"]  # and the shards exchange their summaries


@pytest.mark.slow
@pytest.mark.parametrize("case", SCAN_CASES)
def test_linear_scan_on_four_devices_matches_one_device(four_devices, case):
    result = four_devices[case]
    assert isinstance(result, dict), result
    assert result["devices"] == 4


def one_device_mesh(names=("time",)):
    return Mesh(np.asarray(jax.devices()[:1]).reshape((1,) * len(names)), names)


@pytest.mark.slow
def test_one_device_mesh_matches_unroll():
    compare_unroll("mingru-lengths", one_device_mesh())


@pytest.mark.parametrize("time_major", [False, True])
def test_empty_sequences_keep_the_callers_layout(time_major):
    # Given no time steps, batch-major (B=2, T=0) or time-major
    cell = CELLS["mingru"]()
    params = cell.init(jax.random.key(0), input_size=3)
    xs = jnp.ones((0, 2, 3) if time_major else (2, 0, 3))
    # Then the outputs are empty in the layout of xs, as unroll gives them, and the carry is the initial one
    carry, ys = sequence_parallel.unroll(cell, params, xs, one_device_mesh(), time_major=time_major)
    expected_carry, expected_ys = rnnjax.unroll(cell, params, xs, time_major=time_major)
    assert ys.shape == expected_ys.shape == ((0, 2, 4) if time_major else (2, 0, 4))
    _check_close("empty", carry, expected_carry)


@pytest.mark.parametrize("method", ["log", "pallas"])
def test_a_cells_unsharded_solver_falls_back_to_one_that_shards(method):
    # Given a minGRU whose own solver cannot run inside shard_map
    cell = rnnjax.MinGRU(hidden_size=4, method=method)
    params = cell.init(jax.random.key(0), input_size=3)
    xs = jax.random.normal(jax.random.key(1), (2, 6, 3))
    lengths = jnp.array([6, 2])
    # Then sequence_parallel.unroll solves with one that does, and gives unroll's numbers
    carry, ys = sequence_parallel.unroll(cell, params, xs, one_device_mesh(), lengths=lengths)
    expected_carry, expected_ys = rnnjax.unroll(cell, params, xs, lengths=lengths)
    _check_close("ys", ys, expected_ys)
    _check_close("carry", carry, expected_carry)


def test_explicit_mesh_axes_are_accepted():
    """``jax.make_mesh`` makes explicit axes by default; the scan runs on them as on automatic ones."""
    mesh = jax.make_mesh((1,), ("time",))
    h_last, hs = sequence_parallel.linear_scan(jnp.full((5, 2), 0.5), jnp.ones((5, 2)), mesh=mesh)
    np.testing.assert_allclose(hs[:, 0], [1.0, 1.5, 1.75, 1.875, 1.9375])
    np.testing.assert_allclose(h_last, [1.9375, 1.9375])


def test_cell_with_linear_methods_is_used():
    class Methods:
        def linear_coefficients(self, params, carry, xs):
            return "coefficients", params

        def linear_outputs(self, params, carry, h_last, hs, xs, mask):
            return "outputs", params

    form = sequence_parallel.linear_form(Methods())
    assert form.coefficients(Methods(), 1, None, None) == ("coefficients", 1)
    assert form.outputs(Methods(), 2, None, None, None, None, None) == ("outputs", 2)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda m, p, x: sequence_parallel.unroll(rnnjax.LSTM(hidden_size=4), p, x, m), TypeError, "cell: LSTM"),
        (lambda m, p, x: sequence_parallel.unroll(CELLS["mingru"](), p, x, "mesh"), TypeError, "mesh must be"),
        (lambda m, p, x: sequence_parallel.unroll(CELLS["mingru"](), p, x, m, axis_name="t"), ValueError, "axis_name"),
        (
            lambda m, p, x: sequence_parallel.unroll(CELLS["mingru"](), p, x, one_device_mesh(("data", "time"))),
            ValueError,
            "axis_name",
        ),
        (lambda m, p, x: sequence_parallel.unroll(CELLS["mingru"](), p, x[..., :2], m), ValueError, "xs"),
        (
            lambda m, p, x: sequence_parallel.unroll(CELLS["mingru"](), p, x, m, lengths=jnp.ones(3, int)),
            ValueError,
            "lengths",
        ),
        (lambda m, p, x: sequence_parallel.unroll(CELLS["mingru"](), p, x, m, method="fast"), ValueError, "method"),
        (
            lambda m, p, x: sequence_parallel.unroll(CELLS["mingru"](), p, x, m, method="log"),
            ValueError,
            "method='log'",
        ),
        (
            lambda m, p, x: sequence_parallel.unroll(CELLS["mingru"](), p, x, m, method="pallas"),
            ValueError,
            "method='pallas'",
        ),
        (lambda m, p, x: sequence_parallel.linear_scan(jnp.ones((4, 3)), jnp.ones((5, 2)), mesh=m), ValueError, "a of"),
        (
            lambda m, p, x: sequence_parallel.linear_scan(jnp.ones((5, 2)), jnp.ones((5, 2)), jnp.ones(3), mesh=m),
            ValueError,
            "h0",
        ),
        (
            lambda m, p, x: sequence_parallel.linear_scan(
                jnp.ones((5, 2)), jnp.ones((5, 2)), mesh=m, mask=jnp.ones(4, bool)
            ),
            ValueError,
            "mask",
        ),
        (
            lambda m, p, x: sequence_parallel.linear_scan(
                jnp.ones((5, 2)), jnp.ones((5, 2)), mesh=m, mask=jnp.ones(5, bool), lengths=jnp.array(5)
            ),
            ValueError,
            "lengths or mask",
        ),
    ],
)
def test_bad_arguments_are_named(call, error, words):
    cell = CELLS["mingru"]()
    params = cell.init(jax.random.key(0), 3)
    with pytest.raises(error, match=words):
        call(one_device_mesh(), params, jnp.ones((2, 8, 3)))


@pytest.mark.slow
def test_long_run_script_writes_its_tables(tmp_path):
    """experiments/sequence_parallel_run.py at a tiny T: the 4-device program agrees and needs less per device."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, os.path.join(ROOT, "experiments", "sequence_parallel_run.py")]
    done = subprocess.run(
        [*command, "--steps", "4096", "--repeats", "1", "--out", str(tmp_path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads((tmp_path / "sequence_parallel_run.json").read_text())["rows"]
    assert [row["devices"] for row in rows] == [1, 1, 4]
    assert rows[2]["xs_shard_shape"] == [1, 1024, 64]
    assert all(row["max_relative_difference"] < 1e-5 for row in rows)
    assert rows[2]["peak_bytes"] < rows[1]["peak_bytes"] / 2
    assert "| sequence_parallel, 4 devices | 4 |" in (tmp_path / "sequence_parallel_run.md").read_text()
