"""broker.db's group commits: a batch waits out its window, unless a publisher with many PUBACKs waiting hurries it."""

from __future__ import annotations

import asyncio
import sqlite3

from fleet.broker import store as store_module
from fleet.broker.store import BrokerStore, Commit


def test_a_hurried_batch_is_committed_without_waiting_out_its_window(tmp_path, monkeypatch):
    """With a one-minute window, a batch stays open for a turn of the loop; hurried, it is committed in moments."""
    monkeypatch.setattr(store_module, "GROUP_WINDOW_S", 60.0)
    path = tmp_path / "broker.db"

    async def run() -> None:
        store = BrokerStore(path)
        store.start(asyncio.get_running_loop())
        try:
            store.append("collector", "fleet/acme/m1/report", b"{}", 1)
            barrier = store.barrier()
            assert barrier is not None
            await asyncio.sleep(0)  # one turn of the loop: nothing seals the batch yet
            assert not barrier.done()
            store.hurry()
            await asyncio.wait_for(barrier.wait(), timeout=10)
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
            await asyncio.wait_for(barrier.wait(), timeout=10)
        finally:
            await store.close()

    asyncio.run(run())


def test_a_row_acknowledged_within_its_own_batch_is_never_written(tmp_path):
    """The subscriber acknowledged the message before the batch holding its row was committed: the commit
    writes neither the row nor its deletion (and what was not acknowledged is still written)."""

    async def run() -> None:
        store = BrokerStore(tmp_path / "broker.db")
        store.start(asyncio.get_running_loop())
        try:
            delivered = store.append("collector", "fleet/acme/m1/report", b"1", 1)
            store.append("collector", "fleet/acme/m1/report", b"2", 1)
            store.ack(delivered)
            barrier = store.barrier()
            assert barrier is not None
            await asyncio.wait_for(barrier.wait(), timeout=10)
            assert store.stats["store_commits"] == 1
            assert store.stats["store_rows_written"] == 1
        finally:
            await store.close()

    asyncio.run(run())
    with sqlite3.connect(tmp_path / "broker.db") as conn:
        assert conn.execute("SELECT payload FROM queued").fetchall() == [(b"2",)]


def test_a_commit_calls_back_everyone_waiting_as_it_completes(caplog):
    """Callbacks run in the completing call, in order, a failing one logged without stopping the others;
    a coroutine awaits wait(); a callback added afterwards runs at once."""
    calls: list[str] = []

    def failing(_commit: Commit) -> None:
        raise RuntimeError("boom")

    async def run() -> None:
        commit = Commit()
        commit.add_done_callback(lambda _c: calls.append("first"))
        commit.add_done_callback(failing)
        commit.add_done_callback(lambda _c: calls.append("third"))
        waiting = commit.wait()
        assert not commit.done()
        assert not waiting.done()
        commit.complete()
        assert calls == ["first", "third"]
        await asyncio.wait_for(waiting, timeout=10)
        commit.add_done_callback(lambda _c: calls.append("late"))
        assert calls == ["first", "third", "late"]
        assert commit.wait().done()

    asyncio.run(run())
    assert "a callback of a commit failed" in caplog.text
