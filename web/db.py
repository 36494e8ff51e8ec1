"""Per-request read-only access to ``fleet.db`` and the org-scoped queries the API needs."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from flask import current_app, g

from fleet.config.alerting import load_silences
from fleet.config.database import DatabaseError, connect
from fleet.config.rules import Silence
from fleet.web.errors import WebError

# The API's machine object, assembled by SQLite's JSON functions: for 10,000 machines that is ~10x
# faster than decoding each row's system/metrics JSON in Python only to encode it again.
MACHINE_JSON = ("json_object('org', org, 'machine_id', machine_id, 'hardware_id', hardware_id, 'status', status, "
                "'session', session, 'interval_s', interval_s, 'last_seen', last_seen, 'last_ping', last_ping, "
                "'clock_offset_s', clock_offset_s, 'conflict', json(CASE WHEN conflict THEN 'true' ELSE 'false' END), "
                "'os', os, 'system', json(system), 'metrics', json(metrics), 'first_seen', first_seen, "
                "'lost', lost, 'late', late)")
SORTS = {"machine_id": "machine_id", "status": "status", "last_seen": "last_seen", "os": "os",
         "cpu": "json_extract(metrics, '$.cpu_percent')", "memory": "json_extract(metrics, '$.memory.percent')"}


class DatabaseUnavailable(WebError):
    """fleet.db cannot be opened or queried."""


def get_db() -> sqlite3.Connection:
    """This request's read-only connection (opened on first use, closed at teardown)."""
    if "db" not in g:
        try:
            g.db = connect(current_app.config["FLEET_SETTINGS"].db_path, readonly=True, check_same_thread=False)
        except DatabaseError as exc:
            raise DatabaseUnavailable("database unavailable") from exc
    return g.db


def close_db(_exc: BaseException | None = None) -> None:
    """Teardown: close the request's connection."""
    db = g.pop("db", None)
    if db is not None:
        db.close()


def query(sql: str, params: tuple | list = ()) -> list[tuple]:
    """Run a read query, converting sqlite errors at the boundary."""
    try:
        return get_db().execute(sql, params).fetchall()
    except sqlite3.Error as exc:
        raise DatabaseUnavailable(f"database error: {exc}") from exc


def list_machines_json(org: str, status: str | None, os_name: str | None, search: str | None, sort: str,
                       descending: bool, limit: int | None, offset: int) -> tuple[int, str]:
    """An org's machines, filtered, sorted and paginated: (total matching, JSON array text of the page)."""
    where, params = ["org = ?"], [org]
    if status:
        where.append("status = ?")
        params.append(status)
    if os_name:
        where.append("os = ?")
        params.append(os_name)
    if search:
        where.append("(machine_id LIKE ? ESCAPE '\\' OR json_extract(system, '$.hostname') LIKE ? ESCAPE '\\')")
        pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        params += [pattern, pattern]
    clause = " AND ".join(where)
    total = query(f"SELECT count(*) FROM machines WHERE {clause}", params)[0][0]
    order = f"{SORTS[sort]} {'DESC' if descending else 'ASC'}, machine_id"
    page = f" LIMIT {int(limit)} OFFSET {int(offset)}" if limit is not None else ""
    rows = query(f"SELECT coalesce(json_group_array(json(m)), '[]') FROM (SELECT {MACHINE_JSON} AS m FROM machines "
                 f"WHERE {clause} ORDER BY {order}{page})", params)
    return total, rows[0][0]


def list_machines(org: str, *args: Any) -> tuple[int, list[dict[str, Any]]]:
    """Like list_machines_json, decoded into dicts."""
    total, text = list_machines_json(org, *args)
    return total, json.loads(text)


def status_counts(org: str) -> dict[str, int]:
    """Machines per status, plus expired (evicted by TTL)."""
    counts = {"online": 0, "stale": 0, "offline": 0}
    for status, n in query("SELECT status, count(*) FROM machines WHERE org = ? GROUP BY status", (org,)):
        counts[status] = n
    counts["expired"] = expired_count(org)
    return counts


def expired_count(org: str) -> int:
    """Machines of the org evicted by TTL so far."""
    rows = query("SELECT expired FROM org_stats WHERE org = ?", (org,))
    return int(rows[0][0]) if rows else 0


def lost_count(org: str) -> int:
    """Reports of the org's ended sessions that never arrived (settled tails, evicted machines included)."""
    rows = query("SELECT lost FROM org_stats WHERE org = ?", (org,))
    return int(rows[0][0]) if rows else 0


def os_values(org: str) -> list[str]:
    """Distinct OS names of the org (for the filter)."""
    return [r[0] for r in query("SELECT DISTINCT os FROM machines WHERE org = ? AND os != '' ORDER BY os", (org,))]


def get_machine(org: str, machine_id: str) -> dict[str, Any] | None:
    """One machine of the org, or None (also for another org's machine)."""
    rows = query(f"SELECT {MACHINE_JSON} FROM machines WHERE org = ? AND machine_id = ?", (org, machine_id))
    return json.loads(rows[0][0]) if rows else None


POINT_COLUMNS = ("ts", "session", "seq", "cpu_percent", "memory_percent", "disk_percent", "load1",
                 "net_bytes_sent", "net_bytes_recv")


