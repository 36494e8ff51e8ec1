"""People and their roles per org, passwords (argon2id) and one-time invitation links.

A person is a lowercased email with an optional password; what they may do is their role in each org. Secrets
that are random (invitation tokens here, sessions and API tokens in their modules) are stored as SHA-256
hashes: they carry 256 bits, so a slow hash adds nothing. Passwords are chosen by people, so they get argon2id.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from fleet.config.ids import validate_id
from fleet.store.database import Database
from fleet.store.errors import CredentialError, PeopleError
from fleet.store.orgs import require_org

ROLES = ("viewer", "operator", "admin")
SECRET_BYTES = 32
INVITATION_S = 24 * 3600.0
TOUCH_S = 60.0  # a session's last_seen or a token's last_used is written at most this often: a request is a read
PASSWORD_MIN = 8
PASSWORD_MAX = 1024  # argon2 takes any length; a bound keeps a request's work bounded
EMAIL_MAX = 254
# The WHATWG HTML form's e-mail rule: what browsers accept in <input type=email>.
_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
# OWASP's argon2id minimum (19 MiB, 2 passes, 1 lane): tens of milliseconds on one core per sign-in.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16, type=Type.ID)
_dummy_lock = threading.Lock()
_dummy_hash: list[str] = []


@dataclass(frozen=True)
class Person:
    """A person: their id, lowercased email and role in each org they belong to."""

    id: int
    email: str
    orgs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.email != normalise_email(self.email):
            raise PeopleError(f"email {self.email!r} is not in normal form")
        for org, role in self.orgs.items():
            validate_id(org, "org")
            check_role(role)

    def as_dict(self) -> dict[str, Any]:
        """``{"email", "orgs"}``: what the API and ``fleet user list`` show of a person."""
        return {"email": self.email, "orgs": dict(self.orgs)}


def check_role(role: str) -> str:
    """``role`` when it is one of ROLES; PeopleError otherwise."""
    if role not in ROLES:
        raise PeopleError(f"unknown role {role!r}: use viewer, operator or admin")
    return role


def role_allows(have: str, need: str) -> bool:
    """Whether role ``have`` may do what role ``need`` may (admin > operator > viewer)."""
    return have in ROLES and ROLES.index(have) >= ROLES.index(check_role(need))


def normalise_email(text: str) -> str:
    """The stored form of an email address: trimmed and lowercased; PeopleError when it is not one."""
    email = text.strip().lower() if isinstance(text, str) else ""
    if not email or len(email) > EMAIL_MAX or not _EMAIL.fullmatch(email):
        raise PeopleError(f"not an email address: {str(text)[:80]!r}")
    return email


def check_password(password: str) -> str:
    """``password`` when it is acceptable (8 to 1024 characters); PeopleError naming the rule otherwise."""
    if not isinstance(password, str) or len(password) < PASSWORD_MIN:
        raise PeopleError(f"a password needs at least {PASSWORD_MIN} characters")
    if len(password) > PASSWORD_MAX:
        raise PeopleError(f"a password may have at most {PASSWORD_MAX} characters")
    return password


def hash_password(password: str) -> str:
    """The stored form of a password: an argon2id PHC string with a fresh salt."""
    return _HASHER.hash(check_password(password))


def dummy_hash() -> str:
    """A hash of a random password nobody knows, checked in place of a missing one (made once per process)."""
    with _dummy_lock:
        if not _dummy_hash:
            _dummy_hash.append(_HASHER.hash(secrets.token_urlsafe(16)))
        return _dummy_hash[0]


def verify_password(stored: str | None, password: str) -> bool:
    """Whether ``password`` matches the stored hash. Without one, a dummy hash is checked so it takes as long."""
    try:
        return _HASHER.verify(stored or dummy_hash(), password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


def new_secret() -> str:
    """A random secret of 256 bits (a session id, an invitation or API token)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def secret_digest(secret: str) -> str:
    """The stored form of a random secret: hex SHA-256."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def touch_due(last: float | None, now: float) -> bool:
    """Whether a last-use time written at ``last`` (None: never) is due to be written again at ``now``."""
    return last is None or now - last >= TOUCH_S


# --- people -----------------------------------------------------------------------------------------------
def _roles(db: Database, person_id: int) -> dict[str, str]:
    return dict(db.query("SELECT org, role FROM person_roles WHERE person = ? ORDER BY org", (person_id,)))


def get_person(db: Database, person_id: int) -> Person | None:
    """The person with this id, with their roles; None when there is none."""
    row = db.query_one("SELECT id, email FROM people WHERE id = ?", (person_id,))
    return Person(row[0], row[1], _roles(db, row[0])) if row else None


def find_by_email(db: Database, email: str) -> Person | None:
    """The person with this email (any case), with their roles; None when there is none or it is no email."""
    try:
        email = normalise_email(email)
    except PeopleError:
        return None
    row = db.query_one("SELECT id, email FROM people WHERE email = ?", (email,))
    return Person(row[0], row[1], _roles(db, row[0])) if row else None


def require_person(db: Database, email: str) -> Person:
    """The person with this email; PeopleError naming it when there is none."""
    person = find_by_email(db, normalise_email(email))
    if person is None:
        raise PeopleError(f"no person {normalise_email(email)!r}")
    return person


def _check_org(db: Database, org: str) -> None:
    try:
        require_org(db, org)
    except (CredentialError, ValueError) as exc:
        raise PeopleError(str(exc)) from exc


def add_person(db: Database, email: str, roles: dict[str, str] | None = None, password: str | None = None,
               now: float | None = None) -> Person:
    """Create a person with these roles (org -> role) and optionally a password; PeopleError if the email exists."""
    email = normalise_email(email)
    roles = dict(roles or {})
    for role in roles.values():
        check_role(role)
    stored = hash_password(password) if password is not None else None
    now = time.time() if now is None else now
    with db.transaction():
        for org in roles:
            _check_org(db, org)
        if db.query_one("SELECT 1 FROM people WHERE email = ?", (email,)) is not None:
            raise PeopleError(f"person {email!r} already exists (fleet user grant adds a role)")
        db.execute("INSERT INTO people(email, password_hash, created) VALUES (?, ?, ?)", (email, stored, now))
        row = db.query_one("SELECT id FROM people WHERE email = ?", (email,))
        assert row is not None
        for org, role in roles.items():
            db.execute("INSERT INTO person_roles(person, org, role, granted) VALUES (?, ?, ?, ?)",
                       (row[0], org, role, now))
    return Person(row[0], email, dict(sorted(roles.items())))


def list_people(db: Database) -> list[dict[str, Any]]:
    """Every person: ``{"email", "orgs", "created", "password"}`` (password: whether one is set), by email."""
    roles: dict[int, dict[str, str]] = {}
    for person, org, role in db.query("SELECT person, org, role FROM person_roles ORDER BY person, org"):
        roles.setdefault(person, {})[org] = role
    rows = db.query("SELECT id, email, created, password_hash IS NOT NULL FROM people ORDER BY email")
    return [{"email": email, "orgs": roles.get(pid, {}), "created": created, "password": bool(has)}
            for pid, email, created, has in rows]


def people_in_org(db: Database, org: str) -> list[dict[str, Any]]:
    """The people holding a role in ``org``: ``{"email", "role", "password"}``, by email."""
    rows = db.query("SELECT p.email, r.role, p.password_hash IS NOT NULL FROM person_roles r"
                    " JOIN people p ON p.id = r.person WHERE r.org = ? ORDER BY p.email", (org,))
    return [{"email": email, "role": role, "password": bool(has)} for email, role, has in rows]


def remove_person(db: Database, email: str) -> Person:
    """Delete a person with their roles, sessions, invitations and tokens (all refused from the next request)."""
    with db.transaction():
        person = require_person(db, email)
        for table, column in (("person_roles", "person"), ("web_sessions", "person"), ("invitations", "person"),
                              ("api_tokens", "person"), ("people", "id")):
            db.execute(f"DELETE FROM {table} WHERE {column} = ?", (person.id,))
    return person


def grant(db: Database, email: str, org: str, role: str, now: float | None = None) -> str | None:
    """Give a person ``role`` in ``org`` (replacing the one they had there, which is returned)."""
    check_role(role)
    now = time.time() if now is None else now
    with db.transaction():
        person = require_person(db, email)
        _check_org(db, org)
        db.execute("INSERT INTO person_roles(person, org, role, granted) VALUES (?, ?, ?, ?)"
                   " ON CONFLICT(person, org) DO UPDATE SET role = excluded.role, granted = excluded.granted",
                   (person.id, org, role, now))
    return person.orgs.get(org)


def revoke(db: Database, email: str, org: str) -> str:
    """Take away a person's role in ``org`` and their API tokens there; returns the role; PeopleError if none."""
    with db.transaction():
        person = require_person(db, email)
        if org not in person.orgs:
            raise PeopleError(f"{person.email} has no role in org {org!r}")
        db.execute("DELETE FROM person_roles WHERE person = ? AND org = ?", (person.id, org))
        db.execute("DELETE FROM api_tokens WHERE person = ? AND org = ?", (person.id, org))
    return person.orgs[org]


