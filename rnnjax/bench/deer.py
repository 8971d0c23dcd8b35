"""``python -m rnnjax.bench.deer``: from which sequence length does DEER beat the sequential scan?

One question: for small nonlinear cells (LSTM, GRU, Elman), at which ``T`` does :func:`rnnjax.deer_unroll`
(Newton's method, parallel in time) run faster than :func:`rnnjax.unroll` (one step after another)? For each
cell and each ``T`` of the grid it measures, on inputs ``(B, T, I)``:

* the forward pass (outputs ``ys``) of
  ``sequential``: :func:`rnnjax.unroll`, what a user gets (the native CPU kernels for the LSTM and GRU when they
  are built and on, see :mod:`rnnjax.kernels.native`);
  ``sequential_pure_jax``: the same with the native kernels off (``lax.scan`` of the step), timed only where the
  default path did call them;
  ``deer_full``: ``deer_unroll(jacobian="full")`` (DEER) and ``deer_diagonal``: ``jacobian="diagonal"``
  (quasi-DEER), each with the Newton iterations and convergence flag it reported and the largest absolute
  difference of its ``ys`` from ``sequential``'s;
* the forward + backward pass (``jax.grad`` of ``sum(ys)`` with respect to the parameters) of the sequential
  contenders and of full DEER, with the largest absolute difference of DEER's gradient from ``sequential``'s.

Every program is jitted and compiled ahead of time (its compile seconds are recorded), run once untimed, then
timed ``repeats`` times with the contenders of one ``(cell, T)`` interleaved round by round so that machine
noise hits each alike (:func:`rnnjax.bench.timing.interleaved_medians`); the median is kept. The table gives
each DEER time divided by the sequential time (``< 1``: DEER is faster) and, per cell, the smallest ``T`` of the
grid at which the DEER median is below the sequential one ("none in the grid" otherwise) with every ``T`` at
which it is. DEER's time includes its fallback: where it did not converge, the sequential scan ran as well.

Examples::

    python -m rnnjax.bench.deer                                # LSTM, GRU, Elman; H=16 B=4 I=8; T = 64 ... 4096
    python -m rnnjax.bench.deer --cells lstm --times 256,1024  # a subset
    python -m rnnjax.bench.deer --quick --out /tmp/deer.json   # T = 16, 64, 2 repeats: seconds
    python -m rnnjax.bench.deer --threads 1                    # XLA and the native kernels on one core
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax
from rnnjax.bench.timing import environment, interleaved_medians, pin_threads
from rnnjax.deer import deer_unroll
from rnnjax.kernels import native

CELLS: dict[str, Callable[[int], rnnjax.Cell]] = {
    "lstm": lambda hidden: rnnjax.LSTM(hidden_size=hidden),
    "gru": lambda hidden: rnnjax.GRU(hidden_size=hidden),
    "elman": lambda hidden: rnnjax.SimpleRNN(hidden_size=hidden),  # tanh
}
FORWARD = ("sequential", "sequential_pure_jax", "deer_full", "deer_diagonal")
GRAD = ("sequential", "sequential_pure_jax", "deer_full")
DEER = {"deer_full": "full", "deer_diagonal": "diagonal"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one run measures."""

    cells: tuple[str, ...] = tuple(CELLS)  # keys of CELLS; "elman" is rnnjax.SimpleRNN (tanh)
    hidden: int = 16  # H; DEER's state D is 2H for the LSTM (h and c), H for the GRU and Elman
    batch: int = 4  # B
    inputs: int = 8  # I
    times: tuple[int, ...] = (64, 256, 1024, 4096)  # the grid of sequence lengths T
    repeats: int = 5  # timed calls per contender; the median is kept
    pause: float = 0.05  # seconds slept, then one untimed call, before each timed call (see interleaved_samples)
    max_seconds: float = 30.0  # a contender whose median passed this is not run at longer T (recorded as skipped)
    threads: int | None = None  # pin to this many cores and give the native kernels as many threads; None: all


QUICK = {"times": (16, 64), "repeats": 2, "pause": 0.0}  # --quick: these, unless given explicitly


# Contenders: compiled programs of one cell at one T.


