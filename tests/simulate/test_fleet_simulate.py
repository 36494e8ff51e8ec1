"""`fleet simulate`: simulated agents speak the real protocol and their counts add up, on both brokers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from fleet.agent import simulate
from fleet.agent.record import read_record
from fleet.agent.simulate import start_simulation
from fleet.config import payloads
from fleet.config.errors import InvalidId
from fleet.config.settings import Settings
from fleet.store import credentials
from tests import stores
from tests.helpers import Inbox, close, connect_client, wait_for

ROOT = Path(__file__).resolve().parents[2]


def _watch(broker, client_id="watcher"):
    """A QoS 1 subscriber to acme's topics with the service credential."""
    client = connect_client(broker, credentials.SERVICE_USERNAME, stores.ensure_service_key(broker.data_dir),
                            client_id)
    inbox = Inbox(client)
    inbox.subscribe("fleet/acme/#", qos=1)
    return client, inbox


def _reports(inbox):
    return [payloads.parse_report(m.payload, m.topic) for m in list(inbox.messages) if m.topic.endswith("/report")]


def _pings(inbox):
    return [payloads.parse_ping(m.payload, m.topic) for m in list(inbox.messages)
            if m.topic.endswith("/ping") and m.payload]


def _per_machine(reports):
    counts = defaultdict(int)
    for r in reports:
        counts[r.machine_id] += 1
    return counts


def _sim_settings(broker, acme, interval):
    return Settings(data_dir=broker.data_dir, broker_url=broker.url, org="acme", key=acme.agent_key,
                    interval=interval, reconnect_max_s=2.0)


def test_twenty_agents_report_ping_and_stop_cleanly(broker, acme):
    watcher, inbox = _watch(broker)
    sim = start_simulation(_sim_settings(broker, acme, 0.3), agents=20, seed=7)
    try:
        wait_for(lambda: len({r.machine_id for r in _reports(inbox)}) == 20, timeout=20,
                 message="reports from all 20 simulated agents")
        wait_for(lambda: sim.stats()["connected"] == 20, timeout=10, message="20 connected")
        wait_for(lambda: min(_per_machine(_reports(inbox)).values()) >= 3, timeout=15,
                 message="three reports from every agent")
        # A newcomer gets every agent's retained online ping, all from the agents' current sessions.
        late, late_inbox = _watch(broker, "late-reader")
        wait_for(lambda: len({p.machine_id for p in _pings(late_inbox)}) == 20, timeout=10,
                 message="20 retained online pings")
        assert {p.status for p in _pings(late_inbox)} == {"online"}
        close(late)
    finally:
        sim.stop()
    stats = sim.stats()
    assert stats["connected"] == 0
    assert stats["refused"] == 0
    assert stats["reconnects"] == 0
    wait_for(lambda: len({p.machine_id for p in _pings(inbox) if p.reason == "shutdown"}) == 20, timeout=10,
             message="offline/shutdown from each agent")
    reports = _reports(inbox)
    close(watcher)

    # Every acknowledged report reached the QoS 1 reader exactly once, numbered 0.. within its session.
    assert stats["acked"] == stats["sent"] == len(reports) == len({(r.machine_id, r.session, r.seq) for r in reports})
    seqs = defaultdict(list)
    for r in reports:
        seqs[(r.machine_id, r.session)].append(r.seq)
    assert all(sorted(s) == list(range(len(s))) for s in seqs.values())
    assert len(seqs) == 20  # one session per agent: no reconnects happened

    # Realistic, varying data: several OS families, metrics that move, counters that only grow.
    assert len({r.system["os"] for r in reports}) >= 3
    by_machine = defaultdict(list)
    for r in sorted(reports, key=lambda r: r.seq):
        by_machine[r.machine_id].append(r.metrics)
    walks = list(by_machine.values())
    assert any(len({m["cpu_percent"] for m in w}) > 1 for w in walks)
    for w in walks:
        sent = [m["net"]["bytes_sent"] for m in w]
        disk = [m["disks"][0]["percent"] for m in w]
        assert sent == sorted(sent)
        assert disk == sorted(disk)
    shutdown_sessions = {(p.machine_id, p.session) for p in _pings(inbox) if p.reason == "shutdown"}
    assert shutdown_sessions == set(seqs)


def test_wrong_key_is_refused_and_counted(broker, acme):
    settings = _sim_settings(broker, acme, 0.3).replace(key="not-the-key")
    sim = start_simulation(settings, agents=3, seed=1)
    try:
        wait_for(lambda: sim.stats()["refused"] >= 3, timeout=15, message="three refusals")
        assert sim.stats()["connects"] == 0
        assert sim.stats()["sent"] == 0
    finally:
        sim.stop()


