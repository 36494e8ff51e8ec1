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
Loopback only; stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

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
    layout: str  # "up": one `fleet up`; "parts": broker, collector, web
    env: dict[str, str]
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
            "web": [*FLEET, "web", "--http-port", str(self.http_port), "--broker", self.url, *common],
        }[part]

    def start(self, part: str) -> None:
        with open(self.data / f"{part}.log", "a") as log:  # a file, not a pipe nobody reads
            self.procs[part] = subprocess.Popen(self.command(part), env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if part in ("up", "broker"):
            wait_port(self.mqtt_port, self.procs[part], timeout=60)

    def start_all(self) -> None:
        for part in ["up"] if self.layout == "up" else ["broker", "collector", "web"]:
            self.start(part)
        self.wait_healthy()

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
    args = parser.parse_args()
    kills = [k.strip() for k in args.kill.split(",") if k.strip()]
    if not kills or set(kills) - set(KILLS):
        parser.error(f"--kill takes {', '.join(KILLS)}")
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