def _compile(fn, params, xs, *, native_on: bool):
    """``fn`` jitted and compiled ahead of time for ``(params, xs)`` with the native kernels on or off (the switch
    is read at trace time, so the compiled program keeps the path). Returns ``(compiled, seconds, used_native)``."""
    start = time.perf_counter()
    with native.use_native(native_on):
        # A fresh function each time: jit caches traces by function, and the switch is not part of its key.
        lowered = jax.jit(lambda params, xs: fn(params, xs)).lower(params, xs)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    used_native = bool(set(re.findall(r"custom_call @(\w+)", lowered.as_text())) & set(native.TARGETS))
    if used_native and not native_on:
        raise RuntimeError("the native kernels were switched off, yet the compiled program calls them")
    return compiled, seconds, used_native


def _programs(cell):
    """The forward and gradient functions of every contender, ``(params, xs) -> ...``, by name."""

    def sequential(params, xs):
        return rnnjax.unroll(cell, params, xs)[1]  # (B, T, H)

    def deer(jacobian):
        def forward(params, xs):
            _, ys, info = deer_unroll(cell, params, xs, jacobian=jacobian)  # (B, T, H)
            return ys, info

        return forward

    def grad_of(forward):
        return jax.grad(lambda params, xs: jnp.sum(forward(params, xs)))

    forward = {"sequential": sequential, **{name: deer(jacobian) for name, jacobian in DEER.items()}}
    grad = {"sequential": grad_of(sequential), "deer_full": grad_of(lambda p, xs: deer("full")(p, xs)[0])}
    return forward, grad


def _max_abs_difference(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def measure_one(
    name: str, settings: Settings, num_steps: int, skip: set[tuple[str, str]]
) -> tuple[dict, dict[tuple[str, str], float]]:
    """Times every contender of one cell at one ``T``; ``skip`` holds ``(group, contender)`` pairs not to run.

    Returns the record and every median by ``(group, contender)``.
    """
    cell = CELLS[name](settings.hidden)
    params = cell.init(jax.random.key(0), settings.inputs)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((settings.batch, num_steps, settings.inputs)), jnp.float32)  # (B, T, I)
    forward_fns, grad_fns = _programs(cell)
    record = {
        "cell": name,
        "T": num_steps,
        "B": settings.batch,
        "I": settings.inputs,
        "H": settings.hidden,
        "D": sum(int(np.prod(leaf.shape[1:])) for leaf in jax.tree.leaves(cell.initial_carry(1))),
        "compile_s": {},
        "skipped": [],
    }
    timed: dict[str, dict[str, Callable[[], object]]] = {"forward": {}, "grad": {}}
    outputs: dict[tuple[str, str], object] = {}

    def add(group: str, contender: str, fn, native_on: bool = True) -> bool:
        if (group, contender) in skip:
            record["skipped"].append(f"{group}/{contender}")
            return False
        compiled, seconds, used_native = _compile(fn, params, xs, native_on=native_on)
        record["compile_s"][f"{group}/{contender}"] = seconds
        outputs[group, contender] = jax.block_until_ready(compiled(params, xs))  # the first, untimed run
        timed[group][contender] = lambda: jax.block_until_ready(compiled(params, xs))
        return used_native

    record["native_used"] = add("forward", "sequential", forward_fns["sequential"])
    if record["native_used"]:
        add("forward", "sequential_pure_jax", forward_fns["sequential"], native_on=False)
    for contender in DEER:
        add("forward", contender, forward_fns[contender])
    if add("grad", "sequential", grad_fns["sequential"]):
        add("grad", "sequential_pure_jax", grad_fns["sequential"], native_on=False)
    add("grad", "deer_full", grad_fns["deer_full"])

    medians = {}
    for group, callables in timed.items():
        for contender, seconds in interleaved_medians(callables, settings.repeats, 1, settings.pause).items():
            medians[group, contender] = seconds
    for group in ("forward", "grad"):
        record[f"{group}_s"] = {c: s for (g, c), s in medians.items() if g == group}
        for base in ("sequential", "sequential_pure_jax"):
            if (group, base) in medians:
                suffix = "" if base == "sequential" else "_pure_jax"
                record[f"{group}_ratio{suffix}"] = {
                    c: s / medians[group, base] for (g, c), s in medians.items() if g == group and c in DEER
                }
    reference = outputs.get(("forward", "sequential"))
    record["deer"] = {}
    for contender, jacobian in DEER.items():
        if ("forward", contender) not in outputs:
            continue
        ys, info = outputs["forward", contender]
        record["deer"][jacobian] = {
            "iterations": int(info.iterations),
            "converged": bool(info.converged),
            "max_abs_diff": None if reference is None else _max_abs_difference(ys, reference),
        }
    if ("grad", "sequential") in outputs and ("grad", "deer_full") in outputs:
        grad_reference = outputs["grad", "sequential"]
        record["grad_max_abs_diff"] = _max_abs_difference(outputs["grad", "deer_full"], grad_reference)
        record["grad_max_abs"] = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(grad_reference))
    return record, medians


