"""How far back does the gradient reach? ||dL/dh_t|| against distance, for tanh RNNs and gated cells.

For a loss on the last output of a sequence, measures ``||dL/ds_t||`` at every step ``t`` (one backward pass,
:func:`rnnjax.diagnostics.state_gradient_norms`) for tanh RNNs whose orthogonal recurrent matrix is scaled to
spectral radius ``rho`` (small and unit-size inputs), for LSTMs with several forget-gate biases, for a GRU, and
for a tanh RNN with a Glorot instead of an orthogonal recurrent initialisation. Writes into ``--out``:

* ``gradient_flow.csv``: ``model, inputs, distance, relative_norm`` (``||dL/ds_t|| / ||dL/ds_T||``);
* ``gradient_summary.csv`` / ``gradient_flow.md``: per model the spectral norm, the per-step decay rate
  (fitted over the 30 steps nearest the loss) and the relative norm 10, 50 and ``T - 1`` steps back, with the
  Pascanu et al. (2013) bound ``sigma_max^k`` for the tanh rows;
* ``gradient_flow.png``: the curves on a log scale.

Usage::

    python experiments/gradient_flow.py --quick --out results/gradient_flow     # seconds on 2 CPU cores
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as a script: make `rnnjax` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import rnnjax  # noqa: E402
from rnnjax import diagnostics  # noqa: E402


@dataclasses.dataclass
class Config:
    """Everything that defines a gradient-flow run."""

    seq_len: int = 200  # T: steps between the first input and the loss
    batch: int = 32  # sequences averaged into one gradient norm per step
    input_size: int = 8
    hidden: int = 128  # H of every cell
    rhos: tuple[float, ...] = (0.5, 0.9, 1.0, 1.2, 1.5)  # spectral radii of the scaled tanh RNNs
    forget_biases: tuple[float, ...] = (0.0, 1.0, 3.0)  # LSTM forget-gate bias initialisations
    seed: int = 0
    out: str = "results/gradient_flow"
    preset: str = "full"


def quick_config(**overrides) -> Config:
    """The ``--quick`` size: seconds on 2 CPU cores."""
    return dataclasses.replace(Config(seq_len=100, batch=16, hidden=64, preset="quick"), **overrides)


def tiny_config(**overrides) -> Config:
    """A smoke-test size (tests)."""
    base = Config(seq_len=12, batch=2, input_size=3, hidden=8, rhos=(0.5, 1.5), forget_biases=(1.0,), preset="tiny")
    return dataclasses.replace(base, **overrides)


def models(config: Config) -> list[tuple[str, object, dict, float]]:
    """``(name, cell, params, input_scale)`` for every measured configuration."""
    key = jax.random.key(config.seed)
    I, H = config.input_size, config.hidden
    found = []
    tanh = rnnjax.SimpleRNN(hidden_size=H)
    base = tanh.init(key, I)
    for scale in (0.1, 1.0):
        for rho in config.rhos:
            found.append((f"tanh rho={rho}", tanh, {**base, "w_hh": base["w_hh"] * rho}, scale))
    glorot = rnnjax.SimpleRNN(hidden_size=H, recurrent_init="glorot_uniform")
    found.append(("tanh glorot init", glorot, glorot.init(key, I), 0.1))
    found.append(("tanh glorot init", glorot, glorot.init(key, I), 1.0))
    for bias in config.forget_biases:
        lstm = rnnjax.LSTM(hidden_size=H, forget_bias=bias)
        found.append((f"lstm forget_bias={bias}", lstm, lstm.init(key, I), 1.0))
    gru = rnnjax.GRU(hidden_size=H)
    found.append(("gru", gru, gru.init(key, I), 1.0))
    return found


def last_step_loss(ys):
    return jnp.sum(ys[:, -1] ** 2)


def run(config: Config) -> tuple[list[dict], list[dict]]:
    xs = jax.random.normal(jax.random.key(config.seed + 1), (config.batch, config.seq_len, config.input_size))
    T = config.seq_len
    curves, summary = [], []
    for name, cell, params, scale in models(config):
        norms = diagnostics.state_gradient_norms(cell, params, scale * xs, last_step_loss)[""].norms
        norms = np.asarray(norms, np.float64)
        relative = norms / norms[-1]
        inputs = "small (x0.1)" if scale < 1 else "unit"
        for t in range(T):
            curves.append(dict(model=name, inputs=inputs, distance=T - 1 - t, relative_norm=float(relative[t])))
        sigma = max(s.spectral_norm for s in diagnostics.spectral_stats(cell, params).values())
        row = dict(model=name, inputs=inputs, sigma_max=sigma)
        row["decay_rate"] = diagnostics.decay_rate(relative, start=max(0, T - 30))
        for k in (10, 50, T - 1):
            if k < T:
                row[f"back_{k}" if k != T - 1 else "back_T-1"] = float(relative[T - 1 - k])
        row["pascanu_bound_T-1"] = sigma ** (T - 1) if name.startswith("tanh") else float("nan")
        summary.append(row)
    return curves, summary


def write(config: Config, curves: list[dict], summary: list[dict]) -> None:
    os.makedirs(config.out, exist_ok=True)
    with open(os.path.join(config.out, "gradient_flow.csv"), "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=["model", "inputs", "distance", "relative_norm"])
        writer.writeheader()
        writer.writerows(curves)
    fields = list(dict.fromkeys(key for row in summary for key in row))
    with open(os.path.join(config.out, "gradient_summary.csv"), "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(summary)
    lines = [
        f"# Gradient flow: ||dL/ds_t|| / ||dL/ds_T||, T = {config.seq_len}, H = {config.hidden} ({config.preset})",
        "",
        "| " + " | ".join(fields) + " |",
        "|" + "---|" * len(fields),
    ]
    for row in summary:
        lines.append(
            "| "
            + " | ".join(f"{row.get(f):.3g}" if isinstance(row.get(f), float) else str(row.get(f)) for f in fields)
            + " |"
        )
    report = "\n".join(lines) + "\n"
    with open(os.path.join(config.out, "gradient_flow.md"), "w", encoding="utf-8") as file:
        file.write(report)
    print(report)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, inputs in zip(axes, ("small (x0.1)", "unit")):
        for name in dict.fromkeys(c["model"] for c in curves if c["inputs"] == inputs):
            points = [c for c in curves if c["model"] == name and c["inputs"] == inputs]
            values = np.maximum([p["relative_norm"] for p in points], 1e-30)
            ax.semilogy([p["distance"] for p in points], values, label=name)
        ax.set_xlabel("steps back from the loss")
        ax.set_title(f"{inputs} inputs")
        ax.set_ylim(1e-20, 1e10)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("||dL/ds_t|| / ||dL/ds_T||")
    fig.tight_layout()
    fig.savefig(os.path.join(config.out, "gradient_flow.png"), dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the CPU size: seconds on 2 cores")
    size.add_argument("--tiny", action="store_true", help="a smoke test (for tests)")
    parser.add_argument("--out", default="results/gradient_flow", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    overrides = dict(out=args.out, seed=args.seed)
    if args.tiny:
        return tiny_config(**overrides)
    if args.quick:
        return quick_config(**overrides)
    return dataclasses.replace(Config(), **overrides)


def main(argv: list[str] | None = None):
    config = parse_args(argv)
    start = time.perf_counter()
    curves, summary = run(config)
    write(config, curves, summary)
    print(
        f"wrote {config.out}/gradient_flow.csv, gradient_summary.csv, gradient_flow.md, gradient_flow.png "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return summary


if __name__ == "__main__":
    main()
