"""An org's alerting setup in ``fleet.db``: rules, channels (secrets encrypted) and silences.

The ``fleet alert`` commands call these; the collector reads the same tables every few seconds, so a
change applies without a restart (SPEC: within 5 s). Channel URLs are checked and channel secrets made
by ``fleet.collector.notify`` (collector/channels.py); this module only stores them, sealed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.config.database import connect, ensure_schema
from fleet.config.errors import CredentialError
from fleet.config.rules import (
    DEFAULT_RULES,
    Rule,
    RuleError,
    Silence,
    check_comment,
    check_glob,
    check_name,
    parse_condition,
)
from fleet.config.secretbox import SecretBox, secret_box


def _open(data_dir: Path) -> sqlite3.Connection:
    conn = connect(Path(data_dir) / "fleet.db")
    ensure_schema(conn)
    return conn


def _require_org(conn: sqlite3.Connection, org: str) -> None:
    check_name(org, "org")
    if conn.execute("SELECT 1 FROM orgs WHERE name = ?", (org,)).fetchone() is None:
        raise CredentialError(f"no such org {org!r}")


# Tables holding an org's alerting state, dropped with the org.
ORG_TABLES = ("alert_rules", "alert_channels", "alerts", "alert_silences", "alert_outbox")


def drop_org(conn: sqlite3.Connection, org: str) -> None:
    """Delete an org's rules, channels, alerts, silences and pending notifications (no commit)."""
    for table in ORG_TABLES:
        conn.execute(f"DELETE FROM {table} WHERE org = ?", (org,))


# --- rules ---------------------------------------------------------------------------------------
def insert_default_rules(conn: sqlite3.Connection, org: str, now: float) -> None:
    """Give an org SPEC's three default rules (no commit)."""
    for name, when, for_s, severity in DEFAULT_RULES:
        insert_rule(conn, Rule(org, name, parse_condition(when), for_s, "*", severity), now)


def insert_rule(conn: sqlite3.Connection, rule: Rule, now: float) -> bool:
    """Insert a rule unless one of that name exists; True when inserted (no commit)."""
    cursor = conn.execute(
        "INSERT INTO alert_rules(org, name, expr, for_s, machines, severity, created) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(org, name) DO NOTHING",
        (rule.org, rule.name, str(rule.when), float(rule.for_s), rule.machines, rule.severity, now))
    return cursor.rowcount == 1


def add_rule(data_dir: Path, rule: Rule) -> None:
    """Store a new rule of an existing org; CredentialError for an unknown org, RuleError for a taken name."""
    conn = _open(data_dir)
    try:
        with conn:
            _require_org(conn, rule.org)
            if not insert_rule(conn, rule, time.time()):
                raise RuleError(f"org {rule.org!r} already has a rule named {rule.name!r}")
    finally:
        conn.close()


def _rule(row: tuple) -> Rule:
    org, name, expr, for_s, machines, severity = row
    return Rule(org, name, parse_condition(expr), float(for_s), machines, severity)


_RULE_COLUMNS = "org, name, expr, for_s, machines, severity"


def list_rules(data_dir: Path, org: str) -> list[Rule]:
    """An org's rules by name."""
    conn = _open(data_dir)
    try:
        _require_org(conn, org)
        rows = conn.execute(f"SELECT {_RULE_COLUMNS} FROM alert_rules WHERE org = ? ORDER BY name", (org,))
        return [_rule(row) for row in rows]
    finally:
        conn.close()


def load_rules(conn: sqlite3.Connection, orgs: Iterable[str] | None = None) -> dict[str, list[Rule]]:
    """Every org's rules (only ``orgs`` when given), for the collector; rows that no longer parse are skipped."""
    wanted = None if orgs is None else set(orgs)
    out: dict[str, list[Rule]] = {}
    for row in conn.execute(f"SELECT {_RULE_COLUMNS} FROM alert_rules ORDER BY org, name"):
        if wanted is not None and row[0] not in wanted:
            continue
        try:
            out.setdefault(row[0], []).append(_rule(row))
        except RuleError:
            continue
    return out


