"""The plots of ``compare.py`` (matplotlib, written as PNG files; no display needed)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

STYLE = {
    "simple": ("tab:gray", "-"),
    "jordan": ("tab:brown", "-"),
    "lstm": ("tab:blue", "-"),
    "gru": ("tab:orange", "-"),
    "bilstm": ("tab:cyan", "--"),
    "mingru": ("tab:green", "-"),
    "minlstm": ("tab:olive", "-"),
    "lru": ("tab:purple", "-"),
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


def learning_curves(records: list[dict], tasks: dict, rows: list[dict], path: str) -> None:
    """Validation metric against training step, one panel per task, mean over seeds with a min–max band.

    Args:
        records: ``compare.run_job`` records.
        tasks: task name -> task (for the metric's name and direction).
        rows: the table rows (for the baseline's validation score, drawn dashed).
        path: the PNG to write.
    """
    names = list(tasks)
    if not names:
        return _empty(path, "no task ran")
    cols = min(4, len(names))
    rows_n = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for r in records:
            if r["task"] != name or r["error"]:
                continue
            steps, valid = np.asarray(r["curve"]["steps"]), np.asarray(r["curve"]["valid"], np.float64)  # (P, S)
            ax.plot(steps, np.nanmean(valid, axis=1), **_style(r["model"]))
            ax.fill_between(
                steps, np.nanmin(valid, axis=1), np.nanmax(valid, axis=1), alpha=0.15, color=_style(r["model"])["color"]
            )
        baseline = [
            row["mean"]
            for row in rows
            if row["task"] == name and row["model"] == "baseline" and row["split"] == "valid"
        ]
        if baseline:
            ax.axhline(baseline[0], color="black", linestyle=":", linewidth=1, label="baseline")
        task = tasks[name]
        ax.set_title(f"{name} ({task.metric} {'↑' if task.higher_is_better else '↓'})")
        ax.set_xlabel("step")
        if task.metric in ("mse", "bpc"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles, labels = {}, []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    labels = list(handles)
    fig.legend([handles[k] for k in labels], labels, loc="lower center", ncol=min(len(labels), 10))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def length_generalisation(records: list[dict], path: str) -> None:
    """Accuracy against sequence length (tasks with a length sweep), the training range shaded."""
    sweeps = [r for r in records if not r["error"] and r.get("sweep")]
    if not sweeps:
        return _empty(path, "no task with a length sweep ran")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in sweeps:
        accuracy = np.asarray(r["sweep"]["accuracy"])  # (S, lengths)
        ax.plot(r["sweep"]["lengths"], accuracy.mean(axis=0), marker="o", markersize=3, **_style(r["model"]))
    train_len = sweeps[0]["sweep"]["train_len"]
    ax.axvspan(0, train_len, color="gray", alpha=0.15, label="training lengths")
    ax.axhline(0.5, color="black", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("accuracy (mean over seeds)")
    ax.set_title(f"{sweeps[0]['task']}: trained on lengths ≤ {train_len}")
    ax.set_ylim(0.3, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _speed_plot(speed: list[dict], measure: str, scale: float, ylabel: str, xlabel: str, title: str, path: str):
    rows = [s for s in speed if s["measure"] == measure]
    if not rows:
        return _empty(path, "speed was not measured")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for model in dict.fromkeys(s["model"] for s in rows):
        points = sorted((s["length"], s["value"] * scale) for s in rows if s["model"] == model)
        ax.plot(*zip(*points), marker="o", markersize=3, **_style(model))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
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
