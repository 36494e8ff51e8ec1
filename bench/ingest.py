"""Ingest benchmark: how fast the collector drains reports into its database, against a raw paho subscriber.

M publisher processes push K reports each (QoS 1) through a broker started here on a free loopback
port: Debian's Mosquitto (plain listener, anonymous allowed: a loopback benchmark, not a deployment)
and/or the embedded broker (``fleet broker``, TLS, real org credentials). For each consumer:

- backlog: the consumer's persistent session is registered, the consumer disconnects, all M*K reports
  are published and queued by the broker, then the consumer starts; rate = M*K / time until the last
  report is counted (raw subscriber) or committed to the database (collector). This is its sustained drain rate.
- live: the consumer runs while the publishers publish; rate = M*K / (first publish .. last counted).

Every run checks zero loss: the collector must have stored exactly M*K distinct (machine, seq).

``--database URL`` (repeatable) picks the collector's database: ``sqlite`` (the default: fleet.db in a
temporary data dir) or a ``postgresql://`` URL (``python -m tests.postgres`` starts a throwaway server and
prints one). Each database is measured against the same broker and the same raw baseline, in one run.
The broker keeps its credentials in the data dir's SQLite file either way.

    python3 bench/ingest.py --publishers 4 --reports 5000 --broker both
    python3 bench/ingest.py --broker mosquitto --database sqlite --database postgresql://u:p@127.0.0.1:5432/db
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench.common import free_port, port_open, stop_process  # noqa: E402
from fleet.config import credentials, payloads  # noqa: E402
from fleet.config.database import DatabaseUrl, open_database, redact, sqlite_url  # noqa: E402
from fleet.config.mqtt import BrokerAddress, new_client  # noqa: E402
from fleet.config.settings import Settings  # noqa: E402
from fleet.config.topics import agent_client_id, report_topic  # noqa: E402

ORG = "bench"
METRICS = {"cpu_percent": 12.5, "cpu_count": 8, "load_avg": [0.4, 0.3, 0.2],
           "memory": {"total": 16_000_000_000, "used": 8_000_000_000, "percent": 50.0}, "swap_percent": 0.0,
           "disks": [{"mount": "/", "total": 500_000_000_000, "used": 100_000_000_000, "percent": 20.0}],
           "net": {"bytes_sent": 123456789, "bytes_recv": 987654321}, "uptime_s": 123456, "process_count": 312}
SYSTEM = {"hostname": "bench", "os": "Linux", "os_version": "6.1", "platform": "Linux-6.1-x86_64",
          "architecture": "x86_64", "python_version": "3.11.7", "hardware_id": "0x1a2b3c4d5e6f",
          "agent_version": "0.1.0"}




def wait_until(predicate, timeout: float, what: str, step: float = 0.01) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(step)
    raise SystemExit(f"timed out waiting for {what}")


@dataclass
class Broker:
    """A broker subprocess and how to reach it."""

    name: str
    url: str
    ca: Path | None
    proc: subprocess.Popen
    agent_user: str | None
    agent_key: str | None
    reader_user: str | None
    reader_key: str | None

    def stop(self) -> None:
        stop_process(self.proc)


def start_mosquitto(workdir: Path) -> Broker:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    # Unbounded queues: a loss in the benchmark must come from the consumer, not the broker's limits.
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 0\nmax_inflight_messages 100\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: port_open(port), 10, "mosquitto")
    return Broker("mosquitto", f"mqtt://127.0.0.1:{port}", None, proc, None, None, None, None)


def start_embedded(data_dir: Path, keys: credentials.OrgSecrets, queued: int) -> Broker:
    port = free_port()
    env = dict(os.environ, FLEET_MAX_QUEUED_MESSAGES=str(queued), FLEET_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "broker", "--data-dir", str(data_dir),
                             "--mqtt-port", str(port)], env=env, cwd=Path(__file__).resolve().parents[1])
    wait_until(lambda: port_open(port), 30, "embedded broker")
    return Broker("embedded", f"mqtts://127.0.0.1:{port}", data_dir / "certs" / "ca.pem", proc,
                  f"{ORG}/agent", keys.agent_key, f"{ORG}/reader", keys.reader_key)




def publisher(url: str, ca: str | None, user: str | None, key: str | None, machine: str, count: int,
              start_at: float) -> None:
    """One agent-like connection publishing ``count`` QoS 1 reports as fast as the broker acks them."""
    session = os.urandom(8).hex()
    raws = [payloads.encode(payloads.build_report(machine, "0x1a2b", session, seq, time.time(), METRICS, SYSTEM))
            for seq in range(count)]
    client = new_client(BrokerAddress.parse(url), agent_client_id(ORG, machine), user, key, ca)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    address = BrokerAddress.parse(url)
    client.connect(address.host, address.port, keepalive=60)
    client.loop_start()
    topic = report_topic(ORG, machine)
    while time.time() < start_at:
        time.sleep(0.001)
    infos = [client.publish(topic, raw, qos=1) for raw in raws]
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def publish_all(broker: Broker, publishers: int, reports: int) -> float:
    """Run the publisher processes; return the wall time when they started publishing."""
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 2.0  # let every process build its payloads and connect first
    procs = [ctx.Process(target=publisher, args=(broker.url, str(broker.ca) if broker.ca else None,
                                                 broker.agent_user, broker.agent_key, f"m{i:03d}", reports,
                                                 start_at))
             for i in range(publishers)]
    for proc in procs:
        proc.start()
    return start_at, procs


def join_all(procs) -> None:
    for proc in procs:
        proc.join(600)
        if proc.exitcode != 0:
            raise SystemExit(f"publisher failed with exit code {proc.exitcode}")


class RawSubscriber:
    """A paho subscriber that only counts messages (the baseline)."""

    def __init__(self, broker: Broker, client_id: str) -> None:
        self.count = 0
        self.first: float | None = None
        self.broker = broker
        self.client_id = client_id
        self.client = new_client(BrokerAddress.parse(broker.url), client_id, broker.reader_user, broker.reader_key,
                                 broker.ca, clean_session=False)
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(f"fleet/{ORG}/+/report", qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        if self.first is None:
            self.first = time.monotonic()
        self.count += 1

    def start(self) -> None:
        address = BrokerAddress.parse(self.broker.url)
        self.client.connect(address.host, address.port, keepalive=60)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise SystemExit("raw subscriber: no SUBACK")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def clear_session(broker: Broker, client_id: str, user: str | None, key: str | None) -> None:
    """Drop a consumer's persistent session (and what the broker queued for it) between runs."""
    client = new_client(BrokerAddress.parse(broker.url), client_id, user, key, broker.ca, clean_session=True)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    address = BrokerAddress.parse(broker.url)
    client.connect(address.host, address.port, keepalive=60)
    client.loop_start()
    if not connected.wait(10):
        raise SystemExit(f"cannot connect as {client_id} to clear its session")
    client.disconnect()
    client.loop_stop()


