"""The collector end to end: real broker, simulated agents over real MQTT, a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fleet.collector import service
from fleet.config import payloads
from fleet.config.topics import ping_topic, report_topic
from fleet.store import credentials
from tests import stores
from tests.collector.collector_fixtures import SimAgent, query
from tests.dbhelpers import insert_reports, rows, sample, write_lock
from tests.helpers import wait_for

# The tests where the database takes part run on both engines (tests/conftest.py); the ones about the state
# machine, rate limits or the broker run on SQLite only: the same code stores their outcome either way.
both_engines = pytest.mark.both_engines

ROOT = Path(__file__).resolve().parents[2]


def machine_row(ep, machine="m1"):
    rows = query(ep, "SELECT status, session, conflict, clock_offset_s, metrics, os, hardware_id "
                     "FROM machines WHERE org='acme' AND machine_id=?", machine)
    return rows[0] if rows else None


def events(ep, machine="m1"):
    return query(ep, "SELECT old_status, new_status, reason FROM events WHERE org='acme' AND machine_id=? "
                     "ORDER BY id", machine)


def seqs(ep, machine="m1"):
    return [row[0] for row in query(ep, "SELECT seq FROM reports WHERE org='acme' AND machine_id=? "
                                        "ORDER BY seq", machine)]


@both_engines
def test_reports_and_presence_flow_into_the_database(endpoint, collectors):
    collector = collectors(endpoint.settings())
    agent = SimAgent(endpoint, "m1").connect()
    agent.ping("online")
    for _ in range(3):
        agent.report(cpu_percent=42.0)
    wait_for(lambda: len(seqs(endpoint)) == 3, message="3 reports in history")
    status, session, conflict, offset, metrics, os_name, hw = wait_for(lambda: machine_row(endpoint))
    assert (status, session, conflict, os_name, hw) == ("online", agent.session, 0, "Linux", "0xhw1")
    assert json.loads(metrics)["cpu_percent"] == 42.0
    assert 0 <= offset < 5
    agent.ping("offline", reason="shutdown")
    wait_for(lambda: machine_row(endpoint)[0] == "offline", message="offline")
    assert events(endpoint) == [(None, "online", "ping"), ("online", "offline", "shutdown")]
    agent.close()
    # The heartbeat is written every 2 s: the one read first may date from before the collector connected.
    def connected_beat():
        rows = query(endpoint, "SELECT ts, detail FROM heartbeats WHERE component='collector'")
        return rows if rows and json.loads(rows[0][1])["broker_connected"] is True else None

    beat = wait_for(connected_beat, message="a heartbeat saying the collector is connected")
    detail = json.loads(beat[0][1])
    assert time.time() - beat[0][0] < 10
    assert detail["orgs"] == stores.list_orgs(endpoint.data_dir, endpoint.database)
    assert collector.stats().stored == 3


def test_silent_machine_goes_stale_then_online_again(endpoint, collectors):
    collectors(endpoint.settings())
    agent = SimAgent(endpoint, "m1", interval_s=0.2).connect()  # stale after 3 x 0.2 s
    agent.ping("online")
    wait_for(lambda: machine_row(endpoint) and machine_row(endpoint)[0] == "stale", message="stale")
    agent.report()
    wait_for(lambda: machine_row(endpoint)[0] == "online", message="online again")
    assert events(endpoint) == [(None, "online", "ping"), ("online", "stale", "silent"), ("stale", "online", "report")]
    agent.close()


def test_last_will_marks_the_machine_offline_lost(endpoint, collectors):
    collectors(endpoint.settings())
    agent = SimAgent(endpoint, "m1").connect()
    agent.ping("online")
    wait_for(lambda: machine_row(endpoint), message="machine")
    agent.drop()
    wait_for(lambda: machine_row(endpoint)[0] == "offline", message="offline from the last will")
    assert events(endpoint)[-1] == ("online", "offline", "lost")


def test_late_last_will_of_an_old_session_does_not_mark_a_reconnected_agent_offline(endpoint, collectors):
    collectors(endpoint.settings())
    agent = SimAgent(endpoint, "m1").connect()
    old = agent.session
    agent.ping("online")
    wait_for(lambda: machine_row(endpoint), message="machine")
    # The agent reconnected (new session, online) and only then the old connection's will arrives.
    agent.session = "new-session"
    agent.ping("online")
    agent.ping("offline", reason="lost", session=old)
    agent.report()  # a marker: once stored, both pings before it were processed (per-publisher order)
    wait_for(lambda: seqs(endpoint) == [0], message="marker report")
    assert machine_row(endpoint)[:2] == ("online", "new-session")
    assert [e[1] for e in events(endpoint)] == ["online"]
    agent.close()


@both_engines
def test_ttl_eviction_clears_the_retained_ping(endpoint, collectors):
    collectors(endpoint.settings(ttl_seconds=1))
    agent = SimAgent(endpoint, "m1").connect()
    agent.ping("online")
    agent.report()
    agent.close()  # clean disconnect: no will, just silence
    wait_for(lambda: query(endpoint, "SELECT expired FROM org_stats WHERE org='acme'") == [(1,)],
               message="eviction counted")
    assert machine_row(endpoint) is None
    assert events(endpoint)[-1][1:] == ("evicted", "ttl")
    assert seqs(endpoint) == [0]  # history stays
    # A fresh reader gets no retained ping for m1: the marker published after subscribing arrives first.
    received: list[tuple[str, bytes, bool]] = []
    got_marker = threading.Event()

    def on_message(client, userdata, msg):
        received.append((msg.topic, msg.payload, msg.retain))
        if msg.topic.endswith("/marker/report"):
            got_marker.set()

    wait_for(lambda: _retained_cleared(endpoint), message="the broker to drop the retained ping")
    reader = endpoint.client("reader-1", "reader", on_message=on_message)
    subscribed = threading.Event()
    reader.on_subscribe = lambda *a: subscribed.set()
    reader.subscribe("fleet/acme/#", qos=1)
    assert subscribed.wait(5)
    marker = SimAgent(endpoint, "marker").connect()
    marker.report()
    assert got_marker.wait(10)
    assert [t for t, _, _ in received if t == ping_topic("acme", "m1")] == []
    reader.disconnect()
    marker.close()
    assert query(endpoint, "SELECT count(*) FROM drops") == [(0,)]  # our own empty ping was ignored


def _retained_cleared(endpoint) -> bool:
    """True once a brand-new subscriber to m1's ping topic gets nothing retained (checked with a marker)."""
    got = []
    done = threading.Event()

    def on_message(client, userdata, msg):
        got.append(msg.payload)
        done.set()

    probe = endpoint.client(f"probe-{os.urandom(3).hex()}", "reader", on_message=on_message)
    subscribed = threading.Event()
    probe.on_subscribe = lambda *a: subscribed.set()
    probe.subscribe(ping_topic("acme", "m1"), qos=1)
    subscribed.wait(5)
    done.wait(0.5)
    probe.disconnect()
    probe.loop_stop()
    return not any(got)


