"""The cuDNN LSTM path (rnnjax.kernels.cudnn) against the scan path: values and every gradient.

cuDNN runs only on CUDA GPUs. On the CPU the whole wrapper (weight packing, sequence lengths, length-0 rows,
batch flattening, reverse, layers, vmap) runs with ``jax.experimental.rnn``'s two primitives replaced by its
pure-JAX ``lstm_ref`` (fixture ``reference_primitives``); the reference is :func:`rnnjax.unroll` with ``remat``
(``masked_scan`` over ``cell.step``, differentiated by JAX) with the native kernels and cuDNN switched off. The
last test runs the real cuDNN path and is skipped without a GPU.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import rnn as jax_rnn

import rnnjax
from rnnjax.kernels import cudnn, native

on_gpu = jax.default_backend() == "gpu"


# ---------------------------------------------------------------------------------------------------- helpers


def _reference_lstm(xs_bm, h0, c0, weights, seq_lengths, input_size, hidden_size):
    """``lstm_ref`` on cuDNN's flat weights; every output NaN if a length is 0 (where cuDNN fails)."""
    w_ih, w_hh, b_ih, b_hh = jax_rnn.unpack_lstm_weights(weights, input_size, hidden_size, 1, False)
    ys, h_n, c_n = jax_rnn.lstm_ref(
        xs_bm, h0, c0, w_ih, w_hh, b_ih, b_hh, seq_lengths, input_size, hidden_size, 1, 0.0, False
    )
    poison = jnp.where(jnp.min(seq_lengths) < 1, jnp.nan, 0.0)
    return ys + poison, h_n + poison, c_n + poison


class _Primitive:
    def __init__(self, bind):
        self.bind = bind


@pytest.fixture
def reference_primitives(monkeypatch):
    """Pretends a CUDA GPU and stands ``lstm_ref`` in for cuDNN's primitives; counts the forward binds."""
    calls = {"forward": 0, "backward": 0}

    def forward(xs_bm, h0, c0, weights, seq_lengths, *, input_size, hidden_size, num_layers, dropout,
                bidirectional, cudnn_allow_tf32):  # fmt: skip
        assert (num_layers, dropout, bidirectional, cudnn_allow_tf32) == (1, 0.0, False, False)
        assert seq_lengths.dtype == jnp.int32 and weights.shape == (4 * hidden_size * (input_size + hidden_size + 2),)
        calls["forward"] += 1
        outputs = _reference_lstm(xs_bm, h0, c0, weights, seq_lengths, input_size, hidden_size)
        return (*outputs, jnp.zeros((1,), jnp.float32))  # (ys, h_n, c_n, reserve space)

    def backward(dys, dh_n, dc_n, xs_bm, h0, c0, weights, ys, reserve, seq_lengths, *, input_size, hidden_size,
                 num_layers, dropout, bidirectional, cudnn_allow_tf32):  # fmt: skip
        assert not cudnn_allow_tf32
        calls["backward"] += 1

        def run(*args):
            return _reference_lstm(*args, seq_lengths, input_size, hidden_size)

        _, pullback = jax.vjp(run, xs_bm, h0, c0, weights)
        return pullback((dys, dh_n, dc_n))

    monkeypatch.setattr(cudnn, "_platform_problems", lambda: [])
    monkeypatch.setattr(jax_rnn, "rnn_fwd_p", _Primitive(forward))
    monkeypatch.setattr(jax_rnn, "rnn_bwd_p", _Primitive(backward))
    with jax.default_matmul_precision("highest"):  # both sides in full float32 on a GPU too (no TF32)
        yield calls


def _perturbed(tree, key, scale):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([leaf + scale * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])


def _problem(core, batch_shape, T, I, seed=0, lengths=True):
    """``params, xs (*B, T, I), carry, lengths (*B,) or None``; the lengths hold 0 and T where there is room."""
    keys = jax.random.split(jax.random.key(seed), 5)
    params = _perturbed(core.init(keys[0], I), keys[1], 0.3)  # biases and every gate block matter
    xs = jax.random.normal(keys[2], (*batch_shape, T, I))
    carry = _perturbed(core.initial_carry(batch_shape), keys[3], 0.5)
    size = int(np.prod(batch_shape, dtype=int))
    row_lengths = np.array(jax.random.randint(keys[4], (size,), 0, T + 1))
    row_lengths[: min(size, 2)] = [0, T][: min(size, 2)]
    lengths = jnp.asarray(row_lengths.reshape(batch_shape), jnp.int32) if lengths else None
    return params, xs, carry, lengths


