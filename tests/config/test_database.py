"""The database seam: one schema with versioned migrations, the same SQL and answers on SQLite and PostgreSQL."""

from __future__ import annotations

import sys
import threading

import pytest

from fleet.store import database
from fleet.store.database import DatabaseBusy, DatabaseError, DatabaseRefused, DatabaseUrl, open_database

pytestmark = pytest.mark.both_engines


def _with_migration(monkeypatch, script) -> int:
    version = database.SCHEMA_VERSION + 1
    monkeypatch.setattr(database, "MIGRATIONS", (*database.MIGRATIONS, (version, script)))
    monkeypatch.setattr(database, "SCHEMA_VERSION", version)
    return version


def test_new_database_gets_every_migration_once(db, database_url, monkeypatch):
    assert database.schema_version(db) == database.SCHEMA_VERSION
    version = _with_migration(monkeypatch, "CREATE TABLE added_later (x INTEGER, y REAL, z TEXT);\n"
                                           "INSERT INTO added_later VALUES (1, 0.5, 'a');\n-- a trailing comment\n")
    database.ensure_schema(db)
    open_database(database_url).close()  # a second start: nothing runs twice
    assert database.schema_version(db) == version
    assert db.query("SELECT x, y, z FROM added_later") == [(1, 0.5, "a")]


def test_parts_starting_at_once_run_each_migration_once(db, database_url, monkeypatch):
    _with_migration(monkeypatch, "CREATE TABLE runs (n INTEGER);\nINSERT INTO runs VALUES (1);\n")
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def part() -> None:
        try:
            start.wait()
            open_database(database_url).close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=part) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert db.query("SELECT count(*) FROM runs") == [(1,)]


def test_a_failing_migration_leaves_the_previous_version(db, monkeypatch):
    version = _with_migration(monkeypatch, "CREATE TABLE half (x INTEGER);\nINSERT INTO nowhere VALUES (1);\n")
    with pytest.raises(DatabaseError, match="nowhere") as raised:
        database.ensure_schema(db)
    assert "\n" not in str(raised.value)
    assert database.schema_version(db) == version - 1
    assert not db.table_exists("half")


def test_a_database_from_a_newer_fleet_is_refused(db):
    db.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(DatabaseError, match="newer"):
        database.ensure_schema(db)


def test_engine_specific_migration(db, monkeypatch):
    _with_migration(monkeypatch, {"sqlite": "CREATE TABLE t (v TEXT);\nINSERT INTO t VALUES (sqlite_version());",
                                  "postgresql": "CREATE TABLE t (v TEXT);\nINSERT INTO t VALUES (version());"})
    database.ensure_schema(db)
    assert db.query_one("SELECT count(*) FROM t") == (1,)


def test_types_behave_alike(db):
    """INTEGER holds 64 bits, REAL is a double, TEXT compares and sorts byte-wise, on both engines."""
    db.insert("org_stats", [{"org": name, "expired": 2**62 + i} for i, name in enumerate(["b", "B", "_", "a", "Ä"])])
    assert db.query("SELECT org FROM org_stats ORDER BY org") == [("B",), ("_",), ("a",), ("b",), ("Ä",)]
    assert db.query_one("SELECT expired FROM org_stats WHERE org = ?", ("B",)) == (2**62 + 1,)
    db.insert("heartbeats", [{"component": "x", "ts": 1764000000.1234567, "detail": "{}"}])
    assert db.query_one("SELECT ts FROM heartbeats") == (1764000000.1234567,)
    assert db.query_one("SELECT count(*) FROM org_stats WHERE org LIKE ?", ("%a%",)) == (1,)
    assert db.query_dicts("SELECT org, expired FROM org_stats WHERE org = '_'") == [{"org": "_", "expired": 2**62 + 2}]


def test_events_get_increasing_ids(db):
    for status in ("online", "offline"):
        db.execute("INSERT INTO events(org, machine_id, ts, new_status) VALUES ('a', 'm', 1, ?)", (status,))
    assert db.query("SELECT id, new_status FROM events ORDER BY id") == [(1, "online"), (2, "offline")]


def test_transactions_commit_together_or_not_at_all(db):
    def twice() -> None:
        with db.transaction():
            db.execute("INSERT INTO orgs(name, created) VALUES ('a', 1)")
            db.execute("INSERT INTO orgs(name, created) VALUES ('a', 2)")  # primary key: refused

    with pytest.raises(DatabaseRefused):
        twice()
    assert db.query("SELECT name FROM orgs") == []
    with db.transaction():
        db.execute("INSERT INTO orgs(name, created) VALUES ('a', 1)")
        with db.transaction():  # joins the outer one
            db.execute("INSERT INTO orgs(name, created) VALUES ('b', 1)")
    assert db.query("SELECT name FROM orgs ORDER BY name") == [("a",), ("b",)]
    assert db.execute("DELETE FROM orgs") == 2


