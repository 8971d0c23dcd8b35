"""Timing, compile-time and memory measurement shared by the benchmarks."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata

import jax


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    ``fn`` must block until its work is done (e.g. end with ``jax.block_until_ready``).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compile_seconds_and_memory(jitted, *args) -> tuple[float, int | None]:
    """Lowers and compiles ``jitted`` for ``args``; returns (seconds, XLA's memory estimate in bytes).

    The memory figure is XLA's own analysis of the compiled program (arguments + outputs + temporaries, minus
    aliased buffers), the peak a device allocator would need; ``None`` where the backend does not report it.
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    try:
        analysis = compiled.memory_analysis()
        memory = int(
            analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes
            - analysis.alias_size_in_bytes
        )
    except (AttributeError, NotImplementedError, TypeError):
        memory = None
    return seconds, memory


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    """Device, library versions and date, for the JSON record of a benchmark run."""
    versions = {}
    for package in ("rnnjax", "jax", "jaxlib", "flax", "equinox", "optax", "torch", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "device_count": jax.device_count(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": versions,
    }
