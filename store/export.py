"""``fleet export``: one org's history, events and alerts as a standalone .db (SQLite), .csv or .json file.

The rows are the same in every format, read from either engine through ``Database``:

- ``history``: the org's raw reports (rolled-up minutes are not exported), oldest first per machine, ordered
  by (machine_id, ts, session, seq): ``HISTORY_COLUMNS``. The extra numeric fields of a report
  (``custom.<series>``, ``process.<name>``) stay one JSON object in ``fields`` (text in .db and .csv, an
  object in .json): their names differ per machine, so flattening them would need a column per series.
  The raw ``payload`` is not copied: it is most of a report row's size.
- ``events``: status transitions, by (ts, id): ``EVENT_COLUMNS``.
- ``alerts``: by id, without the channels' bookkeeping: ``ALERT_COLUMNS``.

Formats, chosen by the suffix of the output file:

- ``.db``: a SQLite file written with sqlite-utils, with tables ``history`` (primary key org, machine_id,
  session, seq), ``events`` and ``alerts`` (primary key id), typed columns and an index on (machine_id,
  time) each, in rollback-journal mode, so sqlite-utils and Datasette open it as it is;
- ``.csv``: history only, a header line then one line per report (an empty cell is NULL);
- ``.json``: one object ``{"org", "since", "until", "history": [...], "events": [...], "alerts": [...]}``,
  one row object per line.

``--since``/``--until`` select history and events by ``ts`` and alerts active at some time in the window
(begun at or before ``until``, not resolved before ``since``). Rows are read in chunks by key (never one
long read transaction, which would keep SQLite's WAL from being reset) and written as they come, so memory
stays bounded whatever the org holds. The file is written beside ``out`` under a temporary name and renamed
into place once complete: a failure leaves nothing behind.
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from fleet.config.ids import validate_id
from fleet.store.conversion import OLD_REPORTS
from fleet.store.database import Database, DatabaseError, DatabaseUrl, open_database, schema_version
from fleet.store.orgs import org_exists
from fleet.store.samples import REPORT_VALUES, extra_fields

FORMATS = (".db", ".csv", ".json")
CHUNK_ROWS = 5_000
# Version 5 stores history compactly (version 3 added the alerts table).
MIN_SCHEMA_VERSION = 5

HISTORY_COLUMNS = (*REPORT_VALUES, "fields")  # a report's values, its extra fields as one JSON object
EVENT_COLUMNS = ("id", "org", "machine_id", "ts", "old_status", "new_status", "reason")
ALERT_COLUMNS = ("id", "org", "rule", "machine_id", "state", "severity", "summary", "value", "active_at", "fired_at",
                 "resolved_at", "acked_by", "acked_at")
ACKS_SCHEMA_VERSION = 11  # alerts.acked_by and acked_at: NULL in exports of older databases

# The .db file's tables: column types, primary key, NOT NULL columns, and one index for the usual question.
_TEXT, _INT, _REAL = str, int, float
DB_TABLES: dict[str, dict[str, Any]] = {
    "history": {
        "columns": dict(zip(HISTORY_COLUMNS, (_TEXT, _TEXT, _TEXT, _INT, _REAL, _REAL, _REAL, _REAL, _REAL, _REAL,
                                              _INT, _INT, _TEXT), strict=True)),
        "pk": ("org", "machine_id", "session", "seq"),
        "not_null": {"org", "machine_id", "session", "seq", "ts", "received"},
        "index": ("machine_id", "ts"),
    },
    "events": {
        "columns": dict(zip(EVENT_COLUMNS, (_INT, _TEXT, _TEXT, _REAL, _TEXT, _TEXT, _TEXT), strict=True)),
        "pk": "id",
        "not_null": {"org", "machine_id", "ts", "new_status"},
        "index": ("machine_id", "ts"),
    },
    "alerts": {
        "columns": dict(zip(ALERT_COLUMNS, (_INT, _TEXT, _TEXT, _TEXT, _TEXT, _TEXT, _TEXT, _REAL, _REAL, _REAL,
                                            _REAL, _TEXT, _REAL), strict=True)),
        "pk": "id",
        "not_null": {"org", "rule", "machine_id", "state", "severity", "active_at"},
        "index": ("machine_id", "active_at"),
    },
}


class ExportError(DatabaseError):
    """An export cannot be made (unknown org, bad suffix or time, the file exists); the message is one line."""


@dataclass(frozen=True)
class ExportResult:
    """What ``export_org`` wrote: the file, its format (suffix) and the rows of each table."""

    path: Path
    format: str
    history: int
    events: int
    alerts: int


def parse_time(text: str, what: str = "time") -> float:
    """Unix seconds from ``text``: a number, or an ISO 8601 date or time (UTC unless it has an offset)."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ExportError(f"{what} must be Unix seconds or an ISO 8601 time, got {text[:40]!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = moment.timestamp()
    if not math.isfinite(seconds):
        raise ExportError(f"{what} must be finite, got {text[:40]!r}")
    return seconds


def export_format(out: Path) -> str:
    """The format of an output file, from its suffix: ``.db``, ``.csv`` or ``.json``."""
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise ExportError(f"cannot tell the format of {out}: its name must end in {', '.join(FORMATS)}")
    return suffix


# --- reading -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """The time window of an export; None is unbounded."""

    since: float | None = None
    until: float | None = None

    def on(self, column: str) -> tuple[str, list[float]]:
        """SQL conditions (each starting with AND) that keep ``column`` inside the window, and their parameters."""
        sql = ""
        params: list[float] = []
        if self.since is not None:
            sql += f" AND {column} >= ?"
            params.append(self.since)
        if self.until is not None:
            sql += f" AND {column} <= ?"
            params.append(self.until)
        return sql, params


def org_known(db: Database, org: str) -> bool:
    """Is ``org`` an org, or was it one (its history, events or alerts are still stored)?"""
    return org_exists(db, org) or any(
        db.query_one(f"SELECT 1 FROM {table} WHERE org = ? LIMIT 1", (org,)) is not None
        for table in ("reports", "events", "alerts"))


def history_rows(db: Database, org: str, window: Window, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple]:
    """The org's raw reports in the window (``HISTORY_COLUMNS``), by machine then (ts, session, seq)."""
    in_window, bounds = window.on("ts")
    select = (f"SELECT {', '.join(REPORT_VALUES)}, field_names, field_values FROM reports"
              f" WHERE org = ? AND machine_id = ?{in_window}")
    order = " ORDER BY ts, session, seq LIMIT ?"
    machine = ""  # ids start with a letter or digit: every one sorts after ""
    while True:
        row = db.query_one("SELECT min(machine_id) FROM report_machines WHERE org = ? AND machine_id > ?",
                           (org, machine))
        if row is None or row[0] is None:
            return
        machine = row[0]
        rows = db.query(select + order, (org, machine, *bounds, chunk_rows))
        while rows:
            yield from (_history_row(row) for row in rows)
            if len(rows) < chunk_rows:
                break
            _, _, session, seq, ts = rows[-1][:5]
            # ts >= ? lets the (machine, ts) index start at the last row; the row value does the rest.
            rows = db.query(select + " AND ts >= ? AND (ts, session, seq) > (?, ?, ?)" + order,
                            (org, machine, *bounds, ts, ts, session, seq, chunk_rows))


def fields_text(fields: dict[str, Any]) -> str | None:
    """A report's extra fields as the export's one JSON object (None when it has none)."""
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False) if fields else None


