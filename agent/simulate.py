"""``fleet simulate``: many simulated agents speaking the real protocol, for demos and load tests.

Agents are spread over a few shard threads; each shard drives its agents from one selector loop. The TCP
connect and the TLS handshake are non-blocking steps of that loop (a slow or saturated broker delays one
agent, not its whole shard); the connected socket is then handed to paho, whose external-loop API speaks
MQTT on it. Every agent has its own connection, session, last will, retained pings and a random walk of
realistic metrics. First connects are spread with jitter over a window that grows with the number of
agents (``connect_rate`` a second), and a lost connection comes back after full-jitter exponential
backoff, as real agents do. Several processes can share one org with distinct machine-name prefixes.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import random
import secrets
import selectors
import signal
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from fleet.agent import record
from fleet.agent.connection import backoff_delay, reconnect_window
from fleet.agent.errors import AgentError
from fleet.agent.identity import IdentityFiles, enrol
from fleet.config import payloads
from fleet.config.ids import validate_id
from fleet.config.labels import Spread
from fleet.config.mqtt import BrokerAddress, new_client, paho, tls_context
from fleet.config.settings import Settings
from fleet.config.status import OFFLINE, ONLINE
from fleet.config.topics import agent_client_id, ping_topic, report_topic

log = logging.getLogger("fleet.simulate")
AGENTS_PER_SHARD = 250
MAX_UNACKED = 50  # reports in flight per agent; past this a report is skipped (counted), so memory stays bounded
PROGRESS_EVERY_S = 5.0
CONNECT_TIMEOUT_S = 10.0  # TCP connect + TLS handshake; the CONNACK then has the keepalive (paho's rule)
DEFAULT_CONNECT_RATE = 200.0  # first connects a second: the window is agents / rate seconds
DEFAULT_PREFIX = "sim"
HOT_FOR_S, COOL_FOR_S = 180.0, 120.0  # a "hot" agent's CPU cycle: pinned above 90% for 3 min, then normal for 2
OS_FAMILIES = [("Linux", "Debian GNU/Linux 12 (bookworm)", "x86_64"), ("Linux", "Ubuntu 24.04 LTS", "x86_64"),
               ("Linux", "Ubuntu 22.04 LTS", "aarch64"), ("Linux", "Alpine Linux v3.20", "x86_64"),
               ("Windows", "Windows Server 2022", "AMD64"), ("Darwin", "macOS 15.1", "arm64"),
               ("FreeBSD", "FreeBSD 14.1-RELEASE", "amd64")]
COUNTERS = ("sent", "acked", "connects", "reconnects", "refused", "failed", "connected", "skipped", "errors")


@dataclass
class SimStats:
    """Counters shared by all shards (updated under a lock), and when the agents first were all connected."""

    target: int = 0
    sent: int = 0
    acked: int = 0
    connects: int = 0
    reconnects: int = 0
    refused: int = 0
    failed: int = 0  # connection attempts that failed before MQTT (refused TCP, timeout, TLS error)
    connected: int = 0
    skipped: int = 0
    errors: int = 0  # unexpected exceptions in a shard's loop (logged); a healthy run has none
    first_connect_at: float | None = None  # Unix times
    all_connected_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        """Add to counters."""
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)
            if deltas.get("connects"):
                now = time.time()
                self.first_connect_at = self.first_connect_at or now
                if self.all_connected_at is None and self.connected >= self.target:
                    self.all_connected_at = now

    def snapshot(self) -> dict[str, Any]:
        """The counters (and the two times) as a dict."""
        with self.lock:
            return {k: getattr(self, k) for k in (*COUNTERS, "first_connect_at", "all_connected_at")}


class PreparedSocketClient(paho.Client):
    """A paho client that speaks MQTT on a socket the shard has already connected (and TLS-handshaken)."""

    prepared: socket.socket | None = None

    def _create_socket(self) -> Any:  # paho's hook for opening the connection (called by reconnect())
        sock, self.prepared = self.prepared, None
        if sock is None:
            raise ConnectionError("no connected socket was prepared for this client")
        return sock


class SimAgent:
    """One simulated machine: identity, metric random walks, and its current connection."""

    def __init__(self, index: int, settings: Settings, stats: SimStats, rng: random.Random,
                 prefix: str = DEFAULT_PREFIX, hot: bool = False, labels: dict[str, str] | None = None) -> None:
        self.machine = f"{prefix}-{index:04d}"
        self.labels = labels or {}
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
        self.dialing: socket.socket | None = None  # a connection being opened (TCP, then TLS)
        self.dial_deadline = 0.0
        self.session = ""
        self.sessions = 0
        self.seq = 0
        self.prev: tuple[str, int] | None = None  # the previous session and the last seq published in it
        self.reports = 0
        self.connected = False
        self.next_connect = 0.0
        self.next_report = 0.0
        self.attempts = 0
        self.report_mids: dict[int, int] = {}  # mid -> seq of reports awaiting their PUBACK
        self.events: list[str] | None = None  # the shard's record buffer, when recording
        self.tls: ssl.SSLContext | None = None  # its own context when it connects with its certificate

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
    def connect(self, address: BrokerAddress, sock: socket.socket) -> None:
        """Start MQTT on the connected ``sock``: a new session, its will, CONNECT (sent by the shard's loop)."""
        if self.session and self.seq > 0:  # named in this connection's online pings, for tail accounting
            self.prev = (self.session, self.seq - 1)
        self.session = secrets.token_hex(8)
        self.seq = 0
        interval = self.settings.interval
        # TLS is already up on ``sock`` (one shared context for all agents: loading the CA for each of
        # thousands of connections costs CPU and memory for each), so paho sees a plain socket.
        client = cast(PreparedSocketClient, new_client(
            dataclasses.replace(address, tls=False), agent_client_id(self.settings.org, self.machine),
            None if self.tls is not None else f"{self.settings.org}/agent", self.settings.key or None,
            factory=PreparedSocketClient))
        will = payloads.build_ping(self.machine, self.hw_id, self.session, OFFLINE, interval, reason="lost")
        client.will_set(ping_topic(self.settings.org, self.machine), payloads.encode(will), qos=1, retain=True)
        client.max_inflight_messages_set(20)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.prepared = sock
        self.client = client
        self.report_mids.clear()
        if self.sessions:
            self.stats.add(reconnects=1)
        self.sessions += 1
        client.connect(address.host, address.port, keepalive=int(min(60, max(5, 2 * interval))))

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason_code: Any, _p: Any = None) -> None:
        if getattr(reason_code, "is_failure", False):
            self.stats.add(refused=1)
            log.warning("simulated agent %s refused: %s", self.machine, reason_code)
            return
        self.connected = True
        self.attempts = 0
        self.stats.add(connected=1, connects=1)
        if self.events is not None:
            self.events.append(record.connected(self.machine, self.session, time.time()))
        self.ping(ONLINE)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _rc: Any, _p: Any = None) -> None:
        if self.connected:
            self.stats.add(connected=-1)
        self.connected = False

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: Any = None, _p: Any = None) -> None:
        seq = self.report_mids.pop(mid, None)
        if seq is not None:
            self.stats.add(acked=1)
            if self.events is not None:
                self.events.append(record.acked(self.machine, self.session, seq))

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
                                     self.metrics(self.settings.interval), self.system, self.labels)
        info = self.live.publish(report_topic(self.settings.org, self.machine), payloads.encode(body), qos=1)
        self.report_mids[info.mid] = self.seq
        if self.events is not None:
            self.events.append(record.published(self.machine, self.session, self.seq))
        self.seq += 1
        self.reports += 1
        self.stats.add(sent=1)
        if self.reports % 5 == 0:
            self.ping(ONLINE)


