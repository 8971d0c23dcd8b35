"""The transformer baseline: shapes, causality, and streaming through the KV cache equal to the full forward pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax.attention import KVCache, Transformer
from rnnjax.metrics import compute_metrics
from rnnjax.tasks import Batch

ATOL = 2e-5


# Jitted with the (hashable) model static: tests that share a model and shapes share one compilation.
@functools.partial(jax.jit, static_argnums=0)
def apply(model, params, inputs, lengths=None):
    return model.apply(params, inputs, lengths=lengths)


@functools.partial(jax.jit, static_argnums=0)
def step(model, params, cache, x):
    return model.step(params, cache, x)


@functools.partial(jax.jit, static_argnums=(0, 3))
def prefill(model, params, inputs, max_len, lengths=None):
    return model.prefill(params, inputs, max_len, lengths=lengths)


def small(**options) -> Transformer:
    defaults = dict(vocab_size=13, output_size=5, d_model=16, num_heads=2, num_layers=2, head="per_step")
    return Transformer(**{**defaults, **options})


def token_inputs(B=3, T=9, V=13, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


@pytest.mark.parametrize("head, tokens", [("last", True), ("per_step", False)])
def test_output_shapes(head, tokens):
    options = dict(vocab_size=13, input_size=None) if tokens else dict(vocab_size=None, input_size=4)
    model = small(head=head, **options)
    params = model.init(jax.random.key(0))
    inputs = token_inputs() if tokens else jax.random.normal(jax.random.key(1), (3, 9, 4))
    outputs = apply(model, params, inputs, jnp.array([9, 4, 1]))
    assert outputs.shape == ((3, 5) if head == "last" else (3, 9, 5))
    assert outputs.dtype == jnp.float32


def test_parameter_names_and_shapes():
    model = small(mlp_ratio=3)
    params = model.init(jax.random.key(0))
    assert params["embed"].shape == (13, 16)
    block = params["blocks"][1]
    assert block["attn"]["w_qkv"].shape == (16, 48) and block["attn"]["w_out"].shape == (16, 16)
    assert block["mlp"]["w_in"].shape == (16, 48) and block["mlp"]["w_out"].shape == (48, 16)
    assert params["head"]["w"].shape == (16, 5) and len(params["blocks"]) == 2


def test_causal_future_inputs_do_not_change_past_outputs():
    model = small()
    params = model.init(jax.random.key(0))
    ids = token_inputs()
    changed = ids.at[:, 6:].set((ids[:, 6:] + 1) % 13)
    a, b = apply(model, params, ids), apply(model, params, changed)
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=ATOL)
    assert not np.allclose(a[:, 6:], b[:, 6:])


def test_last_head_reads_each_rows_last_valid_step():
    per_step, last = small(), small(head="last")
    params = per_step.init(jax.random.key(0))
    ids, lengths = token_inputs(), jnp.array([9, 4, 1])
    full = apply(per_step, params, ids)
    np.testing.assert_allclose(apply(last, params, ids, lengths), full[jnp.arange(3), lengths - 1], atol=ATOL)


@pytest.mark.parametrize("tokens, num_layers", [(True, 2), (False, 3)])
def test_streaming_with_kv_cache_equals_full_forward(tokens, num_layers):
    options = dict(vocab_size=13, input_size=None) if tokens else dict(vocab_size=None, input_size=4)
    model = small(num_layers=num_layers, **options)
    params = model.init(jax.random.key(0))
    inputs = token_inputs() if tokens else jax.random.normal(jax.random.key(1), (3, 9, 4))
    full = apply(model, params, inputs)  # (B, T, O)
    cache = model.init_cache(batch_size=3, max_len=12)
    outputs = []
    for t in range(9):
        cache, y = step(model, params, cache, inputs[:, t])
        outputs.append(y)
    np.testing.assert_allclose(jnp.stack(outputs, axis=1), full, atol=ATOL)
    np.testing.assert_array_equal(cache.pos, [9, 9, 9])


def test_prefill_then_step_equals_full_forward():
    model = small()
    params = model.init(jax.random.key(0))
    ids = token_inputs(T=10)
    full = apply(model, params, ids)
    cache, prefix_out = prefill(model, params, ids[:, :6], 10)
    np.testing.assert_allclose(prefix_out, full[:, :6], atol=ATOL)
    for t in range(6, 10):
        cache, y = step(model, params, cache, ids[:, t])
        np.testing.assert_allclose(y, full[:, t], atol=ATOL)


def test_rows_stream_at_their_own_positions():
    """A prefill with per-row lengths, then steps, equals each row's own unpadded forward pass."""
    model = small()
    params = model.init(jax.random.key(0))
    ids = token_inputs(T=8)
    lengths = jnp.array([5, 2, 8])
    cache, _ = prefill(model, params, ids, 12, lengths)
    more = token_inputs(T=3, seed=7)
    streamed = []
    for t in range(3):
        cache, y = step(model, params, cache, more[:, t])
        streamed.append(y)
    streamed = jnp.stack(streamed, axis=1)  # (B, 3, O)
    for row in range(3):
        L = int(lengths[row])
        alone = jnp.concatenate([ids[row : row + 1, :L], more[row : row + 1]], axis=1)
        np.testing.assert_allclose(streamed[row], apply(model, params, alone)[0, L:], atol=ATOL)


