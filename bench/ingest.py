"""Ingest benchmark: how fast the collector drains reports into its database, against a raw paho subscriber.

M publisher processes push K reports each (QoS 1) for N distinct machines (``--machines``, default M),
each machine with its own connection (client id ``fleet-bench-<machine>``), session and seq, through a
broker started here on a free loopback port: Debian's Mosquitto (plain listener, anonymous allowed: a
loopback benchmark, not a deployment) and/or the embedded broker (``fleet broker``, TLS, real org
credentials). Publishers speak MQTT through ``collector/mqtt_codec.py`` over non-blocking sockets, so
10,000 connections cost no threads; they connect and encode everything before the clock starts. For
each consumer:

- backlog: the consumer's persistent session is registered, the consumer disconnects, all M*K reports
  are published and queued by the broker, then the consumer starts; rate = M*K / time until the last
  report is counted (raw subscriber) or committed to the database (collector). This is its sustained drain rate.
- live: the consumer runs while the publishers publish; rate = M*K / (first publish .. last counted).

Every run checks zero loss: the collector must have stored exactly M*K distinct (machine, seq).

``--database URL`` (repeatable) picks the collector's database: ``sqlite`` (the default: fleet.db in a
temporary data dir), ``postgres`` (a throwaway PostgreSQL server started here with tests/postgres.py, as
the ``postgres`` user when run as root; stopped and deleted at the end) or a ``postgresql://`` URL. Each
database is measured against the same broker and the same raw baseline, in one run. The broker keeps its
credentials in the data dir's SQLite file either way.

    python3 bench/ingest.py --publishers 4 --reports 5000 --broker both
    python3 bench/ingest.py --publishers 4 --reports 10000 --machines 10000 --broker both
    python3 bench/ingest.py --publishers 4 --reports 5000 --machines 10000 --rate 1000 --broker both
    python3 bench/ingest.py --broker mosquitto --machines 10000 --reports 10000 --database sqlite --database postgres
    python3 bench/ingest.py --broker mosquitto --database sqlite --database postgresql://u:p@127.0.0.1:5432/db
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import selectors
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench.common import free_port, port_open, stop_process  # noqa: E402
from fleet.collector.mqtt_codec import Connack, Connect, Disconnect, Puback, Publish, decode, encode  # noqa: E402
from fleet.config import payloads  # noqa: E402
from fleet.config.mqtt import BrokerAddress, new_client, tls_context  # noqa: E402
from fleet.config.settings import Settings  # noqa: E402
from fleet.config.topics import agent_client_id, report_topic  # noqa: E402
from fleet.store import credentials  # noqa: E402
from fleet.store.database import DatabaseUrl, open_database, redact, sqlite_url  # noqa: E402
from tests import stores  # noqa: E402

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
    publish_url: str  # where the publishers connect
    ca: Path | None
    proc: subprocess.Popen
    agent_user: str | None
    agent_key: str | None
    reader_user: str | None
    reader_key: str | None

    def stop(self) -> None:
        stop_process(self.proc)


def start_mosquitto(workdir: Path, inflight: int = 100) -> Broker:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    # Unbounded queues: a loss in the benchmark must come from the consumer, not the broker's limits.
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"max_queued_messages 0\nmax_inflight_messages {inflight}\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: port_open(port), 10, "mosquitto")
    url = f"mqtt://127.0.0.1:{port}"
    return Broker("mosquitto", url, url, None, proc, None, None, None, None)


def start_embedded(data_dir: Path, keys: credentials.OrgSecrets, queued: int) -> Broker:
    port = free_port()
    env = dict(os.environ, FLEET_MAX_QUEUED_MESSAGES=str(queued), FLEET_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "broker", "--data-dir", str(data_dir),
                             "--mqtt-port", str(port)], env=env, cwd=Path(__file__).resolve().parents[1])
    wait_until(lambda: port_open(port), 30, "embedded broker")
    url = f"mqtts://127.0.0.1:{port}"
    return Broker("embedded", url, url, data_dir / "certs" / "ca.pem", proc, f"{ORG}/agent", keys.agent_key,
                  f"{ORG}/reader", keys.reader_key)




def _connect(address: BrokerAddress, client_id: str, user: str | None, key: str | None,
             tls: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection((address.host, address.port), timeout=60)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname=address.host)
    sock.sendall(encode(Connect(client_id, user, key if user else None, keepalive=600)))
    data = b""
    while len(data) < 4:
        chunk = sock.recv(4 - len(data))
        if not chunk:
            raise SystemExit(f"{client_id}: connection closed before CONNACK")
        data += chunk
    found = decode(data)
    if found is None or not isinstance(found[0], Connack) or found[0].return_code:
        raise SystemExit(f"{client_id}: refused ({data.hex()})")
    sock.setblocking(False)
    return sock


def publisher(url: str, ca: str | None, user: str | None, key: str | None, machines: list[str], count: int,
              rate: float, ready, connecting) -> None:
    """Agent-like connections, one per machine, publishing ``count`` QoS 1 reports round-robin over them.

    Report r goes to machine r % len(machines) with seq r // len(machines), each machine in its own session,
    as fast as the broker takes them, or ``rate`` reports a second when it is not 0.
    Everything is connected and encoded before ``ready`` (a barrier) lets every publisher start at once.
    One publisher connects at a time (``connecting``, a lock): the embedded broker answers ~150 TLS
    handshakes a second, and thousands at once from every publisher time out.
    """
    address = BrokerAddress.parse(url)
    tls = tls_context(ca) if address.tls else None
    try:
        with connecting:
            socks = [_connect(address, agent_client_id(ORG, m), user, key, tls) for m in machines]
    except BaseException:
        ready.abort()  # the parent and the other publishers stop waiting
        raise
    sessions = [os.urandom(8).hex() for _ in machines]
    topics = [report_topic(ORG, m).encode() for m in machines]
    packets = []
    for r in range(count):
        i, seq = r % len(machines), r // len(machines)
        raw = payloads.encode(payloads.build_report(machines[i], "0x1a2b", sessions[i], seq, time.time(), METRICS,
                                                    SYSTEM))
        packets.append(encode(Publish(topics[i], raw, 1, False, seq % 0xFFFF + 1)))
    out = [bytearray() for _ in machines]
    inbox = [bytearray() for _ in machines]
    index = {sock: i for i, sock in enumerate(socks)}
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    ready.wait()
    started = time.monotonic()
    queued = 0
    unacked = count
    while unacked:
        due = count if not rate else min(count, int((time.monotonic() - started) * rate) + 1)
        for r in range(queued, due):
            i = r % len(machines)
            if not out[i]:
                selector.modify(socks[i], selectors.EVENT_READ | selectors.EVENT_WRITE)
            out[i] += packets[r]
        queued = max(queued, due)
        wait = 120.0 if queued == count else max(0.0, started + queued / rate - time.monotonic())
        ready_events = selector.select(wait)
        if not ready_events and queued == count:
            raise SystemExit(f"no PUBACK for 120 s ({unacked} of {count} reports unacknowledged)")
        for handle, events in ready_events:
            sock = handle.fileobj
            i = index[sock]
            if events & selectors.EVENT_WRITE and out[i]:
                try:
                    del out[i][:sock.send(out[i][:256 * 1024])]
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                if not out[i]:
                    selector.modify(sock, selectors.EVENT_READ)
            while events & selectors.EVENT_READ:
                try:
                    data = sock.recv(256 * 1024)
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                if not data:
                    raise SystemExit(f"the broker closed {machines[i]}'s connection")
                inbox[i] += data
                if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                    break
            if inbox[i]:
                pos = 0
                while found := decode(inbox[i], pos):
                    packet, pos = found
                    unacked -= isinstance(packet, Puback)
                del inbox[i][:pos]
    for sock in socks:
        sock.setblocking(True)
        sock.sendall(encode(Disconnect()))
        sock.close()


def publish_all(broker: Broker, load: Load) -> tuple[float, list]:
    """Start the publisher processes; return the wall time when all of them were connected, and them."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(load.publishers + 1)
    connecting = ctx.Lock()
    names = [f"m{i:05d}" for i in range(load.machines)]
    procs = [ctx.Process(target=publisher, args=(broker.publish_url, str(broker.ca) if broker.ca else None,
                                                 broker.agent_user, broker.agent_key, names[i::load.publishers],
                                                 load.reports, load.rate / load.publishers, ready, connecting))
             for i in range(load.publishers)]
    for proc in procs:
        proc.start()
    ready.wait(1800)  # every connection is up and every report encoded
    return time.time(), procs


