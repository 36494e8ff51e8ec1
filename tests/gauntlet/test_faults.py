"""Gauntlet, faults: parts are SIGKILLed mid-stream and restarted; nothing an agent produced is lost.

Accounting: every report an agent makes goes through its on-disk outbox and leaves it only on PUBACK.
So "outbox empty at the end, and every session's seqs stored without a gap" means sent = stored.
The collector faults run on SQLite and on PostgreSQL, and PostgreSQL itself is restarted mid-stream.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleet.agent.outbox import Outbox
from fleet.config import payloads
from fleet.store import credentials
from tests import stores
from tests.dbhelpers import rows, write_lock
from tests.helpers import Inbox, close, connect_client, free_port, port_open, wait_for
from tests.postgres import PostgresServer, unavailable_reason

pytestmark = [pytest.mark.slow, pytest.mark.both_engines]
AGENTS = ("alpha", "beta")



def _fleet(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fleet.cli", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _rows(db: str, sql: str):
    return rows(db, sql)


def _queued(data: Path, machine: str) -> int:
    path = data / f"agent-{machine}" / f"agent-acme-{machine}.db"
    if not path.exists():
        return 0
    box = Outbox(path, 10**6, 10**9)
    try:
        return len(box)
    finally:
        box.close()



def _gapless(db: str) -> dict[str, int]:
    """Reports stored per machine, asserting every session's seqs run 0..n-1 with no gap or duplicate."""
    totals: dict[str, int] = {}
    for machine, session, count, low, high in _rows(
            db, "SELECT machine_id, session, count(*), min(seq), max(seq) FROM reports GROUP BY machine_id, session"):
        assert (low, high) == (0, count - 1), f"{machine}/{session}: {count} reports, seqs {low}..{high}"
        totals[machine] = totals.get(machine, 0) + count
    return totals


def _start_collector(data: Path, db: str, url: str) -> subprocess.Popen:
    """`fleet collector`, returned once its persistent session exists (heartbeat: connected, acme subscribed)."""
    proc = _fleet("collector", "--data-dir", str(data), "--broker", url, env={"FLEET_BATCH_INTERVAL_S": "0.05",
                                                                             "FLEET_DATABASE_URL": db})

    def ready() -> bool:
        beat = _rows(db, "SELECT ts, detail FROM heartbeats WHERE component='collector'")
        detail = json.loads(beat[0][1]) if beat else {}
        return detail.get("broker_connected") is True and "acme" in detail.get("orgs", [])

    wait_for(lambda: proc.poll() is None and ready(), timeout=30, message="collector subscribed")
    return proc


def _start_agents(data: Path, url: str, key: str, interval: str = "0.2") -> dict[str, subprocess.Popen]:
    return {m: _fleet("agent", "--broker", url, "--org", "acme", "--machine", m, "--interval", interval,
                      "--ca", str(data / "certs" / "ca.pem"), "--data-dir", str(data / f"agent-{m}"),
                      env={"FLEET_KEY": key, "FLEET_RECONNECT_MAX_S": "1"}) for m in AGENTS}


def _stop_agents_and_collector(data: Path, db: str, agents: dict[str, subprocess.Popen],
                               collector: subprocess.Popen) -> None:
    """Clean stops; each agent's shutdown ping follows all its reports, so once the collector has recorded
    every agent offline it has received everything they sent."""
    for proc in agents.values():
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    for m in AGENTS:
        assert _queued(data, m) == 0, f"{m} still has unacknowledged reports"
    wait_for(lambda: dict(_rows(db, "SELECT machine_id, status FROM machines")) == {m: "offline" for m in AGENTS},
             timeout=20, message="clean shutdowns recorded")
    collector.send_signal(signal.SIGTERM)  # its final flush
    assert collector.wait(20) == 0


