"""TCP listeners with an accept loop of the broker's own: each accepted socket is handed over before any TLS.

The broker decides on a bare socket whether to serve it (broker/admission.py), and a socket it serves gets its
TLS handshake (broker/tlstransport.py) inside that connection's task, so a broker stop ends handshakes in
progress like any connection."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections.abc import Callable

log = logging.getLogger("fleet.broker")

LISTEN_BACKLOG = 1024  # asyncio's default is 100: a burst of connects would overflow it into SYN retries (1, 3, 7 s)
# accept() failing for want of resources: retried after a second, as asyncio's own accept loop does.
ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_RETRY_S = 1.0


class Listener:
    """What amqtt keeps of a server: its sockets, ``close()`` and ``wait_closed()``."""

    def __init__(self, sockets: list[socket.socket], tasks: list[asyncio.Task[None]]) -> None:
        self.sockets = sockets
        self._tasks = tasks

    def close(self) -> None:
        """Stop accepting and close the listening sockets."""
        for task in self._tasks:
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        """Wait until the accept loops have ended."""
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _bind(address: str | None, port: int) -> list[socket.socket]:
    """Listening sockets for ``address`` (every interface when empty) and ``port`` (0: a free one, the same for all)."""
    infos = socket.getaddrinfo(address or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # every family on the port the first one got
                sockaddr = (sockaddr[0], sockets[0].getsockname()[1], *sockaddr[2:])
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def listen(address: str | None, port: int, accepted: Callable[[socket.socket], None],
                 accept_failed: Callable[[OSError], None]) -> Listener:
    """Listen on ``address:port`` and call ``accepted(sock)`` with each new connection's socket, in the accept
    loop: it must not block. Out of descriptors (or memory), ``accept_failed(exc)`` and a retry a second later."""
    loop = asyncio.get_running_loop()

    async def accept_loop(sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno not in ACCEPT_RESOURCE_ERRNOS:
                    if sock.fileno() == -1:  # closed by close()
                        return
                    log.warning("accept failed: %s", exc)
                else:
                    accept_failed(exc)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            accepted(conn)

    sockets = await asyncio.to_thread(_bind, address, port)
    return Listener(sockets, [loop.create_task(accept_loop(sock)) for sock in sockets])


def reset(sock: socket.socket) -> None:
    """Close a socket at once with a reset (SO_LINGER 0): the client learns now, and no TIME_WAIT is left here."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
