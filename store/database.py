"""The database seam (SQLite ``fleet.db`` or PostgreSQL): one connection type, and the migrations applied on open.

Every part talks to the database through ``Database`` (``open_database(url)``): SQL is written once with
``?`` placeholders, transactions are ``with db.transaction():``, and driver errors come out as one of
three ``DatabaseError`` kinds, so callers never see sqlite3 or psycopg. The engine differences live here
and nowhere else, except the few queries that truly differ per engine, which pick their SQL by
``db.engine`` where they are used (web/db.py, collector/history.py):

- URLs: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, ``postgresql://user:pw@host:port/db``;
- placeholders: ``?`` becomes ``%s`` for psycopg (and a literal ``%`` becomes ``%%``), once per statement text;
- DDL types in migrations: INTEGER is 64-bit and REAL is double precision on both engines, and TEXT sorts
  and compares byte-wise (SQLite's BINARY, PostgreSQL's "C" collation), so every query orders alike;
- the lock that serialises migrations when several parts start at once, and ``try_lock`` for work one
  process at a time must do;
- bulk inserts (``insert_many``): executemany on SQLite, COPY and one INSERT ... SELECT on PostgreSQL.

The schema itself (tables and migrations) is fleet.store.schema; this module applies it (``ensure_schema``).
"""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fleet.store import conversion
from fleet.store.errors import DatabaseBusy, DatabaseError, DatabaseRefused
from fleet.store.samples import SampleIds
from fleet.store.schema import MIGRATIONS, POSTGRESQL, SCHEMA_VERSION, SQLITE, Migration
from fleet.store.wal import AUTOCHECKPOINT_BYTES, WAL_RESET_BYTES

log = logging.getLogger("fleet.store")

BUSY_TIMEOUT_MS = 5000
SQLITE_ROWS_PER_STATEMENT = 64
PG_CONNECT_TIMEOUT_S = 10
# Any constant works: it only has to be the same in every fleet process (pg_advisory_xact_lock's key).
PG_MIGRATION_LOCK = 0x666C656574  # "fleet"



# --- URLs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatabaseUrl:
    """A parsed database URL; ``str()`` and ``repr()`` never show a password."""

    engine: str
    url: str = field(repr=False)
    path: Path | None = None  # SQLite only

    @classmethod
    def parse(cls, target: str | Path | DatabaseUrl) -> DatabaseUrl:
        """``sqlite:///path``, ``postgresql://…`` (or ``postgres://…``); a bare path means a SQLite file.

        A DatabaseUrl is returned as it is, so functions can take any of the three forms.
        """
        if isinstance(target, DatabaseUrl):
            return target
        if isinstance(target, Path):
            return cls(SQLITE, f"sqlite:///{target}", target)
        text = str(target).strip()
        scheme, sep, rest = text.partition("://")
        if not sep:
            if not text:
                raise DatabaseError("empty database URL")
            return cls(SQLITE, f"sqlite:///{text}", Path(text))
        scheme = scheme.lower()
        if scheme == SQLITE:
            if not rest.startswith("/") or rest == "/":
                raise DatabaseError(f"bad SQLite URL {text!r}: use sqlite:///relative/path.db or sqlite:////abs/path.db")
            return cls(SQLITE, text, Path(rest[1:]))
        if scheme in (POSTGRESQL, "postgres"):
            parts = urlsplit(text)
            try:
                _ = parts.port  # urlsplit checks the port lazily
            except ValueError as exc:
                raise DatabaseError(f"bad PostgreSQL URL {redact(text)}: {exc}") from None
            return cls(POSTGRESQL, text)
        raise DatabaseError(f"unsupported database URL {redact(text)}: use sqlite:///PATH or postgresql://…")

    def __str__(self) -> str:
        return redact(self.url)


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def sqlite_url(path: str | Path) -> str:
    """The URL of a SQLite file (absolute paths get the fourth slash)."""
    return f"sqlite:///{path}"


# --- SQL text per engine --------------------------------------------------------------------------
# Strings, quoted identifiers and comments are copied as they are; words and ``?`` may be rewritten.
_TOKENS = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|/\*.*?\*/|\w+|\?|%|\s+|.""", re.DOTALL)
_PG_TYPES = {"INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION", "TEXT": 'TEXT COLLATE "C"', "BLOB": "BYTEA"}
_AUTOINCREMENT = re.compile(r"\bINTEGER\s+PRIMARY\s+KEY\s+AUTOINCREMENT\b", re.IGNORECASE)
_DDL = re.compile(r"^\s*(?:--[^\n]*\n\s*)*(CREATE\s+TABLE|ALTER\s+TABLE)\b", re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """The statement with psycopg's placeholders: ``?`` -> ``%s``, ``%`` -> ``%%`` (outside quotes for ``?``)."""
    out = []
    for token in _TOKENS.findall(sql):
        if token == "?":
            out.append("%s")
        else:
            out.append(token.replace("%", "%%"))
    return "".join(out)


