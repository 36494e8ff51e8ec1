"""Custom series, process counts and lost reports in the API: machine object, /history (raw, rolled up), /metrics."""

from __future__ import annotations

import json
import time

import pytest

from fleet.collector import history
from tests.dbhelpers import insert_reports, sample
from tests.helpers import bearer

pytestmark = pytest.mark.both_engines

METRICS = {"cpu_percent": 5.0, "custom": {"queue_depth": 2.0, 'jobs{kind="a\\"b"}': 1.0},
           "process_counts": {"nginx": 0, "re:gunicorn .*": 3},
           "processes": [{"name": "nginx", "pid": 9, "cpu_percent": 1.0, "memory_percent": 0.1}]}


def add_machine(fleet, lost=0, late=0):
    fleet.machine("acme", "app-1")
    db = fleet.db()
    db.execute("UPDATE machines SET metrics = ?, lost = ?, late = ? WHERE machine_id = 'app-1'",
               (json.dumps(METRICS), lost, late))
    db.execute("INSERT INTO org_stats(org, lost) VALUES ('acme', ?) ON CONFLICT(org) DO UPDATE SET lost = ?",
               (lost + 7, lost + 7))
    return db


def test_the_machine_object_carries_the_new_metrics_and_lost_counts(client, fleet):
    add_machine(fleet, lost=4, late=1)
    body = client.get("/api/fleet/app-1", headers=bearer(fleet.acme.reader_key)).get_json()
    assert body["metrics"]["custom"] == METRICS["custom"]
    assert body["metrics"]["process_counts"] == METRICS["process_counts"]
    assert body["metrics"]["processes"] == METRICS["processes"]
    assert (body["lost"], body["late"]) == (4, 1)
    listed = client.get("/api/fleet", headers=bearer(fleet.acme.reader_key)).get_json()["data"]
    assert [(m["machine_id"], m["lost"]) for m in listed] == [("app-1", 4)]


def test_history_points_carry_custom_and_process_fields_raw_and_rolled_up(client, fleet):
    db = add_machine(fleet)
    now = time.time()
    old = (now - 3 * 86400) // 60 * 60 + 5  # three days ago, 5 s into a minute: both old rows roll up into it
    rows = []
    for i, (ts, depth) in enumerate([(old, 1.0), (old + 10, 3.0), (now - 60, 5.0), (now - 50, 6.0)]):
        names, values = history.report_fields({"custom": {"queue_depth": depth}, "process_counts": {"nginx": i % 2}})
        rows.append(sample("acme", "app-1", "s", i, ts, cpu_percent=1.0, fields=dict(zip(names, values, strict=True))))
    rows.append(sample("acme", "app-1", "s", 9, now - 40, cpu_percent=1.0))
    insert_reports(db, rows)
    history.apply_retention(db, now, raw_days=1, rollup_days=30)
    since = now - 4 * 86400
    points = client.get(f"/api/fleet/app-1/history?since={since}", headers=bearer(fleet.acme.reader_key)).get_json()
    points = points["points"]
    assert [p.get("custom.queue_depth") for p in points] == [2.0, 5.0, 6.0, None]  # a minute's mean, then raw
    assert [p.get("process.nginx") for p in points] == [0.5, 0, 1, None]
    assert points[0]["session"] is None  # a rollup


def test_metrics_export_custom_series_process_counts_and_lost(client, fleet):
    add_machine(fleet, lost=4, late=1)
    text = client.get("/metrics", headers=bearer(fleet.acme.reader_key)).get_data(as_text=True)
    assert 'fleet_machine_custom{org="acme",machine_id="app-1",series="queue_depth"} 2.0' in text
    assert 'fleet_machine_custom{org="acme",machine_id="app-1",series="jobs{kind=\\"a\\\\\\"b\\"}"} 1.0' in text
    assert 'fleet_machine_process_count{org="acme",machine_id="app-1",name="nginx"} 0.0' in text
    assert 'fleet_machine_process_count{org="acme",machine_id="app-1",name="re:gunicorn .*"} 3.0' in text
    assert 'fleet_reports_lost_total{org="acme",machine_id="app-1"} 4.0' in text
    assert 'fleet_reports_late_total{org="acme",machine_id="app-1"} 1.0' in text
    assert 'fleet_org_reports_lost_total{org="acme"} 11.0' in text
    other = client.get("/metrics", headers=bearer(fleet.globex.reader_key)).get_data(as_text=True)
    assert "app-1" not in other