def test_broker_killed_mid_stream_loses_nothing_and_presence_comes_back(tmp_path):
    data = tmp_path / "data"
    org = stores.add_org(data, "acme")
    db = stores.database_for(data)
    port = free_port()
    url = f"mqtts://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    broker = _fleet("broker", "--data-dir", str(data), "--mqtt-port", str(port))
    procs.append(broker)
    try:
        wait_for(lambda: port_open(port), timeout=30, message="broker up")
        collector = _start_collector(data, db, url)
        procs.append(collector)
        agents = _start_agents(data, url, org.agent_key)
        procs += agents.values()
        wait_for(lambda: all(_gapless(db).get(m, 0) >= 10 for m in AGENTS), timeout=30, message="reports flowing")

        before = dict(_rows(db, "SELECT machine_id, session FROM machines"))
        broker.send_signal(signal.SIGKILL)
        broker.wait(10)
        wait_for(lambda: all(_queued(data, m) >= 5 for m in AGENTS), timeout=15,
                 message="agents keep reports on disk while the broker is gone")

        broker = _fleet("broker", "--data-dir", str(data), "--mqtt-port", str(port))
        procs.append(broker)
        wait_for(lambda: port_open(port), timeout=30, message="broker back")
        reader = connect_client(type("B", (), {"url": url, "ca_path": data / "certs" / "ca.pem"}), "acme/reader",
                                org.reader_key, "reader")
        inbox = Inbox(reader)
        inbox.subscribe("fleet/acme/+/ping")
        for m in AGENTS:
            topic = f"fleet/acme/{m}/ping"
            # The retained ping from before the crash is restored from disk at once...
            wait_for(lambda t=topic: inbox.on(t), timeout=10, message=f"{m}'s retained ping restored")
            # ...then the agent is back with a new session, announced online.
            wait_for(lambda t=topic, m=m: any(
                (p := payloads.parse_ping(x.payload, x.topic)).status == "online" and p.session != before[m]
                for x in inbox.on(t)), timeout=20, message=f"{m} reconnected with a new session")
        wait_for(lambda: all(_queued(data, m) == 0 for m in AGENTS), timeout=20, message="backlogs drained")
        def sessions(m: str) -> set[str]:
            return {r[0] for r in _rows(db, f"SELECT session FROM reports WHERE machine_id='{m}'")}

        wait_for(lambda: all(len(sessions(m)) >= 2 for m in AGENTS), timeout=20,
                 message="reports of the new sessions stored")
        wait_for(lambda: all(_gapless(db).get(m, 0) >= 20 for m in AGENTS), timeout=20, message="20 reports each")
        close(reader)

        _stop_agents_and_collector(data, db, agents, collector)
        totals = _gapless(db)
        assert all(totals[m] >= 20 for m in AGENTS), totals
        # No tail lost either: each session's reports continue one interval after the previous session's last.
        for m in AGENTS:
            spans = _rows(db, f"SELECT min(ts), max(ts) FROM reports WHERE machine_id='{m}'"
                                " GROUP BY session ORDER BY 1")
            for (_, last), (first, _) in zip(spans, spans[1:], strict=False):
                assert first - last < 0.2 * 1.9, (m, spans)  # one interval, with room for a late tick
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@dataclass
class Stream:
    """A broker, a witness subscribed to every report, a collector and the agents, all running."""

    url: str
    inbox: Inbox
    witness: Any
    agents: dict[str, subprocess.Popen]
    collector: subprocess.Popen
    procs: list[subprocess.Popen]


