"""The keepalive wheel: one timer drops exactly the connections that read nothing for their limit."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fleet.broker.keepalive import KeepaliveWheel


@dataclass
class Reader:
    last_read: float = field(default_factory=time.monotonic)


async def _run() -> tuple[list[str], int, int]:
    expired: list[str] = []
    ended = {"ended"}
    wheel = KeepaliveWheel(alive=lambda key: key not in ended, expire=expired.append)
    readers = {name: Reader() for name in ("silent", "busy", "ended", "slow")}
    wheel.watch("silent", readers["silent"], 1.0)
    wheel.watch("busy", readers["busy"], 1.0)
    wheel.watch("ended", readers["ended"], 1.0)  # its connection ended: never expired
    wheel.watch("slow", readers["slow"], 30.0)
    timers_before = len(asyncio.get_running_loop()._scheduled)  # noqa: SLF001 - counting the loop's timers
    for _ in range(16):  # 3.2 s
        readers["busy"].last_read = time.monotonic()
        await asyncio.sleep(0.2)
    watched = len(wheel)
    wheel.stop()
    return expired, watched, timers_before


def test_only_silent_connections_expire_each_once_with_one_timer():
    expired, watched, timers = asyncio.run(_run())
    assert expired == ["silent"]
    assert watched == 2  # busy and slow, filed again
    assert timers == 1
