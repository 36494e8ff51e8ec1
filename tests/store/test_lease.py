"""The collector lease on both engines: one holder at a time, takeover after expiry, fenced writes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fleet.store import lease
from fleet.store.database import open_database

pytestmark = pytest.mark.both_engines

SHARD = "fleet.collector-test"


def _expire(db, shard: str = SHARD) -> None:
    db.execute("UPDATE collector_lease SET expires = 0 WHERE shard = ?", (shard,))


def test_one_holder_until_it_expires(db, database_url):
    first = lease.acquire(db, SHARD, "a", 5)
    assert first is not None
    assert first.epoch == 1
    with open_database(database_url) as other:
        assert lease.acquire(other, SHARD, "b", 5) is None
        assert lease.renew(db, first, 5)
        _expire(other)
        second = lease.acquire(other, SHARD, "b", 5)
        assert second is not None
        assert second.epoch == 2
    assert not lease.renew(db, first, 5)  # taken over: the old holder cannot renew it back


def test_fence_refuses_the_old_holder_and_rolls_back(db, database_url):
    first = lease.acquire(db, SHARD, "a", 5)
    assert first is not None
    db.fence = lambda d: lease.fence(d, first)
    with db.transaction():
        db.execute("INSERT INTO meta(key, value) VALUES ('fenced', 'first')")
    _expire(db)
    with open_database(database_url) as other:
        assert lease.acquire(other, SHARD, "b", 5) is not None
    with pytest.raises(lease.LeaseLost), db.transaction():
        db.execute("UPDATE meta SET value = 'second' WHERE key = 'fenced'")
    db.fence = None
    assert db.query_one("SELECT value FROM meta WHERE key = 'fenced'") == ("first",)


def test_release_frees_it_at_once(db):
    first = lease.acquire(db, SHARD, "a", 60)
    assert first is not None
    lease.release(db, first)
    assert lease.acquire(db, SHARD, "b", 60) is not None


def test_a_dead_holder_on_this_host_is_replaced_at_once(db):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    held = lease.acquire(db, SHARD, "gone", 60)
    assert held is not None
    db.execute("UPDATE collector_lease SET pid = ? WHERE shard = ?", (child.pid, SHARD))
    taken = lease.acquire(db, SHARD, "b", 60)
    assert taken is not None
    assert taken.epoch == 2


def test_collectors_lists_active_and_waiting(db):
    lease.seen(db, "a", SHARD)
    lease.seen(db, "b", SHARD)
    assert lease.acquire(db, SHARD, "a", 60) is not None
    assert [(c.instance, c.active) for c in lease.collectors(db)] == [("a", True), ("b", False)]
    lease.forget(db, "b")
    assert [c.instance for c in lease.collectors(db)] == ["a"]
