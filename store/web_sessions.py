"""Signed-in web sessions, kept on the server: the cookie holds a random id, the database only its SHA-256.

A session ends when its person signs out or is removed, after SESSION_IDLE_S without a request, or SESSION_S
after sign-in. What the person may do is read from their roles at every request, so a revoked role applies
to a session at once.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from fleet.store.database import Database
from fleet.store.people import Person, get_person, new_secret, secret_digest, touch_due

SESSION_S = 7 * 24 * 3600.0
SESSION_IDLE_S = 24 * 3600.0
MAX_SESSIONS_PER_PERSON = 50  # signing in again and again cannot grow the table without bound


@dataclass(frozen=True)
class NewSession:
    """A session just begun: its id (the cookie's value) and CSRF token, never shown by repr."""

    session_id: str = field(repr=False)
    csrf_token: str = field(repr=False)
    expires_at: float


@dataclass(frozen=True)
class SignedIn:
    """A live session's person and CSRF token, and whether its last_seen is due to be written."""

    person: Person
    csrf_token: str = field(repr=False)
    id_hash: str = field(repr=False)
    touch_due: bool


def begin(db: Database, person_id: int, now: float | None = None) -> NewSession:
    """Start a session for a person (a fresh random id); ended sessions and the person's oldest past the cap go."""
    now = time.time() if now is None else now
    session_id, csrf = new_secret(), secrets.token_urlsafe(32)
    with db.transaction():
        db.execute("DELETE FROM web_sessions WHERE expires_at <= ? OR last_seen <= ?", (now, now - SESSION_IDLE_S))
        rows = db.query("SELECT id_hash FROM web_sessions WHERE person = ? ORDER BY created DESC, id_hash",
                        (person_id,))
        for (old,) in rows[MAX_SESSIONS_PER_PERSON - 1:]:
            db.execute("DELETE FROM web_sessions WHERE id_hash = ?", (old,))
        db.execute("INSERT INTO web_sessions(id_hash, person, csrf_token, created, last_seen, expires_at)"
                   " VALUES (?, ?, ?, ?, ?, ?)",
                   (secret_digest(session_id), person_id, csrf, now, now, now + SESSION_S))
    return NewSession(session_id, csrf, now + SESSION_S)


def lookup(db: Database, session_id: str, now: float | None = None) -> SignedIn | None:
    """The live session with this id and its person's current roles; None when unknown or ended."""
    now = time.time() if now is None else now
    id_hash = secret_digest(session_id)
    row = db.query_one("SELECT person, csrf_token, last_seen FROM web_sessions"
                       " WHERE id_hash = ? AND expires_at > ? AND last_seen > ?", (id_hash, now, now - SESSION_IDLE_S))
    if row is None:
        return None
    person = get_person(db, row[0])
    if person is None:
        return None
    return SignedIn(person, row[1], id_hash, touch_due(row[2], now))


def touch(db: Database, id_hash: str, now: float | None = None) -> None:
    """Record that a session was used now."""
    db.execute("UPDATE web_sessions SET last_seen = ? WHERE id_hash = ?",
               (time.time() if now is None else now, id_hash))


def end(db: Database, session_id: str) -> bool:
    """End the session with this id; whether there was one."""
    return db.execute("DELETE FROM web_sessions WHERE id_hash = ?", (secret_digest(session_id),)) > 0
