"""``python -m rnnjax.bench``: rnnjax's LSTM and GRU against Flax, Equinox, PyTorch (and cuDNN on GPU).

For each peer it measures, in one process and interleaved round by round so that machine noise hits every
peer alike: train-step and forward time (tokens/s), per-token streaming latency at batch 1 (a jitted step; for
rnnjax also ``rnnjax.Streamer``, its native step on host buffers), compile time and XLA's memory estimate of the
train step. It prints a table with each peer's time divided by rnnjax's
(``> 1`` means rnnjax is faster) and writes a JSON record with the device, versions and settings.

Examples::

    python -m rnnjax.bench                                # LSTM and GRU, B=32 T=128 I=64 H=256
    python -m rnnjax.bench --kinds lstm --grid            # also sweep H, T and B against PyTorch
    python -m rnnjax.bench --quick --out /tmp/bench.json  # tiny sizes, seconds
    python -m rnnjax.bench --threads 1                    # everyone on one core (PyTorch, XLA, native kernels)

On the CPU, ``rnnjax`` is what a user gets (the native kernels when they were built, see
``rnnjax.kernels.native.status()``) and ``rnnjax (pure JAX)`` the same model with them switched off.
``--threads K`` pins the process to K cores before JAX starts its thread pools and gives PyTorch and the
native kernels K threads, so that contenders are compared at equal thread counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rnnjax.bench import peers as peer_lib
from rnnjax.bench.timing import environment, interleaved_medians

GRID = {  # one-dimensional sweeps around the base configuration
    "hidden": (64, 256, 1024),
    "time": (32, 512, 2048),
    "batch": (1, 256),
}


PAUSE_SECONDS = 0.25
"""Sleep, then one untimed call, before each timed call: PyTorch's OpenMP threads keep spinning for a while after
their work (measured: rnnjax's 2-thread LSTM forward took 11.7 ms right after a PyTorch call, 9.2 ms after a
0.1 s pause, 7.3 ms on its own) and would take the cores from whichever contender is timed next; the untimed
call wakes the timed contender's own threads, as in a loop of calls (after a bare pause PyTorch's 2-thread
forward took 17.6 ms instead of 6.5)."""


def measure(problem: peer_lib.Problem, names: list[str], repeats: int, stream_tokens: int) -> list[dict]:
    """Builds every available peer for ``problem`` and measures it; returns one record per peer."""
    built, skipped = {}, []
    for name in names:
        ok, why = peer_lib.available(name, problem.kind)
        if ok:
            built[name] = peer_lib.PEERS[name][0](problem)
        else:
            skipped.append({"peer": name, "skipped": why})
    train = interleaved_medians({n: p.train for n, p in built.items()}, repeats, pause=PAUSE_SECONDS)
    forward = interleaved_medians({n: p.forward for n, p in built.items()}, repeats, pause=PAUSE_SECONDS)
    streams = {n: _repeat(p.stream, stream_tokens) for n, p in built.items()}
    streams |= {f"{n} Streamer": _repeat(p.streamer, stream_tokens) for n, p in built.items() if p.streamer}
    stream = interleaved_medians(streams, max(3, repeats // 2), pause=PAUSE_SECONDS)
    tokens = problem.batch * problem.time
    records = []
    for name, peer in built.items():
        records.append(
            {
                "peer": name,
                "train_s": train[name],
                "forward_s": forward[name],
                "train_tokens_per_s": tokens / train[name],
                "forward_tokens_per_s": tokens / forward[name],
                "stream_us_per_token": stream[name] / stream_tokens * 1e6,
                "streamer_us_per_token": (
                    stream[f"{name} Streamer"] / stream_tokens * 1e6 if f"{name} Streamer" in stream else None
                ),
                "compile_s": peer.compile_seconds,
                "memory_bytes": peer.memory_bytes,
                "train_ratio": train[name] / train["rnnjax"] if "rnnjax" in train else None,
                "forward_ratio": forward[name] / forward["rnnjax"] if "rnnjax" in forward else None,
            }
        )
    return records + skipped


def _repeat(fn, n):
    def run():
        for _ in range(n):
            fn()

    return run


def format_table(problem: peer_lib.Problem, records: list[dict]) -> str:
    """A Markdown table of one problem's records."""
    head = (
        f"{problem.kind.upper()}  B={problem.batch} T={problem.time} I={problem.inputs} H={problem.hidden}\n\n"
        "| peer | train ms | ×rnnjax | fwd ms | ×rnnjax | train tok/s | stream µs/tok | Streamer µs/tok | compile s "
        "| mem MiB |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in records:
        if "skipped" in r:
            rows.append(f"| {r['peer']} | skipped: {r['skipped']} | | | | | | | | |")
            continue
        compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
        memory = "" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.1f}"
        streamer = "" if r["streamer_us_per_token"] is None else f"{r['streamer_us_per_token']:.0f}"
        rows.append(
            f"| {r['peer']} | {r['train_s'] * 1e3:.1f} | {r['train_ratio']:.2f} | {r['forward_s'] * 1e3:.1f} | "
            f"{r['forward_ratio']:.2f} | {r['train_tokens_per_s']:,.0f} | {r['stream_us_per_token']:.0f} | "
            f"{streamer} | {compile_s} | {memory} |"
        )
    return head + "\n".join(rows) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rnnjax.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default="lstm,gru", help="comma-separated: lstm, gru")
    parser.add_argument("--peers", default=",".join(peer_lib.PEERS), help="comma-separated peer names")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--time", type=int, default=128)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per measurement (median)")
    parser.add_argument("--stream-tokens", type=int, default=50, help="tokens per streaming measurement")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="pin to this many cores and give PyTorch and the native kernels as many threads (default: all)",
    )
    parser.add_argument("--grid", action="store_true", help="also sweep H, T and B (train step and forward)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats, for smoke tests")
    parser.add_argument("--out", default=None, help="write the JSON record here")
    args = parser.parse_args(argv)
    for name in args.peers.split(","):
        if name not in peer_lib.PEERS:
            parser.error(f"--peers: unknown peer {name!r}; expected some of {sorted(peer_lib.PEERS)}")
    for kind in args.kinds.split(","):
        if kind not in ("lstm", "gru"):
            parser.error(f"--kinds: unknown kind {kind!r}; expected lstm or gru")
    if args.threads is not None and not 1 <= args.threads <= len(os.sched_getaffinity(0)):
        parser.error(f"--threads must lie in [1, {len(os.sched_getaffinity(0))}] (usable cores), got {args.threads}")
    if args.quick:
        args.batch, args.time, args.inputs, args.hidden = 4, 16, 8, 16
        args.repeats, args.stream_tokens = 2, 5
    return args


