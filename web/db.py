"""Per-request read-only access to the database and the org-scoped queries the API needs.

Queries are the same on SQLite and PostgreSQL except the few that read inside a JSON column
(``_JSON_NUMBER``, ``_JSON_TEXT``) and how each sorts NULLs and matches LIKE: those are spelled per engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from flask import current_app, g

from fleet.config import derived
from fleet.config.labels import Selector, is_selector, label_text, merge
from fleet.config.rules import Silence
from fleet.config.status import MACHINE_STATUSES
from fleet.store.alerting import silences_query
from fleet.store.database import POSTGRESQL, SQLITE, Database, DatabaseBusy, DatabaseError, DatabasePool
from fleet.store.heartbeats import read_heartbeat
from fleet.store.identity import CERTIFICATE, ORG_KEY, cert_not_after
from fleet.store.labels import agent_labels
from fleet.store.labels import server_labels as stored_server_labels
from fleet.store.samples import extra_fields, machine_inventory
from fleet.web.errors import WebError

# The API's machine object: these columns as they are, conflict as a boolean, and system and metrics spliced
# in as the JSON text the collector stored (orjson.Fragment: never decoded only to be encoded again). That
# is as fast as SQLite's JSON functions (docs/benchmarks.md), the same on both engines, and exact: SQLite's
# JSON functions print floats with 15 digits, rounding ties unlike PostgreSQL.
MACHINE_COLUMNS = ("org", "machine_id", "hardware_id", "status", "session", "interval_s", "last_seen", "last_ping",
                   "clock_offset_s", "conflict", "os", "system", "metrics", "first_seen", "lost", "late", "labels")
# ``labels`` is the agent's (machines.agent_labels), merged with the server's (machine_labels) in Python.
_MACHINE_SELECT = ", ".join(MACHINE_COLUMNS[:-1]) + ", agent_labels"
IDENTITY_FIELDS = ("auth", "cert_not_after")  # added to each machine object from its certificate
_JSON_COLUMNS = ("system", "metrics")
# A number inside a JSON column, NULL when absent or not a number (path as a tuple of keys).
_JSON_NUMBER = {
    SQLITE: lambda column, path: f"json_extract({column}, '$.{'.'.join(path)}')",
    POSTGRESQL: lambda column, path: (f"CASE WHEN json_typeof({column}::json #> '{{{','.join(path)}}}') = 'number'"
                                      f" THEN ({column}::json #>> '{{{','.join(path)}}}')::float8 END"),
}
_JSON_TEXT = {
    SQLITE: lambda column, key: f"json_extract({column}, '$.{key}')",
    POSTGRESQL: lambda column, key: f"({column}::json ->> '{key}')",
}
SORTS = {"machine_id": "machine_id", "status": "status", "last_seen": "last_seen", "os": "os",
         "cpu": ("metrics", derived.CPU_PERCENT_PATH), "memory": ("metrics", derived.MEMORY_PERCENT_PATH)}
# SQLite's LIKE ignores ASCII case; PostgreSQL's ILIKE does that (and more).
_LIKE = {SQLITE: "LIKE", POSTGRESQL: "ILIKE"}
# NULLs sort first ascending on SQLite, last on PostgreSQL unless told.
_NULLS = {SQLITE: ("", ""), POSTGRESQL: (" NULLS FIRST", " NULLS LAST")}

T = TypeVar("T")


class DatabaseUnavailable(WebError):
    """The database cannot be opened or queried."""


def pool_for(settings: Any) -> DatabasePool:
    """The app's pool of read-only connections (one per waitress thread at most)."""
    return DatabasePool(settings.database, readonly=True, size=8)


def get_db() -> Database:
    """This request's read-only connection (taken from the app's pool on first use, given back at teardown)."""
    if "db" not in g:
        try:
            g.db = current_app.config["FLEET_DB_POOL"].get()
        except DatabaseError as exc:
            raise DatabaseUnavailable("database unavailable") from exc
    return g.db