def run_agent(agent: SimAgent, count: int, rate: float, stop: threading.Event) -> None:
    for _ in range(count):
        if stop.is_set():
            return
        agent.report()
        time.sleep(1 / rate)


def _outage(endpoint, collectors, count: int, outage_s: float) -> None:
    settings = endpoint.settings()
    collector = collectors(settings)
    agent = SimAgent(endpoint, "m1").connect()
    agent.ping("online")
    stop = threading.Event()
    worker = threading.Thread(target=run_agent, args=(agent, count, 20.0, stop))
    worker.start()
    try:
        wait_for(lambda: len(seqs(endpoint)) >= 10, message="first reports")
        collector.stop()
        stopped_at = len(seqs(endpoint))
        time.sleep(outage_s)  # the outage itself is the point of the test
        assert len(seqs(endpoint)) == stopped_at  # really down
        collectors(settings)
        worker.join(60)
        wait_for(lambda: len(seqs(endpoint)) >= count, timeout=30, message="every report")
    finally:
        stop.set()
        worker.join(10)
    assert seqs(endpoint) == list(range(count))  # no gap, no duplicate
    agent.close()


@both_engines
@pytest.mark.slow
def test_collector_outage_loses_nothing(endpoint, collectors):
    _outage(endpoint, collectors, count=70, outage_s=2.0)


@both_engines
@pytest.mark.slow
def test_collector_down_ten_seconds_loses_nothing(endpoint, collectors):
    _outage(endpoint, collectors, count=300, outage_s=10.0)


