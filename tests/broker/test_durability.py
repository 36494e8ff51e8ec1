"""Messages for persistent sessions are on disk before the publisher's PUBACK, written in group commits,
deleted once the subscriber acknowledges them, and restored in order after a restart or a SIGKILL."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from fleet.broker import store as store_module
from fleet.broker.pacing import RUSH_STREAK, selector_of
from fleet.broker.protocol import HURRY_ACKS
from fleet.broker.server import start_in_thread
from fleet.collector.mqtt_codec import Connack, Connect, Publish, encode, encode_pubacks
from fleet.store import credentials
from tests import stores
from tests.helpers import BrokerProcess, Inbox, close, connect_client, free_port, port_open, tls_socket, wait_for

REPORTS = "fleet/acme/+/report"
COLLECTOR = "collector-like"


def queued_rows(data_dir: Path) -> list[tuple[str, bytes]]:
    """(client_id, payload) of every queued row in broker.db, oldest first, as another process sees them."""
    conn = sqlite3.connect(data_dir / "broker.db", timeout=5)
    try:
        return [(c, bytes(p)) for c, p in conn.execute("SELECT client_id, payload FROM queued ORDER BY seq")]
    finally:
        conn.close()


def collector(broker, clean_session: bool = False, **kw):
    return connect_client(broker, credentials.SERVICE_USERNAME, stores.ensure_service_key(broker.data_dir),
                          COLLECTOR, clean_session=clean_session, **kw)


def subscribe_then_leave(broker) -> None:
    """A persistent session subscribed to acme's reports, then offline."""
    sub = collector(broker)
    Inbox(sub).subscribe(REPORTS, qos=1)
    close(sub)


@contextmanager
def agent_socket(broker, acme) -> Iterator[ssl.SSLSocket]:
    """A raw TLS connection of acme's agent web-1, CONNACKed (reads time out after 10 s)."""
    with tls_socket(broker, timeout=10) as sock:
        sock.sendall(encode(Connect("fleet-acme-web-1", "acme/agent", acme.agent_key)))
        assert sock.recv(4) == encode(Connack())
        yield sock


def read_pubacks(sock: ssl.SSLSocket, count: int) -> bytes:
    """What the broker sends until ``count`` PUBACKs' worth of bytes arrived (the socket's timeout bounds it)."""
    acks = b""
    while len(acks) < len(encode_pubacks(range(count))):
        acks += sock.recv(65536)
    return acks


def reconnect(broker, manual_ack: bool = False, **kw) -> Inbox:
    """The persistent session back, with an Inbox attached before CONNECT (``manual_ack``: it acknowledges nothing)."""
    inboxes: list[Inbox] = []

    def prepare(client) -> None:
        client.manual_ack_set(manual_ack)
        inboxes.append(Inbox(client))

    collector(broker, before_connect=prepare, **kw)
    return inboxes[0]


def agent(broker, acme, machine: str = "web-1", **kw):
    return connect_client(broker, "acme/agent", acme.agent_key, f"fleet-acme-{machine}", **kw)


def test_acknowledged_means_on_disk(broker, acme):
    subscribe_then_leave(broker)
    a = agent(broker, acme)
    a.publish("fleet/acme/web-1/report", b"m0", qos=1).wait_for_publish(5)
    # The PUBACK arrived: the row is committed, visible to another connection at once.
    assert queued_rows(broker.data_dir) == [(COLLECTOR, b"m0")]
    close(a)


def test_acknowledged_by_the_subscriber_means_deleted(broker, acme):
    subscribe_then_leave(broker)
    a = agent(broker, acme)
    for i in range(50):
        a.publish("fleet/acme/web-1/report", f"m{i}".encode(), qos=1).wait_for_publish(5)
    close(a)
    assert len(queued_rows(broker.data_dir)) == 50
    inbox = reconnect(broker)
    assert [m.payload for m in inbox.wait_for_count(50)] == [f"m{i}".encode() for i in range(50)]
    wait_for(lambda: not queued_rows(broker.data_dir), timeout=5, message="acknowledged rows deleted")


