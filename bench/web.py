"""Web benchmark: API latency (p50/p99) through waitress with 10,000 machines in the database.

    python3 bench/web.py [--machines 10000] [--labels 3] [--requests 200] [--database sqlite --database postgresql://…]
The server runs as `fleet web` in its own process; requests come one at a time over loopback. Each
``--database`` (default: sqlite, fleet.db in a temporary data dir) is filled alike and measured in turn.
Each machine has ``--labels`` agent labels (env, role, site, …; 0 for none).

The last tables are people's (``--only sessions`` for those alone): the same requests made with the reader key
and with a signed-in session cookie, alternately (what looking the session up costs); sign-in's argon2id cost
per request; and the API's latency while 20 clients sign in at once, against the same requests without them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import free_port, stop_process, wait_port  # noqa: E402
from fleet.config.labels import labels_json  # noqa: E402
from fleet.store import people  # noqa: E402
from fleet.store.database import DatabaseUrl, open_database, sqlite_url  # noqa: E402
from tests import stores  # noqa: E402
from tests.dbhelpers import insert_reports, sample  # noqa: E402

# Label keys and their values: machine i gets the i-th combination, so every value is common.
LABELS = (("env", ("prod", "staging", "dev")), ("role", ("web", "db", "worker", "cache")),
          ("site", ("par", "fra", "ams", "lon", "nyc")), ("team", ("core", "data")), ("tier", ("1", "2", "3")))


def machine_labels(i: int, count: int) -> dict[str, str]:
    """The first ``count`` labels of machine ``i``."""
    labels, step = {}, 1
    for key, values in LABELS[:count]:
        labels[key] = values[(i // step) % len(values)]
        step *= len(values)
    return labels


def fill(data: Path, database: str, machines: int, labels: int = 0) -> str:
    random.seed(42)  # the same fleet in every database
    if stores.org_exists(data, "bench", database):
        raise SystemExit(f"{DatabaseUrl.parse(database)} is not empty: give bench/web.py a new database")
    org = stores.add_org(data, "bench", database)
    db = open_database(database)
    now = time.time()
    oses = [("Linux", "Debian 12"), ("Linux", "Ubuntu 24.04"), ("Windows", "Server 2022"), ("Darwin", "macOS 15")]
    rows = []
    for i in range(machines):
        os_name, version = oses[i % len(oses)]
        system = {"hostname": f"host-{i:05d}.example", "os": os_name, "os_version": version, "platform": "x",
                  "architecture": "x86_64", "python_version": "3.11.7", "hardware_id": f"0x{i:012x}",
                  "agent_version": "0.1.0"}
        metrics = {"cpu_percent": random.uniform(0, 100), "cpu_count": 8, "load_avg": [0.5, 0.4, 0.3],
                   "memory": {"total": 16 * 2**30, "used": 8 * 2**30, "percent": 50.0}, "swap_percent": 0.0,
                   "disks": [{"mount": "/", "total": 2**40, "used": 2**39, "percent": 50.0}],
                   "net": {"bytes_sent": 10**9, "bytes_recv": 2 * 10**9}, "uptime_s": 86400, "process_count": 200}
        rows.append({"org": "bench", "machine_id": f"m-{i:05d}", "hardware_id": f"0x{i:012x}",
                     "status": random.choice(["online"] * 8 + ["stale", "offline"]), "session": "s", "interval_s": 10,
                     "last_seen": now - random.uniform(0, 30), "last_ping": now, "clock_offset_s": 0.01,
                     "conflict": 0, "os": os_name, "system": json.dumps(system), "metrics": json.dumps(metrics),
                     "first_seen": now - 86400, "updated": now,
                     "agent_labels": labels_json(machine_labels(i, labels))})
    db.insert("machines", rows)
    insert_reports(db, [sample("bench", "m-00042", "s", i, now - 86400 + i * 10, cpu_percent=10.0,
                               memory_percent=50.0, disk_percent=50.0, load1=0.5, net_bytes_sent=i,
                               net_bytes_recv=i) for i in range(8640)])
    if db.engine == "postgresql":
        db.execute("ANALYZE")  # what autovacuum would do within a minute of such a load
    db.close()
    return org.reader_key


def timed(conn: http.client.HTTPConnection, path: str, token: str) -> tuple[float, int]:
    """One GET with ``token`` (a bearer token, or ``cookie:<session id>``): its latency and size."""
    started = time.perf_counter()
    headers = ({"Cookie": f"fleet_session={token[7:]}"} if token.startswith("cookie:")
               else {"Authorization": f"Bearer {token}"})
    conn.request("GET", path, headers=headers)
    res = conn.getresponse()
    body = res.read()
    if res.status != 200:
        raise SystemExit(f"{path}: HTTP {res.status} {body[:200]!r}")
    return time.perf_counter() - started, len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--labels", type=int, default=3, choices=range(len(LABELS) + 1),
                        help="labels per machine (default 3)")
    parser.add_argument("--only", default="", help="measure only the endpoints whose name contains this")
    parser.add_argument("--database", action="append", metavar="URL",
                        help="sqlite (default) or postgresql://…; repeat to compare in one run")
    args = parser.parse_args()
    print(f"machines={args.machines} labels/machine={args.labels} requests/endpoint={args.requests} "
          f"cores={os.cpu_count()}")
    for database in args.database or ["sqlite"]:
        data = Path(tempfile.mkdtemp(prefix="fleet-bench-web-"))
        measure(data, sqlite_url(data / "fleet.db") if database == "sqlite" else database, args)


def p99(samples: list[float]) -> float:
    """The 99th percentile of latencies in seconds, in ms."""
    lat = sorted(x * 1000 for x in samples)
    return lat[min(len(lat) - 1, int(len(lat) * 0.99))]


# (baseline, with a label filter): requests alternate between the two, so the shared cores' noise hits both.
COMPARED = (("/api/fleet", "/api/fleet?label=env=prod"),
            ("/api/fleet?limit=100&sort=last_seen&order=desc",
             "/api/fleet?label=env=prod&limit=100&sort=last_seen&order=desc"))


def compare(port: int, token: str, requests: int) -> None:
    """p99 of each filtered request against its unfiltered baseline, measured alternately."""
    print("\n| unfiltered | filtered | p99 unfiltered ms | p99 filtered ms | ratio |")
    print("|---|---|---|---|---|")
    for base, filtered in COMPARED:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        timed(conn, base, token)
        timed(conn, filtered, token)
        a, b = [], []
        for _ in range(requests):
            a.append(timed(conn, base, token)[0])
            b.append(timed(conn, filtered, token)[0])
        conn.close()
        print(f"| `{base}` | `{filtered}` | {p99(a):.1f} | {p99(b):.1f} | {p99(b) / p99(a):.2f}× |")


# The API's requests are made in EMAIL's session; the sign-ins measured are SIGNER's, whose sessions come and go
# (a person's oldest session ends past web_sessions.MAX_SESSIONS_PER_PERSON).
EMAIL, SIGNER, PASSWORD = "bench@example.com", "signer@example.com", "bench password 1"
SESSION_PATHS = ("/api/fleet?org=bench", "/api/fleet?org=bench&limit=100&sort=last_seen&order=desc",
                 "/api/fleet/m-00042?org=bench")
PARALLEL_SIGN_INS = 20


def sign_in(port: int, email: str = SIGNER, password: str = PASSWORD,
            source: str = "127.0.0.1") -> tuple[int, float, dict, str]:
    """POST /api/session on a new connection from ``source``: status, latency, body, and the session id it set."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    started = time.perf_counter()
    conn.request("POST", "/api/session", body=json.dumps({"email": email, "password": password}),
                 headers={"Content-Type": "application/json"})
    res = conn.getresponse()
    body = res.read()
    took = time.perf_counter() - started
    cookie = (res.getheader("Set-Cookie") or "").split(";", 1)[0].partition("=")[2]
    headers = dict(res.getheaders())
    conn.close()
    return res.status, took, (json.loads(body) if body.startswith(b"{") else {}) | {"_headers": headers}, cookie


