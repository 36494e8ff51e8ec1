"""The running collector: MQTT subscriptions per org, a bounded queue, one writer thread owning state and the database.

Threads:
- the MQTT link's network thread (collector.mqtt_link) runs ``_on_message``: it validates the message
  (collector.intake) and puts it on a bounded queue. When the queue is full it blocks there. That is the
  backpressure: nothing is acknowledged before it is committed, so a slow database slows the broker's
  delivery to us (the broker queues for our persistent session) instead of us dropping messages.
- the writer thread drains the queue, applies the state machine (collector.state), and stores each batch
  in one transaction (collector.history); it also runs the timers: stale/TTL checks, heartbeat, org
  refresh and history retention.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from fleet.collector import history
from fleet.collector.alerts.delivery import DeliveryWorker
from fleet.collector.alerts.engine import AlertEngine
from fleet.collector.errors import CollectorError
from fleet.collector.intake import INTERNAL, UNKNOWN_ORG, DropCounter, RateLimiter, Received, parse_message
from fleet.collector.mqtt_link import LinkCallbacks, MqttLink
from fleet.collector.state import Machine, Tracker, Transition
from fleet.config import payloads
from fleet.config.errors import ConfigError
from fleet.config.mqtt import BrokerAddress
from fleet.config.payloads import Report
from fleet.config.settings import Settings
from fleet.config.status import BROKER_CONNECTED, COLLECTOR
from fleet.config.topics import KINDS, every_org_filter, org_kind_filter, ping_topic
from fleet.store import credentials
from fleet.store.database import SQLITE, Database, DatabaseBusy, DatabaseError, DatabaseRefused, open_database
from fleet.store.errors import StoreError
from fleet.store.orgs import list_orgs

log = logging.getLogger("collector")

QUEUE_MAX = 20_000
# Commit grouping (docs/collector.md): a writer woken by a few messages waits up to GROUP_WAIT_S for
# GROUP_MIN of them, so a low rate is not one commit (and two wake-ups) per message. GROUP_MIN stays below
# the smallest common in-flight window of a broker (10: RabbitMQ's prefetch; 20: Mosquitto, VerneMQ), which
# holds the rest back until we acknowledge, so grouping never waits on a broker that waits on us.
GROUP_MIN = 8
GROUP_WAIT_S = 0.01
HEARTBEAT_EVERY_S = 2.0
RETENTION_EVERY_S = 60.0
ORG_REFRESH_MAX_S = 2.0
STARTUP_GRACE_S = 30.0  # without a broker, start stale/TTL checks after this long anyway
WRITER_BUSY_TIMEOUT_MS = 1000
STOP_RETRY_S = 10.0
CHECKPOINT_EVERY_S = 1.0
KEEPALIVE_S = 30
SUBSCRIBE_CHUNK = 64
GC_THRESHOLD = 20_000


def collect_garbage_less_often() -> None:
    """Raise the cyclic GC's first threshold (process-wide) so it does not keep re-walking queued reports.

    Only for a process that runs the collector alone (``serve``, ``bench/ingest.py``): ``fleet up`` shares
    its process with the broker and the web and keeps Python's defaults (docs/collector.md).
    """
    # Each decoded report is ~10 dicts and lists, freed by reference counting once stored; with up to
    # QUEUE_MAX of them alive, the default threshold (700) ran a collection every ~70 messages and took a
    # quarter of the ingest time (python3 bench/ingest.py: 74% -> 84-87% of the raw subscriber on Mosquitto).
    first, second, third = gc.get_threshold()
    if first and first < GC_THRESHOLD:
        gc.set_threshold(GC_THRESHOLD, second, third)


def client_id_for(orgs: tuple[str, ...]) -> str:
    """The collector's fixed MQTT client id for a shard (same shard, same persistent session).

    It starts with ``fleet.`` rather than ``fleet-``: agent ids are ``fleet-<org>-<machine>``, so no agent
    of an org named ``collector`` can ever take over the collector's session.
    """
    shard = ",".join(sorted(set(orgs))) or "*"
    return "fleet.collector-" + hashlib.sha256(shard.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class CollectorStats:
    """A snapshot of the collector's counters."""

    broker_connected: bool
    orgs: tuple[str, ...]
    received: int
    stored: int
    dropped: dict[str, int] = field(default_factory=dict)
    queued: int = 0
    machines: int = 0
    commits: int = 0  # write transactions: stored / commits is the mean batch