def _loss(core, lengths, reverse=False, remat=False):
    def loss(params, xs, carry):
        final, ys = rnnjax.unroll(core, params, xs, carry, lengths=lengths, reverse=reverse, remat=remat)
        ys = ys if not isinstance(ys, tuple) else jnp.concatenate(ys, axis=-1)
        ramp = jnp.linspace(-1.0, 1.0, ys.size).reshape(ys.shape)  # every output position weighted differently
        return jnp.sum(ys * ramp) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(final))

    return loss


def _value_and_grads(core, params, xs, carry, lengths, *, mode, reverse=False, jit=True):
    """Loss and gradients for params, xs and carry; ``mode="never"`` is the reference (scan, no native kernel)."""
    reference = mode == "never"
    fn = jax.value_and_grad(_loss(core, lengths, reverse, remat=reference), argnums=(0, 1, 2))
    fn = jax.jit(fn) if jit else fn
    with cudnn.use_mode(mode), native.use_native(not reference):
        return fn(params, xs, carry)


def _assert_close(actual, expected):
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


# --------------------------------------------------------------------------------------- on the CPU, as it is


def test_unavailable_on_cpu_and_status_says_why():
    if on_gpu:
        pytest.skip("a GPU backend")
    assert not cudnn.available() and not cudnn.enabled()
    line = cudnn.status()
    assert line.startswith("cuDNN LSTM path unavailable") and "the default backend is cpu" in line
    assert "native CPU kernel" in line or "pure-JAX path" in line
    with cudnn.use_mode("never"):
        assert "switched off" in cudnn.status()


def test_always_on_cpu_raises_naming_the_backend():
    if on_gpu:
        pytest.skip("a GPU backend")
    cell = rnnjax.LSTM(hidden_size=4)
    params = cell.init(jax.random.key(0), 3)
    with cudnn.use_mode("always"), pytest.raises(RuntimeError, match="mode 'always'.*the default backend is cpu"):
        rnnjax.unroll(cell, params, jnp.ones((2, 5, 3)))


def test_auto_on_cpu_compiles_the_same_program_as_never():
    """Mode "auto" leaves the CPU path (the native kernel where built) exactly as it was."""
    if on_gpu:
        pytest.skip("a GPU backend")
    cell = rnnjax.LSTM(hidden_size=4)
    params, xs, carry, lengths = _problem(cell, (3,), 5, 2)
    loss = jax.value_and_grad(_loss(cell, lengths), argnums=(0, 1, 2))
    texts = []
    for mode in ("auto", "never"):
        with cudnn.use_mode(mode):
            texts.append(jax.jit(loss).lower(params, xs, carry).as_text())
    assert texts[0] == texts[1]
    assert ("rnnjax_lstm_forward" in texts[0]) == native.enabled()


def test_mode_switches():
    assert cudnn.mode() == cudnn._parse_mode(os.environ.get("RNNJAX_CUDNN"))  # "auto" when unset
    before = cudnn.mode()
    with cudnn.use_mode("never"):
        assert cudnn.mode() == "never" and not cudnn.enabled()
        cudnn.set_enabled(True)
        assert cudnn.mode() == "auto"
    assert cudnn.mode() == before
    with pytest.raises(ValueError, match="mode must be one of"):
        cudnn.set_mode("sometimes")
    assert [cudnn._parse_mode(v) for v in (None, "", "AUTO", "never", "0", "off", "always")] == [
        "auto", "auto", "auto", "never", "never", "never", "always"
    ]  # fmt: skip
    with pytest.warns(UserWarning, match="RNNJAX_CUDNN"):
        assert cudnn._parse_mode("fast") == "auto"


def test_packing_matches_jax_layout():
    cell = rnnjax.LSTM(hidden_size=3)
    params = _perturbed(cell.init(jax.random.key(0), 5), jax.random.key(1), 0.3)
    w_ih, w_hh, b_ih, b_hh = jax_rnn.unpack_lstm_weights(cudnn.pack_weights(params), 5, 3, 1, False)
    np.testing.assert_array_equal(w_ih[0], params["w_ih"].T)  # (4H, I), gate blocks i, f, g, o
    np.testing.assert_array_equal(w_hh[0], params["w_hh"].T)
    np.testing.assert_array_equal(b_ih[0], params["b"])
    np.testing.assert_array_equal(b_hh[0], np.zeros(12))
    assert cudnn.pack_weights(params).size == jax_rnn.get_num_params_in_lstm(5, 3, 1, False)


