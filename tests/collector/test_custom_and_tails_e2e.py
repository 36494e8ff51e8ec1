"""Custom metrics, process checks and tail accounting end to end: a real agent (textfile dir, process checks)
through the embedded broker into the collector, read back through the web API, /history and /metrics;
hostile values; a lost session tail."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.agent.outbox import Outbox
from fleet.agent.runner import Agent
from fleet.config import payloads
from fleet.config.settings import Settings
from fleet.config.topics import report_topic
from fleet.web.app import create_app
from tests.collector.collector_fixtures import SimAgent, embedded_endpoint, end_agent_and_probe, query
from tests.helpers import bearer, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ep(broker, acme):
    return embedded_endpoint(broker, acme)


@pytest.fixture
def web(ep):
    app = create_app(Settings(data_dir=ep.data_dir, database_url=ep.database, mqtt_port=1, ttl_seconds=3600))
    client = app.test_client()

    def get(path: str):
        res = client.get(path, headers=bearer(ep.keys.reader_key))
        assert res.status_code == 200, res.get_data(as_text=True)
        return res

    return get


def agent_settings(ep, tmp_path, **changes) -> Settings:
    base = dict(data_dir=tmp_path / "agent", broker_url=ep.url, ca=str(ep.ca), org="acme", key=ep.keys.agent_key,
                machine="real-1", interval=0.3)
    base.update(changes)
    return Settings(**base)


def test_the_agents_custom_series_and_process_counts_reach_the_api_history_and_metrics(ep, collectors, web, tmp_path):
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    (textfiles / "queue.prom").write_text('# TYPE queue_depth gauge\nqueue_depth 3\nqueue_depth{queue="mail"} 7\n')
    (textfiles / "bad.prom").write_text("this is not a sample\n")
    program = tmp_path / "fleet-probe-y"
    shutil.copy(shutil.which("sleep"), program)
    probe = subprocess.Popen([str(program), "300"])
    collectors(ep.settings())
    cmd = [sys.executable, "-m", "fleet.cli", "agent", "--data-dir", str(tmp_path / "agent"), "--broker", ep.url,
           "--org", "acme", "--key", ep.keys.agent_key, "--machine", "real-1", "--ca", str(ep.ca), "--interval", "0.3",
           "--textfile-dir", str(textfiles), "--process", "fleet-probe-y", "--process", "re:fleet-probe-y 300"]
    agent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def latest():
            rows = query(ep, "SELECT metrics FROM machines WHERE machine_id = 'real-1'")
            return json.loads(rows[0][0]) if rows else {}

        wait_for(lambda: latest().get("processes"), 20, "a report with top processes")
        metrics = latest()
        assert metrics["custom"] == {"queue_depth": 3.0, 'queue_depth{queue="mail"}': 7.0}
        assert metrics["process_counts"] == {"fleet-probe-y": 1, "re:fleet-probe-y 300": 1}
        assert 1 <= len(metrics["processes"]) <= 5
        machine = web("/api/fleet/real-1").get_json()
        assert machine["metrics"]["custom"]["queue_depth"] == 3.0
        assert machine["metrics"]["process_counts"]["fleet-probe-y"] == 1
        assert (machine["lost"], machine["late"]) == (0, 0)

        probe.kill()
        probe.wait(5)
        (textfiles / "queue.prom").write_text("queue_depth 4\n")
        wait_for(lambda: latest()["process_counts"]["fleet-probe-y"] == 0, 20, "the probe counted 0 once killed")
        wait_for(lambda: latest()["custom"] == {"queue_depth": 4.0}, 20, "the changed file")
        points = web(f"/api/fleet/real-1/history?since={time.time() - 600}").get_json()["points"]
        counts = [p.get("process.fleet-probe-y") for p in points]
        assert 1 in counts
        assert counts[-1] == 0
        assert {p.get("custom.queue_depth") for p in points} >= {3.0, 4.0}
        assert any(p.get('custom.queue_depth{queue="mail"}') == 7.0 for p in points)
        text = web("/metrics").get_data(as_text=True)
        assert 'fleet_machine_custom{org="acme",machine_id="real-1",series="queue_depth"} 4.0' in text
        assert 'fleet_machine_process_count{org="acme",machine_id="real-1",name="fleet-probe-y"} 0.0' in text
        assert 'name="re:fleet-probe-y 300"} 0.0' in text
    finally:
        end_agent_and_probe(agent, probe)
    assert query(ep, "SELECT count(*) FROM drops") == [(0,)]  # the agent speaks the contract


def hostile_reports(agent: SimAgent) -> list[bytes]:
    """Reports a broken or malicious agent might send: each must be dropped and counted, nothing else."""
    def body(**metrics):
        return payloads.build_report(agent.machine, agent.hardware_id, agent.session, 99, time.time(),
                                     {"cpu_percent": 1.0, **metrics}, {})

    raw = [
        json.dumps(body(custom={"a": 1})).replace('"a": 1', '"a": NaN').encode(),  # not JSON
        json.dumps(body(custom={"a": 1})).replace('"a": 1', '"a": 1e999').encode(),  # infinite: a bad field
        json.dumps(body(custom={"a": 10**30})).encode(),  # an integer no column holds
        json.dumps(body(custom={f"s{i}": i for i in range(65)})).encode(),  # over 64 series
        json.dumps(body(custom={"bad name": 1})).encode(),
        json.dumps(body(custom={"x\u0001": 1})).encode(),
        json.dumps(body(custom=[1, 2])).encode(),
        json.dumps(body(process_counts={"nginx": -1})).encode(),
        json.dumps(body(process_counts={"nginx": 10**8})).encode(),
        json.dumps(body(process_counts={"nginx": 1.5})).encode(),
        json.dumps(body(processes=[{"name": "x", "pid": -5}])).encode(),
        json.dumps(body(processes=[{"name": "x", "cpu_percent": "lots"}] * 3)).encode(),
        json.dumps(body(processes=[{}] * 17)).encode(),
        json.dumps(body(custom={f"series_{i}": i for i in range(10_000)})).encode(),  # 10,000 series: over 64 KiB
    ]
    return raw


def test_hostile_values_are_dropped_and_counted_and_the_collector_keeps_running(ep, collectors, web):
    collector = collectors(ep.settings())
    agent = SimAgent(ep, "m1").connect()
    agent.ping("online")
    agent.report()
    topic = report_topic("acme", "m1")
    sent = hostile_reports(agent)
    refused_by_broker = [raw for raw in sent if len(raw) > payloads.MAX_PAYLOAD_BYTES]
    for raw in sent:
        if raw not in refused_by_broker:
            agent.publish(topic, raw)
    agent.client.publish(topic, b"x" * (1 << 20), qos=1)  # 1 MiB: the broker refuses it before the collector
    agent.report(custom={"ok": 1.5})
    wait_for(lambda: len(query(ep, "SELECT seq FROM reports WHERE machine_id = 'm1'")) == 2, 10,
             "the two good reports")
    wait_for(lambda: sum(collector.stats().dropped.values()) == len(sent) - len(refused_by_broker), 10,
             "every hostile report dropped and counted")
    dropped = collector.stats().dropped
    assert dropped == {"not_json": 1, "bad_field": len(sent) - len(refused_by_broker) - 1}  # NaN is not JSON
    assert web("/api/fleet/m1").get_json()["metrics"]["custom"] == {"ok": 1.5}
    text = web("/metrics").get_data(as_text=True)
    assert 'fleet_collector_dropped_messages_total{reason="bad_field"}' in text
    agent.close()


def test_a_lost_tail_is_counted_in_the_machine_metrics_and_events_and_survives_a_restart(ep, collectors, web,
                                                                                         tmp_path):
    settings = ep.settings(lost_grace_s=1.0)
    collector = collectors(settings)
    outbox = Outbox(tmp_path / "outbox.db", 1000, 1 << 20)
    agent = Agent(agent_settings(ep, tmp_path), "real-1", outbox)
    try:
        agent.connect()
        first = agent.session
        for _ in range(3):
            agent.queue_report()
        wait_for(lambda: (agent.pump(), len(outbox) == 0)[1], 10, "three reports acknowledged")
        # Three more are made but dropped before they are sent (a full outbox, a lost disk, a kill before the send).
        for _ in range(3):
            agent.queue_report()
        outbox.remove([item.id for item in outbox.peek(10)])
        agent.drop_connection("test: the connection breaks")
        agent.connect()  # a new session, whose online ping names the previous one: seq 0-5
        assert agent.session != first
        agent.queue_report()
        wait_for(lambda: (agent.pump(), len(outbox) == 0)[1], 10, "the new session's report")
    finally:
        if agent.conn is not None:
            agent.conn.close()
        outbox.close()
    machine = wait_for(lambda: (m := web("/api/fleet/real-1").get_json())["lost"] == 3 and m, 15, "3 reports lost")
    assert machine["late"] == 0
    text = web("/metrics").get_data(as_text=True)
    assert 'fleet_reports_lost_total{org="acme",machine_id="real-1"} 3.0' in text
    assert 'fleet_org_reports_lost_total{org="acme"} 3.0' in text
    events = web("/api/events?machine=real-1").get_json()["events"]
    assert events[-1]["reason"] == f"lost 3 of session {first}"
    # A restarted collector gets the retained ping (naming the same tail) again, and counts nothing twice.
    collector.stop()
    again = collectors(settings)
    wait_for(lambda: again.stats().received >= 1, 10, "the retained ping delivered to the new collector")
    machine = wait_for(lambda: again.tracker.get("acme", "real-1"), 10)
    assert machine.pending_tails == []  # the tail it names is settled already: no new check is opened
    assert list(machine.settled_tails) == [first]
    assert web("/api/fleet/real-1").get_json()["lost"] == 3
    assert re.search(r'fleet_org_reports_lost_total\{org="acme"\} 3\.0', web("/metrics").get_data(as_text=True))


def test_oversize_hostile_reports_are_counted_by_the_collector_when_a_broker_lets_them_through():
    """The embedded broker refuses payloads over 64 KiB; another broker may not, and the collector counts them."""
    from fleet.collector.intake import DropCounter, parse_message

    agent = SimAgent(None, "m1")  # only builds payloads here
    drops = DropCounter()
    oversize = [raw for raw in hostile_reports(agent) if len(raw) > payloads.MAX_PAYLOAD_BYTES]
    oversize.append(b'{"v": 1, "pad": "' + b"x" * (1 << 20) + b'"}')  # 1 MiB
    for raw in oversize:
        assert parse_message(report_topic("acme", "m1"), raw, False, time.time(), None, drops) is None
    assert drops.totals() == {"too_large": len(oversize)}
