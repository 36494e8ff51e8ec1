"""What every benchmark script needs: free loopback ports, waiting for a server, stopping a process
(``stop_process`` is the one ``fleet up`` uses for its children)."""

from __future__ import annotations

import socket
import subprocess
import time

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

