"""``fleet db info`` and ``fleet db vacuum``: the database's schema version, tables and sizes, and SQLite upkeep.

``info`` works on both engines. Table sizes include the table's indexes: on SQLite from the ``dbstat``
virtual table (every page is read, so it takes a while on a large file; None where SQLite was built without
it), on PostgreSQL from ``pg_total_relation_size``. The WAL and free pages are SQLite's; PostgreSQL's WAL is
the server's, not one database's, and is not shown. ``database_size`` is the part of ``info`` that reads
nothing but two file sizes (one query on PostgreSQL), cheap enough for every ``/metrics`` scrape.

``vacuum`` is SQLite only (PostgreSQL's autovacuum does that work): VACUUM rebuilds the file without its
free pages, ANALYZE refreshes the query planner's statistics, and a TRUNCATE checkpoint empties the WAL,
which VACUUM has just filled with a copy of the whole database. Writers wait while VACUUM runs (the
collector retries), so run it when the fleet is quiet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fleet.store.database import (
    POSTGRESQL,
    SQLITE,
    Database,
    DatabaseError,
    DatabaseUrl,
    open_database,
    schema_version,
)
from fleet.store.wal import file_bytes, wal_file

DAY = 86_400.0
# Where raw history lives (store.schema, version 5): the reports, their ids and the inventory.
HISTORY_TABLES = ("samples", "report_machines", "report_sessions", "report_fields", "inventory")


class MaintenanceError(DatabaseError):
    """Database maintenance cannot run (no such file, not SQLite, SQLite failed); the message is one line."""


@dataclass(frozen=True)
class TableInfo:
    """One table: its rows, and its bytes with its indexes (None when the engine cannot tell)."""

    name: str
    rows: int
    bytes: int | None


@dataclass(frozen=True)
class DatabaseInfo:
    """What ``fleet db info`` shows; ``as_dict`` is its ``--json`` object."""

    database: str  # the URL without its password
    engine: str
    schema_version: int
    database_bytes: int  # SQLite: the file; PostgreSQL: pg_database_size
    wal_bytes: int | None  # SQLite only
    free_bytes: int | None  # SQLite only: free pages, which VACUUM gives back
    history_days: float | None  # from the oldest raw report to the newest, by receive time
    bytes_per_report: float | None  # the history tables (HISTORY_TABLES) with their indexes, per raw report
    tables: tuple[TableInfo, ...]

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` object: the fields above, ``tables`` keyed by name."""
        data = asdict(self)
        data["tables"] = {t.name: {"rows": t.rows, "bytes": t.bytes} for t in self.tables}
        return data


@dataclass(frozen=True)
class VacuumResult:
    """Sizes of the SQLite file and its WAL before and after ``vacuum``, and whether the WAL was emptied."""

    database: str
    database_bytes_before: int
    database_bytes_after: int
    wal_bytes_before: int
    wal_bytes_after: int
    wal_truncated: bool  # False when another connection kept the checkpoint from finishing


def _sqlite_file(url: DatabaseUrl) -> Path:
    assert url.path is not None
    if not url.path.is_file():
        raise MaintenanceError(f"no SQLite database at {url.path}")
    return url.path


@dataclass(frozen=True)
class DatabaseSize:
    """How much disk the database takes: SQLite's file and its WAL, or PostgreSQL's ``pg_database_size``."""

    database_bytes: int
    wal_bytes: int | None  # SQLite only: PostgreSQL's WAL belongs to the server, not to one database


