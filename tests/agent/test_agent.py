"""The agent end to end: a real `fleet agent` process against the real broker over TLS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fleet.agent.connection import backoff_delay
from fleet.agent.outbox import Outbox
from fleet.agent.runner import keepalive_for
from fleet.broker.server import start_in_thread
from fleet.config import payloads
from fleet.store import credentials
from tests import stores
from tests.helpers import Inbox, close, connect_client, wait_for

MACHINE = "web-1"
REPORT = f"fleet/acme/{MACHINE}/report"
PING = f"fleet/acme/{MACHINE}/ping"


def agent_process(broker, key, tmp_path, *extra, interval="0.3", ca=None):
    env = {**os.environ, "FLEET_KEY": key, "FLEET_RECONNECT_MAX_S": "1"}
    cmd = [sys.executable, "-m", "fleet.cli", "agent", "--broker", broker.url, "--org", "acme", "--machine", MACHINE,
           "--ca", str(ca or broker.ca_path), "--interval", interval, "--data-dir", str(tmp_path / "agent"), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def watcher(broker, client_id="watcher"):
    client = connect_client(broker, credentials.SERVICE_USERNAME, stores.ensure_service_key(broker.data_dir),
                            client_id)
    inbox = Inbox(client)
    inbox.subscribe("fleet/acme/#")
    return client, inbox


def stop(proc, sig=signal.SIGTERM):
    proc.send_signal(sig)
    try:
        return proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_print_once_needs_no_broker_and_prints_a_valid_report():
    out = subprocess.run([sys.executable, "-m", "fleet.cli", "agent", "--print", "--once"], capture_output=True,
                         text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "FLEET_KEY"})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    parsed = payloads.parse_report(payloads.encode(report), f"fleet/x/{report['machine_id']}/report")
    assert parsed.seq == 0
    for field in ("cpu_percent", "cpu_count", "load_avg", "memory", "swap_percent", "disks", "net", "uptime_s",
                  "process_count"):
        assert field in report["metrics"], field
    for field in ("hostname", "os", "os_version", "platform", "architecture", "python_version", "hardware_id",
                  "agent_version"):
        assert report["system"][field], field
    assert all(d["mount"] for d in report["metrics"]["disks"])


def test_reports_and_retained_online_ping(broker, acme, tmp_path):
    client, inbox = watcher(broker)
    proc = agent_process(broker, acme.agent_key, tmp_path)
    try:
        report = payloads.parse_report(inbox.wait_for_topic(REPORT, timeout=15).payload, REPORT)
        assert report.machine_id == MACHINE
        assert report.system["agent_version"]
        ping = payloads.parse_ping(inbox.wait_for_topic(PING).payload, PING)
        assert ping.status == "online"
        assert ping.session == report.session
        late_client, late = watcher(broker, "late")  # retained: a later subscriber still sees it
        retained = late.wait_for_topic(PING)
        assert retained.retain
        assert payloads.parse_ping(retained.payload, PING).status == "online"
        close(late_client)
        assert stop(proc) == 0
        wait_for(lambda: any(payloads.parse_ping(m.payload, PING).status == "offline" for m in inbox.on(PING)),
                 timeout=5, message="shutdown ping")
        offline = payloads.parse_ping(inbox.on(PING)[-1].payload, PING)
        assert (offline.status, offline.reason, offline.session) == ("offline", "shutdown", report.session)
    finally:
        if proc.poll() is None:
            proc.kill()
        close(client)


@pytest.mark.slow
def test_killed_agent_goes_offline_by_its_will(broker, acme, tmp_path):
    client, inbox = watcher(broker)
    proc = agent_process(broker, acme.agent_key, tmp_path)
    try:
        online = payloads.parse_ping(inbox.wait_for_topic(PING, timeout=15).payload, PING)
        killed = time.monotonic()
        proc.kill()
        proc.wait(5)
        keepalive = keepalive_for(0.3)
        wait_for(lambda: len(inbox.on(PING)) >= 2, timeout=1.5 * keepalive + 3, message="last will")
        will = payloads.parse_ping(inbox.on(PING)[-1].payload, PING)
        assert (will.status, will.reason, will.session, will.ts) == ("offline", "lost", online.session, None)
        assert time.monotonic() - killed <= 1.5 * keepalive + 3
    finally:
        close(client)


@pytest.mark.slow
def test_broker_outage_loses_no_report_and_keeps_order(broker_settings, acme, tmp_path):
    first = start_in_thread(broker_settings)
    client, inbox = watcher(first)
    proc = agent_process(first, acme.agent_key, tmp_path, interval="0.2")
    second = None
    try:
        inbox.wait_for_count(5, timeout=15)
        close(client)
        first.stop()
        outbox_path = tmp_path / "agent" / f"agent-acme-{MACHINE}.db"
        wait_for(lambda: outbox_path.exists() and len(Outbox(outbox_path, 10**6, 10**9)) >= 5, timeout=15,
                 message="reports queued during the outage")
        second = start_in_thread(broker_settings.replace(mqtt_port=first.port))
        client, inbox2 = watcher(second, "watcher-2")
        wait_for(lambda: len(Outbox(outbox_path, 10**6, 10**9)) == 0 and len(inbox2.on(REPORT)) >= 10, timeout=30,
                 message="backlog drained")
        assert stop(proc) == 0
        seen = [payloads.parse_report(m.payload, REPORT) for m in inbox.on(REPORT) + inbox2.on(REPORT)]
        by_session: dict[str, list[int]] = {}
        for r in seen:
            if r.seq not in by_session.setdefault(r.session, []):
                by_session[r.session].append(r.seq)
        assert len(by_session) >= 2
        for session, seqs in by_session.items():
            assert seqs == list(range(len(seqs))), (session, seqs)  # every seq, in order, none missing
        # The new connection's online ping names the session before it and its last seq, for tail accounting.
        pings = [payloads.parse_ping(m.payload, PING) for m in inbox2.on(PING)]
        named = [(p.prev_session, p.prev_seq) for p in pings if p.status == "online" and p.prev_session]
        assert named
        prev_session, prev_seq = named[0]
        assert prev_seq == max(by_session[prev_session])
        close(client)
    finally:
        if proc.poll() is None:
            proc.kill()
        if second is not None:
            second.stop()


def test_bad_key_exits_1_with_one_clear_line(broker, acme, tmp_path):
    proc = agent_process(broker, "not-the-key", tmp_path)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "not authorised" in err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("fleet: error:")


def test_unknown_ca_exits_1_with_one_clear_line(broker, acme, tmp_path):
    import trustme

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    proc = agent_process(broker, acme.agent_key, tmp_path, ca=other)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "TLS verification" in err
    assert "Traceback" not in err


def test_missing_org_or_key_is_a_usage_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FLEET_KEY", "FLEET_ORG")}
    out = subprocess.run([sys.executable, "-m", "fleet.cli", "agent", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1
    assert "--org" in out.stderr


def test_outbox_is_bounded_drops_oldest_and_counts(tmp_path):
    box = Outbox(tmp_path / "q.db", max_items=3, max_bytes=10**6)
    for i in range(5):
        box.append("t", f"m{i}".encode())
    assert [item.payload for item in box.peek(10)] == [b"m2", b"m3", b"m4"]
    assert box.dropped == 2
    box.remove([box.peek(1)[0].id])
    assert len(box) == 2
    box.close()
    reopened = Outbox(tmp_path / "q.db", max_items=3, max_bytes=9)
    reopened.append("t", b"x" * 8)  # byte bound: older ones go first
    assert [item.payload for item in reopened.peek(10)] == [b"x" * 8]
    assert reopened.dropped == 4


def test_backoff_is_full_jitter_and_capped():
    delays = [backoff_delay(attempt, cap=5) for attempt in range(1, 40) for _ in range(20)]
    assert all(0 <= d <= 5 for d in delays)
    assert len({round(d, 3) for d in delays}) > 100  # spread, not in step
    assert keepalive_for(10) == 20
    assert keepalive_for(0.3) == 5
    assert keepalive_for(600) == 60


def test_full_disk_drops_oldest_counts_and_keeps_going(tmp_path):
    """SQLite's max_page_count makes the queue's disk 'full': writes keep working by dropping the oldest."""
    box = Outbox(tmp_path / "q.db", max_items=10**6, max_bytes=10**9)
    box._db.execute("PRAGMA max_page_count = 40")  # noqa: SLF001 - a small disk, made by shrinking the file's limit
    for i in range(500):
        box.append("t", f"report-{i:04d}".encode() + b"x" * 400)
    assert box.dropped > 0
    remaining = [item.payload[:11] for item in box.peek(10**6)]
    assert remaining
    assert remaining[-1] == b"report-0499"
    assert remaining == sorted(remaining)  # still in order
    assert len(box) == len(remaining)


def test_a_restarted_agent_names_the_session_of_its_previous_run(broker, acme, tmp_path):
    client, inbox = watcher(broker)
    proc = agent_process(broker, acme.agent_key, tmp_path, interval="0.2")
    try:
        inbox.wait_for_count(4, timeout=15)
        wait_for(lambda: len(inbox.on(REPORT)) >= 3, timeout=15, message="three reports")
    finally:
        stop(proc, signal.SIGKILL)
    first = [payloads.parse_report(m.payload, REPORT) for m in inbox.on(REPORT)]
    session = first[0].session
    proc = agent_process(broker, acme.agent_key, tmp_path, interval="0.2")
    try:
        def named():
            pings = [payloads.parse_ping(m.payload, PING) for m in inbox.on(PING)]
            return [p for p in pings if p.status == "online" and p.prev_session == session]

        ping = wait_for(named, timeout=15, message="an online ping naming the killed run's session")[0]
        assert ping.session != session
        assert ping.prev_seq >= max(r.seq for r in first if r.session == session)
    finally:
        stop(proc)
        close(client)