def test_update_many_changes_existing_rows_and_counts_them(db):
    columns = ("expired", "lost", "org")
    db.insert_many("org_stats", columns, [(1, 0, "a"), (2, 0, "b")])
    with db.transaction():  # twice in one transaction: PostgreSQL's staging table is emptied in between
        assert db.update_many("org_stats", ("org",), columns, [(5, 1, "a"), (6, 1, "nobody")]) == 1
        assert db.update_many("org_stats", ("org",), columns, [(7, 2, "b")]) == 1
    assert db.query("SELECT org, expired, lost FROM org_stats ORDER BY org") == [("a", 5, 1), ("b", 7, 2)]
    assert db.update_many("org_stats", ("org",), columns, []) == 0
    with pytest.raises(ValueError, match="must come last"):
        db.update_many("org_stats", ("org",), ("org", "expired"), [("a", 1)])


def test_refused_values_are_refused_not_busy(db):
    with pytest.raises(DatabaseRefused):
        db.execute("INSERT INTO orgs(name, created) VALUES (?, ?)", ("x", None))  # NOT NULL
    with pytest.raises(DatabaseRefused):
        db.execute("INSERT INTO org_stats(org, expired) VALUES (?, ?)", ("x", 2**64))  # past 64 bits


def test_a_lost_connection_is_busy_then_reopened(db, engine, request):
    if engine == "sqlite":
        pytest.skip("a SQLite connection cannot be lost")
    server = request.getfixturevalue("pg_server")
    pid = db.query_one("SELECT pg_backend_pid()")[0]
    server.admin(f"SELECT pg_terminate_backend({pid})")
    with pytest.raises(DatabaseBusy):
        db.query("SELECT 1")
    assert db.query("SELECT 1") == [(1,)]


def test_read_only_connections_cannot_write(database_url, db):
    with open_database(database_url, readonly=True) as reader:
        assert reader.query("SELECT count(*) FROM orgs") == [(0,)]
        with pytest.raises(DatabaseError):
            reader.execute("INSERT INTO orgs(name, created) VALUES ('x', 1)")


def test_placeholders_and_percent_signs_for_psycopg():
    sql = "SELECT '?', '%' || ? FROM t WHERE a LIKE '%x' AND b = ? -- why?\n"
    assert database.pg_sql(sql) == "SELECT '?', '%%' || %s FROM t WHERE a LIKE '%%x' AND b = %s -- why?\n"


def test_ddl_types_for_postgresql():
    ddl = ("-- a comment with TEXT and REAL\nCREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, "
           "n INTEGER NOT NULL DEFAULT 0, x REAL, s TEXT DEFAULT 'TEXT', b BLOB, \"REAL\" TEXT)")
    assert database.pg_ddl(ddl) == (
        "-- a comment with TEXT and REAL\nCREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
        "n BIGINT NOT NULL DEFAULT 0, x DOUBLE PRECISION, s TEXT COLLATE \"C\" DEFAULT 'TEXT', b BYTEA, "
        "\"REAL\" TEXT COLLATE \"C\")")
    assert database.pg_ddl("CREATE INDEX i ON t(x)") == "CREATE INDEX i ON t(x)"
    assert database.pg_ddl("ALTER TABLE t ADD COLUMN y REAL") == "ALTER TABLE t ADD COLUMN y DOUBLE PRECISION"


@pytest.mark.parametrize(("text", "kind", "path"), [
    ("sqlite:///fleet-data/fleet.db", "sqlite", "fleet-data/fleet.db"),
    ("sqlite:////var/lib/fleet/fleet.db", "sqlite", "/var/lib/fleet/fleet.db"),
    ("postgresql://fleet:s3cret@db.example:5432/fleet", "postgresql", None),
    ("postgres://fleet@db/fleet?sslmode=require", "postgresql", None),
])
def test_urls(text, kind, path):
    url = DatabaseUrl.parse(text)
    assert url.engine == kind
    assert url.path == (None if path is None else database.Path(path))
    assert "s3cret" not in str(url) + repr(url)


@pytest.mark.parametrize("text", ["mysql://x/y", "sqlite://relative.db", "sqlite:///", "postgresql://h:port/x", ""])
def test_bad_urls_are_one_line_errors(text):
    with pytest.raises(DatabaseError) as raised:
        DatabaseUrl.parse(text)
    assert "\n" not in str(raised.value)


def test_redact_hides_only_the_password():
    assert database.redact("postgresql://u:p%40ss@h:1/d?x=1") == "postgresql://u:***@h:1/d?x=1"
    assert database.redact("postgresql://h/d") == "postgresql://h/d"


def test_postgresql_without_psycopg_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now raises ImportError
    with pytest.raises(DatabaseError, match=r"needs psycopg: pip install 'fleet-telemetry\[postgres\]'"):
        open_database("postgresql://u:p@127.0.0.1:1/d")
