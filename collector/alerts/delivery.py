"""The notification outbox's delivery worker: its own threads, so a slow channel never holds up ingest.

The writer thread seals grouped notifications into ``alert_outbox`` rows (collector/alerts/engine.py) and wakes
this worker. One dispatcher thread owns the worker's database connection: it picks the oldest row of
each channel that is due, hands it to a small pool of sender threads (at most MAX_PARALLEL sends at
once, one per channel, so a channel hears of an alert's firing before its resolution), and records
the outcome. Delivered rows are deleted. A failed send is tried again with exponential backoff and full
jitter (``notify.retry_delay``) for up to ``notify.RETRY_FOR_S`` after the row was made, across
restarts since the schedule is in the row; a permanent failure (4xx, bad channel) is not retried.
Each channel's row in ``alert_channels`` keeps its last delivery, last error and failures.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from fleet import notify
from fleet.config.errors import ConfigError
from fleet.config.settings import Settings
from fleet.notify.channels import SEND_TIMEOUT_S, send
from fleet.store import alerting
from fleet.store.database import Database, DatabaseError, open_database
from fleet.store.errors import StoreError
from fleet.store.lease import LeaseLost
from fleet.store.secretbox import SecretBox, secret_box

log = logging.getLogger("fleet.collector.alerts")

MAX_PARALLEL = 4
IDLE_WAIT_S = 1.0
BATCH = 200
BUSY_TIMEOUT_MS = 1000
STOP_WAIT_S = SEND_TIMEOUT_S + 2.0  # a send in flight at stop is waited for, so its outcome is recorded

_DUE = ("SELECT id, org, channel, group_key, notices, created, attempts, next_attempt FROM alert_outbox"
        " WHERE id IN (SELECT min(id) FROM alert_outbox GROUP BY org, channel) ORDER BY next_attempt LIMIT ?")


@dataclass(frozen=True)
class Job:
    """One outbox row being delivered."""

    id: int
    org: str
    channel: str
    group_key: str
    notices: str
    created: float
    attempts: int


@dataclass(frozen=True)
class Outcome:
    """How a send ended: ``error`` None when delivered."""

    job: Job
    count: int
    error: str | None = None
    retryable: bool = False


def notification_id(job: Job) -> str:
    """The id every attempt of an outbox row carries, whichever collector sends it: org, row id, creation time."""
    return f"{job.org}-{job.id}-{int(job.created * 1000)}"


INTERRUPTED = ("interrupted: the collector sending it stopped mid-delivery; not sent again, so that it never"
               " arrives twice")


def interrupted_sends(db: Database, now: float) -> int:
    """Give up the rows a collector that died was sending (the receiver may have them): each is deleted and
    noted on its channel, so the notification is never sent twice. Run as a collector becomes active."""
    rows = db.query("SELECT id, org, channel FROM alert_outbox WHERE sending_since IS NOT NULL")
    for row_id, org, channel in rows:
        with db.transaction():
            db.execute("DELETE FROM alert_outbox WHERE id = ?", (row_id,))
            alerting.record_delivery(db, org, channel, now, INTERRUPTED)
        log.warning("alerts of org %s to channel %s: %s", org, channel, INTERRUPTED)
    return len(rows)


class DeliveryWorker:
    """Delivers the outbox rows of the orgs ``orgs()`` returns; ``start()``, ``wake()`` after new rows, ``stop()``."""

    def __init__(self, settings: Settings, orgs: Callable[[], frozenset[str]],
                 fence: Callable[[Database], None] | None = None) -> None:
        self.settings = settings
        self.orgs = orgs
        self.fence = fence  # the collector's lease: only the active collector sends
        self._interrupted_checked = False  # rows a dead collector was sending: given up once, at the start
        self.delivered = 0
        self.failed = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self._busy: set[tuple[str, str]] = set()
        self._pool = ThreadPoolExecutor(max_workers=MAX_PARALLEL, thread_name_prefix="collector-notify")
        self._thread = threading.Thread(target=self._run, name="collector-delivery", daemon=True)
        self._box: SecretBox | None = None
        self._pending_outcome: Outcome | None = None  # finished, but not yet written (the database was busy)

    def start(self) -> None:
        """Start delivering in the background."""
        self._thread.start()

    def wake(self) -> None:
        """New rows are in the outbox: look now rather than at the next idle check."""
        self._wake.set()

    def stop(self, timeout: float = STOP_WAIT_S) -> None:
        """Stop picking rows; wait for sends in flight and record their outcome."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout + 1)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- dispatcher thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        db: Database | None = None
        try:
            while not self._stop.is_set():
                wait = IDLE_WAIT_S
                try:
                    if db is None:
                        db = open_database(self.settings.database, migrate=False, busy_timeout_ms=BUSY_TIMEOUT_MS)
                        db.fence = self.fence
                    if not self._interrupted_checked:
                        interrupted_sends(db, time.time())
                        self._interrupted_checked = True
                    self._record(db)
                    wait = self._dispatch(db)
                except LeaseLost:
                    log.error("alert delivery stops: this collector is no longer active")
                    break
                except (ConfigError, StoreError) as exc:  # DatabaseError among them: busy, or the server away
                    log.warning("alert delivery: database not available (will retry): %s", exc)
                except Exception:
                    log.exception("alert delivery worker error (continuing)")
                self._wake.wait(max(0.01, wait))
                self._wake.clear()
            deadline = time.monotonic() + STOP_WAIT_S
            while db is not None and self._busy and time.monotonic() < deadline:
                try:
                    self._record(db, self._done.get(timeout=max(0.01, deadline - time.monotonic())))
                except (queue.Empty, DatabaseError, LeaseLost):
                    break
        finally:
            if db is not None:
                db.close()

    def _dispatch(self, db: Database) -> float:
        """Start the due rows (one per channel); return how long to sleep until the next one is due."""
        if len(self._busy) >= MAX_PARALLEL:
            return IDLE_WAIT_S
        if self.fence is not None:
            with db.transaction():  # runs the fence: a collector that lost its lease sends nothing more
                pass
        now = time.time()
        orgs = self.orgs()
        wait = IDLE_WAIT_S
        for row in db.query(_DUE, (BATCH,)):
            job = Job(*row[:7])
            next_attempt = row[7]
            if job.org not in orgs or (job.org, job.channel) in self._busy:
                continue
            if next_attempt > now:
                wait = min(wait, next_attempt - now)
                continue
            if len(self._busy) >= MAX_PARALLEL:
                break
            channel = alerting.load_channel(db, self._secret_box(), job.org, job.channel)
            if channel is None:  # removed since the row was made
                db.execute("DELETE FROM alert_outbox WHERE id = ?", (job.id,))
                continue
            with db.transaction():  # marked first: should this collector die while sending, nobody sends it again
                db.execute("UPDATE alert_outbox SET sending_since = ? WHERE id = ?", (now, job.id))
            self._busy.add((job.org, job.channel))
            future = self._pool.submit(self._send, channel, job)
            future.add_done_callback(self._sent)
        return wait

    def _secret_box(self) -> SecretBox:
        if self._box is None:
            self._box = secret_box(self.settings.data_dir, create=False)
        return self._box

    def _send(self, channel: alerting.Channel, job: Job) -> Outcome:
        """On a pool thread: the network part only."""
        try:
            notices = [notify.Notice(**item) for item in json.loads(job.notices)]
        except (ValueError, TypeError, notify.NotifyError) as exc:
            return Outcome(job, 0, f"unreadable notification: {exc}", retryable=False)
        try:
            send(self.settings, channel, notices, job.group_key, notification_id(job))
        except notify.DeliveryError as exc:
            return Outcome(job, len(notices), str(exc) or type(exc).__name__, exc.retryable)
        except notify.NotifyError as exc:
            return Outcome(job, len(notices), str(exc) or type(exc).__name__, retryable=False)
        except Exception as exc:  # noqa: BLE001 - a sender's bug must not stop the worker; tried again later
            log.exception("alert delivery to %s/%s raised", job.org, job.channel)
            return Outcome(job, len(notices), f"internal error: {type(exc).__name__}", retryable=True)
        return Outcome(job, len(notices))

    def _sent(self, future: Future) -> None:
        if future.cancelled():
            return
        self._done.put(future.result())
        self._wake.set()

    def _record(self, db: Database, first: Outcome | None = None) -> None:
        """Write the outcomes of finished sends. One the database cannot take now waits for the next try, its
        channel still busy, so its row is neither sent again nor lost."""
        outcome = first or self._pending_outcome
        self._pending_outcome = None
        while True:
            if outcome is None:
                try:
                    outcome = self._done.get_nowait()
                except queue.Empty:
                    return
            try:
                self._finish(db, outcome)
            except DatabaseError:
                self._pending_outcome = outcome
                raise
            self._busy.discard((outcome.job.org, outcome.job.channel))
            outcome = None

    def _finish(self, db: Database, outcome: Outcome) -> None:
        """Write a send's outcome: delete a delivered or abandoned row, reschedule a retryable failure."""
        job = outcome.job
        now = time.time()
        attempts = job.attempts + 1
        with db.transaction():
            if outcome.error is None:
                db.execute("DELETE FROM alert_outbox WHERE id = ?", (job.id,))
                alerting.record_delivery(db, job.org, job.channel, now, None)
                self.delivered += 1
                log.info("alerts of org %s delivered to channel %s (%d notice(s), attempt %d)", job.org, job.channel,
                         outcome.count, attempts)
                return
            self.failed += 1
            if outcome.retryable and now - job.created < notify.RETRY_FOR_S:
                delay = notify.retry_delay(attempts)
                db.execute("UPDATE alert_outbox SET attempts = ?, next_attempt = ?, last_error = ?,"
                           " sending_since = NULL WHERE id = ?", (attempts, now + delay, outcome.error[:500], job.id))
                alerting.record_delivery(db, job.org, job.channel, now, outcome.error)
                log.warning("alerts of org %s not delivered to channel %s (attempt %d, retry in %.1f s): %s",
                            job.org, job.channel, attempts, delay, outcome.error)
                return
            why = "gave up after an hour" if outcome.retryable else "not retried"
            db.execute("DELETE FROM alert_outbox WHERE id = ?", (job.id,))
            alerting.record_delivery(db, job.org, job.channel, now, f"{outcome.error} ({why})")
            log.error("alerts of org %s not delivered to channel %s (%s): %s", job.org, job.channel, why,
                      outcome.error)