def history(org: str, machine_id: str, since: float, until: float, max_points: int) -> list[dict[str, Any]]:
    """Oldest-first history points (raw reports, with 1-minute rollups before raw history begins).

    Besides the fixed columns, a point carries the report's extra numeric fields (``custom.<series>``,
    ``process.<name>``), kept as a small JSON object per row and decoded only for the points returned.
    """
    raw = query(f"SELECT {', '.join(POINT_COLUMNS)}, fields FROM reports WHERE org = ? AND machine_id = ? "
                "AND ts >= ? AND ts <= ? ORDER BY ts, session, seq", (org, machine_id, since, until))
    first_raw = raw[0][0] if raw else until
    rolled = query("SELECT minute, NULL, NULL, cpu_percent, memory_percent, disk_percent, load1, net_bytes_sent, "
                   "net_bytes_recv, fields FROM rollups WHERE org = ? AND machine_id = ? AND minute >= ? "
                   "AND minute < ? ORDER BY minute", (org, machine_id, since, min(first_raw, until)))
    rows = rolled + raw
    if len(rows) > max_points:  # keep the shape, bound the payload
        step = len(rows) / max_points
        rows = [rows[int(i * step)] for i in range(max_points - 1)] + [rows[-1]]
    points = []
    for row in rows:
        point = dict(zip(POINT_COLUMNS, row, strict=False))
        if row[-1]:
            point.update(_extra_fields(row[-1]))
        points.append(point)
    return points


def _extra_fields(text: str) -> dict[str, float | None]:
    """A row's extra fields: a report's ``{"field": n}``, or a rollup's ``{"field": [sum, samples]}`` as the mean."""
    try:
        fields = json.loads(text)
    except ValueError:
        return {}
    return {name: (value[0] / value[1] if value[1] else None) if isinstance(value, list) else value
            for name, value in fields.items()}


def events(org: str, since: float, machine_id: str | None, limit: int) -> list[dict[str, Any]]:
    """Status transitions of the org (optionally one machine), oldest first, at most ``limit`` newest."""
    where, params = "org = ? AND ts >= ?", [org, since]
    if machine_id:
        where += " AND machine_id = ?"
        params.append(machine_id)
    rows = query(f"SELECT id, machine_id, ts, old_status, new_status, reason FROM events WHERE {where} "
                 f"ORDER BY ts DESC, id DESC LIMIT ?", [*params, limit])
    return [{"id": i, "machine_id": m, "ts": ts, "old_status": old, "new_status": new, "reason": reason}
            for i, m, ts, old, new, reason in reversed(rows)]


ALERT_COLUMNS = ("id", "rule", "machine_id", "state", "severity", "value", "summary", "active_at", "fired_at",
                 "resolved_at")


def silences(org: str, now: float) -> list[Silence]:
    """The org's silences in force at ``now`` or later."""
    try:
        return load_silences(get_db(), now, org)
    except sqlite3.Error as exc:
        raise DatabaseUnavailable(f"database error: {exc}") from exc


def alerts(org: str, state: str | None, since: float, machine_id: str | None, limit: int, now: float,
           alert_id: int | None = None) -> list[dict[str, Any]]:
    """The org's alerts, newest first: pending and firing ones, and those resolved at or after ``since``."""
    where, params = ["org = ?", "(resolved_at IS NULL OR resolved_at >= ?)"], [org, since]
    if alert_id is not None:
        where.append("id = ?")
        params.append(alert_id)
    if state:
        where.append("state = ?")
        params.append(state)
    if machine_id:
        where.append("machine_id = ?")
        params.append(machine_id)
    rows = query(f"SELECT {', '.join(ALERT_COLUMNS)} FROM alerts WHERE {' AND '.join(where)}"
                 " ORDER BY coalesce(resolved_at, fired_at, active_at) DESC, id DESC LIMIT ?", [*params, limit])
    active = [s for s in silences(org, now) if s.active(now)]
    out = []
    for row in rows:
        alert = dict(zip(ALERT_COLUMNS, row, strict=True))
        alert["started_at"] = alert["fired_at"] if alert["fired_at"] is not None else alert["active_at"]
        alert["silenced"] = any(s.covers(alert["rule"], alert["machine_id"], now) for s in active)
        out.append(alert)
    return out


def firing_counts(org: str) -> list[tuple[str, str, int]]:
    """(rule, severity, firing alerts) for each rule of the org, and for firing alerts of removed rules."""
    counts: dict[tuple[str, str], int] = {
        (rule, severity): 0 for rule, severity in query("SELECT name, severity FROM alert_rules WHERE org = ?", (org,))}
    for rule, severity, n in query("SELECT rule, severity, count(*) FROM alerts WHERE org = ? AND state = 'firing'"
                                   " GROUP BY rule, severity", (org,)):
        counts[(rule, severity)] = int(n)
    return [(rule, severity, n) for (rule, severity), n in sorted(counts.items())]


def drop_counts() -> dict[str, int]:
    """The collector's dropped-message counters by reason."""
    return {reason: int(n) for reason, n in query("SELECT reason, count FROM drops ORDER BY reason")}


def heartbeat(component: str) -> tuple[float, dict[str, Any]] | None:
    """Last heartbeat of a long-running part: (ts, detail)."""
    rows = query("SELECT ts, detail FROM heartbeats WHERE component = ?", (component,))
    if not rows:
        return None
    try:
        detail = json.loads(rows[0][1] or "{}")
    except ValueError:
        detail = {}
    return float(rows[0][0]), detail
