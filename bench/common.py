"""What every benchmark script needs: free loopback ports, waiting for a server, stopping a process
(``stop_process`` is the one ``fleet up`` uses for its children), JSON over HTTP, the ``fleet`` command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
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


def http_get(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url`` (with a bearer token): status and body; HTTP errors raise."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read()


def http_json(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, Any]:
    """GET ``url`` (with a bearer token) and decode the JSON body; HTTP errors raise."""
    status, body = http_get(url, token, timeout)
    return status, json.loads(body)


def poll(predicate: Callable[[], Any], timeout: float) -> bool:
    """Poll ``predicate`` (exceptions count as "not yet") every 0.2 s; False if ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    return False


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    """``poll``, but exit the benchmark if ``timeout`` passes first."""
    if not poll(predicate, timeout):
        raise SystemExit(f"timed out waiting for {what}")


def last_json_line(text: str) -> dict:
    """The last line of ``text`` that is a JSON object (a command's summary), or {}."""
    lines = [line for line in text.splitlines() if line.strip().startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def start_simulators(count: int, agents: int, url: str, org: str, key: str, data: Path, interval: float,
                     connect_rate: float, env: dict[str, str], record: bool = False,
                     extra: tuple[str, ...] = (), nice: int = 0) -> list[subprocess.Popen]:
    """``count`` ``fleet simulate`` processes sharing ``agents`` (prefixes sim0, sim1, …) and ``connect_rate``;
    each logs to DATA/simulate-I.log and, with ``record``, records to DATA/record-I.csv. ``extra``: more
    options for each (e.g. ``--enrol TOKEN``). ``nice``: their scheduling niceness, so a load generator sharing
    the cores of what it measures yields to it (a simulator runs a thread per shard of agents: at equal
    niceness a one-thread broker gets a small share of the CPU whatever it needs)."""
    procs = []
    for i in range(count):
        share = agents // count + (i < agents % count)
        cmd = [*FLEET, "simulate", "--broker", url, "--org", org, "--ca", str(data / "certs" / "ca.pem"),
               "--agents", str(share), "--interval", str(interval), "--prefix", f"sim{i}",
               "--connect-rate", str(connect_rate / count), "--data-dir", str(data)]
        if record:
            cmd += ["--record", str(data / f"record-{i}.csv")]
        cmd += list(extra)
        with open(data / f"simulate-{i}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, env={**env, "FLEET_KEY": key}, stdout=subprocess.PIPE, stderr=log,
                                          text=True, preexec_fn=(lambda: os.nice(nice)) if nice else None))
    return procs


def simulator_summaries(procs: list[subprocess.Popen], timeout: float = 60) -> list[dict]:
    """Wait for ``fleet simulate`` processes to exit (after SIGTERM); their JSON summaries."""
    return [last_json_line(proc.communicate(timeout=timeout)[0] or "") for proc in procs]


def print_table(corner: str, columns: dict[str, dict[str, Any]]) -> None:
    """One Markdown table: a column per run (``columns`` maps its heading to its metrics), a row per metric."""
    first = next(iter(columns.values()))
    print(f"| {corner} | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for metric in first:
        print(f"| {metric} | " + " | ".join(str(run[metric]) for run in columns.values()) + " |")
