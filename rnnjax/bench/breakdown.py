"""``python -m rnnjax.bench.breakdown``: where an LSTM forward pass spends its time on this backend.

Splits rnnjax's fused LSTM forward pass (one ``[x_t, h] @ [W_ih; W_hh]`` matmul and the gates per step,
inside ``lax.scan``) into parts, each timed as its own jitted program, all interleaved repeat by repeat so
that the ratios share the machine's noise:

* ``torch``: PyTorch's ``nn.LSTM`` forward pass (when torch is installed), the reference;
* ``scan_matmul``: a ``lax.scan`` whose body is only the step's matmul (no gates): the loop's floor;
* ``scan_lstm``: the same scan with the LSTM gates, i.e. the fused forward pass;
* ``scan_hoisted``: the textbook alternative: ``xs @ W_ih`` for all steps first, then a scan of
  ``h @ W_hh`` and the gates;
* ``rnnjax``: ``rnnjax.unroll`` of ``rnnjax.LSTM`` (what users call);
* ``one_matmul``: the ``(T*B, I+H) @ (I+H, 4H)`` matmul of every step at once: the matmul's cost without a loop;
* ``gates_all``: the gate nonlinearities on all ``(T, B, 4H)`` pre-activations at once;

and, with ``--unroll``, rnnjax's forward and train step for several ``lax.scan`` unroll factors. On XLA's CPU
backend ``scan_matmul`` alone already exceeds ``torch``: per-step dispatch, not arithmetic, is the limit
(docs/benchmarks.md).

Usage::

    python -m rnnjax.bench.breakdown                      # B=32, T=128, I=64, H=256, median of 9
    python -m rnnjax.bench.breakdown --unroll 1,2,4,8,16 --out breakdown.json
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.bench.timing import environment, interleaved_medians

DESCRIPTIONS = {
    "torch": "PyTorch nn.LSTM, whole forward pass",
    "scan_matmul": "lax.scan whose body is only the step's [x_t, h] @ W matmul (no gates)",
    "scan_lstm": "the same scan with the LSTM gates (rnnjax's fused forward)",
    "scan_hoisted": "xs @ W_ih hoisted out of the loop, then a scan of h @ W_hh and the gates",
    "rnnjax": "rnnjax.unroll(rnnjax.LSTM(...)), forward",
    "one_matmul": "one (T*B, I+H) @ (I+H, 4H) matmul, all steps at once",
    "gates_all": "the gate nonlinearities on all (T, B, 4H) at once",
}


def parts(batch: int, time: int, inputs: int, hidden: int) -> dict:
    """The blocking callables to time, by name (see the module docstring)."""
    import rnnjax

    B, T, I, H = batch, time, inputs, hidden
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((T, B, I), dtype=np.float32))  # time-major (T, B, I)
    w = jnp.asarray(rng.standard_normal((I + H, 4 * H), dtype=np.float32) * 0.05)  # (I + H, 4H)
    b = jnp.zeros((4 * H,), jnp.float32)

    def scan_matmul(w, xs):
        def body(h, x):
            z = jnp.concatenate([x, h], axis=-1) @ w  # (B, 4H)
            return z[:, :H], None

        return jax.lax.scan(body, jnp.zeros((B, H)), xs)[0]

    def scan_lstm(w, b, xs):
        def body(carry, x):
            h, c = carry  # (B, H) each
            z = jnp.concatenate([x, h], axis=-1) @ w + b  # (B, 4H)
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        return jax.lax.scan(body, (jnp.zeros((B, H)), jnp.zeros((B, H))), xs)[1]  # (T, B, H)

    def scan_hoisted(w, b, xs):
        projected = xs @ w[:I] + b  # (T, B, 4H): the input projection of every step at once

        def body(carry, z_x):
            h, c = carry  # (B, H) each
            z = z_x + h @ w[I:]  # (B, 4H)
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        return jax.lax.scan(body, (jnp.zeros((B, H)), jnp.zeros((B, H))), projected)[1]  # (T, B, H)

    def gates_all(z):
        i, f, g, o = jnp.split(z, 4, axis=-1)
        return jax.nn.sigmoid(f) * jax.nn.sigmoid(i) * jnp.tanh(g) * jax.nn.sigmoid(o)

    cell = rnnjax.LSTM(hidden_size=H)
    params = cell.init(jax.random.key(0), I)
    flat = jnp.asarray(rng.standard_normal((T * B, I + H), dtype=np.float32))  # (T*B, I+H)
    pre = jnp.asarray(rng.standard_normal((T, B, 4 * H), dtype=np.float32))  # (T, B, 4H)
    jitted = {
        "scan_matmul": (jax.jit(scan_matmul), (w, xs)),
        "scan_lstm": (jax.jit(scan_lstm), (w, b, xs)),
        "scan_hoisted": (jax.jit(scan_hoisted), (w, b, xs)),
        "rnnjax": (jax.jit(lambda p, x: rnnjax.unroll(cell, p, x, time_major=True)[1]), (params, xs)),
        "one_matmul": (jax.jit(jnp.matmul), (flat, w)),
        "gates_all": (jax.jit(gates_all), (pre,)),
    }
    out = {}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.manual_seed(0)
        module = torch.nn.LSTM(I, H)
        xs_torch = torch.from_numpy(np.array(xs))  # a writable copy

        def torch_forward():
            with torch.no_grad():
                return module(xs_torch)[0]

        out["torch"] = torch_forward
    for name, (fn, args) in jitted.items():
        out[name] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
    return out


def unroll_sweep(factors: list[int], batch: int, time: int, inputs: int, hidden: int, repeats: int) -> list[dict]:
    """rnnjax's LSTM forward and train step (grad of ``mean(ys**2)``) for each ``lax.scan`` unroll factor."""
    import rnnjax

    cell = rnnjax.LSTM(hidden_size=hidden)
    params = cell.init(jax.random.key(0), inputs)
    xs = jnp.asarray(np.random.default_rng(1).standard_normal((batch, time, inputs), dtype=np.float32))
    rows = []
    for factor in factors:
        forward = jax.jit(lambda p, x, u=factor: rnnjax.unroll(cell, p, x, unroll=u)[1])
        train = jax.jit(jax.grad(lambda p, x, u=factor: jnp.mean(rnnjax.unroll(cell, p, x, unroll=u)[1] ** 2)))
        medians = interleaved_medians(
            {
                "forward": lambda fn=forward: jax.block_until_ready(fn(params, xs)),
                "train": lambda fn=train: jax.block_until_ready(fn(params, xs)),
            },
            repeats,
        )
        rows.append({"unroll": factor, "forward_ms": medians["forward"] * 1e3, "train_ms": medians["train"] * 1e3})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--time", type=int, default=128)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds per part (median)")
    parser.add_argument("--unroll", help="comma-separated lax.scan unroll factors to sweep (e.g. 1,2,4,8)")
    parser.add_argument("--out", help="write the JSON record here")
    args = parser.parse_args(argv)
    for name in ("batch", "time", "inputs", "hidden", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    factors = []
    if args.unroll:
        try:
            factors = [int(f) for f in args.unroll.split(",")]
        except ValueError:
            parser.error(f"--unroll: expected comma-separated integers, got {args.unroll!r}")
        if any(f < 1 for f in factors):
            parser.error(f"--unroll: factors must be at least 1, got {args.unroll!r}")

    env = environment()
    shape = dict(batch=args.batch, time=args.time, inputs=args.inputs, hidden=args.hidden)
    medians = interleaved_medians(parts(**shape), args.repeats)
    print(f"# {env['backend']} ({env['device']}; {env['cpu']}, {env['cpu_count']} cpus) {env['date']}")
    print(f"LSTM forward, B={args.batch} T={args.time} I={args.inputs} H={args.hidden}, median of {args.repeats}\n")
    print("| part | what | ms |\n|---|---|---:|")
    for name, seconds in medians.items():
        print(f"| {name} | {DESCRIPTIONS[name]} | {seconds * 1e3:.2f} |")
    record = {"settings": vars(args), "environment": env, "parts_ms": {k: v * 1e3 for k, v in medians.items()}}
    if factors:
        record["unroll"] = unroll_sweep(factors, repeats=args.repeats, **shape)
        print("\n| unroll | forward ms | train ms |\n|---:|---:|---:|")
        for row in record["unroll"]:
            print(f"| {row['unroll']} | {row['forward_ms']:.1f} | {row['train_ms']:.1f} |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=2)
        print(f"\nwrote {args.out}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
