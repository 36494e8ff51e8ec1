"""The collector's live view of each machine: the online/stale/offline/evicted state machine.

Pure logic with an injected clock: every method takes ``now`` (receive time, Unix seconds), so
tests drive it without a broker or real waiting. The collector's writer thread is its only user.

Rules (docs/protocol.md, "Collector state"):
- a report or ping from a session never seen before makes that session current;
- an ``offline`` ping counts only for the current session (a late last will is ignored);
- messages of an earlier session (agent replays) go to history but never change the status;
- ``stale`` when an online machine is silent past ``stale_factor * interval_s``;
- evicted when silent past ``ttl_seconds``: removed from the live view.

Tail accounting (docs/collector.md): an ``online`` ping naming ``prev_session``/``prev_seq`` opens a check
of that session, settled ``lost_grace_s`` later (replays from the agent's outbox may still be arriving)
from what history holds of it then (``settle_tail``). Its count of missing reports is final: a report of
that session arriving later is counted in ``late`` and lost is never decremented (it is a counter).
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from fleet.config.labels import diff, labels_json, merge
from fleet.config.payloads import Ping, Report
from fleet.config.status import EVICTED, OFFLINE, ONLINE, STALE
from fleet.config.status import MACHINE_STATUSES as STATUSES
from fleet.store.labels import agent_labels, label_event_reason

OFFSET_WINDOW = 5  # clock offset = min over this many recent messages (delay only adds)
PAST_SESSIONS = 16  # earlier sessions remembered per machine, to recognise late messages
LOAD_TS_MARGIN_S = 2.0
MAX_PENDING_TAILS = 16  # open tail checks per machine; an agent reconnecting faster than the grace loses the oldest
NO_TAILS = '{"pending":[],"settled":[]}'
MAX_SETTLED_TAILS = 16  # settled sessions remembered per machine (no double count, late arrivals recognised)
MIN_TAIL_INTERVAL_S = 0.1  # the interval a plausibility bound assumes at least
log = logging.getLogger("fleet.collector")


@dataclass(frozen=True, slots=True)
class Tail:
    """An open check of a previous session: were its reports up to ``last_seq`` all stored?"""

    org: str
    machine_id: str
    session: str
    last_seq: int
    announced_ts: float | None  # the agent's ts of the ping that named it
    interval_s: float
    due: float  # collector time when the grace period ends


@dataclass(frozen=True, slots=True)
class TailStats:
    """What history holds of a tail's session when its grace period ends."""

    received: int  # distinct seqs <= last_seq stored
    max_seq: int | None  # highest seq of the session stored (None: none stored)
    max_ts: float | None  # agent ts of the session's newest stored report
    machine_last_ts: float | None = None  # newest report of the machine before the announcement (other sessions)


def tail_lost(tail: Tail, stats: TailStats) -> int:
    """Reports of the tail's session that never arrived, never trusting more than the agent could have made.

    The claimed ``last_seq`` is capped by one report per ``interval_s`` between the session's newest stored
    report (or, if none is stored, the machine's newest report before it) and the ping that announced it.
    """
    interval = max(tail.interval_s, MIN_TAIL_INTERVAL_S)
    announced = tail.announced_ts
    if stats.max_seq is not None and stats.max_ts is not None:
        gap = 0.0 if announced is None else max(0.0, announced - stats.max_ts)
        bound = stats.max_seq + math.ceil(gap / interval)
    elif stats.machine_last_ts is not None and announced is not None:
        bound = math.ceil(max(0.0, announced - stats.machine_last_ts) / interval) - 1
    else:
        bound = -1  # a session never seen from a machine never seen: nothing to compare a claim with
    return max(0, min(tail.last_seq, bound) + 1 - stats.received)


@dataclass(frozen=True, slots=True)
class Transition:
    """One status change of a machine, written to the events table."""

    org: str
    machine_id: str
    ts: float
    old_status: str | None
    new_status: str
    reason: str


