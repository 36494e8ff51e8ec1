"""Alert evaluation and grouping in the collector's writer thread (docs/alerts.md).

An alert is one (rule, machine): ``pending`` while the rule's condition holds for less than its
``for``, then ``firing``, then ``resolved`` when the condition stops holding or the machine is
evicted. A pending alert whose condition stops is dropped. The engine keeps the live alerts in
memory, evaluates a machine's rules whenever the collector applies one of its messages or changes its
status, and runs a timer for ``for`` durations, silences and notification groups. What changed is
written in the writer's next transaction (``AlertWrites``), so alerts, notifications and the machine
state they came from are committed together.

Notifications: each alert's row records what the org's channels were last handed (``notified``). A
fired or resolved alert joins its org's open group; ``alert_group_wait`` seconds after the group
opened it is sealed into one outbox row per channel, and ``notified`` is updated in the same
transaction. A collector restarted at any point therefore neither loses a notification (the alert's
state and ``notified`` still differ, so it is grouped again) nor sends one twice.

The collector's own blindness is not the fleet's: a status rule never fires while the collector is
disconnected from the broker, nor within a machine's ``stale_after`` of (re)connecting; such alerts
wait as pending and fire afterwards if the condition still holds.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fleet import notify
from fleet.collector.state import Machine, Tracker, Transition
from fleet.config.rules import (
    CERT_DAYS_LEFT,
    Conflict,
    Rule,
    Silence,
    StatusIs,
    Threshold,
    cert_days_left,
    format_duration,
    metric_reader,
)
from fleet.config.topics import alert_topic
from fleet.store import alerting
from fleet.store.database import Database, DatabaseError

log = logging.getLogger("fleet.collector.alerts")

PENDING, FIRING, RESOLVED = "pending", "firing", "resolved"
REFRESH_S = 2.0  # rules, channels and silences are read again this often (changes apply within 5 s)
RECHECK_S = 0.5  # pending alerts (for durations, blindness) and status/conflict conditions are checked this often
VALUE_WRITE_S = 10.0  # a live alert's changing value is written at most this often
MATCH_CACHE_MAX = 200_000


@dataclass(eq=False, slots=True)
class Alert:
    """One (rule, machine) alert as the engine keeps it. Its row is found by (org, rule, machine, active_at)."""

    org: str
    rule: str
    machine_id: str
    severity: str
    state: str
    active_at: float
    summary: str = ""
    value: float | None = None
    fired_at: float | None = None
    resolved_at: float | None = None
    notified: str = ""
    stored: bool = False  # handed to a write: its row exists (or will, once that transaction commits)
    written_at: float = 0.0
    labels: Mapping[str, str] = field(default_factory=dict)  # the machine's, as it fired (then kept, so a
    # resolved notice has the labels, and Alertmanager the fingerprint, of the firing one)
    acked_by: str | None = None  # who acknowledged it (from the web, read at each refresh)

    @property
    def key(self) -> tuple[str, str, str]:
        """(org, machine_id, rule)."""
        return (self.org, self.machine_id, self.rule)

    def needs_notice(self) -> bool:
        """True when the channels have not been told this alert's current state."""
        return self.state in (FIRING, RESOLVED) and self.notified != self.state

    def notice(self) -> dict[str, Any]:
        """The alert as one notice of a notification (``fleet.notify.Notice`` fields)."""
        return {"status": self.state, "org": self.org, "rule": self.rule, "machine_id": self.machine_id,
                "severity": self.severity, "summary": self.summary, "value": self.value,
                "starts_at": self.fired_at if self.fired_at is not None else self.active_at,
                "ends_at": self.resolved_at if self.state == RESOLVED else None,
                "fingerprint": notify.fingerprint(self.org, self.rule, self.machine_id, self.severity, self.labels),
                "machine_labels": dict(self.labels), "acked_by": self.acked_by}


# --- rules compiled for evaluation -------------------------------------------------------------------
def _metrics(machine: Machine) -> Mapping[str, Any]:
    metrics = machine.metrics
    if isinstance(metrics, str):  # written to the database since the last report: stored as text
        try:
            loaded = json.loads(metrics)
        except ValueError:
            return {}
        return loaded if isinstance(loaded, dict) else {}
    return metrics


