"""The collector's SQLite writes on a real database file: batches, idempotent replays, retention."""

import json
import sqlite3

import pytest

from fleet.collector import store
from fleet.collector.state import Tracker
from fleet.config.database import open_db
from tests.collector.collector_builders import T0, ping, report


def _db(tmp_path):
    return open_db(tmp_path / "fleet.db")


def test_batch_stores_reports_machines_events_and_counters(tmp_path):
    db = _db(tmp_path)
    t = Tracker(3.0, 10.0, 3600)
    batch = store.Batch()
    for seq in range(3):
        r = report(seq=seq, ts=T0 + seq)
        batch.events += t.on_report(r, T0 + seq + 0.1)
        batch.reports.append(store.report_row(r, T0 + seq + 0.1, "{}"))
    batch.machines = t.take_dirty()
    batch.drops = {"not_json": 2}
    batch.expired = {"acme": 1}
    assert store.write_batch(db, batch, T0 + 5) == 3
    # A replay of the same (org, machine, session, seq) is ignored; counters add up.
    again = store.Batch(reports=batch.reports[:2], drops={"not_json": 1, "rate_limited": 4})
    assert store.write_batch(db, again, T0 + 6) == 0
    conn = db.conn
    assert conn.execute("SELECT count(*), min(seq), max(seq) FROM reports").fetchone() == (3, 0, 2)
    row = conn.execute("SELECT status, session, os, metrics, last_seen FROM machines").fetchone()
    assert row[:3] == ("online", "s1", "Linux")
    assert json.loads(row[3])["cpu_percent"] == 5.0
    assert conn.execute("SELECT old_status, new_status, reason FROM events").fetchall() == [(None, "online", "report")]
    assert dict(conn.execute("SELECT reason, count FROM drops")) == {"not_json": 3, "rate_limited": 4}
    assert conn.execute("SELECT expired FROM org_stats WHERE org='acme'").fetchone() == (1,)


def test_report_row_extracts_chart_columns():
    r = report()
    data = dict(r.data)
    data["metrics"] = {"cpu_percent": 12.5, "memory": {"percent": 40.0}, "load_avg": [0.5, 0.4, 0.3],
                       "disks": [{"mount": "/data", "percent": 90.0}, {"mount": "/", "percent": 30.0}],
                       "net": {"bytes_sent": 10, "bytes_recv": 20}}
    from fleet.config import payloads
    r = payloads.parse_report(payloads.encode(data), "fleet/acme/web-1/report")
    row = store.report_row(r, T0, "x")
    assert row[6:12] == (12.5, 40.0, 30.0, 0.5, 10, 20)
    empty = payloads.parse_report(payloads.encode({**data, "metrics": {}}), "fleet/acme/web-1/report")
    assert store.report_row(empty, T0, "x")[6:12] == (None,) * 6


def test_evicted_machine_row_is_deleted(tmp_path):
    db = _db(tmp_path)
    t = Tracker(3.0, 10.0, ttl_seconds=100)
    t.on_ping(ping(), T0)
    store.write_batch(db, store.Batch(machines=t.take_dirty()), T0)
    transitions, evicted = t.tick(T0 + 200)
    store.write_batch(db, store.Batch(evicted=evicted, events=transitions, expired={"acme": 1}), T0 + 200)
    assert db.conn.execute("SELECT count(*) FROM machines").fetchone() == (0,)
    assert db.conn.execute("SELECT new_status, reason FROM events").fetchall() == [("evicted", "ttl")]


def test_retention_rolls_raw_history_into_minutes_and_bounds_everything(tmp_path):
    db = _db(tmp_path)
    day = 86400.0
    now = T0 + 100 * day
    rows = []
    # 30 days of history, one report every 20 s for the first two hours of each day.
    for d in range(30):
        base = now - d * day - 7200
        for i in range(0, 7200, 20):
            ts = base + i
            rows.append(("acme", "m", f"s{d}", i, ts, ts, float(i % 100), 50.0, 10.0, 0.5, i, 2 * i, "{}", None))
    db.conn.executemany(store._INSERT_REPORT, rows)  # noqa: SLF001 - the collector's own insert
    db.conn.commit()
    db.conn.execute("INSERT INTO events(org, machine_id, ts, new_status) VALUES ('acme', 'm', ?, 'online')",
                    (now - 40 * day,))
    db.conn.commit()
    result = store.apply_retention(db, now, raw_days=7, rollup_days=20)
    conn = db.conn
    oldest_raw = conn.execute("SELECT min(received) FROM reports").fetchone()[0]
    assert oldest_raw >= now - 7 * day
    assert result.reports_rolled_up == sum(1 for r in rows if r[5] < now - 7 * day)
    # Rollups: one per minute, 3 samples each, only for days 7..19 (older ones past rollup_days deleted).
    minutes, samples, oldest_minute = conn.execute("SELECT count(*), sum(samples), min(minute) FROM rollups").fetchone()
    assert oldest_minute >= now - 20 * day
    assert samples == 3 * minutes
    assert minutes > 0
    first = conn.execute("SELECT cpu_percent, net_bytes_sent FROM rollups ORDER BY minute LIMIT 1").fetchone()
    assert first[0] is not None
    assert first[1] is not None
    assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)
    # Idempotent: a second run finds nothing more to do.
    assert store.apply_retention(db, now, 7, 20) == store.RetentionResult(0, 0, 0)


