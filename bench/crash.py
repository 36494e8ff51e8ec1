"""Crash benchmark: N agents at 1 s; SIGKILL of `fleet up`, `fleet broker` or `fleet collector` mid-run.

For each kill, a fresh data dir: the system runs (`fleet up`, or broker, collector and web as three
processes), `fleet simulate --record` connects N agents, and once all are online and --before seconds
have passed, the part is SIGKILLed and restarted on the same ports. The agents reconnect (new sessions,
full-jitter backoff); after --after more seconds they stop cleanly and the collector drains. Then every
report is accounted for by (machine, session, seq), from the simulator's record and the database:

- good: acknowledged (PUBACK) and stored;
- LOST: acknowledged but not stored (must be 0);
- tail: published, never acknowledged, not stored: a dead connection's in-flight reports (the
  simulator has no outbox), which the collector should count as lost from the next session's online
  ping (prev_session/prev_seq);
- counted: what the collector counts as lost (``fleet_org_reports_lost_total`` in /metrics, settled
  --lost-grace seconds after the online ping naming the session), and ``late``: counted reports that
  arrived afterwards (the counter is never decremented); "n/a" while the collector does not count;
- unexplained: missing from storage and not counted (missing - counted + late; must be 0).

    python3 bench/crash.py --agents 1000 --kill up,broker,collector

``--kill collector --standby [--kills N]``: two `fleet collector` processes (one active, one waiting) on
one data dir; N times, the active one is SIGKILLed and started again as the waiting one. Per kill it
measures the takeover (until /healthz names the other collector active, and until that one has stored a
report received after the kill). A `--watchdog` webhook channel to a receiver in this process, with the
FleetWatchdog alert every --watchdog-interval seconds and answers delayed --receiver-delay seconds (so
kills land in the middle of deliveries), counts each notification (Idempotency-Key) received: more than
once is a duplicate, never (and not left in the outbox) is lost.

    python3 bench/crash.py --agents 1000 --kill collector --standby --kills 10 [--separate-hosts]
Loopback only; stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    FLEET,
    free_port,
    http_get,
    http_json,
    poll,
    print_table,
    simulator_summaries,
    start_simulators,
    stop_process,
    wait_port,
    wait_until,
)
from fleet.agent.record import read_record  # noqa: E402

ORG = "crash"
KILLS = ("up", "broker", "collector")
ENV = {**os.environ, "FLEET_LOG_LEVEL": "WARNING", "FLEET_RATE_LIMIT_API": "1000000/minute"}
LOST_GRACE_S = 10.0  # the collector's wait for replays before counting a tail (default 60 s); no outbox here


@dataclass
class System:
    """The processes of the system under test, restartable on the same ports."""

    data: Path
    layout: str  # "up": one `fleet up`; "parts": broker, collector, web; "standby": two collectors
    env: dict[str, str]
    separate_hosts: bool = False  # each collector in a UTS namespace of its own: another hostname, as on another host
    mqtt_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.mqtt_port}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def command(self, part: str) -> list[str]:
        common = ["--data-dir", str(self.data)]
        return {
            "up": [*FLEET, "up", "--mqtt-port", str(self.mqtt_port), "--http-port", str(self.http_port), *common],
            "broker": [*FLEET, "broker", "--mqtt-port", str(self.mqtt_port), *common],
            "collector": [*FLEET, "collector", "--broker", self.url, *common],
            "collector-a": [*FLEET, "collector", "--broker", self.url, *common],
            "collector-b": [*FLEET, "collector", "--broker", self.url, *common],
            "web": [*FLEET, "web", "--http-port", str(self.http_port), "--broker", self.url, *common],
        }[part]

    def start(self, part: str) -> None:
        with open(self.data / f"{part}.log", "a") as log:  # a file, not a pipe nobody reads
            env = {**self.env, "FLEET_INSTANCE": part} if part.startswith("collector-") else self.env
            command = self.command(part)
            if self.separate_hosts and part.startswith("collector-"):
                # The lease frees a dead holder at once only on its own host: elsewhere it must expire.
                command = ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', f"{part}-host",
                           *command]
            self.procs[part] = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        if part in ("up", "broker"):
            wait_port(self.mqtt_port, self.procs[part], timeout=60)

    def start_all(self) -> None:
        parts = {"up": ["up"], "parts": ["broker", "collector", "web"],
                 "standby": ["broker", "web", "collector-a", "collector-b"]}[self.layout]
        for part in parts:
            self.start(part)
            if part == "collector-a":
                wait_until(lambda: self.active() == "collector-a", 60, "collector-a active")
        self.wait_healthy()
        if self.layout == "standby":
            wait_until(lambda: self.waiting() == ["collector-b"], 60, "collector-b waiting")

    def health(self) -> dict[str, Any]:
        """/healthz's body (whatever its status)."""
        try:
            return http_json(f"{self.api}/healthz")[1] or {}
        except OSError:
            return {}

    def active(self) -> str | None:
        """The collector /healthz names active."""
        return self.health().get("collector_active")

    def waiting(self) -> list[str]:
        """The collectors /healthz lists as waiting."""
        return sorted(c["instance"] for c in self.health().get("collectors", []) if not c["active"])

    def wait_healthy(self) -> None:
        wait_until(lambda: http_json(f"{self.api}/healthz")[0] == 200, 60, "healthz 200")

    def kill_and_restart(self, part: str) -> float:
        """SIGKILL ``part``, start it again; returns the Unix time of the kill."""
        proc = self.procs[part]
        killed = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.start(part)
        self.wait_healthy()
        return killed

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            stop_process(proc, 20)


