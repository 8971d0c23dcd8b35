"""rnnjax.Streamer against the NumPy reference loops of tests/_reference.py, on the native path and the jitted one."""

import _reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from rnnjax.kernels import native

needs_native = pytest.mark.skipif(not native.available(), reason=native.status())

CELLS = [
    ("lstm", {}, True),
    ("lstm", {"use_bias": False}, True),
    ("gru", {}, True),
    ("gru", {"use_bias": False}, True),
    ("lstm", {"peepholes": True, "proj_size": 3}, False),  # options the kernel does not serve: jitted cell.step
    ("gru", {"reset_after": False}, False),
    ("elman", {}, False),
]


def _problem(name, options, batch_shape, T=7, I=3, H=5, seed=0):
    cell = rnnjax.make_cell(name, hidden_size=H, **options)
    params = ref.random_params(cell, seed, I)
    xs = np.random.default_rng(seed + 1).standard_normal((T, *batch_shape, I)).astype(np.float32)
    carry = ref.random_carry(cell, batch_shape, seed + 2)
    return cell, params, xs, carry


def _reference_outputs(cell, params, xs, carry, batch_shape):
    """``(T, *B, O)`` outputs and the final carry, row by row in float64 NumPy."""
    T, I = xs.shape[0], xs.shape[-1]
    rows = int(np.prod(batch_shape))
    flat_xs = xs.reshape(T, rows, I)
    flat_carry = jax.tree.map(lambda leaf: leaf.reshape(rows, -1), carry)
    outputs, finals = [], []
    for row in range(rows):
        final, ys = ref.run(
            cell, ref.to_np(params), flat_xs[:, row], jax.tree.map(lambda leaf, r=row: leaf[r], flat_carry)
        )
        outputs.append(ys)
        finals.append(final)
    ys = np.stack(outputs, axis=1).reshape(T, *batch_shape, -1)
    final = jax.tree.map(lambda *leaves: np.stack(leaves).reshape(*batch_shape, -1), *finals)
    return ys, final


@pytest.mark.parametrize("batch_shape", [(), (1,), (2, 3), (9,)], ids=str)
@pytest.mark.parametrize("name,options,on_kernel", CELLS, ids=lambda v: str(v) if not isinstance(v, bool) else "")
def test_steps_equal_the_numpy_reference(name, options, on_kernel, batch_shape):
    cell, params, xs, carry = _problem(name, options, batch_shape)
    streamer = rnnjax.Streamer(cell, params, batch_shape, carry=ref.to_jax_carry(cell, carry))
    assert streamer.native == (on_kernel and native.available())

    ys = np.stack([streamer.step(x) for x in xs])

    expected_ys, expected_carry = _reference_outputs(cell, params, xs, carry, batch_shape)
    assert ys.dtype == np.float32 and ys.shape == expected_ys.shape
    np.testing.assert_allclose(ys, expected_ys, rtol=2e-5, atol=2e-5)
    ref.assert_tree_close(ref.to_np(streamer.carry), expected_carry)


@needs_native
@pytest.mark.parametrize("isa", native.ISAS)
def test_every_instruction_set_equals_the_jitted_step(isa):
    if native.ISAS.index(isa) > native.ISAS.index(native.best_isa()):
        pytest.skip(f"this CPU does not run {isa}")
    cell, params, xs, carry = _problem("lstm", {}, (2,), H=37)  # H not a multiple of any vector width
    start = ref.to_jax_carry(cell, carry)
    step = jax.jit(cell.step)
    native.set_isa(isa)
    try:
        streamer = rnnjax.Streamer(cell, params, (2,), carry=start)
        state = start
        for x in xs:
            state, expected = step(params, state, jnp.asarray(x))
            np.testing.assert_allclose(streamer.step(x), expected, rtol=1e-5, atol=1e-6)
    finally:
        native.set_isa(None)


def test_reset_starts_again_and_outputs_are_not_overwritten():
    cell, params, xs, _ = _problem("gru", {}, (1,))
    streamer = rnnjax.Streamer(cell, params, (1,))
    first = [streamer.step(x) for x in xs]
    kept = [y.copy() for y in first]
    streamer.reset()
    again = [streamer.step(x) for x in xs]
    for a, b, c in zip(first, kept, again):
        np.testing.assert_array_equal(a, b)  # later steps did not write into an earlier output
        np.testing.assert_array_equal(a, c)
    streamer.reset(cell.initial_carry((1,)))
    np.testing.assert_array_equal(streamer.step(xs[0]), first[0])


