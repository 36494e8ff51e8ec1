"""The broker's TLS transport on real sockets: flow control both ways, a peer that reads slowly, EOF, abort."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import threading

import pytest
import trustme

from fleet.broker.tlstransport import HIGH_WATER, TLSSocketTransport, handshake


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) from a CA made for this test."""
    ca = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    return server, client


class Recorder(asyncio.Protocol):
    """Keeps what arrives and when the connection ends; counts pause/resume of writing."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self.paused = self.resumed = 0

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1


async def serve_one(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, client):
    """Accept one connection on a free port, hand it to TLSSocketTransport; ``client(port)`` runs in a thread."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    result: dict = {}

    def run_client() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as sock:
                result["client"] = client(sock)

    thread = threading.Thread(target=run_client, daemon=True)
    thread.start()
    conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 10)
    listener.close()
    tls = await asyncio.wait_for(handshake(conn, server_ctx), 10)
    protocol = Recorder()
    transport = TLSSocketTransport(loop, tls, protocol)
    return transport, protocol, thread, result


def test_a_large_write_reaches_a_slow_reader_whole_and_in_order(tls):
    """8 MiB written at once to a client reading 4 KiB at a time: the transport buffers what the socket refuses,
    pauses its protocol past the high-water mark, resumes it once drained, and every byte arrives in order."""
    payload = bytes(range(256)) * (8 * 4096)

    def read_all(sock: ssl.SSLSocket) -> str:
        digest = hashlib.sha256()
        received = 0
        while received < len(payload):
            chunk = sock.recv(4096)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
        return digest.hexdigest()

    async def main() -> None:
        transport, protocol, thread, result = await serve_one(*tls, read_all)
        transport.write(payload)
        assert transport.get_write_buffer_size() > HIGH_WATER  # the socket took only part of it
        assert protocol.paused == 1
        async with asyncio.timeout(20):
            while transport.get_write_buffer_size():
                await asyncio.sleep(0.01)
        await asyncio.to_thread(thread.join, 10)
        assert result["client"] == hashlib.sha256(payload).hexdigest()
        assert protocol.resumed == 1
        transport.close()
        assert await asyncio.wait_for(protocol.lost, 5) is None

    asyncio.run(main())


def test_what_the_peer_sends_arrives_and_its_close_ends_the_connection(tls):
    def talk(sock: ssl.SSLSocket) -> None:
        sock.sendall(b"x" * 100_000)  # several TLS records
        sock.unwrap()  # close_notify

    async def main() -> None:
        transport, protocol, thread, _ = await serve_one(*tls, talk)
        await asyncio.wait_for(protocol.lost, 10)
        assert bytes(protocol.data) == b"x" * 100_000
        assert transport.is_closing()
        await asyncio.to_thread(thread.join, 10)

    asyncio.run(main())


def test_abort_drops_the_connection_at_once(tls):
    def wait_for_end(sock: ssl.SSLSocket) -> bytes:
        try:
            return sock.recv(10)
        except OSError as exc:
            return repr(exc).encode()

    async def main() -> None:
        transport, protocol, thread, result = await serve_one(*tls, wait_for_end)
        transport.write(b"")  # nothing to send is not an error
        transport.abort()
        assert await asyncio.wait_for(protocol.lost, 5) is None
        transport.write(b"after")  # dropped, not raised
        await asyncio.to_thread(thread.join, 10)
        assert b"after" not in result["client"]

    asyncio.run(main())
