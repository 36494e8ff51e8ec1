"""Helpers of the collector's end-to-end tests: brokers as endpoints, simulated agents, bounded waits."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from fleet.config import payloads
from fleet.config.mqtt import BrokerAddress, new_client
from fleet.config.settings import Settings
from fleet.config.topics import agent_client_id, ping_topic, report_topic
from fleet.store import credentials
from tests import stores
from tests.dbhelpers import rows
from tests.helpers import free_port, port_open, wait_for  # noqa: F401 - re-exported to the collector tests


@dataclass
class Endpoint:
    """A running broker as the collector tests see it: where it is and the keys of org ``acme``."""

    url: str
    ca: Path | None
    data_dir: Path
    keys: credentials.OrgSecrets
    stop: Callable[[], None]
    restart: Callable[[], None]
    anonymous: bool = False
    database: str = ""  # the database URL the collector under test writes to

    def user(self, role: str) -> tuple[str | None, str | None]:
        if role == "service":
            return credentials.SERVICE_USERNAME, stores.ensure_service_key(self.data_dir, self.database)
        key = self.keys.agent_key if role == "agent" else self.keys.reader_key
        return f"{self.keys.org}/{role}", key

    def settings(self, **changes) -> Settings:
        base = dict(data_dir=self.data_dir, database_url=self.database, broker_url=self.url, ca=str(self.ca or ""),
                    batch_interval_s=0.05, reload_interval_s=0.5, interval=1.0)
        base.update(changes)
        return Settings(**base)

    def client(self, client_id: str, role: str, clean_session: bool = True, will: tuple[str, bytes] | None = None,
               on_message=None) -> paho.Client:
        """A connected paho client (loop running); waits for CONNACK."""
        username, key = self.user(role)
        client = new_client(BrokerAddress.parse(self.url), client_id, username, key, self.ca,
                            clean_session=clean_session)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        connected = threading.Event()
        refused: list = []

        def on_connect(_c, _u, _f, rc, _p=None) -> None:
            if rc.is_failure:
                refused.append(rc)
            connected.set()

        client.on_connect = on_connect
        if on_message is not None:
            client.on_message = on_message
        address = BrokerAddress.parse(self.url)
        client.connect(address.host, address.port, keepalive=30)
        client.loop_start()
        if not connected.wait(10) or refused:
            client.loop_stop()
            raise AssertionError(f"{client_id} could not connect as {role}: {refused or 'no CONNACK'}")
        return client


def mosquitto_endpoint_at(tmp_path: Path, database: str = "") -> Endpoint:
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed")
    data_dir = tmp_path / "fleet-data"  # where the database_url fixture puts a SQLite database
    keys = stores.add_org(data_dir, "acme", database or None)
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    # Loopback only, anonymous allowed: this fixture tests the collector, not Mosquitto's access model.
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n")
    state: dict = {}

    def start() -> None:
        state["proc"] = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(port), 10, "mosquitto to listen")

    def stop() -> None:
        proc = state.pop("proc", None)
        if proc is not None:
            proc.terminate()
            proc.wait(10)

    start()
    return Endpoint(f"mqtt://127.0.0.1:{port}", None, data_dir, keys, stop, start, anonymous=True,
                    database=database or stores.database_for(data_dir))


def embedded_endpoint(running, keys: credentials.OrgSecrets) -> Endpoint:
    """An endpoint on the embedded broker fixture; restart() starts it again on the same port."""
    from fleet.broker.server import start_in_thread

    state = {"broker": running}

    def stop() -> None:
        state["broker"].stop()

    def restart() -> None:
        state["broker"] = start_in_thread(state["broker"].settings)

    ep = Endpoint(running.url, running.ca_path, running.data_dir, keys, stop, restart,
                  database=running.settings.database)
    ep.current = lambda: state["broker"]
    return ep


@dataclass
class SimAgent:
    """A simulated agent speaking the real protocol: retained pings, last will, reports with seq."""

    endpoint: Endpoint
    machine: str
    hardware_id: str = "0xhw1"
    interval_s: float = 1.0
    session: str = field(default_factory=lambda: os.urandom(6).hex())
    seq: int = 0
    client: paho.Client | None = None

    def connect(self) -> SimAgent:
        org = self.endpoint.keys.org
        will = payloads.encode(payloads.build_ping(self.machine, self.hardware_id, self.session, "offline",
                                                   self.interval_s, reason="lost"))
        self.client = self.endpoint.client(agent_client_id(org, self.machine), "agent",
                                           will=(ping_topic(org, self.machine), will))
        return self

    def ping(self, status: str = "online", reason: str | None = None, session: str | None = None) -> None:
        payload = payloads.build_ping(self.machine, self.hardware_id, session or self.session, status,
                                      self.interval_s, ts=time.time(), reason=reason)
        self.publish(ping_topic(self.endpoint.keys.org, self.machine), payloads.encode(payload), retain=True)

    def report(self, **metrics) -> int:
        seq = self.seq
        system = {"os": "Linux", "hardware_id": self.hardware_id}
        payload = payloads.build_report(self.machine, self.hardware_id, self.session, seq, time.time(),
                                        {"cpu_percent": 10.0, **metrics}, system)
        self.publish(report_topic(self.endpoint.keys.org, self.machine), payloads.encode(payload))
        self.seq += 1
        return seq

    def publish(self, topic: str, raw: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, raw, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), f"PUBACK missing for {topic}"

    def drop(self) -> None:
        """Vanish without DISCONNECT, so the broker publishes the last will."""
        self.client.loop_stop()
        self.client.socket().close() if self.client.socket() else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()



def query(endpoint: Endpoint, sql: str, *args):
    """Run a read query on the endpoint's database (a fresh connection, as the web does)."""
    return rows(endpoint.database, sql, *args)


def end_agent_and_probe(agent: subprocess.Popen, probe: subprocess.Popen) -> None:
    """Stop a `fleet agent` process (SIGTERM, its output read) and kill a probe process the test started."""
    agent.terminate()
    agent.communicate(timeout=20)
    if probe.poll() is None:
        probe.kill()
        probe.wait(5)
