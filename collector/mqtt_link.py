"""The collector's MQTT 3.1.1 connection: bulk reads, batched acknowledgements, one network thread.

The collector is the one client that receives every report of its orgs. paho reads a message with a
select() and four recv() calls and writes each PUBACK with two send()s, which leaves the collector's
validation and SQLite work too little room (docs/benchmarks.md, Ingest). This link reads up to 256 KiB
per recv(), cuts the PUBLISH packets out of that buffer, and writes the acknowledgements of a committed
batch with one send().

It implements only what the collector uses: CONNECT (persistent session, credentials, TLS with
hostname verification), SUBSCRIBE/UNSUBSCRIBE, receiving QoS 0/1 PUBLISH, PUBLISH QoS 1 of its own
(kept until acknowledged, resent after a reconnect), keepalive, reconnect with backoff and jitter,
DISCONNECT. All socket I/O happens on the network thread; other threads only queue bytes.
"""

from __future__ import annotations

import logging
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fleet.collector.errors import CollectorError
from fleet.collector.mqtt_codec import (
    Connack,
    Connect,
    Disconnect,
    MalformedPacket,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    decode,
    encode,
    encode_pubacks,
)
from fleet.config import connack as connack_codes
from fleet.config.mqtt import BrokerAddress, tls_context

log = logging.getLogger("fleet.collector")

READ_SIZE = 256 * 1024
CONNECT_TIMEOUT_S = 10.0
STOP_FLUSH_S = 2.0
NO_ACK = -1  # token of a QoS 0 message: nothing to acknowledge
CONNACK_SIZE = 4


PINGREQ = encode(Pingreq())
DISCONNECT = encode(Disconnect())


class LinkError(CollectorError):
    """The broker broke the protocol or refused the connection."""


class Refused(LinkError):
    """CONNACK with a non-zero return code (bad credentials, not authorized...)."""


@dataclass(frozen=True)
class LinkCallbacks:
    """What the link calls on its network thread; none of them may block for long except on_message."""

    on_connect: Callable[[bool], None]                         # session_present
    on_disconnect: Callable[[str], None]                       # why
    on_message: Callable[[bytes, bytes, bool, int], None]      # topic, payload, retained, ack token
    on_suback: Callable[[list[int]], None]                     # return codes (0x80 = refused)
    on_read: Callable[[], None]                                # the messages of one socket read are delivered


def _publish(topic: str, payload: bytes, mid: int, retain: bool, dup: bool = False) -> bytes:
    return encode(Publish(topic.encode("utf-8"), payload, 1, retain, mid, dup))


