"""Run a Python module (``python3 bench/profiled.py OUT MODULE ARGS...``) with cProfile on its main thread
between SIGUSR1 (start) and SIGUSR2 (stop, and dump pstats to OUT): a benchmark profiles one phase of a part
running as its own process (``bench/load.py --profile``), e.g. the embedded broker's event loop in the steady
phase. Threads other than the main one are not profiled."""

from __future__ import annotations

import cProfile
import gc
import runpy
import signal
import sys
import time
from typing import Any


def main() -> None:
    """Install the two signal handlers, then run the module as ``python -m`` would."""
    out, module, *args = sys.argv[1:]
    # CPU time of the profiled thread, not wall time: on shared cores, time spent waiting for a core would
    # otherwise be charged to whatever function was running.
    profile = cProfile.Profile(time.thread_time)
    collections: dict[str, Any] = {"on": False, "since": 0.0, "seconds": [0.0] * 3, "count": [0] * 3}

    def timed_gc(phase: str, info: dict[str, int]) -> None:
        if not collections["on"]:
            return
        if phase == "start":
            collections["since"] = time.perf_counter()
        else:
            collections["seconds"][info["generation"]] += time.perf_counter() - collections["since"]
            collections["count"][info["generation"]] += 1

    def start(*_: object) -> None:
        collections["on"] = True
        profile.enable()

    def stop(*_: object) -> None:
        profile.disable()
        collections["on"] = False
        profile.dump_stats(out)
        print("profiled.py: garbage collections by generation: " + ", ".join(
            f"{n} in {t:.3f} s" for n, t in zip(collections["count"], collections["seconds"], strict=True))
            + f" (objects now: {len(gc.get_objects())})", file=sys.stderr, flush=True)

    gc.callbacks.append(timed_gc)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
