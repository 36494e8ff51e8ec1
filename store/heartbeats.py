"""The heartbeats table: each long-running part's last sign of life and its detail JSON.

The broker and the collector write theirs every few seconds; the web's /healthz reads the collector's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fleet.store.database import Database


def write_heartbeat(db: Database, component: str, ts: float, detail: Mapping[str, Any]) -> None:
    """Record that ``component`` is alive at ``ts`` (wall clock), with its detail."""
    db.execute("INSERT INTO heartbeats(component, ts, detail) VALUES (?, ?, ?) ON CONFLICT(component)"
               " DO UPDATE SET ts = excluded.ts, detail = excluded.detail",
               (component, ts, json.dumps(detail, separators=(",", ":"))))


def read_heartbeat(db: Database, component: str) -> tuple[float, dict[str, Any]] | None:
    """The last heartbeat of ``component``: (ts, detail), or None if it never wrote one."""
    row = db.query_one("SELECT ts, detail FROM heartbeats WHERE component = ?", (component,))
    if row is None:
        return None
    try:
        detail = json.loads(row[1] or "{}")
    except ValueError:
        detail = {}
    return float(row[0]), detail