def _history_row(row: tuple) -> tuple:
    *values, names, numbers = row
    return (*values, fields_text(extra_fields(names, numbers)))


def event_rows(db: Database, org: str, window: Window, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple]:
    """The org's status transitions in the window (``EVENT_COLUMNS``), by (ts, id)."""
    in_window, bounds = window.on("ts")
    select = f"SELECT {', '.join(EVENT_COLUMNS)} FROM events WHERE org = ?{in_window}"
    order = " ORDER BY ts, id LIMIT ?"
    rows = db.query(select + order, (org, *bounds, chunk_rows))
    while rows:
        yield from rows
        if len(rows) < chunk_rows:
            return
        last_id, ts = rows[-1][0], rows[-1][3]
        rows = db.query(select + " AND ts >= ? AND (ts, id) > (?, ?)" + order,
                        (org, *bounds, ts, ts, last_id, chunk_rows))


def alert_rows(db: Database, org: str, window: Window, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple]:
    """The org's alerts active at some time in the window (``ALERT_COLUMNS``), by id."""
    where = "org = ?"
    params: list[Any] = [org]
    if window.until is not None:
        where += " AND active_at <= ?"
        params.append(window.until)
    if window.since is not None:
        where += " AND (resolved_at IS NULL OR resolved_at >= ?)"
        params.append(window.since)
    columns = ALERT_COLUMNS if schema_version(db) >= ACKS_SCHEMA_VERSION else (
        *ALERT_COLUMNS[:-2], "NULL AS acked_by", "NULL AS acked_at")
    select = f"SELECT {', '.join(columns)} FROM alerts WHERE {where} AND id > ? ORDER BY id LIMIT ?"
    last_id = -1
    while True:
        rows = db.query(select, (*params, last_id, chunk_rows))
        yield from rows
        if len(rows) < chunk_rows:
            return
        last_id = rows[-1][0]


# --- writing -------------------------------------------------------------------------------------------
@dataclass
class Counts:
    """Rows written per table, counted as they stream past."""

    history: int = 0
    events: int = 0
    alerts: int = 0

    def counted(self, table: str, rows: Iterator[tuple]) -> Iterator[tuple]:
        """Pass ``rows`` through, adding each to ``table``'s count."""
        seen = 0
        try:
            for row in rows:
                seen += 1
                yield row
        finally:
            setattr(self, table, getattr(self, table) + seen)


Tables = dict[str, Callable[[], Iterator[tuple]]]


