"""A loopback HTTP server standing in for a webhook endpoint: records every POST, answers with scripted codes."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Post:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def signed_with(self, secret: str) -> bool:
        """True when X-Fleet-Signature is the HMAC-SHA256 of the body under ``secret``."""
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("x-fleet-signature", ""), expected)


class Receiver:
    """``Receiver()`` listens on a free loopback port; ``answers`` holds status codes to reply with, then 200."""

    def __init__(self) -> None:
        self.posts: list[Post] = []
        self.answers: deque[int] = deque()
        self.attempts = 0
        self.cond = threading.Condition()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with owner.cond:
                    owner.attempts += 1
                    code = owner.answers.popleft() if owner.answers else 200
                    if code < 300:
                        owner.posts.append(Post(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    owner.cond.notify_all()
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def wait_posts(self, n: int, timeout: float = 10.0) -> list[Post]:
        """Wait until ``n`` POSTs were accepted; return them all."""
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.posts) >= n, timeout):
                raise AssertionError(f"{len(self.posts)} POSTs within {timeout} s, expected {n}")
            return list(self.posts)

    def wait_attempts(self, n: int, timeout: float = 10.0) -> int:
        """Wait until ``n`` requests arrived, answered or refused."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.attempts >= n, timeout):
                raise AssertionError(f"{self.attempts} requests within {timeout} s, expected {n}")
            return self.attempts

    def alerts(self) -> list[tuple[str, str, str]]:
        """(status, alertname, machine_id) of every alert in every accepted POST, in order."""
        with self.cond:
            return [(a["status"], a["labels"]["alertname"], a["labels"]["machine_id"])
                    for post in self.posts for a in post.json["alerts"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
