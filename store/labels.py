"""Server-side machine labels (``fleet machine label``): stored per key, merged over the agent's.

The collector owns ``machines.agent_labels``; these functions own ``machine_labels``. Each change bumps
``meta.machine_labels_version`` so the collector reloads them with one cheap read, and writes its event.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

import orjson

from fleet.config.ids import validate_id
from fleet.config.labels import MAX_LABELS, LabelError, Labels, check_key, diff, merge
from fleet.store import audit
from fleet.store.database import Database
from fleet.store.orgs import require_org

VERSION_KEY = "machine_labels_version"
LABEL_EVENT = "labels"  # an event's reason starts with this: "labels: env=dev->prod"


def label_event_reason(change: str) -> str:
    """The events table's reason of a label change (old_status and new_status are the machine's status)."""
    return f"{LABEL_EVENT}: {change}"


def labels_version(db: Database) -> str:
    """A token that changes whenever any server label changes."""
    row = db.query_one("SELECT value FROM meta WHERE key = ?", (VERSION_KEY,))
    return row[0] if row else ""


def server_labels(db: Database, org: str | None = None) -> dict[tuple[str, str], dict[str, str]]:
    """Server labels by (org, machine_id), of one org or of all."""
    sql, params = "SELECT org, machine_id, key, value FROM machine_labels", []
    if org is not None:
        sql, params = sql + " WHERE org = ?", [org]
    out: dict[tuple[str, str], dict[str, str]] = {}
    for org_, machine_id, key, value in db.query(sql + " ORDER BY org, machine_id, key", params):
        out.setdefault((org_, machine_id), {})[key] = value
    return out


def agent_labels(text: str | None) -> dict[str, str]:
    """The stored ``machines.agent_labels`` JSON as a dict (``{}`` for none or unreadable)."""
    if not text or text == "{}":
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def set_labels(db: Database, org: str, machine_id: str, pairs: Iterable[str], remove: Iterable[str],
               now: float | None = None, actor: str | None = None) -> dict[str, str]:
    """Set ``KEY=VALUE`` server labels and remove keys of one machine; returns its merged labels.

    The machine need not have reported yet (its labels wait for it). A change of its merged labels is an
    event in the event log. LabelError names a bad label; CredentialError an unknown org.
    """
    validate_id(org, "org")
    validate_id(machine_id, "machine id")
    added = Labels.parse(pairs).as_dict()
    removed = [check_key(key) for key in remove]
    both = sorted(set(added) & set(removed))
    if both:
        raise LabelError(f"label {both[0]!r} both set and removed")
    now = time.time() if now is None else now
    with db.transaction():
        require_org(db, org)
        server = server_labels(db, org).get((org, machine_id), {})
        row = db.query_one("SELECT status, agent_labels FROM machines WHERE org = ? AND machine_id = ?",
                           (org, machine_id))
        agent = agent_labels(row[1]) if row else {}
        new_server = {key: value for key, value in {**server, **added}.items() if key not in removed}
        if len(new_server) > MAX_LABELS:
            raise LabelError(f"too many labels: {len(new_server)} > {MAX_LABELS}")
        db.executemany("DELETE FROM machine_labels WHERE org = ? AND machine_id = ? AND key = ?",
                       [(org, machine_id, key) for key in removed])
        db.executemany("INSERT INTO machine_labels(org, machine_id, key, value, updated) VALUES (?, ?, ?, ?, ?)"
                       " ON CONFLICT(org, machine_id, key) DO UPDATE SET value = excluded.value,"
                       " updated = excluded.updated", [(org, machine_id, k, v, now) for k, v in added.items()])
        old, new = merge(agent, server), merge(agent, new_server)
        change = diff(old, new)
        if change and row is not None:
            db.execute("INSERT INTO events(org, machine_id, ts, old_status, new_status, reason) VALUES (?,?,?,?,?,?)",
                       (org, machine_id, now, row[0], row[0], label_event_reason(change)))
        if new_server != server:
            _bump_version(db)
        if actor is not None:
            audit.record(db, org=org, actor=actor, action="machine.label", target=machine_id,
                         detail={"set": added, "removed": removed})
    return new


def _bump_version(db: Database) -> None:
    db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
               (VERSION_KEY, os.urandom(8).hex()))


def drop_machine(db: Database, org: str, machine_id: str) -> None:
    """Delete a machine's server labels (in the caller's transaction)."""
    if db.execute("DELETE FROM machine_labels WHERE org = ? AND machine_id = ?", (org, machine_id)):
        _bump_version(db)


def drop_org(db: Database, org: str) -> None:
    """Delete an org's server labels (in the caller's transaction)."""
    if db.execute("DELETE FROM machine_labels WHERE org = ?", (org,)):
        _bump_version(db)