def remove_rule(data_dir: Path, org: str, name: str) -> None:
    """Delete a rule; the collector resolves its alerts. RuleError if there is no such rule."""
    conn = _open(data_dir)
    try:
        with conn:
            _require_org(conn, org)
            if conn.execute("DELETE FROM alert_rules WHERE org = ? AND name = ?", (org, name)).rowcount == 0:
                raise RuleError(f"org {org!r} has no rule named {name!r}")
    finally:
        conn.close()


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
    url: str = field(default="", repr=False)
    secret: str | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The ``fleet alert channel list --json`` object (no secret, no full URL)."""
        return {"org": self.org, "channel": self.name, "kind": self.kind, "target": self.target,
                "last_delivery": self.last_delivery, "last_error": self.last_error,
                "last_error_at": self.last_error_at, "failures": self.failures}


def store_channel(data_dir: Path, org: str, name: str, kind: str, url: str, secret: str | None,
                  target: str) -> None:
    """Store a new channel with its URL and secret encrypted (``target``: the URL as lists show it, no secret).

    RuleError if the org already has a channel of that name.
    """
    check_name(name, "channel")
    box = secret_box(data_dir)
    conn = _open(data_dir)
    try:
        with conn:
            _require_org(conn, org)
            cursor = conn.execute(
                "INSERT INTO alert_channels(org, name, kind, target, url_enc, secret_enc, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(org, name) DO NOTHING",
                (org, name, kind, target, box.seal(url), None if secret is None else box.seal(secret),
                 time.time()))
            if cursor.rowcount != 1:
                raise RuleError(f"org {org!r} already has a channel named {name!r}")
    finally:
        conn.close()


_CHANNEL_COLUMNS = "org, name, kind, target, last_delivery, last_error, last_error_at, failures"


def list_channels(data_dir: Path, org: str) -> list[Channel]:
    """An org's channels with their delivery state (no URL, no secret)."""
    conn = _open(data_dir)
    try:
        _require_org(conn, org)
        rows = conn.execute(f"SELECT {_CHANNEL_COLUMNS} FROM alert_channels WHERE org = ? ORDER BY name", (org,))
        return [Channel(*row) for row in rows]
    finally:
        conn.close()


def channel_kinds(conn: sqlite3.Connection) -> dict[str, dict[str, str]]:
    """Each org's channels as {org: {channel: kind}} (what the collector groups notifications for)."""
    out: dict[str, dict[str, str]] = {}
    for org, name, kind in conn.execute("SELECT org, name, kind FROM alert_channels ORDER BY org, name"):
        out.setdefault(org, {})[name] = kind
    return out


def load_channel(conn: sqlite3.Connection, box: SecretBox, org: str, name: str) -> Channel | None:
    """One channel with its URL and secret decrypted (for delivery), or None if it was removed."""
    row = conn.execute(f"SELECT {_CHANNEL_COLUMNS}, url_enc, secret_enc FROM alert_channels"
                       " WHERE org = ? AND name = ?", (org, name)).fetchone()
    if row is None:
        return None
    org_, name_, kind, target, last_delivery, last_error, last_error_at, failures, url_enc, secret_enc = row
    return Channel(org_, name_, kind, target, last_delivery, last_error, last_error_at, failures, url=box.open(url_enc),
                   secret=None if secret_enc is None else box.open(secret_enc))


def get_channel(data_dir: Path, org: str, name: str) -> Channel:
    """One channel of an org, decrypted (``channel test``); RuleError if there is none of that name."""
    box = secret_box(data_dir, create=False)
    conn = _open(data_dir)
    try:
        _require_org(conn, org)
        channel = load_channel(conn, box, org, name)
    finally:
        conn.close()
    if channel is None:
        raise RuleError(f"org {org!r} has no channel named {name!r}")
    return channel