class MqttLink:
    """A persistent-session MQTT connection run by one daemon thread; see the module docstring."""

    def __init__(self, address: BrokerAddress, client_id: str, username: str | None, password: str | None,
                 ca_path: str | Path | None, keepalive: int, callbacks: LinkCallbacks,
                 min_delay: float = 0.2, max_delay: float = 5.0) -> None:
        self.address = address
        self.client_id = client_id
        self.keepalive = keepalive
        self.callbacks = callbacks
        self.min_delay = min_delay
        self.max_delay = max_delay
        self._connect = encode(Connect(client_id, username, password, keepalive, clean_session=False))
        self._tls = tls_context(ca_path) if address.tls else None
        self._lock = threading.Lock()
        self._out = bytearray()           # bytes for the current connection, written by the network thread
        self._inflight: dict[int, tuple[str, bytes, bool]] = {}  # our QoS 1 publishes until PUBACK
        self._next_mid = 0
        self._generation = 0               # ack tokens of an older connection are ignored
        self._connected = False
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="collector-mqtt", daemon=True)

    # --- any thread ---------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True between CONNACK and the loss of the connection."""
        return self._connected

    def start(self) -> None:
        """Start connecting in the background."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued and DISCONNECT (the broker keeps the session), then end the thread."""
        self._stop.set()
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()

    def subscribe(self, filters: list[tuple[str, int]]) -> None:
        """SUBSCRIBE to ``(filter, qos)`` pairs; the SUBACK's codes go to ``on_suback``."""
        with self._lock:
            self._queue(encode(Subscribe(self._new_mid(), tuple(filters))))

    def unsubscribe(self, filters: list[str]) -> None:
        """UNSUBSCRIBE from ``filters``."""
        with self._lock:
            self._queue(encode(Unsubscribe(self._new_mid(), tuple(filters))))

    def ack(self, tokens: Iterable[int]) -> None:
        """PUBACK the messages behind ``tokens`` (from ``on_message``), in one write."""
        with self._lock:
            generation = self._generation << 16
            # An older connection's messages are redelivered by the broker; acking them here would
            # acknowledge an id the broker no longer has in flight.
            out = encode_pubacks([token & 0xFFFF for token in tokens if token >= 0 and token & ~0xFFFF == generation])
            if out and self._connected:
                self._queue(out)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """PUBLISH at QoS 1; kept until the broker acknowledges it, resent after a reconnect."""
        with self._lock:
            mid = self._new_mid()
            self._inflight[mid] = (topic, payload, retain)
            if self._connected:
                self._queue(_publish(topic, payload, mid, retain))

    def _new_mid(self) -> int:
        while True:
            self._next_mid = self._next_mid % 65535 + 1
            if self._next_mid not in self._inflight:
                return self._next_mid

    def _queue(self, data: bytes) -> None:
        self._out += data
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\x00")
        except (BlockingIOError, OSError):
            pass  # already woken (buffer full) or closed at stop

    # --- network thread -----------------------------------------------------------------------
    def _run(self) -> None:
        delay = self.min_delay
        failures = 0
        while not self._stop.is_set():
            try:
                sock, session_present = self._open()
            except (OSError, LinkError, MalformedPacket) as exc:
                failures += 1
                level = logging.ERROR if isinstance(exc, Refused) else logging.WARNING
                if failures == 1 or isinstance(exc, Refused) and failures % 60 == 1:
                    log.log(level, "collector cannot connect to %s: %s (retrying)", self.address.url, exc)
                self._stop.wait(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self.max_delay)
                continue
            failures = 0
            why = "stopped"
            broken = False  # the broker broke the protocol: back off before trying again
            try:
                self.callbacks.on_connect(session_present)
                self._serve(sock)
            except OSError as exc:
                why = str(exc) or type(exc).__name__
            except (LinkError, MalformedPacket) as exc:
                why, broken = str(exc), True
            except Exception as exc:  # noqa: BLE001 - a bug must cost a reconnect, never the network thread
                log.exception("collector link error on %s", self.address.url)
                why, broken = f"internal error: {type(exc).__name__}: {exc}", True
            finally:
                with self._lock:
                    self._connected = False
                    self._out.clear()  # acks and subscriptions of this connection: redone on the next
                sock.close()
            self.callbacks.on_disconnect(why)
            if broken:
                self._stop.wait(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self.max_delay)
            else:
                delay = self.min_delay

    def _open(self) -> tuple[socket.socket, bool]:
        sock = socket.create_connection((self.address.host, self.address.port), timeout=CONNECT_TIMEOUT_S)
        try:
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.address.host)
            sock.sendall(self._connect)
            data = b""
            while len(data) < CONNACK_SIZE:  # read no further: queued messages may follow the CONNACK
                chunk = sock.recv(CONNACK_SIZE - len(data))
                if not chunk:
                    raise LinkError("connection closed before CONNACK")
                data += chunk
            found = decode(data)
            if found is None or not isinstance(found[0], Connack):
                raise LinkError(f"expected CONNACK, got {data.hex()}")
            connack = found[0]
            if connack.return_code:
                raise Refused(connack_codes.describe(connack.return_code))
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self._generation = (self._generation + 1) & 0x7FFF
            self._connected = True
            self._out.clear()
            for mid, (topic, payload, retain) in sorted(self._inflight.items()):
                self._out += _publish(topic, payload, mid, retain, dup=True)
        return sock, connack.session_present

    def _serve(self, sock: socket.socket) -> None:
        # poll, not select(): in `fleet up` the process holds thousands of agent sockets, and select()
        # cannot watch a descriptor numbered 1024 or more.
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        poller.register(sock, select.POLLIN)
        watching_out = False
        sock_fd, wake_fd = sock.fileno(), self._wake_r.fileno()
        buf = bytearray()
        out = bytearray()
        # TLS keeps decrypted bytes that poll() cannot see: ask the socket before sleeping.
        pending = sock.pending if isinstance(sock, ssl.SSLSocket) else lambda: 0
        ping_every = self.keepalive / 2
        next_ping = time.monotonic() + ping_every
        ping_sent: float | None = None
        stopping_since: float | None = None
        while True:
            with self._lock:
                if self._out:
                    out += self._out
                    self._out.clear()
            now = time.monotonic()
            if self._stop.is_set():
                if stopping_since is None:
                    stopping_since = now
                    out += DISCONNECT
                if not out or now - stopping_since > STOP_FLUSH_S:
                    return
            if now >= next_ping:
                if ping_sent is not None and now - ping_sent > self.keepalive:
                    raise LinkError(f"no PINGRESP within {self.keepalive} s")
                if ping_sent is None:
                    out += PINGREQ
                    ping_sent = now
                next_ping = now + ping_every
            timeout = 0.0 if pending() else max(0.0, min(next_ping - now, 0.5))
            if bool(out) != watching_out:
                watching_out = bool(out)
                poller.modify(sock, select.POLLIN | select.POLLOUT if watching_out else select.POLLIN)
            ready = {fd for fd, _ in poller.poll(timeout * 1000)}
            if wake_fd in ready:
                try:
                    self._wake_r.recv(4096)
                except BlockingIOError:
                    pass
            if sock_fd in ready or pending():
                try:
                    data = sock.recv(READ_SIZE)
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    data = None
                if data == b"":
                    raise LinkError("the broker closed the connection")
                if data:
                    buf += data
                    used, pong = self._dispatch(buf)
                    if used:
                        del buf[:used]
                        self.callbacks.on_read()
                    if pong:
                        ping_sent = None
            if out:
                try:
                    sent = sock.send(out[:READ_SIZE])
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    sent = 0
                del out[:sent]

    def _dispatch(self, buf: bytearray) -> tuple[int, bool]:
        """Handle every complete packet in ``buf``; return the bytes used and whether a PINGRESP came.

        A malformed packet raises MalformedPacket (the connection is dropped and made again); what came
        before it in ``buf`` has been delivered, unacknowledged, and the broker sends it again.
        """
        pos = 0
        pong = False
        on_message = self.callbacks.on_message
        generation = self._generation << 16
        while found := decode(buf, pos):
            packet, next_pos = found
            if type(packet) is Publish:
                if packet.qos == 1:
                    on_message(packet.topic, packet.payload, packet.retain, generation | packet.packet_id)
                elif packet.qos == 0:
                    on_message(packet.topic, packet.payload, packet.retain, NO_ACK)
                else:
                    raise LinkError("QoS 2 PUBLISH on a QoS 1 subscription")
            elif type(packet) is Puback:
                with self._lock:
                    self._inflight.pop(packet.packet_id, None)
            elif type(packet) is Suback:
                self.callbacks.on_suback(list(packet.return_codes))
            elif type(packet) is Pingresp:
                pong = True
            elif type(packet) is not Unsuback:  # UNSUBACK needs nothing
                raise LinkError(f"unexpected packet from the broker: {packet}")
            pos = next_pos
        return pos, pong