def test_a_clean_session_replacing_a_persistent_one_drops_its_queue(broker, acme):
    subscribe_then_leave(broker)
    a = agent(broker, acme)
    a.publish("fleet/acme/web-1/report", b"m0", qos=1).wait_for_publish(5)
    close(a)
    close(collector(broker, clean_session=True))
    wait_for(lambda: not queued_rows(broker.data_dir), timeout=5, message="queue of the deleted session gone")


def test_one_write_for_the_pubacks_of_a_loop_turn(broker, acme):
    """200 PUBLISHes in one send arrive in one or a few reads: a handful of commits, not 200."""
    subscribe_then_leave(broker)
    with agent_socket(broker, acme) as sock:
        before = broker.stats().get("store_commits", 0)
        sock.sendall(b"".join(encode(Publish(b"fleet/acme/web-1/report", f"m{i}".encode(), qos=1, packet_id=i + 1))
                              for i in range(200)))
        assert read_pubacks(sock, 200) == encode_pubacks(range(1, 201))  # all of them, in order
    commits = broker.stats()["store_commits"] - before
    assert 1 <= commits <= 20, commits
    assert len(queued_rows(broker.data_dir)) == 200


def test_a_publisher_with_16_pubacks_waiting_is_not_held_to_the_window(broker, acme, monkeypatch):
    """16 PUBLISHes of one connection waiting for one commit have it made at once, whatever the window."""
    subscribe_then_leave(broker)
    monkeypatch.setattr(store_module, "GROUP_WINDOW_S", 60.0)
    with agent_socket(broker, acme) as sock:
        sock.sendall(b"".join(encode(Publish(b"fleet/acme/web-1/report", f"m{i}".encode(), qos=1, packet_id=i + 1))
                              for i in range(HURRY_ACKS)))
        assert read_pubacks(sock, HURRY_ACKS) == encode_pubacks(range(1, HURRY_ACKS + 1))
    assert len(queued_rows(broker.data_dir)) == HURRY_ACKS


def test_a_publisher_in_lock_step_is_not_held_to_the_loops_gathering(broker_settings, acme):
    """A publisher that sends each PUBLISH once the last is acknowledged (each exchange a group commit) is not
    made to wait for the event loop's gathering (broker/pacing.py) once the broker sees it waiting."""
    broker = start_in_thread(broker_settings.replace(broker_coalesce_ms=100))
    try:
        subscribe_then_leave(broker)
        selector = selector_of(broker.loop)
        assert selector is not None
        with agent_socket(broker, acme) as sock:
            gathered = []
            for i in range(1, 22):
                gathered.append(selector.gathered)
                sock.sendall(encode(Publish(b"fleet/acme/web-1/report", f"m{i}".encode(), qos=1, packet_id=i)))
                assert read_pubacks(sock, 1) == encode_pubacks([i])
        # the first exchanges cannot tell (RUSH_STREAK of them, each just after a PUBACK); none waits after
        assert gathered[-1] - gathered[RUSH_STREAK + 1] <= 1, gathered
        assert len(queued_rows(broker.data_dir)) == 21
    finally:
        broker.stop()


def test_the_on_disk_queue_is_bounded_like_the_memory_one(fleet_dir, acme):
    broker = start_in_thread(__import__("fleet.config.settings", fromlist=["Settings"]).Settings(
        data_dir=fleet_dir, mqtt_port=0, service_queued_messages=5))
    try:
        subscribe_then_leave(broker)
        a = agent(broker, acme)
        for i in range(20):
            a.publish("fleet/acme/web-1/report", f"m{i}".encode(), qos=1).wait_for_publish(5)
        close(a)
        assert [p for _, p in queued_rows(fleet_dir)] == [f"m{i}".encode() for i in range(5)]
        assert broker.stats()["dropped_queue_full"] == 15
    finally:
        broker.stop()


