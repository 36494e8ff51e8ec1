"""``fleet agent``: report every interval, keep presence, reconnect with jittered backoff, never lose a report."""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import signal
import sys
import threading
import time
from pathlib import Path

from fleet.agent.connection import (
    BACKOFF_BASE_S,
    Connection,
    FatalConnectError,
    backoff_delay,
    new_session,
    reconnect_window,
)
from fleet.agent.errors import AgentError
from fleet.agent.identity import IdentityFiles, enrol, next_renewal, renewal_request, store_renewed
from fleet.agent.metrics import CollectorState, collect_metrics, collector_state, hardware_id, prime_cpu, system_info
from fleet.agent.outbox import Outbox
from fleet.config import payloads
from fleet.config.enrolment import CERT_KIND, RENEW_KIND, exchange_topic
from fleet.config.errors import ContractError
from fleet.config.ids import sanitize_machine_id
from fleet.config.mqtt import BrokerAddress
from fleet.config.settings import Settings
from fleet.config.status import OFFLINE, ONLINE
from fleet.config.topics import report_topic

log = logging.getLogger("fleet.agent")
PING_EVERY = 5  # intervals between refreshed online pings
SEND_WINDOW = 100  # queued reports in flight at once
ONCE_CONNECT_ATTEMPTS = 3
SHUTDOWN_DRAIN_S = 3.0
RENEWAL_ANSWER_S = 60.0
RENEWAL_RETRY_S = 3600.0


def keepalive_for(interval: float) -> int:
    """Keepalive sized to the interval (2 x, within 5-60 s): a dead agent is noticed within 1.5 x that."""
    return int(min(60, max(5, round(2 * interval))))


