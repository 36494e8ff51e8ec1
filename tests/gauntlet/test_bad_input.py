"""Gauntlet, bad input: a broken or hostile agent cannot hurt the collector, its org, or anyone else.

Every class of bad message goes through the real broker to a running collector. Each one is dropped
and counted under its reason, nothing bad is stored, and a good report sent afterwards is stored.
"""

from __future__ import annotations

import json
import time

import pytest

from fleet.collector import service
from fleet.config import payloads
from fleet.config.topics import report_topic
from tests.dbhelpers import rows
from tests.helpers import close, connect_client, wait_for

both_engines = pytest.mark.both_engines  # what reaches the database runs on SQLite and PostgreSQL

TOPIC = report_topic("acme", "m1")


def good(seq: int, machine: str = "m1", session: str = "s1", ts: float | None = None, **overrides) -> dict:
    body = payloads.build_report(machine, "0xhw", session, seq, time.time() if ts is None else ts,
                                 {"cpu_percent": 5.0}, {"os": "Linux", "hostname": machine})
    body.update(overrides)
    return body


def bad(**fields) -> bytes:
    """A valid report with some fields replaced."""
    return raw({**good(0), **fields})


def raw(obj) -> bytes:
    return json.dumps(obj).encode()


BAD = [
    ("invalid JSON", b"{not json", payloads.NOT_JSON),
    ("empty payload", b"", payloads.NOT_JSON),
    ("not an object", b"[1, 2, 3]", payloads.NOT_OBJECT),
    ("wrong type: seq as string", bad(seq="7"), payloads.BAD_FIELD),
    ("wrong type: metrics as list", bad(metrics=[1]), payloads.BAD_FIELD),
    ("NaN", raw(good(0)).replace(b'"cpu_percent": 5.0', b'"cpu_percent": NaN'), payloads.NOT_JSON),
    ("Infinity", raw(good(0)).replace(b'"cpu_percent": 5.0', b'"cpu_percent": Infinity'), payloads.NOT_JSON),
    ("huge number", bad(seq=10**30), payloads.BAD_FIELD),
    ("invalid UTF-8", b'{"v": 1, "machine_id": "m1\xff\xfe"}', payloads.NOT_UTF8),
    ("deep nesting", b'{"metrics": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", payloads.NOT_JSON),
    ("machine id with / + # $", bad(machine_id="m/+#$"), payloads.BAD_FIELD),
    ("machine id of 65 characters", bad(machine_id="m" * 65), payloads.BAD_FIELD),
    ("topic/payload machine mismatch", bad(machine_id="m2"), payloads.MACHINE_MISMATCH),
    ("session with bad characters", bad(session="../../etc"), payloads.BAD_FIELD),
    ("lone surrogate", bad(system={"hostname": "\ud800"}), payloads.BAD_FIELD),
    ("NUL in the hostname", bad(system={"hostname": "web\u00001"}), payloads.BAD_FIELD),
    ("NUL in the hardware id", bad(hardware_id="0x\u0000"), payloads.BAD_FIELD),
    ("NUL in an extra metric", bad(metrics={"cpu_percent": 1.0, "note": ["a\u0000"]}), payloads.BAD_FIELD),
    ("NUL in a key", bad(system={"x\u0000": 1}), payloads.BAD_FIELD),
]


def stored(broker, sql, *args):
    return rows(broker.settings.database, sql, *args)


@pytest.fixture
def collector(broker):
    running = service.start(broker.settings.replace(broker_url=broker.url, batch_interval_s=0.05))
    assert running.wait_subscribed(10)
    yield running
    running.stop()


@both_engines
def test_every_class_of_bad_report_is_counted_and_harmless(broker, acme, collector):
    agent = connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-m1")
    for _name, payload, _reason in BAD:
        agent.publish(TOPIC, payload, qos=1).wait_for_publish(5)
    agent.publish(TOPIC, b"x" * (payloads.MAX_PAYLOAD_BYTES + 1), qos=1).wait_for_publish(5)  # refused by the broker
    agent.publish(TOPIC, payloads.encode(good(1)), qos=1).wait_for_publish(5)
    wait_for(lambda: stored(broker, "SELECT seq FROM reports WHERE machine_id='m1'") == [(1,)],
             timeout=10, message="the good report stored after the bad ones")
    expected: dict[str, int] = {}
    for _name, _payload, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert collector.stats().dropped == expected
    assert broker.stats()["dropped_too_large"] == 1
    wait_for(lambda: dict(stored(broker, "SELECT reason, count FROM drops")) == expected, timeout=10,
             message="drop counters persisted for /metrics")
    assert agent.is_connected()
    close(agent)


@both_engines
def test_odd_but_valid_reports_are_stored_and_served_alike(broker, acme, collector):
    """Extremes the contract allows: each is stored as sent, and the API serves the machine afterwards."""
    from fleet.web.app import create_app
    from tests.helpers import bearer

    agent = connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-m1")
    metrics = {"cpu_percent": 1e308, "load_avg": [-1e-300], "memory": {"total": 2**63 - 1, "percent": 0},
               "net": {"bytes_sent": 1e300, "bytes_recv": 12.75}, "extra": "not a NUL: \\u0000", "custom": {"x": 1}}
    system = {"hostname": "m1", "os": "Lin\u00fcx \U0001f600", "notes": "\\'\";-- %s ?", "list": [None, True]}
    reports = [good(0, ts=0.0), good(2**63 - 1, ts=1e10, metrics=metrics, system=system)]  # the odd one is latest
    for report in reports:
        agent.publish(TOPIC, json.dumps(report).encode(), qos=1).wait_for_publish(5)
    wait_for(lambda: len(stored(broker, "SELECT seq FROM reports WHERE machine_id='m1'")) == 2, timeout=10,
             message="both reports stored")
    assert stored(broker, "SELECT seq, ts, cpu_percent, net_bytes_sent, net_bytes_recv FROM reports ORDER BY seq") == [
        (0, 0.0, 5.0, None, None), (2**63 - 1, 1e10, 1e308, None, 12)]
    assert collector.stats().dropped == {}
    client = create_app(broker.settings).test_client()
    machine = wait_for(lambda: client.get("/api/fleet/m1", headers=bearer(acme.reader_key)).get_json(), timeout=10)
    assert (machine["system"], machine["metrics"]) == (system, metrics)
    for path in ("/api/fleet?q=m1&sort=cpu", "/api/fleet/m1/history?since=0", "/metrics"):
        assert client.get(path, headers=bearer(acme.reader_key)).status_code == 200, path
    close(agent)


@both_engines
def test_replays_and_stale_sessions_change_nothing(broker, acme, collector):
    agent = connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-m1")
    for seq in range(3):
        agent.publish(TOPIC, payloads.encode(good(seq, session="new")), qos=1).wait_for_publish(5)
    for seq in range(3):  # the same reports again (an agent replaying its outbox)
        agent.publish(TOPIC, payloads.encode(good(seq, session="new")), qos=1).wait_for_publish(5)
    old = payloads.build_ping("m1", "0xhw", "old", "offline", 10, reason="lost")  # a late will of an old session
    agent.publish("fleet/acme/m1/ping", payloads.encode(old), qos=1, retain=True).wait_for_publish(5)
    agent.publish(TOPIC, payloads.encode(good(3, session="new")), qos=1).wait_for_publish(5)
    wait_for(lambda: len(stored(broker, "SELECT seq FROM reports WHERE machine_id='m1'")) == 4, timeout=10)
    seqs = stored(broker, "SELECT seq FROM reports WHERE machine_id='m1' ORDER BY seq")
    assert seqs == [(0,), (1,), (2,), (3,)]
    assert stored(broker, "SELECT status, session FROM machines WHERE machine_id='m1'") == [("online", "new")]
    close(agent)


@both_engines
def test_clock_ten_years_off_is_flagged_not_fatal(broker, acme, collector):
    agent = connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-m1")
    ten_years = 10 * 365 * 86400
    agent.publish(TOPIC, payloads.encode(good(0, ts=time.time() - ten_years)), qos=1).wait_for_publish(5)
    row = wait_for(lambda: stored(broker, "SELECT status, clock_offset_s FROM machines WHERE machine_id='m1'"),
                   timeout=10)
    status, offset = row[0]
    assert status == "online"
    assert offset == pytest.approx(ten_years, abs=60)
    close(agent)


@both_engines
@pytest.mark.slow
def test_a_flooding_agent_is_rate_limited_and_others_are_unaffected(broker, acme, collector):
    flooder = connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-flood")
    calm = connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-calm")
    flood_topic = report_topic("acme", "flood")
    infos = [flooder.publish(flood_topic, payloads.encode(good(i, machine="flood")), qos=0) for i in range(5000)]
    calm.publish(report_topic("acme", "calm"), payloads.encode(good(0, machine="calm")), qos=1).wait_for_publish(5)
    wait_for(lambda: stored(broker, "SELECT count(*) FROM reports WHERE machine_id='calm'") == [(1,)],
             timeout=20, message="the calm agent's report stored despite the flood")
    wait_for(lambda: collector.stats().dropped.get("rate_limited", 0) > 0, timeout=20, message="flood rate-limited")
    assert all(info.rc == 0 for info in infos)
    close(flooder)
    close(calm)


@pytest.mark.parametrize("client_id", ["fleet-acme-a+b", "fleet-acme-a/b", "fleet-acme-" + "m" * 65, "fleet-acme-$x"])
def test_agents_with_bad_ids_cannot_connect(broker, acme, client_id):
    assert connect_client(broker, "acme/agent", acme.agent_key, client_id, expect_rc=1) == 2