class RunningCollector:
    """A collector running in background threads; ``stop()`` flushes every pending write."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address = BrokerAddress.parse(settings.effective_broker_url)
        self.client_id = client_id_for(settings.orgs)
        self.drops = DropCounter()
        self.limiter = RateLimiter(settings.agent_rate_limit_per_s)
        self.tracker = Tracker(settings.stale_factor, settings.interval, settings.ttl_seconds, settings.lost_grace_s)
        # A deque, not queue.Queue: the writer must not wake per message (each wake-up is a GIL
        # hand-off that halved throughput); it sleeps until a batch is full or batch_interval_s passes.
        self._queue: deque[tuple[Received, int]] = deque()  # message, token to acknowledge it with
        self._queue_max = QUEUE_MAX
        self._wake = threading.Event()
        self._space = threading.Event()
        self._writer_idle = False  # the writer sleeps with nothing queued: the first message wakes it
        self._orgs: frozenset[str] = frozenset()  # the orgs served: existing ones (of the shard)
        self._orgs_lock = threading.Lock()
        self._connected = threading.Event()
        self._synced = threading.Event()  # connected and subscribed at least once
        self._stopping = threading.Event()
        self._network_done = threading.Event()
        self._writer_ready = threading.Event()
        self._writer_error: BaseException | None = None
        self._checkpoint_stop = threading.Event()
        self._received = 0
        self._stored = 0
        self._commits = 0
        self._started = time.monotonic()
        self._backpressure_logged = 0.0
        self._client: MqttLink | None = None
        self._writer = threading.Thread(target=self._writer_main, name="collector-writer", daemon=True)
        self._connected_since: float | None = None  # wall clock of the current connection's CONNACK
        self.alerts = AlertEngine(self.tracker, settings.alert_group_wait, self.blind)
        self.delivery = DeliveryWorker(settings, lambda: self._orgs)

    # --- public -------------------------------------------------------------------------------
    def start(self) -> RunningCollector:
        """Open the database, restore state, connect and subscribe; returns once the writer is ready."""
        try:
            with open_database(self.settings.database) as db:
                key = credentials.ensure_service_key(db, self.settings.data_dir)
                self._set_orgs(self._wanted_orgs(list_orgs(db)))
            # PUBACK only once a message is committed (or dropped): a killed collector loses nothing, the
            # broker redelivers what was never acknowledged and the (machine, session, seq) key dedupes it.
            client = MqttLink(self.address, self.client_id, credentials.SERVICE_USERNAME, key, self.settings.ca_path,
                              KEEPALIVE_S, LinkCallbacks(self._on_connect, self._on_disconnect, self._on_message,
                                                         self._on_suback, self._on_read))
        except (ConfigError, StoreError, OSError) as exc:
            raise CollectorError(f"cannot start the collector: {exc}") from exc
        self._client = client
        self._writer.start()
        if not self._writer_ready.wait(30) or self._writer_error is not None:
            raise CollectorError(f"collector writer failed to start: {self._writer_error}")
        self.delivery.start()
        client.start()
        log.info("collector %s connecting to %s for orgs %s", self.client_id, self.address.url,
                 ", ".join(sorted(self._orgs)) or "(none yet)")
        return self

    def wait_subscribed(self, timeout: float) -> bool:
        """Block until connected and subscribed once (True), or ``timeout`` seconds (False)."""
        return self._synced.wait(timeout)

    def stats(self) -> CollectorStats:
        """Current counters."""
        return CollectorStats(self._connected.is_set(), tuple(sorted(self._orgs)), self._received,
                              self._stored, self.drops.totals(), len(self._queue), len(self.tracker.machines),
                              self._commits)

    def stop(self, timeout: float = 30.0) -> None:
        """Disconnect (the broker keeps our session and queues for it), write everything pending, stop."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        client = self._client
        if client is not None:
            client.stop()
        self._network_done.set()
        if self._writer.is_alive():
            self._writer.join(timeout)
        self.delivery.stop()
        self._connected.clear()
        log.info("collector stopped: received %d, stored %d, dropped %s", self._received, self._stored,
                 self.drops.totals() or "none")

    # --- orgs ---------------------------------------------------------------------------------
    def _wanted_orgs(self, existing: list[str]) -> frozenset[str]:
        if self.settings.orgs:
            return frozenset(org for org in existing if org in self.settings.orgs)
        return frozenset(existing)

    def _set_orgs(self, wanted: frozenset[str]) -> None:
        with self._orgs_lock:
            self._orgs = wanted

    def subscriptions(self) -> list[tuple[str, int]]:
        """What the collector subscribes to, fixed for its lifetime so that no org waits for a subscription.

        An agent may publish as soon as its org's credentials are valid, and a broker drops what nobody is
        subscribed to, so the filters do not follow the org list: without a shard, every org by wildcard
        (messages of orgs that do not exist are counted as ``unknown_org``); a shard, its orgs by name,
        whether they exist yet or not.
        """
        if self.settings.orgs:
            return [(org_kind_filter(org, kind), 1) for org in sorted(set(self.settings.orgs)) for kind in KINDS]
        return [(every_org_filter(kind), 1) for kind in KINDS]

    def _subscribe(self) -> None:
        client = self._client
        if client is None:
            return
        filters = self.subscriptions()
        for i in range(0, len(filters), SUBSCRIBE_CHUNK):
            client.subscribe(filters[i:i + SUBSCRIBE_CHUNK])

    def blind(self, machine: Machine, now: float) -> bool:
        """True while the collector cannot tell the machine's status: disconnected, or within its stale_after of
        connecting (the backlog and fresh pings are still arriving). Status alerts do not fire meanwhile."""
        since = self._connected_since
        return since is None or now - since < self.tracker.stale_after(machine)

    # --- link callbacks (network thread: never block on anything but the bounded queue) ---------
    def _on_connect(self, session_present: bool) -> None:
        self._connected_since = time.time()
        self._connected.set()
        log.info("collector connected to %s (session present: %s)", self.address.url, session_present)
        self._subscribe()

    def _on_disconnect(self, why: str) -> None:
        was = self._connected.is_set()
        self._connected_since = None
        self._connected.clear()
        if was and not self._stopping.is_set():
            log.warning("collector lost the broker %s (%s); reconnecting", self.address.url, why)

    def _on_suback(self, codes: list[int]) -> None:
        refused = [code for code in codes if code >= 0x80]
        if refused:
            log.error("broker refused %d collector subscription(s)", len(refused))
        self._synced.set()

    def _on_message(self, topic_bytes: bytes, payload: bytes, retained: bool, token: int) -> None:
        self._received += 1
        client = self._client
        assert client is not None  # the link calls back only once start() has made it
        try:
            topic = topic_bytes.decode("utf-8")
        except UnicodeDecodeError:
            self.drops.add(payloads.BAD_TOPIC, repr(topic_bytes[:100]), "topic is not UTF-8")
            client.ack((token,))
            return
        item = parse_message(topic, payload, retained, time.time(), self.limiter, self.drops)
        if item is None:
            client.ack((token,))  # nothing to store: counted, acknowledge now
            return
        self._put(item, token)

    def _on_read(self) -> None:
        # The broker stops sending once its in-flight window (20 messages on a default Mosquitto) is
        # unacknowledged, so what arrived is committed soon rather than when a batch fills: at once by an idle
        # writer, then as soon as GROUP_MIN are queued (Writer._wait_for_messages).
        q = self._queue
        if q and (self._writer_idle or len(q) >= GROUP_MIN) and not self._wake.is_set():
            self._wake.set()

    def _put(self, item: Received, ack: int) -> None:
        q = self._queue
        q.append((item, ack))
        size = len(q)
        if size >= self.settings.batch_max and not self._wake.is_set():
            self._wake.set()
        if size < self._queue_max:
            return
        # Full: hold the network thread here (no PUBACK yet) until the writer has made room.
        now = time.monotonic()
        if now - self._backpressure_logged > 60:
            self._backpressure_logged = now
            log.warning("collector queue full (%d): holding back the broker until the database catches up",
                        self._queue_max)
        self._wake.set()
        while len(q) >= self._queue_max and self._writer.is_alive():
            self._space.clear()
            if len(q) >= self._queue_max:
                self._space.wait(1.0)
        if len(q) >= self._queue_max:  # the writer is gone (a bug, logged): do not grow without bound
            q.pop()  # only this thread appends, so the last item is this one; never acknowledged
            self.drops.add(INTERNAL, f"fleet/{item.message.org}/{item.message.machine_id}", "writer is not running")

    # --- writer thread ------------------------------------------------------------------------
    def _writer_main(self) -> None:
        try:
            db = open_database(self.settings.database, busy_timeout_ms=WRITER_BUSY_TIMEOUT_MS)
            if db.engine == SQLITE:
                # Checkpoints (copying the WAL into fleet.db, with an fsync) run on a thread of their own, so a
                # commit never waits for one: the broker sends no more than its in-flight window until we ack.
                db.execute("PRAGMA wal_autocheckpoint=0")
            self.tracker.load(history.load_machines(db, self._orgs if self.settings.orgs else None), time.time())
            self.alerts.load(db, self._orgs, time.time())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._writer_error = exc
            self._writer_ready.set()
            return
        self._writer_ready.set()
        checkpointer = threading.Thread(target=self._checkpointer, name="collector-checkpoint", daemon=True)
        if db.engine == SQLITE:
            checkpointer.start()
        try:
            Writer(self, db).run()
        except BaseException:
            log.exception("collector writer thread crashed")
            raise
        finally:
            self._checkpoint_stop.set()
            if checkpointer.is_alive():
                checkpointer.join(STOP_RETRY_S)
            db.close()

    def _checkpointer(self) -> None:
        """Copy the WAL into fleet.db every CHECKPOINT_EVERY_S, off the writer's commit path."""
        try:
            db = open_database(self.settings.database, migrate=False)
        except DatabaseError as exc:
            log.error("collector checkpoints disabled: %s", exc)
            return
        try:
            while not self._checkpoint_stop.wait(CHECKPOINT_EVERY_S):
                try:
                    history.checkpoint(db)
                except DatabaseError as exc:
                    log.warning("WAL checkpoint failed (will retry): %s", exc)
            history.checkpoint(db)
        except DatabaseError as exc:
            log.warning("final WAL checkpoint failed: %s", exc)
        finally:
            db.close()