class Receiver:
    """A webhook receiver on loopback: holds each request ``delay`` seconds, then answers 200 unless its sender
    has gone (the connection closed meanwhile: cut off, never answered). Counts the requests it received per
    Idempotency-Key (received, whether answered or not: what a receiver acting first would act on)."""

    def __init__(self, delay: float) -> None:
        self.received: dict[str, int] = {}
        self.cut = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = self.headers.get("Idempotency-Key", "")
                with receiver.lock:
                    receiver.received[key] = receiver.received.get(key, 0) + 1
                if not receiver.hold(self.connection, delay):
                    with receiver.lock:
                        receiver.cut += 1
                    self.close_connection = True
                    return
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    self.wfile.flush()
                except OSError:
                    with receiver.lock:
                        receiver.cut += 1

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dms"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    @staticmethod
    def hold(connection: socket.socket, delay: float) -> bool:
        """Wait ``delay`` seconds; False as soon as the sender closes the connection."""
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            if select.select([connection], [], [], min(left, 0.05))[0]:
                try:
                    if connection.recv(1, socket.MSG_PEEK) == b"":
                        return False
                except OSError:
                    return False
        return True

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def query(db: Path, sql: str, *params: object) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def metric_sum(text: str, name: str) -> float | None:
    """The sum of a metric family's samples in Prometheus text, or None when the family is absent."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith((f"{name}{{", f"{name} "))]
    return sum(values) if values or f"# TYPE {name} " in text else None


def collector_counts(system: System, reader_key: str) -> tuple[float | None, float | None]:
    """The collector's lost count for the org and its late arrivals, from /metrics (None: not counted)."""
    _, body = http_get(f"{system.api}/metrics", reader_key, timeout=60)
    text = body.decode()
    return metric_sum(text, "fleet_org_reports_lost_total"), metric_sum(text, "fleet_reports_late_total")