def database_size(db: Database) -> DatabaseSize:
    """The database's size without reading it (two ``stat`` calls on SQLite, one cheap query on PostgreSQL)."""
    if db.engine == SQLITE:
        assert db.url.path is not None
        return DatabaseSize(file_bytes(db.url.path), file_bytes(wal_file(db.url.path)))
    return DatabaseSize(int(db.query("SELECT pg_database_size(current_database())")[0][0]), None)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sqlite_tables(db: Database) -> dict[str, int | None]:
    names = [row[0] for row in db.query("SELECT name FROM sqlite_master WHERE type = 'table'"
                                        " AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name")]
    try:
        # One row per table or index (aggregate = TRUE); indexes count toward their table.
        sizes = dict(db.query("SELECT m.tbl_name, sum(s.pgsize) FROM dbstat AS s JOIN sqlite_master AS m"
                              " ON m.name = s.name WHERE s.aggregate = TRUE GROUP BY m.tbl_name"))
    except DatabaseError:  # SQLite built without SQLITE_ENABLE_DBSTAT_VTAB
        return dict.fromkeys(names)
    return {name: int(sizes.get(name) or 0) for name in names}


def _postgresql_tables(db: Database) -> dict[str, int | None]:
    rows = db.query("SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE c.relkind IN ('r', 'p') AND n.nspname = current_schema() ORDER BY c.relname")
    return {name: int(size) for name, size in rows}


def database_info(database: str | Path | DatabaseUrl) -> DatabaseInfo:
    """Schema version, each table's rows and bytes, and the database's (and SQLite's WAL's) size; read-only."""
    url = DatabaseUrl.parse(database)
    path = _sqlite_file(url) if url.engine == SQLITE else None
    with open_database(url, readonly=True) as db:
        version = schema_version(db)
        sizes = _sqlite_tables(db) if path is not None else _postgresql_tables(db)
        tables = tuple(TableInfo(name, int(db.query(f"SELECT count(*) FROM {_quoted(name)}")[0][0]), size)
                       for name, size in sizes.items())
        size = database_size(db)
        free: int | None = None
        if path is not None:
            page_size = db.query("PRAGMA page_size")[0][0]
            free = int(db.query("PRAGMA freelist_count")[0][0]) * page_size
        oldest = newest = None
        if "samples" in sizes:
            # By id, which follows the receive order: an index lookup each, not a scan.
            oldest, newest = db.query("SELECT (SELECT received FROM samples ORDER BY id LIMIT 1),"
                                      " (SELECT received FROM samples ORDER BY id DESC LIMIT 1)")[0]
    reports = next((t for t in tables if t.name == "samples"), None)
    history = [t.bytes for t in tables if t.name in HISTORY_TABLES]
    history_bytes = None if None in history else sum(b for b in history if b is not None)
    return DatabaseInfo(
        database=str(url), engine=url.engine, schema_version=version, database_bytes=size.database_bytes,
        wal_bytes=size.wal_bytes, free_bytes=free,
        history_days=None if oldest is None else (newest - oldest) / DAY,
        bytes_per_report=history_bytes / reports.rows if reports and reports.rows and history_bytes else None,
        tables=tables)


def vacuum(database: str | Path | DatabaseUrl) -> VacuumResult:
    """SQLite upkeep (see the module): VACUUM, ANALYZE, then empty the WAL; a PostgreSQL URL is refused."""
    url = DatabaseUrl.parse(database)
    if url.engine == POSTGRESQL:
        raise MaintenanceError(f"fleet db vacuum is SQLite maintenance; on PostgreSQL ({url}) autovacuum does it"
                               " (or run VACUUM ANALYZE in psql)")
    path = _sqlite_file(url)
    database_before, wal_before = file_bytes(path), file_bytes(wal_file(path))
    with open_database(url, migrate=False) as db:
        import sqlite3

        import sqlite_utils  # ~11 MB of imports: only this command pays for them

        lite = sqlite_utils.Database(db.raw, recursive_triggers=False, execute_plugins=False)
        try:
            lite.vacuum()
            lite.analyze()
            busy = lite.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error as exc:
            raise MaintenanceError(f"cannot vacuum {url}: {exc}") from exc
    return VacuumResult(str(url), database_before, file_bytes(path), wal_before, file_bytes(wal_file(path)),
                        wal_truncated=not busy)
