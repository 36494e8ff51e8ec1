"""The collector's writer thread: it owns live state and the database connection.

It takes batches from the hand-off (collector.handoff), applies the state machine (collector.state) and the
alert engine, stores each batch in one transaction (collector.history) and only then acknowledges it; it also
runs the timers: stale/TTL checks, heartbeat, org refresh and history retention. On SQLite a thread of its
own checkpoints the WAL and keeps it bounded (Checkpointer).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleet.collector import history
from fleet.collector.alerts.engine import AlertEngine
from fleet.collector.errors import CollectorError
from fleet.collector.handoff import Handoff
from fleet.collector.intake import BAD_LABELS, INTERNAL, UNKNOWN_ORG, DropCounter, Received
from fleet.collector.mqtt_link import MqttLink
from fleet.collector.shared import CollectorStats, LinkState, ServedOrgs, WriteCounts
from fleet.collector.state import Tracker, Transition
from fleet.config.payloads import Report, report_labels
from fleet.config.settings import Settings
from fleet.config.status import (
    BROKER_CONNECTED,
    COLLECTOR,
    DATA_DISK_PERCENT,
    DISK_FULL_PERCENT,
    MACHINE_STATUSES,
)
from fleet.config.topics import ping_topic
from fleet.store import wal
from fleet.store.database import (
    SQLITE,
    Database,
    DatabaseBusy,
    DatabaseError,
    DatabaseRefused,
    DatabaseUrl,
    open_database,
)
from fleet.store.forgotten import forgets_done, pending_forgets
from fleet.store.heartbeats import write_heartbeat
from fleet.store.identity import all_cert_not_after
from fleet.store.labels import labels_version, server_labels
from fleet.store.lease import LeaseLost
from fleet.store.orgs import list_orgs
from fleet.store.samples import SampleIds

log = logging.getLogger("fleet.collector")

HEARTBEAT_EVERY_S = 2.0
RETENTION_EVERY_S = 60.0
ORG_REFRESH_MAX_S = 2.0
# A forgotten machine's retained ping may already be on its way when the collector clears it (at start, when it
# subscribes): retained pings of machines forgotten this recently are ignored until the machine speaks again.
FORGOTTEN_HOLD_S = 600.0
MAX_FORGOTTEN = 10_000
STARTUP_GRACE_S = 30.0  # without a broker, start stale/TTL checks after this long anyway
WRITER_BUSY_TIMEOUT_MS = 1000
STOP_RETRY_S = 10.0
CHECKPOINT_EVERY_S = 1.0  # a PASSIVE pass at least this often
WAL_CHECK_EVERY_S = 0.1  # the WAL's size is looked at this often: ~4 MB of commits at 2,000 reports/s
MAX_LABELS_LOGGED = 100_000  # machines remembered as logged for dropped labels; then forgotten and logged again
WRITER_RESET_BYTES = 2 * wal.WAL_RESET_BYTES  # past this the writer resets the log itself, between batches


@dataclass(frozen=True)
class WriterPeers:
    """What the writer thread shares with the collector's other threads: nothing else crosses between them."""

    handoff: Handoff  # messages from the network thread
    link: MqttLink | None  # acknowledgements and publishes, queued from any thread
    link_state: LinkState  # written by the network thread
    orgs: ServedOrgs  # replaced by the writer; stats() and the delivery worker read it
    counts: WriteCounts  # counted by the writer; stats() reads it
    drops: DropCounter  # counted by both threads (it locks)
    stats: Callable[[], CollectorStats]  # the collector's counters, for the heartbeat
    wake_delivery: Callable[[], None]  # the alert outbox has new rows
    fence: Callable[[Database], None] | None = None  # first in every write transaction: the lease is still ours
    lease_lost: Callable[[], bool] = lambda: False  # the lease is gone: stop writing, retry nothing


