"""The collector's writes on a real database, SQLite and PostgreSQL: batches, idempotent replays, retention."""

import json

import pytest

from fleet.collector import history
from fleet.collector.state import Tracker
from fleet.store.database import DatabaseBusy, open_database
from fleet.store.samples import REPORT_VALUES
from tests.collector.collector_builders import T0, ping, report
from tests.dbhelpers import insert_reports, sample, write_lock

pytestmark = pytest.mark.both_engines


def _sample(org, machine_id, session, seq, ts, received, cpu, memory, disk, load1, sent, recv, fields=None):
    return sample(org, machine_id, session, seq, ts, received, cpu, memory, disk, load1, sent, recv,
                  json.loads(fields) if fields else None)


def _insert_reports(db, rows):
    insert_reports(db, [_sample(*row) for row in rows])


def test_batch_stores_reports_machines_events_and_counters(db):
    t = Tracker(3.0, 10.0, 3600)
    batch = history.Batch()
    for seq in range(3):
        r = report(seq=seq, ts=T0 + seq)
        batch.events += t.on_report(r, T0 + seq + 0.1)
        batch.reports.append(history.report_row(r, T0 + seq + 0.1))
    batch.machines = t.take_dirty()
    batch.drops = {"not_json": 2}
    batch.expired = {"acme": 1}
    assert history.write_batch(db, batch, T0 + 5) == 3
    # A replay of the same (org, machine, session, seq) is ignored; counters add up.
    again = history.Batch(reports=batch.reports[:2], drops={"not_json": 1, "rate_limited": 4})
    assert history.write_batch(db, again, T0 + 6) == 0
    assert db.query_one("SELECT count(*), min(seq), max(seq) FROM reports") == (3, 0, 2)
    row = db.query_one("SELECT status, session, os, metrics, last_seen FROM machines")
    assert row[:3] == ("online", "s1", "Linux")
    assert json.loads(row[3])["cpu_percent"] == 5.0
    assert row[4] == T0 + 2.1
    assert db.query("SELECT old_status, new_status, reason FROM events") == [(None, "online", "report")]
    assert dict(db.query("SELECT reason, count FROM drops")) == {"not_json": 3, "rate_limited": 4}
    assert db.query_one("SELECT expired FROM org_stats WHERE org='acme'") == (1,)


def test_machine_rows_are_updated_in_place_and_written_again_when_missing(db):
    t = Tracker(3.0, 10.0, 3600)
    t.on_report(report(seq=0, ts=T0), T0)
    history.write_batch(db, history.Batch(machines=t.take_dirty()), T0)
    machine = t.get("acme", "web-1")
    assert machine is not None
    assert machine.stored  # an UPDATE will do from now on
    t.on_report(report(seq=1, ts=T0 + 1), T0 + 1)
    history.write_batch(db, history.Batch(machines=t.take_dirty()), T0 + 1)
    assert db.query("SELECT last_seen, first_seen FROM machines") == [(T0 + 1, T0)]
    # Someone else deleted the row (or the batch that wrote it was rolled back): it is written again, whole.
    db.execute("DELETE FROM machines")
    t.on_report(report(seq=2, ts=T0 + 2), T0 + 2)
    history.write_batch(db, history.Batch(machines=t.take_dirty()), T0 + 2)
    assert db.query("SELECT machine_id, last_seen, first_seen FROM machines") == [("web-1", T0 + 2, T0)]
    # A restarted collector's machines come from their rows, so they are updated in place too.
    restarted = Tracker(3.0, 10.0, 3600)
    restarted.load(history.load_machines(db, None), T0 + 3)
    assert restarted.get("acme", "web-1").stored


def test_report_row_extracts_chart_columns():
    r = report()
    data = dict(r.data)
    data["metrics"] = {"cpu_percent": 12.5, "memory": {"percent": 40.0}, "load_avg": [0.5, 0.4, 0.3],
                       "disks": [{"mount": "/data", "percent": 90.0}, {"mount": "/", "percent": 30.0}],
                       "net": {"bytes_sent": 10, "bytes_recv": 20}}
    from fleet.config import payloads
    r = payloads.parse_report(payloads.encode(data), "fleet/acme/web-1/report")
    row = history.report_row(r, T0)
    # disk_percent: the fullest disk, not the root one
    assert (row.cpu_percent, row.memory_percent, row.disk_percent, row.load1, row.net_bytes_sent,
            row.net_bytes_recv) == (12.5, 40.0, 90.0, 0.5, 10, 20)
    empty = history.report_row(payloads.parse_report(payloads.encode({**data, "metrics": {}}),
                                                     "fleet/acme/web-1/report"), T0)
    assert (empty.cpu_percent, empty.memory_percent, empty.disk_percent, empty.load1, empty.net_bytes_sent,
            empty.net_bytes_recv) == (None,) * 6