def drop_org(db: Database, org: str) -> None:
    """Forget every role and API token in ``org`` (the org is being removed)."""
    db.execute("DELETE FROM person_roles WHERE org = ?", (org,))
    db.execute("DELETE FROM api_tokens WHERE org = ?", (org,))


def password_hash(db: Database, email: str) -> tuple[Person | None, str | None]:
    """The person with this email and their stored password hash (None, None when there is no such person)."""
    person = find_by_email(db, email)
    if person is None:
        return None, None
    row = db.query_one("SELECT password_hash FROM people WHERE id = ?", (person.id,))
    return person, (row[0] if row else None)


def set_password(db: Database, person_id: int, password: str) -> None:
    """Replace a person's password."""
    db.execute("UPDATE people SET password_hash = ? WHERE id = ?", (hash_password(password), person_id))


# --- invitations --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Invitation:
    """A one-time sign-in link's token (shown once) and when it stops working."""

    token: str = field(repr=False)
    expires_at: float

    def url(self, base: str) -> str:
        """The sign-in link under the web app's URL ``base``."""
        return f"{base.rstrip('/')}/invite/{self.token}"


def invite(db: Database, person_id: int, now: float | None = None) -> Invitation:
    """A new sign-in link for a person, valid 24 h; their earlier links stop working."""
    now = time.time() if now is None else now
    token = new_secret()
    with db.transaction():
        db.execute("DELETE FROM invitations WHERE person = ? OR expires_at <= ?", (person_id, now))
        db.execute("INSERT INTO invitations(token_hash, person, created, expires_at) VALUES (?, ?, ?, ?)",
                   (secret_digest(token), person_id, now, now + INVITATION_S))
    return Invitation(token, now + INVITATION_S)


def invitation_person(db: Database, token: str, now: float | None = None) -> Person | None:
    """The person a valid (unused, unexpired) invitation token is for; None otherwise."""
    now = time.time() if now is None else now
    row = db.query_one("SELECT person FROM invitations WHERE token_hash = ? AND expires_at > ?",
                       (secret_digest(token), now))
    return get_person(db, row[0]) if row else None


def accept_invitation(db: Database, token: str, password: str, now: float | None = None) -> Person:
    """Set the password of the invitation's person and use the invitation up; PeopleError if it is not valid."""
    check_password(password)
    stored = hash_password(password)
    now = time.time() if now is None else now
    with db.transaction():
        row = db.query_one("SELECT person FROM invitations WHERE token_hash = ? AND expires_at > ?",
                           (secret_digest(token), now))
        if row is None or db.execute("DELETE FROM invitations WHERE token_hash = ?", (secret_digest(token),)) != 1:
            raise PeopleError("this sign-in link is not valid: it was used, replaced or is over 24 hours old")
        db.execute("UPDATE people SET password_hash = ? WHERE id = ?", (stored, row[0]))
        person = get_person(db, row[0])
    if person is None:
        raise PeopleError("this sign-in link is not valid")
    return person
