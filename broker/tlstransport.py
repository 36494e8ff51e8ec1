"""A TLS connection with lean plumbing: OpenSSL over memory buffers (``ssl.SSLObject``), fed straight from a
non-blocking socket the event loop watches, as an asyncio transport for the connection's
``StreamReaderProtocol``.

asyncio's own TLS transport (sslproto) stacks a TLS protocol on a socket transport and moves every record
through several layers of Python calls and buffers, each connection holding a read buffer of its own. Here a
readable socket is read once into a buffer all connections of the loop share (one per thread; the loop runs
one callback at a time), every whole TLS record in it is decrypted in the same call, and what a turn of the
loop writes to a connection is encrypted and sent at its end in one ``send()``. Handshake: ``handshake()``, in
the connection's task.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from typing import Any, NamedTuple

from fleet.broker.listener import reset

RECV_SIZE = 256 * 1024  # what one read takes from a socket at most
READ_SIZE = 16 * 1024  # a TLS record's plaintext at most
HIGH_WATER = 64 * 1024  # unsent bytes past which the protocol is paused (asyncio's default)
LOW_WATER = HIGH_WATER // 4
_per_thread = threading.local()  # each thread runs its own event loop: a read buffer and a flusher each


def read_buffer() -> memoryview:
    """This thread's read buffer: every connection of its event loop reads into it first, one at a time. Made
    by the first call in a thread (a TLS listener's start)."""
    buffer = getattr(_per_thread, "buffer", None)
    if buffer is None:
        buffer = _per_thread.buffer = memoryview(bytearray(RECV_SIZE))
    return buffer


class Flusher:
    """Sends what connections wrote in a turn of the loop at its end: one callback for all of them, not one each."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._due: list[TLSSocketTransport] = []

    def add(self, transport: TLSSocketTransport) -> None:
        """Flush ``transport`` at the end of this turn."""
        if not self._due:
            self.loop.call_soon(self._run)
        self._due.append(transport)

    def _run(self) -> None:
        due, self._due = self._due, []
        for transport in due:
            transport.flush()


def flusher(loop: asyncio.AbstractEventLoop) -> Flusher:
    """The flusher of ``loop``, which runs in this thread."""
    found: Flusher | None = getattr(_per_thread, "flusher", None)
    if found is None or found.loop is not loop:
        found = _per_thread.flusher = Flusher(loop)
    return found


class TLS(NamedTuple):
    """A server-side TLS session whose handshake is done, and the socket it runs on."""

    sock: socket.socket
    session: ssl.SSLObject
    incoming: ssl.MemoryBIO  # bytes from the peer, not yet decrypted
    outgoing: ssl.MemoryBIO  # encrypted bytes for the peer, not yet sent


async def handshake(sock: socket.socket, context: ssl.SSLContext) -> TLS:
    """The server side of a TLS handshake on an accepted socket; raises what OpenSSL raises (ssl.SSLError,
    OSError), or EOFError when the peer leaves half-way. Bounded by the caller's timeout; on any failure, a
    cancellation included, the socket is closed with a reset."""
    sock.setblocking(False)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    session = context.wrap_bio(incoming, outgoing, server_side=True)
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                session.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            if outgoing.pending:
                await loop.sock_sendall(sock, outgoing.read())
            if done:
                return TLS(sock, session, incoming, outgoing)
            data = await loop.sock_recv(sock, READ_SIZE)
            if not data:
                raise EOFError("the peer closed the connection during the TLS handshake")
            incoming.write(data)
    except BaseException:
        reset(sock)
        raise


class TLSSocketTransport(asyncio.Transport):
    """The transport of a TLS connection whose handshake is done: what arrives is decrypted and fed to
    ``protocol``; what is written in one turn of the event loop is encrypted and sent at its end, the rest when
    the socket can take it; asyncio's flow control both ways."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: TLS, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._loop = loop
        self._sock, self._session, self._incoming, self._outgoing = tls
        self._fd = self._sock.fileno()
        self._read_into = read_buffer()  # the loop's thread's: the transport's callbacks all run there
        self._flusher = flusher(loop)
        self._protocol = protocol
        self._plain = bytearray()  # written this turn, not yet encrypted
        self._wire = bytearray()  # encrypted, not yet sent
        self._flush_scheduled = False
        self._writer_on = False  # waiting for the socket to be writable
        self._closing = False
        self._lost = False
        self._paused = False  # reading paused by the protocol
        self._protocol_paused = False  # the protocol told to stop writing
        self._extra: dict[str, Any] = {"socket": self._sock, "ssl_object": self._session,
                                       "peercert": self._session.getpeercert(), "cipher": self._session.cipher()}
        try:
            self._extra["peername"] = self._sock.getpeername()
            self._extra["sockname"] = self._sock.getsockname()
        except OSError:
            pass
        protocol.connection_made(self)
        loop.add_reader(self._fd, self._read_ready)
        if self._incoming.pending:  # the client's first bytes came with the end of its handshake
            loop.call_soon(self._decrypt)

    # --- asyncio.BaseTransport --------------------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peername``, ``sockname``, ``socket``, ``ssl_object``, ``peercert``, ``cipher``."""
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        """True once close() or abort() was called or the connection was lost."""
        return self._closing

    def close(self) -> None:
        """Send what is buffered and a TLS close_notify, then close; reading stops now."""
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        try:
            self._encrypt()
        except ssl.SSLError as exc:
            self._connection_lost(exc)
            return
        try:
            self._session.unwrap()  # close_notify, after the rest; the peer's is not waited for
        except (ssl.SSLError, ValueError):  # waiting for the peer's; or a session that cannot send one
            pass
        self._schedule_flush()

    def abort(self) -> None:
        """Close at once; what is buffered is dropped."""
        self._connection_lost(None)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Hand the connection to another protocol."""
        self._protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The protocol the connection feeds."""
        return self._protocol

    # --- reading ------------------------------------------------------------------------------------
    def is_reading(self) -> bool:
        """True unless reading is paused or the transport is closing."""
        return not self._paused and not self._closing

    def pause_reading(self) -> None:
        """Stop reading until resume_reading() (the protocol's buffer is full)."""
        if self._closing or self._paused:
            return
        self._paused = True
        self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        """Read again."""
        if self._closing or not self._paused:
            return
        self._paused = False
        self._loop.add_reader(self._fd, self._read_ready)
        if self._incoming.pending:  # records that arrived before the pause
            self._loop.call_soon(self._decrypt)

    def _read_ready(self) -> None:
        try:
            count = self._sock.recv_into(self._read_into)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._connection_lost(exc)
            return
        if count:
            self._incoming.write(self._read_into[:count])
        else:
            self._incoming.write_eof()
        self._decrypt()

    def _decrypt(self) -> None:
        """Feed the protocol every whole record received; at the peer's close_notify or EOF, end."""
        if self._lost or self._paused:
            return
        chunks = []
        ended = False
        session, incoming = self._session, self._incoming
        try:
            while True:
                chunk = session.read(READ_SIZE)
                if not chunk:
                    ended = True
                    break
                chunks.append(chunk)
                if not incoming.pending and not session.pending():  # all read: no read that raises WantRead
                    break
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            ended = True
        except ssl.SSLError as exc:
            self._connection_lost(exc)
            return
        if self._outgoing.pending:  # TLS's own messages (a key update's answer)
            self._schedule_flush()
        if chunks:
            self._protocol.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if ended and not self._lost and not self._closing:
            if not self._protocol.eof_received():
                self.close()

    # --- writing ------------------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``: it is sent at the end of this turn of the loop with whatever else is written in it."""
        if not data or self._closing:
            return
        self._plain += data
        self._schedule_flush()
        if not self._protocol_paused and self.get_write_buffer_size() > HIGH_WATER:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        """Write each in turn."""
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        """False: TLS has no half-close."""
        return False

    def get_write_buffer_size(self) -> int:
        """Bytes written and not yet sent (encrypted or not)."""
        return len(self._plain) + len(self._wire)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """(low, high) water marks of flow control."""
        return LOW_WATER, HIGH_WATER

    def _schedule_flush(self) -> None:
        if not (self._flush_scheduled or self._writer_on or self._lost):
            self._flush_scheduled = True
            self._flusher.add(self)

    def flush(self) -> None:
        """Send what was written in this turn (its Flusher calls this at the turn's end)."""
        self._flush_scheduled = False
        if not (self._lost or self._writer_on):
            self._send()

    def _writable(self) -> None:
        self._writer_on = False
        self._loop.remove_writer(self._fd)
        if not self._lost:
            self._send()

    def _encrypt(self) -> None:
        """What was written, encrypted into the bytes to send (a memory buffer takes all of it at once)."""
        if self._plain:
            self._session.write(self._plain)
            self._plain.clear()
        if self._outgoing.pending:
            self._wire += self._outgoing.read()

    def _send(self) -> None:
        """Encrypt what was written, send as much as the socket takes, wait for the socket for the rest."""
        try:
            self._encrypt()
        except ssl.SSLError as exc:
            self._connection_lost(exc)
            return
        if self._wire:
            try:
                sent = self._sock.send(self._wire)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._connection_lost(exc)
                return
            del self._wire[:sent]
            if self._wire:
                self._writer_on = True
                self._loop.add_writer(self._fd, self._writable)
                return
        if self._protocol_paused:
            self._protocol_paused = False
            self._protocol.resume_writing()
        if self._closing:
            self._connection_lost(None)

    # --- the end --------------------------------------------------------------------------------------
    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = self._closing = True
        self._plain.clear()
        self._wire.clear()
        self._loop.remove_reader(self._fd)
        if self._writer_on:
            self._loop.remove_writer(self._fd)
        self._sock.close()
        self._protocol.connection_lost(exc)
