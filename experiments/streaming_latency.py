"""What does one more token cost? Per-token streaming latency and carried memory against context length.

A recurrent model streams with ``cell.step``: its state has a fixed size, so the cost of the next element
does not depend on how many came before. A transformer streams with a key/value cache that grows by one
position per element, and every new element reads the whole cache. This script measures both, at batch 1
(the latency a single user sees), for the recurrent cells and the causal transformer of
``experiments/zoo.py``, all at the same parameter count on the same stand-in task (a 64-symbol language
model, one prediction per step). Weights are random: speed does not depend on training.

For each context length ``L`` the transformer's cache already holds ``L`` positions (random keys and values:
attention's cost does not depend on them), and the timed call consumes element ``L + 1``. Each timing is the
median of 5 batches of back-to-back calls of a jitted step (:func:`rnnjax.bench.timing.per_call_seconds`).

Writes into ``--out``:

* ``streaming_latency.csv``: ``model, params, context, seconds_per_token, state_bytes`` (``state_bytes``:
  memory carried from one step to the next: the recurrent carry, or the transformer's cache);
* ``streaming_latency.md``: the same as a table, with device and versions;
* ``streaming_latency.png``: latency and carried memory against context, log-log.

Usage::

    python experiments/streaming_latency.py --quick --out results/streaming      # about 20 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make `experiments` and `rnnjax` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import zoo  # noqa: E402
from experiments.compare import device_description  # noqa: E402
from rnnjax.bench.timing import per_call_seconds  # noqa: E402

DEFAULT_MODELS = (
    "simple",
    "lstm",
    "gru",
    "slstm",
    "mingru",
    "minlstm",
    "lru",
    "rglru",
    "griffin",
    "mamba2",
    "mlstm",
    "gated_deltanet",
    "transformer",
)


@dataclasses.dataclass
class Config:
    """Everything that defines a streaming-latency run."""

    models: tuple[str, ...] = DEFAULT_MODELS  # names from experiments/zoo.py (bidirectional ones cannot stream)
    params: int = 200_000  # parameter count every model is matched to
    contexts: tuple[int, ...] = (16, 64, 256, 1024, 4096, 16384, 65536)  # elements already seen
    repeats: int = 5  # timing batches per point (the median is kept)
    min_seconds: float = 0.2  # wall time spent timing each point
    out: str = "results/streaming"
    preset: str = "full"


def quick_config(**overrides) -> Config:
    """The ``--quick`` size: about 20 seconds on 2 CPU cores."""
    return dataclasses.replace(Config(params=50_000, contexts=(16, 128, 1024, 8192), preset="quick"), **overrides)


def tiny_config(**overrides) -> Config:
    """A smoke test of a few seconds (tests)."""
    base = Config(models=("gru", "transformer"), params=2_000, contexts=(4, 32), repeats=2, min_seconds=0.01)
    return dataclasses.replace(base, preset="tiny", **overrides)


def carried_bytes(state) -> int:
    """Bytes of every array in a streaming state (a recurrent carry or a key/value cache)."""
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state)))


def measure(config: Config) -> list[dict]:
    """One row per (model, context): seconds per streamed token and the bytes carried between steps."""
    spec = zoo.BenchSpec()
    rows = []
    for name in config.models:
        if not zoo.available(name):
            print(f"skipping {name}: not available in this installation", flush=True)
            continue
        model, num_params = zoo.matched(spec, name, config.params)
        fns = zoo.stream_fns(model)
        if fns is None:
            print(f"skipping {name}: it cannot stream (it reads the future)", flush=True)
            continue
        init_state, step = fns
        step = jax.jit(step)
        params = model.init(jax.random.key(0))
        x = np.zeros((1,), np.int32)  # one token, batch 1
        for context in config.contexts:
            state = init_state(context + 1)
            if hasattr(state, "pos"):  # a KV cache: fill `context` positions, the next step writes one more
                k = jax.random.normal(jax.random.key(context), state.k.shape, state.k.dtype)
                state = state._replace(k=k, v=k, pos=np.full(state.pos.shape, context, state.pos.dtype))
            seconds = per_call_seconds(step, params, state, x, repeats=config.repeats, min_seconds=config.min_seconds)
            rows.append(
                dict(
                    model=name,
                    params=num_params,
                    context=context,
                    seconds_per_token=seconds,
                    state_bytes=carried_bytes(state),
                )
            )
        latencies = " ".join(f"{r['seconds_per_token'] * 1e6:.0f}" for r in rows if r["model"] == name)
        print(f"{name:12s} {num_params:>8,} params: µs/token {latencies}", flush=True)
    return rows


def write(config: Config, rows: list[dict], wall_seconds: float) -> None:
    """Writes the CSV, the markdown table and the plot into ``config.out``."""
    os.makedirs(config.out, exist_ok=True)
    with open(os.path.join(config.out, "streaming_latency.csv"), "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, ["model", "params", "context", "seconds_per_token", "state_bytes"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "seconds_per_token": f"{row['seconds_per_token']:.6g}"})

    models = list(dict.fromkeys(r["model"] for r in rows))
    contexts = sorted({r["context"] for r in rows})
    table = {(r["model"], r["context"]): r for r in rows}
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Streaming: per-token latency against context length (batch 1)",
        "",
        f"Device: {device_description()}; jax {jax.__version__}; date {now}; preset `{config.preset}`, "
        f"wall time {wall_seconds:.0f} s. Models matched to about {config.params:,} parameters (random weights).",
        "",
        "| model | params | " + " | ".join(f"µs/token @{c}" for c in contexts) + " | carried @" + f"{contexts[-1]} |",
        "|---|---|" + "---|" * (len(contexts) + 1),
    ]
    for m in models:
        cells = [f"{table[(m, c)]['seconds_per_token'] * 1e6:.0f}" if (m, c) in table else "–" for c in contexts]
        last = table.get((m, contexts[-1]))
        carried = f"{last['state_bytes'] / 1024:,.1f} KiB" if last else "–"
        params = next(r["params"] for r in rows if r["model"] == m)
        lines.append(f"| {m} | {params:,} | " + " | ".join(cells) + f" | {carried} |")
    report = "\n".join(lines) + "\n"
    with open(os.path.join(config.out, "streaming_latency.md"), "w", encoding="utf-8") as file:
        file.write(report)
    print(report)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for m in models:
        points = [(c, table[(m, c)]) for c in contexts if (m, c) in table]
        xs = [c for c, _ in points]
        axes[0].loglog(xs, [r["seconds_per_token"] * 1e6 for _, r in points], marker="o", ms=3, label=m)
        axes[1].loglog(xs, [r["state_bytes"] / 1024 for _, r in points], marker="o", ms=3, label=m)
    axes[0].set_xlabel("context length (elements already seen)")
    axes[0].set_ylabel("latency per new element (µs)")
    axes[0].set_title(f"Per-token latency, batch 1, {jax.default_backend().upper()}")
    axes[1].set_xlabel("context length")
    axes[1].set_ylabel("memory carried between steps (KiB)")
    axes[1].set_title("State (RNN) against KV cache (transformer)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(config.out, "streaming_latency.png"), dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the CPU size: about 20 seconds on 2 cores")
    size.add_argument("--tiny", action="store_true", help="a smoke test of a few seconds (for tests)")
    parser.add_argument("--models", help=f"comma-separated model names (default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--contexts", help="comma-separated context lengths (overrides the preset)")
    parser.add_argument("--params", type=int, help="parameter count every model is matched to")
    parser.add_argument("--out", default="results/streaming", help="output folder (default: results/streaming)")
    args = parser.parse_args(argv)
    overrides: dict = dict(out=args.out)
    if args.models:
        overrides["models"] = tuple(m.strip().lower() for m in args.models.split(",") if m.strip())
        unknown = [m for m in overrides["models"] if m not in zoo.ALL_MODELS]
        if unknown:
            parser.error(f"--models: unknown model(s) {unknown}; known: {', '.join(zoo.ALL_MODELS)}")
    if args.contexts:
        try:
            overrides["contexts"] = tuple(int(c) for c in args.contexts.split(","))
        except ValueError:
            parser.error(f"--contexts: expected comma-separated integers, got {args.contexts!r}")
        if any(c < 0 for c in overrides["contexts"]):
            parser.error(f"--contexts: expected non-negative lengths, got {args.contexts!r}")
    if args.params is not None:
        if args.params <= 0:
            parser.error(f"--params: expected a positive count, got {args.params}")
        overrides["params"] = args.params
    if args.tiny:
        return tiny_config(**overrides)
    if args.quick:
        return quick_config(**overrides)
    return dataclasses.replace(Config(), **overrides)


def main(argv: list[str] | None = None) -> list[dict]:
    """Measures and writes the report; returns the rows."""
    start = time.perf_counter()
    config = parse_args(argv)
    rows = measure(config)
    write(config, rows, time.perf_counter() - start)
    print(f"wrote {config.out}/streaming_latency.csv, .md, .png in {time.perf_counter() - start:.1f}s")
    return rows


if __name__ == "__main__":
    main()
