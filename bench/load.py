"""Load test: N simulated agents against broker + collector + web, on the embedded broker and/or Mosquitto.

For each broker, a fresh data dir, and each part as its own process (so CPU and RSS are per part): the
broker (`fleet broker`, or Debian's Mosquitto on the config `fleet mosquitto-config` writes), `fleet
collector`, `fleet web`. Then S `fleet simulate` processes (distinct machine prefixes, one org) open N
agents in all, their first connects spread with jitter over N / --connect-rate seconds, and a probe
agent publishes a marked report every second and polls the API until it shows. Phases:

- connect: until the simulators have every agent connected (handshakes/s = N / first..last connect);
- settle: one interval, so every agent has reported;
- steady: --steady seconds: broker and collector CPU (% of one core), RSS (total, and per connection
  over the broker's idle RSS), ingest rate;
- drain: simulators stopped cleanly; every report they got a PUBACK for must be stored.

Over the whole run, every second: each part's RSS and, on SQLite, the sizes of fleet.db and its WAL (and of
the embedded broker's broker.db WAL; fleet.db's WAL is also looked at every 20 ms for its peak, as resets come
several times a second under load); the table gives their maxima and growth (the value when the steady
phase ends minus the value at minute 5 of the run, or at the end of settle when fewer than 5 minutes follow
minute 5). Each part logs to its own file in the data dir (broker.log, collector.log, web.log) and the table
counts their "database is locked" lines; ``--keep`` leaves the data dir in place to inspect afterwards.

    python3 bench/load.py --agents 5000 --interval 10 --broker both [--auth key|certificate|both]
        [--autosave interval:1] [--database postgres]
Loopback only; stops by itself; prints one table with the brokers side by side. ``--autosave`` overrides
the persistence settings of the generated mosquitto.conf (``interval:N``: save every N s; ``changes:N``:
save after N changes; ``generated``: as exported); the table then counts Mosquitto's saves.
``--database postgres`` stores everything (org, keys, machines, reports) in a throwaway PostgreSQL server
started here with tests/postgres.py (``--database postgresql://…`` names one of yours); every part gets it
as FLEET_DATABASE_URL. ``--auth certificate`` has every simulated agent connect with its own machine
certificate: one token enrols them all first (timed: the enrolment row), then the measured run starts; ``both``
runs each broker with the org key and with certificates, side by side. ``--profile PATH`` (embedded only) runs
the broker under bench/profiled.py: cProfile on its event loop over the steady phase, pstats written to PATH,
time in garbage collection printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    FLEET,
    free_port,
    http_json,
    print_table,
    simulator_summaries,
    start_simulators,
    stop_process,
    wait_port,
    wait_until,
)
from fleet.config import payloads  # noqa: E402
from fleet.config.mqtt import BrokerAddress, new_client  # noqa: E402
from fleet.config.status import BROKER, BROKER_CONNECTED, COLLECTOR  # noqa: E402
from fleet.config.topics import agent_client_id, ping_topic, report_topic  # noqa: E402
from fleet.store.database import DatabaseError, DatabaseUrl, open_database, sqlite_url  # noqa: E402
from fleet.store.heartbeats import read_heartbeat  # noqa: E402

ORG = "load"
PROBE = "probe-1"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
# The latency probe polls the API every 20 ms: lift the per-client limit for this benchmark only.
ENV = {**os.environ, "FLEET_LOG_LEVEL": "WARNING", "FLEET_RATE_LIMIT_API": "1000000/minute"}


class Probe:
    """One agent publishing a marked report each second; measures how long until the API shows it."""

    def __init__(self, url: str, ca: Path, key: str, api: str, reader_key: str) -> None:
        self.api, self.reader_key = api, reader_key
        self.address = BrokerAddress.parse(url)
        self.client = new_client(self.address, agent_client_id(ORG, PROBE), f"{ORG}/agent", key, ca)
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def loop(self) -> None:
        self.client.connect(self.address.host, self.address.port, keepalive=30)
        self.client.loop_start()
        session = os.urandom(6).hex()
        self.client.publish(ping_topic(ORG, PROBE), payloads.encode(
            payloads.build_ping(PROBE, "probe", session, "online", 1.0, ts=time.time())), qos=1, retain=True)
        seq = 0
        while not self.stop.is_set():
            sent = time.time()
            body = payloads.build_report(PROBE, "probe", session, seq, sent, {"probe_seq": seq}, {"os": "Linux"})
            self.client.publish(report_topic(ORG, PROBE), payloads.encode(body), qos=1)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not self.stop.is_set():
                try:
                    _, machine = http_json(f"{self.api}/api/fleet/{PROBE}", self.reader_key)
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


def tree(pid: int) -> list[psutil.Process]:
    """A process and its children (``fleet`` parts are single processes; this is belt and braces)."""
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process tree so far."""
    total = 0.0
    for p in tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def rss_mb(pid: int) -> float:
    """RSS of a process tree in MiB."""
    total = 0
    for p in tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def count(db: str, sql: str) -> int:
    """One ``count(*)`` over the run's database (SQLite or PostgreSQL), read-only, the probe left out."""
    with open_database(db, readonly=True) as conn:
        row = conn.query_one(sql, (PROBE,))
    return int(row[0]) if row else 0


