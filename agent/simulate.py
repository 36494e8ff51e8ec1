"""``fleet simulate``: many simulated agents speaking the real protocol, for demos and load tests.

Agents are spread over a few shard threads; each shard drives its paho clients from one selector
loop (paho's external-loop API), so thousands of TLS connections fit on two cores. Every agent has
its own connection, session, last will, retained pings and a random walk of realistic metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import secrets
import selectors
import signal
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fleet.agent.errors import AgentError
from fleet.config import payloads
from fleet.config.mqtt import BrokerAddress, new_client, paho, tls_context
from fleet.config.settings import Settings
from fleet.config.topics import agent_client_id, ping_topic, report_topic

log = logging.getLogger("fleet.simulate")
AGENTS_PER_SHARD = 250
MAX_UNACKED = 50  # reports in flight per agent; past this a report is skipped (counted), so memory stays bounded
PROGRESS_EVERY_S = 5.0
HOT_FOR_S, COOL_FOR_S = 180.0, 120.0  # a "hot" agent's CPU cycle: pinned above 90% for 3 min, then normal for 2
OS_FAMILIES = [("Linux", "Debian GNU/Linux 12 (bookworm)", "x86_64"), ("Linux", "Ubuntu 24.04 LTS", "x86_64"),
               ("Linux", "Ubuntu 22.04 LTS", "aarch64"), ("Linux", "Alpine Linux v3.20", "x86_64"),
               ("Windows", "Windows Server 2022", "AMD64"), ("Darwin", "macOS 15.1", "arm64"),
               ("FreeBSD", "FreeBSD 14.1-RELEASE", "amd64")]


@dataclass
class SimStats:
    """Counters shared by all shards (updated under a lock)."""

    sent: int = 0
    acked: int = 0
    connects: int = 0
    reconnects: int = 0
    refused: int = 0
    connected: int = 0
    skipped: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        """Add to counters."""
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict."""
        with self.lock:
            return {k: getattr(self, k) for k in ("sent", "acked", "connects", "reconnects", "refused", "connected",
                                                 "skipped")}