def close_db(_exc: BaseException | None = None) -> None:
    """Teardown: give the request's connection back to the pool."""
    db = g.pop("db", None)
    if db is not None:
        current_app.config["FLEET_DB_POOL"].put(db)


def write_pool_for(settings: Any) -> DatabasePool:
    """The app's pool of writing connections (sessions, tokens, the audit log and the write API)."""
    return DatabasePool(settings.database, readonly=False, size=4)


def write(writer: Callable[[Database], T]) -> T:
    """Run ``writer`` in one transaction on a writing connection, converting database errors at the boundary."""
    pool = current_app.config["FLEET_DB_WRITE_POOL"]
    try:
        db = pool.get()
    except DatabaseError as exc:
        raise DatabaseUnavailable("database unavailable") from exc
    try:
        with db.transaction():
            return writer(db)
    except DatabaseError as exc:
        raise DatabaseUnavailable(f"database error: {exc}") from exc
    finally:
        pool.put(db)


def read(reader: Callable[[Database], T]) -> T:
    """Run ``reader`` on this request's connection, converting database errors at the boundary.

    A pooled connection may have been cut while idle (a PostgreSQL restart): the read is tried once more
    on a new connection, which the seam opens by itself (a read is safe to repeat).
    """
    try:
        try:
            return reader(get_db())
        except DatabaseBusy:
            return reader(get_db())
    except DatabaseError as exc:
        raise DatabaseUnavailable(f"database error: {exc}") from exc


def query(sql: str, params: tuple | list = ()) -> list[tuple]:
    """Run a read query (``read``)."""
    return read(lambda db: db.query(sql, params))


def _sort_expression(engine: str, sort: str) -> str:
    spec = SORTS[sort]
    return spec if isinstance(spec, str) else _JSON_NUMBER[engine](*spec)


