"""How late the broker's event loop runs: the delay of a timer due every 100 ms, over the last minute, and the
interpreter's full garbage collections, which stop the loop while they run."""

from __future__ import annotations

import asyncio
import gc
import time
from collections import deque
from typing import Any

TICK_S = 0.1
WINDOW_S = 60.0  # what the summary covers
WINDOW = round(WINDOW_S / TICK_S)  # samples in it
OLDEST = 2  # the generation whose collections walk every tracked object


class LoopLag:
    """Samples the event loop's lag while ``run()`` runs; ``summary()`` gives its p99 and maximum, and the full
    collections of the last minute."""

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=WINDOW)
        self.collections: deque[tuple[float, float]] = deque(maxlen=WINDOW)  # (ended at, seconds)
        self._collecting_since = 0.0

    def _collection(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != OLDEST:
            return
        now = time.monotonic()
        if phase == "start":
            self._collecting_since = now
        elif self._collecting_since:
            self.collections.append((now, now - self._collecting_since))
            self._collecting_since = 0.0

    async def run(self) -> None:
        """Measure until cancelled."""
        gc.callbacks.append(self._collection)
        try:
            while True:
                start = time.monotonic()
                await asyncio.sleep(TICK_S)
                self.samples.append(max(0.0, time.monotonic() - start - TICK_S))
        finally:
            gc.callbacks.remove(self._collection)

    def summary(self) -> dict[str, float]:
        """``loop_lag_p99_ms`` and ``loop_lag_max_ms`` over the last minute (0 before the first sample);
        ``gc_full_collections`` and ``gc_full_max_ms``, the oldest generation's collections in the last minute."""
        ordered = sorted(self.samples)
        since = time.monotonic() - WINDOW_S
        pauses = [seconds for ended, seconds in self.collections if ended >= since]
        gc_figures = {"gc_full_collections": float(len(pauses)),
                      "gc_full_max_ms": round(max(pauses, default=0.0) * 1000, 1)}
        if not ordered:
            return {"loop_lag_p99_ms": 0.0, "loop_lag_max_ms": 0.0, **gc_figures}
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return {"loop_lag_p99_ms": round(p99 * 1000, 1), "loop_lag_max_ms": round(ordered[-1] * 1000, 1),
                **gc_figures}