@dataclass(slots=True)
class Machine:
    """Mutable live state of one machine (owned by the tracker)."""

    org: str
    machine_id: str
    status: str
    session: str
    hardware_id: str = ""
    interval_s: float | None = None
    last_seen: float | None = None
    last_ping: float | None = None
    clock_offset_s: float | None = None
    conflict: bool = False
    os: str = ""
    system: Mapping[str, Any] | str = "{}"  # a dict from a report, or JSON text loaded from the database
    metrics: Mapping[str, Any] | str = "{}"
    first_seen: float = 0.0
    latest_ts: float = float("-inf")  # agent ts of the report whose metrics are shown
    session_ts: float = float("-inf")  # newest agent ts seen from the current session
    offsets: deque = field(default_factory=lambda: deque(maxlen=OFFSET_WINDOW))
    past_sessions: deque = field(default_factory=lambda: deque(maxlen=PAST_SESSIONS))
    hardware_seen: dict[str, float] = field(default_factory=dict)
    lost: int = 0  # reports of ended sessions that never arrived (settled tails)
    late: int = 0  # reports of a settled session that arrived after its grace period
    pending_tails: list[Tail] = field(default_factory=list)
    settled_tails: dict[str, int] = field(default_factory=dict)  # session -> last_seq, oldest first
    stored: bool = False  # its row is in the machines table (loaded from it, or written): an UPDATE will do
    cert_not_after: float | None = None  # its unrevoked certificate's end (read from the database with the orgs)
    agent_labels: dict[str, str] = field(default_factory=dict)  # of the newest report with valid labels
    agent_labels_text: str = "{}"  # the same as stored (config.labels.labels_json), made once per change
    labels: dict[str, str] = field(default_factory=dict)  # merged: the agent's, server labels winning

    def tails_json(self) -> str:
        """Open and settled tail checks as stored in ``machines.tails``."""
        if not self.pending_tails and not self.settled_tails:
            return NO_TAILS  # most machines, and written with every report
        return orjson.dumps({"pending": [[t.session, t.last_seq, t.announced_ts, t.interval_s, t.due]
                                         for t in self.pending_tails],
                             "settled": [[s, n] for s, n in self.settled_tails.items()]}).decode()

    @property
    def key(self) -> tuple[str, str]:
        """(org, machine_id)."""
        return (self.org, self.machine_id)


