"""How late the broker's event loop runs: the delay of a timer due every 100 ms, over the last minute."""

from __future__ import annotations

import asyncio
import time
from collections import deque

TICK_S = 0.1
WINDOW = 600  # samples: one minute


class LoopLag:
    """Samples the event loop's lag while ``run()`` runs; ``summary()`` gives its p99 and maximum."""

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=WINDOW)

    async def run(self) -> None:
        """Measure until cancelled."""
        while True:
            start = time.monotonic()
            await asyncio.sleep(TICK_S)
            self.samples.append(max(0.0, time.monotonic() - start - TICK_S))

    def summary(self) -> dict[str, float]:
        """``loop_lag_p99_ms`` and ``loop_lag_max_ms`` over the last minute (0 before the first sample)."""
        ordered = sorted(self.samples)
        if not ordered:
            return {"loop_lag_p99_ms": 0.0, "loop_lag_max_ms": 0.0}
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return {"loop_lag_p99_ms": round(p99 * 1000, 1), "loop_lag_max_ms": round(ordered[-1] * 1000, 1)}