def run(kill: str, args: argparse.Namespace) -> dict[str, object]:
    """One kill's run; returns its accounting."""
    data = Path(tempfile.mkdtemp(prefix=f"fleet-crash-{kill}-"))
    print(f"  [{kill}] data dir {data}", flush=True)
    db = data / "fleet.db"
    keys = json.loads(subprocess.check_output([*FLEET, "org", "add", ORG, "--json", "--data-dir", str(data)],
                                              env=ENV))
    system = System(data, "up" if kill == "up" else "parts", {**ENV, "FLEET_LOST_GRACE_S": str(args.lost_grace)})
    sims: list[subprocess.Popen] = []
    try:
        system.start_all()
        sims = start_simulators(args.simulators, args.agents, system.url, ORG, keys["agent_key"], data, args.interval,
                                args.connect_rate, {**ENV, "FLEET_RECONNECT_MAX_S": str(args.reconnect_max)},
                                record=True)

        def all_online() -> bool:
            return query(db, "SELECT count(*) FROM machines WHERE status='online'")[0][0] >= args.agents

        wait_until(all_online, args.agents / args.connect_rate + 120, "every agent online")
        time.sleep(args.before)
        stored_at_kill = query(db, "SELECT count(*) FROM reports")[0][0]
        print(f"  [{kill}] SIGKILL after {stored_at_kill} reports stored", flush=True)
        before = dict(query(db, "SELECT machine_id, session FROM machines"))
        killed = system.kill_and_restart(kill)
        restarted = time.time()

        def all_back() -> bool:
            """Broker killed: every agent online in a new session; collector killed: reports received again."""
            rows = query(db, "SELECT machine_id, session, last_seen FROM machines WHERE status='online'")
            if kill == "collector":
                return sum(1 for _, _, seen in rows if seen and seen > restarted) >= args.agents
            return sum(1 for m, s, _ in rows if s != before.get(m)) >= args.agents

        back: float | None = time.time() if poll(all_back, args.back_timeout) else None
        if back is None:
            online = query(db, "SELECT count(*) FROM machines WHERE status='online'")[0][0]
            print(f"  [{kill}] not every agent back {args.back_timeout:.0f} s after the restart ({online} online "
                  "by the collector's word); stopping the agents anyway", flush=True)
        else:
            print(f"  [{kill}] restarted; all agents back {back - killed:.1f} s after the kill", flush=True)
            time.sleep(args.after)
        for sim in sims:
            sim.send_signal(signal.SIGTERM)
        summaries = simulator_summaries(sims)

        def drained() -> bool:  # every clean shutdown recorded (each follows its session's reports)
            return query(db, "SELECT count(*) FROM machines WHERE status != 'offline'")[0][0] == 0

        if not poll(drained, args.back_timeout):
            print(f"  [{kill}] not every clean shutdown recorded after {args.back_timeout:.0f} s: the collector "
                  "is behind or stuck; accounting what is stored", flush=True)
        # The collector settles a tail lost_grace_s after the online ping that names it.
        time.sleep(max(0.0, (back or time.time()) + args.lost_grace + 3 - time.time()))
        counted, late = collector_counts(system, keys["reader_key"])
    finally:
        for sim in sims:
            stop_process(sim, 20)
        system.stop()

    rec = read_record(sorted(data.glob("record-*.csv")))
    stored = set(query(db, "SELECT machine_id, session, seq FROM reports WHERE org = ?", ORG))
    published, acked = rec.published, rec.acked
    unacked = published - acked
    missing = len(published - stored)
    return {
        "published": len(published),
        "acked (PUBACK)": len(acked),
        "stored": len(stored),
        "good (acked, stored)": len(acked & stored),
        "LOST (acked, not stored)": len(acked - stored),
        "tail (not acked, not stored)": len(unacked - stored),
        "stored, PUBACK not received": len(unacked & stored),
        "stored, never published": len(stored - published),
        "counted lost by the collector (late)": "n/a" if counted is None else f"{counted:.0f} ({late or 0:.0f})",
        "unexplained (missing - counted + late)": "n/a" if counted is None
        else f"{missing - counted + (late or 0):.0f}",
        "sessions": len({(m, s) for m, s, _ in rec.connects}),
        "reconnects / failed attempts": f"{sum(s.get('reconnects', 0) for s in summaries)} / "
                                        f"{sum(s.get('failed', 0) for s in summaries)}",
        "simulator errors (logged; must be 0)": sum(s.get("errors", 0) for s in summaries),
        "all agents back after the kill": "no" if back is None else f"{back - killed:.1f} s",
    }


