"""`fleet db info [--json]` on both engines and `fleet db vacuum` (SQLite upkeep; refused on PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleet.cli import cli
from fleet.store import maintenance
from fleet.store.database import SCHEMA_VERSION, open_database, redact, sqlite_url
from tests.store import store_fixtures as fx

# What tests/store/store_fixtures.py stores: two orgs, 12 reports, 6 events and 3 alerts each.
ROWS = {"orgs": 2, "samples": 24, "report_machines": 4, "report_sessions": 8, "report_fields": 1, "inventory": 4,
        "events": 12, "alerts": 6, "machines": 0, "rollups": 0}


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def one_line_error(result, expected: str) -> None:
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert expected in result.stderr


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "fleet-data"


@pytest.mark.both_engines
def test_info_json_shows_every_table_with_its_rows_and_size(data_dir, database_url, engine):
    fx.fill(data_dir, database_url)
    result = run("db", "info", "--json", "--data-dir", str(data_dir), "--database", database_url)
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)

    assert info["engine"] == engine
    assert info["schema_version"] == SCHEMA_VERSION
    with open_database(database_url) as db:
        tables = ([r[0] for r in db.query("SELECT name FROM sqlite_master WHERE type = 'table'"
                                          " AND name NOT LIKE 'sqlite%'")] if engine == "sqlite" else
                  [r[0] for r in db.query("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")])
        assert sorted(info["tables"]) == sorted(tables)
        for name in tables:
            assert info["tables"][name]["rows"] == db.query(f"SELECT count(*) FROM {name}")[0][0], name
    assert {name: info["tables"][name]["rows"] for name in ROWS} == ROWS
    assert all(t["bytes"] > 0 for t in info["tables"].values())
    history = sum(info["tables"][name]["bytes"] for name in maintenance.HISTORY_TABLES)
    assert info["bytes_per_report"] == history / info["tables"]["samples"]["rows"]
    assert info["history_days"] == pytest.approx(40.25 / 86_400)  # first to last receive time
    assert info["database_bytes"] >= sum(t["bytes"] for t in info["tables"].values())
    if engine == "sqlite":
        path = data_dir / "fleet.db"
        assert info["database_bytes"] == path.stat().st_size
        assert info["wal_bytes"] == 0  # the last connection to close checkpointed it and removed it
        assert info["free_bytes"] == 5 * 4096  # migration 5 dropped the old reports table and its 4 indexes
    else:
        assert info["wal_bytes"] is None
        assert info["free_bytes"] is None
        assert info["database"] == redact(database_url)


def test_info_text_lists_tables_and_sizes(data_dir):
    fx.fill(data_dir, sqlite_url(data_dir / "fleet.db"))
    result = run("db", "info", "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"database:        sqlite:///{data_dir}/fleet.db"
    assert lines[1] == f"schema version:  {SCHEMA_VERSION}"
    assert lines[2].startswith("size:            ")
    assert lines[2].endswith(" kB free)")  # the old reports table, dropped by migration 5
    assert lines[3].startswith("WAL:             ")
    assert lines[4].startswith("history:         0.0 days, ")
    assert lines[4].endswith(" bytes per report")
    rows = {line.split()[0]: line.split()[1:] for line in lines[lines.index("") + 2:]}
    assert lines[lines.index("") + 1].split() == ["TABLE", "ROWS", "SIZE"]
    assert rows["samples"][0] == "24"
    assert rows["events"][0] == "12"
    assert rows["alerts"][0] == "6"
    assert rows["samples"][2] in ("B", "kB", "MB")


def test_info_does_not_write_and_names_a_missing_file(data_dir):
    one_line_error(run("db", "info", "--data-dir", str(data_dir)), f"no SQLite database at {data_dir}/fleet.db")
    assert not data_dir.exists()


def test_vacuum_shrinks_the_file_empties_the_wal_and_keeps_the_rows(data_dir):
    database = sqlite_url(data_dir / "fleet.db")
    fx.fill(data_dir, database)
    with open_database(database) as db:  # something to give back: pages of inventory, then gone
        db.execute("UPDATE inventory SET system = ?", ("x" * 8000,))
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        db.execute("DELETE FROM inventory")
        db.execute("DELETE FROM samples WHERE machine IN (SELECT id FROM report_machines WHERE org = 'acme')")
        # This connection stays open, as a running collector's would: the WAL is not removed at its close.
        before = maintenance.database_info(database)
        assert before.free_bytes > 0
        assert before.wal_bytes > 0

        result = run("db", "vacuum", "--data-dir", str(data_dir))
        after = maintenance.database_info(database)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"vacuumed sqlite:///{data_dir}/fleet.db: ")
    assert result.stdout.endswith(" -> 0 B\n")  # the WAL's size after
    assert after.free_bytes == 0
    assert after.wal_bytes == 0
    assert after.database_bytes < before.database_bytes
    assert {t.name: t.rows for t in after.tables}["samples"] == 12
    with open_database(database) as db:
        assert db.table_exists("sqlite_stat1")  # ANALYZE ran


def test_vacuum_result_says_when_a_reader_kept_the_wal(data_dir):
    database = sqlite_url(data_dir / "fleet.db")
    fx.fill(data_dir, database)
    with open_database(database) as writer, open_database(database, readonly=True) as reader:
        writer.execute("DELETE FROM events")
        wal = Path(f"{data_dir}/fleet.db-wal").stat().st_size
        with reader.transaction():
            reader.query("SELECT count(*) FROM events")  # a read snapshot from before VACUUM
            result = maintenance.vacuum(database)
            assert result.database_bytes_after == (data_dir / "fleet.db").stat().st_size
    assert result.wal_bytes_before == wal > 0
    assert not result.wal_truncated
    assert result.wal_bytes_after > 0
    assert maintenance.vacuum(database).wal_truncated


@pytest.mark.postgresql
def test_vacuum_on_postgresql_is_refused_in_one_line(tmp_path, pg_server):
    url = pg_server.database()
    one_line_error(run("db", "vacuum", "--data-dir", str(tmp_path), "--database", url),
                   "fleet db vacuum is SQLite maintenance; on PostgreSQL")


def test_vacuum_names_a_missing_file(data_dir):
    one_line_error(run("db", "vacuum", "--data-dir", str(data_dir)), f"no SQLite database at {data_dir}/fleet.db")
    assert not data_dir.exists()
