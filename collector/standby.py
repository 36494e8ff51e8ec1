"""The collector's lease keeper: it waits for its shard's lease, renews it while active, and says when it is lost.

Any number of collectors may serve one shard; the one holding the lease (store.lease) is active, the others
wait and never connect to the broker (the active one's client id would kick it). The keeper runs on its own
thread with its own database connection. While it waits it polls every ``POLL_S``; once it holds the lease
it renews it every lease/RENEW_PARTS seconds. The lease is lost when a renewal finds it taken over or
expired, or when no renewal has succeeded for a whole lease (the database is away): from the moment the
collector itself would no longer count as the holder, ``lost`` is set and its writes fail their fence.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from fleet.config.settings import Settings
from fleet.store import lease as leases
from fleet.store.database import Database, open_database
from fleet.store.errors import StoreError

log = logging.getLogger("fleet.collector")

POLL_S = 1.0
RENEW_PARTS = 4  # renewals per lease: three may fail before it expires
SEEN_EVERY_S = 5.0
BUSY_TIMEOUT_MS = 1000


class LeaseKeeper:
    """Holds (or waits for) one shard's lease for this collector; see the module docstring."""

    def __init__(self, settings: Settings, shard: str) -> None:
        self.settings = settings
        self.shard = shard
        self.instance = settings.instance_name
        self.lease_s = settings.collector_lease_s
        self.on_lost: Callable[[], None] = lambda: None
        self._lease: leases.Lease | None = None
        self._valid_until = 0.0  # monotonic: past it the lease may have been taken over
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._held = threading.Event()
        self._db: Database | None = None
        self._next_seen = 0.0
        self._thread: threading.Thread | None = None
        self._logged_holder: str | None = None
        self._db_failing = False

    # --- any thread ---------------------------------------------------------------------------
    @property
    def lease(self) -> leases.Lease | None:
        """The lease held now (None while waiting or after it was lost)."""
        return self._lease

    def lost(self) -> bool:
        """Whether a lease this keeper held was lost (it stays lost: a new keeper waits again)."""
        if self._lease is not None and not self._lost.is_set() and time.monotonic() > self._valid_until:
            self._mark_lost("no renewal for a whole lease")
        return self._lost.is_set()

    def fence(self, db: Database) -> None:
        """The first statement of each of the collector's write transactions (store.lease.fence)."""
        held = self._lease
        if held is None or self.lost():
            raise leases.LeaseLost(f"collector {self.instance} no longer holds the lease of {self.shard}")
        leases.fence(db, held)

    def wait(self, stop: threading.Event | None = None, timeout: float | None = None) -> bool:
        """Block until this collector holds the lease (True), or ``stop`` is set or ``timeout`` passes (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._held.is_set():
            if (stop is not None and stop.is_set()) or self._stop.is_set():
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="collector-lease", daemon=True)
                self._thread.start()
            self._held.wait(0.1)
        return True

    def close(self) -> None:
        """Stop the keeper; a lease still held is released so a waiting collector takes over at once."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(self.lease_s)
        db, held = self._db, self._lease
        self._db = None
        if db is None:
            return
        try:
            if held is not None and not self._lost.is_set():
                leases.release(db, held)
                log.info("collector %s released the lease of %s", self.instance, self.shard)
            leases.forget(db, self.instance)
        except StoreError as exc:
            log.warning("collector %s could not release its lease (it expires in %g s): %s", self.instance,
                        self.lease_s, exc)
        finally:
            db.close()

    # --- keeper thread ------------------------------------------------------------------------
    def _mark_lost(self, why: str) -> None:
        if self._lost.is_set():
            return
        self._lost.set()
        log.error("collector %s lost the lease of %s (%s): it stops writing now", self.instance, self.shard, why)
        self.on_lost()

    def _run(self) -> None:
        while not self._stop.is_set() and not self._lost.is_set():
            started = time.monotonic()
            try:
                if self._db is None:
                    # close() releases the lease from another thread, once this one has ended.
                    self._db = open_database(self.settings.database, check_same_thread=False, migrate=False,
                                             busy_timeout_ms=BUSY_TIMEOUT_MS)
                if self._lease is None:
                    self._try_acquire(self._db, started)
                else:
                    self._renew(self._db, started)
                if self._db_failing:
                    self._db_failing = False
                    log.info("collector %s reaches the database again", self.instance)
            except StoreError as exc:
                if self._lease is None:
                    if not self._db_failing:  # once per outage: a waiting collector polls every second
                        log.warning("collector %s cannot reach the database to wait for the lease: %s",
                                    self.instance, exc)
                    self._db_failing = True
                else:
                    log.warning("collector %s cannot renew its lease: %s", self.instance, exc)
                    self.lost()
                if self._db is not None and self._db.engine != "sqlite":
                    self._db.close()
                    self._db = None
            every = POLL_S if self._lease is None else self.lease_s / RENEW_PARTS
            self._stop.wait(max(0.05, every - (time.monotonic() - started)))

    def _try_acquire(self, db: Database, started: float) -> None:
        if started >= self._next_seen:
            self._next_seen = started + SEEN_EVERY_S
            leases.seen(db, self.instance, self.shard)
        held = leases.acquire(db, self.shard, self.instance, self.lease_s)
        if held is None:
            holder = db.query_one("SELECT holder FROM collector_lease WHERE shard = ?", (self.shard,))
            name = str(holder[0]) if holder else "?"
            if name != self._logged_holder:
                self._logged_holder = name
                log.info("collector %s waits: %s is active for %s", self.instance, name, self.shard)
            return
        leases.seen(db, self.instance, self.shard)
        self._valid_until = started + self.lease_s
        self._lease = held
        log.info("collector %s is active for %s (lease epoch %d)", self.instance, self.shard, held.epoch)
        self._held.set()

    def _renew(self, db: Database, started: float) -> None:
        held = self._lease
        assert held is not None
        if not leases.renew(db, held, self.lease_s):
            self._mark_lost("another collector took it over, or it expired")
            return
        if started >= self._next_seen:
            self._next_seen = started + SEEN_EVERY_S
            leases.seen(db, self.instance, self.shard)
        self._valid_until = started + self.lease_s
