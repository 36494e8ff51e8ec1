"""Broker state persisted in ``<data_dir>/broker.db``: retained messages, the subscriptions of persistent
sessions, and the messages queued for persistent sessions until their subscriber acknowledges them.

The event loop only appends to the open batch (no I/O, no locks). GROUP_WINDOW_S after its first
change, the batch is sealed and handed to one writer thread, which commits every batch sealed meanwhile
in one transaction (a group commit): one write covers every message of the window, never one per
message, and a row whose subscriber acknowledges it within the window is never written. A publisher's
PUBACK waits for the commit of the batch holding what its message changed (``barrier()``), so what the
broker acknowledged is on disk: a SIGKILL loses nothing acknowledged.
``durability`` says what a power loss may lose (docs/broker.md): ``full`` fsyncs each group commit
(nothing acknowledged), ``normal`` leaves it to SQLite's WAL checkpoints (the commits since the last
one), ``off`` keeps queues in memory only and acknowledges at once, as before this store queued messages.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

from fleet.broker.errors import BrokerError

log = logging.getLogger("fleet.broker")

DURABILITY = {"full": "FULL", "normal": "NORMAL", "off": "NORMAL"}  # -> PRAGMA synchronous
RETRY_MAX_S = 5.0  # a failing commit (disk full, locked) is retried with backoff up to this interval
GROUP_WINDOW_S = 0.01  # a batch is open this long after its first change at most: a PUBACK's wait, besides the disk
CLOSE_RETRIES = 3  # at shutdown a commit that keeps failing is given up after this many tries

SCHEMA = """
CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS subscriptions (client_id TEXT NOT NULL, username TEXT NOT NULL, filter TEXT NOT NULL,
                                          qos INTEGER NOT NULL, PRIMARY KEY (client_id, filter));