def test_evicted_machine_row_is_deleted(db):
    t = Tracker(3.0, 10.0, ttl_seconds=100)
    t.on_ping(ping(), T0)
    history.write_batch(db, history.Batch(machines=t.take_dirty()), T0)
    transitions, evicted = t.tick(T0 + 200)
    history.write_batch(db, history.Batch(evicted=evicted, events=transitions, expired={"acme": 1}), T0 + 200)
    assert db.query_one("SELECT count(*) FROM machines") == (0,)
    assert db.query("SELECT new_status, reason FROM events") == [("evicted", "ttl")]


def test_retention_rolls_raw_history_into_minutes_and_bounds_everything(db):
    day = 86400.0
    now = T0 + 100 * day
    rows = []
    # 30 days of history, one report every 20 s for the first two hours of each day.
    for d in range(30):
        base = now - d * day - 7200
        for i in range(0, 7200, 20):
            ts = base + i
            rows.append(("acme", "m", f"s{d}", i, ts, ts, float(i % 100), 50.0, 10.0, 0.5, i, 2 * i))
    _insert_reports(db, rows)
    db.execute("INSERT INTO events(org, machine_id, ts, new_status) VALUES ('acme', 'm', ?, 'online')",
               (now - 40 * day,))
    for age in (40, 1):
        db.execute("INSERT INTO audit_log(org, ts, actor, action, target) VALUES ('acme', ?, 'cli:root', 'org.add',"
                   " 'acme')", (now - age * day,))
    result = history.apply_retention(db, now, raw_days=7, rollup_days=20)
    assert result.audit_deleted == 1
    assert db.query_one("SELECT count(*) FROM audit_log") == (1,)  # the day-old entry stays
    oldest_raw = db.query_one("SELECT min(received) FROM reports")[0]
    assert oldest_raw >= now - 7 * day
    assert result.reports_rolled_up == sum(1 for r in rows if r[5] < now - 7 * day)
    # Rollups: one per minute, 3 samples each, only for days 7..19 (older ones past rollup_days deleted).
    minutes, samples, oldest_minute = db.query_one("SELECT count(*), sum(samples), min(minute) FROM rollups")
    assert oldest_minute >= now - 20 * day
    assert samples == 3 * minutes
    assert minutes > 0
    first = db.query_one("SELECT cpu_percent, net_bytes_sent, minute FROM rollups ORDER BY minute LIMIT 1")
    assert first[0] is not None
    assert first[1] is not None
    assert first[2] % 60 == 0
    assert db.query_one("SELECT count(*) FROM events") == (0,)
    # Idempotent: a second run finds nothing more to do.
    assert history.apply_retention(db, now, 7, 20) == history.RetentionResult(0, 0, 0)
    # The sessions no report names any more are gone; the machine and its sessions of the last 7 days stay.
    assert db.query_one("SELECT count(*) FROM report_sessions") == (7,)
    assert db.query_one("SELECT count(*) FROM report_machines") == (1,)


def test_retention_merges_a_minute_split_across_runs(db):
    # 59.9 s into a minute: a bucket that rounds instead of truncating would land in the next minute.
    minute = 60.0 * 1000
    _insert_reports(db, [
        ("a", "m", "s", 0, minute + 1, minute + 1, 10.0, None, None, None, 5, 5, '{"custom.q":1}'),
        ("a", "m", "s", 1, minute + 59.9, minute + 2, 20.0, None, None, None, 7, 7, '{"custom.q":4,"process.x":2}'),
    ])
    history.apply_retention(db, minute + 1.5 + 86400, raw_days=1, rollup_days=3650)
    history.apply_retention(db, minute + 3 + 86400, raw_days=1, rollup_days=3650)
    assert db.query("SELECT minute, samples, cpu_percent, net_bytes_sent FROM rollups") == [(minute, 2, 15.0, 7)]
    # Extra fields keep a sum and a sample count each, so the two runs merge exactly.
    fields = db.query_one("SELECT fields FROM rollups")[0]
    assert json.loads(fields) == {"custom.q": [5.0, 2], "process.x": [2.0, 1]}


def test_retention_runs_once_when_another_collector_holds_its_lock(db, database_url):
    _insert_reports(db, [("a", "m", "s", 0, 60.0, 60.0, 10.0, None, None, None, 5, 5)])
    with open_database(database_url) as other, other.transaction():
        assert other.try_lock("retention")
        if db.engine == "postgresql":  # SQLite's write lock makes the second run wait instead
            assert history.apply_retention(db, 86400 * 10, 1, 3650) == history.RetentionResult(0, 0, 0)
    assert history.apply_retention(db, 86400 * 10, 1, 3650).reports_rolled_up == 1
    assert db.query("SELECT samples FROM rollups") == [(1,)]


def test_write_batch_fails_cleanly_while_another_writer_holds_the_lock(database_url):
    db = open_database(database_url, busy_timeout_ms=50)
    r = report()
    batch = history.Batch(reports=[history.report_row(r, T0)], machines=[], drops={"not_json": 1})
    with write_lock(database_url):
        with pytest.raises(DatabaseBusy):
            history.write_batch(db, batch, T0)
    assert history.write_batch(db, batch, T0) == 1  # the same batch, retried, is stored once
    assert db.query("SELECT reason, count FROM drops") == [("not_json", 1)]
    db.close()


