"""SQLite's WAL under sustained load: the collector's real writer and checkpointer on a real file, with readers.

Readers read continuously (the web's pooled connections, a slow reader, and the broker's way: a fresh read-only
connection for its credentials and a fresh read-write one for its heartbeat), while the writer commits as fast as
it can. The WAL must be reset again and again, never grow past the reset threshold plus what a few checks'
worth of commits add, and nobody may see "database is locked".
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fleet.collector import writer
from fleet.collector.alerts.engine import AlertEngine
from fleet.collector.handoff import Handoff
from fleet.collector.intake import DropCounter, Received, parse_message
from fleet.collector.shared import CollectorStats, LinkState, ServedOrgs, WriteCounts
from fleet.collector.state import Tracker
from fleet.config import payloads
from fleet.config.settings import Settings
from fleet.config.status import BROKER, COLLECTOR
from fleet.config.topics import report_topic
from fleet.store import credentials, wal
from fleet.store.database import BUSY_TIMEOUT_MS, DatabaseError, DatabasePool, open_database
from fleet.store.heartbeats import read_heartbeat, write_heartbeat
from tests import stores
from tests.helpers import wait_for

MACHINES = 2_000
RESETS = 10  # ~160 MB of WAL written: on the history layout before the compact one, 5 s of this load
# What the writer adds between two looks at the WAL, during a reset's PASSIVE pass and during a reset held off
# by a reader: ~10 MB at the rate here; twice the threshold leaves room for a loaded machine, under the 64 MB
# the WAL must never pass (an unbounded WAL reaches ~200 MB in this test).
MARGIN_BYTES = 2 * wal.WAL_RESET_BYTES


class Running:
    """Threads that loop until stopped, counting what each did and noting every failure."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.done: dict[str, int] = {}
        self.errors: list[str] = []
        self._threads: list[threading.Thread] = []

    def loop(self, name: str, step: Callable[[], None], pause: float = 0.0) -> None:
        def run() -> None:
            while not self.stop.is_set():
                try:
                    step()
                except DatabaseError as exc:
                    self.errors.append(f"{name}: {exc}")
                self.done[name] = self.done.get(name, 0) + 1
                self.stop.wait(pause)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(10)


def reports(org: str, drops: DropCounter) -> list[Received]:
    """One report per machine, as the network thread hands them over (a realistic size, with custom series)."""
    metrics = {"cpu_percent": 12.5, "memory": {"total": 8 << 30, "used": 3 << 30, "percent": 37.5},
               "disks": [{"mount": "/", "total": 100 << 30, "used": 40 << 30, "percent": 40.0}],
               "custom": {f"queue_{i}": float(i) for i in range(20)}}
    out = []
    for i in range(MACHINES):
        machine = f"m-{i:04d}"
        raw = payloads.encode(payloads.build_report(machine, f"hw-{i}", "s1", 0, time.time(), metrics,
                                                    {"os": "Linux", "hostname": machine}))
        item = parse_message(report_topic(org, machine), raw, False, time.time(), None, drops)
        assert item is not None
        out.append(item)
    return out


def start_writer(settings: Settings) -> tuple[writer.WriterThread, Handoff, WriteCounts]:
    tracker = Tracker(settings.stale_factor, settings.interval, settings.ttl_seconds, settings.lost_grace_s)
    handoff = Handoff(capacity=4 * settings.batch_max, batch_max=settings.batch_max)
    counts = WriteCounts()
    peers = writer.WriterPeers(handoff, None, LinkState(), ServedOrgs(()), counts, DropCounter(),
                               lambda: CollectorStats(True, ("acme",), 0, 0), lambda: None)
    thread = writer.WriterThread(settings, "c1", tracker, AlertEngine(tracker, 0.0, lambda m, t: False), peers)
    thread.start(timeout=30)
    return thread, handoff, counts


