"""The collector's database writes: one transaction per batch, and history retention.

Every function takes the writer thread's own connection (``store.database.open_database``); nothing here
is called from the MQTT network thread. The SQL is the same on SQLite and PostgreSQL except the rollup's
minute bucket and "greater of two" (``_ROLLUP_SQL``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from fleet.collector.alerts.engine import AlertWrites
from fleet.collector.state import Machine, Tail, TailStats, Transition
from fleet.config import derived
from fleet.config.payloads import Report
from fleet.store.database import POSTGRESQL, SQLITE, Database
from fleet.store.samples import Sample, SampleIds, extra_fields, write_samples

DAY = 86_400.0
RETENTION_CHUNK_ROWS = 50_000  # roll up and delete at most this many raw reports per transaction


@dataclass
class Batch:
    """Everything one writer transaction stores."""

    reports: list[Sample] = field(default_factory=list)
    machines: list[Machine] = field(default_factory=list)
    evicted: list[Machine] = field(default_factory=list)
    events: list[Transition] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=dict)
    expired: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)  # per org: reports of settled tails that never arrived
    alerts: AlertWrites | None = None

    def __bool__(self) -> bool:
        return bool(self.reports or self.machines or self.evicted or self.events or self.drops or self.expired
                    or self.lost or self.alerts)


def _counter(value: int | float | None) -> int | None:
    # An INTEGER column: a float byte counter is truncated here, so both engines store the same integer
    # (PostgreSQL would round it, or refuse one past 64 bits; SQLite would keep the float).
    if type(value) is float:
        return int(value) if -(2**63) <= value < 2**63 else None
    return value if type(value) is int else None


def report_row(report: Report, received: float) -> Sample:
    """What history keeps of a validated report: its derived chart fields, extra fields and inventory."""
    # The chart columns are the derived fields as alert rules, the API and /metrics read them.
    metrics = report.metrics
    names, values = report_fields(metrics) if "custom" in metrics or "process_counts" in metrics else ((), ())
    return Sample(report.org, report.machine_id, report.session, report.seq, report.ts, received,
                  derived.cpu_percent(metrics), derived.memory_percent(metrics), derived.disk_percent(metrics),
                  derived.load1(metrics), _counter(derived.net_bytes_sent(metrics)),
                  _counter(derived.net_bytes_recv(metrics)), names, values, report.system)


def report_fields(metrics: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[float | int, ...]]:
    """The report's custom series and process counts as history fields: (names, values), both empty when none.

    Named as alert rules name them: ``custom.<series>`` and ``process.<name>`` (validated numbers already).
    """
    custom, counts = metrics.get("custom") or {}, metrics.get("process_counts") or {}
    names = tuple(f"custom.{name}" for name in custom) + tuple(f"process.{name}" for name in counts)
    return names, (*custom.values(), *counts.values())


def _json(value: Mapping[str, Any] | str) -> str:
    # orjson: a machine row's metrics and system are serialised for every report, and json.dumps is the
    # slowest step of that (docs/benchmarks.md); they were decoded by orjson, so orjson can write them back
    # (non-ASCII stays UTF-8, which SQLite's JSON reads).
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _machine_row(machine: Machine, now: float) -> tuple:
    # Serialise once, then keep the text so an unchanged machine is not dumped again.
    machine.system = _json(machine.system)
    machine.metrics = _json(machine.metrics)
    return (machine.hardware_id, machine.status, machine.session, machine.interval_s, machine.last_seen,
            machine.last_ping, machine.clock_offset_s, int(machine.conflict), machine.os, machine.system,
            machine.metrics, machine.first_seen, now, machine.lost, machine.late, machine.tails_json(),
            machine.agent_labels_text, machine.org, machine.machine_id)


MACHINE_KEY = ("org", "machine_id")
MACHINE_COLUMNS = ("hardware_id", "status", "session", "interval_s", "last_seen", "last_ping", "clock_offset_s",
                   "conflict", "os", "system", "metrics", "first_seen", "updated", "lost", "late", "tails",
                   "agent_labels", *MACHINE_KEY)  # the key last, as update_many wants it
UPSERT_MACHINE = (
    "(org, machine_id) DO UPDATE SET hardware_id=excluded.hardware_id, status=excluded.status,"
    " session=excluded.session, interval_s=excluded.interval_s, last_seen=excluded.last_seen,"
    " last_ping=excluded.last_ping, clock_offset_s=excluded.clock_offset_s, conflict=excluded.conflict,"
    " os=excluded.os, system=excluded.system, metrics=excluded.metrics,"
    " first_seen=coalesce(machines.first_seen, excluded.first_seen), updated=excluded.updated,"
    " lost=excluded.lost, late=excluded.late, tails=excluded.tails, agent_labels=excluded.agent_labels"
)


def write_machines(db: Database, machines: list[Machine], now: float) -> None:
    """Write machine rows: on SQLite an UPDATE for machines whose row exists, an upsert for the others.

    With many machines a row is rewritten for nearly every report, and SQLite's upsert builds and probes an
    insert before it updates, which a plain UPDATE does not (docs/benchmarks.md, Many machines).
    ``stored`` is only a hint (a rolled-back batch, or a row deleted by someone else, leaves it wrong): when
    the UPDATE matches fewer rows than it was given, those rows are upserted after all. On PostgreSQL one
    upsert of every row (COPY, then INSERT ... ON CONFLICT DO UPDATE) is cheaper than COPY and UPDATE ... FROM.
    """
    known: list[tuple] = []
    new: list[tuple] = []
    in_place = db.engine == SQLITE
    for machine in machines:
        (known if in_place and machine.stored else new).append(_machine_row(machine, now))
    if known and db.update_many("machines", MACHINE_KEY, MACHINE_COLUMNS, known) < len(known):
        new += known
    if new:
        db.insert_many("machines", MACHINE_COLUMNS, new, UPSERT_MACHINE)
    for machine in machines:
        machine.stored = True


def write_batch(db: Database, batch: Batch, now: float, marker: tuple[str, str] | None = None,
                ids: SampleIds | None = None) -> int:
    """Store a batch in one transaction; returns how many reports were new (replays are ignored).

    ``marker`` (key, value) is written to ``meta`` in the same transaction, so ``committed(db, marker)`` can
    tell afterwards whether a batch whose COMMIT failed midway was stored after all. ``ids`` remembers the
    history ids across batches (the writer keeps one).
    """
    ids = SampleIds() if ids is None else ids
    try:
        inserted = _write_batch(db, batch, now, marker, ids)
    except BaseException:
        ids.rollback()
        raise
    ids.commit()
    return inserted


def _write_batch(db: Database, batch: Batch, now: float, marker: tuple[str, str] | None, ids: SampleIds) -> int:
    inserted = 0
    with db.transaction():
        if marker is not None:
            db.execute("INSERT INTO meta(key, value) VALUES (?, ?)"
                       " ON CONFLICT(key) DO UPDATE SET value = excluded.value", marker)
        if batch.reports:
            inserted = write_samples(db, ids, batch.reports)
        if batch.evicted:
            db.executemany("DELETE FROM machines WHERE org = ? AND machine_id = ?",
                           [(m.org, m.machine_id) for m in batch.evicted])
        if batch.machines:
            write_machines(db, batch.machines, now)
        if batch.events:
            db.executemany(
                "INSERT INTO events(org, machine_id, ts, old_status, new_status, reason) VALUES (?,?,?,?,?,?)",
                [(e.org, e.machine_id, e.ts, e.old_status, e.new_status, e.reason) for e in batch.events])
        # Counters are shared by every collector writing to one database: sorted, so two transactions
        # lock their rows in the same order and never deadlock on PostgreSQL.
        if batch.drops:
            db.executemany(
                "INSERT INTO drops(reason, count) VALUES (?, ?)"
                " ON CONFLICT(reason) DO UPDATE SET count = drops.count + excluded.count", sorted(batch.drops.items()))
        if batch.expired:
            db.executemany(
                "INSERT INTO org_stats(org, expired) VALUES (?, ?)"
                " ON CONFLICT(org) DO UPDATE SET expired = org_stats.expired + excluded.expired",
                sorted(batch.expired.items()))
        if batch.lost:
            db.executemany(
                "INSERT INTO org_stats(org, lost) VALUES (?, ?)"
                " ON CONFLICT(org) DO UPDATE SET lost = org_stats.lost + excluded.lost", sorted(batch.lost.items()))
        if batch.alerts:
            batch.alerts.write(db)
    return inserted


def tail_stats(db: Database, tail: Tail) -> TailStats:
    """What history holds of a tail's session: stored seqs up to ``last_seq``, its highest seq and newest ts."""
    # By the session's id, so the (session, seq) index answers (by machine, every report of it would be read).
    received, max_seq, max_ts = db.query(
        "SELECT sum(CASE WHEN seq <= ? THEN 1 ELSE 0 END), max(seq), max(ts) FROM samples WHERE session ="
        " (SELECT s.id FROM report_sessions s JOIN report_machines m ON m.id = s.machine"
        "  WHERE m.org = ? AND m.machine_id = ? AND s.session = ?)",
        (tail.last_seq, tail.org, tail.machine_id, tail.session))[0]
    before = None
    if max_seq is None and tail.announced_ts is not None:
        before = db.query("SELECT max(ts) FROM samples WHERE machine ="
                          " (SELECT id FROM report_machines WHERE org = ? AND machine_id = ?) AND ts < ?",
                          (tail.org, tail.machine_id, tail.announced_ts))[0][0]
    return TailStats(int(received or 0), None if max_seq is None else int(max_seq), max_ts, before)