class Agent:
    """State of a running agent: its outbox, current connection, session and sequence."""

    def __init__(self, settings: Settings, machine: str, outbox: Outbox) -> None:
        self.settings = settings
        self.machine = machine
        self.outbox = outbox
        self.address = BrokerAddress.parse(settings.effective_broker_url)
        self.hw_id = hardware_id()
        self.system = system_info(self.hw_id)
        self.labels = settings.labels.as_dict()
        self.state = make_state(settings)
        self.ca_path = settings.ca_path
        self.conn: Connection | None = None
        self.attempt = 0  # failed connects since the last good one
        self.next_attempt = 0.0  # monotonic time of the next connect
        self.session = new_session()
        self.seq = 0
        # The newest session that made reports and its last seq (from an earlier run too), for tail accounting.
        self.prev: tuple[str, int] | None = outbox.last()
        self.inflight: dict[int, int] = {}  # paho mid -> outbox id
        self.stop = threading.Event()
        self.stop_or_event = threading.Event()  # set by PUBACKs, disconnects and stop requests
        self.reports_made = 0
        self._full_logged = -1e9
        self.identity: IdentityFiles | None = None  # set when the machine connects with its own certificate
        self.renew_at = float("inf")
        self.renewal: tuple[str, float] | None = None  # (request id, when asked) of a renewal in flight
        self.renewal_failing = False

    # -- reports --------------------------------------------------------------------------------
    def make_report(self) -> dict:
        """Collect one report for the current session and sequence number."""
        report = payloads.build_report(self.machine, self.hw_id, self.session, self.seq, round(time.time(), 3),
                                       collect_metrics(self.state), self.system, self.labels)
        self.seq += 1
        self.reports_made += 1
        return report

    def queue_report(self) -> None:
        """Store the next report in the outbox (sent when connected); a full disk drops, counts and logs."""
        before = self.outbox.dropped
        self.outbox.append(report_topic(self.settings.org, self.machine), payloads.encode(self.make_report()))
        self.outbox.remember_last(self.session, self.seq - 1)
        if self.outbox.dropped > before and time.monotonic() - self._full_logged > 60:
            self._full_logged = time.monotonic()
            log.warning("agent queue full (bounds or disk): %d reports dropped so far, oldest first",
                        self.outbox.dropped)

    # -- connection -----------------------------------------------------------------------------
    def connect(self) -> None:
        """Open a new connection with a new session, and announce it with a retained online ping.

        The ping names the previous session and its last seq, so the collector can count what of it never arrived.
        """
        if self.seq > 0:
            self.prev = (self.session, self.seq - 1)
        client_cert = self.identity.client_cert() if self.identity is not None else None
        address = self.address
        if client_cert is not None and self.settings.mqtt_cert_port:  # Mosquitto's listener for certificates
            address = dataclasses.replace(address, port=self.settings.mqtt_cert_port)
        conn = Connection(address, self.settings.org, self.machine, self.settings.key, str(self.ca_path),
                          self.hw_id, self.settings.interval, keepalive_for(self.settings.interval),
                          wake=self.stop_or_event, prev=self.prev, client_cert=client_cert)
        conn.open()
        if self.identity is not None:
            conn.subscribe(exchange_topic(self.settings.org, self.machine, CERT_KIND))
            self.renewal = None
        self.conn = conn
        self.session, self.seq = conn.session, 0
        self.inflight.clear()
        conn.ping(ONLINE, time.time())
        log.info("connected to %s as org=%s machine=%s session=%s (%d queued)", self.address.url,
                 self.settings.org, self.machine, conn.session, len(self.outbox))

    def drop_connection(self, why: str) -> None:
        """Forget a broken connection; unacknowledged reports stay queued and are sent again later."""
        if self.conn is not None:
            log.warning("lost connection to %s: %s", self.address.url, why)
            self.conn.close(clean=False)
        self.conn = None
        self.inflight.clear()
        self.attempt = 1
        self.next_attempt = time.monotonic() + backoff_delay(1, self.settings.reconnect_max_s,
                                                             reconnect_window(self.settings.interval))

    def pump(self) -> None:
        """Handle PUBACKs and disconnects, then send queued reports, oldest first, within the window."""
        conn = self.conn
        if conn is None:
            return
        acked: list[int] = []
        while True:
            try:
                kind, value = conn.events.get_nowait()
            except queue.Empty:
                break
            if kind == "acked" and value in self.inflight:
                acked.append(self.inflight.pop(value))
            elif kind == "message":
                self.renewal_answered(value)
            elif kind == "disconnected":
                self.outbox.remove(acked)
                self.drop_connection(value)
                return
        self.outbox.remove(acked)
        if not conn.is_connected():
            return
        room = SEND_WINDOW - len(self.inflight)
        if room > 0 and len(self.outbox) > len(self.inflight):
            last = max(self.inflight.values(), default=0)
            for item in self.outbox.peek(room, after_id=last):
                self.inflight[conn.publish(item.topic, item.payload)] = item.id

    def shutdown(self) -> None:
        """Say offline (reason shutdown) and disconnect cleanly."""
        conn = self.conn
        if conn is None or not conn.is_connected():
            return
        # Deliver what is queued or in flight first (bounded), so a clean stop leaves nothing behind.
        deadline = time.monotonic() + SHUTDOWN_DRAIN_S
        while (self.inflight or len(self.outbox)) and self.conn is not None and time.monotonic() < deadline:
            self.pump()
            self.stop_or_event.wait(0.05)
            self.stop_or_event.clear()
        if self.conn is None:
            return
        try:
            info = conn.client.publish(
                f"fleet/{self.settings.org}/{self.machine}/ping",
                payloads.encode(payloads.build_ping(self.machine, self.hw_id, conn.session, OFFLINE,
                                                    self.settings.interval, ts=time.time(), reason="shutdown")),
                qos=1, retain=True)
            info.wait_for_publish(5)
        except (RuntimeError, ValueError) as exc:
            log.warning("could not announce shutdown: %s", exc)
        self.pump()
        conn.close(clean=True)
        self.conn = None
        log.info("stopped: org=%s machine=%s session=%s", self.settings.org, self.machine, conn.session)

    # -- certificate renewal --------------------------------------------------------------------
    def maybe_renew(self) -> None:
        """Ask for a new certificate over this connection once two thirds of the current one's life have passed."""
        conn = self.conn
        if self.identity is None or conn is None or not conn.is_connected():
            return
        now = time.time()
        if self.renewal is not None and now - self.renewal[1] > RENEWAL_ANSWER_S:
            self.renewal_failed("no answer from the signer")
        if self.renewal is None and now >= self.renew_at:
            request, body = renewal_request(self.identity)
            self.renewal = (request, now)
            conn.publish(exchange_topic(self.settings.org, self.machine, RENEW_KIND), payloads.encode(body))

    def renewal_answered(self, raw: bytes) -> None:
        """The signer answered on the cert topic: keep the new certificate (used from the next connection)."""
        if self.identity is None or self.renewal is None:
            return
        try:
            body = payloads.decode_object(raw)
        except ContractError:
            return
        if body.get("request") != self.renewal[0]:
            return
        if store_renewed(self.identity, body):
            self.renewal, self.renewal_failing = None, False
            self.renew_at = next_renewal(self.identity)
            log.info("certificate renewed for org=%s machine=%s", self.settings.org, self.machine)
        else:
            self.renewal_failed(str(body.get("error", "refused")))

    def renewal_failed(self, why: str) -> None:
        """Keep the current certificate and ask again later; say so once per run of failures."""
        if not self.renewal_failing:
            log.warning("certificate renewal failed for org=%s machine=%s: %s; the current certificate stays in use",
                        self.settings.org, self.machine, why)
        self.renewal_failing = True
        self.renewal = None
        self.renew_at = time.time() + RENEWAL_RETRY_S

    # -- main loop ------------------------------------------------------------------------------
    def run(self, once: bool = False) -> int:
        """Report until stopped; with ``once``, deliver one report (and any backlog) then stop."""
        prime_cpu(self.state)
        interval = self.settings.interval
        next_report = time.monotonic() + (min(1.0, interval) if once else 0.0)
        next_ping = PING_EVERY
        made = 0
        while not self.stop.is_set():
            now = time.monotonic()
            if self.conn is None and now >= self.next_attempt:
                try:
                    self.connect()
                    self.attempt = 0
                except FatalConnectError:
                    raise
                except AgentError as exc:
                    self.attempt += 1
                    if once and self.attempt >= ONCE_CONNECT_ATTEMPTS:
                        raise
                    delay = backoff_delay(self.attempt, self.settings.reconnect_max_s,
                                          BACKOFF_BASE_S if once else reconnect_window(interval))
                    self.next_attempt = time.monotonic() + delay
                    log.warning("%s; retrying in %.1f s (attempt %d)", exc, delay, self.attempt)
            if now >= next_report and not (once and made):
                self.queue_report()
                made += 1
                next_report += interval
                if next_report < now:  # we were suspended or very late: do not burst
                    next_report = now + interval
                next_ping -= 1
                if next_ping <= 0 and self.conn is not None and self.conn.is_connected():
                    self.conn.ping(ONLINE, time.time())
                    next_ping = PING_EVERY
            self.pump()
            self.maybe_renew()
            if once and made and len(self.outbox) == 0 and self.conn is not None:
                break
            # Sleep until the next report or reconnect is due, or a PUBACK/disconnect/stop wakes us.
            due = next_report if self.conn is not None else min(next_report, self.next_attempt)
            self.stop_or_event.wait(max(0.0, min(due - time.monotonic(), 5.0)))
            self.stop_or_event.clear()
        self.shutdown()
        return 0