class SimAgent:
    """One simulated machine: identity, metric random walks, and its current connection."""

    def __init__(self, index: int, settings: Settings, stats: SimStats, rng: random.Random, hot: bool = False) -> None:
        self.machine = f"sim-{index:04d}"
        self.hot_since = time.monotonic() if hot else None  # runs hot in cycles, so a demo sees an alert fire
        self.settings = settings
        self.stats = stats
        self.rng = rng
        self.hw_id = f"0x{rng.getrandbits(48) & 0xfeffffffffff:012x}"
        os_name, os_version, arch = OS_FAMILIES[index % len(OS_FAMILIES)]
        self.system = {"hostname": f"{self.machine}.sim.local", "os": os_name, "os_version": os_version,
                       "platform": f"{os_name}-{arch}", "architecture": arch, "python_version": "3.11.7",
                       "hardware_id": self.hw_id, "agent_version": "0.1.0-sim"}
        self.cpu = rng.uniform(3, 40)
        self.mem = rng.uniform(20, 70)
        self.disk = rng.uniform(15, 80)
        self.cores = rng.choice([2, 4, 8, 16, 32])
        self.mem_total = self.cores * 2 * 1024**3
        self.disk_total = rng.choice([64, 128, 256, 512, 1024]) * 1024**3
        self.sent_bytes = rng.randrange(10**9)
        self.recv_bytes = rng.randrange(10**9)
        self.boot = time.time() - rng.uniform(3600, 90 * 86400)
        self.client: paho.Client | None = None
        self.session = ""
        self.seq = 0
        self.prev: tuple[str, int] | None = None  # the previous session and the last seq published in it
        self.reports = 0
        self.connected = False
        self.next_connect = 0.0
        self.next_report = 0.0
        self.attempts = 0
        self.report_mids: set[int] = set()

    # metrics -------------------------------------------------------------------------------
    def _walk(self, value: float, step: float, low: float, high: float) -> float:
        return min(high, max(low, value + self.rng.gauss(0, step)))

    def metrics(self, interval: float) -> dict[str, Any]:
        """Next point of each random walk, in the contract's shape."""
        cycle = None if self.hot_since is None else (time.monotonic() - self.hot_since) % (HOT_FOR_S + COOL_FOR_S)
        if cycle is not None and cycle < HOT_FOR_S:
            self.cpu = self._walk(max(self.cpu, 94.0), 2, 91, 100)
        else:
            self.cpu = self._walk(min(self.cpu, 60.0) if cycle is not None else self.cpu, 6, 0.5, 100)
        self.mem = self._walk(self.mem, 1.5, 5, 98)
        self.disk = min(99.5, self.disk + self.rng.uniform(0, 0.02))
        sent, recv = self.rng.uniform(1e3, 5e5) * interval, self.rng.uniform(1e3, 2e6) * interval
        self.sent_bytes += int(sent)
        self.recv_bytes += int(recv)
        load = round(self.cpu / 100 * self.cores, 2)
        return {"cpu_percent": round(self.cpu, 1), "cpu_count": self.cores, "load_avg": [load, load * 0.9, load * 0.8],
                "memory": {"total": self.mem_total, "used": int(self.mem_total * self.mem / 100),
                           "percent": round(self.mem, 1)},
                "swap_percent": 0.0,
                "disks": [{"mount": "/", "total": self.disk_total, "used": int(self.disk_total * self.disk / 100),
                           "percent": round(self.disk, 1)}],
                "net": {"bytes_sent": self.sent_bytes, "bytes_recv": self.recv_bytes,
                        "sent_per_s": round(sent / interval, 1), "recv_per_s": round(recv / interval, 1)},
                "uptime_s": int(time.time() - self.boot), "process_count": self.rng.randint(80, 400)}

    # protocol ------------------------------------------------------------------------------
    def connect(self, address: BrokerAddress, tls: ssl.SSLContext | None) -> None:
        """Open a new connection with a new session and its will (blocking TCP + TLS handshake)."""
        if self.session and self.seq > 0:  # named in this connection's online pings, for tail accounting
            self.prev = (self.session, self.seq - 1)
        self.session = secrets.token_hex(8)
        self.seq = 0
        interval = self.settings.interval
        # One shared TLS context instead of one per client: loading the CA for each of thousands of
        # connections (and reconnections) costs CPU and ~20 KiB each.
        client = new_client(dataclasses.replace(address, tls=False), agent_client_id(self.settings.org, self.machine),
                            f"{self.settings.org}/agent", self.settings.key)
        if tls is not None:
            client.tls_set_context(tls)
        will = payloads.build_ping(self.machine, self.hw_id, self.session, "offline", interval, reason="lost")
        client.will_set(ping_topic(self.settings.org, self.machine), payloads.encode(will), qos=1, retain=True)
        client.max_inflight_messages_set(20)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self.client = client
        client.connect(address.host, address.port, keepalive=int(min(60, max(5, 2 * interval))))

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason_code: Any, _p: Any = None) -> None:
        if getattr(reason_code, "is_failure", False):
            self.stats.add(refused=1)
            log.warning("simulated agent %s refused: %s", self.machine, reason_code)
            return
        self.connected = True
        self.attempts = 0
        self.stats.add(connects=1, connected=1)
        self.ping("online")

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _rc: Any, _p: Any = None) -> None:
        if self.connected:
            self.stats.add(connected=-1)
        self.connected = False

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: Any = None, _p: Any = None) -> None:
        if mid in self.report_mids:
            self.report_mids.discard(mid)
            self.stats.add(acked=1)

    @property
    def live(self) -> paho.Client:
        """The connected client (publishing before connect() is a bug)."""
        if self.client is None:
            raise RuntimeError(f"simulated agent {self.machine} is not connected")
        return self.client

    def ping(self, status: str, reason: str | None = None) -> Any:
        """Publish this session's retained presence."""
        body = payloads.build_ping(self.machine, self.hw_id, self.session, status, self.settings.interval,
                                   ts=round(time.time(), 3), reason=reason, prev=self.prev)
        return self.live.publish(ping_topic(self.settings.org, self.machine), payloads.encode(body), qos=1,
                                   retain=True)

    def report(self) -> None:
        """Publish the next report (and every 5th interval refresh the online ping)."""
        if len(self.report_mids) >= MAX_UNACKED:  # broker not acknowledging: don't queue without bound
            self.stats.add(skipped=1)
            return
        body = payloads.build_report(self.machine, self.hw_id, self.session, self.seq, round(time.time(), 3),
                                     self.metrics(self.settings.interval), self.system)
        info = self.live.publish(report_topic(self.settings.org, self.machine), payloads.encode(body), qos=1)
        self.report_mids.add(info.mid)
        self.seq += 1
        self.reports += 1
        self.stats.add(sent=1)
        if self.reports % 5 == 0:
            self.ping("online")