def test_a_reset_never_outwaits_the_writer():
    """A reset holds the write lock while it waits for readers: the writer must be the one that waits longer
    (tests/store/test_wal.py shows a writer locked out otherwise), with room for the copying the reset does."""
    assert wal.CHECKPOINT_BUSY_TIMEOUT_MS <= wal.CHECKPOINT_BUSY_MAX_MS <= writer.WRITER_BUSY_TIMEOUT_MS / 2
    assert writer.WRITER_BUSY_TIMEOUT_MS <= BUSY_TIMEOUT_MS


def test_a_reset_held_off_waits_longer_next_time(tmp_path: Path, caplog):
    """A reader longer than a reset's wait holds it off; the next ones wait twice as long, up to the cap, and
    once the log is emptied the wait is the short one again. One warning per held-off reset."""
    settings = Settings(data_dir=tmp_path)
    checkpointer = writer.Checkpointer(settings.database)
    with open_database(settings.database) as db:
        db.execute("INSERT INTO meta(key, value) VALUES ('a', ?)", ("x" * 100_000,))
        reader = open_database(settings.database, readonly=True)
        reader.raw.execute("BEGIN")  # a long read: its snapshot pins the log
        reader.query("SELECT count(*) FROM meta")
        db.execute("INSERT INTO meta(key, value) VALUES ('b', ?)", ("x" * 100_000,))
        waits = []
        try:
            for _ in range(3):
                waits.append(checkpointer.wait_ms)
                checkpointer.checkpoint(db, 0)
        finally:
            reader.close()
        assert waits == [wal.CHECKPOINT_BUSY_TIMEOUT_MS, 2 * wal.CHECKPOINT_BUSY_TIMEOUT_MS,
                         min(4 * wal.CHECKPOINT_BUSY_TIMEOUT_MS, wal.CHECKPOINT_BUSY_MAX_MS)]
        assert checkpointer.resets_busy == 3
        checkpointer.checkpoint(db, 0)
        assert checkpointer.resets == 1
        assert checkpointer.wait_ms == wal.CHECKPOINT_BUSY_TIMEOUT_MS
        assert wal.file_bytes(wal.wal_file(settings.db_path)) == 0
    held_off = [r for r in caplog.records if "WAL reset held off" in r.getMessage()]
    assert len(held_off) == 3


@dataclasses.dataclass
class Outcome:
    """What one run under load saw."""

    largest_wal: int  # bytes, looked at every 2 ms
    wal_after_stop: int
    stored: int
    running: Running
    heartbeat: dict  # the collector's last heartbeat detail