def _machine_objects(rows: list[tuple], certificates: dict[str, float],
                     server: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """Machine objects from MACHINE_COLUMNS rows, system and metrics as JSON fragments, labels merged with the
    ``server`` labels; ``auth`` and ``cert_not_after`` from the org's unrevoked certificates (machine -> not_after)."""
    objects = []
    for row in rows:
        machine = dict(zip(MACHINE_COLUMNS, row, strict=True))
        machine["conflict"] = bool(machine["conflict"])
        machine["cert_not_after"] = certificates.get(machine["machine_id"])
        machine["auth"] = CERTIFICATE if machine["cert_not_after"] is not None else ORG_KEY
        for column in _JSON_COLUMNS:
            machine[column] = orjson.Fragment(machine[column])
        own = server.get(machine["machine_id"])
        machine["labels"] = (orjson.Fragment(machine["labels"] or "{}") if own is None
                             else merge(agent_labels(machine["labels"]), own))
        objects.append(machine)
    return objects


def machine_labels(org: str) -> dict[str, dict[str, str]]:
    """Each machine's labels (merged), by machine id."""
    server = server_labels(org)
    return {machine_id: merge(agent_labels(text), server.get(machine_id, {}))
            for machine_id, text in query("SELECT machine_id, agent_labels FROM machines WHERE org = ?", (org,))}


# What /metrics shows of a machine, as a plain tuple (10,000 of them per scrape): machine_id, status, last_seen,
# clock_offset_s, conflict, lost, late, its latest metrics (JSON text: decoded one machine at a time, so 10,000
# decoded objects never live at once for the cyclic GC to walk) and its labels (merged).
MachineMetrics = tuple[str, str, float | None, float | None, int, int, int, str, dict[str, str]]


def machine_metrics(org: str) -> list[MachineMetrics]:
    """The org's machines for /metrics, by machine id: only the columns it needs, ``system`` never read.

    Machines with the same labels share one dict (most fleets have a few label sets).
    """
    server = server_labels(org)
    label_sets: dict[str, dict[str, str]] = {}
    out = []
    for machine_id, status, last_seen, offset, conflict, lost, late, metrics, labels_text in query(
            "SELECT machine_id, status, last_seen, clock_offset_s, conflict, lost, late, metrics, agent_labels"
            " FROM machines WHERE org = ? ORDER BY machine_id", (org,)):
        labels = label_sets.get(labels_text)
        if labels is None:
            labels = label_sets[labels_text] = agent_labels(labels_text)
        own = server.get(machine_id)
        out.append((machine_id, status, last_seen, offset, conflict, lost, late, metrics,
                    labels if own is None else merge(labels, own)))
    return out


def server_labels(org: str) -> dict[str, dict[str, str]]:
    """The org's server labels by machine id (``fleet machine label``)."""
    return {machine_id: labels for (_, machine_id), labels in read(lambda db: stored_server_labels(db, org)).items()}


# A machine's label value: the server's if set, else the agent's (NULL when neither has the key).
_AGENT_LABEL = {
    SQLITE: "json_extract(agent_labels, ?)",
    POSTGRESQL: "(agent_labels::json ->> ?)",
}
_SERVER_LABEL = ("(SELECT value FROM machine_labels l WHERE l.org = machines.org"
                 " AND l.machine_id = machines.machine_id AND l.key = ?)")
_NOT_EQUAL = {SQLITE: "IS NOT", POSTGRESQL: "IS DISTINCT FROM"}
_FIND = {SQLITE: "instr(agent_labels, ?)", POSTGRESQL: "strpos(agent_labels, ?)"}


def _label_value(engine: str, key: str, any_server_labels: bool) -> tuple[str, list[Any]]:
    """A machine's value of label ``key`` as SQL (NULL without it), and its parameters."""
    path = f"$.{key}" if engine == SQLITE else key
    if any_server_labels:
        return f"coalesce({_SERVER_LABEL}, {_AGENT_LABEL[engine]})", [key, path]
    return _AGENT_LABEL[engine], [path]


def _label_terms(engine: str, selector: Selector, any_server_labels: bool) -> tuple[list[str], list[Any]]:
    """SQL conditions and parameters for a label selector (all terms must hold; a missing key satisfies !=).

    Without server labels in the org, a term is a search of the stored text for the label's text
    (config.labels.labels_json): no JSON is decoded, which keeps a filtered page as fast as an unfiltered one.
    """
    where: list[str] = []
    params: list[Any] = []
    if not any_server_labels:
        for term in selector.terms:
            where.append(f"{_FIND[engine]} {'=' if term.negated else '>'} 0")
            params.append(label_text(term.key, term.value))
        return where, params
    for term in selector.terms:
        value, value_params = _label_value(engine, term.key, any_server_labels)
        where.append(f"{value} {_NOT_EQUAL[engine] if term.negated else '='} ?")
        params += [*value_params, term.value]
    return where, params


def _where(engine: str, org: str, server: dict[str, dict[str, str]], status: str | None, os_name: str | None,
           search: str | None, selector: Selector | None) -> tuple[str, list[Any]]:
    """The WHERE clause (and its parameters) of the API's machine filters."""
    where, params = ["org = ?"], [org]
    if selector is not None:
        terms, term_params = _label_terms(engine, selector, bool(server))
        where += terms
        params += term_params
    if status:
        where.append("status = ?")
        params.append(status)
    if os_name:
        where.append("os = ?")
        params.append(os_name)
    if search:
        like = _LIKE[engine]
        hostname = _JSON_TEXT[engine]("system", "hostname")
        where.append(f"(machine_id {like} ? ESCAPE '\\' OR {hostname} {like} ? ESCAPE '\\')")
        pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        params += [pattern, pattern]
    return " AND ".join(where), params


def list_machines_json(org: str, status: str | None, os_name: str | None, search: str | None, sort: str,
                       descending: bool, limit: int | None, offset: int, selector: Selector | None = None,
                       group: str | None = None) -> tuple[int, bytes]:
    """An org's machines, filtered, sorted and paginated: (total matching, the page as a JSON array).

    With ``group`` (a label key) the machines come ordered by their value of it first (those without it last),
    so a group's machines are together across pages.
    """
    engine = get_db().engine
    server = server_labels(org)
    clause, params = _where(engine, org, server, status, os_name, search, selector)
    total = query(f"SELECT count(*) FROM machines WHERE {clause}", params)[0][0]
    nulls = _NULLS[engine][1 if descending else 0]
    order = f"{_sort_expression(engine, sort)} {'DESC' if descending else 'ASC'}{nulls}, machine_id"
    if group is not None:
        value, value_params = _label_value(engine, group, bool(server))
        order = f"{value} IS NULL, {value}, {order}"
        params = [*params, *value_params, *value_params]
    page = f" LIMIT {int(limit)} OFFSET {int(offset)}" if limit is not None else ""
    rows = query(f"SELECT {_MACHINE_SELECT} FROM machines WHERE {clause} ORDER BY {order}{page}", params)
    certificates = read(lambda db: cert_not_after(db, org)) if rows else {}
    return total, orjson.dumps(_machine_objects(rows, certificates, server))


def group_counts(org: str, group: str, status: str | None, os_name: str | None, search: str | None,
                 selector: Selector | None) -> list[dict[str, Any]]:
    """``[{"value", "counts": {"online", "stale", "offline"}}]`` of the matching machines per value of label
    ``group``, sorted by value, machines without it last (value null)."""
    engine = get_db().engine
    server = server_labels(org)
    clause, params = _where(engine, org, server, status, os_name, search, selector)
    value, value_params = _label_value(engine, group, bool(server))
    groups: dict[str | None, dict[str, int]] = {}
    for label_value, machine_status, n in query(f"SELECT {value}, status, count(*) FROM machines WHERE {clause}"
                                                " GROUP BY 1, 2", [*value_params, *params]):
        counts = groups.setdefault(label_value, dict.fromkeys(MACHINE_STATUSES, 0))
        counts[machine_status] = counts.get(machine_status, 0) + int(n)
    ordered = sorted(groups.items(), key=lambda item: (item[0] is None, item[0] or ""))
    return [{"value": label_value, "counts": counts} for label_value, counts in ordered]


def list_machines(org: str, *args: Any) -> tuple[int, list[dict[str, Any]]]:
    """Like list_machines_json, decoded into dicts."""
    total, text = list_machines_json(org, *args)
    return total, orjson.loads(text)


def status_counts(org: str) -> dict[str, int]:
    """Machines per status, plus expired (evicted by TTL)."""
    counts = dict.fromkeys(MACHINE_STATUSES, 0)
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


def label_counts(org: str) -> dict[str, dict[str, int]]:
    """``{"KEY": {"VALUE": machines}}`` over the org's machines (merged labels), keys and values sorted."""
    server = server_labels(org)
    counts: dict[str, dict[str, int]] = {}

    def count(labels: dict[str, str], n: int) -> None:
        for key, value in labels.items():
            per_key = counts.setdefault(key, {})
            per_key[value] = per_key.get(value, 0) + n

    if not server:  # most orgs: machines with the same labels counted together by the database
        for text, n in query("SELECT agent_labels, count(*) FROM machines WHERE org = ? GROUP BY agent_labels", (org,)):
            count(agent_labels(text), int(n))
    else:
        parsed: dict[str, dict[str, str]] = {}
        for machine_id, text in query("SELECT machine_id, agent_labels FROM machines WHERE org = ?", (org,)):
            own = parsed.get(text)
            if own is None:
                own = parsed[text] = agent_labels(text)
            count(merge(own, server.get(machine_id, {})), 1)
    return {key: dict(sorted(values.items())) for key, values in sorted(counts.items())}


def os_values(org: str) -> list[str]:
    """Distinct OS names of the org (for the filter)."""
    return [r[0] for r in query("SELECT DISTINCT os FROM machines WHERE org = ? AND os != '' ORDER BY os", (org,))]


def get_machine(org: str, machine_id: str) -> dict[str, Any] | None:
    """One machine of the org, or None (also for another org's machine), with its derived fields.

    ``derived`` holds the latest report's derived fields (fleet.config.derived) and ``disk_mount``, the
    filesystem disk_percent is, so the dashboard shows the numbers history, alert rules and /metrics use.
    """
    rows = query(f"SELECT {_MACHINE_SELECT} FROM machines WHERE org = ? AND machine_id = ?", (org, machine_id))
    if not rows:
        return None
    certificates = read(lambda db: cert_not_after(db, org))
    server = {machine_id: labels} if (labels := server_labels(org).get(machine_id)) else {}
    machine: dict[str, Any] = orjson.loads(orjson.dumps(_machine_objects(rows, certificates, server)[0]))
    metrics = machine["metrics"]
    machine["derived"] = derived.derive(metrics if isinstance(metrics, dict) else {})
    return machine


POINT_COLUMNS = ("ts", "session", "seq", "cpu_percent", "memory_percent", "disk_percent", "load1",
                 "net_bytes_sent", "net_bytes_recv")


def history(org: str, machine_id: str, since: float, until: float, max_points: int) -> list[dict[str, Any]]:
    """Oldest-first history points (raw reports, with 1-minute rollups before raw history begins).

    Besides the fixed columns, a point carries the report's extra numeric fields (``custom.<series>``,
    ``process.<name>``), decoded only for the points returned.
    """
    raw = query(f"SELECT {', '.join(POINT_COLUMNS)}, field_names, field_values FROM reports WHERE org = ?"
                " AND machine_id = ? AND ts >= ? AND ts <= ? ORDER BY ts, session, seq",
                (org, machine_id, since, until))
    first_raw = raw[0][0] if raw else until
    rolled = query("SELECT minute, NULL, NULL, cpu_percent, memory_percent, disk_percent, load1, net_bytes_sent, "
                   "net_bytes_recv, fields, NULL FROM rollups WHERE org = ? AND machine_id = ? AND minute >= ? "
                   "AND minute < ? ORDER BY minute", (org, machine_id, since, min(first_raw, until)))
    rows = rolled + raw
    if len(rows) > max_points:  # keep the shape, bound the payload
        step = len(rows) / max_points
        rows = [rows[int(i * step)] for i in range(max_points - 1)] + [rows[-1]]
    points = []
    for row in rows:
        point = dict(zip(POINT_COLUMNS, row, strict=False))
        if row[-1] is not None:  # a report's: names and values
            point.update(extra_fields(row[-2], row[-1]))
        elif row[-2]:  # a rollup's: {"field": [sum, samples]}
            point.update(_rolled_fields(row[-2]))
        points.append(point)
    return points


def _rolled_fields(text: str) -> dict[str, float | None]:
    """A rollup's extra fields, ``{"field": [sum, samples]}``, as each field's mean."""
    try:
        fields = orjson.loads(text)
    except ValueError:
        return {}
    return {name: value[0] / value[1] if value[1] else None for name, value in fields.items()
            if isinstance(value, list) and len(value) == 2}


def inventory(org: str, machine_id: str) -> list[dict[str, Any]]:
    """The machine's system inventory as first reported and at each change, oldest first."""
    return read(lambda db: machine_inventory(db, org, machine_id))


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
                 "resolved_at", "acked_by", "acked_at")


def silences(org: str, now: float) -> list[Silence]:
    """The org's silences in force at ``now`` or later."""
    return [Silence(*row) for row in query(*silences_query(now, org))]


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
    labels = machine_labels(org) if any(is_selector(s.machines) for s in active) else {}
    out = []
    for row in rows:
        alert = dict(zip(ALERT_COLUMNS, row, strict=True))
        alert["started_at"] = alert["fired_at"] if alert["fired_at"] is not None else alert["active_at"]
        alert["silenced"] = any(s.covers(alert["rule"], alert["machine_id"], now, labels.get(alert["machine_id"]))
                                for s in active)
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
    return read(lambda db: read_heartbeat(db, component))
