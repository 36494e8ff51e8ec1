"""Machines an admin forgot: gone from the live view at once, from the collector's memory at its next refresh.

Forgetting deletes the machine's row and its server labels (history, events and alerts stay until retention ends)
and queues the forget for the collector serving the org, which drops the machine from its state, resolves its
alerts and clears its retained ping (so a broker or collector restart does not bring it back), then deletes the
queued forget. A machine that
reports again afterwards appears again, as a new one; revoke its certificate first to keep it out.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from fleet.config.ids import validate_id
from fleet.store import audit
from fleet.store.database import Database
from fleet.store.errors import NotFound
from fleet.store.labels import drop_machine
from fleet.store.orgs import require_org


class UnknownMachine(NotFound):
    """The org has no machine of that id in its live view."""


def forget_machine(db: Database, org: str, machine_id: str, actor: str | None = None,
                   now: float | None = None) -> None:
    """Forget a machine of the live view; UnknownMachine when the org has none of that id."""
    validate_id(machine_id, "machine id")
    now = time.time() if now is None else now
    with db.transaction():
        require_org(db, org)
        if db.execute("DELETE FROM machines WHERE org = ? AND machine_id = ?", (org, machine_id)) == 0:
            raise UnknownMachine(f"no machine {machine_id!r} in org {org!r}")
        drop_machine(db, org, machine_id)
        db.execute("INSERT INTO machine_forgets(org, machine_id, ts) VALUES (?, ?, ?)", (org, machine_id, now))
        if actor is not None:
            audit.record(db, org=org, actor=actor, action="machine.forget", target=machine_id)


def pending_forgets(db: Database, orgs: Iterable[str]) -> list[tuple[int, str, str]]:
    """(id, org, machine_id) of the forgets of ``orgs`` the collector has not applied yet, oldest first."""
    wanted = set(orgs)
    return [(row_id, org, machine_id) for row_id, org, machine_id in db.query(
        "SELECT id, org, machine_id FROM machine_forgets ORDER BY id") if org in wanted]


def forgets_done(db: Database, ids: Iterable[int]) -> None:
    """Delete the forgets the collector applied."""
    db.executemany("DELETE FROM machine_forgets WHERE id = ?", [(row_id,) for row_id in ids])
