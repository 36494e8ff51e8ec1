"""The audit log: who changed what in an org, through the web or the CLI. Never a secret in a record."""

from __future__ import annotations

import getpass
import json
import os
import time
from typing import Any

from fleet.store.database import Database

MAX_ENTRIES = 10_000  # one answer's bound (GET /api/audit, fleet audit)


def cli_actor() -> str:
    """The actor of a CLI change: ``cli:<unix user>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = str(os.getuid())
    return f"cli:{user}"


def record(db: Database, *, org: str, actor: str, action: str, target: str, detail: dict | None = None) -> None:
    """Append one entry (inside the caller's transaction when it has one)."""
    db.execute("INSERT INTO audit_log(org, ts, actor, action, target, detail) VALUES (?, ?, ?, ?, ?, ?)",
               (org, time.time(), actor, action, target, json.dumps(detail or {}, sort_keys=True)))


def entries(db: Database, org: str, since: float | None = None) -> list[dict[str, Any]]:
    """The org's entries from ``since`` (default: all), oldest first: ``{"ts", "actor", "action", "target", "detail"}``
    (at most MAX_ENTRIES)."""
    rows = db.query("SELECT ts, actor, action, target, detail FROM audit_log WHERE org = ? AND ts >= ?"
                    " ORDER BY ts, id LIMIT ?", (org, since if since is not None else float("-inf"), MAX_ENTRIES))
    return [{"ts": ts, "actor": actor, "action": action, "target": target, "detail": json.loads(detail)}
            for ts, actor, action, target, detail in rows]
