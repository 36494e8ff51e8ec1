"""broker.db's group commits: a batch waits out its window, unless enough acknowledgements wait for it."""

from __future__ import annotations

import asyncio
import sqlite3

from fleet.broker import store as store_module
from fleet.broker.store import GROUP_ACKS, BrokerStore


def test_a_batch_is_committed_at_once_when_enough_acknowledgements_wait(tmp_path, monkeypatch):
    """With a one-minute window, a batch that GROUP_ACKS PUBACKs wait for is still committed in moments; one
    that fewer wait for stays open."""
    monkeypatch.setattr(store_module, "GROUP_WINDOW_S", 60.0)
    path = tmp_path / "broker.db"

    async def run() -> None:
        store = BrokerStore(path)
        store.start(asyncio.get_running_loop())
        try:
            store.append("collector", "fleet/acme/m1/report", b"{}", 1)
            waiting = [store.barrier() for _ in range(GROUP_ACKS - 1)]
            await asyncio.sleep(0)  # one turn of the loop: nothing seals the batch yet
            assert not any(future is not None and future.done() for future in waiting)
            last = store.barrier()
            assert last is waiting[0]
            await asyncio.wait_for(last, timeout=10)
        finally:
            await store.close()

    asyncio.run(run())
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT topic FROM queued").fetchall() == [("fleet/acme/m1/report",)]


def test_a_lone_change_is_committed_once_its_window_ends(tmp_path):
    """A retained change nobody else joins is committed by the window's timer."""

    async def run() -> None:
        store = BrokerStore(tmp_path / "broker.db")
        store.start(asyncio.get_running_loop())
        try:
            store.record("fleet/acme/m1/ping", b"{}", 1)
            barrier = store.barrier()
            assert barrier is not None
            await asyncio.wait_for(barrier, timeout=10)
        finally:
            await store.close()

    asyncio.run(run())
