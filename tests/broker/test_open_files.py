"""Out of open files: a broker at its descriptor limit says so in one line, not a traceback per refused
accept, and serves again once connections leave; ``fleet broker`` raises its soft limit to the hard one."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import BrokerProcess, close, connect_client, free_port, port_open, wait_for

LIMIT = 96  # enough for the broker's own files and a few clients, far below what the test opens


def _limited(soft: int, hard: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_fleet_broker_raises_its_soft_limit_to_the_hard_one():
    code = "from fleet.broker.limits import raise_open_file_limit; import resource; " \
           "print(raise_open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          preexec_fn=_limited(256, 1024))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1024", "1024"]


def test_a_broker_out_of_descriptors_warns_once_and_recovers(fleet_dir: Path, acme):
    port = free_port()
    log_path = fleet_dir / "broker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "broker", "--data-dir", str(fleet_dir),
                                 "--mqtt-port", str(port)],
                                # no admission bound: this test is about running out of descriptors
                                env={**os.environ, "FLEET_LOG_LEVEL": "INFO", "FLEET_MAX_HANDSHAKES": "100000",
                                     "FLEET_ACCEPT_RATE": "0"},
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=_limited(LIMIT, LIMIT))
    broker = BrokerProcess(port, fleet_dir / "certs" / "ca.pem", fleet_dir, proc)
    socks: list[socket.socket] = []
    try:
        wait_for(lambda: proc.poll() is not None or port_open(port), timeout=30, message="fleet broker listening")
        assert proc.poll() is None, log_path.read_text()
        for _ in range(2 * LIMIT):  # the kernel completes these handshakes; the broker's accept() runs out
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_for(lambda: "cannot accept connections" in log_path.read_text(), timeout=10,
                 message="a warning about refused accepts")
        for sock in socks:
            sock.close()
        socks.clear()
        # asyncio retries accept() after a second; a client then gets in as usual.
        client = connect_client(broker, "acme/reader", acme.reader_key, "after-the-storm", timeout=15)
        close(client)
    finally:
        for sock in socks:
            sock.close()
        broker.stop()
    out = log_path.read_text()
    assert f"open file limit {LIMIT}" in out
    assert out.count("cannot accept connections") <= 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "out of system resource" not in out, out[-3000:]
