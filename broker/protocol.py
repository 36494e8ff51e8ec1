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
from collections.abc import Callable
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import OUTGOING
from amqtt.mqtt.puback import PubackPacket
from amqtt.session import Session

CLOSE_DRAIN_S = 2.0  # a peer that reads nothing cannot hold a closing connection open longer
MAX_PACKET_BYTES = 1024 * 1024  # larger packets close the connection before being buffered

Router = Callable[[Session, str, bytes, int, bool], None]


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
    """Per-connection protocol handler: routes before PUBACK and enforces keepalive."""

    router: Router | None = None
    on_keepalive_expired: Callable[[Session], None] | None = None

    def handle_read_timeout(self) -> None:
        """Nothing arrived for 1.5 x keepalive: close the connection so the will is published."""
        session = self.session
        if session is not None and self.on_keepalive_expired is not None:
            self.on_keepalive_expired(session)
        abort(self.writer)

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:  # the amqtt seam: outgoing QoS 1
        """Outgoing QoS 1 waits for its PUBACK without a per-message timer; unacknowledged messages stay
        in flight (stock gave up after 5 s and forgot them) and are sent again when a persistent session
        returns, while closing the connection cancels the wait."""
        if app_message.direction != OUTGOING or self.session is None:
            await super()._handle_qos1_message_flow(app_message)
            return
        packet_id = app_message.packet_id
        self.session.inflight_out.setdefault(packet_id, app_message)
        packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
        await self._send_packet(packet)
        app_message.publish_packet = packet
        waiter = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            app_message.puback_packet = await waiter
        finally:
            self._puback_waiters.pop(packet_id, None)
        self.session.inflight_out.pop(packet_id, None)

    async def handle_publish(self, publish_packet: Any) -> None:
        """Route QoS 0/1 at once, then acknowledge; QoS 2 keeps amqtt's flow (routed on PUBREL)."""
        qos = publish_packet.qos
        topic = publish_packet.topic_name
        if qos == QOS_2 or self.router is None or self.session is None:
            await super().handle_publish(publish_packet)
            return
        if topic is None:
            return
        # amqtt parses a zero-length payload as None; it is a valid message (and clears a retained topic).
        self.router(self.session, topic, bytes(publish_packet.data or b""), qos, bool(publish_packet.retain_flag))
        if qos == QOS_1:
            await self._send_packet(PubackPacket.build(publish_packet.variable_header.packet_id))