def test_retention_merges_a_minute_split_across_runs(tmp_path):
    db = _db(tmp_path)
    minute = 60.0 * 1000
    db.conn.executemany(store._INSERT_REPORT, [  # noqa: SLF001 - the collector's own insert
        ("a", "m", "s", 0, minute + 1, minute + 1, 10.0, None, None, None, 5, 5, "{}", '{"custom.q":1}'),
        ("a", "m", "s", 1, minute + 2, minute + 2, 20.0, None, None, None, 7, 7, "{}", '{"custom.q":4,"process.x":2}'),
    ])
    db.conn.commit()
    store.apply_retention(db, minute + 1.5 + 86400, raw_days=1, rollup_days=3650)
    store.apply_retention(db, minute + 3 + 86400, raw_days=1, rollup_days=3650)
    assert db.conn.execute("SELECT samples, cpu_percent, net_bytes_sent FROM rollups").fetchall() == [(2, 15.0, 7)]
    # Extra fields keep a sum and a sample count each, so the two runs merge exactly.
    fields = db.conn.execute("SELECT fields FROM rollups").fetchone()[0]
    assert json.loads(fields) == {"custom.q": [5.0, 2], "process.x": [2.0, 1]}


def test_write_batch_fails_cleanly_while_another_writer_holds_the_lock(tmp_path):
    db = _db(tmp_path)
    db.conn.execute("PRAGMA busy_timeout=50")
    other = sqlite3.connect(tmp_path / "fleet.db")
    other.execute("BEGIN IMMEDIATE")
    r = report()
    batch = store.Batch(reports=[store.report_row(r, T0, "{}")])
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.write_batch(db, batch, T0)
    other.rollback()
    assert store.write_batch(db, batch, T0) == 1  # the same batch, retried, is stored once


def test_json_batch_insert_stores_exactly_the_validated_values(tmp_path):
    """The one-statement JSON insert and plain executemany give identical rows, payload included."""
    import json as _json

    from fleet.config import payloads

    db_a = open_db(tmp_path / "a.db")
    db_b = open_db(tmp_path / "b.db")
    rows = []
    for seq, metrics in enumerate([
        {"cpu_percent": 1e-07, "memory": {"percent": 33.3}, "load_avg": [1e16],
         "disks": [{"mount": "/", "percent": 5}], "net": {"bytes_sent": 2**62, "bytes_recv": 0}},
        {},
        {"cpu_percent": 0, "load_avg": [], "disks": [], "net": {}},
    ]):
        data = payloads.build_report("web-1", 'h"w\\', "s-1_x", seq, 1764000000.123456789, metrics,
                                     {"os": "Lin\u00fcx \U0001F600", "hostname": 'a"b'})
        raw = payloads.encode(data)
        r = payloads.parse_report(raw, "fleet/acme/web-1/report")
        rows.append(store.report_row(r, 1764000001.5, raw.decode()))
    store.write_batch(db_a, store.Batch(reports=rows), T0)
    with db_b.conn:
        db_b.conn.executemany(store._INSERT_REPORT, rows)  # noqa: SLF001 - the collector's own insert
    sql = "SELECT org, machine_id, session, seq, ts, received, cpu_percent, memory_percent, disk_percent, load1," \
          " net_bytes_sent, net_bytes_recv, fields, payload FROM reports ORDER BY seq"
    got, want = db_a.conn.execute(sql).fetchall(), db_b.conn.execute(sql).fetchall()
    assert [row[:-1] for row in got] == [row[:-1] for row in want]
    assert [_json.loads(row[-1]) for row in got] == [_json.loads(row[-1]) for row in want]
    assert [type(v) for v in got[0][:-1]] == [type(v) for v in want[0][:-1]]
