"""Changes to people, each with its audit records in the same transaction: what ``fleet user`` does.

The audit log is per org, so a change is recorded in every org it concerns (a person's orgs for add and
remove), and under org ``''`` when it concerns none. Never a password or a link's token in a record.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.store import audit, people
from fleet.store.database import Database
from fleet.store.people import Invitation, Person


@dataclass(frozen=True)
class Added:
    """A person just added, and their sign-in link when no password was given."""

    person: Person
    invitation: Invitation | None


def _record(db: Database, orgs: list[str], actor: str, action: str, target: str, detail: dict) -> None:
    for org in orgs or [""]:
        audit.record(db, org=org, actor=actor, action=action, target=target, detail=detail)


def add_user(db: Database, email: str, roles: dict[str, str], password: str | None, actor: str) -> Added:
    """Add a person with these roles; without a password, with a sign-in link valid 24 h."""
    with db.transaction():
        person = people.add_person(db, email, roles, password)
        invitation = people.invite(db, person.id) if password is None else None
        _record(db, sorted(person.orgs), actor, "user.add", person.email,
                {"orgs": person.orgs, "password": password is not None})
    return Added(person, invitation)


def reinvite(db: Database, email: str, actor: str) -> Added:
    """A new sign-in link for an existing person (their earlier link stops working)."""
    with db.transaction():
        person = people.require_person(db, email)
        invitation = people.invite(db, person.id)
        _record(db, sorted(person.orgs), actor, "user.invite", person.email, {})
    return Added(person, invitation)


def remove_user(db: Database, email: str, actor: str) -> Person:
    """Remove a person: their sessions and tokens are refused from the next request."""
    with db.transaction():
        person = people.remove_person(db, email)
        _record(db, sorted(person.orgs), actor, "user.remove", person.email, {"orgs": person.orgs})
    return person


def grant_role(db: Database, email: str, org: str, role: str, actor: str) -> str | None:
    """Give a person ``role`` in ``org``; returns the role they had there before (None: none)."""
    with db.transaction():
        before = people.grant(db, email, org, role)
        audit.record(db, org=org, actor=actor, action="user.grant", target=people.normalise_email(email),
                     detail={"role": role, "before": before})
    return before


def revoke_role(db: Database, email: str, org: str, actor: str) -> str:
    """Take away a person's role in ``org`` (and their tokens there); returns the role they had."""
    with db.transaction():
        before = people.revoke(db, email, org)
        audit.record(db, org=org, actor=actor, action="user.revoke", target=people.normalise_email(email),
                     detail={"role": before})
    return before
