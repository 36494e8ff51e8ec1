"""Keepalive for every connection with one timer: a wheel of one-second slots.

A connection is filed under the second its keepalive limit (1.5 x the client's keepalive) runs out,
counted from the last packet read. A tick each second looks only at the slot that is due: a connection
that read nothing since is dropped, the others are filed again. Stock amqtt arms a timer per packet,
which makes one timer and one closure per connection, re-armed as they fire, and a heap of thousands of
timers.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

TICK_S = 1.0


class Watched(Protocol):
    """What the wheel needs of a connection's reader: when it last read a packet."""

    last_read: float


class KeepaliveWheel:
    """Drops connections silent for longer than their limit; ``expire(key)`` is called for each, once."""

    def __init__(self, alive: Callable[[Any], bool], expire: Callable[[Any], None]) -> None:
        self._alive = alive
        self._expire = expire
        self._slots: dict[int, list[tuple[Any, Watched, float]]] = {}
        self._next = 0  # the first second not ticked yet
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return sum(len(slot) for slot in self._slots.values())

    def watch(self, key: Any, reader: Watched, limit: float) -> None:
        """Watch a connection (``key``, e.g. its handler) whose reader must read something every ``limit`` s."""
        self._file(key, reader, limit)
        if self._timer is None:
            self._next = int(time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(TICK_S, self._tick)

    def _file(self, key: Any, reader: Watched, limit: float) -> None:
        due = math.ceil(reader.last_read + limit)
        self._slots.setdefault(max(due, self._next), []).append((key, reader, limit))

    def _tick(self) -> None:
        now = time.monotonic()
        second = int(now)
        while self._next <= second:
            for key, reader, limit in self._slots.pop(self._next, ()):
                if not self._alive(key):
                    continue
                if now - reader.last_read >= limit:
                    self._expire(key)
                else:
                    self._file(key, reader, limit)
            self._next += 1
        self._timer = asyncio.get_running_loop().call_later(TICK_S, self._tick) if self._slots else None

    def stop(self) -> None:
        """Cancel the timer and forget every connection."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._slots.clear()