def collector_settings(broker: Broker, data_dir: Path, database: str) -> Settings:
    return Settings(data_dir=data_dir, database_url=database, broker_url=broker.url, ca=str(broker.ca or ""),
                    agent_rate_limit_per_s=1e9, log_level="WARNING")


def stored_reports(database: str) -> tuple[int, int]:
    with open_database(database) as db:
        row = db.query_one("SELECT count(*), count(DISTINCT machine_id || '/' || seq) FROM reports")
    assert row is not None
    return row[0], row[1]


def run_raw(broker: Broker, publishers: int, reports: int, mode: str) -> float:
    total = publishers * reports
    sub = RawSubscriber(broker, f"bench-raw-{mode}-{os.getpid()}")
    sub.start()
    if mode == "backlog":
        sub.stop()
        _, procs = publish_all(broker, publishers, reports)
        join_all(procs)
        sub = RawSubscriber(broker, sub.client_id)
        t0 = time.monotonic()
        sub.start()
    else:
        start_at, procs = publish_all(broker, publishers, reports)
        t0 = time.monotonic() + (start_at - time.time())
    wait_until(lambda: sub.count >= total, 300, "raw subscriber", step=0.005)
    elapsed = time.monotonic() - t0
    if mode == "live":
        join_all(procs)
    sub.stop()
    # Its persistent session would otherwise keep queueing (and dropping) every later run's reports.
    clear_session(broker, sub.client_id, broker.reader_user, broker.reader_key)
    if sub.count != total:
        raise SystemExit(f"raw subscriber got {sub.count} of {total}")
    return total / elapsed