def test_reports_are_stored_exactly_types_included(db):
    """What a validated report becomes is read back unchanged: floats to the last bit, 63-bit ints, any text."""
    from fleet.config import payloads

    rows = []
    for seq, metrics in enumerate([
        {"cpu_percent": 1e-07, "memory": {"percent": 33.3}, "load_avg": [1e16],
         "disks": [{"mount": "/", "percent": 5}], "net": {"bytes_sent": 2**62, "bytes_recv": 0}},
        {},
        {"cpu_percent": 0, "load_avg": [], "disks": [], "net": {"bytes_sent": 1.5, "bytes_recv": 1e300}},
    ]):
        data = payloads.build_report("web-1", 'h"w\\', "s-1_x", seq, 1764000000.123456789, metrics,
                                     {"os": "Lin\u00fcx \U0001F600", "hostname": 'a"b'})
        raw = payloads.encode(data)
        r = payloads.parse_report(raw, "fleet/acme/web-1/report")
        rows.append(history.report_row(r, 1764000001.5))
    # float byte counters: truncated to an integer, or dropped past 64 bits
    assert (rows[2].net_bytes_sent, rows[2].net_bytes_recv) == (1, None)
    assert history.write_batch(db, history.Batch(reports=rows), T0) == 3
    got = db.query(f"SELECT {', '.join(REPORT_VALUES)} FROM reports ORDER BY seq")
    assert got == [tuple(getattr(row, name) for name in REPORT_VALUES) for row in rows]
    # REAL columns read back as floats (disk_percent was sent as 5), INTEGER ones as ints, on both engines.
    assert [type(v) for v in got[0]] == [str, str, str, int] + [float] * 6 + [int, int]
    # The inventory is kept once (it did not change), exactly as sent.
    assert [json.loads(row[0]) for row in db.query("SELECT system FROM inventory")] == [rows[0].system]


def test_a_batch_whose_commit_was_cut_off_is_not_written_twice(db, monkeypatch):
    """The connection drops after COMMIT reached the server: the writer finds its marker and moves on."""
    from fleet.collector.handoff import Handoff
    from fleet.collector.intake import DropCounter
    from fleet.collector.shared import LinkState, ServedOrgs, WriteCounts
    from fleet.collector.writer import Writer, WriterPeers
    from fleet.config.settings import Settings
    from fleet.store.database import DatabaseBusy

    peers = WriterPeers(Handoff(10, 5), None, LinkState(), ServedOrgs(()), WriteCounts(), DropCounter(),
                        stats=lambda: None, wake_delivery=lambda: None)
    writer = Writer(Settings(), "c1", db, Tracker(3.0, 10.0, 3600), None, peers)
    real = history.write_batch
    calls = []

    def commit_then_fail(*args, **kwargs):
        calls.append(1)
        inserted = real(*args, **kwargs)
        if len(calls) == 1:
            raise DatabaseBusy("server closed the connection unexpectedly")
        return inserted

    monkeypatch.setattr(history, "write_batch", commit_then_fail)
    t = Tracker(3.0, 10.0, 3600)
    r = report()
    batch = history.Batch(reports=[history.report_row(r, T0)], events=t.on_report(r, T0), drops={"not_json": 1})
    assert writer.write(batch, final=False)
    assert db.query("SELECT new_status FROM events") == [("online",)]
    assert db.query("SELECT count FROM drops") == [(1,)]
    assert len(calls) == 1


@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65, 127, 200])
def test_batches_of_any_size_store_every_row_once(db, n):
    """SQLite gets rows in multi-row statements of 64, 32, ... 1 rows; none is lost or doubled."""
    from fleet.collector.state import Machine

    rows = [_sample("a", f"m{i % 7}", "s", i, 1.0 + i, 1.0 + i, 1.0, None, None, None, None, None)
            for i in range(n)]
    machines = [Machine(org="a", machine_id=f"m{i}", status="online", session="s", metrics={"cpu_percent": i})
                for i in range(n)]
    assert history.write_batch(db, history.Batch(reports=rows, machines=machines), 5.0) == n
    assert history.write_batch(db, history.Batch(reports=rows[:3]), 5.5) == 0  # replays
    assert db.query("SELECT count(*), count(DISTINCT seq) FROM reports") == [(n, n)]
    machines[-1].metrics = {"cpu_percent": -1}
    history.write_batch(db, history.Batch(machines=machines), 6.0)
    assert db.query("SELECT count(*), max(updated) FROM machines") == [(n, 6.0)]
    assert db.query("SELECT metrics FROM machines WHERE machine_id = ?", (f"m{n - 1}",)) == [('{"cpu_percent":-1}',)]