CREATE TABLE IF NOT EXISTS queued (seq INTEGER PRIMARY KEY, client_id TEXT NOT NULL, topic TEXT NOT NULL,
                                   payload BLOB NOT NULL, qos INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS queued_by_client ON queued (client_id, seq);
"""


class Commit:
    """The commit of one batch, which PUBACKs wait for (``barrier()``). Its callbacks run as it completes, one
    after the other in the loop's thread: an asyncio future would run each in a turn of the loop of its own,
    one per connection waiting. Coroutines await ``wait()``."""

    __slots__ = ("_done", "_callbacks", "_future")

    def __init__(self) -> None:
        self._done = False
        self._callbacks: list[Callable[[Commit], None]] = []
        self._future: asyncio.Future[None] | None = None

    def done(self) -> bool:
        """True once committed."""
        return self._done

    def add_done_callback(self, callback: Callable[[Commit], None]) -> None:
        """Call ``callback(self)`` once committed (at once if it is)."""
        if self._done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def wait(self) -> asyncio.Future[None]:
        """A future of the running loop, done once committed."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
            if self._done:
                self._future.set_result(None)
        return self._future

    def complete(self) -> None:
        """Committed: every callback runs (one that fails is logged; the others still run)."""
        self._done = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("broker store: a callback of a commit failed")
        if self._future is not None and not self._future.done():
            self._future.set_result(None)


class _Batch:
    """The changes of one or more loop turns, committed together."""

    __slots__ = ("queued", "acked", "forgotten", "retained", "subs", "commit")

    def __init__(self) -> None:
        self.queued: list[tuple[int, str, str, bytes, int]] = []
        self.acked: list[tuple[int]] = []
        self.forgotten: list[tuple[str, int]] = []  # (client_id, last seq): its rows up to then go
        self.retained: dict[str, tuple[bytes | None, int]] = {}
        self.subs: dict[tuple[str, str], tuple[str, int] | None] = {}  # (client, filter) -> (user, qos) or None
        self.commit = Commit()

    def __bool__(self) -> bool:
        return bool(self.queued or self.acked or self.forgotten or self.retained or self.subs)


class BrokerStore:
    """broker.db: loaded at start, then changed only through group commits of one writer thread."""

    def __init__(self, path: Path, durability: str = "full") -> None:
        if durability not in DURABILITY:
            raise BrokerError(f"unknown broker durability {durability!r}: one of {', '.join(DURABILITY)}")
        self.path = Path(path)
        self.durability = durability
        self.durable_queues = durability != "off"
        self.stats: Counter[str] = Counter()
        self._open = _Batch()
        self._seal_timer: asyncio.TimerHandle | None = None
        self._last: _Batch | None = None  # the newest sealed batch
        self._sealed: deque[_Batch] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._next_seq = 1
        try:
            with self._connect() as conn:
                conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise BrokerError(f"cannot open broker store {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=5, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={DURABILITY[self.durability]}")
        return conn

    # --- loading, before start -------------------------------------------------------------------
    def load(self) -> list[tuple[str, bytes, int]]:
        """Every persisted retained message."""
        with self._connect() as conn:
            return [(t, bytes(p), q) for t, p, q in conn.execute("SELECT topic, payload, qos FROM retained")]

    def load_subscriptions(self) -> list[tuple[str, str, str, int]]:
        """Every persisted subscription: (client_id, username, filter, qos)."""
        with self._connect() as conn:
            return list(conn.execute("SELECT client_id, username, filter, qos FROM subscriptions"))

    def load_queue(self) -> list[tuple[int, str, str, bytes, int]]:
        """Every queued message, oldest first: (seq, client_id, topic, payload, qos)."""
        with self._connect() as conn:
            rows = [(s, c, t, bytes(p), q) for s, c, t, p, q in
                    conn.execute("SELECT seq, client_id, topic, payload, qos FROM queued ORDER BY seq")]
            top = conn.execute("SELECT MAX(seq) FROM queued").fetchone()[0]
        self._next_seq = (top or 0) + 1
        return rows

    # --- the writer thread -----------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the writer thread; the store's loop-side methods are called on ``loop`` from now on."""
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="fleet-broker-store", daemon=True)
        self._thread.start()
        if self._open:
            self._seal()

    async def close(self) -> None:
        """Commit everything recorded so far and stop the writer thread."""
        if self._open:
            self._seal()
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        conn = self._connect()
        try:
            while True:
                with self._cond:
                    while not self._sealed and not self._closing:
                        self._cond.wait()
                    if not self._sealed:
                        return
                    batches = list(self._sealed)
                    self._sealed.clear()
                _cancel_delivered(batches)
                if self._commit(conn, batches):
                    self._notify(batches)
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batches: list[_Batch]) -> bool:
        """One transaction for all ``batches``, retried until it succeeds (or, when closing, a few times)."""
        delay, failures = 0.05, 0
        while True:
            try:
                with conn:
                    for batch in batches:
                        _write(conn, batch)
                if failures:
                    log.warning("broker store %s: commits succeed again after %d failures", self.path, failures)
                return True
            except sqlite3.Error as exc:
                failures += 1
                if failures == 1:
                    log.warning("broker store %s: commit failed, retrying (acknowledgements wait): %s", self.path, exc)
                if self._closing and failures >= CLOSE_RETRIES:
                    log.error("broker store %s: giving up at shutdown, %d batches not written: %s", self.path,
                              len(batches), exc)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    def _notify(self, batches: list[_Batch]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._committed, batches)
            except RuntimeError:  # the loop closed in between: nobody waits any more
                pass

    def _committed(self, batches: list[_Batch]) -> None:
        self.stats["store_commits"] += 1
        for batch in batches:
            self.stats["store_rows_written"] += len(batch.queued)
            batch.commit.complete()

    # --- the event loop's side: cheap, never blocks ----------------------------------------------
    def _batch(self) -> _Batch:
        """The open batch; its first change schedules its sealing GROUP_WINDOW_S later."""
        if self._seal_timer is None and self._loop is not None:
            self._seal_timer = self._loop.call_later(GROUP_WINDOW_S, self._seal)
        return self._open

    def _seal(self) -> None:
        if self._seal_timer is not None:
            self._seal_timer.cancel()
            self._seal_timer = None
        if not self._open:
            return
        batch, self._open = self._open, _Batch()
        self._last = batch
        with self._cond:
            self._sealed.append(batch)
            self._cond.notify()

    def barrier(self) -> Commit | None:
        """The commit that makes everything recorded so far durable; None if it already is (or in ``off``)."""
        if not self.durable_queues:
            return None
        batch = self._open if self._open else self._last
        if batch is None or batch.commit.done():
            return None
        return batch.commit

    def hurry(self) -> None:
        """A publisher has many PUBACKs waiting for the open batch: seal it at the end of this turn of the loop
        rather than at the end of its window."""
        if self._open and self._loop is not None:
            self._loop.call_soon(self._seal)

    def append(self, client_id: str, topic: str, payload: bytes, qos: int) -> int | None:
        """Queue a message for a persistent session; returns its sequence number (None in ``off``)."""
        if not self.durable_queues:
            return None
        seq = self._next_seq
        self._next_seq += 1
        self._batch().queued.append((seq, client_id, topic, payload, qos))
        return seq

    def ack(self, seq: int | None) -> None:
        """The subscriber acknowledged message ``seq`` (or it was dropped): it leaves the queue."""
        if seq is not None:
            self._batch().acked.append((seq,))

    def forget_queue(self, client_id: str) -> None:
        """Everything queued so far for ``client_id`` goes (its session was deleted)."""
        if self.durable_queues:
            self._batch().forgotten.append((client_id, self._next_seq - 1))

    def record(self, topic: str, payload: bytes | None, qos: int) -> None:
        """A retained change (None or empty payload clears the topic)."""
        self._batch().retained[topic] = (payload or None, qos)

    def record_subscription(self, client_id: str, username: str, topic_filter: str, qos: int) -> None:
        """A persistent session's subscription."""
        self._batch().subs[(client_id, topic_filter)] = (username, qos)

    def forget_subscription(self, client_id: str, topic_filter: str | None = None) -> None:
        """Forget one subscription, or (filter None) every subscription of a session."""
        subs = self._batch().subs
        if topic_filter is None:
            for key in [k for k in subs if k[0] == client_id]:
                del subs[key]
            subs[(client_id, "")] = None  # marker: delete all of this client's rows
        else:
            subs[(client_id, topic_filter)] = None


