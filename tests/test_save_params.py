"""``--save-params`` writes flat, documented names (``core/w_ih``) that ``checkpoint.load_npz`` maps back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax import checkpoint, train
from rnnjax.__main__ import main as cli_main


def test_cli_save_params_names_map_back_to_the_parameter_tree(tmp_path, capsys):
    path = tmp_path / "params.npz"
    args = [
        "train", "--task", "adding", "--task-opt", "seq_len=6", "--task-opt", "eval_size=20", "--cell", "lstm",
        "--hidden", "4", "--layers", "2", "--steps", "2", "--batch-size", "4", "--no-progress",
        "--ckpt-dir", str(tmp_path / "run"), "--save-params", str(path),
    ]  # fmt: skip
    assert cli_main(args) == 0
    capsys.readouterr()
    with np.load(path) as data:
        names = sorted(data.files)
    layer = ["b", "w_hh", "w_ih"]
    assert names == [f"core/layers/{i}/{n}" for i in (0, 1) for n in layer] + ["head/b", "head/w"]
    params = train.restore_run(tmp_path / "run").state.params  # the tree the names come from
    loaded = checkpoint.load_npz(path, like=params)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(got, np.asarray(want))
    nested = checkpoint.load_npz(path)  # without a template: dicts, and lists for the layers
    np.testing.assert_array_equal(nested["core"]["layers"][1]["w_ih"], np.asarray(params["core"]["layers"][1]["w_ih"]))


def test_flat_names_and_mismatches():
    tree = {"core": {"w_ih": jnp.ones((2, 3)), "cells": [jnp.zeros(2), jnp.ones(1)]}, "key": jax.random.key(1)}
    flat = checkpoint.flat_arrays(tree)
    assert sorted(flat) == ["core/cells/0", "core/cells/1", "core/w_ih", "key"]
    assert flat["key"].dtype == np.uint32  # typed keys as their key data
    with pytest.raises(ValueError, match="contains '/'"):
        checkpoint.flat_arrays({"a/b": jnp.zeros(1)})


def test_load_npz_names_what_differs(tmp_path):
    path = tmp_path / "p.npz"
    checkpoint.save_npz(path, {"core": {"w": np.zeros((2, 3)), "b": np.zeros(3)}})
    assert path.exists() and not (tmp_path / "p.npz.npz").exists()
    with pytest.raises(ValueError, match=r"missing \['core/u'\], unexpected \['core/b'\]"):
        checkpoint.load_npz(path, like={"core": {"w": np.zeros((2, 3)), "u": np.zeros(3)}})
    with pytest.raises(ValueError, match=r"core/w: \(2, 3\) in the file, \(3, 2\) in like"):
        checkpoint.load_npz(path, like={"core": {"w": np.zeros((3, 2)), "b": np.zeros(3)}})
