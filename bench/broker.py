"""Broker benchmark: our embedded broker vs stock amqtt 0.12.1 vs Debian's Mosquitto, in one run.

Measures, for each broker (a subprocess, so RSS is the broker's own):
- QoS 0 and QoS 1 throughput: one paho publisher, one paho subscriber, ~200-byte JSON, max_inflight 100;
- time and broker RSS to connect 500 and then 2,000 idle TLS clients (100 connecting at a time);
- ours only: QoS 1 throughput to a persistent subscriber (clean_session=0, the collector's case), whose
  messages broker.db keeps until acknowledged, with durability off (memory only, the baseline), full and
  normal, in alternating rounds of the same run (--rounds).

    python3 bench/broker.py [--qos0 20000] [--qos1 10000] [--clients 500,2000] [--rounds 3] [--durability-only]
        [--baseline-python /path/to/venv-with-main/bin/python]
Loopback only; each phase is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import free_port, stop_process, wait_port  # noqa: E402
from fleet.broker import patches  # noqa: E402
from fleet.broker.pki import ensure_certs  # noqa: E402
from fleet.collector.mqtt_codec import Connack, Connect, decode, encode  # noqa: E402
from fleet.store import credentials  # noqa: E402
from tests import stores  # noqa: E402

TOPIC = "fleet/bench/m1/report"
PAYLOAD = json.dumps({"v": 1, "machine_id": "m1", "hardware_id": "0x0123456789ab", "session": "abcdef0123456789",
                      "seq": 0, "ts": 1764000000.125, "metrics": {"cpu_percent": 12.5, "memory": {"percent": 41.2},
                      "load_avg": [0.4, 0.3, 0.2]}, "system": {"os": "Linux"}}).encode()
STOCK_AMQTT = """
import asyncio, sys
from amqtt.broker import Broker
async def main():
    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:%d", "ssl": True,
                     "certfile": "%s", "keyfile": "%s", "max_connections": 100000}}})
    await broker.start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""






class Target:
    """A broker under test: how to reach it and with which credentials."""

    def __init__(self, name: str, proc: subprocess.Popen, port: int, ca: Path,
                 pub: tuple[str | None, str | None, str], sub: tuple[str | None, str | None, str],
                 client_cred=lambda i: (None, None, f"idle-{i}")) -> None:
        self.name, self.proc, self.port, self.ca = name, proc, port, ca
        self.work = ca.parent.parent
        self.pub, self.sub, self.client_cred = pub, sub, client_cred

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def cpu_s(self) -> float:
        """CPU time (user + system) the broker process used so far: unlike msg/s, not moved by other load."""
        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        stop_process(self.proc)


