"""Agent footprint: RSS and CPU of `fleet agent` at 1 s and 10 s intervals, beside prometheus-node-exporter.

    python3 bench/agent.py [--seconds 60]
The agents report to an embedded broker (its own process); node-exporter is scraped over loopback at
the same cadences. CPU is the process's user+system time over the window, as a percent of one core.
Agents run plain and with the optional collectors on: a textfile directory of 20 series (rewritten
atomically every 10 s, as a cron job would) and 3 process checks, one a regex over every command line;
node-exporter's textfile collector reads the same directory.
"""

from __future__ import annotations

import argparse
import json
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
# Appended, not prepended: the checkout's fleet/ folder is not the installed fleet package (whose parts it maps),
# so a clean install's package must win; only bench/ comes from here.
sys.path.append(str(ROOT))

from bench.common import free_port, stop_process, wait_port  # noqa: E402
from tests import stores  # noqa: E402


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def write_textfiles(directory: Path, n: int) -> None:
    """20 series in two files, replaced atomically (written aside, then renamed), as a cron job does."""
    for name, prefix in (("queue.prom", "queue_depth"), ("jobs.prom", "job_last_success_seconds")):
        lines = [f"# TYPE {prefix} gauge"] + [f'{prefix}{{name="q{i}"}} {n + i}' for i in range(10)]
        tmp = directory / f".{name}.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, directory / name)


def rewrite_textfiles(directory: Path, stop: threading.Event) -> None:
    """Change the textfiles every 10 s, so the agents parse them again."""
    n = 0
    while not stop.wait(10):
        n += 1
        write_textfiles(directory, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="fleet-bench-agent-"))
    org = stores.add_org(data, "bench")
    mqtt_port = free_port()
    env = {**os.environ, "FLEET_LOG_LEVEL": "WARNING"}
    os.chdir(data)  # `python -m fleet.cli` must find the installed package, not the checkout's fleet/ folder
    procs: dict[str, subprocess.Popen] = {}
    procs["broker"] = subprocess.Popen([sys.executable, "-m", "fleet.cli", "broker", "--data-dir", str(data),
                                        "--mqtt-port", str(mqtt_port)], env=env, stderr=subprocess.DEVNULL)
    wait_port(mqtt_port)
    textfiles = data / "textfile"
    textfiles.mkdir()
    stop = threading.Event()
    write_textfiles(textfiles, 0)
    extras = ["--textfile-dir", str(textfiles), "--process", "nginx", "--process", "sshd",
              "--process", "re:gunicorn.*app"]
    check = subprocess.run([sys.executable, "-m", "fleet.cli", "agent", "--print", "--once", *extras], env=env,
                           capture_output=True, text=True, timeout=60, check=True)
    sample = json.loads(check.stdout)["metrics"]
    if len(sample.get("custom", {})) != 20 or len(sample.get("process_counts", {})) != 3:
        raise SystemExit(f"the agent's extras do not run: {sample}")
    for interval in ("1", "10"):
        for label, more in (("", []), (" + 20 series, 3 checks", extras)):
            procs[f"fleet agent{label}, {interval} s"] = subprocess.Popen(
                [sys.executable, "-m", "fleet.cli", "agent", "--broker", f"mqtts://127.0.0.1:{mqtt_port}", "--org",
                 "bench", "--machine", f"bench-{interval}s{'-x' if more else ''}", "--ca",
                 str(data / "certs" / "ca.pem"),
                 "--interval", interval, "--data-dir", str(data / f"agent-{interval}{'-x' if more else ''}"), *more],
                env={**env, "FLEET_KEY": org.agent_key}, stderr=subprocess.DEVNULL)
    exporter = shutil.which("prometheus-node-exporter")
    scrapers = [threading.Thread(target=rewrite_textfiles, args=(textfiles, stop), daemon=True)]
    if exporter:
        for interval in (1, 10):
            port = free_port()
            procs[f"node-exporter, scraped every {interval} s"] = subprocess.Popen(
                [exporter, f"--web.listen-address=127.0.0.1:{port}", f"--collector.textfile.directory={textfiles}"],
                stderr=subprocess.DEVNULL)
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