def record_delivery(conn: sqlite3.Connection, org: str, name: str, now: float, error: str | None) -> None:
    """Note a delivery (``error`` None) or a failed attempt on the channel's row (no commit)."""
    if error is None:
        conn.execute("UPDATE alert_channels SET last_delivery = ?, failures = 0 WHERE org = ? AND name = ?",
                     (now, org, name))
    else:
        conn.execute("UPDATE alert_channels SET last_error = ?, last_error_at = ?, failures = failures + 1"
                     " WHERE org = ? AND name = ?", (error[:500], now, org, name))


def remove_channel(data_dir: Path, org: str, name: str) -> None:
    """Delete a channel and what was waiting to be sent to it; RuleError if there is no such channel."""
    conn = _open(data_dir)
    try:
        with conn:
            _require_org(conn, org)
            if conn.execute("DELETE FROM alert_channels WHERE org = ? AND name = ?", (org, name)).rowcount == 0:
                raise RuleError(f"org {org!r} has no channel named {name!r}")
            conn.execute("DELETE FROM alert_outbox WHERE org = ? AND channel = ?", (org, name))
    finally:
        conn.close()


# --- silences --------------------------------------------------------------------------------------
_SILENCE_COLUMNS = "id, org, machines, rule, starts_at, ends_at, comment"


def add_silence(data_dir: Path, org: str, for_s: float, machines: str = "*", rule: str | None = None,
                comment: str = "", now: float | None = None) -> Silence:
    """Silence an org's alerts matching ``machines`` (and ``rule``) for ``for_s`` seconds from now."""
    if not for_s > 0:
        raise RuleError("a silence needs a duration longer than 0s, e.g. --for 2h")
    check_glob(machines)
    check_comment(comment)
    now = time.time() if now is None else now
    conn = _open(data_dir)
    try:
        with conn:
            _require_org(conn, org)
            if rule is not None and conn.execute("SELECT 1 FROM alert_rules WHERE org = ? AND name = ?",
                                                 (org, check_name(rule, "rule"))).fetchone() is None:
                raise RuleError(f"org {org!r} has no rule named {rule!r}")
            row = conn.execute(
                "INSERT INTO alert_silences(org, machines, rule, comment, created, starts_at, ends_at)"
                f" VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {_SILENCE_COLUMNS}",
                (org, machines, rule, comment, now, now, now + for_s)).fetchone()
    finally:
        conn.close()
    return Silence(*row)


def expire_silence(data_dir: Path, org: str, silence_id: int, now: float | None = None) -> None:
    """End a silence now (it stays listed as expired); RuleError if the org has no such silence."""
    now = time.time() if now is None else now
    conn = _open(data_dir)
    try:
        with conn:
            _require_org(conn, org)
            if conn.execute("SELECT 1 FROM alert_silences WHERE org = ? AND id = ?",
                            (org, silence_id)).fetchone() is None:
                raise RuleError(f"org {org!r} has no silence {silence_id}")
            conn.execute("UPDATE alert_silences SET ends_at = ? WHERE org = ? AND id = ? AND ends_at > ?",
                         (now, org, silence_id, now))
    finally:
        conn.close()


def load_silences(conn: sqlite3.Connection, now: float, org: str | None = None) -> list[Silence]:
    """Silences in force at ``now`` or later (of one org, or all), oldest first."""
    where = "ends_at > ?"
    params: list[Any] = [now]
    if org is not None:
        where += " AND org = ?"
        params.append(org)
    rows = conn.execute(f"SELECT {_SILENCE_COLUMNS} FROM alert_silences WHERE {where} ORDER BY id", params)
    return [Silence(*row) for row in rows]


def list_silences(data_dir: Path, org: str, now: float | None = None) -> list[Silence]:
    """An org's current and future silences."""
    conn = _open(data_dir)
    try:
        _require_org(conn, org)
        return load_silences(conn, time.time() if now is None else now, org)
    finally:
        conn.close()