def under_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resets: int, by_writer: bool = False) -> Outcome:
    """The collector's writer thread committing as fast as it can while every kind of reader reads, until the
    log was reset ``resets`` times (by the writer itself, with ``by_writer``)."""
    made: list[writer.Checkpointer] = []

    class Recorded(writer.Checkpointer):
        def __init__(self, database: str) -> None:
            super().__init__(database)
            made.append(self)

    monkeypatch.setattr(writer, "Checkpointer", Recorded)

    def reset_enough() -> bool:
        return bool(made) and (made[0].resets_by_writer if by_writer else made[0].resets) >= resets

    settings = Settings(data_dir=tmp_path, batch_max=500)
    stores.add_org(tmp_path, "acme")
    database = settings.database
    wal_path = wal.wal_file(settings.db_path)
    thread, handoff, counts = start_writer(settings)
    running = Running()
    pool = DatabasePool(database, readonly=True)

    def produce() -> None:
        templates = reports("acme", DropCounter())
        for seq in range(1, 1_000_000):
            for item in templates:
                if running.stop.is_set():
                    return
                now = time.time()
                handoff.put(dataclasses.replace(item, message=dataclasses.replace(item.message, seq=seq, ts=now),
                                                received=now), seq)

    def web_read() -> None:
        db = pool.get()
        try:
            db.query("SELECT count(*) FROM machines WHERE org = 'acme' AND status = 'online'")
            db.query("SELECT machine_id, metrics FROM machines WHERE org = 'acme' ORDER BY machine_id LIMIT 100")
            db.query("SELECT ts, cpu_percent FROM reports WHERE org = 'acme' AND machine_id = 'm-0007' AND ts >= ?"
                     " ORDER BY ts", (time.time() - 3600,))
        finally:
            pool.put(db)

    def slow_read() -> None:  # a history-sized read: it holds one snapshot while it runs
        with open_database(database, readonly=True) as db:
            db.query("SELECT count(*), sum(cpu_percent), max(ts) FROM reports")

    def broker_credentials() -> None:  # broker/server.py: a fresh read-only connection per reload
        with open_database(database, readonly=True) as db:
            credentials.load_records(db)

    def broker_heartbeat() -> None:  # broker/server.py: a fresh read-write connection per heartbeat
        # It waits for the write lock no longer than a reset may hold it: a longer wait is "database is locked".
        with open_database(database, migrate=False, busy_timeout_ms=writer.WRITER_BUSY_TIMEOUT_MS) as db:
            write_heartbeat(db, BROKER, time.time(), {"connected": 1})

    largest = [0]

    def watch() -> None:
        largest[0] = max(largest[0], wal.file_bytes(wal_path))

    producer = threading.Thread(target=produce, name="producer", daemon=True)
    producer.start()
    running.loop("watch", watch, 0.002)
    running.loop("web", web_read, 0.005)
    running.loop("web2", web_read, 0.005)
    running.loop("slow", slow_read, 0.2)
    running.loop("credentials", broker_credentials, 0.05)
    running.loop("heartbeat", broker_heartbeat, 0.05)
    try:
        wait_for(reset_enough, 90, f"{resets} resets{' by the writer' if by_writer else ''}")
    finally:
        running.join()
        handoff.close()
        thread.join(30)
        producer.join(10)
        pool.close()
    assert not thread.is_alive()
    with open_database(database, readonly=True) as db:
        stored = db.query_one("SELECT count(*) FROM reports")
        beat = read_heartbeat(db, COLLECTOR)
    assert stored is not None
    assert beat is not None
    return Outcome(largest[0], wal.file_bytes(wal_path), stored[0], running, beat[1])


@pytest.mark.slow
def test_the_wal_stays_bounded_under_sustained_commits_and_reads(tmp_path: Path, monkeypatch):
    seen = under_load(tmp_path, monkeypatch, RESETS)
    running = seen.running
    assert running.errors == []
    assert all(running.done.get(name, 0) > 10 for name in ("web", "slow", "credentials", "heartbeat")), running.done
    assert seen.stored >= 10_000
    # The writer's commits were interleaved with readers all along, yet the log was emptied again and again.
    assert seen.largest_wal <= wal.WAL_RESET_BYTES + MARGIN_BYTES, f"WAL reached {seen.largest_wal / 2**20:.1f} MB"
    # A reset waits at most its busy timeout for readers, so no other writer waited past it for the lock: the
    # heartbeat, whose busy timeout is that bound, never got "database is locked" (running.errors above).
    # The checkpointer's last checkpoint emptied the log: the last connection to close had nothing to copy.
    assert seen.wal_after_stop == 0


@pytest.mark.slow
def test_the_writer_resets_the_log_itself_when_the_checkpointer_cannot(tmp_path: Path, monkeypatch):
    """With no checkpointer thread at all (the worst case of resets held off), the writer keeps the log bounded
    between its batches."""
    monkeypatch.setattr(writer.Checkpointer, "start", lambda self: None)
    seen = under_load(tmp_path, monkeypatch, RESETS // 3, by_writer=True)
    assert seen.running.errors == []
    assert seen.heartbeat["wal_resets"] == seen.heartbeat["wal_resets_by_writer"]
    assert seen.largest_wal <= writer.WRITER_RESET_BYTES + MARGIN_BYTES, f"WAL: {seen.largest_wal / 2**20:.1f} MB"