def lookups(database: str, session_id: str, n: int) -> None:
    """What a session costs a request, without the server's noise: its lookup (the queries auth.py makes)."""
    from fleet.store import web_sessions

    with open_database(database, readonly=True) as db:
        web_sessions.lookup(db, session_id)
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            found = web_sessions.lookup(db, session_id)
            samples.append(time.perf_counter() - started)
        assert found is not None
    print(f"\nThe session's lookup alone (web_sessions.lookup, in-process, {n} times): p50 "
          f"{statistics.median(samples) * 1000:.3f} ms, p99 {p99(samples):.3f} ms")


def sessions(port: int, token: str, requests: int, database: str) -> None:
    """People's tables: session against reader key, sign-in cost, and the API during parallel sign-ins."""
    status, _, body, session_id = sign_in(port, EMAIL)
    if status != 200:
        raise SystemExit(f"sign-in: HTTP {status} {body}")
    cookie = f"cookie:{session_id}"
    print("\nSigned-in session against the reader key, the same requests alternately:\n")
    print("| request | p50 key ms | p50 session ms | p99 key ms | p99 session ms | p99 difference ms |")
    print("|---|---|---|---|---|---|")
    for path in SESSION_PATHS:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        timed(conn, path, token)
        timed(conn, path, cookie)
        key, session = [], []
        n = requests if "limit" in path or "m-00042" in path else max(100, requests // 2)
        for _ in range(n):
            key.append(timed(conn, path, token)[0])
            session.append(timed(conn, path, cookie)[0])
        conn.close()
        print(f"| `{path}` | {statistics.median(key) * 1000:.2f} | {statistics.median(session) * 1000:.2f} "
              f"| {p99(key):.2f} | {p99(session):.2f} | {p99(session) - p99(key):+.2f} |")

    lookups(database, session_id, requests * 10)

    print("\nSign-in (argon2id), one at a time:\n")
    print("| sign-in | requests | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for label, email, password, want in (("right password", SIGNER, PASSWORD, 200),
                                         ("wrong password", SIGNER, "wrong password", 401),
                                         ("unknown email", "nobody@example.com", "wrong password", 401)):
        samples = []
        # A failure counts against 10 per 15 minutes per address and per account: each from its own address.
        for i in range(8 if want == 401 else 40):
            status, took, body, _ = sign_in(port, email, password, f"127.0.9.{i + 1 + (want == 401) * 10}")
            if status != want:
                raise SystemExit(f"sign-in ({label}): HTTP {status} {body}")
            samples.append(took)
        print(f"| {label} | {len(samples)} | {statistics.median(samples) * 1000:.1f} | {p99(samples):.1f} |")

    parallel(port, cookie, requests)


def signers(port: int, ready: Any, stop: Any, results: Any) -> None:
    """In a process of its own (so its threads never share a GIL with the requests measured): 20 clients signing
    in over and over until ``stop``; their (status, latency) pairs go to ``results``."""
    done = threading.Event()
    outcomes: list[tuple[int, float]] = []
    lock = threading.Lock()

    def signer() -> None:
        while not done.is_set():
            status, took, body, _ = sign_in(port)
            with lock:
                outcomes.append((status, took))
            if status == 503:  # as a browser would: after Retry-After
                done.wait(float(body["_headers"].get("Retry-After", "1")))

    threads = [threading.Thread(target=signer, daemon=True) for _ in range(PARALLEL_SIGN_INS)]
    for thread in threads:
        thread.start()
    ready.set()
    stop.wait()
    done.set()
    for thread in threads:
        thread.join(60)
    results.put(outcomes)


def parallel(port: int, cookie: str, requests: int) -> None:
    """The dashboard's page request's latency without sign-ins, then while 20 clients sign in over and over."""
    path = SESSION_PATHS[1]

    def api_latencies() -> list[float]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        timed(conn, path, cookie)
        out = [timed(conn, path, cookie)[0] for _ in range(requests)]
        conn.close()
        return out

    quiet = api_latencies()
    context = multiprocessing.get_context("fork")  # this process has no other thread now
    ready, stop, results = context.Event(), context.Event(), context.Queue()
    process = context.Process(target=signers, args=(port, ready, stop, results), daemon=True)
    started = time.perf_counter()
    process.start()
    ready.wait(30)
    busy = api_latencies()
    stop.set()
    outcomes: list[tuple[int, float]] = results.get(timeout=120)
    process.join(30)
    elapsed = time.perf_counter() - started
    quiet_again = api_latencies()
    ok = [took for status, took in outcomes if status == 200]
    print(f"\n`{path}` with a session cookie, {requests} requests each, without and during "
          f"{PARALLEL_SIGN_INS} clients signing in over and over (from another process):\n")
    print("| API requests | p50 ms | p99 ms | p99 against without |")
    print("|---|---|---|---|")
    base = max(p99(quiet), p99(quiet_again))
    for label, samples in (("without sign-ins", quiet), (f"during {PARALLEL_SIGN_INS} parallel sign-ins", busy),
                           ("without sign-ins, again", quiet_again)):
        print(f"| {label} | {statistics.median(samples) * 1000:.1f} | {p99(samples):.1f} "
              f"| {p99(samples) / base:.2f}× |")
    refused = sum(1 for status, _ in outcomes if status == 503)
    print(f"\nSign-ins meanwhile: {len(ok)} succeeded in {elapsed:.1f} s ({len(ok) / elapsed:.1f}/s), p50 "
          f"{statistics.median(ok) * 1000 if ok else 0:.1f} ms, p99 {p99(ok) if ok else 0:.1f} ms; {refused} answered "
          f"503 (Retry-After: 1); other answers: "
          f"{sorted({status for status, _ in outcomes} - {200, 503}) or 'none'}")


def measure(data: Path, database: str, args: argparse.Namespace) -> None:
    """Fill one database and print the latency table of a `fleet web` serving it."""
    token = fill(data, database, args.machines, args.labels)
    with open_database(database) as db:
        for email in (EMAIL, SIGNER):
            people.add_person(db, email, {"bench": "admin"}, PASSWORD)
    port = free_port()
    env = {**os.environ, "FLEET_LOG_LEVEL": "ERROR", "FLEET_RATE_LIMIT_API": "1000000/minute",
           "FLEET_DATABASE_URL": database}
    proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "web", "--data-dir", str(data), "--http-port",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        now = time.time()
        paths = {
            f"/api/fleet (all {args.machines})": "/api/fleet",
            "/api/fleet?limit=100 (dashboard page)": "/api/fleet?limit=100&sort=last_seen&order=desc",
            "/api/fleet?label=env=prod (all of them)": "/api/fleet?label=env=prod",
            "/api/fleet?label=env=prod&limit=100": "/api/fleet?label=env=prod&limit=100&sort=last_seen&order=desc",
            "/api/fleet?label=env=prod&label=role!=db&limit=100":
                "/api/fleet?label=env=prod&label=role!=db&limit=100&sort=last_seen&order=desc",
            "/api/fleet?group=role&limit=100 (grouped page)": "/api/fleet?group=role&limit=100",
            "/api/labels": "/api/labels",
            "/api/fleet?status=offline&os=Windows": "/api/fleet?status=offline&os=Windows",
            "/api/fleet?q=host-0999 (search)": "/api/fleet?q=host-0999&limit=100",
            "/api/fleet/<machine>": "/api/fleet/m-00042",
            "/api/fleet/<machine>/history (1 h)": f"/api/fleet/m-00042/history?since={now - 3600}",
            "/api/fleet/<machine>/history (24 h)": f"/api/fleet/m-00042/history?since={now - 86400}",
            "/metrics": "/metrics",
        }
        engine = "SQLite" if DatabaseUrl.parse(database).engine == "sqlite" else "PostgreSQL"
        print(f"\n{engine}:\n")
        print("| endpoint | p50 ms | p99 ms | response size |")
        print("|---|---|---|---|")
        for label, path in paths.items():
            if args.only and args.only not in label:
                continue
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            n = args.requests if "all" not in label and "metrics" not in label else max(100, args.requests // 2)
            timed(conn, path, token)  # warm-up
            samples = [timed(conn, path, token) for _ in range(n)]
            lat = sorted(s[0] * 1000 for s in samples)
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            print(f"| {label} | {statistics.median(lat):.1f} | {p99:.1f} | {samples[0][1] / 1024:.0f} KiB |")
            conn.close()
        if not args.only:
            compare(port, token, args.requests)
        if not args.only or "sessions" in args.only:
            sessions(port, token, args.requests, database)
    finally:
        stop_process(proc)


if __name__ == "__main__":
    main()
