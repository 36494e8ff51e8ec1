"""Retained messages persisted in ``<data_dir>/broker.db`` so pings survive a broker restart.

Changes are recorded in memory on the event loop and written in batches from a worker thread.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from broker.errors import BrokerError

SCHEMA = "CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL)"


class RetainedStore:
    """Write-behind store of retained messages: ``record`` is cheap, ``flush`` does the I/O."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._pending: dict[str, tuple[bytes | None, int]] = {}
        self._lock = threading.Lock()
        try:
            with self._connect() as conn:
                conn.execute(SCHEMA)
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

    def flush(self) -> int:
        """Write pending changes in one transaction; returns how many."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        try:
            with self._connect() as conn:
                conn.executemany("DELETE FROM retained WHERE topic = ?",
                                 [(t,) for t, (p, _) in pending.items() if p is None])
                conn.executemany("INSERT OR REPLACE INTO retained(topic, payload, qos) VALUES (?, ?, ?)",
                                 [(t, p, q) for t, (p, q) in pending.items() if p is not None])
        except sqlite3.Error:
            with self._lock:  # keep the changes for the next try, newer ones win
                self._pending = {**pending, **self._pending}
            raise
        return len(pending)
