"""Mosquitto's persistence, measured on `fleet mosquitto-config` output: what a save costs, what a crash loses.

1. Save cost: N QoS 1 messages queued for an offline persistent session (the collector during an outage),
   then one save (SIGUSR1): how long Mosquitto's single thread spends writing and fsyncing mosquitto.db.
2. Crash loss: a publisher sends QoS 1 messages at a steady rate to an offline persistent session; Mosquitto
   is SIGKILLed and restarted; how many acknowledged messages the session still gets, and how old the
   newest lost one was. Run for the generated autosave setting and for each ``--autosave`` given.

    python3 bench/mosquitto_persistence.py [--backlogs 1000,10000,100000] [--rate 500] [--kills 3]
        [--autosave generated,interval:1800,changes:1000]
Loopback only; needs Debian's mosquitto.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import paho.mqtt.client as paho

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.broker import Target, paho_client  # noqa: E402
from bench.common import free_port, wait_port  # noqa: E402
from fleet.broker.mosquitto import write_config  # noqa: E402
from fleet.config.settings import Settings  # noqa: E402
from fleet.store import credentials  # noqa: E402
from tests import stores  # noqa: E402

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PAYLOAD = b"x" * 240  # a report's size
TOPIC = "fleet/bench/m1/report"


class Broker:
    """Mosquitto on the generated config (persistence settings overridden by ``autosave``), restartable."""

    def __init__(self, work: Path, autosave: str) -> None:
        self.data = work / "data"
        self.org = stores.add_org(self.data, "bench")
        self.service_key = stores.ensure_service_key(self.data)
        self.out = work / "mosquitto"
        self.port = free_port()
        write_config(Settings(data_dir=self.data, mqtt_port=self.port, mqtt_cert_port=free_port()), self.out,
                     user="root" if os.geteuid() == 0 else None)
        conf = self.out / "mosquitto.conf"
        lines = conf.read_text().splitlines()
        if autosave != "generated":
            kind, _, value = autosave.partition(":")
            lines = [line for line in lines if not line.startswith("autosave_")]
            lines += [f"autosave_interval {int(value)}",
                      f"autosave_on_changes {'true' if kind == 'changes' else 'false'}"]
        conf.write_text("\n".join(lines) + "\n")
        self.db = self.out / "data" / "mosquitto.db"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.out / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self, user: str, key: str, client_id: str, clean: bool = True) -> paho.Client:
        target = Target("mosquitto", self.proc, self.port, self.data / "certs" / "ca.pem", (None, None, ""),
                        (None, None, ""))
        return paho_client(target, (user, key, client_id), clean_session=clean)

    def collector(self) -> paho.Client:
        return self.client(credentials.SERVICE_USERNAME, self.service_key, "collector", clean=False)

    def agent(self) -> paho.Client:
        return self.client("bench/agent", self.org.agent_key, "fleet-bench-m1")


def subscribe_and_leave(broker: Broker) -> None:
    sub = broker.collector()
    done = threading.Event()
    sub.on_subscribe = lambda *a: done.set()
    sub.subscribe("fleet/bench/+/report", qos=1)
    done.wait(10)
    sub.disconnect()
    sub.loop_stop()


def save_cost(backlog: int) -> float:
    """Seconds one save of ``backlog`` queued messages takes (SIGUSR1 until mosquitto.db is replaced)."""
    with tempfile.TemporaryDirectory(prefix="fleet-bench-mosq-") as tmp:
        broker = Broker(Path(tmp), "interval:0")  # saves only when told
        broker.start()
        try:
            subscribe_and_leave(broker)
            pub = broker.agent()
            window: deque = deque()  # at most 1,000 unacknowledged: paho's 16-bit message ids must not wrap
            for _ in range(backlog):
                window.append(pub.publish(TOPIC, PAYLOAD, qos=1))
                if len(window) >= 1000:
                    window.popleft().wait_for_publish(60)
            for info in window:
                info.wait_for_publish(60)
            pub.disconnect()
            pub.loop_stop()
            before = broker.db.stat().st_ino if broker.db.exists() else None
            assert broker.proc is not None
            started = time.perf_counter()
            broker.proc.send_signal(signal.SIGUSR1)
            while not broker.db.exists() or broker.db.stat().st_ino == before:
                time.sleep(0.001)
            return time.perf_counter() - started
        finally:
            broker.stop()


def one_crash(autosave: str, rate: float) -> tuple[int, int, float]:
    """(acknowledged, lost, how long before the kill the oldest lost message was published)."""
    with tempfile.TemporaryDirectory(prefix="fleet-bench-mosq-") as tmp:
        broker = Broker(Path(tmp), autosave)
        broker.start()
        try:
            subscribe_and_leave(broker)
            pub = broker.agent()
            acked: set[int] = set()  # message numbers whose PUBACK came
            sent: dict[int, int] = {}  # mid -> message number
            published: list[float] = []  # message number -> when it was published
            lock = threading.Lock()
            stop = threading.Event()

            def on_publish(_client, _userdata, mid, *_rest) -> None:
                with lock:  # publish() records the mid under the lock: never look it up before that
                    acked.add(sent[mid])

            def publish() -> None:
                n = 0
                while not stop.is_set():
                    with lock:
                        published.append(time.monotonic())
                        sent[pub.publish(TOPIC, str(n).encode(), qos=1).mid] = n
                    n += 1
                    time.sleep(1 / rate)

            pub.on_publish = on_publish
            thread = threading.Thread(target=publish, daemon=True)
            thread.start()
            time.sleep(random.uniform(5, 10))
            broker.kill()
            killed = time.monotonic()
            stop.set()
            thread.join(5)
            pub.loop_stop()
            broker.start()
            got: set[int] = set()
            sub = broker.client(credentials.SERVICE_USERNAME, broker.service_key, "collector", clean=False)
            sub.on_message = lambda _c, _u, msg: got.add(int(msg.payload))
            quiet_since, last = time.monotonic(), -1
            while time.monotonic() - quiet_since < 2:  # until two seconds pass without a new message
                time.sleep(0.1)
                if len(got) != last:
                    last, quiet_since = len(got), time.monotonic()
            sub.disconnect()
            sub.loop_stop()
            with lock:
                lost = sorted(set(acked) - got)
                return len(acked), len(lost), (killed - published[lost[0]]) if lost else 0.0
        finally:
            broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlogs", default="1000,10000,100000")
    parser.add_argument("--rate", type=float, default=500.0, help="publishes per second in the crash test")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--autosave", default="generated,interval:1800,changes:1000")
    args = parser.parse_args()
    print("| queued messages | one save of mosquitto.db |")
    print("|---|---|")
    for backlog in [int(x) for x in args.backlogs.split(",") if x]:
        print(f"| {backlog:,} | {save_cost(backlog) * 1000:.0f} ms |", flush=True)
    print(f"\ncrash: QoS 1 at {args.rate:.0f} msg/s to an offline persistent session, SIGKILL after 5-10 s\n")
    print("| autosave | acknowledged / lost, each kill | the oldest lost message was published … before the kill |")
    print("|---|---|---|")
    for autosave in args.autosave.split(","):
        runs = [one_crash(autosave, args.rate) for _ in range(args.kills)]
        cells = " ; ".join(f"{a} / {lost}" for a, lost, _ in runs)
        ages = [age for _, lost, age in runs if lost]
        oldest = f"up to {max(ages):.1f} s (median {statistics.median(ages):.1f} s)" if ages else "nothing lost"
        print(f"| {autosave} | {cells} | {oldest} |", flush=True)


if __name__ == "__main__":
    main()