def pg_ddl(statement: str) -> str:
    """A CREATE/ALTER TABLE statement in PostgreSQL's types (other statements are returned unchanged)."""
    if not _DDL.match(statement):
        return statement
    out = []
    for token in _TOKENS.findall(_AUTOINCREMENT.sub("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", statement)):
        out.append(_PG_TYPES.get(token.upper(), token) if token[:1].isalpha() else token)
    return "".join(out)


def statements(script: str) -> list[str]:
    """Split an SQL script into complete statements (comments and blank lines kept inside them)."""
    done, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            done.append(current.strip())
            current = ""
    if current.strip() and not all(part.strip().startswith("--") for part in current.splitlines() if part.strip()):
        raise DatabaseError(f"incomplete SQL statement in migration: {current.strip()[:60]}")
    return done


def migration_statements(migration: Migration, engine: str) -> list[str]:
    """The statements one migration runs on ``engine``."""
    if isinstance(migration, Mapping):
        script = migration[engine]
        return statements(script)
    found = statements(migration)
    return [pg_ddl(s) for s in found] if engine == POSTGRESQL else found


# --- errors ----------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _sqlite_error(exc: BaseException) -> DatabaseError:
    message = _one_line(exc)
    if isinstance(exc, sqlite3.OperationalError):
        # locked, busy, disk full, I/O: the writer waits and tries again; it never acknowledges what failed.
        return DatabaseBusy(message)
    if isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError,
                        sqlite3.ProgrammingError, ValueError, OverflowError)):
        return DatabaseRefused(message)
    return DatabaseError(message)


def _postgresql_error(exc: BaseException) -> DatabaseError:
    psycopg = _psycopg()
    message = _one_line(exc)
    if isinstance(exc, psycopg.OperationalError):
        # Connection lost or refused, server shutting down, serialization failure, deadlock, lock timeout.
        return DatabaseBusy(message)
    if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError, ValueError, OverflowError)):
        return DatabaseRefused(message)
    return DatabaseError(message)