def test_kv_cache_is_a_pytree_that_jit_carries():
    model = small()
    cache = model.init_cache(2, 4)
    assert isinstance(cache, KVCache)
    assert cache.k.shape == (2, 2, 4, 2, 8) and cache.pos.dtype == jnp.int32
    leaves = jax.tree.leaves(jax.jit(lambda c: c)(cache))
    assert len(leaves) == 3


def test_longer_sequences_than_trained_on_run():
    """Rotary positions have no maximum length."""
    model = small(head="last")
    params = model.init(jax.random.key(0))
    assert apply(model, params, token_inputs(T=100)).shape == (3, 5)


def test_dropout_only_with_a_key_and_gradients_are_finite():
    model = small(dropout=0.5)
    params = model.init(jax.random.key(0))
    ids = token_inputs()
    train = jax.jit(lambda p, key: model.apply(p, ids, dropout_key=key))
    np.testing.assert_array_equal(apply(model, params, ids), apply(model, params, ids))
    assert not np.allclose(train(params, jax.random.key(3)), apply(model, params, ids))
    batch = Batch(np.asarray(ids), np.zeros((3, 9), np.int32))
    loss = lambda p: model.loss_and_metrics(p, batch, "per_step_classify", dropout_key=jax.random.key(2))[0]  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_loss_and_metrics_match_compute_metrics():
    model = small(head="last", output_size=3)
    params = model.init(jax.random.key(0))
    batch = Batch(np.asarray(token_inputs()), np.array([0, 1, 2], np.int32), np.array([9, 3, 5], np.int32))
    loss, metrics = jax.jit(lambda p: model.loss_and_metrics(p, batch, "classify"))(params)
    expected = compute_metrics("classify", apply(model, params, batch.inputs, batch.lengths), batch)
    np.testing.assert_allclose(loss, expected["loss"], rtol=1e-6)
    assert set(metrics) >= {"loss", "accuracy"}


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(d_model=12, num_heads=4), "multiple of 2"),
        (dict(head="mean"), "head must be"),
        (dict(input_size=3), "exactly one"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_invalid_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        small(**options)


def test_bad_inputs_raise_naming_the_argument():
    floats = small(vocab_size=None, input_size=3)
    params = floats.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"inputs has 4 features .* expect 3"):
        floats.apply(params, jnp.ones((2, 5, 4)))
    with pytest.raises(ValueError, match=r"inputs must have shape \(batch, time, 3\), got shape \(5, 3\)"):
        floats.apply(params, jnp.ones((5, 3)))
    with pytest.raises(TypeError, match="inputs must have a floating-point dtype, got int32"):
        floats.apply(params, jnp.ones((2, 5, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3\)"):
        floats.step(params, floats.init_cache(1, 4), jnp.ones((3,)))
    tokens = small()
    token_params = tokens.init(jax.random.key(0))
    with pytest.raises(TypeError, match="inputs must be integer token ids"):
        tokens.apply(token_params, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"inputs must have shape \(batch, time\) of token ids, got shape \(5,\)"):
        tokens.apply(token_params, jnp.ones((5,), jnp.int32))
    with pytest.raises(ValueError, match=r"x must have shape \(batch,\) token ids"):
        tokens.step(token_params, tokens.init_cache(1, 4), jnp.ones((1, 1), jnp.int32))


@pytest.mark.parametrize("jitted", [False, True])
def test_a_full_cache_raises_instead_of_overwriting(jitted):
    model = small()
    params = model.init(jax.random.key(0))
    step_fn = functools.partial(step, model) if jitted else model.step
    cache = model.init_cache(2, 2)
    x = jnp.zeros((2,), jnp.int32)
    for _ in range(2):  # exactly max_len steps fit
        cache, y = step_fn(params, cache, x)
    jax.block_until_ready(y)
    with pytest.raises(Exception, match="cache is full: a row is at position 2 but the cache holds max_len=2"):
        cache, y = step_fn(params, cache, x)
        jax.block_until_ready(y)  # under jit the host-side check raises while the step runs


def test_token_ids_outside_the_vocabulary_raise_eagerly_and_under_jit():
    model = small()  # vocab_size 13
    params = model.init(jax.random.key(0))
    bad = jnp.array([[1, 2, 13]], jnp.int32)
    with pytest.raises(ValueError, match=r"inputs must be token ids in \[0, 13\), got values from 1 to 13"):
        model.apply(params, bad)
    with pytest.raises(Exception, match=r"token ids in \[0, 13\), got values from -1 to 2"):
        jax.block_until_ready(apply(model, params, jnp.array([[-1, 2, 0]], jnp.int32)))
    jax.block_until_ready(apply(model, params, jnp.array([[12, 2, 0]], jnp.int32)))  # in range: no complaint