Check = Callable[[Machine, Mapping[str, Any]], tuple[bool, float | None]]


@dataclass(eq=False)
class CompiledRule:
    """A rule with its condition turned into a function of a machine's live state and latest metrics."""

    rule: Rule
    check: Check
    uses_metrics: bool  # only a report can change the outcome
    all_machines: bool = False
    by_labels: bool = False
    matches: dict[str, bool] = field(default_factory=dict)
    label_matches: dict[str, tuple[Mapping[str, str], bool]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.all_machines = self.rule.machines == "*"
        self.by_labels = self.rule.by_labels

    @property
    def name(self) -> str:
        """The rule's name."""
        return self.rule.name

    def applies_to(self, machine: Machine) -> bool:
        """True when the rule's glob or label selector covers the machine (cached per machine)."""
        if self.all_machines:
            return True
        machine_id = machine.machine_id
        if self.by_labels:
            # The tracker gives a machine a new labels dict when they change: the same dict, the same answer.
            cached = self.label_matches.get(machine_id)
            if cached is not None and cached[0] is machine.labels:
                return cached[1]
            if len(self.label_matches) >= MATCH_CACHE_MAX:
                self.label_matches.clear()
            covered = self.rule.applies_to(machine_id, machine.labels)
            self.label_matches[machine_id] = (machine.labels, covered)
            return covered
        hit = self.matches.get(machine_id)
        if hit is None:
            if len(self.matches) >= MATCH_CACHE_MAX:
                self.matches.clear()
            hit = self.matches[machine_id] = self.rule.applies_to(machine_id)
        return hit

    def holds(self, machine: Machine) -> bool:
        """Whether the condition holds now (metrics read from the machine's state)."""
        return self.check(machine, _metrics(machine) if self.uses_metrics else {})[0]


def compile_rule(rule: Rule) -> CompiledRule:
    """Turn a parsed rule into a check returning (condition holds, value)."""
    when = rule.when
    if isinstance(when, StatusIs):
        status = when.status
        return CompiledRule(rule, lambda m, _metrics: (m.status == status, None), uses_metrics=False)
    if isinstance(when, Conflict):
        return CompiledRule(rule, lambda m, _metrics: (m.conflict, None), uses_metrics=False)
    assert isinstance(when, Threshold)
    holds = when.predicate()
    if when.field == "clock_offset_s":
        def offset_check(m: Machine, _metrics: Mapping[str, Any]) -> tuple[bool, float | None]:
            value = None if m.clock_offset_s is None else abs(m.clock_offset_s)
            return (value is not None and holds(value), value)
        return CompiledRule(rule, offset_check, uses_metrics=False)
    if when.field == CERT_DAYS_LEFT:
        def cert_check(m: Machine, _metrics: Mapping[str, Any]) -> tuple[bool, float | None]:
            value = None if m.cert_not_after is None else cert_days_left(m.cert_not_after, time.time())
            return (value is not None and holds(value), value)
        return CompiledRule(rule, cert_check, uses_metrics=False)
    reader = metric_reader(when.field)

    def metric_check(_m: Machine, metrics: Mapping[str, Any]) -> tuple[bool, float | None]:
        value = reader(metrics)
        return (value is not None and holds(value), value)
    return CompiledRule(rule, metric_check, uses_metrics=True)


def summary(rule: Rule, machine_id: str, value: float | None) -> str:
    """One line saying what is wrong and which rule says so, for notifications."""
    when = rule.when
    if isinstance(when, StatusIs):
        what = f"{machine_id} is {when.status}"
    elif isinstance(when, Conflict):
        what = f"two machines with different hardware ids report as {machine_id}"
    else:
        what = f"{when.field} is {'?' if value is None else f'{value:.6g}'} on {machine_id}"
    return f"{what} ({when}{f' for {format_duration(rule.for_s)}' if rule.for_s else ''})"


# --- what a flush writes -------------------------------------------------------------------------------
_ALERT_COLUMNS = ("org", "rule", "machine_id", "active_at", "state", "severity", "summary", "value", "fired_at",
                  "resolved_at", "notified")
# An alert's row is keyed by (org, rule, machine, active_at): a write is an upsert, so a batch written twice
# (a retried transaction whose first COMMIT did land) changes nothing more.
_UPSERT_ALERT = (f"INSERT INTO alerts({', '.join(_ALERT_COLUMNS)}) VALUES ({', '.join('?' * len(_ALERT_COLUMNS))})"
                 " ON CONFLICT(org, rule, machine_id, active_at) DO UPDATE SET state = excluded.state,"
                 " severity = excluded.severity, summary = excluded.summary, value = excluded.value,"
                 " fired_at = excluded.fired_at, resolved_at = excluded.resolved_at, notified = excluded.notified")


@dataclass
class AlertWrites:
    """Alert rows, deletions and outbox rows of one writer transaction."""

    alerts: list[tuple] = field(default_factory=list)
    deleted: list[tuple[str, str, str, float]] = field(default_factory=list)  # (org, rule, machine, active_at)
    outbox: list[tuple] = field(default_factory=list)
    purged_orgs: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.alerts or self.deleted or self.outbox or self.purged_orgs)

    def write(self, db: Database) -> None:
        """Execute inside the caller's transaction."""
        for org in self.purged_orgs:
            for table in ("alerts", "alert_outbox"):
                db.execute(f"DELETE FROM {table} WHERE org = ?", (org,))
        if self.deleted:
            db.executemany("DELETE FROM alerts WHERE org = ? AND rule = ? AND machine_id = ? AND active_at = ?",
                           self.deleted)
        if self.alerts:
            db.executemany(_UPSERT_ALERT, self.alerts)
        if self.outbox:
            db.executemany("INSERT INTO alert_outbox(org, channel, group_key, notices, created, next_attempt)"
                           " VALUES (?, ?, ?, ?, ?, ?)", self.outbox)