def start_ours(work: Path, durability: str = "full", python: str = sys.executable, loop: str = "asyncio") -> Target:
    data = work / f"ours-{durability}-{time.monotonic_ns()}"
    org = stores.add_org(data, "bench")
    service_key = stores.ensure_service_key(data)
    port = free_port()
    # The benchmark's clients connect far faster than agents do: no accept-rate bound here.
    proc = subprocess.Popen([python, "-m", "fleet.cli", "broker", "--data-dir", str(data),
                             "--mqtt-port", str(port)], env={**os.environ, "FLEET_LOG_LEVEL": "ERROR",
                                                              "FLEET_MAX_QUEUED_MESSAGES": "100000",
                                                              "FLEET_BROKER_DURABILITY": durability,
                                                              "FLEET_BROKER_LOOP": loop, "FLEET_ACCEPT_RATE": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
    wait_port(port, proc)
    name = "fleet (ours)" if loop == "asyncio" else f"fleet (ours, {loop})"
    return Target(name, proc, port, data / "certs" / "ca.pem",
                  ("bench/agent", org.agent_key, "fleet-bench-m1"), (credentials.SERVICE_USERNAME, service_key, "sub"),
                  lambda i: ("bench/agent", org.agent_key, f"fleet-bench-idle{i}"))


def start_stock(work: Path) -> Target:
    certs = ensure_certs(work / "stock-certs")
    port = free_port()
    script = work / "stock_amqtt.py"
    script.write_text(STOCK_AMQTT % (port, certs.cert, certs.key))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return Target("amqtt 0.12.1 (stock)", proc, port, certs.ca, (None, None, "pub"), (None, None, "sub"))


def start_mosquitto(work: Path) -> Target | None:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(exe):
        return None
    certs = ensure_certs(work / "mosq-certs")
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\ncertfile {certs.cert}\nkeyfile {certs.key}\n"
                    f"max_queued_messages 100000\nmax_inflight_messages 100\nlog_type error\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return Target("mosquitto 2 (Debian)", proc, port, certs.ca, (None, None, "pub"), (None, None, "sub"))


def paho_client(target: Target, cred: tuple[str | None, str | None, str], clean_session: bool = True) -> paho.Client:
    user, key, client_id = cred
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311,
                         clean_session=clean_session)
    if user:
        client.username_pw_set(user, key)
    client.tls_set(ca_certs=str(target.ca))
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect("127.0.0.1", target.port, keepalive=60)
    client.loop_start()
    if not connected.wait(10):
        raise SystemExit(f"{target.name}: no CONNACK")
    return client


def throughput(target: Target, qos: int, count: int, timeout: float = 120, persistent: bool = False) -> float:
    """Messages per second from first publish to last delivery (``persistent``: a clean_session=0 subscriber)."""
    sub = paho_client(target, target.sub, clean_session=not persistent)
    got = [0]
    done = threading.Event()

    def on_message(*_a):
        got[0] += 1
        if got[0] >= count:
            done.set()

    sub.on_message = on_message
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.subscribe("fleet/bench/#", qos=qos)
    subscribed.wait(10)
    pub = paho_client(target, target.pub)
    started = time.perf_counter()
    for _ in range(count):
        while True:
            info = pub.publish(TOPIC, PAYLOAD, qos=qos)
            if info.rc == paho.MQTT_ERR_SUCCESS:
                break
            time.sleep(0.001)
    finished = done.wait(timeout)
    elapsed = time.perf_counter() - started
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()
    if not finished:
        print(f"  {target.name}: QoS{qos} delivered {got[0]}/{count} within {timeout:.0f} s", file=sys.stderr)
    return got[0] / elapsed


def c_clients(target: Target, publishers: int, count: int, timeout: float = 300) -> tuple[float, float]:
    """(msg/s, broker CPU µs per message): ``publishers`` mosquitto_pub -l, ``count`` QoS 1 reports each, to one
    mosquitto_sub, all over TLS. C clients, because Python clients cap both brokers near the same rate."""
    lines = target.work / "reports.txt"
    lines.write_bytes((PAYLOAD + b"\n") * count)
    common = ["-h", "127.0.0.1", "-p", str(target.port), "--cafile", str(target.ca), "-q", "1"]

    def cred(user: str | None, key: str | None, client_id: str) -> list[str]:
        return ["-i", client_id] + (["-u", user, "-P", key or ""] if user else [])

    total = publishers * count
    sub = subprocess.Popen(["mosquitto_sub", *common, *cred(*target.sub), "-t", "fleet/bench/#", "-C", str(total)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # mosquitto_sub has no "subscribed" signal; its SUBACK takes milliseconds
    before = target.cpu_s()
    started = time.perf_counter()
    pubs = []
    for i in range(1, publishers + 1):
        user, key, _ = target.pub
        with lines.open("rb") as stdin:
            pubs.append(subprocess.Popen(["mosquitto_pub", *common, *cred(user, key, f"fleet-bench-m{i}"),
                                          "-t", f"fleet/bench/m{i}/report", "-l"], stdin=stdin,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        sub.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"  {target.name}: mosquitto_sub did not get {total} messages in {timeout:.0f} s", file=sys.stderr)
        sub.kill()
    elapsed = time.perf_counter() - started
    cpu = target.cpu_s() - before
    for proc in pubs:
        stop_process(proc)
    return total / elapsed, cpu / total * 1e6


def connect_packet(cred: tuple[str | None, str | None, str]) -> bytes:
    user, key, client_id = cred
    return encode(Connect(client_id, user, (key or "") if user else None, keepalive=600))


async def connect_idle(target: Target, start: int, count: int, concurrency: int, keep: list) -> float:
    ctx = ssl.create_default_context(cafile=str(target.ca))
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", target.port, ssl=ctx, server_hostname="127.0.0.1"), 30)
            writer.write(connect_packet(target.client_cred(i)))
            await writer.drain()
            found = decode(await asyncio.wait_for(reader.readexactly(4), 30))
            if found is None or not isinstance(found[0], Connack) or found[0].return_code:
                raise RuntimeError(f"no CONNACK accepting the client: {found}")
            keep.append(writer)

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(start, start + count)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        print(f"  {target.name}: {len(errors)} connects failed, e.g. {errors[0]!r}", file=sys.stderr)
    return time.perf_counter() - started


def connections(target: Target, steps: list[int]) -> list[tuple[int, float, float, float]]:
    """(clients, seconds to connect them, broker RSS MB, KiB per connection) for each step."""
    async def run() -> list[tuple[int, float, float, float]]:
        keep: list = []
        base = target.rss_mb()
        rows, done = [], 0
        total_time = 0.0
        for n in steps:
            total_time += await connect_idle(target, done, n - done, 100, keep)
            done = n
            await asyncio.sleep(1.0)
            rss = target.rss_mb()
            rows.append((n, total_time, rss, (rss - base) * 1024 / max(1, len(keep))))
        for w in keep:
            w.close()
        return rows

    return asyncio.run(run())


def durability_rounds(work: Path, count: int, rounds: int,
                      baseline: str | None) -> dict[str, list[tuple[float, float]]]:
    """(QoS 1 msg/s to a persistent subscriber, broker CPU µs per message) for each durability (and
    ``baseline``, another checkout's Python), alternating modes round by round."""
    rates: dict[str, list[tuple[float, float]]] = {"off": [], "full": [], "normal": []}
    if baseline:
        rates["baseline"] = []
    for round_ in range(rounds):
        for mode in rates:
            target = start_ours(work, "full", baseline) if mode == "baseline" else start_ours(work, mode)
            try:
                print(f"{mode}, round {round_ + 1}/{rounds}…", file=sys.stderr)
                before = target.cpu_s()
                rate = throughput(target, 1, count, persistent=True)
                rates[mode].append((rate, (target.cpu_s() - before) / count * 1e6))
            finally:
                target.stop()
    return rates


def c_client_table(work: Path, count: int, publishers: int = 4) -> None:
    """The C-client comparison: our broker on each event loop against Mosquitto, in one run."""
    rows = []
    for starter in (lambda w: start_ours(w), lambda w: start_ours(w, loop="uvloop"), start_mosquitto):
        target = starter(work)
        if target is None:
            continue
        try:
            print(f"{target.name}: C clients…", file=sys.stderr)
            rows.append((target.name, *c_clients(target, publishers, count)))
        finally:
            target.stop()
    mosquitto = next((rate for name, rate, _ in rows if name.startswith("mosquitto")), None)
    print(f"\n{publishers} mosquitto_pub -l x {count:,} QoS 1 reports ({len(PAYLOAD)} B) over TLS, one mosquitto_sub\n")
    print("| broker | msg/s | / Mosquitto | broker CPU per message |")
    print("|---|---|---|---|")
    for name, rate, cpu in rows:
        share = f"{rate / mosquitto:.0%}" if mosquitto else "-"
        print(f"| {name} | {rate:,.0f} | {share} | {cpu:.0f} µs |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qos0", type=int, default=20000)
    parser.add_argument("--qos1", type=int, default=10000)
    parser.add_argument("--clients", default="500,2000")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the durability comparison")
    parser.add_argument("--durability-only", action="store_true", help="only the durability comparison")
    parser.add_argument("--c-clients", type=int, default=20000,
                        help="reports per mosquitto_pub in the C-client comparison (4 publishers); 0 skips it")
    parser.add_argument("--c-clients-only", action="store_true", help="only the C-client comparison")
    parser.add_argument("--baseline-python", help="also run the broker of the checkout this Python has installed "
                        "(e.g. a venv with main's code) in the durability comparison")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    steps = [int(x) for x in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-broker-"))
    if args.c_clients:
        c_client_table(work, args.c_clients)
    if args.c_clients_only:
        return
    results = []
    for starter in () if args.durability_only else (start_ours, start_stock, start_mosquitto):
        target = starter(work)
        if target is None:
            continue
        try:
            print(f"{target.name}: throughput…", file=sys.stderr)
            q0 = throughput(target, 0, args.qos0)
            q1 = throughput(target, 1, args.qos1)
            idle_rss = target.rss_mb()
            print(f"{target.name}: connections…", file=sys.stderr)
            with patches.applied():  # the benchmark's own TLS client sockets: keep this process small too
                conns = connections(target, steps)
            results.append((target.name, q0, q1, idle_rss, conns))
        finally:
            target.stop()
    rates = durability_rounds(work, args.qos1, args.rounds, args.baseline_python)
    print(f"\ncores={os.cpu_count()}  payload={len(PAYLOAD)} B  QoS0 n={args.qos0}  QoS1 n={args.qos1}\n")
    if results:
        print("| broker | QoS0 msg/s | QoS1 msg/s | RSS idle | " + " | ".join(
            f"{n} TLS clients: time / RSS / per conn" for n in steps) + " |")
        print("|---|---|---|---|" + "---|" * len(steps))
        for name, q0, q1, rss, conns in results:
            cells = " | ".join(f"{t:.1f} s / {r:.0f} MB / {k:.0f} KiB" for _, t, r, k in conns)
            print(f"| {name} | {q0:,.0f} | {q1:,.0f} | {rss:.0f} MB | {cells} |")
        ours = next((r for r in results if r[0].startswith("fleet")), None)
        stock = next((r for r in results if r[0].startswith("amqtt")), None)
        if ours and stock:
            print(f"\nQoS1 ours / stock amqtt = {ours[2] / stock[2]:.2f}x (target >= 2x)")
    print(f"\nQoS 1 to a persistent subscriber (ours), {args.rounds} alternating rounds\n")
    print("| broker.db durability | msg/s, each round | median msg/s | / off | broker CPU per message, median |")
    print("|---|---|---|---|---|")
    base = statistics.median(rate for rate, _ in rates["off"])
    for mode, values in rates.items():
        median = statistics.median(rate for rate, _ in values)
        cpu = statistics.median(us for _, us in values)
        print(f"| {mode} | {' / '.join(f'{rate:,.0f}' for rate, _ in values)} | {median:,.0f} | {median / base:.0%} "
              f"| {cpu:.0f} µs |")
    full = statistics.median(rate for rate, _ in rates["full"])
    print(f"\ndurability full / off = {full / base:.0%} (target >= 80%)")

if __name__ == "__main__":
    main()
