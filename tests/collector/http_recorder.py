"""A loopback HTTP server for channel tests: records each request, answers with the status the test chooses."""

from __future__ import annotations

import dataclasses
import json
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_HANG_S = 10.0


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 200  # what the recorder answered
    answered: bool = True  # False: the sender went away while the request was held (``hang``), nothing was answered

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class Recorder:
    """Records requests; ``status`` (settable) is the answer, after any scripted in ``answers`` (first come, first
    used); ``hang`` makes it stall until released."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.answers: deque[int] = deque()
        self.location = ""
        self.hang = False
        self.release = threading.Event()
        self.requests: list[Recorded] = []
        self._cond = threading.Condition()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with recorder._cond:
                    status = recorder.answers.popleft() if recorder.answers else recorder.status
                    recorder.requests.append(Recorded(self.command, self.path, dict(self.headers.items()), body,
                                                      status))
                    recorder._cond.notify_all()
                if recorder.hang and not recorder._hold(self.connection):
                    with recorder._cond:
                        index = next(i for i, r in enumerate(recorder.requests) if r.body is body)
                        recorder.requests[index] = dataclasses.replace(recorder.requests[index], answered=False)
                        recorder._cond.notify_all()
                    self.close_connection = True
                    return
                self.send_response(status)
                if recorder.location:
                    self.send_header("Location", recorder.location)
                reply = b'{"detail": "recorded"}' if status < 300 else b'{"error": "refused by test"}'
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_GET = do_POST  # noqa: N815 - the base class's naming: a GET is recorded the same way

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.scheme = "http"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="http-recorder",
                                        daemon=True)

    def _hold(self, connection: socket.socket) -> bool:
        """Hold a request until released (True), or until its sender closes the connection (False)."""
        deadline = time.monotonic() + MAX_HANG_S
        while not self.release.is_set() and time.monotonic() < deadline:
            readable, _, _ = select.select([connection], [], [], 0.05)
            if readable:
                try:
                    if connection.recv(1, socket.MSG_PEEK) == b"":
                        return False
                except (OSError, ValueError):  # ValueError: a TLS socket cannot peek
                    return False
        return True

    def use_tls(self, context: ssl.SSLContext) -> None:
        """Serve HTTPS with ``context`` (call before start)."""
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https"

    @property
    def url(self) -> str:
        """The server's base URL, without a trailing slash."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> Recorder:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release any stalled request."""
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def wait_for_count(self, n: int, timeout: float = 10.0, accepted: bool = False) -> list[Recorded]:
        """Wait until ``n`` requests arrived (only those answered 2xx if ``accepted``); return those."""
        def found() -> list[Recorded]:
            return [r for r in self.requests if r.status < 300] if accepted else list(self.requests)

        with self._cond:
            if not self._cond.wait_for(lambda: len(found()) >= n, timeout):
                raise AssertionError(f"got {len(found())} requests, expected {n} within {timeout} s")
            return found()

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> Recorded:
        """Wait for the first request that satisfies ``predicate``."""
        found: list[Recorded] = []

        def seen() -> bool:
            found[:] = [r for r in self.requests if predicate(r)]
            return bool(found)

        with self._cond:
            if not self._cond.wait_for(seen, timeout):
                raise AssertionError(f"no matching request within {timeout} s (got {len(self.requests)})")
            return found[0]


@contextmanager
def recording(status: int = 200) -> Iterator[Recorder]:
    """A started Recorder, stopped after the block."""
    recorder = Recorder(status).start()
    try:
        yield recorder
    finally:
        recorder.stop()