class WriterThread:
    """The writer thread: opens its own connection, restores live state, then runs a Writer until the last batch."""

    def __init__(self, settings: Settings, client_id: str, tracker: Tracker, alerts: AlertEngine,
                 peers: WriterPeers) -> None:
        self.settings = settings
        self.client_id = client_id
        self.tracker = tracker
        self.alerts = alerts
        self.peers = peers
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="collector-writer", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        """Start the thread; return once state is restored, or raise CollectorError."""
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise CollectorError(f"collector writer failed to start: {self._error}")

    def is_alive(self) -> bool:
        """Whether the thread still runs."""
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        """Wait for the thread to end (after the hand-off is closed)."""
        self._thread.join(timeout)

    def _main(self) -> None:
        db: Database | None = None
        try:
            db = open_database(self.settings.database, busy_timeout_ms=WRITER_BUSY_TIMEOUT_MS)
            db.fence = self.peers.fence
            if db.engine == SQLITE:
                # Checkpoints (copying the WAL into fleet.db, with an fsync) run on a thread of their own, so a
                # commit never waits for one: the broker sends no more than its in-flight window until we ack.
                db.execute("PRAGMA wal_autocheckpoint=0")
            orgs = self.peers.orgs.get()
            self.tracker.set_server_labels(server_labels(db))
            self.tracker.load(history.load_machines(db, orgs if self.settings.orgs else None), time.time())
            self.alerts.load(db, orgs, time.time())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            if db is not None:
                db.close()
            self.peers.handoff.writer_stopped()
            self._ready.set()
            return
        self._ready.set()
        checkpointer = Checkpointer(self.settings.database) if db.engine == SQLITE else None
        if checkpointer is not None:
            checkpointer.start()
        try:
            Writer(self.settings, self.client_id, db, self.tracker, self.alerts, self.peers, checkpointer).run()
        except BaseException:
            log.exception("collector writer thread crashed")
            raise
        finally:
            self.peers.handoff.writer_stopped()
            if checkpointer is not None:
                checkpointer.stop(STOP_RETRY_S)
            db.close()


class Checkpointer:
    """The WAL checkpointer (SQLite): its own thread and connection, so a commit never waits for a checkpoint.

    It looks at the WAL's size every WAL_CHECK_EVERY_S and checkpoints every CHECKPOINT_EVERY_S, or at once
    when the file is past WAL_RESET_BYTES; then the log is emptied (store/wal.py). A reset waits for the
    writer and readers CHECKPOINT_BUSY_TIMEOUT_MS, twice that after one was held off, up to
    CHECKPOINT_BUSY_MAX_MS: under WRITER_BUSY_TIMEOUT_MS, so a commit waiting behind a reset is never failed.
    When resets were held off and the log is past WRITER_RESET_BYTES, the writer resets it between two batches
    (``reset_from_writer``): then nobody holds the write lock, so only readers can hold the reset off, and
    the log does not grow while they do. The counts are read by the heartbeat.
    """

    def __init__(self, database: str) -> None:
        self.database = database
        self.resets = 0  # the log emptied
        self.resets_busy = 0  # a reset the writer or a reader held off past the busy timeout
        self.resets_by_writer = 0  # of resets: done by the writer between batches
        self.wait_ms = wal.CHECKPOINT_BUSY_TIMEOUT_MS  # the next reset's
        path = DatabaseUrl.parse(database).path
        assert path is not None, "a checkpointer is for SQLite"
        self.wal_path = wal.wal_file(path)
        self._lock = threading.Lock()  # one checkpoint at a time: SQLite refuses a second one at once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="collector-checkpoint", daemon=True)

    def start(self) -> None:
        """Start checkpointing."""
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop after a last checkpoint that empties the log, so the last connection to close has nothing to copy."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            db = open_database(self.database, migrate=False, busy_timeout_ms=wal.CHECKPOINT_BUSY_TIMEOUT_MS)
        except DatabaseError as exc:
            log.error("collector checkpoints disabled: %s", exc)
            return
        due = 0.0
        try:
            while not self._stop.wait(WAL_CHECK_EVERY_S):
                if time.monotonic() < due and wal.file_bytes(self.wal_path) <= wal.WAL_RESET_BYTES:
                    continue
                due = time.monotonic() + CHECKPOINT_EVERY_S
                self.checkpoint(db, wal.WAL_RESET_BYTES)
            self.checkpoint(db, 0)
        finally:
            db.close()

    def reset_from_writer(self, db: Database) -> None:
        """On the writer's thread between batches (``db`` is its connection): reset a log past WRITER_RESET_BYTES.

        Skipped while the checkpointer's thread is at it: waiting for it would hold the commit path longer.
        """
        if wal.file_bytes(self.wal_path) <= WRITER_RESET_BYTES or not self._lock.acquire(blocking=False):
            return
        try:
            if self._checkpoint(db, wal.WAL_RESET_BYTES):
                self.resets_by_writer += 1
        finally:
            self._lock.release()

    def checkpoint(self, db: Database, reset_bytes: int) -> None:
        """One checkpoint on ``db``, emptying the log past ``reset_bytes``: counted, and logged when held off."""
        with self._lock:
            self._checkpoint(db, reset_bytes)

    def _checkpoint(self, db: Database, reset_bytes: int) -> bool:
        try:
            done = wal.checkpoint(db, reset_bytes, self.wait_ms)
        except DatabaseError as exc:
            log.warning("WAL checkpoint failed (will retry): %s", exc)
            return False
        if done.reset:
            self.resets += 1
            self.wait_ms = wal.CHECKPOINT_BUSY_TIMEOUT_MS
        elif done.reset is False:
            self.resets_busy += 1
            log.warning("WAL reset held off by the writer or a reader past %d ms (WAL %.1f MB; %d so far)",
                        self.wait_ms, done.wal_bytes / 2**20, self.resets_busy)
            self.wait_ms = min(2 * self.wait_ms, wal.CHECKPOINT_BUSY_MAX_MS)
        return bool(done.reset)