def test_record_file_accounts_for_every_report_and_two_processes_share_an_org(broker, acme, tmp_path):
    watcher, inbox = _watch(broker)
    settings = _sim_settings(broker, acme, 0.2)
    paths = [tmp_path / "a.csv", tmp_path / "b.csv"]
    sims = [start_simulation(settings, agents=3, seed=1, prefix="east", record_path=paths[0]),
            start_simulation(settings, agents=2, seed=1, prefix="west", record_path=paths[1])]
    try:
        wait_for(lambda: len({r.machine_id for r in _reports(inbox)}) == 5, timeout=20, message="5 machines")
        wait_for(lambda: min(_per_machine(_reports(inbox)).values()) >= 3, timeout=15, message="3 reports each")
    finally:
        for sim in sims:
            sim.stop()
    assert {r.machine_id for r in _reports(inbox)} == {"east-0001", "east-0002", "east-0003", "west-0001",
                                                        "west-0002"}
    rec = read_record(paths)
    acked = sum(sim.stats()["acked"] for sim in sims)
    assert len(rec.published) == len(rec.acked) == acked == sum(sim.stats()["sent"] for sim in sims)
    assert {(m, s) for m, s, _ in rec.connects} == {(m, s) for m, s, _ in rec.published}
    wait_for(lambda: len(_reports(inbox)) >= acked, timeout=10, message="acked reports delivered")
    assert {(r.machine_id, r.session, r.seq) for r in _reports(inbox)} == rec.acked
    close(watcher)


def test_connect_window_grows_with_the_agent_count(broker, acme):
    settings = _sim_settings(broker, acme, 1.0)
    sim = start_simulation(settings, agents=600, seed=2, connect_rate=100)
    sim.stop()  # before any connect is due: only the schedule is looked at
    starts = sorted(agent.next_connect for agent in sim.agents)
    assert 5.0 < starts[-1] - starts[0] <= 6.0  # 600 agents / 100 a second, not squeezed into one interval


def test_bad_prefix_is_refused(broker, acme):
    with pytest.raises(InvalidId, match="machine name prefix"):
        start_simulation(_sim_settings(broker, acme, 1.0), agents=2, prefix="bad prefix")


def test_a_broker_that_never_answers_the_handshake_blocks_nothing(broker, acme, monkeypatch):
    # A listener that accepts TCP and then stays silent: every TLS handshake hangs until its deadline.
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    done = threading.Event()

    def accept_all():
        silent.settimeout(0.1)
        while not done.is_set():
            try:
                held.append(silent.accept()[0])
            except TimeoutError:
                continue

    acceptor = threading.Thread(target=accept_all, daemon=True)
    acceptor.start()
    monkeypatch.setattr(simulate, "CONNECT_TIMEOUT_S", 0.5)
    settings = _sim_settings(broker, acme, 1.0).replace(broker_url=f"mqtts://127.0.0.1:{silent.getsockname()[1]}")
    sim = start_simulation(settings, agents=20, seed=4, connect_rate=1000)
    try:
        # All 20 handshakes are pending at once in one shard; each gives up after its own deadline.
        wait_for(lambda: len(held) >= 20, timeout=10, message="20 TCP connections accepted")
        wait_for(lambda: sim.stats()["failed"] >= 20, timeout=10, message="20 handshakes timed out")
    finally:
        started = time.monotonic()
        sim.stop()
        done.set()
        acceptor.join(5)
        for conn in held:
            conn.close()
        silent.close()
    assert time.monotonic() - started < 5
    assert sim.stats()["connects"] == 0


