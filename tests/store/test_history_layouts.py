"""One set of reports, read through the old (schema 4) layout and the compact one (schema 5): the same answers.

The reports go (a) into a schema-4 database the way the collector of that version stored them (the raw payload,
extra fields as a JSON object), read with that version's queries, then converted in place by migration 5; and
(b) through today's collector into a fresh database. The history API and ``fleet export`` must answer alike for
all three, and the inventory timeline must show what the old payloads held.
"""

from __future__ import annotations

import json
import logging
import random

import pytest

from fleet.collector import history
from fleet.collector.state import Tracker
from fleet.config import payloads
from fleet.config.settings import Settings
from fleet.config.topics import report_topic
from fleet.store import conversion
from fleet.store.database import SCHEMA_VERSION, open_database, schema_version
from fleet.store.export import Window, history_rows
from fleet.web.app import create_app
from tests import stores, v4_layout
from tests.helpers import bearer

pytestmark = pytest.mark.both_engines

T0 = 1_750_000_000.0
MACHINES = ("db-1", "web-1", "web-2")

# What schema 4's readers asked.
V4_POINTS = ("SELECT ts, session, seq, cpu_percent, memory_percent, disk_percent, load1, net_bytes_sent,"
             " net_bytes_recv, fields FROM reports WHERE org = ? AND machine_id = ? ORDER BY ts, session, seq")
V4_EXPORT = ("SELECT org, machine_id, session, seq, ts, received, cpu_percent, memory_percent, disk_percent, load1,"
             " net_bytes_sent, net_bytes_recv, fields FROM reports WHERE org = ? ORDER BY machine_id, ts, session, seq")
POINT_COLUMNS = ("ts", "session", "seq", "cpu_percent", "memory_percent", "disk_percent", "load1", "net_bytes_sent",
                 "net_bytes_recv")


def _reports() -> list[tuple[payloads.Report, float, str]]:
    """(report, received, raw JSON): values of every kind the columns keep, a replay, an inventory change."""
    rng = random.Random(20)
    out = []
    for m_index, machine in enumerate(MACHINES):
        for s_index, session in enumerate(("a", "b")):
            for seq in range(12):
                ts = T0 + m_index + s_index * 200 + seq * 10 + rng.random() / 3
                metrics = {
                    # a psutil-like one decimal, any float, an integer
                    "cpu_percent": (round(rng.random() * 100, 1), rng.random() * 100, seq)[seq % 3],
                    "load_avg": [round(rng.random() * 4, 2) if seq % 2 else rng.random() * 1e6, 0.1, 0.2],
                    "disks": [{"mount": "/", "total": 10, "used": 5, "percent": round(rng.random() * 100, 1)}],
                    "net": {"bytes_sent": 2**40 + seq, "bytes_recv": seq * 1.5}}
                if seq % 4:
                    metrics["memory"] = {"total": 8, "used": 3, "percent": 37.5 if seq % 2 else 1e-9}
                if session == "b":
                    metrics["custom"] = {"queue_depth": seq + 0.25, 'jobs{kind="mail"}': seq}
                    metrics["process_counts"] = {"nginx": seq % 3}
                version = "Debian 12" if (s_index, seq) < (1, 5) or machine == "db-1" else "Debian 13"
                system = {"hostname": machine, "os": "Linux", "os_version": version}
                raw = payloads.encode(payloads.build_report(machine, "0x1", session, seq, ts, metrics, system))
                out.append((payloads.parse_report(raw, report_topic("acme", machine)), ts + 0.5, raw.decode()))
    out.append(out[3])  # a replay: stored once
    return out


def _store_v4(database: str, reports: list) -> None:
    """A schema-4 database holding the reports as that version stored them."""
    with open_database(database, migrate=False) as db:
        v4_layout.create(db)
        v4_layout.store(db, reports)


def _v4_answers(database: str) -> tuple[dict[str, list[dict]], list[tuple]]:
    """History points per machine and export rows, by schema 4's queries."""
    with open_database(database, migrate=False) as db:
        points = {}
        for machine in MACHINES:
            points[machine] = []
            for row in db.query(V4_POINTS, ("acme", machine)):
                point = dict(zip(POINT_COLUMNS, row[:-1], strict=True))
                point.update(json.loads(row[-1]) if row[-1] else {})
                points[machine].append(point)
        return points, db.query(V4_EXPORT, ("acme",))