def _backoff(agent: SimAgent) -> float:
    """The agent's own backoff (full jitter, the first within about an interval), so a restarted broker is not
    hit by every agent at once."""
    return backoff_delay(agent.attempts, agent.settings.reconnect_max_s, reconnect_window(agent.settings.interval),
                         agent.rng)


class Shard(threading.Thread):
    """A thread driving a group of simulated agents from one selector loop."""

    def __init__(self, agents: list[SimAgent], address: BrokerAddress, tls: ssl.SSLContext | None,
                 stop: threading.Event, connect_window: float, recorder: record.Recorder | None = None) -> None:
        super().__init__(name=f"sim-shard-{agents[0].machine}", daemon=True)
        self.agents = agents
        self.address = address
        self.tls = tls
        self.stop_event = stop
        self.recorder = recorder
        self.events: list[str] | None = [] if recorder is not None else None
        self.selector = selectors.DefaultSelector()
        self.registered: dict[SimAgent, Any] = {}  # agents speaking MQTT -> their socket
        self.peers: list[tuple] = []  # the broker's resolved addresses
        now = time.monotonic()
        for agent in agents:  # first connects spread with jitter over the window, first reports over an interval
            agent.events = self.events
            agent.next_connect = now + agent.rng.uniform(0, connect_window)
            agent.next_report = agent.next_connect + agent.rng.uniform(0, agent.settings.interval)

    def run(self) -> None:
        """Connect, publish on schedule, service sockets; clean offline pings when stopped."""
        last_misc = 0.0
        while not self.stop_event.is_set():
            now = time.monotonic()
            misc = now - last_misc >= 1.0
            try:
                self._step(now, misc)
            except Exception:  # a bug must not silently take this shard's agents offline: count, log, go on
                self.agents[0].stats.add(errors=1)
                log.exception("simulator shard %s", self.name)
                self.stop_event.wait(0.1)
            if misc:
                last_misc = now
            self._flush_events()
        self._shutdown()
        self._flush_events()

    def _step(self, now: float, misc: bool) -> None:
        for agent in self.agents:
            if agent.dialing is not None:
                if now >= agent.dial_deadline:
                    self._dial_failed(agent, "timed out")
            elif agent.client is None or (not agent.connected and agent.client.socket() is None):
                if agent in self.registered:  # paho closed the socket itself (a write inside publish() failed)
                    self._lost(agent)
                elif now >= agent.next_connect:
                    self._dial(agent, now)
            elif agent.connected and now >= agent.next_report:
                agent.report()
                agent.next_report += agent.settings.interval
                if agent.next_report < now:
                    agent.next_report = now + agent.settings.interval
        self._service(misc)

    def _register(self, sock: Any, events: int, agent: SimAgent) -> None:
        """Watch ``sock`` for ``agent``. A socket paho closed on its own may still hold the same descriptor
        number in the selector (closing drops it from epoll, not from the selector's map): forget it first."""
        stale = self.selector.get_map().get(sock.fileno())
        if stale is not None:
            self._lost(stale.data)
            if sock.fileno() in self.selector.get_map():  # not a paho socket: a bug, but never a dead shard
                self.selector.unregister(self.selector.get_map()[sock.fileno()].fileobj)
        self.selector.register(sock, events, agent)

    # opening a connection, without blocking the loop -----------------------------------------
    def _dial(self, agent: SimAgent, now: float) -> None:
        sock = None
        try:
            if not self.peers:
                self.peers = socket.getaddrinfo(self.address.host, self.address.port, type=socket.SOCK_STREAM)
            family, kind, proto, _, sockaddr = self.peers[agent.attempts % len(self.peers)]
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            err = sock.connect_ex(sockaddr)
            if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                raise OSError(err, os.strerror(err))
        except OSError as exc:
            if sock is not None:
                sock.close()
            agent.dialing = None
            self._dial_failed(agent, exc)
            return
        agent.dialing = sock
        agent.dial_deadline = now + CONNECT_TIMEOUT_S
        self._register(sock, selectors.EVENT_WRITE, agent)

    def _advance_dial(self, agent: SimAgent) -> None:
        """The dialing socket is ready: finish the TCP connect, then step the TLS handshake, then start MQTT."""
        sock = agent.dialing
        if sock is None:
            return
        try:
            if not isinstance(sock, ssl.SSLSocket):
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                tls = agent.tls or self.tls
                if tls is not None:
                    self.selector.unregister(sock)
                    sock = agent.dialing = tls.wrap_socket(sock, server_hostname=self.address.host,
                                                           do_handshake_on_connect=False)
                    self.selector.register(sock, selectors.EVENT_WRITE, agent)  # the same descriptor again
            if isinstance(sock, ssl.SSLSocket):
                sock.do_handshake()
        except ssl.SSLWantReadError:
            self.selector.modify(sock, selectors.EVENT_READ, agent)
            return
        except ssl.SSLWantWriteError:
            self.selector.modify(sock, selectors.EVENT_WRITE, agent)
            return
        except (OSError, ValueError) as exc:  # refused, reset, certificate not trusted, ...
            self._dial_failed(agent, exc)
            return
        self.selector.unregister(sock)
        agent.dialing = None
        try:
            agent.connect(self.address, sock)
        except (OSError, ValueError) as exc:
            sock.close()
            agent.client = None
            self._dial_failed(agent, exc)
            return
        mqtt_sock = agent.live.socket()
        if mqtt_sock is None:  # writing CONNECT failed: paho closed it
            self._lost(agent)
            return
        self._register(mqtt_sock, selectors.EVENT_READ, agent)
        self.registered[agent] = mqtt_sock

    def _dial_failed(self, agent: SimAgent, why: object) -> None:
        sock, agent.dialing = agent.dialing, None
        if sock is not None:
            try:
                self.selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        agent.stats.add(failed=1)
        agent.attempts += 1
        agent.next_connect = time.monotonic() + _backoff(agent)
        log.debug("simulated agent %s cannot connect: %s", agent.machine, why)

    # the MQTT connections ------------------------------------------------------------------
    def _service(self, misc: bool) -> None:
        if not self.selector.get_map():
            self.stop_event.wait(0.05)
            return
        for key, _ in self.selector.select(timeout=0.05):
            agent: SimAgent = key.data
            if agent.dialing is not None:
                self._advance_dial(agent)
            elif agent.client is not None and not self._read(agent.client):
                self._lost(agent)
        for agent in list(self.registered):
            client = agent.client
            if client is None:
                continue
            write_failed = client.want_write() and client.loop_write() != paho.MQTT_ERR_SUCCESS
            if write_failed or (misc and client.loop_misc() != paho.MQTT_ERR_SUCCESS):
                self._lost(agent)

    @staticmethod
    def _read(client: paho.Client) -> bool:
        """Read what arrived, including what TLS already decrypted (select cannot see that); False if lost."""
        while client.loop_read() == paho.MQTT_ERR_SUCCESS:
            sock = client.socket()
            if sock is None or not isinstance(sock, ssl.SSLSocket) or not sock.pending():
                return sock is not None
        return False

    def _lost(self, agent: SimAgent) -> None:
        sock = self.registered.pop(agent, None)
        if sock is not None:
            try:
                self.selector.unregister(sock)
            except (KeyError, ValueError):
                pass
        if agent.connected:
            agent.stats.add(connected=-1)
        agent.connected = False
        agent.report_mids.clear()  # their PUBACKs can no longer come: the record shows them unacknowledged
        agent.attempts += 1
        # The client object stays: a client without a socket means "reconnect at next_connect".
        agent.next_connect = time.monotonic() + _backoff(agent)

    def _shutdown(self) -> None:
        infos = []
        for agent in self.agents:
            if agent.dialing is not None:
                self._dial_failed(agent, "stopping")
            elif agent.connected and agent.client is not None:
                infos.append((agent, agent.ping(OFFLINE, reason="shutdown")))
        deadline = time.monotonic() + 5
        def waiting() -> bool:  # offline pings not yet acknowledged on connections still open
            return any(not info.is_published() and agent.client is not None and agent.client.socket() is not None
                       for agent, info in infos)

        while time.monotonic() < deadline and waiting():
            for key, _ in self.selector.select(timeout=0.05):
                if key.data.client is not None:
                    self._read(key.data.client)
            for agent in self.registered:
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
        self.selector.close()

    def _flush_events(self) -> None:
        if self.recorder is not None and self.events:
            self.recorder.write(self.events[:])
            self.events.clear()  # in place: every agent of the shard appends to this list


