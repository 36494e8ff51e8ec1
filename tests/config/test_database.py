"""The shared schema: versioned migrations, applied once each, in order."""

from __future__ import annotations

import pytest

from fleet.config import database


def test_new_database_gets_every_migration_once(tmp_path, monkeypatch):
    conn = database.connect(tmp_path / "fleet.db")
    database.ensure_schema(conn)
    assert database.schema_version(conn) == database.SCHEMA_VERSION
    extra = (database.SCHEMA_VERSION + 1, "CREATE TABLE added_later (x INTEGER);\n-- a trailing comment\n")
    monkeypatch.setattr(database, "MIGRATIONS", (*database.MIGRATIONS, extra))
    monkeypatch.setattr(database, "SCHEMA_VERSION", extra[0])
    database.ensure_schema(conn)
    database.ensure_schema(database.connect(tmp_path / "fleet.db"))  # a second start: nothing runs twice
    assert database.schema_version(conn) == extra[0]
    assert conn.execute("SELECT count(*) FROM added_later").fetchone() == (0,)


def test_a_failing_migration_leaves_the_previous_version(tmp_path, monkeypatch):
    conn = database.connect(tmp_path / "fleet.db")
    database.ensure_schema(conn)
    bad = (database.SCHEMA_VERSION + 1, "CREATE TABLE half (x INTEGER);\nINSERT INTO nowhere VALUES (1);\n")
    monkeypatch.setattr(database, "MIGRATIONS", (*database.MIGRATIONS, bad))
    monkeypatch.setattr(database, "SCHEMA_VERSION", bad[0])
    with pytest.raises(database.DatabaseError, match="nowhere"):
        database.ensure_schema(conn)
    assert database.schema_version(conn) == bad[0] - 1
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half'").fetchone() == (0,)


def test_a_database_from_a_newer_fleet_is_refused(tmp_path):
    conn = database.connect(tmp_path / "fleet.db")
    database.ensure_schema(conn)
    conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    conn.commit()
    with pytest.raises(database.DatabaseError, match="newer"):
        database.ensure_schema(conn)
