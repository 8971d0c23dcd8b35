"""Timing, compile-time and memory measurement shared by the benchmarks and the experiments.

Every timed callable must block until its work is done (e.g. end with ``jax.block_until_ready``). Contenders
are timed round-robin (:func:`interleaved_samples`, :func:`interleaved_medians`) so that machine noise hits each
alike; :func:`per_call_seconds` times calls too short to time one by one.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import NamedTuple

import jax


class Samples(NamedTuple):
    """The timed calls of one callable, in order.

    Attributes:
        wall: wall-clock seconds of each call.
        cpu: CPU seconds of this process (all threads) during each call.
    """

    wall: list[float]
    cpu: list[float]


def seconds_of(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn()``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_samples(
    callables: Mapping[str, Callable[[], object]],
    repeats: int | Mapping[str, int],
    warmup: int = 0,
    pause: float = 0.0,
) -> dict[str, Samples]:
    """Times every callable round by round, so that noise is shared; returns its :class:`Samples` by name.

    Args:
        callables: name -> a callable that blocks until its work is done.
        repeats: timed calls of each callable, or name -> timed calls (a callable whose count is used up
            sits out the later rounds).
        warmup: untimed calls of each callable first (compilation, allocator warm-up).
        pause: seconds to sleep before each timed call, so that one contender's worker threads (PyTorch's
            OpenMP threads spin for a while after their work) have gone idle before the next is timed; the
            callable is then called once untimed, so that the timed call finds its own threads awake, as in a
            loop of calls.
    """
    counts = {name: repeats[name] if isinstance(repeats, Mapping) else repeats for name in callables}
    for fn in callables.values():
        for _ in range(warmup):
            fn()
    samples = {name: Samples([], []) for name in callables}
    for round_index in range(max(counts.values(), default=0)):
        for name, fn in callables.items():
            if round_index >= counts[name]:
                continue
            if pause:
                time.sleep(pause)
                fn()
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            fn()
            samples[name].wall.append(time.perf_counter() - wall_start)
            samples[name].cpu.append(time.process_time() - cpu_start)
    return samples


def interleaved_medians(
    callables: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 2, pause: float = 0.0
) -> dict[str, float]:
    """Median wall seconds of each callable over ``repeats`` interleaved calls after ``warmup`` untimed ones
    (``pause``: see :func:`interleaved_samples`)."""
    samples = interleaved_samples(callables, repeats, warmup, pause)
    return {name: statistics.median(timed.wall) for name, timed in samples.items()}


def per_call_seconds(fn: Callable, *args, repeats: int = 5, min_seconds: float = 0.2) -> float:
    """Median wall seconds of one ``fn(*args)`` call, for calls too short to time one at a time.

    After one warm-up call, ``fn`` is called back to back until ``min_seconds / repeats`` have passed, which
    fixes ``calls``; each of ``repeats`` samples then times ``calls`` back-to-back calls, blocking only on the
    last output, and is divided by ``calls``.
    """
    jax.block_until_ready(fn(*args))
    start, calls = time.perf_counter(), 0
    while True:
        jax.block_until_ready(fn(*args))
        calls += 1
        if time.perf_counter() - start > min_seconds / repeats:
            break

    def batch_of_calls():
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)

    samples = interleaved_samples({"batch": batch_of_calls}, repeats)["batch"]
    return statistics.median(seconds / calls for seconds in samples.wall)


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


def pin_threads(count: int) -> None:
    """Pins this process to its first ``count`` usable cores (threads started later inherit it) and gives the
    native kernels ``count`` threads. Call before JAX runs anything, so that XLA's thread pools are pinned too."""
    from rnnjax.kernels import native

    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:count])
    native.set_threads(count)


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