@dataclass
class Simulation:
    """Running simulated agents; ``stop()`` sends their offline pings and disconnects them."""

    stats_: SimStats
    shards: list[Shard]
    stop_event: threading.Event
    agents: list[SimAgent]
    recorder: record.Recorder | None = None

    def stats(self) -> dict[str, Any]:
        """Counters (sent, acked, connects, reconnects, refused, failed, connected, skipped, errors), connect times."""
        return self.stats_.snapshot()

    def stop(self) -> None:
        """Stop every agent cleanly (offline/shutdown pings), wait for the shards, complete the record file."""
        self.stop_event.set()
        for shard in self.shards:
            shard.join(15)
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None


ENROL_THREADS = 8


def enrol_all(settings: Settings, address: BrokerAddress, machines: list[str]) -> Path:
    """Enrol every machine that has no certificate in the data dir yet (several at a time); returns the CA path.

    The first enrolment finds and keeps the CA; the others reuse it."""
    from concurrent.futures import ThreadPoolExecutor

    todo = [m for m in machines if not IdentityFiles(settings.data_dir, settings.org, m).enrolled()]
    if todo:
        started = time.monotonic()
        first = enrol(address, IdentityFiles(settings.data_dir, settings.org, todo[0]), settings.enrol, settings.ca)
        with ThreadPoolExecutor(ENROL_THREADS) as pool:
            list(pool.map(lambda m: enrol(address, IdentityFiles(settings.data_dir, settings.org, m),
                                          settings.enrol, str(first)), todo[1:]))
        print(f"simulate: enrolled {len(todo)} machines in {time.monotonic() - started:.1f} s", file=sys.stderr,
              flush=True)
    return Path(settings.ca) if settings.ca else IdentityFiles(settings.data_dir, settings.org, machines[0]).ca


