"""``python -m rnnjax.bench.cells``: every registered cell on one footing: train step against T, streaming step.

One layer of each cell (``rnnjax.make_cell(name, hidden_size=H)`` with its default options) over inputs of width
``H``, so that the cells differ only in their recurrence. For each cell and sequence length ``T`` it reports:

* the train step: ``jax.grad`` of the mean squared output of :func:`rnnjax.unroll` (the path training takes:
  the native kernels, a chunked or parallel scan, or ``lax.scan`` of the step), median wall seconds and tokens
  per second;
* the forward pass alone;
* the compile time of the train step (lower + compile, so XLA's work, not the run);

and, once per cell, the streaming step at batch 1 (a jitted ``cell.step``; median over batches of back-to-back
calls) with the bytes the carry holds. Cells are interleaved round by round (:func:`interleaved_medians`), so
machine noise hits every cell alike. Cell widths are equal, parameter counts are not: the table lists them.

Examples::

    python -m rnnjax.bench.cells                                   # all cells, H=128, B=8, T in 256, 1024, 4096
    python -m rnnjax.bench.cells --cells lstm,mamba2 --times 512    # a subset
    python -m rnnjax.bench.cells --quick --out /tmp/cells.json     # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax
from rnnjax.bench.timing import compile_seconds_and_memory, environment, interleaved_medians, per_call_seconds


def _train_and_forward(cell, params, xs):
    """Jitted ``(train step, forward)`` of one cell layer on ``xs`` ``(B, T, H)``."""

    def loss(params, xs):
        return jnp.mean(rnnjax.unroll(cell, params, xs)[1].astype(jnp.float32) ** 2)

    train = jax.jit(jax.grad(loss))
    forward = jax.jit(lambda params, xs: rnnjax.unroll(cell, params, xs)[1])
    return train, forward


def measure(names: list[str], hidden: int, batch: int, times: list[int], repeats: int) -> list[dict]:
    """One record per cell and ``T`` (``kind="sequence"``) and one per cell (``kind="stream"``)."""
    cells = {name: rnnjax.make_cell(name, hidden_size=hidden) for name in names}
    params = {name: cell.init(jax.random.key(0), hidden) for name, cell in cells.items()}
    records = []
    for num_steps in times:
        xs = jnp.asarray(np.random.default_rng(0).standard_normal((batch, num_steps, hidden)), jnp.float32)
        trains, forwards = {}, {}
        for name, cell in cells.items():
            train, forward = _train_and_forward(cell, params[name], xs)
            compile_s, memory = compile_seconds_and_memory(train, params[name], xs)
            trains[name] = lambda train=train, p=params[name], xs=xs: jax.block_until_ready(train(p, xs))
            forwards[name] = lambda forward=forward, p=params[name], xs=xs: jax.block_until_ready(forward(p, xs))
            records.append(
                {"kind": "sequence", "cell": name, "T": num_steps, "compile_s": compile_s, "memory_bytes": memory}
            )
        train_s = interleaved_medians(trains, repeats)
        forward_s = interleaved_medians(forwards, repeats)
        for record in records:
            if record["kind"] == "sequence" and record["T"] == num_steps:
                record["train_s"] = train_s[record["cell"]]
                record["forward_s"] = forward_s[record["cell"]]
                record["train_tokens_per_s"] = batch * num_steps / record["train_s"]
    for name, cell in cells.items():
        step = jax.jit(cell.step)
        carry = cell.initial_carry(1)
        x = jnp.ones((1, hidden), jnp.float32)
        records.append(
            {
                "kind": "stream",
                "cell": name,
                "step_s": per_call_seconds(step, params[name], carry, x),
                "carry_bytes": int(sum(leaf.nbytes for leaf in jax.tree.leaves(carry))),
                "params": int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params[name]))),
            }
        )
    return records


def table(records: list[dict], names: list[str], times: list[int]) -> list[str]:
    """Markdown: train and forward ms per ``T``, compile seconds at the longest ``T``, the streaming step."""
    by = {(r["cell"], r.get("T")): r for r in records}
    lines = [
        "| cell | params | "
        + " | ".join(f"train ms T={t}" for t in times)
        + " | "
        + " | ".join(f"fwd ms T={t}" for t in times)
        + f" | compile s T={times[-1]} | stream µs (B=1) | carry bytes |",
        "|---|---:|" + "---:|" * (2 * len(times) + 3),
    ]
    for name in names:
        stream = by[(name, None)]
        train = " | ".join(f"{by[(name, t)]['train_s'] * 1e3:.1f}" for t in times)
        forward = " | ".join(f"{by[(name, t)]['forward_s'] * 1e3:.1f}" for t in times)
        lines.append(
            f"| {name} | {stream['params']:,} | {train} | {forward} | {by[(name, times[-1])]['compile_s']:.2f} | "
            f"{stream['step_s'] * 1e6:.0f} | {stream['carry_bytes']:,} |"
        )
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m rnnjax.bench.cells", description=__doc__.splitlines()[0])
    parser.add_argument("--cells", help=f"comma-separated cell names (default: all: {','.join(rnnjax.cell_names())})")
    parser.add_argument("--hidden", type=int, default=128, help="H, also the input width")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--times", default="256,1024,4096", help="comma-separated sequence lengths")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per contender (the median is kept)")
    parser.add_argument("--quick", action="store_true", help="H=16, B=2, T=16,64, 3 repeats: seconds")
    parser.add_argument("--out", help="write the JSON record here")
    args = parser.parse_args(argv)
    names = rnnjax.cell_names() if not args.cells else [n.strip() for n in args.cells.split(",") if n.strip()]
    unknown = [n for n in names if n not in rnnjax.cell_names(aliases=True)]
    if unknown:
        parser.error(f"unknown cell(s) {unknown}; registered: {', '.join(rnnjax.cell_names())}")
    if args.quick:
        args.hidden, args.batch, args.times, args.repeats = 16, 2, "16,64", 3
    times = [int(t) for t in args.times.split(",")]
    records = measure(names, args.hidden, args.batch, times, args.repeats)
    env = environment()
    print(f"{env['device']} ({env['cpu']}), jax {env['versions']['jax']}, {env['date']}")
    print(f"one layer, H = I = {args.hidden}, B = {args.batch}; train = grad of the mean squared output")
    print("\n".join(table(records, names, times)))
    if args.out:
        settings = {"hidden": args.hidden, "batch": args.batch, "times": times, "repeats": args.repeats}
        with open(args.out, "w") as f:
            json.dump({"environment": env, "settings": settings, "records": records}, f, indent=1)
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
