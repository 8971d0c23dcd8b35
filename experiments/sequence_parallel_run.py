"""How much memory does a device need for a million-step minGRU layer when time is split over 4 devices?

One minGRU layer (``I = H = 64``, batch 1) over ``T = 1,048,576`` steps, forward and backward (the gradient of
a scalar loss with respect to the parameters), run three ways on simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``, set by this script before JAX starts):

* ``unroll, 1 device``: :func:`rnnjax.unroll` (the cell's own fused sequential kernel), the reference;
* ``sequence_parallel, 1 device``: :func:`rnnjax.sequence_parallel.unroll` on a one-device mesh (the same
  coefficients-then-scan program as below, with no exchange);
* ``sequence_parallel, 4 devices``: the same with time sharded over 4 devices (``T/4`` steps each).

For each: XLA's compiled memory analysis per device (``compiled.memory_analysis()``: arguments, outputs,
temporaries, and their sum minus aliased buffers, the peak an allocator needs), compile time, and the wall time
of the compiled call (median of ``--repeats``). The loss and gradients of each sharded run are compared with
the reference (largest relative difference). The 4 simulated devices share the host's cores, so the wall times
say nothing about speed-up on real devices; the memory per device is the point.

Writes ``sequence_parallel_run.json`` and ``sequence_parallel_run.md`` (a table with device, date and versions)
into ``--out``.

Usage::

    python experiments/sequence_parallel_run.py --out results/sequence_parallel            # T = 1,048,576
    python experiments/sequence_parallel_run.py --quick --out results/sequence_parallel    # T = 65,536
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time


@dataclasses.dataclass
class Config:
    """Everything that defines a run."""

    steps: int = 1_048_576  # T, the sequence length
    batch: int = 1  # B
    input_size: int = 64  # I
    hidden_size: int = 64  # H
    devices: int = 4  # simulated CPU devices the time axis is sharded over
    repeats: int = 2  # timed calls per program (after one warm-up call); the median is reported
    seed: int = 0
    out: str = "results/sequence_parallel"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 65,536 (seconds)")
    parser.add_argument("--steps", type=int, help="override T")
    parser.add_argument("--repeats", type=int, help="timed calls per program")
    parser.add_argument("--out", default=Config.out)
    args = parser.parse_args(argv)
    config = Config(out=args.out)
    if args.quick:
        config = dataclasses.replace(config, steps=65_536)
    if args.steps:
        config = dataclasses.replace(config, steps=args.steps)
    if args.repeats:
        config = dataclasses.replace(config, repeats=args.repeats)
    # Before JAX starts: the simulated devices exist only if the flag is set when the CPU backend is created.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={config.devices}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if __package__ in (None, ""):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = run(config)
    write(config, rows)


def run(config: Config) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import rnnjax
    from rnnjax import sequence_parallel

    assert jax.device_count() >= config.devices, jax.devices()
    cell = rnnjax.MinGRU(hidden_size=config.hidden_size)
    params = cell.init(jax.random.key(config.seed), config.input_size)
    shape = (config.batch, config.steps, config.input_size)  # (B, T, I)
    xs_host = np.asarray(jax.random.normal(jax.random.key(config.seed + 1), shape, jnp.float32))

    def loss_of(forward):
        def loss(params, xs):
            carry, ys = forward(params, xs)  # ys (B, T, H)
            return jnp.mean(ys) + jnp.mean(carry.h)

        return jax.jit(jax.value_and_grad(loss))

    def sharded_forward(mesh):
        return lambda params, xs: sequence_parallel.unroll(cell, params, xs, mesh)

    one_mesh = Mesh(np.asarray(jax.devices()[:1]), ("time",))
    four_mesh = Mesh(np.asarray(jax.devices()[: config.devices]), ("time",))
    programs = [
        ("unroll, 1 device", one_mesh, loss_of(lambda params, xs: rnnjax.unroll(cell, params, xs))),
        ("sequence_parallel, 1 device", one_mesh, loss_of(sharded_forward(one_mesh))),
        (f"sequence_parallel, {config.devices} devices", four_mesh, loss_of(sharded_forward(four_mesh))),
    ]
    rows, reference = [], None
    for name, mesh, program in programs:
        xs = jax.device_put(xs_host, NamedSharding(mesh, PartitionSpec(None, "time", None)))  # T split over mesh
        placed = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        start = time.perf_counter()
        compiled = program.lower(placed, xs).compile()
        compile_seconds = time.perf_counter() - start
        memory = compiled.memory_analysis()
        value, grads = jax.block_until_ready(compiled(placed, xs))  # warm-up
        seconds = []
        for _ in range(config.repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(placed, xs))
            seconds.append(time.perf_counter() - start)
        result = (np.asarray(value), {k: np.asarray(v) for k, v in grads.items()})
        if reference is None:
            reference = result
        difference = max(
            _relative(result[0], reference[0]), *(_relative(result[1][k], reference[1][k]) for k in reference[1])
        )
        per_device = {
            "argument_bytes": int(memory.argument_size_in_bytes),
            "output_bytes": int(memory.output_size_in_bytes),
            "temp_bytes": int(memory.temp_size_in_bytes),
            "alias_bytes": int(memory.alias_size_in_bytes),
        }
        per_device["peak_bytes"] = (
            per_device["argument_bytes"]
            + per_device["output_bytes"]
            + per_device["temp_bytes"]
            - per_device["alias_bytes"]
        )
        rows.append(
            {
                "program": name,
                "devices": mesh.size,
                "xs_shard_shape": list(xs.addressable_shards[0].data.shape),
                **per_device,
                "compile_seconds": compile_seconds,
                "seconds": statistics.median(seconds),
                "loss": float(value),
                "max_relative_difference": difference,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _relative(got, want) -> float:
    import numpy as np

    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def write(config: Config, rows: list[dict]) -> None:
    import jax

    from experiments.compare import device_description

    os.makedirs(config.out, exist_ok=True)
    meta = {
        "config": dataclasses.asdict(config),
        "device": device_description(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "jax": jax.__version__,
        "python": sys.version.split()[0],
    }
    with open(os.path.join(config.out, "sequence_parallel_run.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    mib = 2**20
    lines = [
        f"minGRU, T = {config.steps:,}, B = {config.batch}, I = {config.input_size}, H = {config.hidden_size}; "
        f"forward + backward; {meta['device']}; jax {meta['jax']}; {meta['date']}",
        "",
        "| program | devices | xs per device | peak MiB / device | arguments | outputs | temporaries "
        "| compile s | call s | max rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['program']} | {r['devices']} | {tuple(r['xs_shard_shape'])} | {r['peak_bytes'] / mib:.1f} "
            f"| {r['argument_bytes'] / mib:.1f} | {r['output_bytes'] / mib:.1f} | {r['temp_bytes'] / mib:.1f} "
            f"| {r['compile_seconds']:.1f} | {r['seconds']:.1f} | {r['max_relative_difference']:.1e} |"
        )
    with open(os.path.join(config.out, "sequence_parallel_run.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