def notification_ids(keys: Any) -> set[int]:
    """Outbox row ids of Idempotency-Keys (``<org>-<id>-<ms>``)."""
    return {int(key.split("-")[-2]) for key in keys if key.count("-") >= 2}


def run_standby(args: argparse.Namespace) -> dict[str, object]:
    """Two collectors, ``--kills`` SIGKILLs of the active one; takeover times, reports and notifications once."""
    data = Path(tempfile.mkdtemp(prefix="fleet-crash-standby-"))
    print(f"  [standby] data dir {data}", flush=True)
    db = data / "fleet.db"
    keys = json.loads(subprocess.check_output([*FLEET, "org", "add", ORG, "--json", "--data-dir", str(data)],
                                              env=ENV))
    receiver = Receiver(args.receiver_delay)
    subprocess.check_call([*FLEET, "alert", "channel", "add", ORG, "dms", receiver.url, "--watchdog",
                           "--data-dir", str(data)], env=ENV, stdout=subprocess.DEVNULL)
    env = {**ENV, "FLEET_LOST_GRACE_S": str(args.lost_grace), "FLEET_WATCHDOG_INTERVAL_S": str(args.watchdog_interval)}
    system = System(data, "standby", env, separate_hosts=args.separate_hosts)
    sims: list[subprocess.Popen] = []
    lease_s, stored_s, cut_before = [], [], []
    try:
        system.start_all()
        sims = start_simulators(args.simulators, args.agents, system.url, ORG, keys["agent_key"], data, args.interval,
                                args.connect_rate, {**ENV, "FLEET_RECONNECT_MAX_S": str(args.reconnect_max)},
                                record=True)
        wait_until(lambda: query(db, "SELECT count(*) FROM machines WHERE status='online'")[0][0] >= args.agents,
                   args.agents / args.connect_rate + 120, "every agent online")
        time.sleep(args.before)
        for n in range(args.kills):
            victim = system.active()
            assert victim in ("collector-a", "collector-b"), victim
            heir = "collector-b" if victim == "collector-a" else "collector-a"
            cut_before.append(receiver.cut)
            killed = time.time()
            system.procs[victim].send_signal(signal.SIGKILL)
            system.procs[victim].wait(10)
            wait_until(lambda: system.active() == heir, 60, f"{heir} active")  # noqa: B023 - used at once
            lease_s.append(time.time() - killed)

            def stored_again() -> bool:
                return (query(db, "SELECT max(received) FROM reports")[0][0] or 0) > killed  # noqa: B023

            wait_until(stored_again, 60, "reports received after the kill stored")
            stored_s.append(time.time() - killed)
            print(f"  [standby] kill {n + 1}/{args.kills}: {victim} -> {heir}: active after {lease_s[-1]:.1f} s,"
                  f" storing after {stored_s[-1]:.1f} s", flush=True)
            system.start(victim)  # back as the waiting one
            wait_until(lambda: system.waiting() == [victim], 60, f"{victim} waiting")  # noqa: B023
            time.sleep(args.between)
        time.sleep(args.after)
        for sim in sims:
            sim.send_signal(signal.SIGTERM)
        simulator_summaries(sims)
        poll(lambda: query(db, "SELECT count(*) FROM machines WHERE status != 'offline'")[0][0] == 0,
             args.back_timeout)
        poll(lambda: query(db, "SELECT count(*) FROM alert_outbox")[0][0] == 0, 30)
    finally:
        for sim in sims:
            stop_process(sim, 20)
        system.stop()
        receiver.stop()
    rec = read_record(sorted(data.glob("record-*.csv")))
    stored = set(query(db, "SELECT machine_id, session, seq FROM reports WHERE org = ?", ORG))
    rows = query(db, "SELECT count(*) FROM reports WHERE org = ?", ORG)[0][0]
    queued = {row[0] for row in query(db, "SELECT id FROM alert_outbox")}
    delivered = notification_ids(receiver.received)
    made = set(range(min(delivered | queued | {1}), max(delivered | queued | {0}) + 1))
    return {
        "kills of the active collector": args.kills,
        "takeover: /healthz names the other active, median / max": f"{statistics.median(lease_s):.1f} s / "
                                                                   f"{max(lease_s):.1f} s",
        "takeover: it stores again, median / max": f"{statistics.median(stored_s):.1f} s / {max(stored_s):.1f} s",
        "reports acked (PUBACK)": len(rec.acked),
        "LOST (acked, not stored)": len(rec.acked - stored),
        "duplicates in history (rows - distinct)": rows - len(stored),
        "notifications made (outbox ids)": len(made),
        "received once": sum(1 for n in receiver.received.values() if n == 1),
        "DUPLICATE (received more than once)": sum(1 for n in receiver.received.values() if n > 1),
        "LOST (never received, not queued)": len(made - delivered - queued),
        "cut off by a kill (received, never answered; not sent again)": receiver.cut,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--kill", default=",".join(KILLS), help="comma-separated: up, broker, collector")
    parser.add_argument("--before", type=float, default=15.0, help="seconds of full load before the kill")
    parser.add_argument("--after", type=float, default=15.0, help="seconds of full load after everyone is back")
    parser.add_argument("--connect-rate", type=float, default=500.0, help="first connects a second (all simulators)")
    parser.add_argument("--back-timeout", type=float, default=90.0,
                        help="seconds to wait for the agents to be back, and for the drain")
    parser.add_argument("--lost-grace", type=float, default=LOST_GRACE_S,
                        help="the collector's FLEET_LOST_GRACE_S: seconds before it counts a session's tail")
    parser.add_argument("--reconnect-max", type=float, default=10.0, help="agents' backoff cap, seconds")
    parser.add_argument("--simulators", type=int, default=max(1, (os.cpu_count() or 1) // 2))
    parser.add_argument("--standby", action="store_true", help="two collectors; kill the active one (--kill collector)")
    parser.add_argument("--kills", type=int, default=10, help="with --standby: how many times")
    parser.add_argument("--separate-hosts", action="store_true",
                        help="with --standby: each collector under its own hostname (unshare --uts; root)")
    parser.add_argument("--between", type=float, default=5.0, help="with --standby: seconds of load between kills")
    parser.add_argument("--watchdog-interval", type=float, default=1.0,
                        help="with --standby: seconds between FleetWatchdog notifications")
    parser.add_argument("--receiver-delay", type=float, default=0.3,
                        help="with --standby: seconds the receiver holds each request before answering")
    args = parser.parse_args()
    kills = [k.strip() for k in args.kill.split(",") if k.strip()]
    if not kills or set(kills) - set(KILLS):
        parser.error(f"--kill takes {', '.join(KILLS)}")
    if args.standby:
        if kills != ["collector"]:
            parser.error("--standby goes with --kill collector")
        print(f"standby: {args.agents} agents at {args.interval} s, {args.kills} kills (logs in the data dir)",
              flush=True)
        result = run_standby(args)
        print()
        print(f"agents={args.agents} interval={args.interval}s kills={args.kills} between={args.between}s "
              f"separate_hosts={args.separate_hosts} "
              f"watchdog={args.watchdog_interval}s receiver_delay={args.receiver_delay}s "
              f"simulators={args.simulators} cores={os.cpu_count()}")
        print_table("SIGKILL of the active collector", {"two `fleet collector`": result})
        return
    results = {}
    for kill in kills:
        print(f"kill {kill}: {args.agents} agents at {args.interval} s (logs in the data dir)", flush=True)
        results[kill] = run(kill, args)
    print()
    print(f"agents={args.agents} interval={args.interval}s before={args.before}s after={args.after}s "
          f"simulators={args.simulators} cores={os.cpu_count()}")
    print_table("SIGKILL of", {f"`fleet {k}`": results[k] for k in kills})


if __name__ == "__main__":
    main()