def stored_reports(db: str) -> int:
    """Reports stored, the probe's left out: exact, but a read of the whole history (for the end of a run)."""
    return count(db, "SELECT count(*) FROM reports WHERE machine_id != ?")


def stored_so_far(db: str) -> int:
    """Reports stored, the probe's included: the newest id, one index lookup (for sampling during the run).

    Counting every row each second would be a read that grows with history and holds the WAL's resets off.
    """
    with open_database(db, readonly=True) as conn:
        row = conn.query_one("SELECT max(id) FROM samples")
        return int(row[0] or 0) if row else 0


def online_machines(db: str) -> int:
    return count(db, "SELECT count(*) FROM machines WHERE status = 'online' AND machine_id != ?")


@dataclass
class Sample:
    """One second of the run: CPU seconds and RSS of each part, reports stored, database files' sizes."""

    t: float
    cpu: dict[str, float]
    rss: dict[str, float]
    stored: int
    files: dict[str, float]  # MiB by file name (SQLite only)
    broker: dict[str, Any] = field(default_factory=dict)  # the embedded broker's last heartbeat detail
    collector_connected: bool | None = None  # as the collector's last heartbeat says
    broker_beat_at: float = 0.0  # when those two heartbeats were written (unix time)
    collector_beat_at: float = 0.0


LOCKED = "database is locked"
GROWTH_FROM_S = 300.0  # growth is measured from minute 5 of the run (warm-up done), when 5 more minutes follow
FILES = ("fleet.db", "fleet.db-wal", "broker.db-wal")
WAL_WATCH_S = 0.02


def file_mb(path: Path) -> float:
    """A file's size in MiB (0 when absent)."""
    try:
        return path.stat().st_size / 2**20
    except FileNotFoundError:
        return 0.0


def locked_lines(log: Path) -> int | str:
    """How many lines of a part's log say "database is locked" ("n/a" without a log)."""
    if not log.exists():
        return "n/a"
    with open(log, errors="replace") as f:
        return sum(LOCKED in line for line in f)


@dataclass
class Parts:
    """The processes of one run, by name: broker, collector, web, simulators."""

    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    sims: list[subprocess.Popen] = field(default_factory=list)

    def stop(self) -> None:
        for proc in [*self.sims, *reversed(list(self.procs.values()))]:
            stop_process(proc, 20)