def committed(db: Database, marker: tuple[str, str]) -> bool:
    """Was the batch written with ``marker`` committed? (A lost connection can hide a COMMIT that succeeded.)"""
    return db.query_one("SELECT value FROM meta WHERE key = ?", (marker[0],)) == (marker[1],)


def load_machines(db: Database, orgs: Iterable[str] | None) -> list[dict[str, Any]]:
    """Machines-table rows to restore live state from (only ``orgs`` when given)."""
    rows = db.query_dicts("SELECT * FROM machines")
    wanted = None if orgs is None else set(orgs)
    return [row for row in rows if wanted is None or row["org"] in wanted]


_ROLLUP = """
INSERT INTO rollups(org, machine_id, minute, samples, cpu_percent, memory_percent, disk_percent, load1,
                    net_bytes_sent, net_bytes_recv)
SELECT org, machine_id, {minute} AS m, count(*), avg(cpu_percent), avg(memory_percent),
       avg(disk_percent), avg(load1), max(net_bytes_sent), max(net_bytes_recv)
FROM reports WHERE id >= ? AND id < ? AND received < ? GROUP BY org, machine_id, m
ON CONFLICT(org, machine_id, minute) DO UPDATE SET
  cpu_percent = {cpu}, memory_percent = {memory}, disk_percent = {disk}, load1 = {load1},
  net_bytes_sent = {sent}, net_bytes_recv = {recv},
  samples = rollups.samples + excluded.samples
"""