def run_collector(broker: Broker, data_dir: Path, database: str, publishers: int, reports: int, mode: str) -> float:
    from fleet.collector.service import client_id_for, start

    total = publishers * reports
    service_user = credentials.SERVICE_USERNAME if broker.agent_user else None
    service_key = credentials.ensure_service_key(data_dir) if broker.agent_user else None
    clear_session(broker, client_id_for(()), service_user, service_key)
    with open_database(database) as db:
        db.execute("DELETE FROM reports")
    collector = start(collector_settings(broker, data_dir, database))
    if not collector.wait_subscribed(15):
        raise SystemExit("collector did not subscribe")
    if mode == "backlog":
        collector.stop()
        _, procs = publish_all(broker, publishers, reports)
        join_all(procs)
        t0 = time.monotonic()
        collector = start(collector_settings(broker, data_dir, database))
    else:
        start_at, procs = publish_all(broker, publishers, reports)
        t0 = time.monotonic() + (start_at - time.time())
    wait_until(lambda: collector.stats().stored >= total, 300, "collector", step=0.005)
    elapsed = time.monotonic() - t0
    if mode == "live":
        join_all(procs)
    stats = collector.stats()
    collector.stop()
    rows, distinct = stored_reports(database)
    if rows != total or distinct != total or stats.dropped:
        raise SystemExit(f"loss or duplicates: {rows} rows, {distinct} distinct of {total}; drops {stats.dropped}")
    return total / elapsed


def stage_costs(databases: list[str], n: int = 5000) -> list[tuple[str, float]]:
    """Single-threaded cost of each step the collector adds per message (µs), measured in this run."""
    import json

    from fleet.collector import store
    from fleet.collector.intake import DropCounter, RateLimiter, parse_message
    from fleet.collector.state import Tracker

    raws = [payloads.encode(payloads.build_report("m000", "0x1a2b", "s1", seq, time.time(), METRICS, SYSTEM))
            for seq in range(n)]
    topic = report_topic(ORG, "m000")
    out = []

    def timed(name, func):
        t0 = time.perf_counter()
        result = func()
        out.append((name, (time.perf_counter() - t0) / n * 1e6))
        return result

    timed("json.loads alone", lambda: [json.loads(raw) for raw in raws])
    timed("config.payloads.parse_report (decode + validate)",
          lambda: [payloads.parse_report(raw, topic) for raw in raws])
    drops, limiter = DropCounter(), RateLimiter(1e9)
    items = timed("intake.parse_message (topic, rate limit, validate)",
                  lambda: [parse_message(topic, raw, False, time.time(), limiter, drops) for raw in raws])
    tracker = Tracker(3.0, 10.0, 86400)
    timed("state machine (Tracker.on_report)", lambda: [tracker.on_report(i.message, i.received) for i in items])
    rows = timed("history row (store.report_row)", lambda: [store.report_row(i.message, i.received, i.payload)
                                                             for i in items])
    for database in databases:
        with open_database(database) as db:
            db.execute("DELETE FROM reports")
            timed(f"{engine_name(database)} batch insert, 500 per transaction",
                  lambda db=db: [store.write_batch(db, store.Batch(reports=rows[i:i + 500]), time.time())
                                 for i in range(0, n, 500)])
            db.execute("DELETE FROM reports")
    return out


