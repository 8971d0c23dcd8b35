"""Data parallelism: a mesh over 4 (simulated) CPU devices trains to the same parameters as one device."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from rnnjax import models, train
from rnnjax.train import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = dict(
    task_options={"seq_len": 10, "eval_size": 32},
    cell="gru",
    hidden_size=8,
    dropout=0.1,
    batch_size=16,
    steps=25,
    seed=5,
    optimizer={"learning_rate": 1e-2, "warmup_steps": 5, "decay_steps": 20},
)


def run_config():
    return train.RunConfig.from_dict(CONFIG)


def flat_params(params):
    return {
        jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }


SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_sharding import run_config, flat_params
    from rnnjax import train
    from rnnjax.train import sharding

    assert jax.device_count() == 4, jax.devices()
    mesh = sharding.make_mesh()
    batch = sharding.shard_batch(run_config().build_task().train_batch(0, 16), mesh)
    assert len(batch.inputs.addressable_shards) == 4
    assert {{s.data.shape for s in batch.inputs.addressable_shards}} == {{(4, 10, 2)}}
    try:
        sharding.shard_batch(run_config().build_task().train_batch(0, 6), mesh)
        raise AssertionError("a batch of 6 rows cannot be split over 4 devices")
    except ValueError as error:
        assert "multiple of the 4 devices" in str(error)
    result = train.run(run_config(), data_parallel=True, log_every=5)
    params = result.state.params
    assert all(leaf.sharding.is_fully_replicated and len(leaf.devices()) == 4 for leaf in jax.tree.leaves(params))
    np.savez({out!r}, **flat_params(params))
    """
)


def test_four_devices_match_one_device(tmp_path):
    out = tmp_path / "params.npz"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": ROOT,
    }
    script = SCRIPT.format(tests=os.path.join(ROOT, "tests"), out=str(out))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    four = dict(np.load(out))
    one = flat_params(train.run(run_config(), log_every=5).state.params)
    assert sorted(four) == sorted(one)
    for name in one:
        np.testing.assert_allclose(four[name], one[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_one_device_mesh_is_the_plain_path():
    """The sharded code path on a 1-device mesh gives the unsharded numbers (with truncated BPTT's carry too)."""
    from test_train import Echo

    task = Echo(seq_len=12, eval_size=64)  # the configuration of test_train.py's truncated-BPTT test
    model = models.build_model(task, "gru", 8)
    options = dict(steps=5, batch_size=8, tbptt=4, optimizer=train.OptimizerConfig(learning_rate=5e-2))
    plain = train.fit(model, task, **options)
    meshed = train.fit(model, task, mesh=sharding.make_mesh(), **options)
    expected, got = train.host_state(plain.state), train.host_state(meshed.state)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_replicate_and_shard_helpers():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == (sharding.DATA_AXIS,) and mesh.size == jax.device_count()
    tree = {"w": np.ones((3, 2), np.float32), "key": jax.random.key(0)}
    placed = sharding.replicate(tree, mesh)
    assert placed["w"].sharding.is_fully_replicated
    assert jax.random.key_impl(placed["key"]) == jax.random.key_impl(tree["key"])
    rows = sharding.shard_batch({"x": np.arange(8.0).reshape(4, 2)}, mesh)
    np.testing.assert_array_equal(rows["x"], np.arange(8.0).reshape(4, 2))