def test_a_restart_restores_the_queue_in_order(broker_settings, acme):
    first = start_in_thread(broker_settings)
    subscribe_then_leave(first)
    publishers = [agent(first, acme, m) for m in ("web-1", "db-1")]
    for i in range(100):
        for p, machine in zip(publishers, ("web-1", "db-1"), strict=True):
            p.publish(f"fleet/acme/{machine}/report", f"{machine}:{i}".encode(), qos=1).wait_for_publish(5)
    for p in publishers:
        close(p)
    first.stop()
    second = start_in_thread(broker_settings.replace(mqtt_port=first.port))
    try:
        inbox = reconnect(second)
        got = [m.payload.decode() for m in inbox.wait_for_count(200)]
        assert got == [f"{m}:{i}" for i in range(100) for m in ("web-1", "db-1")]
    finally:
        second.stop()


# SIGKILL of a real `fleet broker` ---------------------------------------------------------------------
def run_broker(data_dir: Path, port: int) -> BrokerProcess:
    proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "broker", "--data-dir", str(data_dir),
                             "--mqtt-port", str(port)], env={**os.environ, "FLEET_LOG_LEVEL": "WARNING"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: proc.poll() is not None or port_open(port), timeout=30, message="fleet broker listening")
    assert proc.poll() is None, "fleet broker exited"
    return BrokerProcess(port, data_dir / "certs" / "ca.pem", data_dir, proc)


class Publisher:
    """An agent publishing m0, m1, … at QoS 1 as fast as its in-flight window allows; records what was acked."""

    def __init__(self, broker: BrokerProcess, acme, machine: str, count: int) -> None:
        self.machine = machine
        self.client = agent(broker, acme, machine, before_connect=lambda c: c.max_inflight_messages_set(50))
        self.client.reconnect_delay_set(300, 300)  # once the broker is killed, this publisher is done
        self.sent: dict[int, str] = {}
        self.acked_mids: set[int] = set()
        self._lock = threading.Lock()
        self.client.on_publish = self._on_publish
        self.thread = threading.Thread(target=self._run, args=(count,), daemon=True)

    def _on_publish(self, _client, _userdata, mid, _reason_code=None, _properties=None) -> None:
        with self._lock:
            self.acked_mids.add(mid)

    def _run(self, count: int) -> None:
        for i in range(count):
            info = self.client.publish(f"fleet/acme/{self.machine}/report", f"{self.machine}:{i}".encode(), qos=1)
            if info.rc != paho.MQTT_ERR_SUCCESS and info.rc != paho.MQTT_ERR_NO_CONN:
                return
            with self._lock:
                self.sent[info.mid] = f"{self.machine}:{i}"

    def acked(self) -> list[str]:
        with self._lock:
            return sorted((self.sent[m] for m in self.acked_mids if m in self.sent), key=lambda p: int(p.split(":")[1]))


def _kill_while_publishing(data_dir: Path, acme, slow_subscriber: bool) -> tuple[list[Publisher], Inbox]:
    port = free_port()
    broker = run_broker(data_dir, port)
    try:
        slow = None
        if slow_subscriber:  # connected, but acknowledges nothing: every message stays in flight and on disk
            slow = collector(broker, before_connect=lambda client: client.manual_ack_set(True))
            slow.reconnect_delay_set(300, 300)
            Inbox(slow).subscribe(REPORTS, qos=1)
        else:
            subscribe_then_leave(broker)
        publishers = [Publisher(broker, acme, m, 3000) for m in ("web-1", "db-1")]
        for p in publishers:
            p.thread.start()
        wait_for(lambda: all(len(p.acked_mids) >= 300 for p in publishers), timeout=60,
                 message="300 messages acknowledged per publisher")
        broker.kill()  # mid-stream: more messages are in flight and unacknowledged
        for p in publishers:
            p.thread.join(30)
            p.client.loop_stop()
        if slow is not None:
            slow.loop_stop()
    finally:
        broker.stop()
    restarted = run_broker(data_dir, port)
    try:
        inbox = reconnect(restarted, timeout=20)
        for p in publishers:
            acked = set(p.acked())
            wait_for(lambda acked=acked: acked <= {m.payload.decode() for m in inbox.messages}, timeout=60,
                     message=f"every message {p.machine} got a PUBACK for")
    finally:
        restarted.stop()
    return publishers, inbox