# Summary: from which T DEER is faster.


def wins(records: list[dict], cell: str, group: str, contender: str, base: str = "sequential") -> dict:
    """``{"from": smallest T where contender's median < base's, or None, "at": every such T, "measured": every T
    where both were timed}`` for one cell."""
    measured, faster = [], []
    for r in records:
        times = r.get(f"{group}_s", {})
        if r["cell"] == cell and contender in times and base in times:
            measured.append(r["T"])
            if times[contender] < times[base]:
                faster.append(r["T"])
    return {"from": min(faster, default=None), "at": faster, "measured": measured}


def summary(records: list[dict], cells: tuple[str, ...]) -> dict:
    """Per cell, per ``group/contender`` (DEER) and per baseline: :func:`wins`."""
    out = {}
    for cell in cells:
        bases = ["sequential"] + (
            ["sequential_pure_jax"] if any(r["cell"] == cell and r.get("native_used") for r in records) else []
        )
        out[cell] = {
            f"{group}/{contender}": {base: wins(records, cell, group, contender, base) for base in bases}
            for group, contender in (("forward", "deer_full"), ("forward", "deer_diagonal"), ("grad", "deer_full"))
        }
    return out


# Output.


def _ms(times: dict, name: str) -> str:
    return f"{times[name] * 1e3:.2f}" if name in times else "—"


def _ratio(ratios: dict | None, name: str) -> str:
    return f"{ratios[name]:.2f}" if ratios and name in ratios else "—"


def table_header(pure_jax: bool) -> list[str]:
    pure = " | seq pure-JAX ms" if pure_jax else ""
    pure_sep = "---:|" if pure_jax else ""
    return [
        f"| T | seq ms{pure} | full ms | ×seq | iters | conv | max|Δy| | diag ms | ×seq | iters | conv | max|Δy| "
        f"| grad: seq ms{pure} | full ms | ×seq | max|Δgrad| |",
        "|---:|---:|" + pure_sep + "---:|" * 10 + "---:|" + pure_sep + "---:|" * 3,
    ]


def table_row(record: dict, pure_jax: bool) -> str:
    forward, grad = record.get("forward_s", {}), record.get("grad_s", {})
    cells = [str(record["T"]), _ms(forward, "sequential")] + ([_ms(forward, "sequential_pure_jax")] if pure_jax else [])
    for contender, jacobian in DEER.items():
        info = record["deer"].get(jacobian)
        cells += [_ms(forward, contender), _ratio(record.get("forward_ratio"), contender)]
        if info is None:
            cells += ["—", "—", "—"]
        else:
            diff = "—" if info["max_abs_diff"] is None else f"{info['max_abs_diff']:.1e}"
            cells += [str(info["iterations"]), "yes" if info["converged"] else "NO", diff]
    cells += [_ms(grad, "sequential")] + ([_ms(grad, "sequential_pure_jax")] if pure_jax else [])
    cells += [_ms(grad, "deer_full"), _ratio(record.get("grad_ratio"), "deer_full")]
    cells.append(f"{record['grad_max_abs_diff']:.1e}" if "grad_max_abs_diff" in record else "—")
    return "| " + " | ".join(cells) + " |"


def summary_lines(result: dict) -> list[str]:
    lines = []
    for cell, per_contender in result.items():
        for contender, per_base in per_contender.items():
            for base, w in per_base.items():
                if w["from"] is None:
                    verdict = f"none in the grid (T = {', '.join(map(str, w['measured'])) or '—'})"
                else:
                    verdict = f"T = {w['from']} (faster at T = {', '.join(map(str, w['at']))})"
                lines.append(f"{cell:6s} {contender:22s} vs {base:20s}: {verdict}")
    return lines


# Command line.