def start_broker(kind: str, data: Path, port: int, autosave: str = "generated", env: dict[str, str] = ENV,
                 profile: Path | None = None, parts: Parts | None = None, watch: bool = False) -> subprocess.Popen:
    """`fleet broker` (under bench/profiled.py with ``profile``), or Mosquitto on `fleet mosquitto-config`'s
    output (run as root when we are root), its persistence settings overridden by ``autosave`` and its saves
    logged. With ``watch``, the config comes from `fleet mosquitto-config --watch`, left running (as part
    ``watch`` of ``parts``) so tokens and certificates reach Mosquitto."""
    if kind == "embedded":
        command = FLEET if profile is None else [sys.executable, str(Path(__file__).with_name("profiled.py")),
                                                  str(profile), *FLEET[2:]]
        proc = start_part([*command, "broker", "--mqtt-port", str(port), "--data-dir", str(data)], env,
                          data / "broker.log")
        wait_port(port, proc)
        return proc
    out = data / "mosquitto"
    config = [*FLEET, "mosquitto-config", "--out", str(out), "--mqtt-port", str(port), "--data-dir", str(data)]
    if watch and parts is not None:
        watcher = parts.procs["watch"] = start_part([*config, "--watch"], env, data / "watch.log")
        wait_until(lambda: (out / "certs" / "machines.crl").exists() or watcher.poll() is not None, 60,
                   "mosquitto-config --watch")
    else:
        subprocess.run(config, env=env, check=True, stdout=subprocess.DEVNULL)
    conf = out / "mosquitto.conf"
    lines = conf.read_text().splitlines()
    if autosave != "generated":
        kind_, _, value = autosave.partition(":")
        lines = [line for line in lines if not line.startswith("autosave_")]
        lines += [f"autosave_interval {int(value)}", f"autosave_on_changes {'true' if kind_ == 'changes' else 'false'}"]
    conf.write_text("\n".join(["log_type information", *lines]) + "\n")  # "Saving in-memory database" lines
    log = open(out / "mosquitto.log", "w")  # a file, not a pipe: a full pipe would stall Mosquitto
    proc = subprocess.Popen([MOSQUITTO, "-c", str(out / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_port(port, proc)
    return proc


def start_part(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A fleet part with its output in ``log`` (a file, not a pipe: a full pipe would stall the part)."""
    with open(log, "w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def growth_from(started: float, settled: float, end: float) -> tuple[float, str]:
    """Where growth is measured from: minute 5 of the run when 5 more minutes follow it, else the end of settle."""
    if end - (started + GROWTH_FROM_S) >= GROWTH_FROM_S:
        return started + GROWTH_FROM_S, "minute 5"
    return settled, "end of settle"


def peak_and_growth(samples: list[Sample], value: Callable[[Sample], float], reference: float, end: float) -> str:
    """``max / +growth`` of one sampled value in MB: its maximum over the run, and ``end`` minus ``reference``."""
    inside = [s for s in samples if s.t <= end] or samples
    first = next((s for s in inside if s.t >= reference), inside[-1])
    return f"{max(value(s) for s in samples):.1f} / {value(inside[-1]) - value(first):+.1f} MB"


def beat_max(samples: list[Sample], key: str) -> float:
    """The largest ``key`` in the broker heartbeats of ``samples`` (0 without any)."""
    return max((s.broker.get(key, 0.0) for s in samples if s.broker), default=0.0)


def heartbeats(db: str) -> tuple[dict[str, Any], bool | None, float, float]:
    """The embedded broker's last heartbeat detail, whether the collector's says it is connected, and when each
    was written."""
    try:
        with open_database(db, readonly=True) as conn:
            broker, collector = read_heartbeat(conn, BROKER), read_heartbeat(conn, COLLECTOR)
    except DatabaseError:
        return {}, None, 0.0, 0.0
    return ((broker[1] if broker else {}), (collector[1].get(BROKER_CONNECTED) if collector else None),
            (broker[0] if broker else 0.0), (collector[0] if collector else 0.0))


def restart_broker(kind: str, data: Path, port: int, args: argparse.Namespace, env: dict[str, str], parts: Parts,
                   samples: list[Sample]) -> dict[str, str]:
    """Stop the broker (SIGTERM), start it again on the same port and data, and time the way back: until the
    collector is connected again, and until the broker holds every agent again. Only heartbeats written after
    the restart count (both parts write one every 2 s: the times are that precise)."""
    stop_process(parts.procs["broker"], 30)
    restarted = time.time()
    parts.procs["broker"] = start_broker(kind, data, port, args.autosave, env)
    collector_back = agents_back = None
    deadline = time.monotonic() + args.connect_timeout
    while time.monotonic() < deadline and (agents_back is None or collector_back is None):
        time.sleep(0.5)
        last = samples[-1]
        if collector_back is None and last.collector_beat_at > restarted and last.collector_connected:
            collector_back = last.collector_beat_at
        if last.broker_beat_at > restarted and last.broker.get("connected", 0) >= args.agents:
            agents_back = last.broker_beat_at
    return {"restart: collector connected again after": "never" if collector_back is None
            else f"{collector_back - restarted:.1f} s",
            "restart: every agent connected again after": "never" if agents_back is None
            else f"{agents_back - restarted:.1f} s"}


def enrol_simulators(args: argparse.Namespace, url: str, data: Path, env: dict[str, str]) -> tuple[str, float]:
    """Enrol every simulated machine with one token (``fleet simulate --enrol``, briefly); (token, seconds taken)."""
    made = json.loads(subprocess.check_output([*FLEET, "enrol", "create", ORG, "--uses", str(args.agents), "--expires",
                                               "6h", "--json", "--data-dir", str(data)], env=env))
    started = time.monotonic()
    sims = start_simulators(args.simulators, args.agents, url, ORG, "", data, args.interval, args.connect_rate, env,
                            extra=("--enrol", made["token"], "--duration", "0.1"))
    for sim in sims:
        sim.communicate(timeout=3600)
    return made["token"], time.monotonic() - started


def run(kind: str, args: argparse.Namespace, database: str | None, auth: str = "key") -> dict[str, object]:
    """One broker's run, on SQLite in its data dir or on ``database``; returns its figures by metric name."""
    data = Path(tempfile.mkdtemp(prefix=f"fleet-load-{kind}-"))
    db = database or sqlite_url(data / "fleet.db")
    env = {**ENV, "FLEET_DATABASE_URL": db}
    mqtt_port, http_port, service_port = free_port(), free_port(), free_port()
    env.update({"FLEET_MQTT_SERVICE_PORT": str(service_port), "FLEET_BROKER_LOOP": args.broker_loop})
    common = ["--data-dir", str(data)]
    keys = json.loads(subprocess.check_output([*FLEET, "org", "add", ORG, "--json", *common], env=env))
    parts = Parts()
    try:
        profile = args.profile if kind == "embedded" else None
        if kind == "mosquitto":  # its listener for machine certificates, on a port known to be free
            env = {**env, "FLEET_MQTT_CERT_PORT": str(free_port())}
        parts.procs["broker"] = start_broker(kind, data, mqtt_port, args.autosave, env, profile, parts,
                                             watch=kind == "mosquitto" and auth == "certificate")
        url = f"mqtts://127.0.0.1:{mqtt_port}"
        # On the embedded broker the collector has a listener of its own, beyond the agents' admission bounds.
        collector_url = f"mqtts://127.0.0.1:{service_port}" if kind == "embedded" else url
        ca = data / "certs" / "ca.pem"
        parts.procs["collector"] = start_part([*FLEET, "collector", "--broker", collector_url, *common], env,
                                              data / "collector.log")
        parts.procs["web"] = start_part([*FLEET, "web", "--http-port", str(http_port), "--broker", url, *common], env,
                                        data / "web.log")
        api = f"http://127.0.0.1:{http_port}"
        wait_until(lambda: http_json(f"{api}/healthz")[0] == 200, 60, "healthz")
        time.sleep(2)  # let start-up settle before the idle baseline
        idle_rss = {name: rss_mb(p.pid) for name, p in parts.procs.items()}

        token, enrol_s = enrol_simulators(args, url, data, env) if auth == "certificate" else ("", None)
        started = time.time()
        parts.sims = start_simulators(args.simulators, args.agents, url, ORG, keys["agent_key"], data, args.interval,
                                      args.connect_rate, env, extra=("--enrol", token) if token else (),
                                      nice=args.nice)
        probe = Probe(url, ca, keys["agent_key"], api, keys["reader_key"])
        probe_thread = threading.Thread(target=probe.loop, daemon=True)
        probe_thread.start()

        samples: list[Sample] = []
        sampling = threading.Event()

        def sample() -> None:
            pids = {name: p.pid for name, p in parts.procs.items()} | {f"sim{i}": s.pid for i, s in
                                                                        enumerate(parts.sims)}
            while not sampling.is_set():
                try:
                    stored = stored_so_far(db)
                except DatabaseError:
                    stored = samples[-1].stored if samples else 0
                files = {} if database else {name: file_mb(data / name) for name in FILES}
                beats = heartbeats(db)
                samples.append(Sample(time.time(), {n: cpu_s(pid) for n, pid in pids.items()},
                                      {n: rss_mb(pid) for n, pid in pids.items()}, stored, files, *beats))
                sampling.wait(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        wal_peak = [0.0]  # resets come every fraction of a second under load: the 1 s samples would miss peaks

        def watch_wal() -> None:
            while not database and not sampling.wait(WAL_WATCH_S):
                wal_peak[0] = max(wal_peak[0], file_mb(data / "fleet.db-wal"))

        threading.Thread(target=watch_wal, daemon=True).start()

        window = args.agents / args.connect_rate
        all_online = None
        deadline = time.monotonic() + window + args.connect_timeout
        while time.monotonic() < deadline and all(s.poll() is None for s in parts.sims):
            if online_machines(db) >= args.agents:
                all_online = time.time()
                break
            time.sleep(0.5)
        if all_online is None:
            print(f"  [{kind}] not every agent online after {window + args.connect_timeout:.0f} s "
                  f"({online_machines(db)}/{args.agents}); measuring anyway", flush=True)
        steady_from = time.time() + args.interval
        steady_to = steady_from + args.steady
        if profile is not None:  # the broker's event loop profiled over the steady phase only
            time.sleep(max(0.0, steady_from - time.time()))
            parts.procs["broker"].send_signal(signal.SIGUSR1)
        while time.time() < steady_to:
            time.sleep(min(5.0, max(0.0, steady_to - time.time())))
            last = samples[-1]
            print(f"  [{kind}] t={last.t - started:5.0f}s online={online_machines(db)} stored={last.stored} "
                  + " ".join(f"{n}={last.rss[n]:.0f}MB" for n in ("broker", "collector", "web"))
                  + "".join(f" {n}={mb:.0f}MB" for n, mb in last.files.items()), flush=True)

        if profile is not None:
            parts.procs["broker"].send_signal(signal.SIGUSR2)
        if args.restart_broker:
            restart = restart_broker(kind, data, mqtt_port, args, env, parts, samples)
        for sim in parts.sims:
            sim.send_signal(signal.SIGTERM)
        summaries = simulator_summaries(parts.sims)
        probe.stop.set()
        probe_thread.join(15)
        acked = sum(s.get("acked", 0) for s in summaries)
        deadline = time.monotonic() + 60
        while stored_reports(db) < acked and time.monotonic() < deadline:
            time.sleep(0.5)
        stored = stored_reports(db)
        sampling.set()
        sampler.join(5)
    finally:
        parts.stop()

    connected_at = [s.get("all_connected_at") for s in summaries]
    firsts = [s["first_connect_at"] for s in summaries if s.get("first_connect_at")]
    all_connected = max(connected_at) if connected_at and None not in connected_at else None
    sims = [f"sim{i}" for i in range(args.simulators)]

    def window(t0: float, t1: float) -> list[Sample]:
        inside = [s for s in samples if t0 <= s.t <= t1]
        return inside if len(inside) >= 2 else [samples[0], samples[-1]]

    def cpu_pct(phase: list[Sample], *names: str) -> float:
        return sum(phase[-1].cpu[n] - phase[0].cpu[n] for n in names) / (phase[-1].t - phase[0].t) * 100

    connecting = window(started, all_connected or steady_from)
    steady = window(steady_from, steady_to)
    first, last = steady[0], steady[-1]
    dt = last.t - first.t

    def mean_rss(name: str) -> float:
        return statistics.fmean(s.rss[name] for s in steady)

    lat = sorted(probe.latencies)
    saves = "n/a"
    if kind == "mosquitto":
        count = (data / "mosquitto" / "mosquitto.log").read_text().count("Saving in-memory database")
        db_file = data / "mosquitto" / "data" / "mosquitto.db"
        saves = f"{count} / {db_file.stat().st_size / 1024 if db_file.exists() else 0:.0f} KiB"
    resets = "n/a"
    if not database:
        with open_database(db, readonly=True) as conn:
            beat = read_heartbeat(conn, COLLECTOR)
        if beat is not None and "wal_resets" in beat[1]:
            resets = " / ".join(str(beat[1].get(key, "n/a")) for key in ("wal_resets", "wal_resets_busy",
                                                                          "wal_resets_by_writer"))
    locked = {name: locked_lines(data / f"{name}.log") for name in ("broker", "collector", "web")}
    since, since_name = growth_from(started, steady_from, steady_to)
    disk = {f"{name} RSS max / growth since {since_name}": peak_and_growth(samples, lambda s, n=name: s.rss[n], since,
                                                                           steady_to)
            for name in ("broker", "collector", "web")}
    for name in FILES if not database else ():
        disk[f"{name} max / growth since {since_name}"] = peak_and_growth(samples, lambda s, n=name: s.files[n],
                                                                          since, steady_to)
    beat = next((s.broker for s in reversed(samples) if s.broker), {})
    figures = {
        "agents authenticate with": auth,
        "enrolment of every agent (simulate --enrol)": "n/a" if enrol_s is None else f"{enrol_s:.1f} s",
        "time until all agents connected": "never" if all_connected is None else f"{all_connected - started:.1f} s",
        "connect rate (handshakes/s; offered)": ("n/a" if all_connected is None or not firsts
                                                 else f"{args.agents / max(1e-3, all_connected - min(firsts)):.0f}")
        + f" ({args.connect_rate:.0f})",
        "connect attempts failed / reconnects": f"{sum(s.get('failed', 0) for s in summaries)} / "
                                                f"{sum(s.get('reconnects', 0) for s in summaries)}",
        "CPU while connecting: broker / simulators": f"{cpu_pct(connecting, 'broker'):.0f}% / "
                                                     f"{cpu_pct(connecting, *sims):.0f}%",
        "simulator errors (logged; must be 0)": sum(s.get("errors", 0) for s in summaries),
        "steady phase": f"{dt:.0f} s",
        "ingest (reports/s, offered)": f"{(last.stored - first.stored) / dt:.0f} ({args.agents / args.interval:.0f})",
        "broker CPU (% of a core)": f"{cpu_pct(steady, 'broker'):.1f}%",
        "broker RSS idle / steady": f"{idle_rss['broker']:.0f} / {mean_rss('broker'):.0f} MB",
        "broker RSS per connection": f"{(mean_rss('broker') - idle_rss['broker']) * 1024 / args.agents:.1f} KiB",
        "collector CPU (% of a core)": f"{cpu_pct(steady, 'collector'):.0f}%",
        "collector RSS": f"{mean_rss('collector'):.0f} MB",
        "web CPU / RSS": f"{cpu_pct(steady, 'web'):.0f}% / {mean_rss('web'):.0f} MB",
        f"simulator CPU ({args.simulators} process{'es' if args.simulators > 1 else ''}, max per process)":
            f"{cpu_pct(steady, *sims):.0f}% ({max(cpu_pct(steady, s) for s in sims):.0f}%)",
        "simulator RSS per agent": f"{sum(mean_rss(s) for s in sims) * 1024 / args.agents:.0f} KiB",
        "reports acked / stored": f"{acked} / {stored}",
        "acked but not stored": f"{max(0, acked - stored)}",
        "report->API latency p50 / p99": "n/a" if not lat else
        f"{statistics.median(lat) * 1000:.0f} / {lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000:.0f} ms",
        f"Mosquitto saves ({args.autosave}) / last mosquitto.db": saves,
        **disk,
        f"fleet.db-wal max, looked at every {WAL_WATCH_S * 1000:.0f} ms":
            "n/a" if database else f"{wal_peak[0]:.1f} MB",
        "collector WAL resets / held off / by the writer (heartbeat)": resets,
        f'"{LOCKED}" lines: broker / collector / web': " / ".join(str(n) for n in locked.values()),
        "collector disconnected from the broker (samples, of all)":
            f"{sum(1 for s in samples if s.collector_connected is False)} / {len(samples)}",
        "broker loop lag p99 over a minute, max in steady / max ever (heartbeat)":
            "n/a" if not beat else f"{beat_max(steady, 'loop_lag_p99_ms'):.0f} / "
                                   f"{beat_max(samples, 'loop_lag_p99_ms'):.0f} ms",
        "broker loop lag, longest single delay / longest full garbage collection (heartbeat)":
            "n/a" if not beat else f"{beat_max(samples, 'loop_lag_max_ms'):.0f} / "
                                   f"{beat_max(samples, 'gc_full_max_ms'):.0f} ms",
        "broker connections admitted / refused before TLS (busy / rate) / refused full":
            "n/a" if not beat else f"{beat.get('connections', 0)} / {beat.get('refused_handshakes_busy', 0)} / "
                                   f"{beat.get('refused_accept_rate', 0)} / {beat.get('refused_broker_full', 0)}",
        "broker dropped slow readers / handshake timeouts / writes after close":
            "n/a" if not beat else f"{beat.get('dropped_slow_reader', 0)} / {beat.get('handshake_timeouts', 0)} / "
                                   f"{beat.get('write_after_close', 0)}",
    }
    if args.restart_broker:
        figures.update(restart)
    if args.keep:
        print(f"  [{kind}] data dir kept: {data}", flush=True)
    else:
        shutil.rmtree(data, ignore_errors=True)  # hundreds of MB per run (databases, logs, simulator records)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--broker", choices=("embedded", "mosquitto", "both"), default="both")
    parser.add_argument("--steady", type=float, default=60.0, help="seconds measured after connect + one interval")
    parser.add_argument("--connect-rate", type=float, default=500.0,
                        help="first connects a second, over all simulators (window = agents / rate)")
    parser.add_argument("--connect-timeout", type=float, default=120.0,
                        help="how long past the connect window to wait for every agent to be online")
    parser.add_argument("--simulators", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="fleet simulate processes (default: one per two cores)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="embedded only: cProfile the broker's event loop over the steady phase, pstats to PATH")
    parser.add_argument("--autosave", default="generated", help="Mosquitto only: generated, interval:N, changes:N")
    parser.add_argument("--database", default="sqlite",
                        help="sqlite (fleet.db in each run's data dir), postgres (a throwaway server) or a URL")
    parser.add_argument("--auth", choices=("key", "certificate", "both"), default="key",
                        help="simulated agents connect with the org key, their own certificates, or each in turn")
    parser.add_argument("--keep", action="store_true", help="keep each run's data dir (database, logs) and print it")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness of the simulators, so the load generator yields the shared cores to the parts")
    parser.add_argument("--broker-loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="embedded only: the broker's event loop (setting broker_loop)")
    parser.add_argument("--restart-broker", action="store_true",
                        help="after the steady phase, restart the broker and time every agent's return")
    args = parser.parse_args()
    brokers = ["embedded", "mosquitto"] if args.broker == "both" else [args.broker]
    server = None
    if args.database == "postgres":
        from tests.postgres import PostgresServer, unavailable_reason

        if reason := unavailable_reason():
            raise SystemExit(f"--database postgres: {reason}")
        server = PostgresServer().start()
    elif args.database != "sqlite" and DatabaseUrl.parse(args.database).engine != "postgresql":
        raise SystemExit("--database: sqlite, postgres or a postgresql:// URL")
    results = {}
    auths = ["key", "certificate"] if args.auth == "both" else [args.auth]
    try:
        for kind in brokers:
            for auth in auths:
                print(f"{kind} ({auth}): {args.agents} agents, interval {args.interval} s, {args.simulators} "
                      f"simulator(s), {args.database}", flush=True)
                database = server.database() if server else None if args.database == "sqlite" else args.database
                results[kind if len(auths) == 1 else f"{kind}, {auth}"] = run(kind, args, database, auth)
    finally:
        if server:
            server.destroy()
    print()
    print(f"agents={args.agents} interval={args.interval}s steady={args.steady}s connect-rate={args.connect_rate}/s "
          f"simulators={args.simulators} (nice {args.nice}) cores={os.cpu_count()} database={args.database}")
    print_table("metric", results)


if __name__ == "__main__":
    main()