@both_engines
def test_bad_messages_are_dropped_counted_and_the_collector_keeps_going(endpoint, collectors):
    collector = collectors(endpoint.settings())
    agent = SimAgent(endpoint, "m1").connect()
    topic = report_topic("acme", "m1")
    good = payloads.build_report("m1", "hw", "s1", 0, time.time(), {}, {})
    bad = {
        "not_json": b"{nope",
        "not_object": b"[1,2,3]",
        "not_utf8": b'{"v": 1, "machine_id": "\xff"}',
        "bad_field": json.dumps({**good, "seq": "seven"}).encode(),
        "machine_mismatch": json.dumps({**good, "machine_id": "other"}).encode(),
    }
    for raw in bad.values():
        agent.publish(topic, raw)
    agent.report()
    wait_for(lambda: seqs(endpoint) == [0], message="the good report")
    wait_for(lambda: dict(query(endpoint, "SELECT reason, count FROM drops")) == {r: 1 for r in bad},
               message="drops persisted per reason")
    assert collector.stats().dropped == {r: 1 for r in bad}


def test_oversize_payload_is_dropped(mosquitto_endpoint, collectors):
    """Mosquitto passes a 64 KiB + 1 payload through (the embedded broker refuses it itself)."""
    ep = mosquitto_endpoint
    collectors(ep.settings())
    agent = SimAgent(ep, "m1").connect()
    agent.publish(report_topic("acme", "m1"), b"x" * (64 * 1024 + 1))
    agent.publish("fleet/acme/bad id!/report", b"{}")
    agent.report()
    wait_for(lambda: seqs(ep) == [0], message="the good report")
    wait_for(lambda: dict(query(ep, "SELECT reason, count FROM drops")) == {"too_large": 1, "bad_topic": 1},
               message="drops")


def test_a_flooding_agent_is_rate_limited(endpoint, collectors):
    collector = collectors(endpoint.settings(agent_rate_limit_per_s=1.0))  # bucket of 20
    flood = SimAgent(endpoint, "flood").connect()
    calm = SimAgent(endpoint, "calm").connect()
    for _ in range(60):
        flood.report()
    calm.report()
    wait_for(lambda: seqs(endpoint, "calm") == [0], message="the calm agent's report")
    stored = len(seqs(endpoint, "flood"))
    wait_for(lambda: collector.stats().dropped.get("rate_limited", 0) == 60 - stored, message="counted drops")
    assert 20 <= stored < 60


@both_engines
def test_orgs_added_and_removed_are_picked_up_within_5_s(endpoint, collectors):
    collector = collectors(endpoint.settings())
    before = tuple(stores.list_orgs(endpoint.data_dir, endpoint.database))
    assert collector.stats().orgs == before
    assert "acme" in before
    t0 = time.monotonic()
    keys = stores.add_org(endpoint.data_dir, "initech", endpoint.database)
    wait_for(lambda: collector.stats().orgs == tuple(sorted(before + ("initech",))), timeout=5,
               message="subscribed to initech")
    assert time.monotonic() - t0 < 5
    endpoint.keys, acme_keys = keys, endpoint.keys  # publish as initech
    try:
        wait_for(lambda: _publish_ok(endpoint), timeout=5, message="initech agent accepted by the broker")
        wait_for(lambda: query(endpoint, "SELECT count(*) FROM reports WHERE org='initech'")[0][0] >= 1,
                   message="initech report stored")
    finally:
        endpoint.keys = acme_keys
    stores.remove_org(endpoint.data_dir, "initech", endpoint.database)
    wait_for(lambda: collector.stats().orgs == before, timeout=5, message="unsubscribed from initech")


def _publish_ok(endpoint) -> bool:
    try:
        agent = SimAgent(endpoint, "g1").connect()
    except AssertionError:
        return False
    agent.report()
    agent.close()
    return True


@both_engines
def test_shard_serves_only_its_orgs(endpoint, collectors):
    stores.add_org(endpoint.data_dir, "initech", endpoint.database)
    collector = collectors(endpoint.settings(orgs=("initech",)))
    assert collector.stats().orgs == ("initech",)
    assert collector.client_id != service.client_id_for(())
    agent = SimAgent(endpoint, "m1").connect()  # an acme agent: not this shard's business
    agent.report()
    agent.close()
    beat = wait_for(lambda: query(endpoint, "SELECT detail FROM heartbeats WHERE component='collector'"))
    assert json.loads(beat[0][0])["orgs"] == ["initech"]
    assert seqs(endpoint) == []