def _weighted(column: str) -> str:
    # Sample-weighted mean of the stored and the new rollup, ignoring a side that has no value.
    return (f"CASE WHEN rollups.{column} IS NULL THEN excluded.{column} WHEN excluded.{column} IS NULL"
            f" THEN rollups.{column} ELSE (rollups.{column} * rollups.samples + excluded.{column} * excluded.samples)"
            f" / (rollups.samples + excluded.samples) END")


def _greater(column: str, engine: str) -> str:
    # The larger of the stored and the new value, ignoring a side that has none (GREATEST skips NULLs).
    if engine == POSTGRESQL:
        return f"GREATEST(rollups.{column}, excluded.{column})"
    return (f"max(coalesce(rollups.{column}, excluded.{column}), coalesce(excluded.{column}, rollups.{column}))")


# ts is never negative (config.payloads), so SQLite's truncating CAST is floor(); PostgreSQL's CAST rounds.
_MINUTE = {SQLITE: "CAST(ts / 60 AS INTEGER) * 60.0", POSTGRESQL: "floor(ts / 60) * 60.0"}
_ROLLUP_SQL = {engine: _ROLLUP.format(minute=_MINUTE[engine], cpu=_weighted("cpu_percent"),
                                      memory=_weighted("memory_percent"), disk=_weighted("disk_percent"),
                                      load1=_weighted("load1"), sent=_greater("net_bytes_sent", engine),
                                      recv=_greater("net_bytes_recv", engine))
               for engine in (SQLITE, POSTGRESQL)}


def _rollup_fields(db: Database, chunk: tuple[int, int, float]) -> None:
    """Fold the extra history fields of a retention chunk's reports into their minutes' rollups.

    Each rollup keeps ``{"field": [sum, samples]}`` per field (a series may be missing from some reports), so
    merging with a rollup already there is exact; history reads the mean. Runs after ``_ROLLUP_SQL``, which
    made every row this updates.
    """
    groups: dict[tuple[str, str, float], dict[str, list[float]]] = {}
    rows = db.query("SELECT org, machine_id, ts, field_names, field_values FROM reports"
                    " WHERE id >= ? AND id < ? AND received < ? AND field_values IS NOT NULL", chunk)
    for org, machine_id, ts, names, values in rows:
        sums = groups.setdefault((org, machine_id, math.floor(ts / 60) * 60.0), {})  # = _MINUTE (ts >= 0)
        for name, value in extra_fields(names, values).items():
            total = sums.setdefault(name, [0.0, 0])
            total[0] += value
            total[1] += 1
    for key, sums in groups.items():
        row = db.query_one("SELECT fields FROM rollups WHERE org = ? AND machine_id = ? AND minute = ?", key)
        merged = json.loads(row[0]) if row and row[0] else {}
        for name, (added, samples) in sums.items():
            old = merged.get(name, [0.0, 0])
            merged[name] = [old[0] + added, old[1] + samples]
        db.execute("UPDATE rollups SET fields = ? WHERE org = ? AND machine_id = ? AND minute = ?",
                   (json.dumps(merged, separators=(",", ":"), ensure_ascii=False), *key))


