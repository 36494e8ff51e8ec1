"""broker.db's group commits: what a PUBACK waits for is committed at once; acknowledged rows leaving the
queue take no commit of their own."""

from __future__ import annotations

import asyncio
import sqlite3

from fleet.broker import store as store_module
from fleet.broker.store import BrokerStore


def _rows(path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [seq for (seq,) in conn.execute("SELECT seq FROM queued ORDER BY seq")]


async def _queue_then_acknowledge(path) -> dict[str, object]:
    store = BrokerStore(path)
    store.start(asyncio.get_running_loop())
    seqs = [store.append("collector", f"fleet/acme/m{i}/report", b"{}", 1) for i in range(3)]
    barrier = store.barrier()
    assert barrier is not None
    await asyncio.wait_for(barrier, 5)  # a PUBACK's wait: committed within the group window
    after_queue = {"rows": _rows(path), "commits": store.stats["store_commits"]}
    store.ack(seqs[0])
    await asyncio.sleep(0.2)  # well past the group window, well before ACKS_LATE_S
    acked_alone = {"rows": _rows(path), "commits": store.stats["store_commits"],
                   "barrier": store.barrier()}
    store.ack(seqs[1])
    seqs.append(store.append("collector", "fleet/acme/m9/report", b"{}", 1))
    barrier = store.barrier()
    assert barrier is not None
    await asyncio.wait_for(barrier, 5)
    with_company = {"rows": _rows(path), "commits": store.stats["store_commits"]}
    await store.close()
    return {"seqs": seqs, "after_queue": after_queue, "acked_alone": acked_alone, "with_company": with_company}


def test_acknowledgements_ride_on_the_next_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "ACKS_LATE_S", 30.0)
    seen = asyncio.run(_queue_then_acknowledge(tmp_path / "broker.db"))
    first, second, third, fourth = seen["seqs"]
    assert seen["after_queue"] == {"rows": [first, second, third], "commits": 1}
    # the acknowledgement alone: no commit, and a PUBACK sent now waits for nothing
    assert seen["acked_alone"] == {"rows": [first, second, third], "commits": 1, "barrier": None}
    # the next commit a PUBACK waits for carries both acknowledgements
    assert seen["with_company"] == {"rows": [third, fourth], "commits": 2}


async def _acknowledge_only(path) -> list[int]:
    store = BrokerStore(path)
    store.start(asyncio.get_running_loop())
    seq = store.append("collector", "fleet/acme/m1/report", b"{}", 1)
    barrier = store.barrier()
    assert barrier is not None
    await asyncio.wait_for(barrier, 5)
    store.ack(seq)
    for _ in range(100):  # bounded: ACKS_LATE_S is 0.05 s here
        if not _rows(path):
            break
        await asyncio.sleep(0.05)
    rows = _rows(path)
    await store.close()
    return rows


def test_acknowledgements_alone_are_written_within_acks_late(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "ACKS_LATE_S", 0.05)
    assert asyncio.run(_acknowledge_only(tmp_path / "broker.db")) == []