@both_engines
@pytest.mark.slow
def test_locked_database_applies_backpressure_and_loses_nothing(endpoint, collectors, monkeypatch):
    monkeypatch.setattr(service, "QUEUE_MAX", 5)
    collectors(endpoint.settings())
    agent = SimAgent(endpoint, "m1").connect()
    agent.report()
    wait_for(lambda: seqs(endpoint) == [0], message="first report")
    with write_lock(endpoint.database):  # another writer holds the database
        for _ in range(40):
            agent.report()
        time.sleep(2.5)  # hold the lock longer than the writer's busy timeout: the retry path must run
        assert seqs(endpoint) == [0]
    wait_for(lambda: seqs(endpoint) == list(range(41)), timeout=20, message="every report after the lock")
    agent.close()


def test_resubscribes_after_the_broker_restarts(endpoint, collectors):
    collector = collectors(endpoint.settings())
    endpoint.stop()
    wait_for(lambda: not collector.stats().broker_connected, message="disconnect noticed")
    endpoint.restart()
    wait_for(lambda: collector.stats().broker_connected, timeout=15, message="reconnected")
    agent = wait_for(lambda: _connect_agent(endpoint), timeout=10, message="agent connects")
    agent.report()
    wait_for(lambda: seqs(endpoint) == [0], timeout=10, message="report after the restart")
    agent.close()


def _connect_agent(endpoint):
    try:
        return SimAgent(endpoint, "m1").connect()
    except AssertionError:
        return None


@both_engines
def test_retention_runs_on_a_timer(endpoint, collectors):
    day = 86400
    old = time.time() - 10 * day
    from fleet.store.database import open_database

    with open_database(endpoint.database) as db:
        insert_reports(db, [sample("acme", "old", "s", i, old + i, cpu_percent=50.0) for i in range(10)])
    collectors(endpoint.settings(history_raw_days=1))
    wait_for(lambda: query(endpoint, "SELECT count(*) FROM reports WHERE machine_id='old'") == [(0,)],
               message="old raw history rolled up")
    assert query(endpoint, "SELECT sum(samples), avg(cpu_percent) FROM rollups WHERE machine_id='old'") == [
        (10, 50.0)]


