"""One client connection: a writer that closes quietly, and the protocol handler that routes a PUBLISH
before acknowledging it (its reader, which refuses huge packets: broker/framing.py).

Stock behaviour replaced here (amqtt 0.12.1):
- PUBACK was sent once a PUBLISH was queued for the broker's message loop, so a publisher disconnecting
  right after its PUBACKs could lose messages already acknowledged; here the message is routed first, then
  acknowledged;
- an outgoing QoS 1 message was forgotten 5 s after it was sent without a PUBACK; here it stays in
  flight until acknowledged and is sent again when a persistent session returns;
- ``handle_read_timeout`` did nothing (keepalive never enforced); here it drops the connection so the
  will is published (the broker's watchdog calls it, see broker/connect.py);
- the writer adapter drained before closing, so closing a connection whose peer had left raised;
- each connection ran a reader task that made a task per packet, and the broker's message loop four
  more waiter tasks re-created after every event (with ``asyncio.wait``); here packets are handled as
  they arrive, and ``serve()``, the connection's one task, handles those that must wait. A client
  leaving before stock start() had made its disconnect waiter left a connection that never ended, its
  session "connected" for ever, and every later CONNECT with its client id was refused after a 10 s wait.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from amqtt.adapters import StreamReaderAdapter, WriterAdapter
from amqtt.errors import CodecError, MQTTError, NoDataError
from amqtt.mqtt import packet_class
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.packet import (
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler, Subscription, UnSubscription
from amqtt.session import IncomingApplicationMessage, OutgoingApplicationMessage, Session

from fleet.broker.framing import GuardedReader
from fleet.broker.sessions import NO_QUEUE
from fleet.broker.store import Commit
from fleet.config.mqtt import remaining_length

CLOSE_DRAIN_S = 2.0  # a peer that reads nothing cannot hold a closing connection open longer
CONGESTED_BYTES = 1024 * 1024  # unsent bytes past which a connection counts as congested

HURRY_ACKS = 16  # PUBACKs of one connection waiting for one commit: it is made at once (BrokerStore.hurry)
MAX_QOS2_INFLIGHT = 100  # incoming QoS 2 messages held between PUBLISH and PUBREL, per connection
# What reading a packet raises when the peer left, sent garbage or a packet the codec refuses: the connection ends.
READ_FAILURES = (NoDataError, MQTTError, CodecError, OSError, ValueError, IndexError)

Router = Callable[[Session, str, bytes, int, bool], None]
PUBACK_HEADER = b"\x40\x02"  # PUBACK, remaining length 2 (the packet id follows)
PUBREC_HEADER = b"\x50\x02"
PUBCOMP_HEADER = b"\x70\x02"
PINGRESP = b"\xd0\x00"


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

    __slots__ = ("seq", "sent")

    def __init__(self, packet_id: int, topic: str, qos: int, data: bytes, retain: bool, seq: int | None) -> None:
        super().__init__(packet_id, topic, qos, data, retain)
        self.seq = seq
        self.sent = False  # written once: sent again with DUP


def publish_bytes(topic: str, data: bytes, qos: int, retain: bool, packet_id: int = 0, dup: bool = False) -> bytes:
    """A PUBLISH packet (QoS 0 or 1), encoded in one go (amqtt builds three objects and joins their bytes)."""
    name = topic.encode("utf-8")
    head = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    ident = packet_id.to_bytes(2, "big") if qos else b""
    length = 2 + len(name) + len(ident) + len(data)
    return b"".join((bytes((head,)), remaining_length(length), len(name).to_bytes(2, "big"), name, ident, data))


async def parse_with_amqtt(kind: int, flags: int, body: bytes) -> Any:
    """A packet cut by GuardedReader, parsed by amqtt's codec (for the rare kinds: SUBSCRIBE,
    UNSUBSCRIBE)."""
    stream = asyncio.StreamReader()
    stream.feed_data(body)
    stream.feed_eof()
    header = MQTTFixedHeader(kind, flags, len(body))
    return await packet_class(header).from_stream(StreamReaderAdapter(stream), fixed_header=header)


def abort_transport(transport: asyncio.WriteTransport) -> None:
    """transport.abort(), also on a TLS transport whose connection is already gone: Python 3.11.2's
    _SSLProtocolTransport.abort() then raises AttributeError (its protocol is None), which ended a connection's
    task before its session was marked disconnected, so every later CONNECT with that client id was refused."""
    try:
        transport.abort()
    except AttributeError:
        pass


class StreamWriter(WriterAdapter):
    """amqtt's writer adapter over an asyncio stream, with the transport public and a close that never raises.

    Stock StreamWriterAdapter.close() drains first, so closing a connection whose peer already left raised
    ConnectionResetError (logged by asyncio as an unhandled error for every port probe)."""

    def __init__(self, stream: asyncio.StreamWriter, max_unsent: int = 0,
                 on_unsent: Callable[[StreamWriter], None] | None = None) -> None:
        self.stream = stream
        self.transport = stream.transport
        self.is_closed = False
        peer = stream.get_extra_info("peername")  # asked now: a TLS transport forgets it once closed
        self.peer = (peer[0], peer[1]) if peer and len(peer) >= 2 else None
        self.max_unsent = max_unsent  # 0: no bound
        self.on_unsent = on_unsent  # called once more than max_unsent bytes wait to be sent
        self.identity: tuple[str, str] | None = None  # (subject CN, serial) of a verified client certificate

    def write(self, data: bytes) -> None:
        """Queue bytes for the peer (dropped once closed); past ``max_unsent`` unsent bytes, ``on_unsent``."""
        if self.is_closed:
            return
        self.transport.write(data)
        if self.max_unsent and self.transport.get_write_buffer_size() > self.max_unsent and self.on_unsent:
            self.on_unsent(self)

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
        abort_transport(self.transport)

    async def close(self) -> None:
        """Flush what is buffered if the peer is still there, then close; a peer that already left is not an error."""
        if self.is_closed:
            return
        self.is_closed = True
        try:
            async with asyncio.timeout(CLOSE_DRAIN_S):
                if not self.transport.is_closing():
                    await self.stream.drain()
            self.stream.close()
            # TLS waits for the peer's close_notify up to 30 s (asyncio's ssl_shutdown_timeout); many never send it.
            async with asyncio.timeout(CLOSE_DRAIN_S):
                await self.stream.wait_closed()
        except (TimeoutError, OSError):
            abort_transport(self.transport)


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
    on_subscribe: Callable[[Subscription], Coroutine[Any, Any, None]] | None = None
    on_unsubscribe: Callable[[UnSubscription], Coroutine[Any, Any, None]] | None = None
    on_dropped: Callable[[str, Session, str], None] | None = None
    durable_barrier: Callable[[], Commit | None] | None = None  # see BrokerStore.barrier
    hurry_barrier: Callable[[], None] | None = None  # see BrokerStore.hurry
    answered: Callable[[float, int], int] | None = None  # see CoalescingSelector.answered
    on_delivered: Callable[[Session, TrackedMessage], None] | None = None
    on_keepalive_expired: Callable[[Session], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # serve() hands SUBSCRIBE and UNSUBSCRIBE to the broker itself: amqtt's two queues for them stay empty.
        self._pending_subscriptions = self._pending_unsubscriptions = NO_QUEUE
        # PUBACKs not sent yet, oldest first, each with the commit it waits for: they go out in order.
        self._acks: deque[tuple[int, Commit | None]] = deque()
        self._ack_barrier: Commit | None = None  # the newest commit a callback waits for
        self._acks_on_barrier = 0  # of this connection's PUBACKs, those that wait for that commit
        self._awaiting: dict[int, TrackedMessage] = {}  # QoS 1 messages written, by packet id, until their PUBACK
        self._acked_at = -math.inf  # when PUBACK, PUBREC or PUBCOMP was last written to this client (time.monotonic())
        self._quick_streak = 0  # PUBLISHes in a row that came soon after an answer (CoalescingSelector.answered)

    async def serve(self) -> bool:
        """Handle the client's packets until it sends DISCONNECT (True) or the connection ends (False: the will
        is due). Packets that need no waiting are handled as they arrive (packet_received); this task handles
        the others, in order, awaiting only the transport (a client reading nothing stops being read) and the
        broker's SUBSCRIBE handling. PUBLISH, PUBACK, PINGREQ, PUBREL and DISCONNECT are decoded here (amqtt's
        codec reads a packet in five or more awaits); the rest by amqtt's codec."""
        reader = self.reader
        if not isinstance(reader, GuardedReader):
            return False
        reader.serve_packets(self.packet_received)
        while True:
            try:
                packet = await reader.next_packet()
                if packet is None:
                    return False
                kind, flags, body = packet
                if kind == PUBLISH:
                    self._publish_received(flags, body)
                    if self.congested():  # a client that reads none of its PUBACKs stops being read
                        await self.writer.drain()
                elif kind == DISCONNECT:
                    return True
                elif kind in (SUBSCRIBE, UNSUBSCRIBE):
                    parsed = await parse_with_amqtt(kind, flags, body)
                    if kind == SUBSCRIBE and self.on_subscribe is not None:
                        await self.on_subscribe(Subscription(parsed.variable_header.packet_id, parsed.payload.topics))
                    elif kind == UNSUBSCRIBE and self.on_unsubscribe is not None:
                        await self.on_unsubscribe(UnSubscription(parsed.variable_header.packet_id,
                                                                 parsed.payload.topics))
                elif not self.packet_received(kind, flags, body):
                    # CONNECT again, a reserved type, or a packet only a server sends
                    self.logger.warning("closing connection: unexpected packet type %d", kind)
                    return False
            except READ_FAILURES as exc:
                self.logger.debug("connection ended: %r", exc)
                return False

    def packet_received(self, kind: int, flags: int, body: bytes) -> bool:
        """Handle a packet that needs no waiting, as it arrives (True); False leaves it to serve()."""
        if kind == PUBLISH:
            if self.congested():  # serve() handles it, then waits for the client to read
                return False
            self._publish_received(flags, body)
        elif kind == PUBACK:
            self._puback_received(int.from_bytes(body[:2], "big"))
        elif kind == PINGREQ:
            self._write(PINGRESP)
        elif kind == PUBREL:
            self._release_qos2(int.from_bytes(body[:2], "big"))
        elif kind not in (PUBREC, PUBCOMP):  # those two: the broker sends nothing at QoS 2
            return False
        return True

    def _write(self, data: bytes) -> None:
        if self.writer is not None:
            self.writer.write(data)

    def _answer(self, data: bytes) -> None:
        """Write what a publisher waits for (PUBACK, PUBREC, PUBCOMP), and when."""
        self._write(data)
        self._acked_at = time.monotonic()

    def _publish_received(self, flags: int, body: bytes) -> None:
        """A PUBLISH, decoded: topic (UTF-8), packet id for QoS 1 and 2, payload."""
        qos = (flags >> 1) & 0x03
        end = 2 + int.from_bytes(body[:2], "big")
        if qos == 3 or end > len(body):
            raise MQTTError("malformed PUBLISH")
        topic = body[2:end].decode("utf-8")  # UnicodeDecodeError is a ValueError: the connection ends
        packet_id = int.from_bytes(body[end:end + 2], "big") if qos else 0
        self.receive_publish(topic, body[end + 2 if qos else end:], qos, bool(flags & 0x01), packet_id)

    def _puback_received(self, packet_id: int) -> None:
        """The client acknowledged an outgoing QoS 1 message: it leaves the session's in-flight set."""
        message = self._awaiting.pop(packet_id, None)
        session = self.session
        if message is None or session is None:
            self.logger.warning("Received PUBACK for unknown pending message Id: '%d'", packet_id)
            return
        session.inflight_out.pop(packet_id, None)
        if self.on_delivered is not None:
            self.on_delivered(session, message)

    def handle_read_timeout(self) -> None:
        """Nothing arrived for 1.5 x keepalive: close the connection so the will is published."""
        session = self.session
        if session is not None and self.on_keepalive_expired is not None:
            self.on_keepalive_expired(session)
        abort(self.writer)

    async def _retry_deliveries(self) -> None:  # the amqtt seam: what was in flight, sent again on reconnect
        """Send again what was in flight, without waiting for the acknowledgements: stock amqtt waited up to
        10 s for them inside start(), before the connection's disconnect waiter existed, so a client leaving
        meanwhile left a connection that never ended. Held incoming QoS 2 messages wait for the PUBREL the
        client sends again (MQTT 4.4)."""
        if self.session is None:
            return
        for message in list(self.session.inflight_out.values()):
            if isinstance(message, TrackedMessage):
                self._send_tracked(message)

    def is_open(self) -> bool:
        """True while the connection can still carry a message."""
        return isinstance(self.writer, StreamWriter) and not self.writer.is_closed

    def congested(self) -> bool:
        """True while more than CONGESTED_BYTES wait to be sent to this client (QoS 1 stays bounded by the
        broker's in-flight window; QoS 0 is dropped meanwhile)."""
        return isinstance(self.writer, StreamWriter) and self.writer.transport.get_write_buffer_size() > CONGESTED_BYTES

    def start_delivery(self, topic: str, data: bytes, qos: int, retain: bool, seq: int | None) -> None:
        """Send one message to this client now. At QoS 1 it stays in the session's in-flight set until its PUBACK
        (then on_delivered); if the connection ends first, it is sent again when a persistent session returns. No
        task or future per message: amqtt ran a task per message, awaiting the write and then the PUBACK."""
        session = self.session
        if qos == QOS_0 or session is None:
            if self.congested():  # QoS 0 may be dropped: a client reading nothing does not grow our buffers
                if self.on_dropped is not None and session is not None:
                    self.on_dropped("slow_subscriber", session, topic)
            else:
                self._write(publish_bytes(topic, data, QOS_0, retain))
            return
        message = TrackedMessage(session.next_packet_id, topic, QOS_1, data, retain, seq)
        session.inflight_out[message.packet_id] = message
        self._send_tracked(message)

    def _send_tracked(self, message: TrackedMessage) -> None:
        """Write an outgoing QoS 1 message (again, with DUP, if it was sent before); it awaits its PUBACK without
        a timer: unacknowledged, it stays in flight (stock gave up after 5 s and forgot it) and is sent again
        when a persistent session returns. It is awaited before the bytes are written, so no acknowledgement,
        however quick, finds nothing (amqtt registered its waiter only after awaiting the write)."""
        if self.session is None or not self.is_open():  # nobody would answer; it stays in flight for the next one
            return
        self._awaiting[message.packet_id] = message
        self._write(publish_bytes(message.topic, bytes(message.data), QOS_1, bool(message.retain), message.packet_id,
                                  dup=message.sent))
        message.sent = True

    def receive_publish(self, topic: str, data: bytes, qos: int, retain: bool, packet_id: int) -> None:
        """Route QoS 0/1 at once, then acknowledge once what routing changed is on disk; QoS 2 is held until
        its PUBREL. Never waits for the disk: a PUBACK that must is sent as its commit completes, in order."""
        if self.router is None or self.session is None:
            return
        if self.answered is not None:
            self._quick_streak = self.answered(self._acked_at, self._quick_streak)
        if qos == QOS_2:
            self._hold_qos2(topic, data, retain, packet_id)
            return
        self.router(self.session, topic, data, qos, retain)
        if qos != QOS_1:
            return
        barrier = self.durable_barrier() if self.durable_barrier is not None else None
        self._acks.append((packet_id, barrier))
        if barrier is not None and not barrier.done():
            if barrier is not self._ack_barrier:  # one callback per commit this connection waits for
                self._ack_barrier = barrier
                self._acks_on_barrier = 0
                barrier.add_done_callback(self._send_acks)
            self._acks_on_barrier += 1
            # A publisher with 20 messages in flight (paho's and libmosquitto's default) is not held to 20 a window.
            if self._acks_on_barrier == HURRY_ACKS and self.hurry_barrier is not None:
                self.hurry_barrier()
        else:
            self._send_acks()

    def _send_acks(self, _committed: object = None) -> None:
        """Write the queued PUBACKs whose messages are on disk, oldest first, all in one write; called at once
        when nothing waits for the disk, else when a commit completes (no task: the barrier calls back)."""
        ready = []
        acks = self._acks
        while acks and (acks[0][1] is None or acks[0][1].done()):
            ready.append(acks.popleft()[0])
        if ready:
            self._answer(PubackBatch(ready).data)

    def _hold_qos2(self, topic: str, data: bytes, retain: bool, packet_id: int) -> None:
        """QoS 2, MQTT's method A: keep the message until its PUBREL, acknowledge with PUBREC (again for a
        duplicate). At most MAX_QOS2_INFLIGHT are held; beyond, the message is dropped and counted."""
        session = self.session
        assert session is not None
        if packet_id not in session.inflight_in:
            if len(session.inflight_in) >= MAX_QOS2_INFLIGHT:
                if self.on_dropped is not None:
                    self.on_dropped("qos2_inflight_full", session, topic)
            else:
                session.inflight_in[packet_id] = IncomingApplicationMessage(packet_id, topic, QOS_2, data, retain)
        self._answer(PUBREC_HEADER + packet_id.to_bytes(2, "big"))

    def _release_qos2(self, packet_id: int) -> None:
        """PUBREL: route the held QoS 2 message (once), then PUBCOMP."""
        session = self.session
        message = session.inflight_in.pop(packet_id, None) if session is not None else None
        if message is not None and self.router is not None and session is not None:
            self.router(session, message.topic, bytes(message.data), QOS_2, bool(message.retain))
        self._answer(PUBCOMP_HEADER + packet_id.to_bytes(2, "big"))

