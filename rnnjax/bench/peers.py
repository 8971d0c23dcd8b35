"""One recurrent layer (LSTM or GRU) in each library, behind one interface, for like-for-like timing.

Every peer runs the same problem: inputs ``(B, T, I)`` batch-first, one layer of ``H`` units, loss
``mean(ys ** 2)``. A train step is forward + backward with respect to all parameters (no optimiser update,
which is the same Optax or torch.optim cost for everyone). The streaming step feeds one token at batch 1
(PyTorch: ``nn.LSTMCell`` / ``nn.GRUCell``; JAX libraries: their jitted cell step).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.bench.timing import compile_seconds_and_memory


@dataclasses.dataclass(frozen=True)
class Problem:
    """The benchmarked configuration."""

    kind: str  # "lstm" or "gru"
    batch: int  # B
    time: int  # T
    inputs: int  # I
    hidden: int  # H

    def data(self, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((self.batch, self.time, self.inputs), dtype=np.float32)


@dataclasses.dataclass
class Peer:
    """A prepared implementation: blocking callables plus what compiling them cost."""

    name: str
    train: Callable[[], object]
    forward: Callable[[], object]
    stream: Callable[[], object]  # one token at batch 1, state carried between calls
    compile_seconds: float | None = None  # train step, lower + compile
    # rnnjax only: the same token through rnnjax.Streamer (the native kernel on host buffers, no JAX dispatch)
    streamer: Callable[[], object] | None = None
    memory_bytes: int | None = None  # XLA's estimate for the train step


def _jax_peer(name: str, loss: Callable, params, xs, step: Callable, step_params, state, token) -> Peer:
    """Wraps pure JAX ``loss(params, xs)`` and ``step(params, state, token) -> (state, y)`` as a :class:`Peer`."""
    train_fn = jax.jit(jax.value_and_grad(loss))
    forward_fn = jax.jit(loss)
    compile_s, memory = compile_seconds_and_memory(train_fn, params, xs)
    step_fn = jax.jit(step)
    carried = {"state": state}

    def stream():
        carried["state"], y = step_fn(step_params, carried["state"], token)
        return jax.block_until_ready(y)

    return Peer(
        name=name,
        train=lambda: jax.block_until_ready(train_fn(params, xs)),
        forward=lambda: jax.block_until_ready(forward_fn(params, xs)),
        stream=stream,
        compile_seconds=compile_s,
        memory_bytes=memory,
    )


def rnnjax_peer(problem: Problem, *, native_kernels: bool = True) -> Peer:
    """rnnjax as a user gets it: on the CPU its native kernels when built (``native_kernels=False``: pure JAX)."""
    import rnnjax
    from rnnjax.kernels import native

    cell = rnnjax.LSTM(hidden_size=problem.hidden) if problem.kind == "lstm" else rnnjax.GRU(hidden_size=problem.hidden)
    params = cell.init(jax.random.key(0), problem.inputs)
    xs = jnp.asarray(problem.data())

    def loss(params, xs):
        return jnp.mean(rnnjax.unroll(cell, params, xs)[1] ** 2)

    def step(params, carry, x):
        return cell.step(params, carry, x)

    token = jnp.ones((1, problem.inputs), jnp.float32)
    name = "rnnjax" if native_kernels else "rnnjax (pure JAX)"
    with native.use_native(native_kernels):  # the switch is read when a function is traced: trace all three now
        peer = _jax_peer(name, loss, params, xs, step, params, cell.initial_carry((1,)), token)
        peer.train(), peer.forward(), peer.stream()
        if native_kernels:
            streamer = rnnjax.Streamer(cell, params, (1,))
            host_token = np.ones((1, problem.inputs), np.float32)
            peer.streamer = lambda: streamer.step(host_token)
            peer.streamer()
    return peer


def rnnjax_pure_jax_peer(problem: Problem) -> Peer:
    """rnnjax with its native CPU kernels switched off: the ``lax.scan`` path every other backend runs."""
    return rnnjax_peer(problem, native_kernels=False)


def flax_linen_peer(problem: Problem) -> Peer:
    import flax.linen as nn

    cell = nn.OptimizedLSTMCell(problem.hidden) if problem.kind == "lstm" else nn.GRUCell(problem.hidden)
    model = nn.RNN(cell)
    xs = jnp.asarray(problem.data())
    params = model.init(jax.random.key(0), xs)

    def loss(params, xs):
        return jnp.mean(model.apply(params, xs) ** 2)

    token = jnp.ones((1, problem.inputs), jnp.float32)
    cell_params = {"params": params["params"]["cell"]}
    state = cell.initialize_carry(jax.random.key(1), token.shape)

    def step(p, carry, x):
        return cell.apply(p, carry, x)

    return _jax_peer("flax.linen", loss, params, xs, step, cell_params, state, token)


def flax_nnx_peer(problem: Problem) -> Peer:
    from flax import nnx

    rngs = nnx.Rngs(0)
    if problem.kind == "lstm":
        cell = nnx.OptimizedLSTMCell(problem.inputs, problem.hidden, rngs=rngs)
    else:
        cell = nnx.GRUCell(problem.inputs, problem.hidden, rngs=rngs)
    model = nnx.RNN(cell)
    graphdef, weights, rest = nnx.split(model, nnx.Param, ...)  # differentiate the Params only
    xs = jnp.asarray(problem.data())

    zero = cell.initialize_carry((problem.batch, problem.inputs), rngs=nnx.Rngs(1))

    def loss(weights, xs):
        return jnp.mean(nnx.merge(graphdef, weights, rest)(xs, initial_carry=zero) ** 2)

    cell_graphdef, cell_state = nnx.split(cell)
    token = jnp.ones((1, problem.inputs), jnp.float32)
    carry = cell.initialize_carry((1, problem.inputs), rngs=nnx.Rngs(1))

    def step(cell_state, carry, x):
        return nnx.merge(cell_graphdef, cell_state)(carry, x)

    return _jax_peer("flax.nnx", loss, weights, xs, step, cell_state, carry, token)


def equinox_peer(problem: Problem) -> Peer:
    import equinox as eqx

    key = jax.random.key(0)
    if problem.kind == "lstm":
        cell = eqx.nn.LSTMCell(problem.inputs, problem.hidden, key=key)
        zero = (jnp.zeros((problem.hidden,)), jnp.zeros((problem.hidden,)))

        def output(state):
            return state[0]
    else:
        cell = eqx.nn.GRUCell(problem.inputs, problem.hidden, key=key)
        zero = jnp.zeros((problem.hidden,))

        def output(state):
            return state

    params, static = eqx.partition(cell, eqx.is_array)
    xs = jnp.asarray(problem.data())

    def run_one(cell, x_seq):  # x_seq: (T, I) -> (T, H)
        def body(state, x):
            state = cell(x, state)
            return state, output(state)

        return jax.lax.scan(body, zero, x_seq)[1]

    def loss(params, xs):
        cell = eqx.combine(params, static)
        return jnp.mean(jax.vmap(lambda seq: run_one(cell, seq))(xs) ** 2)

    token = jnp.ones((1, problem.inputs), jnp.float32)
    batched_zero = jax.tree.map(lambda leaf: leaf[None], zero)

    def step(params, state, x):
        cell = eqx.combine(params, static)
        state = jax.vmap(cell)(x, state)
        return state, output(state)

    return _jax_peer("equinox", loss, params, xs, step, params, batched_zero, token)


def torch_peer(problem: Problem) -> Peer:
    import torch

    torch.manual_seed(0)
    module_cls = torch.nn.LSTM if problem.kind == "lstm" else torch.nn.GRU
    module = module_cls(problem.inputs, problem.hidden, batch_first=True)
    xs = torch.from_numpy(problem.data())

    def train():
        module.zero_grad(set_to_none=True)
        loss = (module(xs)[0] ** 2).mean()
        loss.backward()
        return loss

    def forward():
        with torch.no_grad():
            return (module(xs)[0] ** 2).mean()

    # Streaming with the single-step modules nn.LSTMCell / nn.GRUCell (weights copied from the layer).
    cell = (torch.nn.LSTMCell if problem.kind == "lstm" else torch.nn.GRUCell)(problem.inputs, problem.hidden)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(module, name + "_l0"))
    token = torch.ones((1, problem.inputs))
    zeros = torch.zeros((1, problem.hidden))
    carried = {"state": (zeros, zeros) if problem.kind == "lstm" else zeros}

    def stream():
        with torch.no_grad():
            carried["state"] = cell(token, carried["state"])
        return carried["state"]

    return Peer(name="torch", train=train, forward=forward, stream=stream)


def cudnn_peer(problem: Problem) -> Peer:
    """``jax.experimental.rnn`` (cuDNN); LSTM on a GPU backend only."""
    from jax.experimental import rnn

    B, T, I, H = problem.batch, problem.time, problem.inputs, problem.hidden
    num_params = rnn.get_num_params_in_lstm(I, H, 1, False)
    weights = jax.random.uniform(jax.random.key(0), (num_params,), jnp.float32, -(H**-0.5), H**-0.5)
    xs = jnp.asarray(problem.data())
    zeros = jnp.zeros((1, B, H), jnp.float32)
    lengths = jnp.full((B,), T, jnp.int32)

    def run(weights, xs, h0, c0, lengths):
        return rnn.lstm(xs, h0, c0, weights, lengths, I, H, 1, 0.0, False)

    def loss(weights, xs):
        return jnp.mean(run(weights, xs, zeros, zeros, lengths)[0] ** 2)

    token = jnp.ones((1, 1, I), jnp.float32)
    one = jnp.zeros((1, 1, H), jnp.float32)

    def step(weights, state, x):
        y, h, c = run(weights, x, state[0], state[1], jnp.ones((1,), jnp.int32))
        return (h, c), y

    return _jax_peer("jax.experimental.rnn (cuDNN)", loss, weights, xs, step, weights, (one, one), token)


# name -> (builder, module that must be importable, whether it needs a GPU, kinds it supports)
PEERS: dict[str, tuple[Callable[[Problem], Peer], str, bool, tuple[str, ...]]] = {
    "rnnjax": (rnnjax_peer, "jax", False, ("lstm", "gru")),
    "rnnjax (pure JAX)": (rnnjax_pure_jax_peer, "jax", False, ("lstm", "gru")),
    "flax.linen": (flax_linen_peer, "flax", False, ("lstm", "gru")),
    "flax.nnx": (flax_nnx_peer, "flax", False, ("lstm", "gru")),
    "equinox": (equinox_peer, "equinox", False, ("lstm", "gru")),
    "torch": (torch_peer, "torch", False, ("lstm", "gru")),
    "cudnn": (cudnn_peer, "jax", True, ("lstm",)),
}


def available(name: str, kind: str) -> tuple[bool, str]:
    """Whether peer ``name`` can run ``kind`` here, and why not."""
    _, module, needs_gpu, kinds = PEERS[name]
    if kind not in kinds:
        return False, f"no {kind}"
    if importlib.util.find_spec(module) is None:
        return False, f"{module} not installed"
    if needs_gpu and jax.default_backend() != "gpu":
        return False, "needs a GPU"
    return True, ""