def _write_db(path: Path, out: Path, tables: Tables, chunk_rows: int) -> None:
    import sqlite3

    import sqlite_utils  # ~11 MB of imports: only the process that exports pays for them

    lite = sqlite_utils.Database(path, recursive_triggers=False, execute_plugins=False)
    try:
        # A temporary file that is deleted on any failure needs neither a journal on disk nor fsyncs;
        # the finished file is synced once before it is renamed into place.
        lite.execute("PRAGMA journal_mode = MEMORY")
        lite.execute("PRAGMA synchronous = OFF")
        for name, rows in tables.items():
            spec = DB_TABLES[name]
            columns = tuple(spec["columns"])
            table = lite.table(name)
            table.create(spec["columns"], pk=spec["pk"], not_null=spec["not_null"])
            table.insert_all((dict(zip(columns, row, strict=True)) for row in rows()), batch_size=chunk_rows)
            table.create_index(spec["index"], index_name=f"{name}_{'_'.join(spec['index'])}")
    except sqlite3.Error as exc:  # disk full, or a file system SQLite cannot lock
        raise ExportError(f"cannot write {out}: {exc}") from exc
    finally:
        lite.close()


def _write_csv(file: TextIO, history: Iterator[tuple]) -> None:
    writer = csv.writer(file, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    writer.writerows(history)


def _json_rows(file: TextIO, name: str, columns: Sequence[str], rows: Iterator[tuple]) -> None:
    file.write(f',\n"{name}": [')
    empty = True
    for row in rows:
        record = dict(zip(columns, row, strict=True))
        if name == "history" and record["fields"] is not None:
            record["fields"] = json.loads(record["fields"])
        file.write(("\n" if empty else ",\n") + json.dumps(record, ensure_ascii=False, separators=(", ", ": ")))
        empty = False
    file.write("]" if empty else "\n]")


def _write_json(file: TextIO, org: str, window: Window, tables: Tables) -> None:
    file.write("{" + json.dumps({"org": org, "since": window.since, "until": window.until})[1:-1])
    _json_rows(file, "history", HISTORY_COLUMNS, tables["history"]())
    _json_rows(file, "events", EVENT_COLUMNS, tables["events"]())
    _json_rows(file, "alerts", ALERT_COLUMNS, tables["alerts"]())
    file.write("\n}\n")


def _temporary(out: Path) -> tuple[Path, int]:
    """A new empty file beside ``out`` (so the final rename stays on one file system), made with the umask."""
    while True:
        path = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
        try:
            return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from exc


def _publish(temporary: Path, out: Path, force: bool) -> None:
    """Give the finished file its name: replacing ``out`` with ``force``, else only if nothing took it meanwhile."""
    fd = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if force:
        os.replace(temporary, out)
        return
    try:
        os.link(temporary, out)  # fails if out exists, where a rename would replace it
    except FileExistsError:
        raise ExportError(f"{out} exists: use --force to replace it") from None
    except OSError:  # a file system without hard links
        if out.exists():
            raise ExportError(f"{out} exists: use --force to replace it") from None
        os.replace(temporary, out)
        return
    temporary.unlink()


def _discard(temporary: Path) -> None:
    for path in (temporary, temporary.with_name(temporary.name + "-journal")):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def export_org(database: str | DatabaseUrl, org: str, out: Path, since: float | None = None,
               until: float | None = None, force: bool = False, chunk_rows: int = CHUNK_ROWS) -> ExportResult:
    """Write ``org``'s history, events and alerts to ``out`` in the format its suffix names (see the module)."""
    validate_id(org, "org")
    out = Path(out)
    kind = export_format(out)
    url = DatabaseUrl.parse(database)
    if url.path is not None and out.resolve() == url.path.resolve():
        raise ExportError(f"{out} is the database itself: export to another file")
    if since is not None and until is not None and since > until:
        raise ExportError(f"--since ({since:.15g}) is after --until ({until:.15g})")
    if out.exists() and not force:
        raise ExportError(f"{out} exists: use --force to replace it")
    if not out.parent.is_dir():
        raise ExportError(f"cannot write {out}: no directory {out.parent}")
    window = Window(since, until)
    counts = Counts()
    with open_database(url, readonly=True) as db:
        version = schema_version(db)
        if version < MIN_SCHEMA_VERSION or db.table_exists(OLD_REPORTS):
            raise ExportError(f"{db.url} has schema version {version}: start the collector (or fleet up) once with"
                              " this fleet to migrate it")
        if not org_known(db, org):
            raise ExportError(f"no such org {org!r}")
        tables: Tables = {
            "history": lambda: counts.counted("history", history_rows(db, org, window, chunk_rows)),
            "events": lambda: counts.counted("events", event_rows(db, org, window, chunk_rows)),
            "alerts": lambda: counts.counted("alerts", alert_rows(db, org, window, chunk_rows)),
        }
        temporary, fd = _temporary(out)
        try:
            if kind == ".db":
                os.close(fd)
                _write_db(temporary, out, tables, chunk_rows)
            else:
                with open(fd, "w", encoding="utf-8", newline="") as file:
                    if kind == ".csv":
                        _write_csv(file, tables["history"]())
                    else:
                        _write_json(file, org, window, tables)
            _publish(temporary, out, force)
        except BaseException as exc:
            _discard(temporary)
            if isinstance(exc, OSError):
                raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from exc
            raise
    return ExportResult(out, kind, counts.history, counts.events, counts.alerts)
