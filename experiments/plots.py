"""The plots of ``compare.py`` (matplotlib, written as PNG files; no display needed)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

STYLE = {
    "simple": ("tab:gray", "-"),
    "jordan": ("tab:brown", "-"),
    "lstm": ("tab:blue", "-"),
    "gru": ("tab:orange", "-"),
    "bilstm": ("tab:cyan", "--"),
    "mingru": ("tab:green", "-"),
    "minlstm": ("tab:olive", "-"),
    "lru": ("tab:purple", "-"),
    "slstm": ("tab:blue", "--"),
    "mlstm": ("tab:pink", "-"),
    "rglru": ("tab:purple", "--"),
    "griffin": ("tab:pink", "--"),
    "mamba2": ("tab:cyan", "-"),
    "gated_deltanet": ("black", "-"),
    "gated_deltanet_neg": ("black", "--"),
    "transformer": ("tab:red", "-"),
}


def _style(model: str) -> dict:
    color, line = STYLE.get(model, ("black", ":"))
    return dict(color=color, linestyle=line, label=model)


def _empty(path: str, message: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 2))
    ax.text(0.5, 0.5, message, ha="center", va="center")
    ax.axis("off")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _log_axis(axis) -> None:
    """Log scale with plain tick labels (0.01, 0.1, 1; 2 and 5 between decades when a decade is all there is)."""
    formatter = ticker.FuncFormatter(lambda value, _: f"{value:g}")
    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=8))
    axis.set_major_formatter(formatter)
    axis.set_minor_formatter(ticker.NullFormatter())


def _legend_below(fig, axes, ncol: int = 10) -> None:
    """One legend for every panel, below the panels (never over the data)."""
    handles = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(
            list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), ncol), frameon=False
        )


def learning_curves(records: list[dict], tasks: dict, rows: list[dict], path: str) -> None:
    """Validation metric against training step, one panel per task: mean over seeds, min–max band, baseline.

    A marker on a curve is the median steps-to-solve of the seeds that solved (filled: every seed solved;
    open: some); the task's solve threshold is a thin dashed line.

    Args:
        records: ``compare.run_job`` records.
        tasks: task name -> task (for the metric's name, direction and threshold).
        rows: the table rows (for the baseline's validation score, drawn dotted).
        path: the PNG to write.
    """
    names = list(tasks)
    if not names:
        return _empty(path, "no task ran")
    cols = min(3, len(names))
    rows_n = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n + 0.6), squeeze=False)
    for ax, name in zip(axes.flat, names):
        task = tasks[name]
        for r in records:
            if r["task"] != name or r["error"]:
                continue
            steps, valid = np.asarray(r["curve"]["steps"]), np.asarray(r["curve"]["valid"], np.float64)  # (P, S)
            style = _style(r["model"])
            mean = np.nanmean(valid, axis=1)
            ax.plot(steps, mean, **style)
            ax.fill_between(steps, np.nanmin(valid, axis=1), np.nanmax(valid, axis=1), alpha=0.12, color=style["color"])
            solved = [s for s in r.get("steps_to_solve", []) if s >= 0]
            if solved:
                at = float(np.median(solved))
                y = np.interp(at, steps, mean)
                full = len(solved) == len(r["steps_to_solve"])
                ax.plot(
                    at,
                    y,
                    marker="o",
                    markersize=7,
                    color=style["color"],
                    markerfacecolor=style["color"] if full else "white",
                    linestyle="none",
                )
        baseline = [
            row["mean"]
            for row in rows
            if row["task"] == name and row["model"] == "baseline" and row["split"] == "valid"
        ]
        if baseline:
            ax.axhline(baseline[0], color="black", linestyle=":", linewidth=1, label="trivial baseline")
        threshold = task.solve_threshold("valid") if hasattr(task, "solve_threshold") else None
        if threshold is not None:
            ax.axhline(threshold, color="gray", linestyle="--", linewidth=0.8, label="solved at")
        ax.set_title(f"{name} ({task.metric} {'↑' if task.higher_is_better else '↓'}, validation)")
        ax.set_xlabel("step")
        if task.metric in ("mse", "bpc"):
            ax.set_yscale("log")
            _log_axis(ax.yaxis)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
        ax.grid(alpha=0.3, which="major")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].plot([], [], marker="o", color="gray", linestyle="none", label="median steps to solve")
    _legend_below(fig, axes)
    fig.tight_layout(rect=(0, 0.6 / (3.4 * rows_n + 0.6) + 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def length_generalisation(records: list[dict], path: str) -> None:
    """Accuracy against sequence length (tasks with a length sweep): mean over seeds, min–max band, chance line."""
    sweeps = [r for r in records if not r["error"] and r.get("sweep")]
    if not sweeps:
        return _empty(path, "no task with a length sweep ran")
    fig, ax = plt.subplots(figsize=(7, 4.4))
    train_len = sweeps[0]["sweep"]["train_len"]
    ax.axvspan(0, train_len + 0.5, color="gray", alpha=0.15, label="training lengths")
    for r in sweeps:
        accuracy = np.asarray(r["sweep"]["accuracy"])  # (S, lengths)
        lengths = r["sweep"]["lengths"]
        style = _style(r["model"])
        ax.plot(lengths, accuracy.mean(axis=0), marker="o", markersize=3, **style)
        ax.fill_between(lengths, accuracy.min(axis=0), accuracy.max(axis=0), alpha=0.1, color=style["color"])
    ax.axhline(0.5, color="black", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("string length")
    ax.set_ylabel("accuracy (mean over seeds; band: min–max)")
    per_length = (
        "" if not sweeps[0]["sweep"].get("per_length") else f", {sweeps[0]['sweep']['per_length']} strings per length"
    )
    ax.set_title(f"{sweeps[0]['task']}: trained on lengths ≤ {train_len}{per_length}")
    ax.set_ylim(0.3, 1.02)
    ax.set_xlim(0, max(max(r["sweep"]["lengths"]) for r in sweeps) + 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def solved_map(records: list[dict], tasks: dict, models: list[str], path: str) -> None:
    """A task × model grid: the fraction of seeds that solved each task (on validation), with the median steps.

    Args:
        records: ``compare.run_job`` records (``steps_to_solve`` per seed, ``budget``).
        tasks: task name -> task, in row order.
        models: model names, in column order (those that never ran are dropped).
        path: the PNG to write.
    """
    by_key = {(r["task"], r["model"]): r for r in records if not r["error"]}
    models = [m for m in models if any((t, m) in by_key for t in tasks)]
    names = list(tasks)
    if not names or not models:
        return _empty(path, "no task ran")
    grid = np.full((len(names), len(models)), np.nan)
    fig, ax = plt.subplots(figsize=(1.0 * len(models) + 2.2, 0.5 * len(names) + 1.6))
    colours = matplotlib.colors.LinearSegmentedColormap.from_list("solved", ["#f4cccc", "#fff2cc", "#b6d7a8"])
    for i, name in enumerate(names):
        for j, model in enumerate(models):
            r = by_key.get((name, model))
            if r is None:
                ax.text(j, i, "–", ha="center", va="center", color="gray")
                continue
            solved = [s for s in r["steps_to_solve"] if s >= 0]
            grid[i, j] = len(solved) / len(r["steps_to_solve"])
            if solved:
                label = f"{len(solved)}/{len(r['steps_to_solve'])}\n@{np.median(solved):,.0f}"
            else:
                label = f"0/{len(r['steps_to_solve'])}\n({r.get('budget', r['stopped_at']):,})"
            ax.text(j, i, label, ha="center", va="center", fontsize=7)
    ax.imshow(np.ma.masked_invalid(grid), cmap=colours, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(np.arange(len(models) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(names) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    ax.set_title(
        "Seeds that solved each task (validation), median steps to solve\n(budget in brackets where none did)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speed_plot(speed: list[dict], measure: str, scale: float, ylabel: str, xlabel: str, title: str, path: str):
    rows = [s for s in speed if s["measure"] == measure]
    if not rows:
        return _empty(path, "speed was not measured")
    fig, ax = plt.subplots(figsize=(7, 4))
    for model in dict.fromkeys(s["model"] for s in rows):
        points = sorted((s["length"], s["value"] * scale) for s in rows if s["model"] == model)
        ax.plot(*zip(*points), marker="o", markersize=3, **_style(model))
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.set_yscale("log")
    _log_axis(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="major")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def throughput(speed: list[dict], path: str) -> None:
    """Forward-pass tokens per second against sequence length."""
    _speed_plot(
        speed,
        "tokens_per_second",
        1.0,
        "tokens / second",
        "sequence length",
        "Forward throughput (jit, whole sequence)",
        path,
    )


def streaming_latency(speed: list[dict], path: str) -> None:
    """Per-token streaming latency (batch 1) against the context already consumed."""
    _speed_plot(
        speed,
        "seconds_per_token",
        1e6,
        "µs / token",
        "context length (tokens already seen)",
        "Streaming latency: cell.step vs transformer with KV cache",
        path,
    )
