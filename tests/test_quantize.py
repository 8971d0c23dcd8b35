"""Weight-only int8 quantisation (rnnjax.quantize, through qwix).

Given a small token model, When its parameters are quantised, Then matrices are stored as int8 with float32
scales (about 4x fewer bytes), each weight is within half a scale step of the original, and the int8 streaming
step is the model's step on the dequantised weights and stays within a stated tolerance of float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax import GRU, LSTM, MinGRU
from rnnjax.attention import Transformer
from rnnjax.models import SequenceModel

qwix = pytest.importorskip("qwix")
from rnnjax import quantize  # noqa: E402  (after the skip: it needs qwix)

V, H, B = 40, 64, 3
CELLS = {"lstm": LSTM, "gru": GRU, "mingru": MinGRU}
STEP_TOLERANCE = 0.05
"""Stated bound on ``max |y_int8 - y_float32|`` (logits) over 8 streaming steps of these random-weight models;
measured 0.006 (LSTM), 0.011 (GRU), 0.022 (minGRU), 0.037 (transformer); docs/deployment.md gives trained
models' metric changes."""


@functools.cache
def model_and_params(name: str):
    if name == "transformer":
        model = Transformer(vocab_size=V, output_size=V, d_model=32, num_heads=2, num_layers=1, head="per_step")
    else:
        core = CELLS[name](hidden_size=H)
        model = SequenceModel(core=core, vocab_size=V, embed_size=32, output_size=V, head="per_step")
    return model, jax.jit(model.init)(jax.random.key(0))


def initial_state(model, batch):
    return model.init_cache(batch, 8) if isinstance(model, Transformer) else model.initial_carry(batch)


@pytest.mark.parametrize("name", ["lstm", "gru", "mingru"])
def test_matrices_are_stored_as_int8_about_four_times_smaller(name):
    _, params = model_and_params(name)
    qparams = quantize.quantize_params(params)
    leaves = jax.tree.leaves(qparams, is_leaf=lambda leaf: isinstance(leaf, qwix.QArray))
    quantized = [leaf for leaf in leaves if isinstance(leaf, qwix.QArray)]
    matrices = [leaf for leaf in jax.tree.leaves(params) if leaf.ndim >= 2]
    assert len(quantized) == len(matrices) >= 3  # embedding, recurrent weights, head
    assert all(leaf.qvalue.dtype == jnp.int8 and leaf.scale.dtype == jnp.float32 for leaf in quantized)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves if not isinstance(leaf, qwix.QArray))  # biases
    ratio = quantize.param_bytes(params) / quantize.param_bytes(qparams)
    assert 3.3 < ratio < 4.0  # float32 biases and one float32 scale per channel stay


def test_each_weight_within_half_a_scale_step():
    _, params = model_and_params("lstm")
    qparams = quantize.quantize_params(params)
    restored = quantize.dequantize_params(qparams)
    for path, original in jax.tree_util.tree_leaves_with_path(params):
        back = functools.reduce(lambda tree, key: tree[key.key], path, restored)
        q = functools.reduce(lambda tree, key: tree[key.key], path, qparams)
        if original.ndim < 2:
            np.testing.assert_array_equal(back, original)
            continue
        assert q.scale.shape == ((original.shape[0], 1) if path[-1].key == "embed" else (1, original.shape[1]))
        error = np.abs(np.asarray(back) - np.asarray(original))
        assert np.all(error <= np.asarray(q.scale) * (0.5 + 1e-4))
        assert np.max(np.abs(q.qvalue)) == 127  # absmax: each channel's largest weight maps to +-127


@pytest.mark.parametrize("name", ["lstm", "gru", "mingru", "transformer"])
def test_quantized_step_close_to_float32(name):
    model, params = model_and_params(name)
    qparams = quantize.quantize_params(params)
    step_int8 = quantize.quantized_step(model)
    step_fp32 = jax.jit(model.step)
    dequantized = quantize.dequantize_params(qparams)
    s8 = s32 = sd = initial_state(model, B)
    xs = np.random.default_rng(0).integers(0, V, (8, B)).astype(np.int32)
    worst = 0.0
    for x in xs:
        s8, y8 = step_int8(qparams, s8, x)
        s32, y32 = step_fp32(params, s32, x)
        sd, yd = step_fp32(dequantized, sd, x)
        np.testing.assert_allclose(y8, yd, atol=1e-5)  # int8 step == float step on the dequantised weights
        worst = max(worst, float(jnp.max(jnp.abs(y8 - y32))))
    assert 0 < worst < STEP_TOLERANCE


def test_min_size_keeps_small_matrices_float():
    _, params = model_and_params("gru")
    qparams = quantize.quantize_params(params, min_size=40 * 32 + 1)  # the (V, E) embedding stays float32
    assert qparams["embed"].dtype == jnp.float32
    assert isinstance(qparams["core"]["w_hh"], qwix.QArray)