@both_engines
def test_cli_collector_runs_until_sigterm_and_flushes(endpoint):
    env = dict(os.environ, FLEET_BATCH_INTERVAL_S="0.05", FLEET_RELOAD_INTERVAL_S="0.5")
    cmd = [sys.executable, "-m", "fleet.cli", "collector", "--data-dir", str(endpoint.data_dir),
           "--database", endpoint.database, "--broker", endpoint.url]
    if endpoint.ca:
        cmd += ["--ca", str(endpoint.ca)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def connected():
            rows = query(endpoint, "SELECT detail FROM heartbeats WHERE component='collector'")
            return rows and json.loads(rows[0][0])["broker_connected"] and "acme" in json.loads(rows[0][0])["orgs"]

        wait_for(connected, timeout=20, message="the CLI collector to connect")
        agent = SimAgent(endpoint, "m1").connect()
        for _ in range(5):
            agent.report()
        wait_for(lambda: seqs(endpoint) == list(range(5)), message="reports stored")
        agent.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    beat = query(endpoint, "SELECT detail FROM heartbeats WHERE component='collector'")
    assert json.loads(beat[0][0])["broker_connected"] is False  # the last beat says it is gone
    assert "Traceback" not in err


def test_an_exception_while_handling_one_message_is_counted_not_fatal(mosquitto_endpoint, collectors, monkeypatch):
    from fleet.collector.state import Tracker

    real = Tracker.on_report

    def on_report(self, report, now, *rest):
        if report.machine_id == "cursed":
            raise RuntimeError("bug triggered by one machine")
        return real(self, report, now, *rest)

    monkeypatch.setattr(Tracker, "on_report", on_report)
    ep = mosquitto_endpoint
    collector = collectors(ep.settings())
    cursed, fine = SimAgent(ep, "cursed").connect(), SimAgent(ep, "m1").connect()
    cursed.report()
    fine.report()
    wait_for(lambda: seqs(ep) == [0], message="the other machine's report")
    wait_for(lambda: collector.stats().dropped == {"internal": 1}, message="internal drop counted")
    cursed.close()
    fine.close()


@pytest.mark.mosquitto
def test_collector_over_tls_with_its_service_credential_on_mosquitto(tmp_path, collectors):
    """Mosquitto with TLS, the credential store's password hashes and per-role ACLs (no anonymous)."""
    import shutil

    import trustme

    from tests.collector.collector_fixtures import Endpoint
    from tests.helpers import free_port, port_open

    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed")
    data_dir = tmp_path / "data"
    keys = stores.add_org(data_dir, "acme")
    stores.ensure_service_key(data_dir)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    (tmp_path / "passwd").write_text("".join(f"{u}:{h}\n" for u, h in rows(
        stores.database_for(data_dir), "SELECT username, mosquitto_hash FROM credentials")))
    (tmp_path / "acl").write_text(f"user {credentials.SERVICE_USERNAME}\ntopic readwrite fleet/#\n\n"
                                  "user acme/agent\ntopic readwrite fleet/acme/#\n\n"
                                  "user acme/reader\ntopic read fleet/acme/#\n")
    port = free_port()
    (tmp_path / "m.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npersistence false\nuser {getpass.getuser()}\n"
        f"password_file {tmp_path / 'passwd'}\nacl_file {tmp_path / 'acl'}\n"
        f"cafile {tmp_path / 'ca.pem'}\ncertfile {tmp_path / 'server.pem'}\nkeyfile {tmp_path / 'server.key'}\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "m.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), message="mosquitto TLS listener")
        ep = Endpoint(f"mqtts://127.0.0.1:{port}", tmp_path / "ca.pem", data_dir, keys, proc.terminate, lambda: None,
                      database=stores.database_for(data_dir))
        collector = collectors(ep.settings())
        agent = SimAgent(ep, "m1").connect()
        agent.ping("online")
        agent.report()
        wait_for(lambda: seqs(ep) == [0], message="report over TLS")
        wait_for(lambda: machine_row(ep) and machine_row(ep)[0] == "online", message="online")
        assert collector.stats().broker_connected
        agent.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_real_agent_is_seen_online_then_offline_after_sigterm(broker, acme, collectors):
    """`fleet agent` (real psutil metrics, real protocol) through the embedded broker into the collector."""
    from tests.collector.collector_fixtures import embedded_endpoint

    ep = embedded_endpoint(broker, acme)
    collectors(ep.settings())
    cmd = [sys.executable, "-m", "fleet.cli", "agent", "--data-dir", str(ep.data_dir), "--broker", ep.url,
           "--org", "acme", "--key", acme.agent_key, "--machine", "real-1", "--ca", str(ep.ca), "--interval", "0.3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(seqs(ep, "real-1")) >= 3, timeout=20, message="the agent's reports")
        status, *_ = machine_row(ep, "real-1")
        assert status == "online"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    wait_for(lambda: machine_row(ep, "real-1")[0] == "offline", message="offline after SIGTERM")
    assert events(ep, "real-1")[-1] == ("online", "offline", "shutdown")
    assert query(ep, "SELECT count(*) FROM drops") == [(0,)]  # the agent speaks the contract
    for (session,) in query(ep, "SELECT DISTINCT session FROM reports WHERE machine_id='real-1'"):
        got = [r[0] for r in query(ep, "SELECT seq FROM reports WHERE session=? ORDER BY seq", session)]
        assert got == list(range(len(got)))  # no gap within a session


def test_the_gc_threshold_is_raised_only_where_the_collector_runs_alone(endpoint, collectors):
    """``fleet up`` (start) keeps Python's GC thresholds; ``fleet collector`` (serve_alone(serve)) raises them."""
    import gc

    from fleet import launch

    default = gc.get_threshold()
    try:
        collectors(endpoint.settings())  # what fleet up does
        assert gc.get_threshold() == default

        def stop_when_serving() -> None:
            wait_for(lambda: gc.get_threshold()[0] == launch.GC_YOUNG_THRESHOLD, message="serve() to start")
            wait_for(lambda: query(endpoint, "SELECT 1 FROM heartbeats WHERE component='collector'"))
            os.kill(os.getpid(), signal.SIGTERM)  # serve() turns it into a clean stop

        killer = threading.Thread(target=stop_when_serving, daemon=True)
        killer.start()
        launch.serve_alone(service.serve, endpoint.settings())  # what fleet collector does
        killer.join(10)
        assert gc.get_threshold()[0] == launch.GC_YOUNG_THRESHOLD
    finally:
        gc.set_threshold(*default)