def engine_name(database: str) -> str:
    """SQLite or PostgreSQL, for the tables."""
    return "SQLite" if DatabaseUrl.parse(database).engine == "sqlite" else "PostgreSQL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publishers", type=int, default=4, help="publisher connections (M)")
    parser.add_argument("--reports", type=int, default=5000, help="reports per publisher (K)")
    parser.add_argument("--broker", choices=("mosquitto", "embedded", "both"), default="both")
    parser.add_argument("--modes", default="backlog,live", help="comma-separated: backlog, live")
    parser.add_argument("--database", action="append", metavar="URL",
                        help="the collector's database: sqlite (default) or postgresql://…; repeat to compare")
    parser.add_argument("--alert-rules", choices=("none", "default", "all"), default="default",
                        help="the org's alert rules: none, the 3 default ones, or all 8 (+ bench/alerts.py's 5)")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    total = args.publishers * args.reports
    rows = []
    with tempfile.TemporaryDirectory(prefix="fleet-bench-ingest-") as tmp:
        workdir = Path(tmp)
        data_dir = workdir / "data"
        keys = credentials.add_org(data_dir, ORG)  # with the 3 default alert rules every org starts with
        databases = [sqlite_url(data_dir / "fleet.db") if d == "sqlite" else d for d in args.database or ["sqlite"]]
        for database in databases:  # the org and the schema in each; the broker checks keys in the SQLite file
            if not credentials.org_exists(data_dir, ORG, database):
                credentials.add_org(data_dir, ORG, database)
            if args.alert_rules == "all":
                from bench.alerts import add_threshold_rules

                add_threshold_rules(data_dir, database=database)
            elif args.alert_rules == "none":
                from fleet.config import alerting

                for rule in alerting.list_rules(data_dir, ORG, database):
                    alerting.remove_rule(data_dir, ORG, rule.name, database)
        names = ["mosquitto", "embedded"] if args.broker == "both" else [args.broker]
        for name in names:
            broker = start_mosquitto(workdir) if name == "mosquitto" else start_embedded(data_dir, keys, total + 1000)
            try:
                for mode in modes:
                    raw = run_raw(broker, args.publishers, args.reports, mode)
                    for database in databases:
                        coll = run_collector(broker, data_dir, database, args.publishers, args.reports, mode)
                        rows.append((name, mode, engine_name(database), raw, coll))
                        print(f"{name:9s} {mode:7s} {engine_name(database):10s} raw {raw:9.0f} msg/s  "
                              f"collector {coll:9.0f} msg/s  {100 * coll / raw:5.1f}%", flush=True)
            finally:
                broker.stop()
    print()
    rule_count = {"none": 0, "default": 3, "all": 8}[args.alert_rules]
    size = len(payloads.encode(payloads.build_report("m000", "0x1a2b", "x" * 16, 0, 1.0, METRICS, SYSTEM)))
    print(f"M={args.publishers} publishers x K={args.reports} reports (QoS 1, {size} B each), {os.cpu_count()} CPUs; "
          f"databases: {', '.join(redact(d) for d in databases)}; alert rules: {args.alert_rules} ({rule_count})")
    print("| broker | mode | database | raw paho subscriber (msg/s) | collector (msg/s) | collector / raw |")
    print("|---|---|---|---|---|---|")
    for name, mode, engine, raw, coll in rows:
        print(f"| {name} | {mode} | {engine} | {raw:,.0f} | {coll:,.0f} | {100 * coll / raw:.0f}% |")
    print()
    print("Per-message cost of each collector step (one thread, no broker):")
    print("| step | µs/msg |")
    print("|---|---|")
    for name, micros in stage_costs(databases):
        print(f"| {name} | {micros:.1f} |")
    for name, mode, _, raw, _ in rows[:1]:
        print(f"(the raw subscriber spends {1e6 / raw:.1f} µs/msg in paho on {name}/{mode})")


if __name__ == "__main__":
    main()