def make_state(settings: Settings) -> CollectorState:
    """The collectors' state for these settings; a bad ``--process`` is an AgentError (one line, exit 1)."""
    try:
        return collector_state(settings.textfile_dir, settings.processes)
    except ValueError as exc:
        raise AgentError(str(exc)) from exc


def machine_identity(settings: Settings, files: IdentityFiles) -> Path:
    """Enrol with ``--enrol`` on a first start (a data dir without a certificate); the CA to verify the broker
    with: ``--ca``, else the CA kept at enrolment, else the data dir's ``certs/ca.pem``."""
    if files.enrolled():
        files.client_cert()  # refuse a key others can read before anything else
    elif settings.enrol:
        ca = enrol(BrokerAddress.parse(settings.effective_broker_url), files, settings.enrol, settings.ca)
        log.info("enrolled org=%s machine=%s: certificate in %s", settings.org, files.machine, files.cert)
        return Path(settings.ca) if settings.ca else ca
    if settings.ca:
        return Path(settings.ca)
    return files.ca if files.ca.exists() else settings.ca_path


def print_reports(settings: Settings, machine: str, once: bool, stop: threading.Event) -> int:
    """``--print``: collect reports and print them as JSON, without any broker."""
    hw_id = hardware_id()
    system, state = system_info(hw_id), make_state(settings)
    prime_cpu(state)
    session, seq = new_session(), 0
    stop.wait(min(1.0, settings.interval))
    while True:
        report = payloads.build_report(machine, hw_id, session, seq, round(time.time(), 3),
                                       collect_metrics(state), system, settings.labels.as_dict())
        print(json.dumps(report), flush=True)
        seq += 1
        if once or stop.wait(settings.interval):
            return 0


def run(settings: Settings, once: bool = False, print_only: bool = False) -> int:
    """Entry point of ``fleet agent``; returns the exit code (errors raise AgentError)."""
    import socket

    machine = settings.machine or sanitize_machine_id(socket.gethostname())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if print_only:
        return print_reports(settings, machine, once, stop)
    if not settings.org:
        raise AgentError("missing --org (or FLEET_ORG); --print needs none")
    files = IdentityFiles(settings.data_dir, settings.org, machine)
    ca_path = machine_identity(settings, files)
    if not files.enrolled() and not settings.key:
        raise AgentError("missing --key or --enrol (or FLEET_KEY / FLEET_ENROL); --print needs neither")
    if not Path(ca_path).exists() and settings.effective_broker_url.startswith("mqtts"):
        raise AgentError(f"CA file not found: {ca_path} (pass --ca)")
    outbox = Outbox(settings.data_dir / f"agent-{settings.org}-{machine}.db",
                    settings.agent_queue_max_reports, settings.agent_queue_max_bytes)
    agent = Agent(settings, machine, outbox)
    agent.ca_path = Path(ca_path)
    if files.enrolled():
        agent.identity = files
        agent.renew_at = next_renewal(files)
    agent.stop = stop
    def request_stop(*_: object) -> None:
        stop.set()
        agent.stop_or_event.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    try:
        return agent.run(once=once)
    finally:
        outbox.close()


if __name__ == "__main__":
    sys.exit(run(Settings()))