class Tracker:
    """Live state of every machine of the collector's orgs; returns the transitions each input causes."""

    def __init__(self, stale_factor: float, default_interval_s: float, ttl_seconds: float,
                 lost_grace_s: float = 60.0) -> None:
        self.stale_factor = stale_factor
        self.default_interval_s = default_interval_s
        self.ttl_seconds = ttl_seconds
        self.lost_grace_s = lost_grace_s
        self.machines: dict[tuple[str, str], Machine] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._with_tails: set[tuple[str, str]] = set()  # machines with open tail checks
        self.server_labels: dict[tuple[str, str], dict[str, str]] = {}  # fleet machine label, by (org, machine_id)

    # --- queries ------------------------------------------------------------------------------
    def get(self, org: str, machine_id: str) -> Machine | None:
        """The live state of one machine, or None if unknown or evicted."""
        return self.machines.get((org, machine_id))

    def stale_after(self, machine: Machine) -> float:
        """Seconds of silence after which an online machine is stale."""
        return self.stale_factor * (machine.interval_s or self.default_interval_s)

    def take_dirty(self) -> list[Machine]:
        """Machines changed since the last call (to be written to the machines table)."""
        dirty = [self.machines[key] for key in self._dirty if key in self.machines]
        self._dirty.clear()
        return dirty

    # --- inputs -------------------------------------------------------------------------------
    def load(self, rows: Iterable[Mapping[str, Any]], now: float | None = None) -> None:
        """Restore state from machines-table rows (collector restart).

        Open tail checks get a full grace period again from ``now``: replays queued for the collector while it
        was down arrive after the restart.
        """
        for row in rows:
            machine = Machine(
                org=row["org"], machine_id=row["machine_id"], status=row["status"], session=row["session"] or "",
                hardware_id=row["hardware_id"] or "", interval_s=row["interval_s"], last_seen=row["last_seen"],
                last_ping=row["last_ping"], clock_offset_s=row["clock_offset_s"], conflict=bool(row["conflict"]),
                os=row["os"] or "", system=row["system"] or "{}", metrics=row["metrics"] or "{}",
                first_seen=row["first_seen"] or row["last_seen"] or 0.0, stored=True,
                agent_labels=agent_labels(row.get("agent_labels")),
            )
            machine.agent_labels_text = labels_json(machine.agent_labels)
            machine.labels = merge(machine.agent_labels, self.server_labels.get(machine.key, {}))
            if machine.status not in STATUSES:
                machine.status = STALE
            if machine.clock_offset_s is not None:
                machine.offsets.append(machine.clock_offset_s)
            if machine.last_seen is not None:
                # The current session's newest ts is not stored; estimate it (agent clock) with a margin.
                machine.session_ts = machine.last_seen - (machine.clock_offset_s or 0.0) - LOAD_TS_MARGIN_S
            self._load_tails(machine, row, now)
            self.machines[machine.key] = machine

    def set_server_labels(self, server_labels: dict[tuple[str, str], dict[str, str]]) -> None:
        """Replace the server labels (their change was logged as an event by whoever made it)."""
        self.server_labels = server_labels
        for machine in self.machines.values():
            labels = merge(machine.agent_labels, server_labels.get(machine.key, {}))
            if labels != machine.labels:
                machine.labels = labels

    def on_report(self, report: Report, now: float, labels: dict[str, str] | None = None) -> list[Transition]:
        """Apply a validated report received at ``now``; ``labels`` are its valid labels (None: dropped)."""
        key = (report.org, report.machine_id)
        machine = self.machines.get(key)
        transitions: list[Transition] = []
        if machine is None:
            machine = self._create(report.org, report.machine_id, ONLINE, report.session, now)
            transitions.append(Transition(report.org, report.machine_id, now, None, ONLINE, "report"))
            role = "current"
        else:
            role = self._role(machine, report.session, report.ts)
            if role == "new":
                self._switch_session(machine, report.session)
                if machine.status != ONLINE:
                    transitions.append(self._set(machine, ONLINE, "new_session", now))
            elif role == "current" and machine.status == STALE:
                transitions.append(self._set(machine, ONLINE, "report", now))
        if role != "old":
            self._offset(machine, now - report.ts)
            machine.session_ts = max(machine.session_ts, report.ts)
        elif report.seq <= machine.settled_tails.get(report.session, -1):
            machine.late += 1  # its tail was already settled: lost stays as counted
        machine.last_seen = now if machine.last_seen is None else max(machine.last_seen, now)
        if report.ts >= machine.latest_ts:
            first_report = machine.latest_ts == float("-inf")
            machine.latest_ts = report.ts
            machine.hardware_id = report.hardware_id
            machine.metrics = report.metrics
            machine.system = report.system
            os_name = report.system.get("os") if isinstance(report.system, Mapping) else None
            machine.os = os_name if isinstance(os_name, str) else ""
            if labels is not None and labels != machine.agent_labels:
                transitions += self._set_agent_labels(machine, labels, now, first_report)
        self._saw_hardware(machine, report.hardware_id, now)
        self._dirty.add(key)
        return transitions

    def on_ping(self, ping: Ping, now: float, retained: bool = False) -> list[Transition]:
        """Apply a validated ping received at ``now``; ``retained`` pings are old news, not a sign of life."""
        key = (ping.org, ping.machine_id)
        machine = self.machines.get(key)
        # A retained ping tells us when the agent last spoke (its ts, in our clock), not that it speaks now.
        if retained:
            offset = machine.clock_offset_s if machine is not None and machine.clock_offset_s is not None else 0.0
            seen = None if ping.ts is None else min(now, ping.ts + offset)
        else:
            seen = now
        if machine is None:
            status = ping.status
            machine = self._create(ping.org, ping.machine_id, status, ping.session, now)
            machine.interval_s = ping.interval_s
            machine.hardware_id = ping.hardware_id
            if ping.ts is not None:
                machine.session_ts = ping.ts
            machine.last_seen = seen
            machine.last_ping = seen
            if status == ONLINE and (seen is None or now - seen > self.stale_after(machine)):
                status = machine.status = STALE
            reason = ping.reason or ("retained" if retained else "ping")
            self._dirty.add(key)
            if not retained:
                self._after_live_message(machine, ping, now)
            if ping.prev_session is not None:
                self._open_tail(machine, ping, now)
            return [Transition(ping.org, ping.machine_id, now, None, status, reason)]

        role = self._role(machine, ping.session, ping.ts)
        if role == "old" or (role == "new" and ping.status == OFFLINE):
            return []  # a late last will or a message of an earlier connection
        transitions: list[Transition] = []
        if role == "new":
            self._switch_session(machine, ping.session)
        if ping.ts is not None:
            machine.session_ts = max(machine.session_ts, ping.ts)
        machine.interval_s = ping.interval_s
        if not machine.hardware_id:
            machine.hardware_id = ping.hardware_id
        if seen is not None:
            machine.last_seen = seen if machine.last_seen is None else max(machine.last_seen, seen)
            machine.last_ping = seen if machine.last_ping is None else max(machine.last_ping, seen)
        if ping.status == OFFLINE:
            if machine.status != OFFLINE:
                transitions.append(self._set(machine, OFFLINE, ping.reason or "lost", now))
        else:
            fresh = machine.last_seen is not None and now - machine.last_seen <= self.stale_after(machine)
            target = ONLINE if (not retained or fresh) else STALE
            if machine.status != target and not (retained and machine.status == STALE and target == STALE):
                transitions.append(self._set(machine, target, "retained" if retained else "ping", now))
        if not retained:
            self._after_live_message(machine, ping, now)
        if ping.prev_session is not None:
            self._open_tail(machine, ping, now)
        self._dirty.add(key)
        return transitions

    # --- tail accounting ----------------------------------------------------------------------
    def due_tails(self, now: float) -> list[Tail]:
        """Tail checks whose grace period has ended (they stay open until settled)."""
        due = []
        for key in list(self._with_tails):
            machine = self.machines.get(key)
            if machine is None or not machine.pending_tails:
                self._with_tails.discard(key)
                continue
            due += [tail for tail in machine.pending_tails if tail.due <= now]
        return due

    def settle_tail(self, tail: Tail, stats: TailStats, now: float) -> tuple[int, list[Transition]]:
        """Close a tail check with what history holds: (reports lost, the event to log when any were)."""
        machine = self.machines.get((tail.org, tail.machine_id))
        if machine is None or tail not in machine.pending_tails:
            return 0, []  # evicted meanwhile, or settled already
        machine.pending_tails.remove(tail)
        lost = tail_lost(tail, stats)
        machine.settled_tails[tail.session] = tail.last_seq
        while len(machine.settled_tails) > MAX_SETTLED_TAILS:
            del machine.settled_tails[next(iter(machine.settled_tails))]
        self._dirty.add(machine.key)
        if max(0, tail.last_seq + 1 - stats.received) > lost:
            log.warning("machine %s/%s: session %s claims seq up to %d, more than it could have made; counting %d",
                        tail.org, tail.machine_id, tail.session, tail.last_seq, lost)
        if not lost:
            return 0, []
        machine.lost += lost
        return lost, [Transition(tail.org, tail.machine_id, now, machine.status, machine.status,
                                 f"lost {lost} of session {tail.session}")]

    def _open_tail(self, machine: Machine, ping: Ping, now: float) -> None:
        session, last_seq = ping.prev_session, ping.prev_seq
        if session is None or last_seq is None or session == machine.session:
            return
        if session in machine.settled_tails or any(t.session == session for t in machine.pending_tails):
            return  # the retained ping again, or the next online ping of the same connection
        machine.pending_tails.append(Tail(machine.org, machine.machine_id, session, last_seq, ping.ts,
                                          ping.interval_s, now + self.lost_grace_s))
        if len(machine.pending_tails) > MAX_PENDING_TAILS:
            dropped = machine.pending_tails.pop(0)
            log.warning("machine %s/%s: too many sessions awaiting tail accounting; session %s not counted",
                        machine.org, machine.machine_id, dropped.session)
        self._with_tails.add(machine.key)

    def _load_tails(self, machine: Machine, row: Mapping[str, Any], now: float | None) -> None:
        machine.lost = int(row.get("lost") or 0)
        machine.late = int(row.get("late") or 0)
        try:
            tails = json.loads(row.get("tails") or "{}")
            for session, last_seq, announced, interval_s, due in tails.get("pending", []):
                due = due if now is None else max(due, now + self.lost_grace_s)
                machine.pending_tails.append(Tail(machine.org, machine.machine_id, str(session), int(last_seq),
                                                  announced, float(interval_s), float(due)))
            machine.settled_tails = {str(s): int(n) for s, n in tails.get("settled", [])}
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("machine %s/%s: unreadable tail checks dropped (%s)", machine.org, machine.machine_id, exc)
        if machine.pending_tails:
            self._with_tails.add(machine.key)

    def tick(self, now: float) -> tuple[list[Transition], list[Machine]]:
        """Timer check: mark silent machines stale, evict those silent past the TTL, refresh conflicts."""
        transitions: list[Transition] = []
        evicted: list[Machine] = []
        # Runs every second over every machine: stale_after is inlined, hardware ids are pruned only where
        # two were seen or a conflict is set, nothing is copied.
        factor, default, ttl = self.stale_factor, self.default_interval_s, self.ttl_seconds
        for machine in self.machines.values():
            last_seen = machine.last_seen
            if machine.hardware_seen and (machine.conflict or len(machine.hardware_seen) > 1):
                self._prune_hardware(machine, now, factor * (machine.interval_s or default))
            if now - (last_seen if last_seen is not None else machine.first_seen) > ttl:
                transitions.append(Transition(machine.org, machine.machine_id, now, machine.status, EVICTED, "ttl"))
                evicted.append(machine)
            elif machine.status == ONLINE and (last_seen is None
                                               or now - last_seen > factor * (machine.interval_s or default)):
                transitions.append(self._set(machine, STALE, "silent", now))
        for machine in evicted:
            del self.machines[machine.key]
            self._dirty.discard(machine.key)
        return transitions, evicted

    def forget(self, org: str, machine_id: str, now: float) -> tuple[list[Transition], Machine | None]:
        """Drop a machine an admin forgot from the live view: its transition to evicted, and the machine."""
        machine = self.machines.pop((org, machine_id), None)
        if machine is None:
            return [], None
        self._dirty.discard(machine.key)
        self._with_tails.discard(machine.key)
        return [Transition(org, machine_id, now, machine.status, EVICTED, "forgotten")], machine

    def forget_org(self, org: str) -> None:
        """Drop an org's machines from memory (org no longer served by this collector); rows stay."""
        for key in [key for key in self.machines if key[0] == org]:
            del self.machines[key]
            self._dirty.discard(key)

    # --- helpers ------------------------------------------------------------------------------
    def _create(self, org: str, machine_id: str, status: str, session: str, now: float) -> Machine:
        machine = Machine(org=org, machine_id=machine_id, status=status, session=session, first_seen=now,
                          labels=dict(self.server_labels.get((org, machine_id), {})))
        self.machines[(org, machine_id)] = machine
        return machine

    @staticmethod
    def _role(machine: Machine, session: str, ts: float | None) -> str:
        if session == machine.session:
            return "current"
        if session in machine.past_sessions:
            return "old"
        if ts is not None and ts < machine.session_ts:
            # Never seen, but older than what the current session said: an agent replaying reports it
            # built before this connection (e.g. queued while the broker was unreachable).
            machine.past_sessions.append(session)
            return "old"
        return "new"

    @staticmethod
    def _switch_session(machine: Machine, session: str) -> None:
        if machine.session:
            machine.past_sessions.append(machine.session)
        machine.session = session
        machine.session_ts = float("-inf")
        # Offsets of the earlier connection say nothing about this one's clock.
        machine.offsets.clear()

    def _set_agent_labels(self, machine: Machine, labels: dict[str, str], now: float,
                          first_report: bool) -> list[Transition]:
        """New labels from the agent; a change of the merged labels is an event (not a machine's first labels)."""
        first = first_report and not machine.agent_labels
        machine.agent_labels = labels
        machine.agent_labels_text = labels_json(labels)
        merged = merge(labels, self.server_labels.get(machine.key, {}))
        change = diff(machine.labels, merged)
        machine.labels = merged
        if not change or first:
            return []
        return [Transition(machine.org, machine.machine_id, now, machine.status, machine.status,
                           label_event_reason(change))]

    def _set(self, machine: Machine, status: str, reason: str, now: float) -> Transition:
        old = machine.status
        machine.status = status
        self._dirty.add(machine.key)
        return Transition(machine.org, machine.machine_id, now, old, status, reason)

    def _after_live_message(self, machine: Machine, ping: Ping, now: float) -> None:
        if ping.ts is not None:
            self._offset(machine, now - ping.ts)
        self._saw_hardware(machine, ping.hardware_id, now)

    @staticmethod
    def _offset(machine: Machine, offset: float) -> None:
        machine.offsets.append(offset)
        machine.clock_offset_s = min(machine.offsets)

    def _saw_hardware(self, machine: Machine, hardware_id: str, now: float) -> None:
        seen = machine.hardware_seen
        seen[hardware_id] = now
        if len(seen) == 1 and not machine.conflict:
            return  # the usual case, for every message: one hardware id, nothing to prune or flag
        self._prune_hardware(machine, now, self.stale_after(machine))

    def _prune_hardware(self, machine: Machine, now: float, window: float) -> None:
        seen = machine.hardware_seen
        if len(seen) > 1:
            for hw in [hw for hw, ts in seen.items() if now - ts > window]:
                del seen[hw]
        conflict = len(seen) > 1
        if conflict != machine.conflict:
            machine.conflict = conflict
            self._dirty.add(machine.key)
