"""SQLite's write-ahead log (``fleet.db-wal``): its size, and the checkpoints that keep it bounded.

Every commit is appended to the WAL; a checkpoint copies the pages it holds into ``fleet.db``. A PASSIVE
checkpoint waits for nobody, so it never resets the log: only when a checkpoint has copied all of it and no
reader still reads from it can the next writer start the log again from its beginning. With commits and
reads arriving all the time that moment never comes (checkpoint starvation) and the file grows without
bound, by up to 40 MB a second at 2,000 reports a second (docs/benchmarks.md).

So ``checkpoint`` runs the cheap PASSIVE pass and, once the file is past ``WAL_RESET_BYTES``, a TRUNCATE
checkpoint: it takes the write lock, copies what is left, waits for the readers still in the log and
empties the file. Its waits are bounded (``wait_ms``, the connection's busy timeout for that call), after
which SQLite gives up and the result says so. The collector waits ``CHECKPOINT_BUSY_TIMEOUT_MS``, twice as
long after each reset held off, up to ``CHECKPOINT_BUSY_MAX_MS``: under the writer's own timeout, so a
writer waiting behind a reset is delayed, never failed.

Every read-write connection (store.database) sets ``journal_size_limit`` to ``WAL_RESET_BYTES``, so a log a
writer restarts by itself is cut back to that size too, and checkpoints on its own (SQLite's automatic
checkpoint after a commit) only once the log is past ``AUTOCHECKPOINT_BYTES``: at SQLite's default of 4 MB
the broker's heartbeat would copy the log every 2 s, and while it holds the one checkpoint lock the
collector's reset fails at once. When no collector runs, those checkpoints still keep the log bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.store.database import Database

WAL_RESET_BYTES = 16 * 2**20
AUTOCHECKPOINT_BYTES = 2 * WAL_RESET_BYTES
CHECKPOINT_BUSY_TIMEOUT_MS = 250
CHECKPOINT_BUSY_MAX_MS = 500


def wal_file(path: Path) -> Path:
    """The WAL of the SQLite file at ``path``."""
    return path.with_name(path.name + "-wal")


def file_bytes(path: Path) -> int:
    """The size of a file, 0 when there is none."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@dataclass(frozen=True)
class Checkpoint:
    """What one ``checkpoint`` did: the WAL's size before it, and whether the log was emptied.

    ``reset`` is None when the WAL was under the threshold (PASSIVE only), True when it was emptied, False
    when the writer or a reader held on past the busy timeout (everything the readers allowed was copied).
    """

    wal_bytes: int
    reset: bool | None


def checkpoint(db: Database, reset_bytes: int = WAL_RESET_BYTES,
               wait_ms: int = CHECKPOINT_BUSY_TIMEOUT_MS) -> Checkpoint:
    """Copy the WAL into the database file; empty the log once it is past ``reset_bytes`` (SQLite only).

    The PASSIVE pass does the bulk of the copying without blocking anyone, so the TRUNCATE that may follow
    holds the write lock only for what was committed meanwhile, plus at most ``wait_ms`` for readers.
    """
    assert db.url.path is not None
    wal = wal_file(db.url.path)
    db.query("PRAGMA wal_checkpoint(PASSIVE)")
    size = file_bytes(wal)
    if size <= reset_bytes:
        return Checkpoint(size, None)
    db.execute(f"PRAGMA busy_timeout={int(wait_ms)}")
    try:
        busy = db.query("PRAGMA wal_checkpoint(TRUNCATE)")[0][0]
    finally:
        db.execute(f"PRAGMA busy_timeout={int(db.busy_timeout_ms)}")
    return Checkpoint(size, not busy)
