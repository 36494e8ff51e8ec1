"""One MQTT connection of the agent: a fresh session id, its last will, and PUBACKs handed back.

A new paho client is made for every connection, because the will (which carries the session id)
is fixed at CONNECT. paho's network thread only puts events on a queue; the agent's main loop
does everything else (SQLite, decisions), so nothing blocks the network thread.
"""

from __future__ import annotations

import os
import queue
import random
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

from fleet.agent.errors import AgentError
from fleet.config import connack, payloads
from fleet.config.mqtt import BrokerAddress, new_client, paho
from fleet.config.status import OFFLINE
from fleet.config.topics import agent_client_id, ping_topic

# Refusals that retrying cannot fix, and what the agent's user can do about them.
FATAL_CONNACK = {connack.UNACCEPTABLE_PROTOCOL: "broker does not speak MQTT 3.1.1",
                 connack.IDENTIFIER_REJECTED: "client id rejected (check --org and --machine)",
                 connack.BAD_CREDENTIALS: "bad key",
                 connack.NOT_AUTHORIZED: "not authorised: bad key, or the org does not exist"}


BACKOFF_BASE_S = 0.5
RECONNECT_WINDOW_MAX_S = 10.0


def reconnect_window(interval: float) -> float:
    """How long the first reconnect after a lost or refused connection may wait: about one interval (what is
    measured meanwhile waits in the outbox), so thousands of agents return to a restarted broker spread out."""
    return min(RECONNECT_WINDOW_MAX_S, max(BACKOFF_BASE_S, interval))


def backoff_delay(attempt: int, cap: float, first: float = BACKOFF_BASE_S,
                  rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: attempt 1 waits up to ``first``, each later one up to twice as long
    as the one before, at most ``cap``."""
    return (rng or random).uniform(0, min(cap, first * 2 ** min(max(attempt, 1) - 1, 30)))


class FatalConnectError(AgentError):
    """A refusal that retrying will not fix (bad key, unknown CA)."""


def new_session() -> str:
    """A fresh session id for a new connection (= secrets.token_hex(8), without importing hashlib)."""
    return os.urandom(8).hex()


@dataclass
class Connection:
    """A live (or connecting) MQTT connection with its own session id."""

    address: BrokerAddress
    org: str
    machine: str
    key: str = field(repr=False)
    ca_path: str
    hardware_id: str
    interval: float
    keepalive: int
    session: str = field(default_factory=new_session)
    prev: tuple[str, int] | None = None  # the previous session and its last seq, told in every online ping
    events: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)
    wake: threading.Event = field(default_factory=threading.Event)
    client: Any = None
    _connack: threading.Event = field(default_factory=threading.Event)
    _rc: int | None = None

    def open(self, timeout: float = 10.0) -> None:
        """Connect (TLS verified, will set); raise FatalConnectError or AgentError on failure."""
        will = payloads.encode(payloads.build_ping(self.machine, self.hardware_id, self.session, OFFLINE,
                                                   self.interval, reason="lost"))
        client = new_client(self.address, agent_client_id(self.org, self.machine), f"{self.org}/agent", self.key,
                            self.ca_path, clean_session=True)
        client.will_set(ping_topic(self.org, self.machine), will, qos=1, retain=True)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(3600, 3600)  # reconnects are ours, with a new session each time
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self.client = client
        try:
            client.connect(self.address.host, self.address.port, keepalive=self.keepalive)
        except ssl.SSLCertVerificationError as exc:
            raise FatalConnectError(f"TLS verification of {self.address.url} failed ({exc.verify_message}); "
                                    f"is --ca the broker's CA?") from exc
        except (OSError, ssl.SSLError) as exc:
            raise AgentError(f"cannot reach broker {self.address.url}: {exc}") from exc
        client.loop_start()
        if not self._connack.wait(timeout):
            self.close()
            raise AgentError(f"no answer from broker {self.address.url} within {timeout:.0f} s")
        if self._rc:
            self.close()
            reason = FATAL_CONNACK.get(self._rc)
            if reason:
                raise FatalConnectError(f"broker refused the connection: {reason}")
            raise AgentError(f"broker refused the connection: {connack.describe(self._rc)}")

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason_code: Any, _p: Any = None) -> None:
        self._rc = connack.from_reason_code(reason_code)
        self._connack.set()

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason_code: Any, _p: Any = None) -> None:
        self.events.put(("disconnected", str(reason_code)))
        self.wake.set()

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: Any = None, _p: Any = None) -> None:
        self.events.put(("acked", mid))
        self.wake.set()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Publish at QoS 1; returns the message id whose PUBACK will arrive as an ``acked`` event."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise AgentError(f"publish failed: {paho.error_string(info.rc)}")
        return info.mid

    def ping(self, status: str, ts: float, reason: str | None = None) -> int:
        """Publish this session's retained presence ping."""
        body = payloads.build_ping(self.machine, self.hardware_id, self.session, status, self.interval,
                                   ts=ts, reason=reason, prev=self.prev)
        return self.publish(ping_topic(self.org, self.machine), payloads.encode(body), retain=True)

    def is_connected(self) -> bool:
        """True while the network connection is up."""
        return self.client is not None and self.client.is_connected()

    def close(self, clean: bool = True) -> None:
        """Disconnect (a clean DISCONNECT suppresses the will) and stop the network thread."""
        if self.client is None:
            return
        if clean:
            self.client.disconnect()
        self.client.loop_stop()