def start_simulation(settings: Settings, agents: int, seed: int | None = None, prefix: str = DEFAULT_PREFIX,
                     connect_rate: float = DEFAULT_CONNECT_RATE, record_path: Path | None = None,
                     hot: int = 0, spread: Spread | None = None) -> Simulation:
    """Start ``agents`` simulated agents, named ``<prefix>-0001``…, in background threads.

    Their first connects are spread, with jitter, over ``agents / connect_rate`` seconds (at least one);
    with ``record_path``, every report published and acknowledged is written there (agent/record.py). The
    first ``hot`` agents run hot in cycles (CPU above 90%), so a demo sees an alert fire. ``spread`` gives the
    machines labels (every combination of its values in turn).
    """
    if not settings.org or not (settings.key or settings.enrol):
        raise AgentError("simulate needs --org and --key or --enrol (or FLEET_ORG / FLEET_KEY / FLEET_ENROL)")
    validate_id(f"{prefix}-{agents:04d}", "machine name prefix")
    if connect_rate <= 0:
        raise AgentError(f"--connect-rate must be positive, got {connect_rate}")
    address = BrokerAddress.parse(settings.effective_broker_url)
    rng = random.Random(seed)
    stats = SimStats(target=agents)
    stop = threading.Event()
    sims = [SimAgent(i + 1, settings, stats, random.Random(rng.random()), prefix, hot=i < hot,
                     labels=spread.labels(i) if spread is not None else None)
            for i in range(agents)]
    ca_path = settings.ca_path
    if settings.enrol:
        ca_path = enrol_all(settings, address, [sim.machine for sim in sims])
        for sim in sims:
            sim.tls = tls_context(ca_path, IdentityFiles(settings.data_dir, settings.org, sim.machine).client_cert())
        if settings.mqtt_cert_port:  # Mosquitto's listener for certificates
            address = dataclasses.replace(address, port=settings.mqtt_cert_port)
    tls = tls_context(ca_path) if address.tls else None  # a bad CA file fails here, once
    window = max(1.0, agents / connect_rate)
    recorder = record.Recorder(record_path) if record_path is not None else None
    shards = [Shard(sims[i:i + AGENTS_PER_SHARD], address, tls, stop, window, recorder)
              for i in range(0, len(sims), AGENTS_PER_SHARD)]
    for shard in shards:
        shard.start()
    return Simulation(stats, shards, stop, sims, recorder)


def run_simulation(settings: Settings, agents: int, duration: float | None = None, prefix: str = DEFAULT_PREFIX,
                   connect_rate: float = DEFAULT_CONNECT_RATE, record_path: Path | None = None,
                   spread: Spread | None = None) -> dict[str, Any]:
    """``fleet simulate``: run until ``duration`` or Ctrl-C; progress every 5 s; JSON summary on exit."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    sim = start_simulation(settings, agents, prefix=prefix, connect_rate=connect_rate, record_path=record_path,
                           spread=spread)
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
                                 "check --org and --key (the org's agent key; is it off?)")
            if time.monotonic() >= next_progress:
                next_progress += PROGRESS_EVERY_S
                s = sim.stats()
                print(f"simulate: {time.monotonic() - started:5.0f}s connected={s['connected']}/{agents} "
                      f"sent={s['sent']} acked={s['acked']} reconnects={s['reconnects']} refused={s['refused']} "
                      f"failed={s['failed']}", file=sys.stderr, flush=True)
    finally:
        sim.stop()
    summary = {**sim.stats(), "agents": agents, "seconds": round(time.monotonic() - started, 1)}
    print(json.dumps(summary), flush=True)
    return summary