def test_a_stack_streams_on_the_jitted_step():
    layer = rnnjax.Stack([rnnjax.LSTM(hidden_size=4), rnnjax.GRU(hidden_size=3)])
    params = layer.init(jax.random.key(0), 2)
    xs = np.random.default_rng(0).standard_normal((5, 2, 2)).astype(np.float32)
    streamer = rnnjax.Streamer(layer, params, (2,))
    assert not streamer.native
    ys = np.stack([streamer.step(x) for x in xs])
    _, expected = rnnjax.unroll(layer, params, jnp.asarray(xs), time_major=True)
    np.testing.assert_allclose(ys, expected, rtol=1e-5, atol=1e-6)


@needs_native
def test_float64_and_integer_inputs_are_cast_to_float32():
    cell, params, xs, _ = _problem("lstm", {}, (1,))
    a, b = rnnjax.Streamer(cell, params, (1,)), rnnjax.Streamer(cell, params, (1,))
    np.testing.assert_array_equal(a.step(xs[0].astype(np.float64)), b.step(xs[0]))
    np.testing.assert_array_equal(a.step(np.ones((1, 3), np.int32)), b.step(np.ones((1, 3), np.float32)))


def test_bfloat16_inputs_are_accepted_and_cast():
    cell, params, xs, _ = _problem("lstm", {}, (1,))
    a, b = rnnjax.Streamer(cell, params, (1,)), rnnjax.Streamer(cell, params, (1,))
    x16 = jnp.asarray(xs[0], jnp.bfloat16)
    np.testing.assert_array_equal(a.step(x16), b.step(np.asarray(x16.astype(jnp.float32))))


def test_native_switch_off_takes_the_jitted_step():
    cell, params, xs, _ = _problem("lstm", {}, (1,))
    with native.use_native(False):
        streamer = rnnjax.Streamer(cell, params, (1,))
    assert not streamer.native and "jax.jit" in repr(streamer)
    assert streamer.step(xs[0]).shape == (1, 5)


def test_an_empty_batch_streams_nothing():
    cell, params, _, _ = _problem("lstm", {}, (0,))
    streamer = rnnjax.Streamer(cell, params, (0,))
    assert not streamer.native  # nothing for the kernel to compute
    assert streamer.step(np.zeros((0, 3), np.float32)).shape == (0, 5)


def test_bad_arguments_name_what_was_expected():
    cell, params, _, _ = _problem("lstm", {}, (2,))
    streamer = rnnjax.Streamer(cell, params, (2,))
    with pytest.raises(ValueError, match=r"x must have shape \(2, 3\).*got \(3,\)"):
        streamer.step(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"x must have shape \(2, 3\).*got \(1, 3\)"):
        streamer.step(np.zeros((1, 3), np.float32))  # no silent broadcast
    with pytest.raises(TypeError, match="x must hold real numbers, got dtype complex64"):
        streamer.step(np.zeros((2, 3), np.complex64))
    with pytest.raises(ValueError, match=r"carry\.c must have shape \(2, 5\).*got \(2, 4\)"):
        streamer.reset(rnnjax.LSTMState(h=jnp.zeros((2, 5)), c=jnp.zeros((2, 4))))
    with pytest.raises(ValueError, match="carry must have the structure"):
        streamer.reset((jnp.zeros((2, 5)),))
    with pytest.raises(ValueError, match="cannot stream"):
        layer = rnnjax.Bidirectional(rnnjax.GRU(hidden_size=2))
        rnnjax.Streamer(layer, layer.init(jax.random.key(0), 3))
    with pytest.raises(TypeError, match="cell must be an rnnjax cell or layer, got str"):
        rnnjax.Streamer("lstm", params)
    with pytest.raises(ValueError, match="w_hh"):  # the cell's own check of its parameters
        rnnjax.Streamer(cell, {**params, "w_hh": params["w_hh"][:, :4]}, (2,))


@pytest.mark.parametrize("name,options", [("lstm", {}), ("elman", {})])  # the native path and the jitted one
def test_later_changes_to_numpy_parameters_do_not_reach_the_streamer(name, options):
    cell, params, xs, _ = _problem(name, options, (1,))
    host = {k: np.array(v) for k, v in params.items()}
    streamer, reference = rnnjax.Streamer(cell, host, (1,)), rnnjax.Streamer(cell, params, (1,))
    for leaf in host.values():
        leaf += 1.0
    np.testing.assert_array_equal(streamer.step(xs[0]), reference.step(xs[0]))
