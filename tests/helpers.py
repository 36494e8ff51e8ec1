"""Shared test helpers: bounded waits, connected paho clients, and a thread-safe message inbox."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from bench.common import free_port, port_open  # noqa: F401 - one home for loopback helpers
from fleet.config import connack
from fleet.config.mqtt import BrokerAddress, new_client


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, message: str = "", *, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s: {message or predicate}")
        time.sleep(interval)


@dataclass(frozen=True)
class Received:
    """One message as a subscriber saw it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


class Inbox:
    """Collects the messages a paho client receives, for event-driven assertions."""

    def __init__(self, client: paho.Client) -> None:
        self.client = client
        self.messages: list[Received] = []
        self.subacks: dict[int, list[int]] = {}
        self._cond = threading.Condition()
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe

    def _on_message(self, _client: Any, _userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))
            self._cond.notify_all()

    def _on_subscribe(self, _client: Any, _userdata: Any, mid: int, reason_codes: Any, _props: Any = None) -> None:
        with self._cond:
            self.subacks[mid] = [int(getattr(rc, "value", rc)) for rc in reason_codes]
            self._cond.notify_all()

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        """Subscribe and wait for the SUBACK; returns its return codes (0x80 = refused)."""
        _, mid = self.client.subscribe(topic_filter, qos)
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self.subacks, timeout):
                raise AssertionError(f"no SUBACK for {topic_filter} within {timeout} s")
            return self.subacks[mid]

    def wait_for_count(self, n: int, timeout: float = 5.0) -> list[Received]:
        """Wait until at least ``n`` messages arrived; return them all."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= n, timeout):
                raise AssertionError(f"got {len(self.messages)} messages, expected {n} within {timeout} s")
            return list(self.messages)

    def wait_for_topic(self, topic: str, timeout: float = 5.0) -> Received:
        """Wait for the first message on ``topic``."""
        with self._cond:
            found: list[Received] = []

            def seen() -> bool:
                found[:] = [m for m in self.messages if m.topic == topic]
                return bool(found)

            if not self._cond.wait_for(seen, timeout):
                got = [m.topic for m in self.messages]
                raise AssertionError(f"no message on {topic} within {timeout} s (got {got})")
            return found[0]

    def on(self, topic: str) -> list[Received]:
        """Messages received so far on ``topic``."""
        with self._cond:
            return [m for m in self.messages if m.topic == topic]


def connect_client(broker: Any, username: str | None, password: str | None, client_id: str | None = None,
                   clean_session: bool = True, will: tuple[str, bytes, int, bool] | None = None,
                   keepalive: int = 60, ca_path: Any = None, expect_rc: int = 0, url: str | None = None,
                   timeout: float = 10.0, before_connect: Callable[[Any], Any] | None = None) -> Any:
    """A paho client connected to ``broker`` over TLS with its loop running.

    With ``expect_rc`` other than 0, returns the CONNACK code the broker answered instead.
    ``will`` is (topic, payload, qos, retain). ``before_connect(client)`` runs before CONNECT, e.g. to attach
    an Inbox that must not miss messages a persistent session receives right after CONNACK.
    """
    address = BrokerAddress.parse(url or broker.url)
    client = new_client(address, client_id or "", username, password,
                        ca_path if ca_path is not None else broker.ca_path, clean_session=clean_session)
    if will is not None:
        client.will_set(will[0], will[1], will[2], will[3])
    result: dict[str, int] = {}
    connected = threading.Event()

    def on_connect(_c: Any, _u: Any, _flags: Any, reason_code: Any, _props: Any = None) -> None:
        result["rc"] = int(getattr(reason_code, "value", reason_code))
        connected.set()

    client.on_connect = on_connect
    if before_connect is not None:
        before_connect(client)
    client.connect(address.host, address.port, keepalive=keepalive)
    client.loop_start()
    if not connected.wait(timeout):
        client.loop_stop()
        raise AssertionError("no CONNACK within timeout")
    rc = result["rc"]
    if expect_rc:
        client.loop_stop()
        client.disconnect()
        return connack.from_reason_code(rc)
    if rc != 0:
        client.loop_stop()
        raise AssertionError(f"connection refused, reason code {rc:#x}")
    return client


def tls_socket(broker: Any, timeout: float = 5.0) -> ssl.SSLSocket:
    """A TLS connection to ``broker``'s port, verified with its CA (handshake done, nothing sent)."""
    ctx = ssl.create_default_context(cafile=str(broker.ca_path))
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", broker.port), timeout=timeout),
                           server_hostname="127.0.0.1")


def close(client: Any) -> None:
    """Disconnect cleanly and stop the network loop."""
    client.disconnect()
    client.loop_stop()


def bearer(key: str) -> dict[str, str]:
    """The HTTP Authorization header for a reader key."""
    return {"Authorization": f"Bearer {key}"}


@dataclass
class BrokerProcess:
    """A broker in its own process, with the attributes connect_client uses (.url, .ca_path, .data_dir)."""

    port: int
    ca_path: Path
    data_dir: Path
    proc: subprocess.Popen

    host = "127.0.0.1"

    @property
    def url(self) -> str:
        """TLS URL clients connect to."""
        return f"mqtts://{self.host}:{self.port}"

    def kill(self) -> None:
        """Abrupt end (SIGKILL): no clean disconnects, nothing saved on the way out."""
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """Terminate and reap the process (idempotent)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
@contextlib.contextmanager
def descriptors_held(count: int = 1100) -> Iterator[None]:
    """Hold ``count`` open descriptors, so sockets opened meanwhile are numbered past select()'s 1024.

    ``fleet up`` shares its process with the broker: past ~1,000 agents every new socket's number is over
    FD_SETSIZE, which select() cannot watch.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = count + 200
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the hard descriptor limit ({hard}) is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need) if hard == resource.RLIM_INFINITY
                                                else min(hard, max(soft, need)), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
