"""Standby collectors: two ``fleet collector`` processes, one active; kill or freeze it and the other takes over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.config.rules import Rule, parse_condition
from tests import stores
from tests.collector.collector_fixtures import Endpoint, SimAgent, query
from tests.collector.http_recorder import recording
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.both_engines]

ROOT = Path(__file__).resolve().parents[2]
TAKEOVER_S = 15.0


def _collector(endpoint: Endpoint, instance: str, tmp_path: Path, database: str = "", **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fleet.cli", "collector", "--data-dir", str(endpoint.data_dir),
           "--database", database or endpoint.database, "--broker", endpoint.url]
    if endpoint.ca:
        cmd += ["--ca", str(endpoint.ca)]
    environ = dict(os.environ, FLEET_INSTANCE=instance, FLEET_BATCH_INTERVAL_S="0.05",
                   FLEET_RELOAD_INTERVAL_S="0.5", FLEET_ALERT_GROUP_WAIT="0", **env)
    log = open(tmp_path / f"{instance}.log", "w")  # noqa: SIM115 - closed with the process by the OS
    return subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT, text=True)


def _active(endpoint: Endpoint) -> str | None:
    rows = query(endpoint, "SELECT ts, detail FROM heartbeats WHERE component = 'collector'")
    if not rows or time.time() - rows[0][0] > 5:
        return None
    detail = json.loads(rows[0][1])
    return detail.get("instance") if detail.get("broker_connected") else None


def _waiting(endpoint: Endpoint, instance: str) -> bool:
    return bool(query(endpoint, "SELECT 1 FROM collectors WHERE instance = ?", instance))


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _pair(endpoint: Endpoint, tmp_path: Path, started: list[subprocess.Popen], **env: str) -> list[subprocess.Popen]:
    """Collector a, active, and collector b, waiting (both also put in ``started``, to be stopped)."""
    started.append(_collector(endpoint, "a", tmp_path, **env))
    wait_for(lambda: _active(endpoint) == "a", timeout=20, message="collector a to be active")
    started.append(_collector(endpoint, "b", tmp_path, **env))
    wait_for(lambda: _waiting(endpoint, "b"), timeout=20, message="collector b to wait")
    return started


def _stored_once(endpoint: Endpoint, machine: str, sent: int) -> None:
    seqs = [r[0] for r in query(endpoint, "SELECT seq FROM reports WHERE machine_id = ? ORDER BY seq", machine)]
    assert seqs == list(range(sent)), f"expected seqs 0..{sent - 1} once each, got {len(seqs)} rows"


def test_a_killed_active_collector_is_replaced_and_nothing_acknowledged_is_lost(endpoint, tmp_path):
    started: list[subprocess.Popen] = []
    try:
        a, b = _pair(endpoint, tmp_path, started)
        assert _active(endpoint) == "a"  # b waits without kicking a off the broker
        agent = SimAgent(endpoint, "m1").connect()
        for _ in range(20):
            agent.report()
        a.kill()  # SIGKILL: no release, no DISCONNECT
        killed = time.monotonic()
        for _ in range(20):
            agent.report()  # acknowledged by the broker, queued for the collector's session
        wait_for(lambda: _active(endpoint) == "b", timeout=TAKEOVER_S, message="b to take over")
        assert time.monotonic() - killed < TAKEOVER_S
        wait_for(lambda: len(query(endpoint, "SELECT seq FROM reports WHERE machine_id = 'm1'")) >= 40,
                 timeout=10, message="every acknowledged report stored")
        _stored_once(endpoint, "m1", 40)
        agent.close()
    finally:
        _stop(*started)
    assert b.returncode == 0


def test_a_frozen_collector_loses_its_lease_and_writes_nothing_more(endpoint, tmp_path):
    started: list[subprocess.Popen] = []
    try:
        a, _ = _pair(endpoint, tmp_path, started, FLEET_COLLECTOR_LEASE_S="2")
        a.send_signal(signal.SIGSTOP)  # alive (its pid exists) but silent: only the lease's expiry frees it
        stopped = time.monotonic()
        wait_for(lambda: _active(endpoint) == "b", timeout=TAKEOVER_S, message="b to take over")
        assert time.monotonic() - stopped < TAKEOVER_S
        a.send_signal(signal.SIGCONT)
        wait_for(lambda: "lost the lease" in (tmp_path / "a.log").read_text(), timeout=10,
                 message="a to notice it lost the lease")
        agent = SimAgent(endpoint, "m1").connect()
        for _ in range(10):
            agent.report()
        wait_for(lambda: len(query(endpoint, "SELECT seq FROM reports WHERE machine_id = 'm1'")) >= 10,
                 timeout=10, message="reports stored by b")
        _stored_once(endpoint, "m1", 10)
        assert _active(endpoint) == "b"  # a went back to waiting and never wrote its heartbeat again
        wait_for(lambda: _waiting(endpoint, "a"), timeout=10, message="a to wait again")
        agent.close()
    finally:
        _stop(*started)


def test_a_notification_cut_off_by_a_kill_is_never_sent_twice(endpoint, tmp_path):
    """The receiver holds the request open (received, not answered) while the active collector is killed.

    The receiver has the notification; the collector that takes over cannot know whether it acted on it, so
    it does not send it again (SPEC: no notification twice): the row is given up and noted on the channel.
    The next notification goes out as usual."""
    org = endpoint.keys.org
    stores.add_rule(endpoint.data_dir, Rule(org, "hot", parse_condition("cpu_percent > 50"), 0.0, "*", "critical"),
                    endpoint.database)
    with recording() as receiver:
        stores.store_channel(endpoint.data_dir, org, "hook", "webhook", receiver.url + "/hook", "s3cret",
                             receiver.url, endpoint.database)
        receiver.hang = True
        started: list[subprocess.Popen] = []
        try:
            a, _ = _pair(endpoint, tmp_path, started)
            agent = SimAgent(endpoint, "m1").connect()
            agent.report(cpu_percent=99.0)
            receiver.wait_for_count(1, timeout=20)  # a's request is held: received, not answered
            a.kill()
            receiver.wait_for(lambda r: not r.answered, timeout=10)  # the receiver saw its sender go
            receiver.hang = False
            wait_for(lambda: _active(endpoint) == "b", timeout=TAKEOVER_S + 10, message="b active")
            wait_for(lambda: query(endpoint, "SELECT count(*) FROM alert_outbox") == [(0,)], timeout=10,
                     message="the interrupted row given up")
            [(error,)] = query(endpoint, "SELECT last_error FROM alert_channels WHERE name = 'hook'")
            assert error.startswith("interrupted")
            assert len(receiver.requests) == 1  # never sent again
            agent.report(cpu_percent=10.0)  # resolved: the next notification goes out, once
            resolved = receiver.wait_for(lambda r: r.answered, timeout=30)
            assert resolved.json()["alerts"][0]["status"] == "resolved"
            assert len({r.headers["Idempotency-Key"] for r in receiver.requests}) == len(receiver.requests) == 2
            agent.close()
        finally:
            _stop(*started)


def test_a_stopped_active_collector_hands_over_at_once(endpoint, tmp_path):
    started: list[subprocess.Popen] = []
    try:
        a, _ = _pair(endpoint, tmp_path, started, FLEET_COLLECTOR_LEASE_S="12")
        a.terminate()
        assert a.wait(20) == 0
        stopped = time.monotonic()
        wait_for(lambda: _active(endpoint) == "b", timeout=TAKEOVER_S, message="b to take over")
        assert time.monotonic() - stopped < 6  # the lease was released, not left to expire (12 s)
        assert not _waiting(endpoint, "a")  # a stopped cleanly and left the list
    finally:
        _stop(*started)


def test_a_collector_cut_off_from_the_database_is_replaced(endpoint, tmp_path):
    """PostgreSQL: collector a reaches the database through a proxy that the test cuts."""
    from urllib.parse import urlsplit, urlunsplit

    from tests.alerts.proxy import Proxy

    url = urlsplit(endpoint.database)
    if url.scheme != "postgresql":
        pytest.skip("a database behind a proxy: PostgreSQL")
    proxy = Proxy(url.hostname or "127.0.0.1", url.port or 5432)
    netloc = url.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{proxy.port}"
    proxied = urlunsplit((url.scheme, netloc, url.path, url.query, url.fragment))
    started = [_collector(endpoint, "a", tmp_path, database=proxied)]
    try:
        wait_for(lambda: _active(endpoint) == "a", timeout=20, message="collector a to be active")
        started.append(_collector(endpoint, "b", tmp_path))
        wait_for(lambda: _waiting(endpoint, "b"), timeout=20, message="collector b to wait")
        agent = SimAgent(endpoint, "m1").connect()
        for _ in range(10):
            agent.report()
        proxy.cut()
        cut = time.monotonic()
        for _ in range(10):
            agent.report()
        wait_for(lambda: _active(endpoint) == "b", timeout=TAKEOVER_S, message="b to take over")
        assert time.monotonic() - cut < TAKEOVER_S
        wait_for(lambda: len(query(endpoint, "SELECT seq FROM reports WHERE machine_id = 'm1'")) >= 20,
                 timeout=10, message="every acknowledged report stored")
        _stored_once(endpoint, "m1", 20)
        wait_for(lambda: "lost the lease" in (tmp_path / "a.log").read_text(), timeout=10,
                 message="a to give its lease up")
        proxy.restore()
        wait_for(lambda: _waiting(endpoint, "a"), timeout=15, message="a to wait again")
        assert _active(endpoint) == "b"
        agent.close()
    finally:
        _stop(*started)
        proxy.close()