def join_all(procs) -> None:
    for proc in procs:
        proc.join(600)
        if proc.exitcode != 0:
            raise SystemExit(f"publisher failed with exit code {proc.exitcode}")


class RawSubscriber:
    """A paho subscriber that only counts messages (the baseline)."""

    def __init__(self, broker: Broker, client_id: str) -> None:
        self.count = 0
        self.broker = broker
        self.client_id = client_id
        self.client = new_client(BrokerAddress.parse(broker.url), client_id, broker.reader_user, broker.reader_key,
                                 broker.ca, clean_session=False)
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(f"fleet/{ORG}/+/report", qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        self.count += 1

    def start(self, wait_suback: bool = True) -> None:
        address = BrokerAddress.parse(self.broker.url)
        for attempt in range(6):
            try:
                self.client.connect(address.host, address.port, keepalive=60)
                break
            except OSError:  # the embedded broker, busy storing a backlog of 10,000 agents, timed a handshake out
                if attempt == 5:
                    raise
        self.client.loop_start()
        if wait_suback and not self.subscribed.wait(10):
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


@dataclass(frozen=True)
class Load:
    """What the publishers send in one run."""

    publishers: int
    reports: int  # per publisher
    machines: int
    rate: float = 0.0  # reports a second, all publishers together; 0: as fast as the broker takes them

    @property
    def total(self) -> int:
        return self.publishers * self.reports


@dataclass(frozen=True)
class Measured:
    """One consumer's run: messages per second, and this process's CPU time per message meanwhile."""

    rate: float
    cpu_us: float  # the consumer's threads (publishers and broker are other processes); load-independent-ish
    batch: float = 0.0  # the collector's reports per commit
    threads: tuple[tuple[str, float], ...] = ()  # the collector's CPU µs/msg per thread (network, writer, ...)


def thread_cpu(prefix: str = "collector") -> dict[str, float]:
    """CPU seconds used so far by each live thread of this process whose name starts with ``prefix`` (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for thread in threading.enumerate():
        if thread.name.startswith(prefix) and thread.native_id is not None:
            try:
                with open(f"/proc/self/task/{thread.native_id}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended meanwhile, or not Linux
                continue
            out[thread.name] = out.get(thread.name, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def per_thread(before: dict[str, float], after: dict[str, float], messages: int) -> tuple[tuple[str, float], ...]:
    """µs of CPU per message of each thread between two ``thread_cpu`` snapshots, busiest first."""
    used = {name.removeprefix("collector-"): (cpu - before.get(name, 0.0)) / messages * 1e6
            for name, cpu in after.items()}
    return tuple(sorted(used.items(), key=lambda kv: -kv[1]))


def run_raw(broker: Broker, load: Load, mode: str) -> Measured:
    sub = RawSubscriber(broker, f"bench-raw-{mode}-{os.getpid()}")
    sub.start()
    if mode == "backlog":
        sub.stop()
        _, procs = publish_all(broker, load)
        join_all(procs)
        sub = RawSubscriber(broker, sub.client_id)
        t0, cpu0 = time.monotonic(), time.process_time()
        # Its session holds the subscription; the embedded broker answers the SUBSCRIBE paho sends again
        # only after the backlog.
        sub.start(wait_suback=False)
    else:
        started, procs = publish_all(broker, load)
        t0, cpu0 = time.monotonic() + (started - time.time()), time.process_time()
    wait_until(lambda: sub.count >= load.total, 600, "raw subscriber", step=0.005)
    elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
    if mode == "live":
        join_all(procs)
    sub.stop()
    # Its persistent session would otherwise keep queueing (and dropping) every later run's reports.
    clear_session(broker, sub.client_id, broker.reader_user, broker.reader_key)
    if sub.count != load.total:
        raise SystemExit(f"raw subscriber got {sub.count} of {load.total}")
    return Measured(load.total / elapsed, cpu / load.total * 1e6)


def run_collector(broker: Broker, data_dir: Path, database: str, load: Load, mode: str,
                  profile: Path | None = None) -> Measured:
    from fleet.collector.service import client_id_for, start

    service_user = credentials.SERVICE_USERNAME if broker.agent_user else None
    service_key = stores.ensure_service_key(data_dir) if broker.agent_user else None
    clear_session(broker, client_id_for(()), service_user, service_key)
    with open_database(database) as db:
        db.execute("DELETE FROM samples")
    collector = start(collector_settings(broker, data_dir, database))
    if not collector.wait_subscribed(15):
        raise SystemExit("collector did not subscribe")
    if mode == "backlog":
        collector.stop()
        _, procs = publish_all(broker, load)
        join_all(procs)
        t0, cpu0, threads0 = time.monotonic(), time.process_time(), thread_cpu()
        with profiled(profile):
            collector = start(collector_settings(broker, data_dir, database))
            wait_until(lambda: collector.stats().stored >= load.total, 600, "collector", step=0.005)
    else:
        started, procs = publish_all(broker, load)
        t0, cpu0, threads0 = time.monotonic() + (started - time.time()), time.process_time(), thread_cpu()
        with profiled(profile):
            wait_until(lambda: collector.stats().stored >= load.total, 600, "collector", step=0.005)
    elapsed, cpu, threads = time.monotonic() - t0, time.process_time() - cpu0, thread_cpu()
    if mode == "live":
        join_all(procs)
    stats = collector.stats()
    collector.stop()
    rows, distinct = stored_reports(database)
    if rows != load.total or distinct != load.total or stats.dropped:
        raise SystemExit(f"loss or duplicates: {rows} rows, {distinct} distinct of {load.total}; "
                         f"drops {stats.dropped}")
    return Measured(load.total / elapsed, cpu / load.total * 1e6, stats.stored / max(1, stats.commits),
                    per_thread(threads0, threads, load.total))


class profiled:  # noqa: N801 - used as a context manager, like contextlib's
    """cProfile every thread while the block runs (the collector's network and writer threads); dump to ``path``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.profiles: list = []

    def _start_in_thread(self, *_args) -> None:
        import cProfile

        threading.setprofile(None)
        sys.setprofile(None)
        profile = cProfile.Profile()
        self.profiles.append(profile)
        profile.enable()

    def __enter__(self) -> profiled:
        if self.path is not None:
            threading.setprofile(self._start_in_thread)
        return self

    def __exit__(self, *exc) -> None:
        if self.path is None:
            return
        threading.setprofile(None)
        import pstats

        for profile in self.profiles:
            profile.disable()
        stats = pstats.Stats(*self.profiles) if self.profiles else None
        if stats is not None:
            stats.dump_stats(str(self.path))
            print(f"profile of {len(self.profiles)} threads written to {self.path}", file=sys.stderr)


def split(measured: Measured) -> str:
    """The collector's CPU per message by thread, e.g. ``mqtt 31, writer 28, checkpoint 4``."""
    return ", ".join(f"{name} {micros:.0f}" for name, micros in measured.threads if micros >= 0.5)


def stage_costs(databases: list[str], n: int = 5000, machines: int = 1) -> list[tuple[str, float]]:
    """Single-threaded cost of each step the collector adds per message (µs), measured in this run."""
    import json

    from fleet.collector import history
    from fleet.collector.intake import DropCounter, RateLimiter, parse_message
    from fleet.collector.state import Tracker

    names = [f"m{i:05d}" for i in range(min(machines, n))]
    raws = [payloads.encode(payloads.build_report(names[r % len(names)], "0x1a2b", "s1", r // len(names), time.time(),
                                                  METRICS, SYSTEM)) for r in range(n)]
    topics = [report_topic(ORG, names[r % len(names)]) for r in range(n)]
    out = []

    def timed(name, func):
        t0 = time.perf_counter()
        result = func()
        out.append((name, (time.perf_counter() - t0) / n * 1e6))
        return result

    timed("json.loads alone", lambda: [json.loads(raw) for raw in raws])
    timed("config.payloads.parse_report (decode + validate)",
          lambda: [payloads.parse_report(raw, topic) for raw, topic in zip(raws, topics, strict=True)])
    drops, limiter = DropCounter(), RateLimiter(1e9)
    items = timed("intake.parse_message (topic, rate limit, validate)",
                  lambda: [parse_message(topic, raw, False, time.time(), limiter, drops)
                           for raw, topic in zip(raws, topics, strict=True)])
    tracker = Tracker(3.0, 10.0, 86400)
    timed("state machine (Tracker.on_report)", lambda: [tracker.on_report(i.message, i.received) for i in items])
    rows = timed("history row (history.report_row)", lambda: [history.report_row(i.message, i.received)
                                                             for i in items])
    tracked = list(tracker.machines.values())
    random.Random(1).shuffle(tracked)  # a fleet's reports come in no particular order of their rows

    def machine_rows(name: str, db) -> None:
        t0 = time.perf_counter()
        for i in range(0, len(tracked), 500):
            history.write_batch(db, history.Batch(machines=tracked[i:i + 500]), time.time())
        out.append((f"{name} ({len(tracked):,} machines, 500 per transaction, µs per row)",
                    (time.perf_counter() - t0) / len(tracked) * 1e6))

    for database in databases:
        engine = engine_name(database)
        with open_database(database) as db:
            db.execute("DELETE FROM samples")
            timed(f"{engine} batch insert, 500 per transaction",
                  lambda db=db: [history.write_batch(db, history.Batch(reports=rows[i:i + 500]), time.time())
                                 for i in range(0, n, 500)])
            db.execute("DELETE FROM samples")
            db.execute("DELETE FROM machines")
            for machine in tracked:
                machine.stored = False
            machine_rows(f"{engine} machine rows, new (upsert)", db)
            machine_rows(f"{engine} machine rows, rewritten (SQLite: UPDATE; PostgreSQL: upsert)", db)
            db.execute("DELETE FROM machines")
    return out


def resolve_database(name: str, data_dir: Path, cleanup: contextlib.ExitStack) -> str:
    """A --database argument as a URL: ``sqlite`` is fleet.db in the data dir, ``postgres`` a server started here."""
    if name == "sqlite":
        return sqlite_url(data_dir / "fleet.db")
    if name != "postgres":
        return name
    from tests.postgres import PostgresServer, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"--database postgres: {reason}")
    server = PostgresServer().start()
    cleanup.callback(server.destroy)
    return server.database()


def engine_name(database: str) -> str:
    """SQLite or PostgreSQL, for the tables."""
    return "SQLite" if DatabaseUrl.parse(database).engine == "sqlite" else "PostgreSQL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publishers", type=int, default=4, help="publisher processes (M)")
    parser.add_argument("--reports", type=int, default=5000, help="reports per publisher (K)")
    parser.add_argument("--machines", type=int, default=0,
                        help="distinct machines (N, default M), each with its own connection, session and seq")
    parser.add_argument("--broker", choices=("mosquitto", "embedded", "both"), default="both")
    parser.add_argument("--modes", default="backlog,live", help="comma-separated: backlog, live")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="live only: publish this many reports a second in all (like a fleet at its interval), "
                             "and compare CPU per report rather than throughput")
    parser.add_argument("--repeat", type=int, default=1, help="run each (broker, mode) pair this many times")
    parser.add_argument("--profile", type=Path,
                        help="write a cProfile of the collector's threads to this file, suffixed with broker, mode and "
                             "database (the last run of each)")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-step cost table")
    parser.add_argument("--database", action="append", metavar="URL",
                        help="the collector's database: sqlite (default), postgres (a throwaway server started "
                             "here) or postgresql://…; repeat to compare")
    parser.add_argument("--inflight", type=int, default=100,
                        help="Mosquitto's max_inflight_messages toward each consumer (its default, and "
                             "fleet mosquitto-config's, is 20)")
    parser.add_argument("--alert-rules", choices=("none", "default", "all"), default="default",
                        help="the org's alert rules: none, the 3 default ones, or all 8 (+ bench/alerts.py's 5)")
    args = parser.parse_args()
    from fleet.launch import collect_garbage_less_often

    collect_garbage_less_often()  # as `fleet collector` does; the raw subscriber runs under the same threshold
    load = Load(args.publishers, args.reports, args.machines or args.publishers, args.rate)
    if load.machines < load.publishers:
        raise SystemExit("--machines must be at least --publishers")
    modes = ["live"] if args.rate else [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fleet-bench-ingest-") as tmp, contextlib.ExitStack() as cleanup:
        workdir = Path(tmp)
        data_dir = workdir / "data"
        keys = stores.add_org(data_dir, ORG)  # with the 3 default alert rules every org starts with
        databases = [resolve_database(d, data_dir, cleanup) for d in args.database or ["sqlite"]]
        for database in databases:  # the org and the schema in each; the broker checks keys in the SQLite file
            if not stores.org_exists(data_dir, ORG, database):
                stores.add_org(data_dir, ORG, database)
            if args.alert_rules == "all":
                from bench.alerts import add_threshold_rules

                add_threshold_rules(data_dir, database=database)
            elif args.alert_rules == "none":

                for rule in stores.list_rules(data_dir, ORG, database):
                    stores.remove_rule(data_dir, ORG, rule.name, database)
        names = ["mosquitto", "embedded"] if args.broker == "both" else [args.broker]
        for name in names:
            broker = (start_mosquitto(workdir, args.inflight) if name == "mosquitto"
                      else start_embedded(data_dir, keys, load.total + 1000))
            try:
                for _ in range(args.repeat):
                    for mode in modes:
                        raw = run_raw(broker, load, mode)
                        for database in databases:
                            profile = (args.profile.with_name(f"{args.profile.stem}-{name}-{mode}-"
                                                              f"{engine_name(database)}{args.profile.suffix}")
                                       if args.profile else None)
                            coll = run_collector(broker, data_dir, database, load, mode, profile)
                            rows.append((name, mode, engine_name(database), raw, coll))
                            print(f"{name:9s} {mode:7s} {engine_name(database):10s} raw {raw.rate:7.0f} msg/s "
                                  f"{raw.cpu_us:5.1f} µs CPU  collector {coll.rate:7.0f} msg/s {coll.cpu_us:5.1f} µs "
                                  f"CPU {coll.batch:5.0f}/commit  {100 * coll.rate / raw.rate:5.1f}%  ({split(coll)})",
                                  flush=True)
            finally:
                broker.stop()
        # Here, while a throwaway PostgreSQL server started by --database postgres still runs.
        stages = [] if args.no_stages else stage_costs(databases, machines=load.machines)
    size = len(payloads.encode(payloads.build_report("m00000", "0x1a2b", "x" * 16, 0, 1.0, METRICS, SYSTEM)))
    print()
    rule_count = {"none": 0, "default": 3, "all": 8}[args.alert_rules]
    print(f"M={load.publishers} publishers x K={load.reports} reports over N={load.machines} machines "
          f"(QoS 1, {size} B each{f', {load.rate:,.0f} reports/s' if load.rate else ''}), {os.cpu_count()} CPUs; "
          f"databases: {', '.join(redact(d) for d in databases)}; alert rules: {args.alert_rules} ({rule_count})")
    print("| broker | mode | database | raw paho subscriber: msg/s, CPU µs/msg | collector: msg/s, CPU µs/msg "
          "| collector / raw: rate, CPU | collector CPU µs/msg by thread |")
    print("|---|---|---|---|---|---|---|")
    for name, mode, engine, raw, coll in rows:
        print(f"| {name} | {mode} | {engine} | {raw.rate:,.0f}, {raw.cpu_us:.0f} | {coll.rate:,.0f}, {coll.cpu_us:.0f} "
              f"| {100 * coll.rate / raw.rate:.0f}%, {coll.cpu_us / raw.cpu_us:.2f}x | {split(coll)} |")
    if args.no_stages:
        return
    print()
    print("Per-message cost of each collector step (one thread, no broker):")
    print("| step | µs/msg |")
    print("|---|---|")
    for name, micros in stages:
        print(f"| {name} | {micros:.1f} |")
    for name, mode, _, raw, _ in rows[:1]:
        print(f"(the raw subscriber spends {raw.cpu_us:.1f} µs of CPU per message in paho on {name}/{mode})")


if __name__ == "__main__":
    main()