# ------------------------------------------------------------------------- the wrapper, with lstm_ref inside

# (batch shape, T, I, H, use_bias, reverse, with lengths)
CASES = [
    ((4,), 6, 3, 5, False, True, True),  # no bias, reverse
    pytest.param((), 5, 2, 4, True, False, True, marks=pytest.mark.slow),  # no batch axis, a single length-0 row
    pytest.param((1,), 1, 3, 2, True, False, False, marks=pytest.mark.slow),  # T = 1, B = 1
    ((2, 3), 4, 3, 4, True, True, True),  # two batch axes
    pytest.param((3,), 1, 2, 3, False, False, True, marks=pytest.mark.slow),  # T = 1 with length-0 rows
]


@pytest.mark.parametrize("batch_shape,T,I,H,use_bias,reverse,with_lengths", CASES, ids=str)
def test_cell_matches_the_scan_path(reference_primitives, batch_shape, T, I, H, use_bias, reverse, with_lengths):
    cell = rnnjax.LSTM(hidden_size=H, use_bias=use_bias)
    params, xs, carry, lengths = _problem(cell, batch_shape, T, I, lengths=with_lengths)
    want = _value_and_grads(cell, params, xs, carry, lengths, mode="never", reverse=reverse)
    assert reference_primitives["forward"] == 0
    got = _value_and_grads(cell, params, xs, carry, lengths, mode="always", reverse=reverse)
    assert reference_primitives["forward"] >= 1 and reference_primitives["backward"] >= 1
    _assert_close(got, want)


def test_bidirectional_in_a_stack_matches_the_scan_path(reference_primitives):
    stack = rnnjax.Stack([rnnjax.Bidirectional(rnnjax.LSTM(hidden_size=4)), rnnjax.LSTM(hidden_size=3, use_bias=False)])
    params, xs, carry, lengths = _problem(stack, (4,), 5, 3, seed=1)
    want = _value_and_grads(stack, params, xs, carry, lengths, mode="never")
    got = _value_and_grads(stack, params, xs, carry, lengths, mode="always")
    assert reference_primitives["forward"] >= 3  # the forward, backward and top cells (traced once or more)
    _assert_close(got, want)


def test_vmap_over_members_with_their_own_weights(reference_primitives):
    """The primitives have no batching rule: each mapped member is one call (values and gradients)."""
    cell = rnnjax.LSTM(hidden_size=3)
    members = [_problem(cell, (2,), 4, 2, seed=seed)[:3] for seed in range(3)]
    params, xs, carry = jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)  # leading axis: members
    lengths = jnp.array([[4, 0], [2, 4], [1, 3]], jnp.int32)  # (members, B)

    def run(mode):
        def one(p, x, c, n):
            return jax.value_and_grad(_loss(cell, n, remat=mode == "never"), argnums=(0, 1, 2))(p, x, c)

        with cudnn.use_mode(mode), native.use_native(mode != "never"):
            return jax.jit(jax.vmap(one))(params, xs, carry, lengths)

    _assert_close(run("always"), run("never"))


def test_auto_falls_back_where_cudnn_cannot_run(reference_primitives):
    xs = jax.random.normal(jax.random.key(0), (2, 3, 2))
    for cell in (rnnjax.LSTM(hidden_size=3, peepholes=True), rnnjax.LSTM(hidden_size=3, proj_size=2)):
        rnnjax.unroll(cell, cell.init(jax.random.key(1), 2), xs)
    cell = rnnjax.LSTM(hidden_size=3)
    params = cell.init(jax.random.key(1), 2)
    rnnjax.unroll(cell, params, xs, remat=True)
    rnnjax.unroll(cell, params, jnp.zeros((2, 0, 2)))  # T = 0
    rnnjax.unroll(cell, params, jnp.zeros((0, 3, 2)))  # empty batch
    rnnjax.unroll(rnnjax.LSTM(hidden_size=3, dtype=jnp.bfloat16), params, xs)
    assert reference_primitives["forward"] == 0
    rnnjax.unroll(cell, params, xs)
    assert reference_primitives["forward"] == 1