# --- the engine --------------------------------------------------------------------------------------------
@dataclass
class Group:
    """An org's notifications gathered until ``due``."""

    due: float
    alerts: list[Alert] = field(default_factory=list)


class AlertEngine:
    """Every live alert of the collector's orgs; see the module docstring. Only the writer thread uses it."""

    def __init__(self, tracker: Tracker, group_wait: float, blind: Callable[[Machine, float], bool],
                 watchdog_interval: float = 300.0) -> None:
        self.tracker = tracker
        self.watchdog_interval = watchdog_interval
        self.watchdogs: set[tuple[str, str]] = set()  # (org, channel) that get the always-firing FleetWatchdog
        self.next_watchdog: dict[tuple[str, str], float] = {}
        self.started = time.time()
        self.group_wait = group_wait
        self.blind = blind
        self.rules: dict[str, list[CompiledRule]] = {}
        self.by_name: dict[tuple[str, str], CompiledRule] = {}
        self.conflict_rules = False  # any org has a conflict rule (the timer must re-check them)
        self.rule_rows: dict[str, tuple] = {}
        self.channels: dict[str, dict[str, str]] = {}
        self.silences: dict[str, list[Silence]] = {}
        self.live: dict[tuple[str, str], dict[str, Alert]] = {}  # (org, machine) -> rule -> pending/firing alert
        self.pending: dict[tuple[str, str, str], Alert] = {}
        self.unsent: dict[tuple[str, str, str], Alert] = {}  # resolved, but the channels were told it fired
        self.held: dict[int, Alert] = {}  # needing a notice, held back by a silence (by object id)
        self.groups: dict[str, Group] = {}
        self.writes = AlertWrites()
        self.dirty: dict[int, Alert] = {}
        self.topics: set[tuple[str, str]] = set()  # machines whose firing set changed
        self.cleared: list[str] = []  # alert topics to clear (evicted machines)
        self.next_refresh = 0.0
        self.next_recheck = 0.0
        self.next_resend: dict[tuple[str, str], float] = {}
        self.outbox_added = False

    # --- loading and refreshing --------------------------------------------------------------------------
    def load(self, db: Database, orgs: Iterable[str], now: float) -> None:
        """Restore live alerts from the database, then evaluate every known machine once."""
        wanted = set(orgs)
        rows = db.query("SELECT org, rule, machine_id, severity, state, active_at, summary, value, fired_at,"
                        " resolved_at, notified, acked_by FROM alerts WHERE state != 'resolved'"
                        " OR (state = 'resolved' AND notified = 'firing')")
        for (org, rule, machine_id, severity, state, active_at, summary_, value, fired_at, resolved_at,
             notified, acked_by) in rows:
            if org not in wanted:
                continue
            machine = self.tracker.get(org, machine_id)
            alert = Alert(org, rule, machine_id, severity, state, active_at, summary_ or "", value, fired_at,
                          resolved_at, notified or "", True, now, machine.labels if machine is not None else {},
                          acked_by)
            if state == RESOLVED:
                self.unsent[alert.key] = alert
            else:
                self.live.setdefault((org, machine_id), {})[rule] = alert
                if state == PENDING:
                    self.pending[alert.key] = alert
                elif state == FIRING:
                    self.topics.add((org, machine_id))  # the retained topic may predate a crash: publish it again
        for alerts in list(self.live.values()):
            for alert in list(alerts.values()):
                if self.tracker.get(alert.org, alert.machine_id) is None:
                    self._clear(alert, now)  # evicted while the collector was away
        for alert in [a for alerts in self.live.values() for a in alerts.values()] + list(self.unsent.values()):
            if alert.needs_notice():
                self._announce(alert, now)
        self.refresh(db, wanted, now, everything=True)
        log.info("alerts: %d rule(s) of %d org(s), %d firing, %d pending", sum(map(len, self.rules.values())),
                 len(self.rules), self.firing_count(), len(self.pending))

    def refresh(self, db: Database, orgs: Iterable[str], now: float, everything: bool = False) -> None:
        """Read rules, channels and silences again; re-evaluate the machines of orgs whose rules changed."""
        wanted = set(orgs)
        loaded = alerting.load_rules(db, wanted)
        changed = set()
        for org in wanted | set(self.rules):
            rules = loaded.get(org, [])
            signature = tuple((r.name, str(r.when), r.for_s, r.machines, r.severity) for r in rules)
            if self.rule_rows.get(org, ()) == signature and not everything:
                continue
            self.rule_rows[org] = signature
            self.rules[org] = [compile_rule(r) for r in rules]
            if not rules:
                del self.rules[org]
            changed.add(org)
            if not everything:
                log.info("alerts: rules of org %s now %s", org, ", ".join(r.name for r in rules) or "(none)")
        if changed:
            self._rules_changed(changed, now)
        self.channels = {org: kinds for org, kinds in alerting.channel_kinds(db).items() if org in wanted}
        self.watchdogs = {key for key in alerting.watchdog_channels(db) if key[0] in wanted}
        silences: dict[str, list[Silence]] = {}
        for silence in alerting.load_silences(db, now):
            if silence.org in wanted:
                silences.setdefault(silence.org, []).append(silence)
        self.silences = silences
        self._refresh_acks(db, wanted)
        for key, alert in list(self.held.items()):
            if not self.silenced(alert, now):
                del self.held[key]
                self._announce(alert, now)

    def _refresh_acks(self, db: Database, orgs: set[str]) -> None:
        """Note who acknowledged each firing alert; its machine's alert topic is published again."""
        for (org, rule, machine_id, active_at), acked_by in alerting.firing_acks(db, orgs).items():
            alert = self.live.get((org, machine_id), {}).get(rule)
            if alert is not None and alert.active_at == active_at and alert.acked_by != acked_by:
                alert.acked_by = acked_by
                if alert.state == FIRING:
                    self.topics.add((org, machine_id))

    def _rules_changed(self, orgs: set[str], now: float) -> None:
        """Alerts of removed rules resolve; every machine of these orgs is evaluated against their rules."""
        self.by_name = {k: cr for k, cr in self.by_name.items() if k[0] not in orgs}
        self.by_name.update({(org, cr.name): cr for org in orgs for cr in self.rules.get(org, ())})
        self.conflict_rules = any(isinstance(cr.rule.when, Conflict) for cr in self.by_name.values())
        for (org, _machine), alerts in list(self.live.items()):
            if org in orgs:
                for name, alert in list(alerts.items()):
                    if (org, name) not in self.by_name:
                        self._clear(alert, now)  # the rule is gone: its alerts resolve
        for machine in list(self.tracker.machines.values()):
            if machine.org in orgs:
                self.evaluate(machine, now)

    def forget_org(self, org: str) -> None:
        """The org is gone: drop its alerts from memory and the database, clear its alert topics."""
        for (alert_org, machine_id), alerts in list(self.live.items()):
            if alert_org == org:
                if any(a.state == FIRING for a in alerts.values()):
                    self.cleared.append(alert_topic(org, machine_id))
                del self.live[(alert_org, machine_id)]
        for table in (self.pending, self.unsent):
            for key in [k for k in table if k[0] == org]:
                del table[key]
        self.held = {k: a for k, a in self.held.items() if a.org != org}
        self.dirty = {k: a for k, a in self.dirty.items() if a.org != org}
        self.topics = {t for t in self.topics if t[0] != org}
        self.groups.pop(org, None)
        self.rules.pop(org, None)
        self.rule_rows.pop(org, None)
        self.by_name = {k: cr for k, cr in self.by_name.items() if k[0] != org}
        self.writes.purged_orgs.append(org)

    # --- evaluation ------------------------------------------------------------------------------------
    def evaluate(self, machine: Machine, now: float, metrics_changed: bool = True) -> None:
        """Apply the machine's org's rules to its live state (metric rules only if ``metrics_changed``)."""
        rules = self.rules.get(machine.org)
        if not rules:
            return
        machine_id = machine.machine_id
        current = self.live.get((machine.org, machine_id))
        metrics: Mapping[str, Any] | None = None
        for cr in rules:
            if cr.uses_metrics:
                if not metrics_changed:
                    continue
                if metrics is None:
                    metrics = _metrics(machine)
            if not cr.all_machines and not cr.applies_to(machine):
                if current and cr.rule.name in current:  # its labels changed: the rule no longer covers it
                    self._clear(current[cr.rule.name], now)
                continue
            holds, value = cr.check(machine, metrics)  # type: ignore[arg-type] # None only for non-metric rules
            alert = current.get(cr.rule.name) if current else None
            if holds:
                if alert is None:
                    alert = self._open(cr.rule, machine, value, now)
                    current = self.live[(machine.org, machine_id)]
                elif value != alert.value:
                    alert.value = value
                    if now - alert.written_at >= VALUE_WRITE_S:
                        self._dirty(alert, now)
                if alert.state == PENDING:
                    self._maybe_fire(alert, cr.rule, machine, now)
            elif alert is not None:
                self._clear(alert, now)

    def after_tick(self, transitions: Iterable[Transition], evicted: Iterable[Machine], now: float) -> None:
        """The tracker's timer changed statuses (stale) and evicted machines: apply both."""
        for t in transitions:
            machine = self.tracker.get(t.org, t.machine_id)
            if machine is not None:
                self.evaluate(machine, now, metrics_changed=False)
        for machine in evicted:
            self.on_evicted(machine, now)

    def on_evicted(self, machine: Machine, now: float) -> None:
        """An evicted machine's alerts resolve and its alert topic is cleared."""
        for alert in list(self.live.get((machine.org, machine.machine_id), {}).values()):
            self._clear(alert, now)
        self.topics.discard((machine.org, machine.machine_id))
        self.cleared.append(alert_topic(machine.org, machine.machine_id))

    def timers(self, db: Database, orgs: Iterable[str], now: float) -> None:
        """Periodic work: re-read the setup, promote pending alerts, re-check status rules, seal due groups."""
        if now >= self.next_refresh:
            self.next_refresh = now + REFRESH_S
            try:
                self.refresh(db, orgs, now)
            except DatabaseError as exc:
                log.warning("cannot read alert rules (will retry): %s", exc)
        if now >= self.next_recheck:
            self.next_recheck = now + RECHECK_S
            self._recheck(now)
            self._resend(db, now)
            self._watchdog(db, now)
        for org, group in list(self.groups.items()):
            if now >= group.due:
                del self.groups[org]
                self._seal(org, group, now)

    def _recheck(self, now: float) -> None:
        """Pending alerts whose ``for`` has passed fire; conflicts the tracker's timer ended resolve."""
        for alert in list(self.pending.values()):
            machine = self.tracker.get(alert.org, alert.machine_id)
            cr = self.by_name.get((alert.org, alert.rule))
            if machine is None or cr is None:
                continue
            if cr.uses_metrics or cr.holds(machine):  # metric rules change only with reports
                self._maybe_fire(alert, cr.rule, machine, now)
            else:
                self._clear(alert, now)
        for alerts in list(self.live.values()) if self.conflict_rules else ():
            for alert in list(alerts.values()):
                cr = self.by_name.get((alert.org, alert.rule))
                if cr is None or not isinstance(cr.rule.when, Conflict) or alert.state != FIRING:
                    continue
                machine = self.tracker.get(alert.org, alert.machine_id)
                if machine is not None and not machine.conflict:
                    self._clear(alert, now)

    # --- transitions -----------------------------------------------------------------------------------
    def _open(self, rule: Rule, machine: Machine, value: float | None, now: float) -> Alert:
        alert = Alert(machine.org, rule.name, machine.machine_id, rule.severity, PENDING, now,
                      summary(rule, machine.machine_id, value), value, labels=machine.labels)
        self.live.setdefault((machine.org, machine.machine_id), {})[rule.name] = alert
        self.pending[alert.key] = alert
        self._dirty(alert, now)
        return alert

    def _maybe_fire(self, alert: Alert, rule: Rule, machine: Machine, now: float) -> None:
        if now - alert.active_at < rule.for_s:
            return
        if rule.is_status and self.blind(machine, now):
            return  # the collector may be the one who cannot see: wait until it has heard the fleet again
        alert.state = FIRING
        alert.fired_at = now
        alert.labels = machine.labels
        alert.summary = summary(rule, alert.machine_id, alert.value)
        self.pending.pop(alert.key, None)
        self._dirty(alert, now)
        self.topics.add((alert.org, alert.machine_id))
        log.info("alert %s/%s %s firing: %s", alert.org, alert.machine_id, alert.rule, alert.summary)
        self._announce(alert, now)

    def _clear(self, alert: Alert, now: float) -> None:
        alerts = self.live.get((alert.org, alert.machine_id))
        if alerts is not None and alerts.get(alert.rule) is alert:
            del alerts[alert.rule]
            if not alerts:
                del self.live[(alert.org, alert.machine_id)]
        if alert.state == PENDING:
            self.pending.pop(alert.key, None)
            self.dirty.pop(id(alert), None)
            if alert.stored:
                self.writes.deleted.append((alert.org, alert.rule, alert.machine_id, alert.active_at))
            return
        alert.state = RESOLVED
        alert.resolved_at = now
        self._dirty(alert, now)
        self.topics.add((alert.org, alert.machine_id))
        log.info("alert %s/%s %s resolved", alert.org, alert.machine_id, alert.rule)
        if alert.notified == FIRING:
            self.unsent[alert.key] = alert
            self._announce(alert, now)
        else:
            alert.notified = RESOLVED  # nobody was told it fired: nothing to tell
            self.held.pop(id(alert), None)

    def _dirty(self, alert: Alert, now: float) -> None:
        alert.written_at = now
        self.dirty[id(alert)] = alert

    # --- notifications ------------------------------------------------------------------------------------
    def silenced(self, alert: Alert, now: float) -> bool:
        """True while a silence of the org covers the alert."""
        return any(s.covers(alert.rule, alert.machine_id, now, alert.labels) for s in self.silences.get(alert.org, ()))

    def _announce(self, alert: Alert, now: float) -> None:
        """Put an alert whose channels must hear of it into its org's group (or hold it while silenced)."""
        if self.silenced(alert, now):
            self.held[id(alert)] = alert
            return
        group = self.groups.get(alert.org)
        if group is None:
            group = self.groups[alert.org] = Group(now + self.group_wait)
        group.alerts.append(alert)

    def _seal(self, org: str, group: Group, now: float) -> None:
        notices: list[dict[str, Any]] = []
        seen: set[int] = set()
        for alert in group.alerts:
            if id(alert) in seen or not alert.needs_notice():
                continue
            seen.add(id(alert))
            if alert.state == RESOLVED and alert.notified != FIRING:
                alert.notified = RESOLVED
                self._dirty(alert, now)
                continue
            if self.silenced(alert, now):
                self.held[id(alert)] = alert
                continue
            notices.append(alert.notice())
            alert.notified = alert.state
            self._dirty(alert, now)
            if alert.state == RESOLVED:
                self.unsent.pop(alert.key, None)
        if not notices:
            return
        channels = self.channels.get(org, {})
        self._queue(org, channels, notices, now)
        firing = sum(1 for n in notices if n["status"] == FIRING)
        log.info("alerts of org %s: %d firing and %d resolved grouped for %d channel(s)", org, firing,
                 len(notices) - firing, len(channels))

    def _queue(self, org: str, channels: Iterable[str], notices: list[dict[str, Any]], now: float) -> None:
        body = json.dumps(notices, separators=(",", ":"))
        for channel in channels:
            self.writes.outbox.append((org, channel, notify.group_key(org), body, now, now))
            self.outbox_added = True

    def _resend(self, db: Database, now: float) -> None:
        """Channels that forget alerts not re-sent (Alertmanager) get every notified firing alert again."""
        for org, kinds in self.channels.items():
            for channel, kind in kinds.items():
                interval = notify.resend_interval(kind)
                if interval is None:
                    continue
                due = self.next_resend.setdefault((org, channel), now + interval)
                if now < due:
                    continue
                self.next_resend[(org, channel)] = now + interval
                notices = [a.notice() for (alert_org, _), alerts in self.live.items() if alert_org == org
                           for a in alerts.values()
                           if a.state == FIRING and a.notified == FIRING and not self.silenced(a, now)]
                if not notices:
                    continue
                try:
                    queued = db.query_one("SELECT 1 FROM alert_outbox WHERE org = ? AND channel = ? LIMIT 1",
                                          (org, channel))
                except DatabaseError:
                    continue
                if queued is None:  # a backlog is still being delivered: do not pile re-sends on it
                    self._queue(org, (channel,), notices, now)

    def _watchdog(self, db: Database, now: float) -> None:
        """Watchdog channels get the always-firing FleetWatchdog alert every watchdog_interval (Alertmanager's at
        its re-send interval, or it would let the alert end between two), unless the last one is still failing."""
        for org, channel in self.watchdogs:
            kind = self.channels.get(org, {}).get(channel)
            if kind is None:
                continue
            key = (org, channel)
            if now < self.next_watchdog.get(key, 0.0):
                continue
            self.next_watchdog[key] = now + min(self.watchdog_interval, notify.resend_interval(kind) or math.inf)
            try:
                failing = db.query_one("SELECT 1 FROM alert_outbox WHERE org = ? AND channel = ? AND attempts > 0"
                                       " LIMIT 1", (org, channel))
            except DatabaseError:
                continue
            if failing is None:
                self._queue(org, (channel,), [asdict(n) for n in notify.watchdog_notices(org, self.started)], now)

    # --- handing over to the writer --------------------------------------------------------------------------
    def take_writes(self) -> AlertWrites | None:
        """What the next transaction must write (None when nothing changed)."""
        writes = self.writes
        # A resolved row leaves the one-live-alert-per-(rule, machine) index before its successor arrives.
        for alert in sorted(self.dirty.values(), key=lambda a: a.state != RESOLVED):
            alert.stored = True
            writes.alerts.append((alert.org, alert.rule, alert.machine_id, alert.active_at, alert.state,
                                  alert.severity, alert.summary, alert.value, alert.fired_at, alert.resolved_at,
                                  alert.notified))
        self.dirty = {}
        self.writes = AlertWrites()
        return writes if writes else None

    def take_publishes(self) -> list[tuple[str, bytes]]:
        """(topic, retained payload) for every machine whose firing alerts changed, and the clears."""
        out = [(topic, b"") for topic in self.cleared]
        self.cleared = []
        for org, machine_id in sorted(self.topics):
            firing = [a for a in self.live.get((org, machine_id), {}).values() if a.state == FIRING]
            body = [{"rule": a.rule, "severity": a.severity, "since": a.fired_at, "value": a.value,
                     **({"acked_by": a.acked_by} if a.acked_by else {})} for a in sorted(firing, key=lambda a: a.rule)]
            out.append((alert_topic(org, machine_id), json.dumps(body, separators=(",", ":")).encode()))
        self.topics = set()
        return out

    def firing_count(self) -> int:
        """How many alerts are firing now."""
        return sum(1 for alerts in self.live.values() for a in alerts.values() if a.state == FIRING)

