"""store/wal.py on a real SQLite file: a checkpoint empties the log once it is past the threshold, a reader holds
that off for no longer than the checkpointing connection's busy timeout, and a writer meanwhile waits, never fails."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest

from fleet.config.status import BROKER
from fleet.store import wal
from fleet.store.database import BUSY_TIMEOUT_MS, Database, DatabaseBusy, open_database
from fleet.store.heartbeats import read_heartbeat, write_heartbeat
from tests.helpers import wait_for

ROW_BYTES = 4000


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "fleet.db"


def grow(db: Database, wal_bytes: int) -> int:
    """Commit rows until the WAL holds at least ``wal_bytes``; returns how many rows were written."""
    assert db.url.path is not None
    n = 0
    while wal.file_bytes(wal.wal_file(db.url.path)) < wal_bytes:
        db.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (f"filler-{uuid.uuid4().hex}", "x" * ROW_BYTES))
        n += 1
    return n


def rows_in_the_file(path: Path) -> int:
    """Filler rows in the database file itself, without what is still only in its WAL."""
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM meta WHERE key LIKE 'filler-%'").fetchone()[0]
    finally:
        conn.close()


def test_read_write_connections_keep_the_wal_small(path):
    with open_database(path) as db:
        page = db.query_one("PRAGMA page_size")[0]
        assert db.query_one("PRAGMA journal_size_limit") == (wal.WAL_RESET_BYTES,)
        assert db.query_one("PRAGMA wal_autocheckpoint") == (wal.AUTOCHECKPOINT_BYTES // page,)


def test_under_the_threshold_a_checkpoint_copies_the_log_and_keeps_it(path):
    with open_database(path) as db:
        n = grow(db, 256 * 1024)
        done = wal.checkpoint(db, reset_bytes=1 << 20)
        assert done.reset is None
        assert done.wal_bytes >= 256 * 1024
        assert wal.file_bytes(wal.wal_file(path)) == done.wal_bytes
        assert rows_in_the_file(path) == n


def test_past_the_threshold_the_log_is_emptied(path):
    with open_database(path) as db:
        n = grow(db, 256 * 1024)
        done = wal.checkpoint(db, reset_bytes=128 * 1024)
        assert done.reset is True
        assert wal.file_bytes(wal.wal_file(path)) == 0
        assert rows_in_the_file(path) == n


def holds_the_write_lock(path: Path) -> bool:
    """Does someone hold SQLite's write lock right now? (A write that does not wait.)"""
    probe = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        probe.close()


def reset_behind_a_reader(path: Path, checkpoint_ms: int,
                          writer_ms: int) -> tuple[wal.Checkpoint, float, Exception | None]:
    """A reset that must wait for a reader, and meanwhile the broker's heartbeat write through a fresh connection.

    Returns what the reset did, how long the write waited and what it raised (None when it succeeded).
    """
    with open_database(path) as db:
        grow(db, 256 * 1024)
    reader = open_database(path, readonly=True)
    reader.raw.execute("BEGIN")  # a reader in the middle of a long read: its snapshot pins the log
    reader.query("SELECT count(*) FROM meta")
    with open_database(path) as db:
        grow(db, 512 * 1024)  # past the reader's snapshot, so the reset must wait for it
    checkpointer = open_database(path, migrate=False, check_same_thread=False)
    outcome: list[wal.Checkpoint] = []
    thread = threading.Thread(target=lambda: outcome.append(wal.checkpoint(checkpointer, 128 * 1024, checkpoint_ms)))
    thread.start()
    failure = None
    try:
        wait_for(lambda: holds_the_write_lock(path) or outcome, 5, "the reset holding the write lock", interval=0.002)
        assert not outcome, "the reset did not wait for the reader"
        started = time.monotonic()
        try:
            with open_database(path, migrate=False, busy_timeout_ms=writer_ms) as broker:
                write_heartbeat(broker, BROKER, 1.0, {"connected": 1})
        except DatabaseBusy as exc:
            failure = exc
        waited = time.monotonic() - started
        thread.join(10)
    finally:
        reader.close()
        checkpointer.close()
    return outcome[0], waited, failure


def test_a_reader_holds_a_reset_off_for_the_busy_timeout_and_a_writer_waits_it_out(path):
    """While a reset waits for a reader it holds the write lock: the broker's heartbeat must wait, not fail."""
    done, waited, failure = reset_behind_a_reader(path, wal.CHECKPOINT_BUSY_TIMEOUT_MS, BUSY_TIMEOUT_MS)
    assert failure is None
    assert done.reset is False  # the reader outlasted the busy timeout; everything it allowed was copied
    assert waited < wal.CHECKPOINT_BUSY_TIMEOUT_MS / 1000 + 1.0
    with open_database(path) as db:
        assert read_heartbeat(db, BROKER) == (1.0, {"connected": 1})


def test_a_reset_that_outwaits_a_writer_makes_it_fail(path):
    """Why the checkpointer's busy timeout is the shortest: a reset waiting longer than a writer locks it out."""
    done, _, failure = reset_behind_a_reader(path, checkpoint_ms=1000, writer_ms=200)
    assert isinstance(failure, DatabaseBusy)
    assert "database is locked" in str(failure)
    assert done.reset is False
    assert wal.CHECKPOINT_BUSY_MAX_MS < BUSY_TIMEOUT_MS  # every part's connections wait longer than a reset