def parse_args(argv=None) -> tuple[Settings, str | None]:
    """The settings and the ``--out`` path; ``--quick`` fills in only what was not given explicitly."""
    parser = argparse.ArgumentParser(prog="python -m rnnjax.bench.deer", description=__doc__.split("\n")[0])
    default = Settings()
    parser.add_argument("--cells", default=",".join(default.cells), help=f"comma-separated: {', '.join(CELLS)}")
    parser.add_argument("--hidden", type=int, default=default.hidden, help="H")
    parser.add_argument("--batch", type=int, default=default.batch, help="B")
    parser.add_argument("--inputs", type=int, default=default.inputs, help="I")
    parser.add_argument("--times", default=None, help="comma-separated sequence lengths (default: 64,256,1024,4096)")
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"timed calls per contender (default {default.repeats})"
    )
    parser.add_argument("--pause", type=float, default=None, help=f"seconds before each timed call ({default.pause})")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=default.max_seconds,
        help=f"skip a contender at longer T once its median passed this ({default.max_seconds})",
    )
    parser.add_argument("--threads", type=int, default=None, help="pin to this many cores (default: all)")
    parser.add_argument("--quick", action="store_true", help="T = 16, 64, 2 repeats, no pause: seconds")
    parser.add_argument("--out", default=None, help="write the JSON record here")
    args = parser.parse_args(argv)
    cells = tuple(c.strip() for c in args.cells.split(",") if c.strip())
    unknown = [c for c in cells if c not in CELLS]
    if unknown or not cells:
        parser.error(f"--cells: unknown cell(s) {unknown}; expected some of {', '.join(CELLS)}")
    quick = QUICK if args.quick else {}
    try:
        times = tuple(int(t) for t in args.times.split(",")) if args.times else quick.get("times", default.times)
    except ValueError:
        parser.error(f"--times: expected comma-separated integers, got {args.times!r}")
    if any(t < 1 for t in times):
        parser.error(f"--times: lengths must be >= 1, got {times}")
    repeats = args.repeats if args.repeats is not None else quick.get("repeats", default.repeats)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    usable = len(os.sched_getaffinity(0))
    if args.threads is not None and not 1 <= args.threads <= usable:
        parser.error(f"--threads must lie in [1, {usable}] (usable cores), got {args.threads}")
    settings = Settings(
        cells=cells,
        hidden=args.hidden,
        batch=args.batch,
        inputs=args.inputs,
        times=times,
        repeats=repeats,
        pause=args.pause if args.pause is not None else quick.get("pause", default.pause),
        max_seconds=args.max_seconds,
        threads=args.threads,
    )
    return settings, args.out


def main(argv=None) -> dict:
    settings, out = parse_args(argv)
    if settings.threads is not None:
        pin_threads(settings.threads)
    env = environment()
    env["platform"] = jax.devices()[0].platform
    env["native_kernels"] = native.status()
    env["threads"] = settings.threads or len(os.sched_getaffinity(0))
    record = {"environment": env, "settings": dataclasses.asdict(settings), "records": [], "beats_sequential_from": {}}

    def save():
        if out:
            with open(out, "w") as f:
                json.dump(record, f, indent=1)

    print(f"# {env['platform']} ({env['device']}; {env['cpu']}, {env['threads']} thread(s)) {env['date']}")
    print(f"# jax {env['versions']['jax']}; {env['native_kernels']}")
    print(
        f"# B={settings.batch} I={settings.inputs} H={settings.hidden}; median of {settings.repeats}; "
        "×seq = DEER time / sequential time (< 1: DEER faster); grad = jax.grad of sum(ys) w.r.t. params",
        flush=True,
    )
    for name in settings.cells:
        skip: set[tuple[str, str]] = set()
        pure_jax = None
        for num_steps in settings.times:
            row, medians = measure_one(name, settings, num_steps, skip)
            skip |= {key for key, seconds in medians.items() if seconds > settings.max_seconds}
            record["records"].append(row)
            if pure_jax is None:
                pure_jax = row["native_used"]
                print(f"\n{name.upper()} (D = {row['D']})\n")
                print("\n".join(table_header(pure_jax)))
            print(table_row(row, pure_jax), flush=True)
            save()
    record["beats_sequential_from"] = summary(record["records"], settings.cells)
    print("\nDEER faster than sequential (median) from:\n")
    print("\n".join(summary_lines(record["beats_sequential_from"])))
    save()
    if out:
        print(f"\nwrote {out}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
