"""``python -m rnnjax.bench.helper_start``: how long the native LSTM forward takes when its helper threads start late.

Times single calls of the native-kernel LSTM forward pass (B=32, T=128, I=64, H=256 by default) back to back, and
after a pause followed by one untimed call (the protocol of ``python -m rnnjax.bench``). On a machine whose idle
cores wake slowly, a helper thread starts late and single calls take longer; the spread of the printed times shows
it. docs/benchmarks.md quotes this command's output.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from rnnjax.bench import peers
from rnnjax.kernels import native


def call_times(forward, calls: int, pause: float) -> list[float]:
    """Milliseconds of ``calls`` timed calls of ``forward``, each after ``pause`` seconds and one untimed call
    (``pause=0``: back to back)."""
    times = []
    for _ in range(calls):
        if pause:
            time.sleep(pause)
            forward()
        start = time.perf_counter()
        forward()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnjax.bench.helper_start", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads of the native kernels (default 2)")
    parser.add_argument("--calls", type=int, default=15, help="timed calls per setting")
    parser.add_argument("--pause", type=float, default=0.25, help="seconds of the paused setting")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--time", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args(argv)
    native.set_threads(args.threads)
    print(f"# {native.status()}")
    peer = peers.rnnjax_peer(peers.Problem("lstm", args.batch, args.time, 64, args.hidden))
    for pause in (0.0, args.pause):
        times = call_times(peer.forward, args.calls, pause)
        median = statistics.median(times)
        print(f"pause {pause}: " + " ".join(f"{t:.1f}" for t in times) + f"  (median {median:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
