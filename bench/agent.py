"""Agent footprint: RSS and CPU of `fleet agent` at 1 s and 10 s intervals, beside prometheus-node-exporter.

    python3 bench/agent.py [--seconds 60]
Both agents report to an embedded broker (its own process); node-exporter is scraped over loopback at
the same cadences. CPU is the process's user+system time over the window, as a percent of one core.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import free_port, stop_process, wait_port  # noqa: E402
from fleet.config import credentials  # noqa: E402


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="fleet-bench-agent-"))
    org = credentials.add_org(data, "bench")
    mqtt_port = free_port()
    env = {**os.environ, "FLEET_LOG_LEVEL": "WARNING"}
    procs: dict[str, subprocess.Popen] = {}
    procs["broker"] = subprocess.Popen([sys.executable, "-m", "fleet.cli", "broker", "--data-dir", str(data),
                                        "--mqtt-port", str(mqtt_port)], env=env, stderr=subprocess.DEVNULL)
    wait_port(mqtt_port)
    for interval in ("1", "10"):
        procs[f"fleet agent, {interval} s"] = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli", "agent", "--broker", f"mqtts://127.0.0.1:{mqtt_port}", "--org", "bench",
             "--machine", f"bench-{interval}s", "--ca", str(data / "certs" / "ca.pem"), "--interval", interval,
             "--data-dir", str(data / f"agent-{interval}")], env={**env, "FLEET_KEY": org.agent_key},
            stderr=subprocess.DEVNULL)
    exporter = shutil.which("prometheus-node-exporter")
    scrapers = []
    stop = threading.Event()
    if exporter:
        for interval in (1, 10):
            port = free_port()
            procs[f"node-exporter, scraped every {interval} s"] = subprocess.Popen(
                [exporter, f"--web.listen-address=127.0.0.1:{port}"], stderr=subprocess.DEVNULL)
            wait_port(port)

            def scrape(port: int = port, every: int = interval) -> None:
                while not stop.wait(every):
                    try:
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
                    except OSError:
                        pass

            scrapers.append(threading.Thread(target=scrape, daemon=True))
    for t in scrapers:
        t.start()
    time.sleep(5)  # start-up (imports, TLS, first collection) is not the steady state we measure
    watched = {name: psutil.Process(p.pid) for name, p in procs.items() if name != "broker"}
    start_cpu = {name: cpu_seconds(p) for name, p in watched.items()}
    peak = {name: 0.0 for name in watched}
    started = time.monotonic()
    while time.monotonic() - started < args.seconds:
        for name, p in watched.items():
            peak[name] = max(peak[name], p.memory_info().rss / 2**20)
        time.sleep(1)
    elapsed = time.monotonic() - started
    print(f"window={elapsed:.0f} s after 5 s warm-up, cores={os.cpu_count()}\n")
    print("| process | RSS peak | CPU (% of one core) |")
    print("|---|---|---|")
    for name, p in watched.items():
        print(f"| {name} | {peak[name]:.1f} MB | {(cpu_seconds(p) - start_cpu[name]) / elapsed * 100:.3f}% |")
    stop.set()
    for p in procs.values():
        stop_process(p, 15)


if __name__ == "__main__":
    main()