def set_threads(count: int) -> None:
    """Pins this process to ``count`` cores (threads started later inherit it) and sets PyTorch's and the native
    kernels' thread counts to ``count``. Call before JAX runs anything, so that XLA's thread pools are pinned too."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:count])
    from rnnjax.kernels import native

    native.set_threads(count)
    if peer_lib.available("torch", "lstm")[0]:
        import torch

        torch.set_num_threads(count)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        set_threads(args.threads)
    names = args.peers.split(",")
    record = {"settings": vars(args), "environment": environment(), "results": [], "grid": []}
    env = record["environment"]
    from rnnjax.kernels import native

    env["native_kernels"] = native.status()
    env["threads"] = args.threads or len(os.sched_getaffinity(0))
    print(f"# {env['backend']} ({env['device']}; {env['cpu']}, {env['cpu_count']} cpus) {env['date']}", flush=True)
    print(f"# {env['threads']} thread(s); {env['native_kernels']}", flush=True)
    for kind in args.kinds.split(","):
        problem = peer_lib.Problem(kind, args.batch, args.time, args.inputs, args.hidden)
        records = measure(problem, names, args.repeats, args.stream_tokens)
        record["results"].append({"problem": vars(problem), "records": records})
        print(format_table(problem, records), flush=True)
        if args.grid:
            record["grid"].extend(run_grid(problem, args.repeats, names))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.out}")
    return 0


GRID_PEERS = ("rnnjax", "rnnjax (pure JAX)", "torch", "flax.linen")


def run_grid(base: peer_lib.Problem, repeats: int, names: list[str] | None = None) -> list[dict]:
    """Train-step and forward time of rnnjax, its pure-JAX path, torch and flax (those of them in ``names``)
    along one-dimensional sweeps of H, T and B around ``base``; ratios are peer / rnnjax (> 1: rnnjax is
    faster)."""
    wanted = [name for name in GRID_PEERS if names is None or name in names or name == "rnnjax"]
    grid_peers = [name for name in wanted if peer_lib.available(name, base.kind)[0]]
    others = [name for name in grid_peers if name != "rnnjax"]
    rows = []
    print(f"\n{base.kind.upper()} grid (ms; ratio = peer / rnnjax)\n")
    print(
        "| B | T | H | "
        + " | ".join(f"{n} train" for n in grid_peers)
        + " | "
        + " | ".join(f"{n} / rnnjax train" for n in others)
        + " | "
        + " | ".join(f"{n} fwd" for n in grid_peers)
        + " | "
        + " | ".join(f"{n} / rnnjax fwd" for n in others)
        + " |"
    )
    print("|---:|---:|---:|" + "---:|" * (2 * len(grid_peers) + 2 * len(others)))
    for field, values in GRID.items():
        for value in values:
            problem = peer_lib.Problem(
                base.kind,
                value if field == "batch" else base.batch,
                value if field == "time" else base.time,
                base.inputs,
                value if field == "hidden" else base.hidden,
            )
            built = {name: peer_lib.PEERS[name][0](problem) for name in grid_peers}
            rounds = max(3, repeats // 2)
            train = interleaved_medians({n: p.train for n, p in built.items()}, rounds, 1, PAUSE_SECONDS)
            forward = interleaved_medians({n: p.forward for n, p in built.items()}, rounds, 1, PAUSE_SECONDS)
            rows.append({"problem": vars(problem), "train_s": train, "forward_s": forward})
            cells = [f"{train[n] * 1e3:.1f}" for n in grid_peers]
            cells += [f"{train[n] / train['rnnjax']:.2f}" for n in others]
            cells += [f"{forward[n] * 1e3:.1f}" for n in grid_peers]
            cells += [f"{forward[n] / forward['rnnjax']:.2f}" for n in others]
            print(f"| {problem.batch} | {problem.time} | {problem.hidden} | " + " | ".join(cells) + " |", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
