"""A connection's bytes cut into MQTT packets as they arrive, and handed to its handler in the same callback.

amqtt reads a connection through an ``asyncio.StreamReader``: every arrival wakes the connection's task,
which then awaits the fixed header and the body in two or more reads. Here the transport's
``data_received`` appends to the connection's own buffer and cuts every whole packet out of it; once the
session is served, a packet the handler can act on at once (PUBLISH, PUBACK, PINGREQ, PUBREL) is handled in
that same callback, and only the others (SUBSCRIBE, DISCONNECT, a PUBLISH while the client reads nothing,
whatever follows them) wake the task, in order. Before that, amqtt's CONNECT parser reads the same buffer
through ``read(n)``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from amqtt.adapters import ReaderAdapter
from amqtt.errors import MQTTError

MAX_PACKET_BYTES = 1024 * 1024  # larger payloads close the connection before being buffered
# A PUBLISH's topic and packet id come on top of its payload (the limit is what amqtt's reader applied: to the
# payload, read apart from the variable header), so a 1 MiB payload is still read, then dropped at 64 KiB.
MAX_BODY_BYTES = MAX_PACKET_BYTES + 2 + 0xFFFF + 2
BUFFER_LIMIT = 64 * 1024  # bytes held past what is being read, or packets waiting for the task: reading pauses
MAX_HELD = 64  # packets waiting for the connection's task; past it, reading pauses

Packet = tuple[int, int, bytes]  # (type, flags, body)
# Handles a packet at once and says so, or returns False to leave it to the connection's task.
Dispatch = Callable[[int, int, bytes], bool]


class GuardedReader(ReaderAdapter):
    """The connection's reader: amqtt's ``read(n)`` for CONNECT, then whole packets (``serve_packets``).

    A packet announcing a body over MAX_BODY_BYTES closes the connection before the body is buffered; after
    that every read is EOF (amqtt's CONNECT parser treats read errors as "try again", and the rest of the
    oversized body must not be parsed as packets). ``last_read`` is when the last whole packet (or read)
    arrived, for the keepalive watchdog.
    """

    def __init__(self) -> None:
        self.on_oversize: Callable[[int], None] = lambda size: None  # set by the broker once it has the writer
        self._buffer = bytearray()
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._dispatch: Dispatch | None = None
        self._held: deque[Packet | BaseException] = deque()
        self.tripped = False
        self.last_read = time.monotonic()

    # --- fed by the protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        """The transport, paused and resumed as the buffer fills and empties."""
        self._transport = transport

    def feed(self, data: bytes) -> None:
        """Bytes from the peer: kept for read(), or cut into packets once served."""
        if self._eof:
            return
        self._buffer += data
        if self._dispatch is not None:
            self._cut()
        else:
            self._wake()
            if len(self._buffer) > BUFFER_LIMIT:
                self._pause()

    def feed_eof(self) -> None:
        """The peer finished (or the connection is gone): reads return what is left, then EOF."""
        self._eof = True
        self._wake()

    # --- amqtt's reader API, for CONNECT -------------------------------------------------------------
    async def read(self, n: int = -1) -> bytes:
        """Exactly ``n`` bytes, fewer only at EOF (all until EOF for -1); EOF once tripped."""
        if self.tripped:
            return b""
        if n > MAX_PACKET_BYTES:
            self._trip(n)
            return b""
        while not self._eof and (n < 0 or len(self._buffer) < n):
            await self._wait()
        if self.tripped:
            return b""
        size = len(self._buffer) if n < 0 else min(n, len(self._buffer))
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        self.last_read = time.monotonic()
        return data

    # --- packets, once the session is served ---------------------------------------------------------
    def serve_packets(self, dispatch: Dispatch) -> None:
        """From now on every whole packet goes to ``dispatch`` as it arrives (what is buffered: now); those it
        leaves, and all after them, wait for ``next_packet()``."""
        self._dispatch = dispatch
        self._cut()
        if not self._held:
            self._resume()

    async def next_packet(self) -> Packet | None:
        """The next packet ``dispatch`` left, in order; None at the end of the stream or once tripped. What
        failed in ``dispatch`` (a malformed packet) is raised here."""
        while not self._held:
            if self._eof:
                return None
            await self._wait()
        item = self._held.popleft()
        if not self._held:
            self._resume()
        if isinstance(item, BaseException):
            raise item
        return item

    def _cut(self) -> None:
        """Cut every whole packet out of the buffer; dispatch each at once unless packets wait for the task."""
        buffer = self._buffer
        dispatch = self._dispatch
        held = self._held
        start = 0
        size = len(buffer)
        try:
            while size - start >= 2:
                length, shift, index = 0, 0, start + 1
                while True:
                    if index >= size:
                        length = -1  # the remaining length is not all here yet
                        break
                    byte = buffer[index]
                    length |= (byte & 0x7F) << shift
                    index += 1
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise MQTTError("remaining length over four bytes")
                if length < 0:
                    break
                if length > MAX_BODY_BYTES:
                    self._trip(length)
                    return
                end = index + length
                if end > size:
                    break
                head = buffer[start]
                body = bytes(buffer[index:end])
                if not start:  # the first whole packet of this read
                    self.last_read = time.monotonic()
                start = end
                if held or dispatch is None or not dispatch(head >> 4, head & 0x0F, body):
                    held.append((head >> 4, head & 0x0F, body))
        except Exception as exc:  # noqa: BLE001 - the task raises it, after the packets before it
            held.append(exc)
            self._eof = True
            buffer.clear()
            self._pause()
            self._wake()
            return
        if start:
            del buffer[:start]
        if held:
            self._wake()
            if len(held) >= MAX_HELD or len(buffer) > BUFFER_LIMIT:
                self._pause()

    # --- waiting and flow control --------------------------------------------------------------------
    def _trip(self, size: int) -> None:
        self.tripped = True
        self._buffer.clear()
        self.feed_eof()
        self.on_oversize(size)

    async def _wait(self) -> None:
        if self._paused:  # the task wants more than is here: the peer may send again
            self._resume()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            try:
                self._transport.pause_reading()
            except (AttributeError, RuntimeError):  # a transport already closed
                pass

    def _resume(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            try:
                self._transport.resume_reading()
            except (AttributeError, RuntimeError):
                pass


class PacketProtocol(asyncio.StreamReaderProtocol):
    """The connection's asyncio protocol: what arrives goes to its GuardedReader; flow control and close
    waiting for the writer are asyncio's (StreamReaderProtocol's), over a StreamReader that stays empty."""

    def __init__(self, reader: GuardedReader, loop: asyncio.AbstractEventLoop) -> None:
        self.stream = asyncio.StreamReader(loop=loop)  # held here: the base class keeps only a weak reference
        super().__init__(self.stream, loop=loop)
        self.reader = reader

    def connection_made(self, transport: Any) -> None:
        """Hand the transport to the reader too."""
        super().connection_made(transport)
        self.reader.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        """Bytes from the peer, straight to the reader."""
        self.reader.feed(data)

    def eof_received(self) -> bool:
        """The peer finished sending."""
        self.reader.feed_eof()
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: the reader ends, and whoever waits to write is woken."""
        self.reader.feed_eof()
        super().connection_lost(exc)