@dataclass(frozen=True)
class RetentionResult:
    """What one retention run removed."""

    reports_rolled_up: int
    rollups_deleted: int
    events_deleted: int
    alerts_deleted: int = 0
    ids_deleted: int = 0  # sessions and machines no stored report names any more
    audit_deleted: int = 0


# A session stays while a report names it, or while it is its machine's current one (the writer may be about
# to store its first report).
_UNUSED_SESSIONS = """
DELETE FROM report_sessions WHERE NOT EXISTS (SELECT 1 FROM samples WHERE samples.session = report_sessions.id)
AND NOT EXISTS (SELECT 1 FROM report_machines k JOIN machines m ON m.org = k.org AND m.machine_id = k.machine_id
                WHERE k.id = report_sessions.machine AND m.session = report_sessions.session)
"""
# Inventory is kept as long as rollups, and a machine's newest one as long as it has history.
_OLD_INVENTORY = """
DELETE FROM inventory WHERE received < ? AND (
    EXISTS (SELECT 1 FROM inventory newer WHERE newer.machine = inventory.machine AND newer.ts > inventory.ts)
    OR NOT EXISTS (SELECT 1 FROM report_sessions WHERE report_sessions.machine = inventory.machine))
"""
_UNUSED_MACHINES = """
DELETE FROM report_machines WHERE NOT EXISTS (SELECT 1 FROM report_sessions WHERE machine = report_machines.id)
AND NOT EXISTS (SELECT 1 FROM inventory WHERE machine = report_machines.id)
"""


def apply_retention(db: Database, now: float, raw_days: float, rollup_days: float) -> RetentionResult:
    """Fold raw reports older than ``raw_days`` into 1-minute rollups; drop rollups, events and audit entries past
    ``rollup_days``.

    Reports go oldest first by id, which follows the order they were received in. Several collectors may run
    this at once on one database. Two runs over one chunk would add its samples to the rollups twice, so a
    chunk is only rolled up by the transaction that holds the retention lock; a collector that finds it taken
    leaves the work to the one that has it.
    """
    raw_cutoff = now - raw_days * DAY
    rolled = 0
    rollup = _ROLLUP_SQL[db.engine]
    while True:
        oldest = db.query("SELECT min(id) FROM samples")[0][0]
        if oldest is None:
            break
        # Small chunks keep each write transaction short, so readers and the batch writer never wait long.
        chunk = (oldest, oldest + RETENTION_CHUNK_ROWS, raw_cutoff)
        with db.transaction():
            if not db.try_lock("retention"):
                return RetentionResult(rolled, 0, 0)
            db.execute(rollup, chunk)
            _rollup_fields(db, chunk)
            deleted = db.execute("DELETE FROM samples WHERE id >= ? AND id < ? AND received < ?", chunk)
        rolled += deleted
        if not deleted:  # the oldest report is younger than the cutoff
            break
    keep_cutoff = now - rollup_days * DAY
    with db.transaction():
        sessions = db.execute(_UNUSED_SESSIONS) if rolled else 0
        inventory = db.execute(_OLD_INVENTORY, (keep_cutoff,))
        machines = db.execute(_UNUSED_MACHINES) if sessions or inventory else 0
        rollups = db.execute("DELETE FROM rollups WHERE minute < ?", (keep_cutoff,))
        events = db.execute("DELETE FROM events WHERE ts < ?", (keep_cutoff,))
        audit = db.execute("DELETE FROM audit_log WHERE ts < ?", (keep_cutoff,))  # as long as the events
        # Resolved alerts are history like raw reports; one the channels still must hear of stays.
        alerts = db.execute("DELETE FROM alerts WHERE state = 'resolved' AND resolved_at < ? AND notified = state",
                            (raw_cutoff,))
    return RetentionResult(rolled, rollups, events, alerts, sessions + machines, audit)
