"""``python -m rnnjax.bench.parallel_scan``: how cheap is training the parallel-scan cells?

Measures the train step (forward + backward of a mean-square loss with respect to the parameters, no optimiser
update) of a one-layer model, time-major ``(T, B, I)`` inputs and ``(T, B, O)`` targets, and prints:

1. **The reference configuration** (T=4,096, B=16, I=64, H=256): minGRU against PyTorch's ``nn.GRU`` on CPU
   (target ≥ 10× faster), against a straightforward JAX minGRU (projection, gates, ``lax.scan``), and against
   **the floor**: the same model with the recurrence removed (one ``(I, 2H)`` input matmul,
   ``y_t = σ(k_t) ⊙ g(h̃_t)``; target: minGRU ≤ 1.1× the floor).
2. **A sweep over T** (64 to 16,384): minGRU, minLSTM, LRU, rnnjax's GRU and LSTM, PyTorch's GRU and the
   floor; and the three solvers of :func:`rnnjax.linear_recurrence.linear_scan` on ``(T, B, H)`` coefficients (the data
   behind :func:`rnnjax.linear_recurrence.default_method`).

Every configuration is timed in the same process, contenders interleaved repeat by repeat, and the median is
reported, so ratios are taken within one run on one machine. Wall time is the measure; process CPU time is
recorded beside it (on a shared machine it shows how much of a wall time was waiting). PyTorch is timed with
1 and with as many threads as JAX uses (``--torch-threads``), and the faster is used for the ratio.

``--quick`` runs the configuration with fewer repeats and a sweep up to T=1,024 (a few minutes on 2 cores);
``--out FILE.json`` writes every measurement with device, versions and date.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp

import rnnjax
from rnnjax import linear_recurrence
from rnnjax.bench.timing import environment, interleaved_samples, seconds_of
from rnnjax.cells.lru import LRU
from rnnjax.cells.minimal import MinGRU, MinLSTM
from rnnjax.kernels.minimal import g

ISSUE = {"T": 4096, "B": 16, "I": 64, "H": 256}
SWEEP_T = (64, 256, 1024, 4096, 16384)
QUICK_SWEEP_T = (64, 256, 1024)


# Contenders: each is a zero-argument function that runs one train step and blocks until it is done.


def _data(T: int, B: int, I: int, O: int):
    xs = jax.random.normal(jax.random.key(1), (T, B, I))
    targets = jax.random.normal(jax.random.key(2), (T, B, O))
    return xs, targets


def jax_cell_step(cell, T: int, B: int, I: int) -> Callable[[], object]:
    """Train step of one rnnjax cell through :func:`rnnjax.unroll` (time-major)."""
    params = cell.init(jax.random.key(0), I)
    xs, targets = _data(T, B, I, cell.output_size)

    def loss(params, xs, targets):
        _, ys = rnnjax.unroll(cell, params, xs, time_major=True)
        return jnp.mean((ys - targets) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    return lambda: jax.block_until_ready(step(params, xs, targets))


def floor_step(T: int, B: int, I: int, H: int) -> Callable[[], object]:
    """The minGRU with the recurrence removed: ``y_t = σ(k_t) ⊙ g(h̃_t)``, one ``(I, 2H)`` matmul."""
    params = MinGRU(hidden_size=H).init(jax.random.key(0), I)
    xs, targets = _data(T, B, I, H)

    def loss(params, xs, targets):
        proj = (xs.reshape(T * B, I) @ params["w_ih"] + params["b_ih"]).reshape(T, B, 2 * H)
        ys = jax.nn.sigmoid(proj[..., :H]) * g(proj[..., H:])
        return jnp.mean((ys - targets) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    return lambda: jax.block_until_ready(step(params, xs, targets))


def plain_mingru_step(T: int, B: int, I: int, H: int) -> Callable[[], object]:
    """A straightforward JAX minGRU: one projection, gates for the whole sequence, ``lax.scan``, autodiff."""
    params = MinGRU(hidden_size=H).init(jax.random.key(0), I)
    xs, targets = _data(T, B, I, H)

    def loss(params, xs, targets):
        proj = (xs.reshape(T * B, I) @ params["w_ih"] + params["b_ih"]).reshape(T, B, 2 * H)
        z, v = jax.nn.sigmoid(proj[..., :H]), g(proj[..., H:])

        def body(h, zv):
            h = (1 - zv[0]) * h + zv[0] * zv[1]
            return h, h

        _, ys = jax.lax.scan(body, jnp.zeros((B, H)), (z, v))
        return jnp.mean((ys - targets) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    return lambda: jax.block_until_ready(step(params, xs, targets))


def scan_step(method: str, T: int, B: int, H: int) -> Callable[[], object]:
    """Forward + backward of :func:`rnnjax.linear_recurrence.linear_scan` alone on ``(T, B, H)`` coefficients.

    The coefficients ``a`` lie in (0, 1).
    """
    a = jax.nn.sigmoid(jax.random.normal(jax.random.key(3), (T, B, H)))
    b = jax.random.normal(jax.random.key(4), (T, B, H))
    w = jax.random.normal(jax.random.key(5), (T, B, H))

    def loss(a, b):
        return jnp.sum(linear_recurrence.linear_scan(a, b, method=method)[1] * w)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(step(a, b))


def torch_gru_step(T: int, B: int, I: int, H: int, threads: int) -> Callable[[], object] | None:
    """PyTorch ``nn.GRU`` on CPU with ``threads`` threads, forward + backward; ``None`` without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    gru = torch.nn.GRU(I, H)
    xs, targets = torch.randn(T, B, I), torch.randn(T, B, H)

    def step():
        torch.set_num_threads(threads)
        gru.zero_grad(set_to_none=True)
        ys, _ = gru(xs)
        loss = ((ys - targets) ** 2).mean()
        loss.backward()
        return loss

    return step