def _store_today(database: str, reports: list) -> None:
    with open_database(database) as db:
        batch = history.Batch(reports=[history.report_row(report, received) for report, received, _ in reports])
        history.write_batch(db, batch, T0)


def _machines(data_dir, database: str, reports: list) -> str:
    """The org and its machine rows (the API answers for known machines only); returns the reader key."""
    key = stores.add_org(data_dir, "acme", database).reader_key
    tracker = Tracker(3.0, 10.0, 10**9)
    for report, received, _ in reports:
        tracker.on_report(report, received)
    with open_database(database) as db:
        history.write_batch(db, history.Batch(machines=tracker.take_dirty()), T0)
    return key


def _api_answers(data_dir, database: str, key: str) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    client = create_app(Settings(data_dir=data_dir, database_url=database)).test_client()
    points, inventory = {}, {}
    for machine in MACHINES:
        body = client.get(f"/api/fleet/{machine}/history?since=0", headers=bearer(key)).get_json()
        points[machine] = body["points"]
        inventory[machine] = client.get(f"/api/fleet/{machine}/inventory", headers=bearer(key)).get_json()["data"]
    return points, inventory


def _export(database: str) -> list[tuple]:
    with open_database(database, readonly=True) as db:
        return list(history_rows(db, "acme", Window(), chunk_rows=5))


@pytest.fixture
def second_database(engine, tmp_path, request):
    """Another empty database on the test's engine."""
    if engine != "postgresql":
        yield stores.database_for(tmp_path / "new")
        return
    server = request.getfixturevalue("pg_server")
    url = server.database()
    yield url
    server.drop(url)


def test_old_and_new_layouts_answer_alike_and_old_history_converts_in_place(tmp_path, database_url, second_database,
                                                                           monkeypatch, caplog):
    reports = _reports()
    old_dir = tmp_path / "old"
    _store_v4(database_url, reports)
    old_points, old_export = _v4_answers(database_url)
    assert len(old_export) == len(reports) - 1

    # The conversion stops after two chunks (a crash), then goes on where it was at the next start.
    monkeypatch.setattr(conversion, "CHUNK_ROWS", 10)
    real_chunk, calls = conversion.convert_chunk, []

    def crash_after_two(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_chunk(*args)

    monkeypatch.setattr(conversion, "convert_chunk", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        open_database(database_url).close()
    with open_database(database_url, migrate=False) as db:
        assert schema_version(db) == SCHEMA_VERSION
        assert conversion.rows_left(db) == len(old_export) - 20
    monkeypatch.setattr(conversion, "convert_chunk", real_chunk)
    with caplog.at_level(logging.INFO, "fleet.store"):
        open_database(database_url).close()
    assert f"converting {len(old_export) - 20} stored reports" in caplog.text
    assert "converted 50 of 52 reports (96%)" in caplog.text
    with open_database(database_url, migrate=False) as db:
        assert not db.table_exists("reports_v4")

    key = _machines(old_dir, database_url, reports)
    converted_points, converted_inventory = _api_answers(old_dir, database_url, key)
    assert converted_points == old_points
    assert _export(database_url) == old_export

    # The same reports through today's collector, in a database of their own.
    new_dir, fresh = tmp_path / "new", second_database
    _store_today(fresh, reports)
    new_points, new_inventory = _api_answers(new_dir, fresh, _machines(new_dir, fresh, reports))
    assert new_points == old_points
    assert _export(fresh) == old_export
    assert new_inventory == converted_inventory

    # The inventory: the first report's, then each change, with what changed.
    assert [i["changed"] for i in new_inventory["db-1"]] == [
        {"hostname": [None, "db-1"], "os": [None, "Linux"], "os_version": [None, "Debian 12"]}]
    web = new_inventory["web-1"]
    assert [i["system"]["os_version"] for i in web] == ["Debian 12", "Debian 13"]
    assert web[1]["changed"] == {"os_version": ["Debian 12", "Debian 13"]}
    changed_by = next(r for r, _, _ in reports if r.machine_id == "web-1" and (r.session, r.seq) == ("b", 5))
    assert web[1]["ts"] == changed_by.ts
