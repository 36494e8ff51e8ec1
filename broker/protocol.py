"""One client connection: a reader that refuses huge packets, a writer that closes quietly, and the
protocol handler that routes a PUBLISH before acknowledging it.

Stock behaviour replaced here (amqtt 0.12.1):
- PUBACK was sent once a PUBLISH was queued for the broker's message loop, so a publisher disconnecting
  right after its PUBACKs lost about half of them; here the message is routed first, then acknowledged;
- an outgoing QoS 1 message was forgotten 5 s after it was sent without a PUBACK; here it stays in
  flight until acknowledged and is sent again when a persistent session returns;
- ``handle_read_timeout`` did nothing (keepalive never enforced); here it drops the connection so the
  will is published (the broker's watchdog calls it, see broker/connect.py);
- the writer adapter drained before closing, so closing a connection whose peer had left raised.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import OUTGOING
from amqtt.session import OutgoingApplicationMessage, Session

CLOSE_DRAIN_S = 2.0  # a peer that reads nothing cannot hold a closing connection open longer
MAX_PACKET_BYTES = 1024 * 1024  # larger packets close the connection before being buffered

Router = Callable[[Session, str, bytes, int, bool], None]
PUBACK_HEADER = b"\x40\x02"  # PUBACK, remaining length 2 (the packet id follows)


class PubackBatch:
    """Several PUBACKs written at once (one TLS record, one send) where amqtt writes a packet at a time."""

    def __init__(self, packet_ids: list[int]) -> None:
        self.data = b"".join(PUBACK_HEADER + packet_id.to_bytes(2, "big") for packet_id in packet_ids)

    async def to_stream(self, writer: WriterAdapter) -> None:
        """Write all of them, then wait for the transport like any packet."""
        writer.write(self.data)
        await writer.drain()


class TrackedMessage(OutgoingApplicationMessage):
    """An outgoing QoS 1 message the broker follows until the subscriber acknowledges it (``seq``: its row in
    broker.db's queue, or None when it has none)."""

    __slots__ = ("seq",)

    def __init__(self, packet_id: int, topic: str, qos: int, data: bytes, retain: bool, seq: int | None) -> None:
        super().__init__(packet_id, topic, qos, data, retain)
        self.seq = seq


class GuardedReader(ReaderAdapter):
    """Reader adapter that will not buffer a packet body over MAX_PACKET_BYTES: it closes the connection.

    amqtt's reader loop treats read errors as "try again", so after tripping every read returns EOF
    (otherwise the rest of the oversized payload would be parsed as packets).
    """

    def __init__(self, inner: Any, on_oversize: Callable[[int], None]) -> None:
        self._inner = inner
        self._on_oversize = on_oversize
        self.tripped = False
        self.last_read = time.monotonic()

    async def read(self, n: int = -1) -> bytes:
        """Read like the wrapped adapter; EOF for ever once an oversized body was announced."""
        if self.tripped:
            return b""
        if n > MAX_PACKET_BYTES:
            self.tripped = True
            self._on_oversize(n)
            return b""
        data = await self._inner.read(n)
        self.last_read = time.monotonic()
        return data

    def feed_eof(self) -> None:
        """Pass EOF through."""
        self._inner.feed_eof()


class StreamWriter(WriterAdapter):
    """amqtt's writer adapter over an asyncio stream, with the transport public and a close that never raises.

    Stock StreamWriterAdapter.close() drains first, so closing a connection whose peer already left raised
    ConnectionResetError (logged by asyncio as an unhandled error for every port probe)."""

    def __init__(self, stream: asyncio.StreamWriter) -> None:
        self.stream = stream
        self.transport = stream.transport
        self.is_closed = False
        peer = stream.get_extra_info("peername")  # asked now: a TLS transport forgets it once closed
        self.peer = (peer[0], peer[1]) if peer and len(peer) >= 2 else None

    def write(self, data: bytes) -> None:
        """Queue bytes for the peer (dropped once closed)."""
        if not self.is_closed:
            self.stream.write(data)

    async def drain(self) -> None:
        """Wait for the transport's buffer to drain (a lost peer raises ConnectionError to the sender)."""
        if not self.is_closed:
            await self.stream.drain()

    def get_peer_info(self) -> tuple[str, int] | None:
        """(address, port) of the peer."""
        return self.peer

    def get_ssl_info(self) -> Any:
        """The TLS object of the connection, if any."""
        return self.stream.get_extra_info("ssl_object")

    def abort(self) -> None:
        """Drop the connection at once, as if the network failed."""
        self.is_closed = True
        self.transport.abort()

    async def close(self) -> None:
        """Flush what is buffered if the peer is still there, then close; a peer that already left is not an error."""
        if self.is_closed:
            return
        self.is_closed = True
        try:
            if not self.transport.is_closing():
                await asyncio.wait_for(self.stream.drain(), CLOSE_DRAIN_S)
            self.stream.close()
            await self.stream.wait_closed()
        except (TimeoutError, OSError):
            self.transport.abort()


def abort(writer: Any) -> bool:
    """Drop a connection served by StreamWriter at once; False when there is none to drop."""
    if isinstance(writer, StreamWriter) and not writer.transport.is_closing():
        writer.abort()
        return True
    return False


class FleetProtocolHandler(BrokerProtocolHandler):
    """Per-connection protocol handler: routes before PUBACK, acknowledges once that is durable, tracks
    outgoing QoS 1 messages until acknowledged, and enforces keepalive."""

    router: Router | None = None
    durable_barrier: Callable[[], asyncio.Future[None] | None] | None = None  # see BrokerStore.barrier
    on_delivered: Callable[[Session, TrackedMessage], None] | None = None
    on_keepalive_expired: Callable[[Session], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resends: set[asyncio.Future[None]] = set()
        # PUBACKs not sent yet, oldest first, each with the commit it waits for: they go out in order.
        self._acks: deque[tuple[int, asyncio.Future[None] | None]] = deque()
        self._acks_sending = False

    def handle_read_timeout(self) -> None:
        """Nothing arrived for 1.5 x keepalive: close the connection so the will is published."""
        session = self.session
        if session is not None and self.on_keepalive_expired is not None:
            self.on_keepalive_expired(session)
        abort(self.writer)

    async def _retry_deliveries(self) -> None:  # the amqtt seam: what was in flight, sent again on reconnect
        """Send again what was in flight, without waiting for the acknowledgements: stock amqtt waited up to
        10 s for them inside start(), before the connection's disconnect waiter existed, so a client leaving
        meanwhile left a connection that never ended."""
        if self.session is None:
            return
        for message in [*self.session.inflight_in.values(), *self.session.inflight_out.values()]:
            task = asyncio.ensure_future(self._handle_message_flow(message))
            self._resends.add(task)
            task.add_done_callback(self._resends.discard)

    def is_open(self) -> bool:
        """True while the connection can still carry a message."""
        return isinstance(self.writer, StreamWriter) and not self.writer.is_closed

    def start_delivery(self, topic: str, data: bytes, qos: int, retain: bool,
                       seq: int | None) -> Coroutine[Any, Any, Any]:
        """The coroutine that sends one message to this client. A QoS 1 message is in the session's in-flight
        set from this call on (so the broker can bound it) until its PUBACK (see on_delivered)."""
        if qos == QOS_0 or self.session is None:
            return self.mqtt_publish(topic, data, QOS_0, retain=retain)
        message = TrackedMessage(self.session.next_packet_id, topic, QOS_1, data, retain, seq)
        self.session.inflight_out[message.packet_id] = message
        return self._handle_qos1_message_flow(message)

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:  # the amqtt seam: outgoing QoS 1
        """Outgoing QoS 1 waits for its PUBACK without a per-message timer; unacknowledged messages stay
        in flight (stock gave up after 5 s and forgot them) and are sent again when a persistent session
        returns, while closing the connection cancels the wait."""
        if app_message.direction != OUTGOING or self.session is None:
            await super()._handle_qos1_message_flow(app_message)
            return
        session = self.session
        packet_id = app_message.packet_id
        session.inflight_out.setdefault(packet_id, app_message)
        packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
        # Waiting starts before sending: the PUBACK may be read while the send still waits in drain().
        waiter = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            await self._send_packet(packet)
            app_message.publish_packet = packet
            if not self.is_open() and not waiter.done():
                return  # the connection ended meanwhile: nobody will answer; it stays in flight for the next one
            app_message.puback_packet = await waiter
        finally:
            self._puback_waiters.pop(packet_id, None)
        session.inflight_out.pop(packet_id, None)
        if isinstance(app_message, TrackedMessage) and self.on_delivered is not None:
            self.on_delivered(session, app_message)

    async def handle_publish(self, publish_packet: Any) -> None:
        """Route QoS 0/1 at once, then acknowledge once what routing changed is on disk; QoS 2 keeps amqtt's
        flow (routed on PUBREL)."""
        qos = publish_packet.qos
        topic = publish_packet.topic_name
        if qos == QOS_2 or self.router is None or self.session is None:
            await super().handle_publish(publish_packet)
            return
        if topic is None:
            return
        # amqtt parses a zero-length payload as None; it is a valid message (and clears a retained topic).
        self.router(self.session, topic, bytes(publish_packet.data or b""), qos, bool(publish_packet.retain_flag))
        if qos != QOS_1:
            return
        barrier = self.durable_barrier() if self.durable_barrier is not None else None
        self._acks.append((publish_packet.variable_header.packet_id, barrier))
        if not self._acks_sending:  # else the task sending acknowledgements takes this one too
            await self._send_acks()

    async def _send_acks(self) -> None:
        """Send the queued PUBACKs in order, each once its message is on disk, as many per write as are ready."""
        self._acks_sending = True
        try:
            while self._acks:
                oldest = self._acks[0][1]
                if oldest is not None and not oldest.done():
                    await asyncio.shield(oldest)  # a batch's commit, shared with other publishers: never cancel it
                ready = []
                while self._acks and (self._acks[0][1] is None or self._acks[0][1].done()):
                    ready.append(self._acks.popleft()[0])
                await self._send_packet(PubackBatch(ready))
        finally:
            self._acks_sending = False