# Timing.


def interleaved(
    contenders: dict[str, Callable[[], object]], repeats: int, budget_s: float = 90.0, label: str = ""
) -> dict[str, dict]:
    """Times every contender ``repeats`` times, interleaved; returns median wall and CPU seconds per name.

    Each contender runs once untimed first (compilation, allocator warm-up); one whose warm-up call took
    longer than ``budget_s / repeats`` gets fewer timed repeats (at least one), so that a slow baseline does
    not hold the whole run hostage.
    """
    counts = {}
    for name, fn in contenders.items():
        elapsed = seconds_of(fn)
        counts[name] = max(1, min(repeats, int(budget_s // max(elapsed, 1e-9))))
        print(f"  {label}{name}: warm-up {elapsed:.3f} s, {counts[name]} timed repeats", flush=True)
    samples = interleaved_samples(contenders, counts)
    return {
        name: {"wall_s": statistics.median(timed.wall), "cpu_s": statistics.median(timed.cpu), "walls": timed.wall}
        for name, timed in samples.items()
    }


def jax_threads() -> int:
    return os.cpu_count() or 1


def torch_contenders(T, B, I, H, threads: tuple[int, ...]) -> dict:
    out = {}
    for n in threads:
        step = torch_gru_step(T, B, I, H, n)
        if step is not None:
            out[f"torch_gru_{n}t"] = step
    return out


def best_torch(results: dict) -> tuple[str | None, float | None]:
    torch_names = [name for name in results if name.startswith("torch_gru")]
    if not torch_names:
        return None, None
    name = min(torch_names, key=lambda n: results[n]["wall_s"])
    return name, results[name]["wall_s"]


def issue_configuration(repeats: int, torch_threads: tuple[int, ...]) -> dict:
    T, B, I, H = ISSUE["T"], ISSUE["B"], ISSUE["I"], ISSUE["H"]
    contenders = {
        "mingru": jax_cell_step(MinGRU(hidden_size=H), T, B, I),
        "floor": floor_step(T, B, I, H),
        "mingru_plain_scan": plain_mingru_step(T, B, I, H),
        "mingru_associative": jax_cell_step(MinGRU(hidden_size=H, method="associative"), T, B, I),
        "mingru_log": jax_cell_step(MinGRU(hidden_size=H, method="log"), T, B, I),
        **torch_contenders(T, B, I, H, torch_threads),
    }
    results = interleaved(contenders, repeats, label="T=4096 ")
    mingru = results["mingru"]["wall_s"]
    torch_name, torch_s = best_torch(results)
    ratios = {
        "mingru / floor": mingru / results["floor"]["wall_s"],
        "plain_scan / mingru": results["mingru_plain_scan"]["wall_s"] / mingru,
        "associative / mingru": results["mingru_associative"]["wall_s"] / mingru,
        "log / mingru": results["mingru_log"]["wall_s"] / mingru,
    }
    if torch_s is not None:
        ratios[f"{torch_name} / mingru"] = torch_s / mingru
    return {"config": dict(ISSUE), "results": results, "ratios": ratios}


def sweep(
    lengths: tuple[int, ...],
    repeats: int,
    torch_threads: tuple[int, ...],
    max_torch_t: int,
    max_seconds: float,
    on_row: Callable[[list], None] = lambda rows: None,
) -> list:
    """Times every contender at every T; a contender whose median passed ``max_seconds`` is dropped for longer T."""
    B, I, H = ISSUE["B"], ISSUE["I"], ISSUE["H"]
    rows, dropped = [], set()
    for T in lengths:
        contenders = {
            "mingru": jax_cell_step(MinGRU(hidden_size=H), T, B, I),
            "minlstm": jax_cell_step(MinLSTM(hidden_size=H), T, B, I),
            "lru": jax_cell_step(LRU(hidden_size=H), T, B, I),
            "gru": jax_cell_step(rnnjax.GRU(hidden_size=H), T, B, I),
            "lstm": jax_cell_step(rnnjax.LSTM(hidden_size=H), T, B, I),
            "floor": floor_step(T, B, I, H),
            "scan_sequential": scan_step("sequential", T, B, H),
            "scan_associative": scan_step("associative", T, B, H),
            "scan_log": scan_step("log", T, B, H),
        }
        if T <= max_torch_t:
            contenders.update(torch_contenders(T, B, I, H, torch_threads))
        skipped = sorted(name for name in contenders if name in dropped)
        contenders = {name: fn for name, fn in contenders.items() if name not in dropped}
        results = interleaved(contenders, repeats, label=f"T={T} ")
        dropped |= {name for name, r in results.items() if r["wall_s"] > max_seconds}
        rows.append({"T": T, "results": results, "skipped": skipped})
        print(_sweep_line(T, results) + (f"  (skipped: {', '.join(skipped)})" if skipped else ""), flush=True)
        on_row(rows)
    return rows


def _sweep_line(T: int, results: dict) -> str:
    cells = "  ".join(f"{name} {r['wall_s']:.4f}" for name, r in results.items())
    return f"T={T:6d}  {cells}"


SWEEP_COLUMNS = (
    "mingru",
    "minlstm",
    "lru",
    "gru",
    "lstm",
    "torch_gru_1t",
    "torch_gru_2t",
    "floor",
)
SCAN_COLUMNS = ("scan_sequential", "scan_associative", "scan_log")


def markdown(record: dict) -> str:
    """Markdown tables (seconds per train step, medians) of a record written by ``--out``."""
    lines = []
    issue = record.get("issue")
    if issue:
        lines += ["| contender | wall s | CPU s |", "|---|---:|---:|"]
        for name, r in issue["results"].items():
            lines.append(f"| {name} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} |")
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {name} | {value:.2f} |" for name, value in issue["ratios"].items()]
    rows = record.get("sweep")
    if rows:
        for title, columns in (("train step, wall s", SWEEP_COLUMNS), ("linear_scan alone, wall s", SCAN_COLUMNS)):
            present = [c for c in columns if any(c in row["results"] for row in rows)]
            lines += ["", f"| T ({title}) | " + " | ".join(present) + " |", "|---:|" + "---:|" * len(present)]
            for row in rows:
                cells = [f"{row['results'][c]['wall_s']:.4f}" if c in row["results"] else "—" for c in present]
                lines.append(f"| {row['T']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, sweep up to T=1,024")
    parser.add_argument("--out", help="write the JSON record here")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per contender (median)")
    parser.add_argument("--torch-threads", default=None, help="comma-separated thread counts for PyTorch")
    parser.add_argument("--max-torch-t", type=int, default=16384, help="longest T at which PyTorch runs")
    parser.add_argument(
        "--max-seconds", type=float, default=30.0, help="drop a contender from longer T once its step took this long"
    )
    parser.add_argument("--skip-sweep", action="store_true", help="only the issue's configuration")
    parser.add_argument("--skip-issue", action="store_true", help="only the sweep")
    parser.add_argument("--markdown", nargs="+", metavar="JSON", help="print tables of earlier records and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        for path in args.markdown:
            with open(path) as f:
                print(markdown(json.load(f)) + "\n")
        return {}
    repeats = args.repeats or (3 if args.quick else 5)
    if args.torch_threads:
        threads = tuple(int(n) for n in args.torch_threads.split(","))
    else:
        threads = tuple(sorted({1, jax_threads()}))
    record = {"environment": environment(), "settings": vars(args) | {"repeats": repeats, "torch_threads": threads}}
    print(json.dumps(record["environment"]), flush=True)

    def save(*_):
        if args.out:
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)

    if not args.skip_issue:
        issue = issue_configuration(repeats, threads)
        record["issue"] = issue
        for name, r in issue["results"].items():
            print(f"{name:22s} wall {r['wall_s']:.4f} s   cpu {r['cpu_s']:.4f} s", flush=True)
        for name, value in issue["ratios"].items():
            print(f"{name:28s} {value:.2f}", flush=True)
        save()
    if not args.skip_sweep:
        lengths = QUICK_SWEEP_T if args.quick else SWEEP_T

        def on_row(rows):
            record["sweep"] = rows
            save()

        sweep(lengths, max(2, repeats - 2), threads, args.max_torch_t, args.max_seconds, on_row)
    save()
    return record


if __name__ == "__main__":
    main()
