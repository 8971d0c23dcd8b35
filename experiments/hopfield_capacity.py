"""How many patterns can a Hopfield network hold? Retrieval overlap against load P/N, for several N.

For each network size ``N`` and load ``P / N``: store ``P`` random ``±1`` patterns by the Hebbian rule, start
the network at each stored pattern, run asynchronous updates to a fixed point, and average the overlap
``m = (1/N) sum_i s_i xi_i`` between each pattern and the state retrieved from it. Theory (Amit, Gutfreund &
Sompolinsky 1985) puts the capacity at ``P ~ 0.138 N``: below it ``m`` stays near 1, above it the retrieval
state disappears and ``m`` drops (to about 0.3 for large ``N``); finite networks blur the transition, which
sharpens as ``N`` grows. The modern (continuous) Hopfield update is measured at the same loads, and far past
them, for comparison.

Writes into ``--out``:

* ``hopfield.csv``: columns ``N, load, overlap`` (the mean over trials);
* ``hopfield_detail.csv``: ``N, load, patterns, trials, overlap, overlap_std, theory`` and the modern network's
  ``modern_overlap``;
* ``hopfield.md``: the table; ``hopfield_capacity.png``: overlap against load, one line per ``N``, with the
  theory curve and the critical load marked.

Usage::

    python experiments/hopfield_capacity.py --quick --out results/hopfield     # about 30 s on 2 CPU cores
    python experiments/hopfield_capacity.py --out results/hopfield_full          # larger N, more trials
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as a script: make `rnnjax` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rnnjax import hopfield  # noqa: E402

CRITICAL_LOAD = 0.138  # Amit, Gutfreund & Sompolinsky (1985), zero temperature, N -> infinity


@dataclasses.dataclass
class Config:
    """Everything that defines a capacity run."""

    sizes: tuple[int, ...] = (100, 200, 400, 800, 1600)  # network sizes N
    loads: tuple[float, ...] = tuple(np.round(np.arange(0.02, 0.301, 0.02), 3))  # P / N values
    trials: int = 4  # independent networks (fresh patterns) per (N, load)
    max_sweeps: int = 50  # asynchronous sweeps before giving up on a fixed point
    modern_size: int = 64  # N of the modern Hopfield network (its capacity is exponential, so N is small)
    modern_beta: float = 1.0  # inverse temperature of the modern update
    seed: int = 0
    out: str = "results/hopfield"
    preset: str = "full"


def quick_config(**overrides) -> Config:
    """The ``--quick`` size: about half a minute on 2 CPU cores."""
    return dataclasses.replace(Config(sizes=(100, 200, 400, 800), trials=2, preset="quick"), **overrides)


def tiny_config(**overrides) -> Config:
    """A smoke-test size of a few seconds (tests)."""
    base = Config(sizes=(50, 100), loads=(0.05, 0.14, 0.3), trials=1, max_sweeps=10, modern_size=16, preset="tiny")
    return dataclasses.replace(base, **overrides)


def modern_overlap(key, size: int, load: float, beta: float, max_load: float) -> float:
    """Mean overlap of one-step modern-Hopfield retrieval from 10%-corrupted cues at load ``P / N``."""
    P, P_max = max(1, round(load * size)), max(1, round(max_load * size))
    return float(_modern_trial(key, jnp.asarray(P, jnp.int32), size, P_max, beta))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _modern_trial(key, P, N, P_max, beta):
    """``hopfield.modern_update`` with ``P`` (traced) of ``P_max`` slots used: all loads share one compile."""
    k_pat, k_cue = jax.random.split(key)
    patterns = hopfield.random_patterns(k_pat, P_max, N)  # (P_max, N); rows >= P are not stored
    used = jnp.arange(P_max) < P
    cues = hopfield.flip(k_cue, patterns, 0.1)
    scores = jnp.where(used, beta * cues @ patterns.T, -jnp.inf)  # (P_max, P_max) softmax(beta X^T xi) over stored
    retrieved = jax.nn.softmax(scores, axis=-1) @ patterns
    overlaps = hopfield.overlap(retrieved, patterns)
    return jnp.sum(jnp.where(used, overlaps, 0.0)) / P.astype(overlaps.dtype)


def run(config: Config) -> list[dict]:
    """Measures every (N, load) point; returns one row per point."""
    key = jax.random.key(config.seed)
    rows = []
    for N in config.sizes:
        key, sub = jax.random.split(key)
        start = time.perf_counter()
        overlaps = hopfield.capacity_overlaps(sub, N, config.loads, trials=config.trials, max_sweeps=config.max_sweeps)
        print(f"N={N}: {len(config.loads)} loads x {config.trials} trials in {time.perf_counter() - start:.1f}s")
        for load, values in zip(config.loads, overlaps):
            rows.append(
                dict(
                    N=N,
                    load=float(load),
                    patterns=max(1, round(load * N)),
                    trials=config.trials,
                    overlap=float(values.mean()),
                    overlap_std=float(values.std()),
                    theory=hopfield.theory_overlap(float(load)),
                )
            )
    modern = {}
    for load in config.loads:
        key, sub = jax.random.split(key)
        modern[float(load)] = modern_overlap(
            sub, config.modern_size, float(load), config.modern_beta, max(config.loads)
        )
    for row in rows:
        row["modern_overlap"] = modern[row["load"]]
    return rows


def write(config: Config, rows: list[dict]) -> None:
    os.makedirs(config.out, exist_ok=True)
    with open(os.path.join(config.out, "hopfield.csv"), "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["N", "load", "overlap"])
        for row in rows:
            writer.writerow([row["N"], f"{row['load']:.3f}", f"{row['overlap']:.4f}"])
    fields = ["N", "load", "patterns", "trials", "overlap", "overlap_std", "theory", "modern_overlap"]
    with open(os.path.join(config.out, "hopfield_detail.csv"), "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    sizes = sorted({row["N"] for row in rows})
    loads = sorted({row["load"] for row in rows})
    table = {(row["N"], row["load"]): row for row in rows}
    lines = [
        "# Hopfield capacity: mean retrieval overlap against load P/N",
        "",
        f"Preset `{config.preset}`, {config.trials} trial(s) per point, asynchronous updates from each stored "
        f"pattern; theory: Amit et al. (1985), critical load {CRITICAL_LOAD}. Modern network: N = "
        f"{config.modern_size}, beta = {config.modern_beta}, one update from 10%-flipped cues.",
        "",
        "| load | " + " | ".join(f"N={N}" for N in sizes) + " | theory (N→∞) | modern |",
        "|---|" + "---|" * (len(sizes) + 2),
    ]
    for load in loads:
        cells = [f"{table[(N, load)]['overlap']:.3f}" for N in sizes]
        first = table[(sizes[0], load)]
        lines.append(
            f"| {load:.2f} | " + " | ".join(cells) + f" | {first['theory']:.3f} | {first['modern_overlap']:.3f} |"
        )
    report = "\n".join(lines) + "\n"
    with open(os.path.join(config.out, "hopfield.md"), "w", encoding="utf-8") as file:
        file.write(report)
    print(report)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for N in sizes:
        ax.plot(loads, [table[(N, load)]["overlap"] for load in loads], marker="o", ms=3, label=f"N = {N}")
    dense = np.linspace(0.005, max(loads), 200)
    ax.plot(dense, [hopfield.theory_overlap(a) for a in dense], "k--", lw=1, label="theory, N → ∞")
    ax.axvline(CRITICAL_LOAD, color="gray", lw=0.8, ls=":")
    ax.text(CRITICAL_LOAD + 0.003, 0.05, "0.138", color="gray")
    ax.set_xlabel("load P / N")
    ax.set_ylabel("mean retrieval overlap")
    ax.set_ylim(0, 1.05)
    ax.set_title("Hebbian Hopfield network: retrieval collapses near P ≈ 0.138 N")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(config.out, "hopfield_capacity.png"), dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the CPU size: about half a minute on 2 cores")
    size.add_argument("--tiny", action="store_true", help="a smoke test of a few seconds (for tests)")
    parser.add_argument("--out", default="results/hopfield", help="output folder (default: results/hopfield)")
    parser.add_argument("--sizes", help="comma-separated network sizes N (overrides the preset)")
    parser.add_argument("--trials", type=int, help="networks per (N, load)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    overrides = dict(out=args.out, seed=args.seed)
    if args.sizes:
        overrides["sizes"] = tuple(int(n) for n in args.sizes.split(","))
    if args.trials:
        overrides["trials"] = args.trials
    if args.tiny:
        return tiny_config(**overrides)
    if args.quick:
        return quick_config(**overrides)
    return dataclasses.replace(Config(), **overrides)


def main(argv: list[str] | None = None) -> list[dict]:
    config = parse_args(argv)
    start = time.perf_counter()
    rows = run(config)
    write(config, rows)
    print(
        f"wrote {config.out}/hopfield.csv, hopfield_detail.csv, hopfield.md, hopfield_capacity.png "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return rows


if __name__ == "__main__":
    main()