def _backoff(agent: SimAgent) -> float:
    """Full-jitter exponential backoff, so a restarted broker is not hit by every agent at once."""
    return agent.rng.uniform(0, min(agent.settings.reconnect_max_s, 0.5 * 2 ** agent.attempts))


class Shard(threading.Thread):
    """A thread driving a group of simulated agents from one selector loop."""

    def __init__(self, agents: list[SimAgent], address: BrokerAddress, tls: ssl.SSLContext | None,
                 stop: threading.Event, first_report_spread: float) -> None:
        super().__init__(name=f"sim-shard-{agents[0].machine}", daemon=True)
        self.agents = agents
        self.address = address
        self.tls = tls
        self.stop_event = stop
        now = time.monotonic()
        for agent in agents:  # stagger connects and reports over the first interval
            agent.next_connect = now + agent.rng.uniform(0, first_report_spread)
            agent.next_report = agent.next_connect + agent.rng.uniform(0, agent.settings.interval)

    def run(self) -> None:
        """Connect, publish on schedule, service sockets; clean offline pings when stopped."""
        selector = selectors.DefaultSelector()
        registered: dict[SimAgent, Any] = {}
        last_misc = 0.0
        while not self.stop_event.is_set():
            now = time.monotonic()
            for agent in self.agents:
                if agent.client is None or (not agent.connected and agent.client.socket() is None):
                    if now >= agent.next_connect:
                        self._connect(agent, selector, registered, now)
                elif agent.connected and now >= agent.next_report:
                    agent.report()
                    agent.next_report += agent.settings.interval
                    if agent.next_report < now:
                        agent.next_report = now + agent.settings.interval
            self._service(selector, registered, now - last_misc >= 1.0)
            if now - last_misc >= 1.0:
                last_misc = now
        self._shutdown(selector, registered)

    def _connect(self, agent: SimAgent, selector: selectors.BaseSelector, registered: dict, now: float) -> None:
        old = registered.pop(agent, None)
        if old is not None:
            try:
                selector.unregister(old)
            except (KeyError, ValueError):
                pass
        if agent.client is not None:
            agent.stats.add(reconnects=1)
        try:
            agent.connect(self.address, self.tls)
        except (OSError, ValueError) as exc:
            agent.attempts += 1
            agent.client = None
            agent.next_connect = now + _backoff(agent)
            log.debug("simulated agent %s cannot connect: %s", agent.machine, exc)
            return
        sock = agent.live.socket()
        if sock is not None:
            selector.register(sock, selectors.EVENT_READ, agent)
            registered[agent] = sock

    def _service(self, selector: selectors.BaseSelector, registered: dict, misc: bool) -> None:
        if not registered:
            self.stop_event.wait(0.05)
            return
        for key, _ in selector.select(timeout=0.05):
            agent: SimAgent = key.data
            if agent.client is not None and agent.client.loop_read() != paho.MQTT_ERR_SUCCESS:
                self._lost(agent, selector, registered)
        for agent in list(registered):
            client = agent.client
            if client is None:
                continue
            write_failed = client.want_write() and client.loop_write() != paho.MQTT_ERR_SUCCESS
            if write_failed or (misc and client.loop_misc() != paho.MQTT_ERR_SUCCESS):
                self._lost(agent, selector, registered)

    def _lost(self, agent: SimAgent, selector: selectors.BaseSelector, registered: dict) -> None:
        sock = registered.pop(agent, None)
        if sock is not None:
            try:
                selector.unregister(sock)
            except (KeyError, ValueError):
                pass
        if agent.connected:
            agent.stats.add(connected=-1)
        agent.connected = False
        agent.report_mids.clear()
        agent.attempts += 1
        # The client object stays: a client without a socket means "reconnect at next_connect".
        agent.next_connect = time.monotonic() + _backoff(agent)

    def _shutdown(self, selector: selectors.BaseSelector, registered: dict) -> None:
        infos = []
        for agent in self.agents:
            if agent.connected and agent.client is not None:
                infos.append((agent, agent.ping("offline", reason="shutdown")))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(not info.is_published() for _, info in infos):
            for key, _ in selector.select(timeout=0.05):
                key.data.client.loop_read()
            for agent in registered:
                if agent.client is not None and agent.client.want_write():
                    agent.client.loop_write()
        for agent in self.agents:
            if agent.client is not None:
                if agent.connected:
                    agent.client.disconnect()  # on_disconnect updates the counters
                    agent.client.loop_write()
                    if agent.connected:
                        agent.stats.add(connected=-1)
                        agent.connected = False
                sock = agent.client.socket()
                if sock is not None:
                    sock.close()
        selector.close()