class Writer:
    """The writer thread's loop: batch, apply state, store, and run the timers."""

    def __init__(self, owner: RunningCollector, db: Database) -> None:
        self.owner = owner
        self.db = db
        self.settings = owner.settings
        self.tracker = owner.tracker
        self.alerts = owner.alerts
        self.batch = history.Batch()
        now = time.monotonic()
        self.tick_every = min(1.0, self.settings.ttl_seconds / 4)
        self.org_every = min(self.settings.reload_interval_s, ORG_REFRESH_MAX_S)
        self.next_tick = now
        self.next_heartbeat = now
        self.next_orgs = now + self.org_every
        self.next_retention = now
        self.next_settle = now
        self.pending_clears: list[str] = []
        self.pending_acks: list[int] = []  # acknowledged once the batch holding them is written
        self.orgs_read_for_batch = False
        self.orgs_read_ok = True
        # A connection lost during COMMIT (PostgreSQL) leaves unknown whether the batch was stored, and a retry
        # would store its events and counters twice: each batch also writes this collector's marker (one row).
        self.marker_key = f"collector_batch:{owner.client_id}"
        self.marker_prefix = os.urandom(6).hex()  # this process's, so a marker left by an earlier one never matches
        self.batches = 0

    def run(self) -> None:
        """Loop until stop() and the queue is empty; the last flush writes everything pending."""
        owner = self.owner
        q = owner._queue
        batch_max = self.settings.batch_max
        while True:
            if len(q) < batch_max:
                self._wait_for_messages(q)
            owner._wake.clear()
            done = owner._network_done.is_set()
            self.orgs_read_for_batch = False
            for _ in range(min(len(q), batch_max)):
                item, ack = q.popleft()
                if item.message.org in owner._orgs or self._org_appeared(item.message.org):
                    self._apply(item)
                else:
                    owner.drops.add(UNKNOWN_ORG, f"fleet/{item.message.org}/{item.message.machine_id}", "no such org")
                self.pending_acks.append(ack)
            owner._space.set()
            done = done and not q
            try:
                self._timers(final=done)
                self._flush(final=done)
                if not done and owner.wait_subscribed(0):
                    self._settle_tails()
                if done or time.monotonic() >= self.next_heartbeat:
                    self.next_heartbeat = time.monotonic() + HEARTBEAT_EVERY_S
                    self._heartbeat(final=done)
            except Exception:
                log.exception("collector writer error (continuing)")
                self.owner.drops.add(INTERNAL, "(writer)", "timer or flush failed")
                time.sleep(min(1.0, self.settings.batch_interval_s))
            if done:
                return

    def _wait_for_messages(self, q: deque) -> None:
        """Sleep until there is a batch to write: GROUP_MIN messages, or GROUP_WAIT_S after the first one.

        Unacknowledged messages hold the broker's in-flight window, so nothing waits longer than GROUP_WAIT_S;
        but at 500 reports/s, committing whatever each socket read delivered meant a commit and a wake-up for
        every two reports (bench/ingest.py --rate). The link wakes an idle writer at the first message
        (``_on_read``), then again once GROUP_MIN are queued.
        """
        owner = self.owner
        owner._writer_idle = True
        if not q:
            owner._wake.wait(self.settings.batch_interval_s)
            owner._wake.clear()
        owner._writer_idle = False
        if 0 < len(q) < GROUP_MIN and not owner._network_done.is_set():
            owner._wake.wait(GROUP_WAIT_S)

    def _apply(self, item: Received) -> None:
        try:
            message = item.message
            if isinstance(message, Report):
                transitions = self.tracker.on_report(message, item.received)
                self.batch.reports.append(history.report_row(message, item.received, item.payload))
            else:
                transitions = self.tracker.on_ping(message, item.received, item.retained)
            self._record(transitions)
            machine = self.tracker.get(message.org, message.machine_id)
            if machine is not None:
                self.alerts.evaluate(machine, item.received, metrics_changed=isinstance(message, Report))
        except Exception as exc:
            self.owner.drops.add(INTERNAL, f"fleet/{item.message.org}/{item.message.machine_id}",
                                 f"{type(exc).__name__}: {exc}")
            log.exception("internal error applying a message of %s/%s", item.message.org, item.message.machine_id)

    def _record(self, transitions: list[Transition]) -> None:
        for t in transitions:
            self.batch.events.append(t)
            log.info("machine %s/%s: %s -> %s (%s)", t.org, t.machine_id, t.old_status or "new", t.new_status,
                     t.reason)

    def _timers(self, final: bool) -> None:
        owner = self.owner
        now_m = time.monotonic()
        if now_m >= self.next_tick and not final:
            self.next_tick = now_m + self.tick_every
            # Until the first subscription is acknowledged we have not heard the backlog yet:
            # judging silence before that would flap every machine to stale and back.
            if owner._synced.is_set() or now_m - owner._started > STARTUP_GRACE_S:
                self.tick(time.time())
        if now_m >= self.next_orgs and not final:
            self.next_orgs = now_m + self.org_every
            self._refresh_orgs()
        if not final:
            self.alerts.timers(self.db, owner._orgs, time.time())
        if now_m >= self.next_retention and not final:
            self.next_retention = now_m + RETENTION_EVERY_S
            self._retention()

    def _settle_tails(self) -> None:
        """Count the missing reports of sessions whose grace period ended, from what is committed now.

        Runs right after a flush, so every report received so far is in history; the counts reach the
        database with the next batch (machine row, org counter and event in one transaction).
        """
        now_m = time.monotonic()
        if now_m < self.next_settle:
            return
        self.next_settle = now_m + self.tick_every
        now = time.time()
        for tail in self.tracker.due_tails(now):
            try:
                stats = history.tail_stats(self.db, tail)
            except DatabaseError as exc:  # the database went away after the flush: settle on a later pass
                log.warning("cannot count the tail of %s/%s yet: %s", tail.org, tail.machine_id, exc)
                return
            lost, transitions = self.tracker.settle_tail(tail, stats, now)
            if lost:
                self.batch.lost[tail.org] = self.batch.lost.get(tail.org, 0) + lost
            self._record(transitions)

    def tick(self, now: float) -> None:
        """Stale and TTL checks; evicted machines lose their row and their retained ping."""
        transitions, evicted = self.tracker.tick(now)
        self._record(transitions)
        self.alerts.after_tick(transitions, evicted, now)
        for machine in evicted:
            self.batch.evicted.append(machine)
            self.batch.expired[machine.org] = self.batch.expired.get(machine.org, 0) + 1
            self.pending_clears.append(ping_topic(machine.org, machine.machine_id))

    def _org_appeared(self, org: str) -> bool:
        """Whether ``org``, unknown so far, exists after all: read the org list again, once per batch.

        A new org's agent can publish before the periodic refresh. Every message of the batch was received
        before this read, and the broker accepted it only once the org's credentials were in the database,
        so an org this read does not list does not exist (or is not this shard's). If the read fails, the
        message is kept rather than dropped.
        """
        if not self.orgs_read_for_batch:
            self.orgs_read_for_batch = True
            self.orgs_read_ok = self._refresh_orgs()
        return org in self.owner._orgs or not self.orgs_read_ok

    def _refresh_orgs(self) -> bool:
        owner = self.owner
        try:
            wanted = owner._wanted_orgs(list_orgs(self.db))
        except DatabaseError as exc:
            log.warning("cannot read orgs (will retry): %s", exc)
            return False
        if wanted != owner._orgs:
            for org in sorted(owner._orgs - wanted):
                self.tracker.forget_org(org)
                self.alerts.forget_org(org)
                log.info("collector no longer serves org %s", org)
            for org in sorted(wanted - owner._orgs):
                log.info("collector serves org %s", org)
            owner._set_orgs(wanted)
        return True

    def _retention(self) -> None:
        try:
            result = history.apply_retention(self.db, time.time(), self.settings.history_raw_days,
                                           self.settings.history_rollup_days)
        except DatabaseError as exc:
            log.warning("history retention failed (will retry): %s", exc)
            return
        if result.reports_rolled_up or result.rollups_deleted or result.events_deleted:
            log.info("retention: %d reports rolled up, %d rollups and %d events deleted",
                     result.reports_rolled_up, result.rollups_deleted, result.events_deleted)

    def _heartbeat(self, final: bool) -> None:
        stats = self.owner.stats()
        detail = {BROKER_CONNECTED: stats.broker_connected and not final, "orgs": list(stats.orgs),
                  "received": stats.received, "stored": stats.stored, "dropped": stats.dropped,
                  "queued": stats.queued, "machines": stats.machines, "client_id": self.owner.client_id,
                  "alerts_firing": self.alerts.firing_count()}
        try:
            history.write_heartbeat(self.db, COLLECTOR, time.time(), detail)
        except DatabaseError as exc:
            log.warning("cannot write the collector heartbeat: %s", exc)

    def _flush(self, final: bool) -> None:
        batch = self.batch
        batch.drops = self.owner.drops.take_unsaved()
        batch.machines = self.tracker.take_dirty()
        batch.alerts = self.alerts.take_writes()
        if batch and not self.write(batch, final):
            self.pending_acks = []  # not stored: leave them unacknowledged, the broker will send them again
        self.batch = history.Batch()
        client = self.owner._client
        if client is not None and self.pending_acks:
            client.ack(self.pending_acks)
        self.pending_acks = []
        for topic in self.pending_clears:
            if client is not None:
                # QoS 1: the link keeps it while disconnected and sends it on reconnect.
                client.publish(topic, b"", retain=True)
                log.info("machine %s evicted: retained ping cleared", topic)
        self.pending_clears = []
        for topic, payload in self.alerts.take_publishes():
            if client is not None:
                client.publish(topic, payload, retain=True)
        if self.alerts.outbox_added:
            self.alerts.outbox_added = False
            self.owner.delivery.wake()

    def write(self, batch: history.Batch, final: bool) -> bool:
        """Write a batch, retrying while the database is busy or away; False only if it gave up at shutdown."""
        try:
            return self._retrying(batch, final)
        except DatabaseRefused as exc:
            return self._salvage(batch, exc, final)  # what the database refuses is counted; the rest is stored

    def _retrying(self, batch: history.Batch, final: bool) -> bool:
        """Write one batch; a transient failure (busy, locked, connection lost, server restarting) is retried
        with backoff, reconnecting as needed. Whatever failed was rolled back, so nothing is acknowledged
        before it is committed. DatabaseRefused passes through."""
        delay = 0.05
        first_failure = None
        self.batches += 1
        marker = (self.marker_key, f"{self.marker_prefix}:{self.batches}")
        while True:
            try:
                if first_failure is not None and history.committed(self.db, marker):
                    log.info("the batch whose commit was cut off had been stored: not writing it again")
                    self.owner._stored += len(batch.reports)
                    return True
                self.owner._stored += history.write_batch(self.db, batch, time.time(), marker)
                self.owner._commits += 1
                return True
            except DatabaseRefused:
                raise
            except DatabaseError as exc:  # DatabaseBusy, or a lasting fault such as a dropped table
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                    kind = "busy or unreachable" if isinstance(exc, DatabaseBusy) else "failing"
                    log.warning("database %s (%s): retrying %d reports with backoff", kind, exc, len(batch.reports))
                if final and now - first_failure > STOP_RETRY_S:
                    self.owner.drops.restore(batch.drops)
                    log.error("giving up at shutdown: %d reports and %d events not stored, not acknowledged (%s)",
                              len(batch.reports), len(batch.events), exc)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _salvage(self, batch: history.Batch, exc: BaseException, final: bool) -> bool:
        """A row the database refuses: store every other row on its own, count each one it refuses.

        False if it gave up on a row at shutdown (the database went away meanwhile): nothing is acknowledged.
        """
        log.error("database refused a batch (%s): storing its rows one by one", exc)
        parts = [history.Batch(drops=batch.drops, expired=batch.expired, lost=batch.lost, alerts=batch.alerts)]
        parts += [history.Batch(evicted=[m]) for m in batch.evicted]
        parts += [history.Batch(machines=[m]) for m in batch.machines]
        parts += [history.Batch(events=[e]) for e in batch.events]
        parts += [history.Batch(reports=[row]) for row in batch.reports]
        complete = True
        for part in parts:
            try:
                complete = self._retrying(part, final) and complete
            except DatabaseRefused as row_exc:
                self.owner.drops.add(INTERNAL, _topic_of(part), f"database refused: {row_exc}")
        return complete


def _topic_of(part: history.Batch) -> str:
    """Where a refused row came from, for the drop log."""
    if part.reports:
        return f"fleet/{part.reports[0][0]}/{part.reports[0][1]}/report"
    for machine in part.machines or part.evicted:
        return f"fleet/{machine.org}/{machine.machine_id}"
    for event in part.events:
        return f"fleet/{event.org}/{event.machine_id}"
    return "(counters)"


def start(settings: Settings) -> RunningCollector:
    """Start a collector in background threads (for ``fleet up``); call ``.stop()`` to end it."""
    return RunningCollector(settings).start()


def serve(settings: Settings) -> None:
    """``fleet collector``: run until SIGINT/SIGTERM, then stop cleanly, flushing pending writes."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    collect_garbage_less_often()  # this process is the collector's alone
    collector = start(settings)
    try:
        stop.wait()
    finally:
        collector.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