# --- connections -----------------------------------------------------------------------------------
class Database:
    """One connection to fleet's database, used by one thread at a time.

    Statements run in autocommit mode unless inside ``with db.transaction():``. A PostgreSQL connection
    that was lost is opened again on the next statement outside a transaction (the failed one raised
    DatabaseBusy, so the caller retries it).
    """

    def __init__(self, url: DatabaseUrl, readonly: bool = False, check_same_thread: bool = True,
                 busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.url = url
        self.engine = url.engine
        self.readonly = readonly
        self.busy_timeout_ms = busy_timeout_ms
        self.check_same_thread = check_same_thread
        self._depth = 0
        # Run first in every transaction (store.lease.fence): a collector's writes need its lease.
        self.fence: Callable[[Database], None] | None = None
        self._staged: dict[str, bool] = {}  # PostgreSQL staging tables of this connection: used in this transaction?
        if self.engine == SQLITE:
            self._errors: tuple[type[BaseException], ...] = (sqlite3.Error, ValueError, OverflowError)
            self._convert = _sqlite_error
            self._sql = _same
            self._begin = "BEGIN IMMEDIATE"  # take the write lock first: no deadlock upgrading a read lock
        else:
            self._errors = (_psycopg().Error, ValueError, OverflowError)
            self._convert = _postgresql_error
            self._sql = pg_sql
            self._begin = "BEGIN"
        self.raw: Any = self._connect()

    def _connect(self) -> Any:
        try:
            return _connect_sqlite(self) if self.engine == SQLITE else _connect_postgresql(self)
        except self._errors as exc:
            raise type(self._convert(exc))(f"cannot open database {self.url}: {_one_line(exc)}") from exc

    def _live(self) -> Any:
        raw = self.raw
        if self.engine == POSTGRESQL and self._depth == 0 and (raw is None or raw.closed):
            self._staged.clear()
            self.raw = raw = self._connect()
        return raw

    def _failed(self, exc: BaseException) -> DatabaseError:
        error = self._convert(exc)
        if self.engine == POSTGRESQL and self.raw is not None and self.raw.broken:
            self.raw.close()  # reopened by the next statement
        return error

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        try:
            return self._live().execute(self._sql(sql), params).rowcount
        except self._errors as exc:
            raise self._failed(exc) from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Run one statement per row (batched by the driver); returns the rows changed in total."""
        try:
            cursor = self._live().cursor()
            cursor.executemany(self._sql(sql), rows)
            return cursor.rowcount
        except self._errors as exc:
            raise self._failed(exc) from exc

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Every row of a query, as tuples."""
        try:
            if self.engine == SQLITE:
                return self._live().execute(sql, params).fetchall()
            return self._live().execute(self._sql(sql), params, binary=True).fetchall()
        except self._errors as exc:
            raise self._failed(exc) from exc

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        """The first row of a query, or None."""
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def query_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Every row of a query, as dicts keyed by column name."""
        try:
            if self.engine == SQLITE:
                cursor = self._live().execute(sql, params)
            else:
                cursor = self._live().execute(self._sql(sql), params, binary=True)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        except self._errors as exc:
            raise self._failed(exc) from exc

    @property
    def in_transaction(self) -> bool:
        """Inside ``with db.transaction():``?"""
        return self._depth > 0

    def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                    on_conflict: str = "") -> int:
        """Insert rows (values in ``columns`` order) in one transaction; returns how many were inserted or updated.

        ``on_conflict`` is what follows ON CONFLICT, e.g. "DO NOTHING". SQLite runs ``INSERT ... VALUES (...),
        (...), ...`` with up to SQLITE_ROWS_PER_STATEMENT rows each: executemany steps (and hands the GIL back)
        once per row, a large share of the writer's time when a report row and a machine row are written per
        message; chunks are 64 rows or a power of two below, so the connection's statement cache keeps every
        form. PostgreSQL COPYs the rows into a temporary table and runs one INSERT ... SELECT, faster than
        executemany's pipelined INSERTs (docs/benchmarks.md).
        So ``on_conflict`` must not update one row twice (at most one row per key), which PostgreSQL refuses and
        SQLite would allow.
        """
        if not rows:
            return 0
        names = ", ".join(columns)
        conflict = f" ON CONFLICT {on_conflict}" if on_conflict else ""
        if self.engine == SQLITE:
            changed = i = 0
            with self.transaction():
                while i < len(rows):
                    size = min(SQLITE_ROWS_PER_STATEMENT, 1 << ((len(rows) - i).bit_length() - 1))
                    changed += self.execute(_multi_row_insert(table, names, len(columns), size, conflict),
                                            list(chain.from_iterable(rows[i:i + size])))
                    i += size
            return changed
        return self._copy_then(table, names, rows, f"INSERT INTO {table}({names}) SELECT {names} FROM {{staging}}"
                                                   + conflict)

    def update_many(self, table: str, key: Sequence[str], columns: Sequence[str],
                    rows: Sequence[Sequence[Any]]) -> int:
        """Update existing rows (values in ``columns`` order, the ``key`` columns last); returns the rows matched.

        A row whose key is not in the table changes nothing (the caller compares the count). On SQLite one
        prepared ``UPDATE`` stepped per row: cheaper than ``insert_many``'s upsert, which builds and probes an
        insert before it updates (docs/benchmarks.md). On PostgreSQL
        the rows are COPYed into a temporary table and applied with one ``UPDATE ... FROM``.
        """
        if tuple(columns[len(columns) - len(key):]) != tuple(key):
            raise ValueError(f"update_many: the key columns {key} must come last")
        if not rows:
            return 0
        updated = columns[:len(columns) - len(key)]
        if self.engine == SQLITE:
            with self.transaction():
                return self.executemany(f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in updated)}"
                                        f" WHERE {' AND '.join(f'{c} = ?' for c in key)}", rows)
        return self._copy_then(table, ", ".join(columns), rows,
                               f"UPDATE {table} SET {', '.join(f'{c} = s.{c}' for c in updated)} FROM {{staging}} s"
                               f" WHERE {' AND '.join(f'{table}.{c} = s.{c}' for c in key)}")

    def _copy_then(self, table: str, names: str, rows: Sequence[Sequence[Any]], statement: str) -> int:
        # PostgreSQL: COPY the rows into this transaction's staging table, then one statement reads them.
        with self.transaction():
            try:
                staging = self._staging(table, names)
                cursor = self.raw.cursor()
                with cursor.copy(f"COPY {staging}({names}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                return cursor.execute(statement.replace("{staging}", staging)).rowcount
            except self._errors as exc:
                raise self._failed(exc) from exc

    def _staging(self, table: str, names: str) -> str:
        # A temporary table per connection and column list, emptied at every commit (or right here if this
        # transaction used it already); the connection's loss takes it along, and _live() forgets it.
        staging = f"fleet_staging_{table}_{zlib.crc32(names.encode()):08x}"
        if staging not in self._staged:
            self.raw.execute(f"CREATE TEMPORARY TABLE IF NOT EXISTS {staging} ON COMMIT DELETE ROWS AS"
                             f" SELECT {names} FROM {table} WITH NO DATA")
            self._staged[staging] = False
        if self._staged[staging]:
            self.raw.execute(f"TRUNCATE {staging}")
        self._staged[staging] = True
        return staging

    def insert(self, table: str, rows: Iterable[Mapping[str, Any]], key: Sequence[str] = ()) -> int:
        """Insert dict rows (all with the first row's columns); with ``key``, a row whose key exists replaces it."""
        rows = list(rows)
        if not rows:
            return 0
        columns = list(rows[0])
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
        conflict = (f"({', '.join(key)}) " + (f"DO UPDATE SET {updates}" if updates else "DO NOTHING")) if key else ""
        return self.insert_many(table, columns, [[row[c] for c in columns] for row in rows], conflict)

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """Everything inside commits together or not at all; a nested block joins the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        raw = self._live()
        try:
            raw.execute(self._begin)
        except self._errors as exc:
            raise self._failed(exc) from exc
        self._depth = 1
        try:
            if self.fence is not None:
                self.fence(self)
            yield self
        except BaseException:
            self._end_transaction()
            self._staged.clear()  # a staging table created in this transaction is gone with it
            self._rollback()
            raise
        self._end_transaction()
        try:
            raw.execute("COMMIT")
        except self._errors as exc:
            self._staged.clear()
            self._rollback()
            raise self._failed(exc) from exc

    def _end_transaction(self) -> None:
        self._depth = 0
        for staging in self._staged:
            self._staged[staging] = False

    def _rollback(self) -> None:
        if self.raw is None:
            return
        try:
            self.raw.execute("ROLLBACK")
        except self._errors:  # the connection is gone: the server rolled back already
            pass

    def try_lock(self, name: str) -> bool:
        """Inside a transaction: may it do work that one process at a time must do? Held until it ends.

        SQLite's write transactions already run one at a time; on PostgreSQL this takes an advisory lock.
        """
        if self.engine == SQLITE:
            return True
        row = self.query_one("SELECT pg_try_advisory_xact_lock(?)", (zlib.crc32(name.encode()),))
        return row == (True,)

    def table_exists(self, name: str) -> bool:
        """Is there a table called ``name``?"""
        if self.engine == SQLITE:
            return self.query_one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)) is not None
        return self.query_one("SELECT to_regclass(?) IS NOT NULL", (name,)) == (True,)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        raw, self.raw = self.raw, None
        if raw is not None:
            try:
                raw.close()
            except self._errors:
                pass

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Database({self.url})"


def _same(sql: str) -> str:
    return sql


@functools.lru_cache(maxsize=256)
def _multi_row_insert(table: str, names: str, width: int, size: int, conflict: str) -> str:
    # Built once per shape: the text is long (64 rows of placeholders) and sqlite3 caches statements by it.
    placeholders = f"({', '.join('?' * width)})"
    return f"INSERT INTO {table}({names}) VALUES {', '.join([placeholders] * size)}{conflict}"


def _connect_sqlite(db: Database) -> sqlite3.Connection:
    path = db.url.path
    assert path is not None
    timeout = db.busy_timeout_ms / 1000
    if db.readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout, isolation_level=None,
                               check_same_thread=db.check_same_thread)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=db.check_same_thread)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        # How the WAL stays bounded: store/wal.py.
        conn.execute(f"PRAGMA journal_size_limit={WAL_RESET_BYTES}")
        page_bytes = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_BYTES // page_bytes}")
    conn.execute(f"PRAGMA busy_timeout={int(db.busy_timeout_ms)}")
    return conn


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise DatabaseError("a postgresql:// database needs psycopg: pip install 'fleet-telemetry[postgres]'") from None
    return psycopg


def _connect_postgresql(db: Database) -> Any:
    conn = _psycopg().connect(db.url.url, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_S)
    # lock_timeout is SQLite's busy timeout: how long a statement waits for another writer's row lock.
    settings = f"SET lock_timeout = {int(db.busy_timeout_ms)}"
    if db.readonly:
        settings += "; SET default_transaction_read_only = on"
    conn.execute(settings)
    return conn


class DatabasePool:
    """Idle connections kept for the next user, for servers that open one per request (web).

    A new PostgreSQL connection costs a TCP and SCRAM handshake, many times a pooled query (docs/benchmarks.md);
    a SQLite one a file open and a few pragmas. A connection comes back only when it is idle and healthy.
    """

    def __init__(self, target: str | Path | DatabaseUrl, readonly: bool = True, size: int = 8) -> None:
        self.url = DatabaseUrl.parse(target)
        self.readonly = readonly
        self.size = size
        self._idle: list[Database] = []
        self._lock = threading.Lock()

    def get(self) -> Database:
        """An idle connection, or a new one."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return open_database(self.url, readonly=self.readonly, check_same_thread=False)

    def put(self, db: Database) -> None:
        """Give a connection back (closed instead when the pool is full or the connection is not reusable)."""
        healthy = db.raw is not None and not db.in_transaction
        if healthy and db.engine == POSTGRESQL:
            healthy = not db.raw.closed and db.raw.info.transaction_status == _psycopg().pq.TransactionStatus.IDLE
        with self._lock:
            if healthy and len(self._idle) < self.size:
                self._idle.append(db)
                return
        db.close()

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for db in idle:
            db.close()


def open_database(target: str | Path | DatabaseUrl, readonly: bool = False, check_same_thread: bool = True,
                  migrate: bool = True, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> Database:
    """Connect to a database URL (or SQLite path); unless read-only, create or migrate its schema first."""
    url = DatabaseUrl.parse(target)
    db = Database(url, readonly=readonly, check_same_thread=check_same_thread, busy_timeout_ms=busy_timeout_ms)
    if migrate and not readonly:
        try:
            ensure_schema(db)
        except BaseException:
            db.close()
            raise
    return db


# --- migrations ------------------------------------------------------------------------------------
def schema_version(db: Database) -> int:
    """The version recorded in ``meta`` (0 for a new database)."""
    if not db.table_exists("meta"):
        return 0
    row = db.query_one("SELECT value FROM meta WHERE key = 'schema_version'")
    return int(row[0]) if row else 0


@contextmanager
def _migration_lock(db: Database) -> Iterator[None]:
    """A write transaction that only one process at a time holds while it migrates."""
    with db.transaction():
        if db.engine == POSTGRESQL:
            db.execute("SELECT pg_advisory_xact_lock(?)", (PG_MIGRATION_LOCK,))
        yield


def ensure_schema(db: Database) -> None:
    """Apply every migration newer than the database's version, each in its own write transaction.

    Several parts may start at once on one database: the version is read again under the migration lock
    (SQLite's write lock, a PostgreSQL advisory lock), so each migration runs exactly once.
    """
    current = schema_version(db)
    for version, migration in MIGRATIONS:
        if version <= current:
            continue
        try:
            with _migration_lock(db):
                current = schema_version(db)
                if current < version:
                    for statement in migration_statements(migration, db.engine):
                        db.execute(statement)
                    db.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?) ON CONFLICT(key)"
                               " DO UPDATE SET value = excluded.value", (str(version),))
                    current = version
        except DatabaseError as exc:
            raise type(exc)(f"cannot migrate {db.url} to schema version {version}: {exc}") from exc
    if current > SCHEMA_VERSION:
        raise DatabaseError(f"database schema version {current} is newer than this fleet ({SCHEMA_VERSION})")
    if db.table_exists(conversion.OLD_REPORTS):
        convert_history(db)


def convert_history(db: Database, chunk_rows: int | None = None) -> int:
    """Convert history stored before schema version 5, a chunk per transaction, logging progress; returns rows.

    Every part that opens the database takes part until none is left, so none starts on half of it.
    """
    left = conversion.rows_left(db)
    if left:
        log.info("converting %d stored reports to the compact history layout (schema version 5)", left)
    ids = SampleIds()
    done = 0
    while True:
        try:
            with _migration_lock(db):
                converted = conversion.convert_chunk(db, ids, chunk_rows or conversion.CHUNK_ROWS)
        except BaseException as exc:
            ids.rollback()
            if isinstance(exc, DatabaseError):
                raise type(exc)(f"cannot convert the history of {db.url}: {exc}") from exc
            raise
        ids.commit()
        if not converted:
            break
        done += converted
        log.info("converted %d of %d reports (%.0f%%)", done, left, 100 * min(1.0, done / max(left, 1)))
    if left:
        log.info("history conversion done: %d reports; `fleet db vacuum` returns the freed space to the disk", done)
    return done