@dataclass
class Simulation:
    """Running simulated agents; ``stop()`` sends their offline pings and disconnects them."""

    stats_: SimStats
    shards: list[Shard]
    stop_event: threading.Event
    agents: list[SimAgent]

    def stats(self) -> dict[str, int]:
        """sent, acked, connects, reconnects, refused, connected, skipped."""
        return self.stats_.snapshot()

    def stop(self) -> None:
        """Stop every agent cleanly (offline/shutdown pings) and wait for the shards."""
        self.stop_event.set()
        for shard in self.shards:
            shard.join(15)


def start_simulation(settings: Settings, agents: int, seed: int | None = None, hot: int = 0) -> Simulation:
    """Start ``agents`` simulated agents in background threads; the first ``hot`` of them run hot in cycles."""
    if not settings.org or not settings.key:
        raise AgentError("simulate needs --org and --key (or FLEET_ORG / FLEET_KEY)")
    address = BrokerAddress.parse(settings.effective_broker_url)
    rng = random.Random(seed)
    stats = SimStats()
    stop = threading.Event()
    sims = [SimAgent(i + 1, settings, stats, random.Random(rng.random()), hot=i < hot) for i in range(agents)]
    spread = min(settings.interval, max(1.0, agents / 200))  # at most ~200 new TLS connections a second
    tls = tls_context(settings.ca_path) if address.tls else None  # a bad CA file fails here, once
    shards = [Shard(sims[i:i + AGENTS_PER_SHARD], address, tls, stop, spread)
              for i in range(0, len(sims), AGENTS_PER_SHARD)]
    for shard in shards:
        shard.start()
    return Simulation(stats, shards, stop, sims)


def run_simulation(settings: Settings, agents: int, duration: float | None = None) -> dict[str, float]:
    """``fleet simulate``: run until ``duration`` or Ctrl-C; progress every 5 s; JSON summary on exit."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    sim = start_simulation(settings, agents)
    started = time.monotonic()
    next_progress = started + PROGRESS_EVERY_S
    end = None if duration is None else started + duration
    try:
        while not stop.is_set():
            now = time.monotonic()
            if end is not None and now >= end:
                break
            stop.wait(max(0.0, min(0.5, next_progress - now, (end - now) if end is not None else 0.5)))
            early = sim.stats()
            if early["refused"] >= agents and early["connects"] == 0:  # wrong org or key: nobody gets in
                raise AgentError(f"the broker refused every simulated agent of org {settings.org!r}: "
                                 "check --org and --key (the org's agent key)")
            if time.monotonic() >= next_progress:
                next_progress += PROGRESS_EVERY_S
                s = sim.stats()
                print(f"simulate: {time.monotonic() - started:5.0f}s connected={s['connected']}/{agents} "
                      f"sent={s['sent']} acked={s['acked']} reconnects={s['reconnects']} refused={s['refused']}",
                      file=sys.stderr, flush=True)
    finally:
        sim.stop()
    summary = {**sim.stats(), "agents": agents, "seconds": round(time.monotonic() - started, 1)}
    print(json.dumps(summary), flush=True)
    return summary
