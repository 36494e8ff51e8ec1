"""Personal API tokens: named, one org each, stored as SHA-256 hashes, acting with the person's current role.

A token is shown once, at creation. It reads as ``fleet_pt_<random>`` so it is told from an org's reader key
(and found by secret scanners) without a lookup.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from fleet.store.database import Database
from fleet.store.errors import PeopleError
from fleet.store.people import Person, get_person, new_secret, secret_digest, touch_due

PREFIX = "fleet_pt_"
NAME_MAX = 64
MAX_TOKENS_PER_PERSON = 100
_NAME = re.compile(r"[^\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class NewToken:
    """A token just made: its id and the token itself (shown once, never by repr)."""

    id: int
    token: str = field(repr=False)


@dataclass(frozen=True)
class TokenUse:
    """A valid token's org and person (with current roles), and whether its last_used is due to be written."""

    id: int
    org: str
    person: Person
    touch_due: bool


def is_personal_token(token: str) -> bool:
    """Whether a bearer token has the personal token's form."""
    return token.startswith(PREFIX)


def check_name(name: Any) -> str:
    """A token's name when acceptable: 1 to 64 printable characters, trimmed; PeopleError otherwise."""
    text = name.strip() if isinstance(name, str) else ""
    if not text or len(text) > NAME_MAX or not _NAME.fullmatch(text):
        raise PeopleError(f"a token's name must be 1 to {NAME_MAX} printable characters")
    return text


def create(db: Database, person: Person, org: str, name: str, now: float | None = None) -> NewToken:
    """A new token of ``person`` for ``org`` (where they must hold a role); PeopleError otherwise."""
    name = check_name(name)
    now = time.time() if now is None else now
    token = PREFIX + new_secret()
    with db.transaction():
        current = get_person(db, person.id)
        if current is None or org not in current.orgs:
            raise PeopleError(f"no role in org {org!r}")
        count = db.query_one("SELECT COUNT(*) FROM api_tokens WHERE person = ?", (person.id,))
        if count is not None and count[0] >= MAX_TOKENS_PER_PERSON:
            raise PeopleError(f"at most {MAX_TOKENS_PER_PERSON} tokens per person: delete one first")
        db.execute("INSERT INTO api_tokens(person, org, name, digest, created) VALUES (?, ?, ?, ?, ?)",
                   (person.id, org, name, secret_digest(token), now))
        row = db.query_one("SELECT id FROM api_tokens WHERE digest = ?", (secret_digest(token),))
    assert row is not None
    return NewToken(int(row[0]), token)


def lookup(db: Database, token: str, now: float | None = None) -> TokenUse | None:
    """The token's use (org, person) when it is valid; None otherwise."""
    now = time.time() if now is None else now
    row = db.query_one("SELECT id, person, org, last_used FROM api_tokens WHERE digest = ?", (secret_digest(token),))
    if row is None:
        return None
    person = get_person(db, row[1])
    if person is None:
        return None
    return TokenUse(int(row[0]), row[2], person, touch_due(row[3], now))


def touch(db: Database, token_id: int, now: float | None = None) -> None:
    """Record that a token was used now."""
    db.execute("UPDATE api_tokens SET last_used = ? WHERE id = ?", (time.time() if now is None else now, token_id))


def list_tokens(db: Database, person_id: int) -> list[dict[str, Any]]:
    """A person's tokens: ``{"id", "name", "org", "created", "last_used"}``, oldest first; never the token."""
    rows = db.query("SELECT id, name, org, created, last_used FROM api_tokens WHERE person = ? ORDER BY id",
                    (person_id,))
    return [{"id": int(i), "name": n, "org": o, "created": c, "last_used": u} for i, n, o, c, u in rows]


def delete(db: Database, person_id: int, token_id: int) -> dict[str, Any] | None:
    """Delete one of a person's tokens; the deleted token's listing, or None when they have no such token."""
    with db.transaction():
        found = [t for t in list_tokens(db, person_id) if t["id"] == token_id]
        if not found:
            return None
        db.execute("DELETE FROM api_tokens WHERE id = ? AND person = ?", (token_id, person_id))
    return found[0]
