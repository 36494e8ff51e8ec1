"""Broker state persisted in ``<data_dir>/broker.db``: retained messages, and the subscriptions of
persistent sessions, so pings and the collector's session survive a broker restart.

Changes are recorded in memory on the event loop and written in batches from a worker thread.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from fleet.broker.errors import BrokerError

SCHEMA = """
CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS subscriptions (client_id TEXT NOT NULL, username TEXT NOT NULL, filter TEXT NOT NULL,
                                          qos INTEGER NOT NULL, PRIMARY KEY (client_id, filter));
"""


class RetainedStore:
    """Write-behind store of retained messages: ``record`` is cheap, ``flush`` does the I/O."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._pending: dict[str, tuple[bytes | None, int]] = {}
        self._subs: dict[tuple[str, str], tuple[str, int] | None] = {}  # (client, filter) -> (user, qos) or None
        self._lock = threading.Lock()
        try:
            with self._connect() as conn:
                conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise BrokerError(f"cannot open retained store {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=5)
        conn.execute("PRAGMA journal_mode=WAL")
        return conn

    def load(self) -> list[tuple[str, bytes, int]]:
        """Every persisted retained message."""
        with self._connect() as conn:
            return [(t, bytes(p), q) for t, p, q in conn.execute("SELECT topic, payload, qos FROM retained")]

    def record(self, topic: str, payload: bytes | None, qos: int) -> None:
        """Remember a change (None or empty payload clears the topic); written by the next flush."""
        with self._lock:
            self._pending[topic] = (payload or None, qos)

    def load_subscriptions(self) -> list[tuple[str, str, str, int]]:
        """Every persisted subscription: (client_id, username, filter, qos)."""
        with self._connect() as conn:
            return list(conn.execute("SELECT client_id, username, filter, qos FROM subscriptions"))

    def record_subscription(self, client_id: str, username: str, topic_filter: str, qos: int) -> None:
        """Remember a persistent session's subscription (written by the next flush)."""
        with self._lock:
            self._subs[(client_id, topic_filter)] = (username, qos)

    def forget_subscription(self, client_id: str, topic_filter: str | None = None) -> None:
        """Forget one subscription, or (filter None) every subscription of a session."""
        with self._lock:
            if topic_filter is None:
                for key in [k for k in self._subs if k[0] == client_id]:
                    del self._subs[key]
                self._subs[(client_id, "")] = None  # marker: delete all of this client's rows
            else:
                self._subs[(client_id, topic_filter)] = None

    def flush(self) -> int:
        """Write pending changes in one transaction; returns how many."""
        with self._lock:
            pending, self._pending = self._pending, {}
            subs, self._subs = self._subs, {}
        if not pending and not subs:
            return 0
        try:
            with self._connect() as conn:
                conn.executemany("DELETE FROM retained WHERE topic = ?",
                                 [(t,) for t, (p, _) in pending.items() if p is None])
                conn.executemany("INSERT OR REPLACE INTO retained(topic, payload, qos) VALUES (?, ?, ?)",
                                 [(t, p, q) for t, (p, q) in pending.items() if p is not None])
                conn.executemany("DELETE FROM subscriptions WHERE client_id = ?",
                                 [(c,) for (c, f), v in subs.items() if v is None and f == ""])
                conn.executemany("DELETE FROM subscriptions WHERE client_id = ? AND filter = ?",
                                 [(c, f) for (c, f), v in subs.items() if v is None and f != ""])
                conn.executemany("INSERT OR REPLACE INTO subscriptions(client_id, username, filter, qos) "
                                 "VALUES (?, ?, ?, ?)", [(c, v[0], f, v[1]) for (c, f), v in subs.items() if v])
        except sqlite3.Error:
            with self._lock:  # keep the changes for the next try, newer ones win
                self._pending = {**pending, **self._pending}
                self._subs = {**subs, **self._subs}
            raise
        return len(pending) + len(subs)