@pytest.mark.parametrize(
    "options,call,reason",
    [
        ({"peepholes": True}, {}, "peepholes"),
        ({"proj_size": 2}, {}, "output projection"),
        ({"dtype": jnp.bfloat16}, {}, "float32 alone.*bfloat16"),
        ({}, {"remat": True}, "remat"),
        ({}, {"T": 0}, "T = 0"),
    ],
)
def test_always_names_the_reason(reference_primitives, options, call, reason):
    cell = rnnjax.LSTM(hidden_size=3, **options)
    params = cell.init(jax.random.key(0), 2)
    xs = jnp.ones((2, call.get("T", 3), 2))
    with cudnn.use_mode("always"), pytest.raises(RuntimeError, match=f"cannot run: .*{reason}"):
        rnnjax.unroll(cell, params, xs, remat=call.get("remat", False))


def test_a_mask_that_is_not_a_prefix(reference_primitives):
    """Known: off cuDNN in "auto" (same numbers as the scan), an error in "always"; traced: fails at run time."""
    cell = rnnjax.LSTM(hidden_size=3)
    params, xs, carry, _ = _problem(cell, (2,), 4, 2)
    xs = jnp.swapaxes(xs, 0, 1)  # (T, B, I)
    mask = jnp.array([[True, False], [False, True], [True, True], [False, True]])  # (T, B), gaps in both rows
    with cudnn.use_mode("auto"):
        got = cell.sequence(params, carry, xs, mask)
    assert reference_primitives["forward"] == 0
    with native.use_native(False):
        want = rnnjax.masked_scan(cell.step, params, carry, xs, mask)
    _assert_close(got, want)
    with cudnn.use_mode("always"), pytest.raises(RuntimeError, match="not a prefix"):
        cell.sequence(params, carry, xs, mask)
    with cudnn.use_mode("always"):
        run = jax.jit(lambda m: cell.sequence(params, carry, xs, m))
        good = jnp.array([[True, True], [True, False], [True, False], [False, False]])
        _assert_close(run(good), rnnjax.masked_scan(cell.step, params, carry, xs, good))
        with pytest.raises((jax.errors.JaxRuntimeError, ValueError), match="prefix of valid steps"):
            jax.block_until_ready(run(mask))


# ---------------------------------------------------------------------------------------------- on a real GPU


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a CUDA GPU")
def test_real_cudnn_matches_the_scan_path():
    """cuDNN itself: a cell with a length-0 row, reversed, without bias, a bidirectional stack, and vmap."""
    assert cudnn.available(), cudnn.status()
    cores = [
        (rnnjax.LSTM(hidden_size=16), False),
        (rnnjax.LSTM(hidden_size=8, use_bias=False), True),
        (rnnjax.Stack([rnnjax.Bidirectional(rnnjax.LSTM(hidden_size=8)), rnnjax.LSTM(hidden_size=8)]), False),
    ]
    with jax.default_matmul_precision("highest"):  # the scan path in full float32, as cuDNN runs
        for core, reverse in cores:
            params, xs, carry, lengths = _problem(core, (5,), 7, 6)
            assert int(jnp.min(lengths)) == 0
            want = _value_and_grads(core, params, xs, carry, lengths, mode="never", reverse=reverse)
            with cudnn.use_mode("always"):
                loss = jax.value_and_grad(_loss(core, lengths, reverse), argnums=(0, 1, 2))
                assert "cudnn_rnn" in jax.jit(loss).lower(params, xs, carry).as_text()
            got = _value_and_grads(core, params, xs, carry, lengths, mode="always", reverse=reverse)
            _assert_close(got, want)

        cell = rnnjax.LSTM(hidden_size=8)
        params, xs, carry, lengths = _problem(cell, (2, 3), 5, 4)  # vmap over the first batch axis

        def run(mode):
            def one(x, c, n):
                return jax.value_and_grad(_loss(cell, n, remat=mode == "never"), argnums=(0, 1, 2))(params, x, c)

            with cudnn.use_mode(mode):
                return jax.jit(jax.vmap(one))(xs, carry, lengths)

        _assert_close(run("always"), run("never"))
