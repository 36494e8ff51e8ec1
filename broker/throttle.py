"""Failures that come in floods, logged as one line per kind per 10 s with how many happened meanwhile."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager

EVERY_S = 10.0


class ThrottledLog:
    """Log a kind of event at most once per ``every_s``; each line says how many there were since the last."""

    def __init__(self, logger: logging.Logger, every_s: float = EVERY_S) -> None:
        self.logger = logger
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._since: Counter[str] = Counter()

    def due(self, kind: str) -> int:
        """Count one event of ``kind``; how many to report now (this one included), or 0 to stay quiet."""
        self._since[kind] += 1
        now = time.monotonic()
        if now - self._last.get(kind, float("-inf")) < self.every_s:
            return 0
        self._last[kind] = now
        return self._since.pop(kind)

    def __call__(self, kind: str, level: int, message: str, *args: object) -> None:
        """Count one event; log ``message % args`` with the count when this kind is due."""
        count = self.due(kind)
        if count:
            self.logger.log(level, message + " (%d in the last %.0f s)", *args, count, self.every_s)


# What asyncio logs once per write to a connection that is already gone (after 5 such writes), by kind.
ASYNCIO_FLOODS = {"socket.send() raised exception.": "write_after_close",
                  "SSL connection is closed": "write_after_close"}


class AsyncioFloods(logging.Filter):
    """A filter for the ``asyncio`` logger: its per-write warnings about connections that are gone become
    one line per 10 s with a count, and are counted in ``stats``."""

    def __init__(self, stats: MutableMapping[str, int], every_s: float = EVERY_S) -> None:
        super().__init__()
        self.stats = stats
        self.throttle = ThrottledLog(logging.getLogger("asyncio"), every_s)

    def filter(self, record: logging.LogRecord) -> bool:
        """Let through the first of a flood in each period, with its count; count and drop the rest."""
        kind = ASYNCIO_FLOODS.get(record.msg) if isinstance(record.msg, str) else None
        if kind is None:
            return True
        self.stats[kind] = self.stats.get(kind, 0) + 1
        count = self.throttle.due(kind)
        if count:
            every = self.throttle.every_s
            record.msg = f"{record.msg} ({count} writes to closed connections in the last {every:.0f} s)"
        return bool(count)


@contextmanager
def asyncio_floods_throttled(stats: MutableMapping[str, int]) -> Iterator[None]:
    """Throttle asyncio's per-write warnings while the broker runs."""
    floods = AsyncioFloods(stats)
    logger = logging.getLogger("asyncio")
    logger.addFilter(floods)
    try:
        yield
    finally:
        logger.removeFilter(floods)
