"""An org's alerting setup in the database: rules, channels (secrets encrypted) and silences.

The ``fleet alert`` commands call these; the collector reads the same tables every few seconds, so a
change applies without a restart (within 5 s). Channel URLs are checked and channel secrets made by
``fleet.notify`` (notify/channels.py); this module only stores them, sealed
with the data dir's SecretBox. Every function takes an open ``Database``; those that change several
rows do so in one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fleet.config.rules import (
    DEFAULT_RULES,
    Rule,
    RuleError,
    Silence,
    check_comment,
    check_machines,
    check_name,
    format_duration,
    parse_condition,
)
from fleet.store import audit
from fleet.store.database import Database
from fleet.store.errors import NotFound
from fleet.store.orgs import require_org
from fleet.store.secretbox import SecretBox


class Missing(NotFound, RuleError):
    """The org has no rule, channel, silence or alert of that name or id."""


class NotFiring(RuleError):
    """Only a firing alert is acknowledged."""


def _audit(db: Database, actor: str | None, org: str, action: str, target: str, detail: dict[str, Any]) -> None:
    """Record a change in the audit log (in the caller's transaction) when it has an actor."""
    if actor is not None:
        audit.record(db, org=org, actor=actor, action=action, target=target, detail=detail)


def _require_org(db: Database, org: str) -> None:
    check_name(org, "org")
    require_org(db, org)


# Tables holding an org's alerting state, dropped with the org.
ORG_TABLES = ("alert_rules", "alert_channels", "alerts", "alert_silences", "alert_outbox")


def drop_org(db: Database, org: str) -> None:
    """Delete an org's rules, channels, alerts, silences and pending notifications (in the caller's transaction)."""
    for table in ORG_TABLES:
        db.execute(f"DELETE FROM {table} WHERE org = ?", (org,))


# --- rules ---------------------------------------------------------------------------------------
def insert_default_rules(db: Database, org: str, now: float) -> None:
    """Give an org the default rules (config.rules.DEFAULT_RULES) (in the caller's transaction)."""
    for name, when, for_s, severity in DEFAULT_RULES:
        insert_rule(db, Rule(org, name, parse_condition(when), for_s, "*", severity), now)


def insert_rule(db: Database, rule: Rule, now: float) -> bool:
    """Insert a rule unless one of that name exists; True when inserted."""
    return db.execute(
        "INSERT INTO alert_rules(org, name, expr, for_s, machines, severity, created) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(org, name) DO NOTHING",
        (rule.org, rule.name, str(rule.when), float(rule.for_s), rule.machines, rule.severity, now)) == 1


def add_rule(db: Database, rule: Rule, actor: str | None = None) -> None:
    """Store a new rule of an existing org; CredentialError for an unknown org, RuleError for a taken name."""
    with db.transaction():
        _require_org(db, rule.org)
        if not insert_rule(db, rule, time.time()):
            raise RuleError(f"org {rule.org!r} already has a rule named {rule.name!r}")
        _audit(db, actor, rule.org, "rule.create", rule.name, rule.as_dict())


def _rule(row: tuple) -> Rule:
    org, name, expr, for_s, machines, severity = row
    return Rule(org, name, parse_condition(expr), float(for_s), machines, severity)


_RULE_COLUMNS = "org, name, expr, for_s, machines, severity"


def list_rules(db: Database, org: str) -> list[Rule]:
    """An org's rules by name."""
    _require_org(db, org)
    return [_rule(row) for row in db.query(f"SELECT {_RULE_COLUMNS} FROM alert_rules WHERE org = ? ORDER BY name",
                                           (org,))]


def load_rules(db: Database, orgs: Iterable[str] | None = None) -> dict[str, list[Rule]]:
    """Every org's rules (only ``orgs`` when given), for the collector; rows that no longer parse are skipped."""
    wanted = None if orgs is None else set(orgs)
    out: dict[str, list[Rule]] = {}
    for row in db.query(f"SELECT {_RULE_COLUMNS} FROM alert_rules ORDER BY org, name"):
        if wanted is not None and row[0] not in wanted:
            continue
        try:
            out.setdefault(row[0], []).append(_rule(row))
        except RuleError:
            continue
    return out


def remove_rule(db: Database, org: str, name: str, actor: str | None = None) -> None:
    """Delete a rule; the collector resolves its alerts. Missing if there is no such rule."""
    with db.transaction():
        _require_org(db, org)
        if db.execute("DELETE FROM alert_rules WHERE org = ? AND name = ?", (org, name)) == 0:
            raise Missing(f"org {org!r} has no rule named {name!r}")
        _audit(db, actor, org, "rule.delete", name, {})


# --- channels --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Channel:
    """A stored channel; ``url`` and ``secret`` are decrypted only when loaded for delivery, never shown."""

    org: str
    name: str
    kind: str
    target: str
    last_delivery: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failures: int = 0
    watchdog: bool = False  # also gets the always-firing FleetWatchdog alert
    url: str = field(default="", repr=False)
    secret: str | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The ``fleet alert channel list --json`` object (no secret, no full URL)."""
        return {"org": self.org, "channel": self.name, "kind": self.kind, "target": self.target,
                "last_delivery": self.last_delivery, "last_error": self.last_error,
                "last_error_at": self.last_error_at, "failures": self.failures, "watchdog": self.watchdog}


def store_channel(db: Database, box: SecretBox, org: str, name: str, kind: str, url: str, secret: str | None,
                  target: str, watchdog: bool = False, actor: str | None = None) -> None:
    """Store a new channel with its URL and secret encrypted (``target``: the URL as lists show it, no secret).

    RuleError if the org already has a channel of that name.
    """
    check_name(name, "channel")
    with db.transaction():
        _require_org(db, org)
        inserted = db.execute(
            "INSERT INTO alert_channels(org, name, kind, target, url_enc, secret_enc, created, watchdog)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(org, name) DO NOTHING",
            (org, name, kind, target, box.seal(url), None if secret is None else box.seal(secret), time.time(),
             int(watchdog)))
        if inserted != 1:
            raise RuleError(f"org {org!r} already has a channel named {name!r}")
        _audit(db, actor, org, "channel.create", name, {"kind": kind, "target": target, "watchdog": watchdog})


_CHANNEL_COLUMNS = "org, name, kind, target, last_delivery, last_error, last_error_at, failures, watchdog"


def list_channels(db: Database, org: str) -> list[Channel]:
    """An org's channels with their delivery state (no URL, no secret)."""
    _require_org(db, org)
    rows = db.query(f"SELECT {_CHANNEL_COLUMNS} FROM alert_channels WHERE org = ? ORDER BY name", (org,))
    return [_channel(row) for row in rows]


def _channel(row: tuple) -> Channel:
    org, name, kind, target, last_delivery, last_error, last_error_at, failures, watchdog = row
    return Channel(org, name, kind, target, last_delivery, last_error, last_error_at, failures, bool(watchdog))


def channel_kinds(db: Database) -> dict[str, dict[str, str]]:
    """Each org's channels as {org: {channel: kind}} (what the collector groups notifications for)."""
    out: dict[str, dict[str, str]] = {}
    for org, name, kind in db.query("SELECT org, name, kind FROM alert_channels ORDER BY org, name"):
        out.setdefault(org, {})[name] = kind
    return out


def watchdog_channels(db: Database) -> set[tuple[str, str]]:
    """(org, channel) of every channel that gets the always-firing FleetWatchdog alert."""
    return {(org, name) for org, name in db.query("SELECT org, name FROM alert_channels WHERE watchdog = 1")}


def load_channel(db: Database, box: SecretBox, org: str, name: str) -> Channel | None:
    """One channel with its URL and secret decrypted (for delivery), or None if it was removed."""
    row = db.query_one(f"SELECT {_CHANNEL_COLUMNS}, url_enc, secret_enc FROM alert_channels"
                       " WHERE org = ? AND name = ?", (org, name))
    if row is None:
        return None
    org_, name_, kind, target, last_delivery, last_error, last_error_at, failures, watchdog, url_enc, secret_enc = row
    return Channel(org_, name_, kind, target, last_delivery, last_error, last_error_at, failures, bool(watchdog),
                   url=box.open(url_enc), secret=None if secret_enc is None else box.open(secret_enc))


def get_channel(db: Database, box: SecretBox, org: str, name: str) -> Channel:
    """One channel of an org, decrypted (``channel test``); RuleError if there is none of that name."""
    _require_org(db, org)
    channel = load_channel(db, box, org, name)
    if channel is None:
        raise Missing(f"org {org!r} has no channel named {name!r}")
    return channel


def record_delivery(db: Database, org: str, name: str, now: float, error: str | None, actor: str | None = None) -> None:
    """Note a delivery (``error`` None) or a failed attempt on the channel's row; with ``actor``, as its test."""
    _audit(db, actor, org, "channel.test", name, {"delivered": error is None, "error": error})
    if error is None:
        db.execute("UPDATE alert_channels SET last_delivery = ?, failures = 0 WHERE org = ? AND name = ?",
                   (now, org, name))
    else:
        db.execute("UPDATE alert_channels SET last_error = ?, last_error_at = ?, failures = failures + 1"
                   " WHERE org = ? AND name = ?", (error[:500], now, org, name))


def remove_channel(db: Database, org: str, name: str, actor: str | None = None) -> None:
    """Delete a channel and what was waiting to be sent to it; Missing if there is no such channel."""
    with db.transaction():
        _require_org(db, org)
        if db.execute("DELETE FROM alert_channels WHERE org = ? AND name = ?", (org, name)) == 0:
            raise Missing(f"org {org!r} has no channel named {name!r}")
        db.execute("DELETE FROM alert_outbox WHERE org = ? AND channel = ?", (org, name))
        _audit(db, actor, org, "channel.delete", name, {})


# --- silences --------------------------------------------------------------------------------------
SILENCE_COLUMNS = "id, org, machines, rule, starts_at, ends_at, comment"


def add_silence(db: Database, org: str, for_s: float, machines: str = "*", rule: str | None = None,
                comment: str = "", now: float | None = None, actor: str | None = None) -> Silence:
    """Silence an org's alerts matching ``machines`` (and ``rule``) for ``for_s`` seconds from now."""
    if not for_s > 0:
        raise RuleError("a silence needs a duration longer than 0s, e.g. --for 2h")
    check_machines(machines)
    check_comment(comment)
    now = time.time() if now is None else now
    with db.transaction():
        _require_org(db, org)
        if rule is not None and db.query_one("SELECT 1 FROM alert_rules WHERE org = ? AND name = ?",
                                             (org, check_name(rule, "rule"))) is None:
            raise RuleError(f"org {org!r} has no rule named {rule!r}")
        row = db.query_one(
            "INSERT INTO alert_silences(org, machines, rule, comment, created, starts_at, ends_at)"
            f" VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {SILENCE_COLUMNS}",
            (org, machines, rule, comment, now, now, now + for_s))
        assert row is not None
        silence = Silence(*row)
        _audit(db, actor, org, "silence.create", str(silence.id),
               {"for": format_duration(for_s), "machines": machines, "rule": rule, "comment": comment,
                "ends_at": silence.ends_at})
    return silence


def expire_silence(db: Database, org: str, silence_id: int, now: float | None = None,
                   actor: str | None = None) -> None:
    """End a silence now (it stays listed as expired); Missing if the org has no such silence."""
    now = time.time() if now is None else now
    with db.transaction():
        _require_org(db, org)
        if db.query_one("SELECT 1 FROM alert_silences WHERE org = ? AND id = ?", (org, silence_id)) is None:
            raise Missing(f"org {org!r} has no silence {silence_id}")
        db.execute("UPDATE alert_silences SET ends_at = ? WHERE org = ? AND id = ? AND ends_at > ?",
                   (now, org, silence_id, now))
        _audit(db, actor, org, "silence.delete", str(silence_id), {})


def silences_query(now: float, org: str | None = None) -> tuple[str, list[Any]]:
    """SQL and parameters of the silences in force at ``now`` or later (of one org, or all), oldest first."""
    where = "ends_at > ?"
    params: list[Any] = [now]
    if org is not None:
        where += " AND org = ?"
        params.append(org)
    return f"SELECT {SILENCE_COLUMNS} FROM alert_silences WHERE {where} ORDER BY id", params


def load_silences(db: Database, now: float, org: str | None = None) -> list[Silence]:
    """Silences in force at ``now`` or later (of one org, or all), oldest first."""
    return [Silence(*row) for row in db.query(*silences_query(now, org))]


def list_silences(db: Database, org: str, now: float | None = None) -> list[Silence]:
    """An org's current and future silences."""
    _require_org(db, org)
    return load_silences(db, time.time() if now is None else now, org)


# --- acknowledgements --------------------------------------------------------------------------------
def ack_alert(db: Database, org: str, alert_id: int, by: str, actor: str | None = None,
              now: float | None = None) -> tuple[str, float]:
    """Mark a firing alert acknowledged by ``by`` (a person's email); it keeps firing. Returns (acked_by,
    acked_at): the first acknowledgement stands. Missing for an unknown id or another org's; NotFiring otherwise."""
    now = time.time() if now is None else now
    with db.transaction():
        row = db.query_one("SELECT state, rule, machine_id, acked_by, acked_at FROM alerts WHERE org = ? AND id = ?",
                           (org, alert_id))
        if row is None:
            raise Missing(f"org {org!r} has no alert {alert_id}")
        state, rule, machine_id, acked_by, acked_at = row
        if state != "firing":
            raise NotFiring(f"alert {alert_id} is {state}: only a firing alert is acknowledged")
        if acked_by is not None:
            return acked_by, acked_at
        db.execute("UPDATE alerts SET acked_by = ?, acked_at = ? WHERE org = ? AND id = ?", (by, now, org, alert_id))
        _audit(db, actor, org, "alert.ack", str(alert_id), {"rule": rule, "machine_id": machine_id})
    return by, now


def firing_acks(db: Database, orgs: Iterable[str]) -> dict[tuple[str, str, str, float], str]:
    """Who acknowledged each firing alert of ``orgs``, by (org, rule, machine_id, active_at)."""
    wanted = set(orgs)
    return {(org, rule, machine_id, active_at): acked_by for org, rule, machine_id, active_at, acked_by in db.query(
        "SELECT org, rule, machine_id, active_at, acked_by FROM alerts WHERE state = 'firing'"
        " AND acked_by IS NOT NULL") if org in wanted}
