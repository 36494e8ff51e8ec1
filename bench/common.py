"""What every benchmark script needs: free loopback ports, waiting for a server, stopping a process
(``stop_process`` is the one ``fleet up`` uses for its children), JSON over HTTP, the ``fleet`` command."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from fleet.up import stop_process  # noqa: F401 - re-exported for the benchmark scripts


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    """Wait until ``port`` accepts connections; exit if ``proc`` dies first or time runs out."""
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited early ({proc.returncode})")
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing listening on port {port} after {timeout:.0f} s")
        time.sleep(0.1)



FLEET = [sys.executable, "-m", "fleet.cli"]


def http_json(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, Any]:
    """GET ``url`` (with a bearer token) and decode the JSON body; HTTP errors raise."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read())


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll ``predicate`` (exceptions count as "not yet") every 0.2 s; exit the benchmark after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def last_json_line(text: str) -> dict:
    """The last line of ``text`` that is a JSON object (a command's summary), or {}."""
    lines = [line for line in text.splitlines() if line.strip().startswith("{")]
    return json.loads(lines[-1]) if lines else {}