def _cancel_delivered(batches: list[_Batch]) -> None:
    """Rows inserted and acknowledged before their commit (in one batch, or in batches committed together) need
    neither write: the subscriber already has the message (it was sent at routing time, before its row was
    written)."""
    acked = {row[0] for batch in batches for row in batch.acked}
    if not acked:
        return
    both = acked & {row[0] for batch in batches for row in batch.queued}
    if not both:
        return
    for batch in batches:
        batch.queued = [row for row in batch.queued if row[0] not in both]
        batch.acked = [row for row in batch.acked if row[0] not in both]


def _write(conn: sqlite3.Connection, batch: _Batch) -> None:
    """Apply one batch, in the order it was recorded: new rows, acknowledged ones, forgotten sessions."""
    if batch.queued:
        conn.executemany("INSERT INTO queued(seq, client_id, topic, payload, qos) VALUES (?, ?, ?, ?, ?)",
                         batch.queued)
    if batch.acked:
        conn.executemany("DELETE FROM queued WHERE seq = ?", batch.acked)
    if batch.forgotten:
        conn.executemany("DELETE FROM queued WHERE client_id = ? AND seq <= ?", batch.forgotten)
    retained = batch.retained
    if retained:
        conn.executemany("DELETE FROM retained WHERE topic = ?", [(t,) for t, (p, _) in retained.items() if p is None])
        conn.executemany("INSERT INTO retained(topic, payload, qos) VALUES (?, ?, ?) "
                         "ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload, qos = excluded.qos",
                         [(t, p, q) for t, (p, q) in retained.items() if p is not None])
    subs = batch.subs
    if subs:
        conn.executemany("DELETE FROM subscriptions WHERE client_id = ?",
                         [(c,) for (c, f), v in subs.items() if v is None and f == ""])
        conn.executemany("DELETE FROM subscriptions WHERE client_id = ? AND filter = ?",
                         [(c, f) for (c, f), v in subs.items() if v is None and f != ""])
        conn.executemany("INSERT INTO subscriptions(client_id, username, filter, qos) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (client_id, filter) DO UPDATE SET username = excluded.username, "
                         "qos = excluded.qos", [(c, v[0], f, v[1]) for (c, f), v in subs.items() if v])
