"""The in-place conversion of history stored before schema version 5 into the compact tables, in chunks.

Migration 5 renames the old ``reports`` table to ``reports_v4``; each chunk of its rows, oldest received
first, is written to the new tables and deleted from the old one in one transaction, so a conversion that
stops (a crash, a restart) goes on where it was. The table is dropped once empty.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from fleet.store.samples import Sample, SampleIds, write_samples

if TYPE_CHECKING:  # store.database calls this while it migrates
    from fleet.store.database import Database

OLD_REPORTS = "reports_v4"
CHUNK_ROWS = 20_000
_OLD_COLUMNS = ("org", "machine_id", "session", "seq", "ts", "received", "cpu_percent", "memory_percent",
                "disk_percent", "load1", "net_bytes_sent", "net_bytes_recv", "payload", "fields")


def rows_left(db: Database) -> int:
    """Old reports still to convert (0 when there is no old table)."""
    return int(db.query("SELECT count(*) FROM reports_v4")[0][0]) if db.table_exists(OLD_REPORTS) else 0


def convert_chunk(db: Database, ids: SampleIds, chunk_rows: int = CHUNK_ROWS) -> int:
    """Inside the caller's transaction: convert the oldest ``chunk_rows`` old reports; 0 once none are left.

    The old table is dropped when it is found empty. ``ids`` is committed or rolled back by the caller.
    """
    if not db.table_exists(OLD_REPORTS):
        return 0
    rows = db.query(f"SELECT {', '.join(_OLD_COLUMNS)} FROM reports_v4"
                    " ORDER BY received, org, machine_id, session, seq LIMIT ?", (chunk_rows,))
    if not rows:
        db.execute("DROP TABLE reports_v4")
        return 0
    write_samples(db, ids, [_sample(row) for row in rows])
    db.executemany("DELETE FROM reports_v4 WHERE org = ? AND machine_id = ? AND session = ? AND seq = ?",
                   [row[:4] for row in rows])
    return len(rows)


def _sample(row: tuple) -> Sample:
    org, machine_id, session, seq, ts, received, cpu, memory, disk, load1, sent, recv, payload, fields = row
    names: tuple[str, ...] = ()
    numbers: tuple[float | int, ...] = ()
    if fields:
        extra = orjson.loads(fields)
        names, numbers = tuple(extra), tuple(extra.values())
    try:
        system = orjson.loads(payload).get("system")
    except (ValueError, AttributeError):
        system = None
    return Sample(org, machine_id, session, seq, ts, received, cpu, memory, disk, load1, sent, recv, names, numbers,
                  system if isinstance(system, dict) else {})
