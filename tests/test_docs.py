"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs in a fresh namespace, so it needs its own imports and data; the blocks of one file run in
order in one process, in a fresh working directory each (what a block writes, e.g. ``runs/...``, does not
meet another's). A block may use what an earlier block of its file registered (a cell). Blocks that need
PyTorch are marked ``torch`` and run in a process of their own; blocks that train for long are marked
``slow``. Code that is not meant to run (shell output, pseudo-code) belongs in another fence language.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import pytest

from experiments.compare import cpu_seconds

ROOT = pathlib.Path(__file__).parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
SLOW = ("train.train_seeds(", "steps=2000")
"""A block that contains one of these runs for more than a few seconds."""

RUNNER = r"""
import json, os, sys, traceback
blocks = json.load(sys.stdin)
results = {}
for name, source, directory in blocks:
    os.makedirs(directory)
    os.chdir(directory)
    try:
        exec(compile(source, name, "exec"), {"__name__": "__main__"})
        results[name] = None
    except BaseException:
        results[name] = traceback.format_exc(limit=-8)
print("RESULTS" + json.dumps(results))
"""


def blocks() -> list[tuple[str, str, str]]:
    """``(file name, "file:line", source)`` of every python block, in order."""
    found = []
    for path in FILES:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text[: match.start()].count("\n") + 1
            found.append((path.name, f"{path.relative_to(ROOT)}:{line}", match.group(1)))
    return found


def group(source: str) -> str:
    return "torch" if re.search(r"^\s*import torch|^\s*from torch", source, flags=re.M) else "plain"


def marks(source: str) -> list:
    found = [pytest.mark.torch] if group(source) == "torch" else []
    return found + ([pytest.mark.slow] if any(word in source for word in SLOW) else [])


@functools.cache
def run_group(file: str, kind: str, slow: bool) -> dict[str, str | None]:
    """Runs the blocks of ``file`` of one kind in one subprocess; ``name -> None`` or the traceback."""
    selected = [
        (name, source)
        for f, name, source in blocks()
        if f == file and group(source) == kind and any(w in source for w in SLOW) == slow
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for _ in range(STALL_TRIES):
        workdir = tempfile.mkdtemp(prefix="rnnjax-docs-")
        payload = [(name, source, os.path.join(workdir, str(i))) for i, (name, source) in enumerate(selected)]
        done = _run_watched(json.dumps(payload), env, workdir)
        if done is not None:
            break
    else:
        return {name: f"no progress for {STALL_SECONDS:.0f} s in {STALL_TRIES} attempts" for name, _ in selected}
    stdout, stderr, returncode = done
    out = stdout.rsplit("RESULTS", 1)
    if len(out) != 2:
        return {name: f"the process died (status {returncode}):\n{stderr[-3000:]}" for name, _ in selected}
    return json.loads(out[1])


STALL_SECONDS = 90.0
"""A block process whose CPU time has not grown for this long is taken as hung, killed and run again: XLA:CPU
(jax 0.10.2) now and then never finishes a computation when two processes share two cores (every XLA thread
idle, the executable waiting on an async value; seen twice in this test on local CI runs, and in
experiments/compare.py, which watches its workers the same way)."""
STALL_TRIES = 2


def _run_watched(payload: str, env: dict, workdir: str, stall_seconds: float = STALL_SECONDS):
    """Runs the block runner on ``payload``; ``(stdout, stderr, returncode)``, or ``None`` if it stalled."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            [sys.executable, "-c", RUNNER], stdin=subprocess.PIPE, stdout=out, stderr=err, text=True, env=env,
            cwd=workdir,
        )  # fmt: skip
        process.stdin.write(payload)
        process.stdin.close()
        last_cpu, since = None, time.monotonic()
        while process.poll() is None:
            time.sleep(1.0)
            used = cpu_seconds(process.pid)
            if used != last_cpu:
                last_cpu, since = used, time.monotonic()
            elif time.monotonic() - since > stall_seconds:
                process.kill()
                process.wait()
                return None
        out.seek(0)
        err.seek(0)
        return out.read(), err.read(), process.returncode


@pytest.mark.parametrize(
    "file, name, source", [pytest.param(*block, id=block[1], marks=marks(block[2])) for block in blocks()]
)
def test_python_block_runs(file, name, source):
    if group(source) == "torch":
        pytest.importorskip("torch")
    error = run_group(file, group(source), any(word in source for word in SLOW))[name]
    assert error is None, f"{name} failed:\n{error}"


def test_blocks_are_found():
    names = [name for _, name, _ in blocks()]
    assert any(name.startswith("README.md:") for name in names)
    assert any(name.startswith("docs/training.md:") for name in names)


def test_a_stalled_block_process_is_killed(tmp_path):
    payload = json.dumps([("sleeper", "import time\ntime.sleep(60)", str(tmp_path / "0"))])
    start = time.monotonic()
    assert _run_watched(payload, dict(os.environ), str(tmp_path), stall_seconds=2.0) is None
    assert time.monotonic() - start < 30