class SilentBroker:
    """Plain-TCP MQTT stand-in: CONNACKs every CONNECT, then reads and ignores everything and never closes."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.done = threading.Event()
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self):
        self.server.settimeout(0.1)
        while not self.done.is_set():
            try:
                conn = self.server.accept()[0]
            except TimeoutError:
                continue
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(0.1)
        acked = False
        while not self.done.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:  # the client shut its side: keep ours open, and stay silent
                self.done.wait(0.05)
            elif not acked:
                conn.sendall(b"\x20\x02\x00\x00")  # CONNACK, accepted
                acked = True

    def close(self):
        self.done.set()
        self.acceptor.join(5)
        for conn in self.conns:
            conn.close()
        self.server.close()


def test_agents_whose_write_failed_inside_publish_reconnect(tmp_path):
    # The broker never closes, so nothing is ever readable: the shard learns of the dead connections only
    # when paho's own write inside publish() fails and paho closes the socket behind the selector's back.
    fake = SilentBroker()
    settings = Settings(data_dir=tmp_path, broker_url=f"mqtt://127.0.0.1:{fake.port}", org="acme", key="k",
                        interval=0.1, reconnect_max_s=0.2)
    sim = start_simulation(settings, agents=20, seed=3, connect_rate=200)
    try:
        wait_for(lambda: sim.stats()["connected"] == 20, timeout=10, message="20 connected")
        for agent in sim.agents:
            agent.live.socket().shutdown(socket.SHUT_WR)  # the next send fails with EPIPE
        wait_for(lambda: sim.stats()["reconnects"] >= 20 and sim.stats()["connected"] == 20, timeout=10,
                 message="every agent reconnected")
        assert all(shard.is_alive() for shard in sim.shards)
        assert sim.stats()["errors"] == 0
    finally:
        fake.close()  # before stopping: no wait for PUBACKs of offline pings that cannot come
        started = time.monotonic()
        sim.stop()
    assert time.monotonic() - started < 4  # connections found closed end the wait for those PUBACKs


def _fleet(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "fleet.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def test_cli_runs_until_sigterm_then_prints_summary(broker, acme, tmp_path):
    watcher, inbox = _watch(broker)
    proc = _fleet("simulate", "--data-dir", str(broker.data_dir), "--broker", broker.url, "--org", "acme",
                  "--ca", str(broker.ca_path), "--agents", "5", "--interval", "0.3", "--prefix", "cli",
                  "--connect-rate", "50", "--record", str(tmp_path / "record.csv"),
                  env={"FLEET_KEY": acme.agent_key})
    try:
        wait_for(lambda: proc.poll() is not None or len({r.machine_id for r in _reports(inbox)}) == 5, timeout=30,
                 message="reports from the CLI's 5 agents")
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["agents"] == 5
    assert summary["connected"] == 0
    assert summary["acked"] >= 5
    assert summary["all_connected_at"] >= summary["first_connect_at"] > 0
    assert {r.machine_id for r in _reports(inbox)} == {f"cli-000{i}" for i in range(1, 6)}
    assert len(read_record([tmp_path / "record.csv"]).acked) == summary["acked"]
    wait_for(lambda: len({p.machine_id for p in _pings(inbox) if p.reason == "shutdown"}) == 5, timeout=10,
             message="offline/shutdown from the CLI's agents")
    wait_for(lambda: len(_reports(inbox)) >= summary["acked"], timeout=10, message="acked reports delivered")
    close(watcher)


def test_cli_wrong_key_exits_1_with_one_line(broker, acme):
    proc = _fleet("simulate", "--data-dir", str(broker.data_dir), "--broker", broker.url, "--org", "acme",
                  "--ca", str(broker.ca_path), "--agents", "2", "--interval", "0.5", "--duration", "20",
                  env={"FLEET_KEY": "wrong"})
    _, err = proc.communicate(timeout=40)
    assert proc.returncode == 1
    assert "refused every simulated agent" in err
    assert "Traceback" not in err
    assert "wrong" not in err


@pytest.mark.mosquitto
def test_agents_reconnect_with_new_sessions_after_mosquitto_restart(fleet_dir, acme, tmp_path):
    from tests.mosquitto.process import start_mosquitto

    out_dir = tmp_path / "mosquitto"
    mosq = start_mosquitto(fleet_dir, out_dir)
    sim = start_simulation(_sim_settings(mosq, acme, 0.3), agents=5, seed=3)
    watcher = None
    try:
        watcher, inbox = _watch(mosq)
        wait_for(lambda: len({r.machine_id for r in _reports(inbox)}) == 5, timeout=15, message="5 reporting")
        before = {r.session for r in _reports(inbox)}
        mosq.kill()  # abrupt: every connection drops at once
        wait_for(lambda: sim.stats()["connected"] == 0, timeout=15, message="loss noticed")
        mosq = start_mosquitto(fleet_dir, out_dir, port=mosq.port)
        watcher, inbox = _watch(mosq, "watcher-2")
        wait_for(lambda: sim.stats()["connected"] == 5, timeout=20, message="all 5 back")
        assert sim.stats()["reconnects"] >= 5

        def new_sessions_reporting():
            return {r.machine_id for r in _reports(inbox) if r.session not in before}

        wait_for(lambda: len(new_sessions_reporting()) == 5, timeout=10, message="reports in new sessions")
        # Mosquitto saves every second, so the old sessions' retained pings may come back with it: each
        # machine's latest online ping is the one that must name a new session.
        latest = {p.machine_id: p.session for p in _pings(inbox) if p.status == "online"}
        assert len(latest) == 5
        assert not set(latest.values()) & before
    finally:
        sim.stop()
        if watcher is not None:
            close(watcher)
        mosq.stop()
