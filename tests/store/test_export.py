"""`fleet export ORG --out FILE`: one org's history, events and alerts as .db, .csv or .json, exactly."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlite_utils
from click.testing import CliRunner

from fleet.cli import cli
from fleet.store import export
from fleet.store.database import sqlite_url
from tests.store import store_fixtures as fx
from tests.store.store_fixtures import ORGS, T0

ROOT = Path(__file__).resolve().parents[2]
WINDOW = (T0 + 5, T0 + 35)


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "fleet-data"


@pytest.fixture
def filled(data_dir: Path, database_url: str) -> str:
    """The test's database (its engine's) holding the two orgs of tests/store/store_fixtures.py."""
    fx.fill(data_dir, database_url)
    return database_url


def expected_history(org: str, since: float | None = None, until: float | None = None) -> list[tuple]:
    return [r.row() for r in fx.reports(org)
            if (since is None or r.ts >= since) and (until is None or r.ts <= until)]


def expected_events(org: str, since: float | None = None, until: float | None = None) -> list[tuple]:
    first_id = 1 + sum(len(fx.events(o)) for o in ORGS[:ORGS.index(org)])  # written org by org, in order
    rows = [(first_id + i, e.org, e.machine_id, e.ts, e.old_status, e.new_status, e.reason)
            for i, e in enumerate(fx.events(org))]
    return sorted((r for r in rows if (since is None or r[3] >= since) and (until is None or r[3] <= until)),
                  key=lambda r: (r[3], r[0]))


def expected_alerts(org: str, since: float | None = None, until: float | None = None) -> list[tuple]:
    first_id = 1 + sum(len(fx.alerts(o)) for o in ORGS[:ORGS.index(org)])
    return [(first_id + i, a.org, a.rule, a.machine_id, a.state, a.severity, a.summary, a.value, a.active_at,
             a.fired_at, a.resolved_at, None, None) for i, a in enumerate(fx.alerts(org))
            if (until is None or a.active_at <= until) and (since is None or a.resolved_at is None
                                                            or a.resolved_at >= since)]


def db_rows(path: Path, table: str) -> list[tuple]:
    lite = sqlite_utils.Database(path)
    try:
        order = {"history": "machine_id, ts, session, seq", "events": "ts, id", "alerts": "id"}[table]
        return [tuple(row) for row in lite.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()]
    finally:
        lite.close()


# --- the three formats -------------------------------------------------------------------------------------
@pytest.mark.both_engines
def test_db_file_holds_the_org_only_with_typed_columns_and_keys(filled, tmp_path):
    out = tmp_path / "acme.db"
    result = export.export_org(filled, "acme", out, chunk_rows=2)  # chunks of 2: paging crosses every tie

    assert (result.history, result.events, result.alerts) == (24 // 2, 6, 3)
    assert db_rows(out, "history") == expected_history("acme")
    assert db_rows(out, "events") == expected_events("acme")
    assert db_rows(out, "alerts") == expected_alerts("acme")
    lite = sqlite_utils.Database(out)
    assert set(lite.table_names()) == {"history", "events", "alerts"}
    history = lite["history"]
    assert history.pks == ["org", "machine_id", "session", "seq"]
    assert lite["events"].pks == ["id"]
    assert lite["alerts"].pks == ["id"]
    assert history.columns_dict == {
        "org": str, "machine_id": str, "session": str, "seq": int, "ts": float, "received": float,
        "cpu_percent": float, "memory_percent": float, "disk_percent": float, "load1": float,
        "net_bytes_sent": int, "net_bytes_recv": int, "fields": str}
    assert lite["alerts"].columns_dict["value"] is float
    assert lite["events"].columns_dict["ts"] is float
    assert {tuple(i.columns) for i in history.indexes if not i.name.startswith("sqlite_")} == {("machine_id", "ts")}
    assert lite.journal_mode != "wal"  # one file: nothing beside it for a copy to forget
    fields = [json.loads(row["fields"]) for row in history.rows_where("fields IS NOT NULL")]
    assert fields[0] == {"custom.queue_depth": 0, 'custom.jobs{kind="mail"}': 3, "process.nginx": 2}
    lite.close()


@pytest.mark.both_engines
def test_csv_is_the_history_with_a_header(filled, tmp_path):
    out = tmp_path / "globex.csv"
    result = export.export_org(filled, "globex", out, chunk_rows=3)

    with out.open(newline="") as file:
        lines = list(csv.reader(file))
    assert lines[0] == list(export.HISTORY_COLUMNS)
    assert lines[1:] == [["" if v is None else str(v) for v in row] for row in expected_history("globex")]
    assert result.history == len(lines) - 1 == 12


@pytest.mark.both_engines
def test_json_is_one_object_with_the_three_lists_in_the_window(filled, tmp_path):
    out = tmp_path / "acme.json"
    since, until = WINDOW
    export.export_org(filled, "acme", out, since=since, until=until, chunk_rows=2)

    body = json.loads(out.read_text())
    assert list(body) == ["org", "since", "until", "history", "events", "alerts"]
    assert (body["org"], body["since"], body["until"]) == ("acme", since, until)
    history = [dict(zip(export.HISTORY_COLUMNS, row, strict=True)) for row in expected_history("acme", since, until)]
    for point in history:
        point["fields"] = None if point["fields"] is None else json.loads(point["fields"])
    assert body["history"] == history
    assert len(history) == 8  # 4 a machine: ts 10, 20 of s1 and 20, 30 of s2
    assert body["events"] == [dict(zip(export.EVENT_COLUMNS, r, strict=True))
                              for r in expected_events("acme", since, until)]
    assert [a["rule"] for a in body["alerts"]] == ["machine-offline"]  # resolved before, pending after: left out
    assert body["alerts"] == [dict(zip(export.ALERT_COLUMNS, r, strict=True))
                              for r in expected_alerts("acme", since, until)]


def test_an_empty_window_still_makes_a_valid_file(data_dir, tmp_path):
    database = sqlite_url(data_dir / "fleet.db")
    fx.fill(data_dir, database)
    out = tmp_path / "none.json"
    result = export.export_org(database, "acme", out, since=T0 + 1000)
    alerts = [dict(zip(export.ALERT_COLUMNS, row, strict=True)) for row in expected_alerts("acme", T0 + 1000)]
    assert [a["state"] for a in alerts] == ["firing", "pending"]  # not resolved: active in any later window
    assert json.loads(out.read_text()) == {"org": "acme", "since": T0 + 1000, "until": None, "history": [],
                                           "events": [], "alerts": alerts}
    assert result.history == result.events == 0
    empty = tmp_path / "none.db"
    export.export_org(database, "acme", empty, since=T0 - 1000, until=T0 - 999)  # before it all
    lite = sqlite_utils.Database(empty)
    assert {name: lite[name].count for name in lite.table_names()} == {"history": 0, "events": 0, "alerts": 0}
    lite.close()


@pytest.mark.postgresql
def test_postgresql_and_sqlite_export_the_same_files(tmp_path, pg_server):
    files = {}
    for engine, database in (("sqlite", sqlite_url(tmp_path / "lite" / "fleet.db")),
                             ("postgresql", pg_server.database())):
        fx.fill(tmp_path / engine, database)
        for suffix in (".db", ".csv", ".json"):
            out = tmp_path / f"{engine}{suffix}"
            export.export_org(database, "acme", out, since=T0 - 100, chunk_rows=4)
            files[engine, suffix] = out
    assert files["sqlite", ".csv"].read_bytes() == files["postgresql", ".csv"].read_bytes()
    assert files["sqlite", ".json"].read_bytes() == files["postgresql", ".json"].read_bytes()
    for table in ("history", "events", "alerts"):
        assert db_rows(files["sqlite", ".db"], table) == db_rows(files["postgresql", ".db"], table)


# --- times ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "seconds"), [
    ("1700000000", 1_700_000_000.0), ("1700000000.25", 1_700_000_000.25), ("2023-11-14T22:13:20Z", 1_700_000_000.0),
    ("2023-11-14T22:13:20", 1_700_000_000.0), ("2023-11-15T00:13:20+02:00", 1_700_000_000.0),
    ("2023-11-14", 1_699_920_000.0)])
def test_times_are_unix_seconds_or_iso_8601_utc_by_default(text, seconds):
    assert export.parse_time(text) == seconds


@pytest.mark.parametrize("text", ["yesterday", "nan", "inf", "2023-13-01"])
def test_bad_times_are_refused(text):
    with pytest.raises(export.ExportError, match="--since"):
        export.parse_time(text, "--since")


# --- the command -------------------------------------------------------------------------------------------
def test_command_writes_the_file_and_says_what_it_wrote(data_dir, tmp_path):
    fx.fill(data_dir, sqlite_url(data_dir / "fleet.db"))
    out = tmp_path / "acme.db"
    result = run("export", "acme", "--out", str(out), "--since", "2023-11-14T22:13:25Z", "--until", str(T0 + 35),
                 "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"exported 8 history rows, 4 events and 1 alert of org acme to {out}\n"
    assert db_rows(out, "history") == expected_history("acme", *WINDOW)
    csv_out = tmp_path / "acme.csv"
    result = run("export", "acme", "--out", str(csv_out), "--data-dir", str(data_dir))
    assert result.stdout == f"exported 12 history rows of org acme to {csv_out}\n"


def one_line_error(result, expected: str) -> None:
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert expected in result.stderr


def test_errors_are_one_line_and_leave_no_file(data_dir, tmp_path):
    fx.fill(data_dir, sqlite_url(data_dir / "fleet.db"))
    d = ("--data-dir", str(data_dir))
    one_line_error(run("export", "initech", "--out", str(tmp_path / "x.db"), *d), "no such org 'initech'")
    one_line_error(run("export", "bad/org", "--out", str(tmp_path / "x.db"), *d), "invalid org 'bad/org'")
    one_line_error(run("export", "acme", "--out", str(tmp_path / "x.xlsx"), *d),
                   "its name must end in .db, .csv, .json")
    one_line_error(run("export", "acme", "--out", str(tmp_path / "x.db"), "--since", "soon", *d),
                   "--since must be Unix seconds or an ISO 8601 time")
    one_line_error(run("export", "acme", "--out", str(tmp_path / "x.db"), "--since", "20", "--until", "10", *d),
                   "--since (20) is after --until (10)")
    one_line_error(run("export", "acme", "--out", str(tmp_path / "missing" / "x.db"), *d), "no directory")
    one_line_error(run("export", "acme", "--out", str(data_dir / "fleet.db"), "--force", *d),
                   "is the database itself")
    one_line_error(run("export", "acme", "--out", str(tmp_path / "x.db"), "--since", "2023-11-14T22:13:20Z",
                       "--until", "1699999999.5", *d), "--since (1700000000) is after --until (1699999999.5)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet-data"]


def test_an_existing_file_is_kept_unless_forced(data_dir, tmp_path):
    fx.fill(data_dir, sqlite_url(data_dir / "fleet.db"))
    out = tmp_path / "acme.json"
    out.write_text("precious")
    one_line_error(run("export", "acme", "--out", str(out), "--data-dir", str(data_dir)),
                   f"{out} exists: use --force to replace it")
    assert out.read_text() == "precious"
    assert run("export", "acme", "--out", str(out), "--force", "--data-dir", str(data_dir)).exit_code == 0
    assert json.loads(out.read_text())["org"] == "acme"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acme.json", "fleet-data"]


def test_a_removed_org_whose_history_is_kept_can_still_be_exported(data_dir, tmp_path):
    database = sqlite_url(data_dir / "fleet.db")
    fx.fill(data_dir, database)
    assert run("org", "remove", "globex", "--data-dir", str(data_dir)).exit_code == 0
    export.export_org(database, "globex", tmp_path / "globex.csv")
    assert len((tmp_path / "globex.csv").read_text().splitlines()) == 1 + 12


def test_a_failure_midway_leaves_nothing(data_dir, tmp_path, monkeypatch):
    database = sqlite_url(data_dir / "fleet.db")
    fx.fill(data_dir, database)

    def broken(*_args, **_kwargs):
        raise export.ExportError("the database went away")
        yield  # a generator, like the one it replaces

    for suffix in (".db", ".json"):
        monkeypatch.setattr(export, "event_rows", broken)
        with pytest.raises(export.ExportError, match="went away"):
            export.export_org(database, "acme", tmp_path / f"acme{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet-data"]


def test_the_file_gets_the_usual_permissions(data_dir, tmp_path):
    fx.fill(data_dir, sqlite_url(data_dir / "fleet.db"))
    old = os.umask(0o022)
    try:
        export.export_org(sqlite_url(data_dir / "fleet.db"), "acme", tmp_path / "acme.db")
    finally:
        os.umask(old)
    assert (tmp_path / "acme.db").stat().st_mode & 0o777 == 0o644


def test_only_export_and_vacuum_import_sqlite_utils():
    # It costs ~11 MB of RSS: the parts' processes and the command line itself must not load it.
    code = ("import sys\nimport fleet.cli, fleet.commands, fleet.store.export, fleet.store.maintenance\n"
            "import fleet.collector.service, fleet.web.app, fleet.broker.server, fleet.up\n"
            "print('sqlite_utils' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert loaded.stdout.strip() == "False", loaded.stderr


def test_an_acknowledged_alert_is_exported_with_who_and_when(data_dir, tmp_path):
    from fleet.store.alerting import ack_alert
    from fleet.store.database import open_database

    database = sqlite_url(data_dir / "fleet.db")
    fx.fill(data_dir, database)
    with open_database(database) as db:
        (alert_id,) = db.query("SELECT id FROM alerts WHERE org = 'acme' AND state = 'firing'")[0]
        ack_alert(db, "acme", alert_id, "neo@example.com", now=T0 + 2000)
    out = tmp_path / "acked.json"
    export.export_org(database, "acme", out)
    acked = [(a["id"], a["acked_by"], a["acked_at"]) for a in json.loads(out.read_text())["alerts"] if a["acked_by"]]
    assert acked == [(alert_id, "neo@example.com", T0 + 2000)]