def _assert_in_order_per_publisher(publishers: list[Publisher], inbox: Inbox) -> None:
    for p in publishers:
        seqs = [int(m.payload.decode().split(":")[1]) for m in inbox.messages
                if m.payload.decode().startswith(f"{p.machine}:")]
        assert seqs == sorted(seqs), f"{p.machine} out of order"
        assert len(p.acked()) >= 300


@pytest.mark.slow
def test_sigkill_loses_nothing_acknowledged_for_an_offline_subscriber(fleet_dir, acme):
    publishers, inbox = _kill_while_publishing(fleet_dir, acme, slow_subscriber=False)
    _assert_in_order_per_publisher(publishers, inbox)


@pytest.mark.slow
def test_sigkill_loses_nothing_acknowledged_for_a_slow_subscriber(fleet_dir, acme):
    publishers, inbox = _kill_while_publishing(fleet_dir, acme, slow_subscriber=True)
    _assert_in_order_per_publisher(publishers, inbox)


def test_in_flight_window_bounds_a_subscriber_that_never_acknowledges(broker, acme, monkeypatch):
    """At most INFLIGHT_WINDOW messages in flight per session, however often a non-acknowledging client comes
    back; the rest wait in order and follow once acknowledgements come."""
    from fleet.broker import routing

    monkeypatch.setattr(routing, "INFLIGHT_WINDOW", 5)
    subscribe_then_leave(broker)
    a = agent(broker, acme)
    for i in range(20):
        a.publish("fleet/acme/web-1/report", f"m{i}".encode(), qos=1).wait_for_publish(5)
    close(a)
    session = broker.broker.sessions[COLLECTOR][0]
    for _ in range(3):
        inbox = reconnect(broker, manual_ack=True)
        wait_for(lambda inbox=inbox: len({m.payload for m in inbox.messages}) >= 5, timeout=5, message="window sent")
        assert len(session.inflight_out) == 5
        close(inbox.client)
    inbox = reconnect(broker)
    got = [m.payload for m in inbox.wait_for_count(20, timeout=15)]
    assert got == [f"m{i}".encode() for i in range(20)]
    wait_for(lambda: not queued_rows(broker.data_dir), timeout=5, message="acknowledged rows deleted")


def test_a_puback_read_while_its_publish_is_still_being_written_is_matched(broker, acme, caplog, monkeypatch):
    """A delivery may wait in drain() after writing its PUBLISH (a full transport buffer, as when a backlog goes
    out after a restart); the subscriber's PUBACK can arrive meanwhile and must still complete it (it used to
    find no waiter yet: "Received PUBACK for unknown pending message", the message stuck in flight and on
    disk). A slow drain stands in for the full buffer."""
    from fleet.broker import protocol

    drain = protocol.StreamWriter.drain

    async def slow_drain(self) -> None:
        await asyncio.sleep(0.05)
        await drain(self)

    monkeypatch.setattr(protocol.StreamWriter, "drain", slow_drain)
    subscribe_then_leave(broker)
    inbox = reconnect(broker)
    a = agent(broker, acme)
    for i in range(10):
        a.publish("fleet/acme/web-1/report", f"m{i}".encode(), qos=1).wait_for_publish(10)
    close(a)
    assert [m.payload for m in inbox.wait_for_count(10, timeout=10)] == [f"m{i}".encode() for i in range(10)]
    session = broker.broker.sessions[COLLECTOR][0]
    wait_for(lambda: not session.inflight_out, timeout=10, message="every delivery acknowledged")
    wait_for(lambda: not queued_rows(broker.data_dir), timeout=10, message="every row deleted")
    assert "unknown pending message" not in caplog.text
    close(inbox.client)
