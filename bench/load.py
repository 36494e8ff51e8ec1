"""Load test: N simulated agents against broker + collector + web for a while (issue 6).

Runs each part as its own process on one data dir (so RSS is measured per part), drives
`fleet simulate`, and reports sustained ingest, report->API latency (a probe agent whose
reports carry a marker the API must show), RSS of each part over time, and seq accounting:
every report the simulator got a PUBACK for must be stored once, with no gap per session.

    python3 bench/load.py --agents 2000 --interval 1 --duration 120 [--broker mosquitto --autosave interval:1]
Loopback only; stops by itself. ``--broker mosquitto`` runs Debian's Mosquitto on `fleet mosquitto-config`
output instead of the embedded broker; ``--autosave`` overrides its persistence settings for the run
(``interval:N``: save every N s; ``changes:N``: save after N changes; ``generated``: as exported), and the
broker's CPU time and the saves it logged are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port, stop_process  # noqa: E402
from fleet.config import payloads  # noqa: E402
from fleet.config.mqtt import BrokerAddress, new_client  # noqa: E402
from fleet.config.topics import agent_client_id, ping_topic, report_topic  # noqa: E402

FLEET = [sys.executable, "-m", "fleet.cli"]



def http_json(url: str, token: str | None = None, timeout: float = 5.0):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read())


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


class Probe:
    """One agent publishing a marked report each second; measures how long until the API shows it."""

    def __init__(self, url: str, ca: Path, org: str, key: str, api: str, reader_key: str) -> None:
        self.machine = "probe-1"
        self.org, self.api, self.reader_key = org, api, reader_key
        self.client = new_client(BrokerAddress.parse(url), agent_client_id(org, self.machine),
                                 f"{org}/agent", key, ca)
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def loop(self, broker_url: str) -> None:
        address = BrokerAddress.parse(broker_url)
        self.client.connect(address.host, address.port, keepalive=30)
        self.client.loop_start()
        session = os.urandom(6).hex()
        self.client.publish(ping_topic(self.org, self.machine), payloads.encode(
            payloads.build_ping(self.machine, "probe", session, "online", 1.0, ts=time.time())), qos=1, retain=True)
        seq = 0
        while not self.stop.is_set():
            sent = time.time()
            body = payloads.build_report(self.machine, "probe", session, seq, sent, {"probe_seq": seq}, {"os": "Linux"})
            self.client.publish(report_topic(self.org, self.machine), payloads.encode(body), qos=1)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not self.stop.is_set():
                try:
                    _, machine = http_json(f"{self.api}/api/fleet/{self.machine}", self.reader_key)
                    if machine.get("metrics", {}).get("probe_seq") == seq:
                        self.latencies.append(time.time() - sent)
                        break
                except Exception:  # noqa: BLE001 - 404 until first stored
                    pass
                time.sleep(0.02)
            seq += 1
            self.stop.wait(max(0.0, 1.0 - (time.time() - sent)))
        self.client.loop_stop()
        self.client.disconnect()


def rss_mb(pid: int) -> float:
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    except psutil.NoSuchProcess:
        return float("nan")


def start_mosquitto(data: Path, port: int, autosave: str) -> subprocess.Popen:
    """Debian's Mosquitto on `fleet mosquitto-config` output, persistence settings overridden by ``autosave``."""
    out = data / "mosquitto"
    subprocess.run([*FLEET, "mosquitto-config", "--data-dir", str(data), "--out", str(out), "--mqtt-port", str(port)],
                   check=True, stdout=subprocess.DEVNULL)
    conf = out / "mosquitto.conf"
    lines = [line for line in conf.read_text().splitlines()
             if not line.startswith(("autosave_interval", "autosave_on_changes", "log_type", "user "))]
    if autosave != "generated":
        kind, _, value = autosave.partition(":")
        lines += [f"autosave_interval {int(value)}", f"autosave_on_changes {'true' if kind == 'changes' else 'false'}"]
    else:
        lines += [line for line in conf.read_text().splitlines() if line.startswith("autosave_")]
    lines = ["user root" if os.geteuid() == 0 else "", "log_type error", "log_type warning", "log_type notice",
             "log_type information", *lines]
    conf.write_text("\n".join(lines) + "\n")
    log = open(out / "mosquitto.log", "w")  # noqa: SIM115 - open for the process's lifetime
    return subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)], stdout=log,
                            stderr=subprocess.STDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--broker", choices=("embedded", "mosquitto"), default="embedded")
    parser.add_argument("--autosave", default="generated", help="mosquitto only: generated, interval:N, changes:N")
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="fleet-load-"))
    mqtt_port, http_port = free_port(), free_port()
    common = ["--data-dir", str(data)]
    keys = json.loads(subprocess.check_output([*FLEET, "org", "add", "load", "--json", *common]))
    # The latency probe polls the API every 20 ms: lift the per-client limit for this benchmark only.
    env = {**os.environ, "FLEET_LOG_LEVEL": "WARNING", "FLEET_RATE_LIMIT_API": "1000000/minute"}
    if args.broker == "mosquitto":
        parts = {"broker": start_mosquitto(data, mqtt_port, args.autosave)}
    else:
        parts = {"broker": subprocess.Popen([*FLEET, "broker", "--mqtt-port", str(mqtt_port), *common], env=env)}
    ca = data / "certs" / "ca.pem"
    broker_url = f"mqtts://127.0.0.1:{mqtt_port}"
    wait_until(lambda: socket.create_connection(("127.0.0.1", mqtt_port), 1).close() or True, 30, "broker")
    parts["collector"] = subprocess.Popen([*FLEET, "collector", "--broker", broker_url, *common], env=env)
    parts["web"] = subprocess.Popen([*FLEET, "web", "--http-port", str(http_port), "--broker", broker_url, *common],
                                    env=env)
    api = f"http://127.0.0.1:{http_port}"
    wait_until(lambda: http_json(f"{api}/healthz")[0] == 200, 30, "healthz")

    rss: dict[str, list[float]] = {name: [rss_mb(p.pid)] for name, p in parts.items()}
    sim_env = {**env, "FLEET_KEY": keys["agent_key"]}
    sim = subprocess.Popen([*FLEET, "simulate", "--broker", broker_url, "--org", "load", "--ca", str(ca),
                            "--agents", str(args.agents), "--interval", str(args.interval),
                            "--duration", str(args.duration), *common],
                           env=sim_env, stdout=subprocess.PIPE, text=True)
    probe = Probe(broker_url, ca, "load", keys["agent_key"], api, keys["reader_key"])
    probe_thread = threading.Thread(target=probe.loop, args=(broker_url,), daemon=True)
    probe_thread.start()

    started = time.time()
    db = data / "fleet.db"
    stored_samples: list[tuple[float, int]] = []
    while sim.poll() is None:
        time.sleep(10)
        for name, p in parts.items():
            rss[name].append(rss_mb(p.pid))
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        stored_samples.append((time.time(), conn.execute("SELECT count(*) FROM reports").fetchone()[0]))
        conn.close()
        print(f"  t={time.time() - started:5.0f}s stored={stored_samples[-1][1]:>9} "
              + " ".join(f"{n}={v[-1]:.0f}MB" for n, v in rss.items()), flush=True)
    sim_out = sim.stdout.read() if sim.stdout else ""
    probe.stop.set()
    probe_thread.join(15)

    # Let the collector drain, then account by (machine, session, seq).
    summary_line = [line for line in sim_out.splitlines() if line.strip().startswith("{")]
    summary = json.loads(summary_line[-1]) if summary_line else {}
    acked = summary.get("acked")

    def stored_count() -> int:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT count(*) FROM reports WHERE machine_id != 'probe-1'").fetchone()[0]
        finally:
            conn.close()

    deadline = time.monotonic() + 60
    while acked is not None and stored_count() < acked and time.monotonic() < deadline:
        time.sleep(0.5)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    stored = stored_count()
    gaps = conn.execute(
        "SELECT count(*) FROM (SELECT machine_id, session, max(seq) - min(seq) + 1 - count(*) AS missing "
        "FROM reports WHERE machine_id != 'probe-1' GROUP BY machine_id, session) WHERE missing != 0").fetchone()[0]
    conn.close()
    for name, p in parts.items():
        rss[name].append(rss_mb(p.pid))
    broker_cpu = cpu_seconds(parts["broker"].pid)
    for p in parts.values():
        stop_process(p, 20)

    window = [s for s in stored_samples if 20 <= s[0] - started <= args.duration + 5]
    rate = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0]) if len(window) >= 2 else float("nan")
    lat = sorted(probe.latencies)
    p50 = statistics.median(lat) if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
    print()
    print(f"agents={args.agents} interval={args.interval}s duration={args.duration}s cores={os.cpu_count()} "
          f"broker={args.broker}" + (f" autosave={args.autosave}" if args.broker == "mosquitto" else ""))
    print("| metric | value |")
    print("|---|---|")
    print(f"| offered load | {args.agents / args.interval:.0f} reports/s |")
    print(f"| sustained ingest (after 20 s warm-up) | {rate:.0f} reports/s |")
    print(f"| simulator sent / acked | {summary.get('sent')} / {acked} |")
    print(f"| stored (distinct machine, session, seq) | {stored} |")
    print(f"| lost (acked - stored) | {None if acked is None else acked - stored} |")
    print(f"| sessions with seq gaps | {gaps} |")
    print(f"| report->API latency p50 / p99 (n={len(lat)}) | {p50 * 1000:.0f} ms / {p99 * 1000:.0f} ms |")
    for name, values in rss.items():
        print(f"| RSS {name} start / end | {values[0]:.0f} MB / {values[-1]:.0f} MB |")
    print(f"| broker CPU time | {broker_cpu:.1f} s ({broker_cpu / (time.time() - started):.0%} of a core) |")
    if args.broker == "mosquitto":
        saves = (data / "mosquitto" / "mosquitto.log").read_text().count("Saving in-memory database")
        size = (data / "mosquitto" / "data" / "mosquitto.db")
        print(f"| database saves during the run / last size | {saves} / "
              f"{size.stat().st_size / 1024 if size.exists() else 0:.0f} KiB |")


if __name__ == "__main__":
    main()
