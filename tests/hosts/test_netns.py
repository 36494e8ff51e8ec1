"""tests/netns.py itself: hosts reach the server's namespace and each other, a cut link drops packets until it is
restored, and nothing is left behind: not after close(), and not after a test process that was killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests import netns
from tests.netns import Lan

pytestmark = pytest.mark.netns
CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))"
ROOT = Path(__file__).resolve().parents[2]


def leftovers(token: str) -> list[str]:
    """Namespaces, links and /etc/netns entries of LAN ``token`` that still exist."""
    found = [name for name in netns.ip("netns", "list").stdout.split() if token in name]
    found += [link["ifname"] for link in json.loads(netns.ip("-j", "link", "show").stdout) if token in link["ifname"]]
    found += [str(path) for path in netns.NETNS_ETC.glob(f"*{token}*")]
    return found


def test_hosts_reach_the_server_until_their_link_is_cut(lan: Lan) -> None:
    server = socket.create_server(("0.0.0.0", 0))
    port = server.getsockname()[1]
    accepted: list[str] = []
    threading.Thread(target=lambda: [accepted.append(server.accept()[1][0]) for _ in range(2)], daemon=True).start()
    a, b = lan.add_host("host-a"), lan.add_host("host-b")
    a.resolve({"server.test": lan.server_ip})
    try:
        assert a.run(sys.executable, "-c", CONNECT, "server.test", str(port), "5").returncode == 0
        assert a.run("hostname").stdout.strip() == "host-a"
        assert b.run(sys.executable, "-c", CONNECT, a.ip, "9", "5").stderr.strip().endswith("Connection refused")
        a.cut()
        cut = a.run(sys.executable, "-c", CONNECT, lan.server_ip, str(port), "0.5")
        assert "timed out" in cut.stderr
        a.restore()
        assert a.run(sys.executable, "-c", CONNECT, lan.server_ip, str(port), "5").returncode == 0
        assert accepted == [a.ip, a.ip]
    finally:
        server.close()


def test_close_removes_everything_even_with_processes_running(netns_unavailable: str | None) -> None:
    if netns_unavailable:
        pytest.skip(netns_unavailable)
    made = Lan()
    try:
        host = made.add_host("host-a")
        host.resolve({"x.test": "10.0.0.1"})
        sleeper = host.popen("sleep", "600")
        assert leftovers(made.token)
    finally:
        made.close()
    assert sleeper.poll() == -signal.SIGTERM
    assert leftovers(made.token) == []


def test_a_lan_of_a_killed_test_process_is_swept_by_the_next(netns_unavailable: str | None) -> None:
    if netns_unavailable:
        pytest.skip(netns_unavailable)
    code = ("from tests.netns import Lan; import sys; lan = Lan(); lan.add_host('h'); print(lan.token, flush=True);"
            " sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    token = proc.stdout.readline().strip() if proc.stdout else ""
    proc.kill()  # no clean-up of its own
    proc.wait(10)
    assert token
    assert leftovers(token)
    Lan().close()
    assert leftovers(token) == []
