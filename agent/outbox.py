"""The agent's on-disk outbox: every report is stored before it is sent and deleted on PUBACK.

Bounded by count and bytes (oldest dropped first, and counted), so a long broker outage cannot fill
the disk; a crash loses at most the report being built.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from fleet.agent.errors import AgentError

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
                                   payload BLOB NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS last_report (id INTEGER PRIMARY KEY CHECK (id = 1), session TEXT NOT NULL,
                                        seq INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Item:
    """One queued message."""

    id: int
    topic: str
    payload: bytes


class Outbox:
    """FIFO of messages waiting for their PUBACK, in a small SQLite file."""

    def __init__(self, path: Path, max_items: int, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_items = max_items
        self.max_bytes = max_bytes
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._count, self._bytes = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM outbox").fetchone()
            self.full_drops = 0  # dropped because the disk was full (not persisted: the disk is full)
        except sqlite3.Error as exc:
            raise AgentError(f"cannot open the agent queue {self.path}: {exc}") from exc

    def __len__(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        """Bytes of payload queued."""
        return self._bytes

    def append(self, topic: str, payload: bytes) -> int:
        """Queue a message; drops the oldest ones beyond the bounds (counted as ``dropped``).

        When the disk is full, the oldest tenth of the queue makes room; if even that fails, this message
        is dropped and counted (returns 0): the agent keeps running and reporting.
        """
        for attempt in range(2):
            try:
                cur = self._db.execute("INSERT INTO outbox(topic, payload, size) VALUES (?, ?, ?)",
                                       (topic, payload, len(payload)))
                self._count += 1
                self._bytes += len(payload)
                self._enforce_bounds()
                return cur.lastrowid or 0
            except sqlite3.OperationalError as exc:
                if "full" not in str(exc):
                    raise AgentError(f"agent queue write failed: {exc}") from exc
                if attempt == 0 and self._count:
                    self._drop_oldest(max(1, self._count // 10))
            except sqlite3.Error as exc:
                raise AgentError(f"agent queue write failed: {exc}") from exc
        self.full_drops += 1
        return 0

    def _drop_oldest(self, n: int) -> None:
        rows = self._db.execute("SELECT id, size FROM outbox ORDER BY id LIMIT ?", (n,)).fetchall()
        self._db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (n,))
        self._count -= len(rows)
        self._bytes -= sum(size for _, size in rows)
        self.full_drops += len(rows)

    def _enforce_bounds(self) -> None:
        dropped = 0
        while self._count > self.max_items or (self._bytes > self.max_bytes and self._count > 1):
            row = self._db.execute("SELECT id, size FROM outbox ORDER BY id LIMIT 1").fetchone()
            if row is None:
                break
            self._db.execute("DELETE FROM outbox WHERE id = ?", (row[0],))
            self._count -= 1
            self._bytes -= row[1]
            dropped += 1
        if dropped:
            self._db.execute("INSERT INTO counters(name, value) VALUES ('dropped', ?) "
                             "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (dropped,))

    def peek(self, limit: int, after_id: int = 0) -> list[Item]:
        """The oldest ``limit`` messages with id > ``after_id``, in order."""
        rows = self._db.execute("SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                (after_id, limit))
        return [Item(i, t, bytes(p)) for i, t, p in rows]

    def remove(self, ids: list[int]) -> None:
        """Forget messages the broker acknowledged."""
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        count, size = self._db.execute(f"SELECT count(*), coalesce(sum(size), 0) FROM outbox WHERE id IN ({marks})",
                                       ids).fetchone()
        self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", ids)
        self._count -= count
        self._bytes -= size

    def remember_last(self, session: str, seq: int) -> None:
        """Record the session and seq of the newest report made, for the next run's ``prev_session``."""
        try:
            self._db.execute("INSERT INTO last_report(id, session, seq) VALUES (1, ?, ?) ON CONFLICT(id)"
                             " DO UPDATE SET session = excluded.session, seq = excluded.seq", (session, seq))
        except sqlite3.Error:
            pass  # only tail accounting needs it; a full disk is already counted by append()

    def last(self) -> tuple[str, int] | None:
        """The session and seq of the newest report made by this or an earlier run, or None."""
        row = self._db.execute("SELECT session, seq FROM last_report WHERE id = 1").fetchone()
        return (str(row[0]), int(row[1])) if row else None

    @property
    def dropped(self) -> int:
        """Messages dropped because the queue was over its bounds (lifetime) or the disk was full (this run)."""
        row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return (int(row[0]) if row else 0) + self.full_drops

    def close(self) -> None:
        """Close the file."""
        self._db.close()