class Writer:
    """The writer thread's loop: batch, apply state, store, and run the timers."""

    def __init__(self, settings: Settings, client_id: str, db: Database, tracker: Tracker,
                 alerts: AlertEngine, peers: WriterPeers, checkpointer: Checkpointer | None = None) -> None:
        self.settings = settings
        self.client_id = client_id
        self.db = db
        self.tracker = tracker
        self.alerts = alerts
        self.peers = peers
        self.checkpointer = checkpointer
        self.disk_full = False  # the data dir's file system was over DISK_FULL_PERCENT at the last heartbeat
        self.batch = history.Batch()
        self.sample_ids = SampleIds()
        now = time.monotonic()
        self.tick_every = min(1.0, settings.ttl_seconds / 4)
        self.org_every = min(settings.reload_interval_s, ORG_REFRESH_MAX_S)
        self.next_tick = now
        self.next_heartbeat = now
        self.next_orgs = now  # at the first batch: a forget made while no collector ran applies before its flush
        self.next_retention = now
        self.next_settle = now
        self.pending_clears: list[str] = []
        self.pending_acks: list[int] = []  # acknowledged once the batch holding them is written
        self.orgs_read_for_batch = False
        self.orgs_read_ok = True
        # A connection lost during COMMIT (PostgreSQL) leaves unknown whether the batch was stored, and a retry
        # would store its events and counters twice: each batch also writes this collector's marker (one row).
        self.marker_key = f"collector_batch:{client_id}"
        self.marker_prefix = os.urandom(6).hex()  # this process's, so a marker left by an earlier one never matches
        self.batches = 0
        self.labels_logged: set[tuple[str, str]] = set()  # machines whose dropped labels were logged
        self.labels_version = ""
        self.forgotten: dict[tuple[str, str], float] = {}  # (org, machine) -> when forgotten (monotonic)

    def run(self) -> None:
        """Loop until the hand-off is closed and empty; the last flush writes everything pending."""
        peers = self.peers
        orgs = peers.orgs
        while True:
            items, done = peers.handoff.take(self.settings.batch_interval_s)
            self.orgs_read_for_batch = False
            for item, ack in items:
                if item.message.org in orgs or self._org_appeared(item.message.org):
                    self._apply(item)
                else:
                    peers.drops.add(UNKNOWN_ORG, f"fleet/{item.message.org}/{item.message.machine_id}", "no such org")
                self.pending_acks.append(ack)
            try:
                if self.checkpointer is not None:
                    self.checkpointer.reset_from_writer(self.db)
                self._timers(final=done)
                self._flush(final=done)
                if not done and peers.link_state.is_subscribed():
                    self._settle_tails()
                if done or time.monotonic() >= self.next_heartbeat:
                    self.next_heartbeat = time.monotonic() + HEARTBEAT_EVERY_S
                    self._heartbeat(final=done)
            except LeaseLost as exc:
                # Another collector is active: nothing of this batch is acknowledged, the broker sends it there.
                log.error("collector writer stops: %s (%d messages left unacknowledged)", exc, len(self.pending_acks))
                self.pending_acks = []
                return
            except Exception:
                log.exception("collector writer error (continuing)")
                peers.drops.add(INTERNAL, "(writer)", "timer or flush failed")
                time.sleep(min(1.0, self.settings.batch_interval_s))
            if done:
                return

    def _apply(self, item: Received) -> None:
        try:
            message = item.message
            if self.forgotten and self._stale_after_forget(item):
                return
            if isinstance(message, Report):
                labels, problem = self._labels_of(message)
                if problem is not None:
                    self._labels_dropped(message, problem)
                transitions = self.tracker.on_report(message, item.received, None if problem else labels)
                self.batch.reports.append(history.report_row(message, item.received))
            else:
                transitions = self.tracker.on_ping(message, item.received, item.retained)
            self._record(transitions)
            machine = self.tracker.get(message.org, message.machine_id)
            if machine is not None:
                self.alerts.evaluate(machine, item.received, metrics_changed=isinstance(message, Report))
        except Exception as exc:
            self.peers.drops.add(INTERNAL, f"fleet/{item.message.org}/{item.message.machine_id}",
                                 f"{type(exc).__name__}: {exc}")
            log.exception("internal error applying a message of %s/%s", item.message.org, item.message.machine_id)

    def _stale_after_forget(self, item: Received) -> bool:
        """True for a retained ping of a machine forgotten lately (its state before the forget); anything else
        the machine sends ends the hold: it is back."""
        key = (item.message.org, item.message.machine_id)
        if key not in self.forgotten:
            return False
        if item.retained and not isinstance(item.message, Report):
            return True
        del self.forgotten[key]
        return False

    def _labels_of(self, report: Report) -> tuple[dict[str, str], str | None]:
        """The report's labels, or why they are dropped; the machine's current labels again are not re-checked."""
        machine = self.tracker.get(report.org, report.machine_id)
        raw = report.data.get("labels")
        if machine is not None and type(raw) is dict and raw == machine.agent_labels:
            return machine.agent_labels, None  # nearly every report: the labels it sent last time
        return report_labels(report)

    def _labels_dropped(self, report: Report, problem: str) -> None:
        """Count a report's dropped labels; log the first time per machine (a bad config repeats every report)."""
        self.peers.drops.add_quietly(BAD_LABELS)
        key = (report.org, report.machine_id)
        if key not in self.labels_logged:
            if len(self.labels_logged) >= MAX_LABELS_LOGGED:
                self.labels_logged.clear()
            self.labels_logged.add(key)
            log.warning("machine %s/%s: report kept, its labels dropped: %s", report.org, report.machine_id,
                        problem[:200])

    def _refresh_server_labels(self) -> None:
        """Reload the server labels when ``fleet machine label`` changed any."""
        version = labels_version(self.db)
        if version != self.labels_version:
            self.tracker.set_server_labels(server_labels(self.db))
            self.labels_version = version

    def _record(self, transitions: list[Transition]) -> None:
        for t in transitions:
            self.batch.events.append(t)
            log.info("machine %s/%s: %s -> %s (%s)", t.org, t.machine_id, t.old_status or "new", t.new_status,
                     t.reason)

    def _timers(self, final: bool) -> None:
        link_state = self.peers.link_state
        now_m = time.monotonic()
        if now_m >= self.next_tick and not final:
            self.next_tick = now_m + self.tick_every
            # Until the first subscription is acknowledged we have not heard the backlog yet:
            # judging silence before that would flap every machine to stale and back.
            if link_state.is_subscribed() or now_m - link_state.started > STARTUP_GRACE_S:
                self.tick(time.time())
        if now_m >= self.next_orgs and not final:
            self.next_orgs = now_m + self.org_every
            self._refresh_orgs()
        if not final:
            self.alerts.timers(self.db, self.peers.orgs.get(), time.time())
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
        return org in self.peers.orgs or not self.orgs_read_ok

    def _refresh_orgs(self) -> bool:
        orgs = self.peers.orgs
        try:
            wanted = orgs.wanted(list_orgs(self.db))
        except DatabaseError as exc:
            log.warning("cannot read orgs (will retry): %s", exc)
            return False
        served = orgs.get()
        if wanted != served:
            for org in sorted(served - wanted):
                self.tracker.forget_org(org)
                self.alerts.forget_org(org)
                log.info("collector no longer serves org %s", org)
            for org in sorted(wanted - served):
                log.info("collector serves org %s", org)
            orgs.replace(wanted)
        self._refresh_certificates()
        try:
            self._refresh_server_labels()
        except DatabaseError as exc:
            log.warning("cannot read server labels (will retry): %s", exc)
        self._apply_forgets()
        return True

    def _apply_forgets(self) -> None:
        """Drop the machines an admin forgot since the last refresh: alerts resolved, retained ping cleared."""
        try:
            pending = pending_forgets(self.db, self.peers.orgs.get())
        except DatabaseError as exc:
            log.warning("cannot read forgotten machines (will retry): %s", exc)
            return
        if not pending:
            return
        now = time.time()
        held_since = time.monotonic()
        for key, since in list(self.forgotten.items()):
            if held_since - since > FORGOTTEN_HOLD_S or len(self.forgotten) > MAX_FORGOTTEN:
                del self.forgotten[key]
        for _, org, machine_id in pending:
            self.forgotten[(org, machine_id)] = held_since
            transitions, machine = self.tracker.forget(org, machine_id, now)
            self._record(transitions)
            if machine is not None:
                self.alerts.on_evicted(machine, now)
                self.batch.evicted.append(machine)
            self.pending_clears.append(ping_topic(org, machine_id))
        try:
            forgets_done(self.db, [row_id for row_id, _, _ in pending])
        except DatabaseError as exc:
            log.warning("cannot delete the applied forgets (they will be applied again): %s", exc)

    def _refresh_certificates(self) -> None:
        """Each machine's certificate end, for rules on cert_days_left."""
        try:
            ends = all_cert_not_after(self.db)
        except DatabaseError as exc:
            log.warning("cannot read machine certificates (will retry): %s", exc)
            return
        for key, machine in self.tracker.machines.items():
            machine.cert_not_after = ends.get(key)

    def _retention(self) -> None:
        try:
            result = history.apply_retention(self.db, time.time(), self.settings.history_raw_days,
                                           self.settings.history_rollup_days)
        except DatabaseError as exc:
            log.warning("history retention failed (will retry): %s", exc)
            return
        if result.ids_deleted:
            self.sample_ids.forget()
        if result.reports_rolled_up or result.rollups_deleted or result.events_deleted or result.audit_deleted:
            log.info("retention: %d reports rolled up, %d rollups, %d events and %d audit entries deleted",
                     result.reports_rolled_up, result.rollups_deleted, result.events_deleted, result.audit_deleted)

    def _heartbeat(self, final: bool) -> None:
        stats = self.peers.stats()
        machines = dict.fromkeys(MACHINE_STATUSES, 0)
        for machine in self.tracker.machines.values():
            machines[machine.status] = machines.get(machine.status, 0) + 1
        self.peers.counts.summary = {"orgs": len(stats.orgs), "machines": machines,
                                     "alerts_firing": self.alerts.firing_count()}
        detail = {BROKER_CONNECTED: stats.broker_connected and not final, "orgs": list(stats.orgs),
                  "received": stats.received, "stored": stats.stored, "dropped": stats.dropped,
                  "queued": stats.queued, "machines": stats.machines, "client_id": self.client_id,
                  "instance": self.settings.instance_name,
                  "alerts_firing": self.alerts.firing_count(),
                  DATA_DISK_PERCENT: self._watch_disk()}
        if self.checkpointer is not None:
            detail["wal_resets"] = self.checkpointer.resets
            detail["wal_resets_busy"] = self.checkpointer.resets_busy
            detail["wal_resets_by_writer"] = self.checkpointer.resets_by_writer
        try:
            with self.db.transaction():  # fenced: only the active collector speaks for the collector
                write_heartbeat(self.db, COLLECTOR, time.time(), detail)
            self.peers.counts.last_write = time.monotonic()
        except DatabaseError as exc:
            log.warning("cannot write the collector heartbeat: %s", exc)

    def _watch_disk(self) -> float | None:
        """How full the data dir's file system is; logs once when it goes over DISK_FULL_PERCENT, once when back."""
        percent = data_disk_percent(self.settings.data_dir)
        if percent is None:
            return None
        full = percent > DISK_FULL_PERCENT
        if full and not self.disk_full:
            log.warning("the file system holding %s is %.1f%% full (over %g%%): fleet.db and its WAL need room to grow",
                        self.settings.data_dir, percent, DISK_FULL_PERCENT)
        elif self.disk_full and not full:
            log.info("the file system holding %s is %.1f%% full again (under %g%%)", self.settings.data_dir, percent,
                     DISK_FULL_PERCENT)
        self.disk_full = full
        return percent

    def _flush(self, final: bool) -> None:
        batch = self.batch
        batch.drops = self.peers.drops.take_unsaved()
        batch.machines = self.tracker.take_dirty()
        batch.alerts = self.alerts.take_writes()
        if batch and not self.write(batch, final):
            self.pending_acks = []  # not stored: leave them unacknowledged, the broker will send them again
        self.batch = history.Batch()
        link = self.peers.link
        if link is not None and self.pending_acks:
            link.ack(self.pending_acks)
        self.pending_acks = []
        for topic in self.pending_clears:
            if link is not None:
                # QoS 1: the link keeps it while disconnected and sends it on reconnect.
                link.publish(topic, b"", retain=True)
                log.info("machine %s evicted: retained ping cleared", topic)
        self.pending_clears = []
        for topic, payload in self.alerts.take_publishes():
            if link is not None:
                link.publish(topic, payload, retain=True)
        if self.alerts.outbox_added:
            self.alerts.outbox_added = False
            self.peers.wake_delivery()

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
        counts = self.peers.counts
        delay = 0.05
        first_failure = None
        self.batches += 1
        marker = (self.marker_key, f"{self.marker_prefix}:{self.batches}")
        while True:
            try:
                if first_failure is not None and history.committed(self.db, marker):
                    log.info("the batch whose commit was cut off had been stored: not writing it again")
                    counts.stored += len(batch.reports)
                    return True
                counts.stored += history.write_batch(self.db, batch, time.time(), marker, self.sample_ids)
                counts.commits += 1
                counts.last_write = time.monotonic()
                return True
            except DatabaseRefused:
                raise
            except DatabaseError as exc:  # DatabaseBusy, or a lasting fault such as a dropped table
                if self.peers.lease_lost():
                    raise LeaseLost(f"lease lost while the database was failing ({exc})") from exc
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                    kind = "busy or unreachable" if isinstance(exc, DatabaseBusy) else "failing"
                    log.warning("database %s (%s): retrying %d reports with backoff", kind, exc, len(batch.reports))
                if final and now - first_failure > STOP_RETRY_S:
                    self.peers.drops.restore(batch.drops)
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
                self.peers.drops.add(INTERNAL, _topic_of(part), f"database refused: {row_exc}")
        return complete


def data_disk_percent(path: Path) -> float | None:
    """How full the file system holding ``path`` is, in percent as ``df`` shows it (None when it cannot tell)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    # used / (used + what an unprivileged writer may still use): the root-reserved blocks count as full.
    room = usage.used + usage.free
    return round(usage.used / room * 100, 1) if room else None


def _topic_of(part: history.Batch) -> str:
    """Where a refused row came from, for the drop log."""
    if part.reports:
        return f"fleet/{part.reports[0].org}/{part.reports[0].machine_id}/report"
    for machine in part.machines or part.evicted:
        return f"fleet/{machine.org}/{machine.machine_id}"
    for event in part.events:
        return f"fleet/{event.org}/{event.machine_id}"
    return "(counters)"
