"""The collector lease: which collector of a shard is active, held in the database by its holder.

One row per shard (the shard's MQTT client id). The active collector renews it; a waiting one takes it over
once it has expired, or at once when its holder ran on this host and its process is gone. Each new holder
gets the next ``epoch``. Every write transaction of the active collector starts with ``fence``, which locks
the row and checks that the lease is still its own and unexpired, so a collector that lost its lease (stopped
for a while, or cut off from the database) writes nothing more: there are never two writers. Times are the
database's clock, so hosts whose clocks disagree still agree on who holds the lease.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from fleet.store.database import SQLITE, Database
from fleet.store.errors import StoreError

_NOW = {SQLITE: "((julianday('now') - 2440587.5) * 86400.0)",
        "postgresql": "(extract(epoch from clock_timestamp())::float8)"}
SEEN_WITHIN_S = 30.0  # a collector not seen for this long is no longer listed


class LeaseLost(StoreError):
    """This collector no longer holds its shard's lease: it must stop writing."""


@dataclass(frozen=True)
class Lease:
    """A lease this process holds: the shard, its instance name and the epoch it got."""

    shard: str
    holder: str
    epoch: int


@dataclass(frozen=True)
class Collector:
    """A collector process as /healthz and /metrics show it."""

    instance: str
    shard: str
    active: bool


def _now(db: Database) -> str:
    return _NOW[db.engine]


def _holder_gone(db: Database, shard: str) -> bool:
    """Whether the lease's holder ran on this host and its process no longer exists."""
    row = db.query_one("SELECT host, pid FROM collector_lease WHERE shard = ?", (shard,))
    if row is None or row[0] != socket.gethostname() or int(row[1]) == os.getpid():
        return False
    try:
        os.kill(int(row[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it exists (another user's process): only its expiry frees the lease
    return False


def acquire(db: Database, shard: str, holder: str, lease_s: float) -> Lease | None:
    """Take the shard's lease if nobody holds it (free, expired, or its holder's process here is gone); else None."""
    now = _now(db)
    with db.transaction():
        gone = _holder_gone(db, shard)
        taken = db.execute(
            f"INSERT INTO collector_lease(shard, holder, host, pid, epoch, expires, renewed)"
            f" VALUES (?, ?, ?, ?, 1, {now} + ?, {now})"
            f" ON CONFLICT(shard) DO UPDATE SET holder = excluded.holder, host = excluded.host, pid = excluded.pid,"
            f" epoch = collector_lease.epoch + 1, expires = excluded.expires, renewed = excluded.renewed"
            f" WHERE collector_lease.expires <= {now} OR ?",
            (shard, holder, socket.gethostname(), os.getpid(), lease_s, gone))
        if taken != 1:
            return None
        row = db.query_one("SELECT epoch FROM collector_lease WHERE shard = ?", (shard,))
    assert row is not None
    return Lease(shard, holder, int(row[0]))


def renew(db: Database, lease: Lease, lease_s: float) -> bool:
    """Extend the lease by ``lease_s`` from now; False if it is no longer ours (expired or taken over)."""
    now = _now(db)
    return db.execute(f"UPDATE collector_lease SET expires = {now} + ?, renewed = {now}"
                      f" WHERE shard = ? AND holder = ? AND epoch = ? AND expires > {now}",
                      (lease_s, lease.shard, lease.holder, lease.epoch)) == 1


def fence(db: Database, lease: Lease) -> None:
    """First statement of a write transaction: lock the lease row and raise LeaseLost unless it is still ours.

    The row stays locked until the transaction ends, so a takeover waits for it and every write of the old
    holder lands before the new holder's first one.
    """
    now = _now(db)
    if db.execute(f"UPDATE collector_lease SET epoch = epoch WHERE shard = ? AND holder = ? AND epoch = ?"
                  f" AND expires > {now}", (lease.shard, lease.holder, lease.epoch)) != 1:
        raise LeaseLost(f"collector {lease.holder} lost the lease of {lease.shard} (epoch {lease.epoch})")


def release(db: Database, lease: Lease) -> None:
    """Give the lease up at a clean stop, so a waiting collector takes over at once."""
    db.execute("UPDATE collector_lease SET expires = 0 WHERE shard = ? AND holder = ? AND epoch = ?",
               (lease.shard, lease.holder, lease.epoch))


def seen(db: Database, instance: str, shard: str) -> None:
    """Record that the collector ``instance`` (active or waiting) is alive."""
    now = _now(db)
    db.execute(f"INSERT INTO collectors(instance, shard, seen) VALUES (?, ?, {now})"
               f" ON CONFLICT(instance) DO UPDATE SET shard = excluded.shard, seen = excluded.seen", (instance, shard))


def forget(db: Database, instance: str) -> None:
    """A collector that stops cleanly leaves the list."""
    db.execute("DELETE FROM collectors WHERE instance = ?", (instance,))


def collectors(db: Database) -> list[Collector]:
    """Every collector seen within SEEN_WITHIN_S, and every unexpired lease holder, by instance name."""
    now = _now(db)
    rows = db.query(
        f"SELECT c.instance, c.shard, EXISTS (SELECT 1 FROM collector_lease l WHERE l.holder = c.instance"
        f" AND l.expires > {now}) FROM collectors c WHERE c.seen > {now} - ?"
        f" UNION SELECT holder, shard, 1 = 1 FROM collector_lease WHERE expires > {now}"
        f" AND holder NOT IN (SELECT instance FROM collectors WHERE seen > {now} - ?)",
        (SEEN_WITHIN_S, SEEN_WITHIN_S))
    return sorted((Collector(str(r[0]), str(r[1]), bool(r[2])) for r in rows), key=lambda c: c.instance)