@contextmanager
def _stream(data: Path, db: str, org: credentials.OrgSecrets) -> Iterator[Stream]:
    """Everything of a fault test running, reports flowing; every process is killed at the end."""
    port = free_port()
    url = f"mqtts://127.0.0.1:{port}"
    procs = [_fleet("broker", "--data-dir", str(data), "--mqtt-port", str(port), "--database", db)]
    try:
        wait_for(lambda: port_open(port), timeout=30, message="broker up")
        # An independent witness: everything the broker routed, by (machine, session, seq).
        witness = connect_client(type("B", (), {"url": url, "ca_path": data / "certs" / "ca.pem"}), "acme/reader",
                                 org.reader_key, "witness")
        inbox = Inbox(witness)
        inbox.subscribe("fleet/acme/+/report", qos=1)
        collector = _start_collector(data, db, url)
        procs.append(collector)
        agents = _start_agents(data, url, org.agent_key, interval="0.1")
        procs += agents.values()
        wait_for(lambda: all(_gapless(db).get(m, 0) >= 10 for m in AGENTS), timeout=30, message="reports flowing")
        yield Stream(url, inbox, witness, agents, collector, procs)
        close(witness)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _stored_exactly_what_was_witnessed(inbox: Inbox, db: str) -> None:
    witnessed = {(m, r.session, r.seq) for x in inbox.messages
                 for m in [x.topic.split("/")[2]] for r in [payloads.parse_report(x.payload, x.topic)]}
    stored = set(_rows(db, "SELECT machine_id, session, seq FROM reports"))
    assert stored == witnessed, (f"missing {sorted(witnessed - stored)[:5]}, "
                                 f"unexpected {sorted(stored - witnessed)[:5]}")
    _gapless(db)


def test_collector_killed_mid_stream_loses_and_duplicates_nothing(tmp_path, database_url):
    data = tmp_path / "fleet-data"
    org = stores.add_org(data, "acme", database_url)
    with _stream(data, database_url, org) as stream:
        inbox = stream.inbox
        # Another writer holds the database: reports pile up in the collector, received but not committed...
        with write_lock(database_url):
            seen = len(inbox.messages)
            wait_for(lambda: len(inbox.messages) >= seen + 20, timeout=15,
                     message="reports while the database is held")
            stream.collector.send_signal(signal.SIGKILL)  # ...then it dies: had it acknowledged them, they'd be gone
            stream.collector.wait(10)
        seen = len(inbox.messages)
        wait_for(lambda: len(inbox.messages) >= seen + 10, timeout=15, message="agents keep reporting meanwhile")
        collector = _start_collector(data, database_url, stream.url)
        stream.procs.append(collector)
        _stop_agents_and_collector(data, database_url, stream.agents, collector)
        _stored_exactly_what_was_witnessed(inbox, database_url)


@pytest.mark.postgresql
def test_postgresql_restarted_mid_stream_loses_and_duplicates_nothing(tmp_path):
    """PostgreSQL goes away twice while reports flow: a clean restart (sessions cut) and a crash (immediate
    shutdown, recovery on start). The collector retries, reconnects, and acknowledges only what committed."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    pg = PostgresServer().start()  # its own server: restarting the shared one would disturb other tests
    try:
        data = tmp_path / "fleet-data"
        db = pg.database()
        org = stores.add_org(data, "acme", db)
        with _stream(data, db, org) as stream:
            for mode in ("fast", "immediate"):
                wait_for(lambda: all(_gapless(db).get(m, 0) >= 10 for m in AGENTS), timeout=30,
                         message="reports flowing")
                pg.stop(mode)
                seen = len(stream.inbox.messages)
                wait_for(lambda s=seen: len(stream.inbox.messages) >= s + 20, timeout=15,
                         message="reports while PostgreSQL is down")
                pg.start()
                before = sum(_gapless(db).values())
                wait_for(lambda b=before: sum(_gapless(db).values()) >= b + 20, timeout=30,
                         message=f"reports stored again after the {mode} restart")
            _stop_agents_and_collector(data, db, stream.agents, stream.collector)
            log = stream.collector.stderr.read()
            assert "database busy or unreachable" in log  # the retry path ran
            assert "Traceback" not in log
            _stored_exactly_what_was_witnessed(stream.inbox, db)
            # Each agent's presence made it through too: one online, one offline event per agent.
            events = _rows(db, "SELECT machine_id, new_status FROM events ORDER BY id")
            assert sorted(events) == sorted([(m, "online") for m in AGENTS] + [(m, "offline") for m in AGENTS])
    finally:
        pg.destroy()
