"""``python -m rnnjax.bench.longseq``: memory of long-sequence training and compile time against T.

Two questions from the benchmark brief:

1. Can a T=65,536, B=8, H=256 LSTM train within 4 GiB? For each ``remat`` setting of :func:`rnnjax.unroll`
   it reports XLA's memory estimate of the compiled train step (arguments + outputs + temporaries), and runs
   the step once to confirm that it executes.
2. Is the compile time of a 2-layer bidirectional LSTM small and independent of T? It times lower + compile of
   the train step for several T.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import rnnjax
from rnnjax.bench.timing import compile_seconds_and_memory, environment, seconds_of


def lstm_train_memory(time_steps: int, batch: int, inputs: int, hidden: int, remat, run: bool) -> dict:
    """XLA's memory estimate (bytes) of an LSTM train step, and its run time if ``run``."""
    cell = rnnjax.LSTM(hidden_size=hidden)
    params = cell.init(jax.random.key(0), inputs)
    xs = jax.random.normal(jax.random.key(1), (batch, time_steps, inputs))

    def loss(params, xs):
        return jnp.mean(rnnjax.unroll(cell, params, xs, remat=remat)[1] ** 2)

    step = jax.jit(jax.grad(loss))
    compile_s, memory = compile_seconds_and_memory(step, params, xs)
    record = {
        "T": time_steps,
        "B": batch,
        "I": inputs,
        "H": hidden,
        "remat": remat,
        "memory_bytes": memory,
        "compile_s": compile_s,
    }
    if run:
        record["run_s"] = seconds_of(lambda: jax.block_until_ready(step(params, xs)))
    return record


def bilstm_compile_seconds(time_steps: int, batch: int = 8, inputs: int = 64, hidden: int = 256) -> float:
    """Lower + compile time of a 2-layer bidirectional LSTM train step at sequence length ``time_steps``."""
    layer = rnnjax.Bidirectional(rnnjax.LSTM(hidden_size=hidden))
    model = rnnjax.Stack([layer, layer])
    params = model.init(jax.random.key(0), inputs)
    xs = jnp.zeros((batch, time_steps, inputs))

    def loss(params, xs):
        return jnp.mean(model.apply(params, xs)[1] ** 2)

    return compile_seconds_and_memory(jax.jit(jax.grad(loss)), params, xs)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnjax.bench.longseq", description=__doc__.split("\n")[0])
    parser.add_argument("--time", type=int, default=65536, help="T of the memory measurement")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--no-run", action="store_true", help="only compile (no execution)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    parser.add_argument("--out", default=None, help="write the JSON record here")
    args = parser.parse_args(argv)
    if args.quick:
        args.time, args.batch, args.inputs, args.hidden = 256, 2, 4, 8
    env = environment()
    print(f"# {env['backend']} ({env['cpu']}) {env['date']}")
    print(f"\nLSTM train step, T={args.time} B={args.batch} I={args.inputs} H={args.hidden}\n")
    print("| remat | XLA memory estimate (MiB) | compile s | run s |\n|---|---:|---:|---:|")
    memory_rows = []
    for remat in (False, True, 64, 256):
        row = lstm_train_memory(args.time, args.batch, args.inputs, args.hidden, remat, run=not args.no_run)
        memory_rows.append(row)
        memory = "n/a" if row["memory_bytes"] is None else f"{row['memory_bytes'] / 2**20:,.0f}"
        run_s = f"{row['run_s']:.1f}" if "run_s" in row else "-"
        print(f"| {remat} | {memory} | {row['compile_s']:.2f} | {run_s} |", flush=True)
    print("\n2-layer bidirectional LSTM train step: compile seconds against T\n")
    print("| T | compile s |\n|---:|---:|")
    compile_rows = []
    for time_steps in (16, 256, 4096, 65536) if not args.quick else (16, 64):
        seconds = bilstm_compile_seconds(time_steps, *((2, 4, 8) if args.quick else ()))
        compile_rows.append({"T": time_steps, "compile_s": seconds})
        print(f"| {time_steps} | {seconds:.2f} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"environment": env, "settings": vars(args), "memory": memory_rows, "compile": compile_rows},
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
