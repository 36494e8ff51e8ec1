"""Machine identity in the database: enrolment tokens, machine certificates, and the org key's on/off switch.

A token's secret is stored only as a keyed hash (and in Mosquitto's password-file format, for that broker).
Redeeming a token is one conditional UPDATE (``used < uses``, not expired, not revoked), so two agents racing
for a one-use token cannot both win on either engine.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.config.enrolment import (
    EXPIRED,
    REVOKED,
    TOKEN_ID_BYTES,
    TOKEN_SECRET_BYTES,
    UNKNOWN,
    USED_UP,
    EnrolmentError,
    Token,
)
from fleet.config.ids import validate_id
from fleet.config.tls import ca_fingerprint
from fleet.store import audit
from fleet.store.credentials import digest_key, mosquitto_hash
from fleet.store.database import Database
from fleet.store.errors import CredentialError, NotFound
from fleet.store.orgs import require_org
from fleet.store.pepper import key_pepper

CERTIFICATE, ORG_KEY = "certificate", "org-key"


class MissingCredential(NotFound, CredentialError):
    """The org has no enrolment token of that id, or no certificate for that machine."""


@dataclass(frozen=True)
class NewToken:
    """A token just made: shown once (``fleet enrol create``)."""

    org: str
    token: Token
    uses: int
    expires_at: float

    def as_dict(self) -> dict[str, Any]:
        """The ``fleet enrol create --json`` object."""
        return {"org": self.org, "id": self.token.id, "token": str(self.token), "uses": self.uses,
                "expires_at": self.expires_at}


@dataclass(frozen=True)
class TokenRecord:
    """A stored token as the broker checks it at CONNECT (hashes only)."""

    id: str
    org: str
    digest: str = field(repr=False)
    mosquitto_hash: str = field(repr=False)


@dataclass(frozen=True)
class MachineCert:
    """A machine's stored certificate."""

    org: str
    machine_id: str
    serial: str
    prev_serial: str | None
    key_sha256: str
    cert: str = field(repr=False)
    not_after: float
    enrolled_at: float
    revoked: bool


@dataclass(frozen=True)
class IdentitySnapshot:
    """What the broker keeps in memory: accepted certificate serials per machine, tokens, orgs without org key."""

    serials: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)
    tokens: dict[str, TokenRecord] = field(default_factory=dict)
    key_off: frozenset[str] = frozenset()

    def enrolled(self, org: str | None, machine: str | None) -> bool:
        """True when the machine holds a certificate that is not revoked."""
        return (org or "", machine or "") in self.serials


def installation_ca_fingerprint(certs_dir: Path) -> str:
    """The SHA-256 fingerprint of the installation's CA (``certs/ca.pem``) that enrolment tokens carry."""
    try:
        return ca_fingerprint((certs_dir / "ca.pem").read_bytes())
    except (OSError, ValueError) as exc:
        raise CredentialError(f"no CA in {certs_dir} (run 'fleet up' or 'fleet broker' once): {exc}") from exc


def create_token(db: Database, data_dir: Path, ca_fingerprint: str, org: str, uses: int = 1,
                 expires_s: float = 86_400.0, now: float | None = None, actor: str | None = None) -> NewToken:
    """A new enrolment token of ``org``, good for ``uses`` enrolments (0: any) for ``expires_s`` seconds."""
    if uses < 0:
        raise CredentialError(f"--uses must be 0 or more, not {uses}")
    if expires_s <= 0:
        raise CredentialError("--expires must be longer than 0 s")
    now = time.time() if now is None else now
    token = Token(ca_fingerprint, secrets.token_hex(TOKEN_ID_BYTES), secrets.token_urlsafe(TOKEN_SECRET_BYTES))
    with db.transaction():
        pepper = key_pepper(db, data_dir)  # the one the broker checks tokens with, as keys
        require_org(db, org)
        db.execute("INSERT INTO enrol_tokens(id, org, digest, mosquitto_hash, uses, used, expires_at, created_at,"
                   " revoked) VALUES (?, ?, ?, ?, ?, 0, ?, ?, 0)",
                   (token.id, org, digest_key(pepper, token.secret), mosquitto_hash(token.secret), uses,
                    now + expires_s, now))
        if actor is not None:
            audit.record(db, org=org, actor=actor, action="enrol.create", target=token.id,
                         detail={"uses": uses, "expires_at": now + expires_s})
    return NewToken(org, token, uses, now + expires_s)


def list_tokens(db: Database, org: str) -> list[dict[str, Any]]:
    """The ``fleet enrol list --json`` objects of an org, oldest first; never a secret."""
    require_org(db, org)
    rows = db.query("SELECT id, uses, used, expires_at, created_at, revoked FROM enrol_tokens WHERE org = ?"
                    " ORDER BY created_at, id", (org,))
    return [{"id": r[0], "uses": r[1], "used": r[2], "expires_at": r[3], "created_at": r[4], "revoked": bool(r[5])}
            for r in rows]


def revoke_token(db: Database, org: str, token_id: str, actor: str | None = None) -> None:
    """Revoke a token: it enrols nothing from now on (machines it enrolled keep their certificates)."""
    with db.transaction():
        require_org(db, org)
        if db.execute("UPDATE enrol_tokens SET revoked = 1 WHERE org = ? AND id = ?", (org, token_id)) == 0:
            raise MissingCredential(f"no enrolment token {token_id!r} in org {org!r}")
        if actor is not None:
            audit.record(db, org=org, actor=actor, action="enrol.revoke", target=token_id)


def token_state(db: Database, org: str, token_id: str, now: float) -> str | None:
    """Why a token of ``org`` cannot enrol now (unknown, revoked, expired, used up), or None when it can."""
    row = db.query_one("SELECT uses, used, expires_at, revoked FROM enrol_tokens WHERE org = ? AND id = ?",
                       (org, token_id))
    if row is None:
        return UNKNOWN
    uses, used, expires_at, revoked = row
    if revoked:
        return REVOKED
    if expires_at <= now:
        return EXPIRED
    if uses and used >= uses:
        return USED_UP
    return None


def redeem_token(db: Database, org: str, token_id: str, now: float) -> None:
    """Count one use of a token, atomically; EnrolmentError with the reason when it cannot enrol.

    Call inside the transaction that stores the certificate, so a failed signing gives the use back."""
    changed = db.execute("UPDATE enrol_tokens SET used = used + 1 WHERE org = ? AND id = ? AND revoked = 0"
                         " AND expires_at > ? AND (uses = 0 OR used < uses)", (org, token_id, now))
    if changed != 1:
        raise EnrolmentError(token_state(db, org, token_id, now) or USED_UP)


def machine_cert(db: Database, org: str, machine: str) -> MachineCert | None:
    """A machine's stored certificate row (revoked or not), or None."""
    row = db.query_one("SELECT org, machine_id, serial, prev_serial, key_sha256, cert, not_after, enrolled_at, revoked"
                       " FROM machine_certs WHERE org = ? AND machine_id = ?", (org, machine))
    if row is None:
        return None
    return MachineCert(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], bool(row[8]))


def store_cert(db: Database, org: str, machine: str, serial: str, key_sha256: str, cert_pem: str, not_after: float,
               now: float, renewal: bool) -> None:
    """Record a machine's new certificate; a renewal keeps the previous serial accepted."""
    previous = machine_cert(db, org, machine)
    prev_serial = previous.serial if renewal and previous is not None else None
    enrolled_at = previous.enrolled_at if renewal and previous is not None else now
    db.execute("INSERT INTO machine_certs(org, machine_id, serial, prev_serial, key_sha256, cert, not_after,"
               " enrolled_at, revoked) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0) ON CONFLICT(org, machine_id) DO UPDATE"
               " SET serial = excluded.serial, prev_serial = excluded.prev_serial, key_sha256 = excluded.key_sha256,"
               " cert = excluded.cert, not_after = excluded.not_after, enrolled_at = excluded.enrolled_at,"
               " revoked = 0",
               (org, machine, serial, prev_serial, key_sha256, cert_pem, not_after, enrolled_at))


def revoke_machine(db: Database, org: str, machine: str, actor: str | None = None) -> None:
    """Revoke a machine's certificate: the broker closes its connection and refuses it within 5 s."""
    with db.transaction():
        require_org(db, org)
        validate_id(machine, "machine id")
        if db.execute("UPDATE machine_certs SET revoked = 1 WHERE org = ? AND machine_id = ?", (org, machine)) == 0:
            raise MissingCredential(f"machine {machine!r} of org {org!r} has no certificate")
        if actor is not None:
            audit.record(db, org=org, actor=actor, action="machine.revoke", target=machine)


def list_machines(db: Database, org: str) -> list[dict[str, Any]]:
    """The ``fleet machine list --json`` objects: enrolled machines and the machines seen with the org key."""
    require_org(db, org)
    certs = {r[0]: r for r in db.query("SELECT machine_id, serial, not_after, enrolled_at, revoked FROM machine_certs"
                                       " WHERE org = ?", (org,))}
    seen = [r[0] for r in db.query("SELECT machine_id FROM machines WHERE org = ?", (org,))]
    out = []
    for machine in sorted(set(certs) | set(seen)):
        row = certs.get(machine)
        if row is None:
            out.append({"machine_id": machine, "auth": ORG_KEY, "serial": None, "not_after": None,
                        "enrolled_at": None, "revoked": False})
        else:
            out.append({"machine_id": machine, "auth": CERTIFICATE, "serial": row[1], "not_after": row[2],
                        "enrolled_at": row[3], "revoked": bool(row[4])})
    return out


def cert_not_after(db: Database, org: str) -> dict[str, float]:
    """``not_after`` of each machine of ``org`` holding an unrevoked certificate."""
    return {r[0]: r[1] for r in db.query("SELECT machine_id, not_after FROM machine_certs WHERE org = ? AND"
                                         " revoked = 0", (org,))}


def all_cert_not_after(db: Database) -> dict[tuple[str, str], float]:
    """``not_after`` of every unrevoked machine certificate, by (org, machine)."""
    return {(r[0], r[1]): r[2] for r in db.query("SELECT org, machine_id, not_after FROM machine_certs"
                                                 " WHERE revoked = 0")}


def set_agent_key(db: Database, org: str, on: bool, actor: str | None = None) -> None:
    """Turn an org's agent key on or off (off: only enrolled machines connect)."""
    with db.transaction():
        require_org(db, org)
        db.execute("UPDATE orgs SET agent_key = ? WHERE name = ?", (1 if on else 0, org))
        if actor is not None:
            audit.record(db, org=org, actor=actor, action="org.set", target=org,
                         detail={"agent_key": "on" if on else "off"})


def load_snapshot(db: Database, now: float | None = None) -> IdentitySnapshot:
    """The broker's identity snapshot: serials of unrevoked certificates, tokens, orgs with the key off."""
    now = time.time() if now is None else now
    serials = {(r[0], r[1]): frozenset(s for s in (r[2], r[3]) if s)
               for r in db.query("SELECT org, machine_id, serial, prev_serial FROM machine_certs WHERE revoked = 0")}
    # Tokens that can no longer enrol still connect, so the agent hears why; a week after expiry they are gone.
    tokens = {r[0]: TokenRecord(*r) for r in db.query(
        "SELECT id, org, digest, mosquitto_hash FROM enrol_tokens WHERE expires_at > ?", (now - 7 * 86_400,))}
    key_off = frozenset(r[0] for r in db.query("SELECT name FROM orgs WHERE agent_key = 0"))
    return IdentitySnapshot(serials, tokens, key_off)


def revoked_serials(db: Database) -> dict[tuple[str, str], str]:
    """The last serial of every revoked machine certificate, by (org, machine)."""
    return {(r[0], r[1]): r[2] for r in db.query("SELECT org, machine_id, serial FROM machine_certs WHERE revoked = 1")}


def check_token(snapshot: IdentitySnapshot, pepper: bytes, org: str, token_id: str, secret: str | bytes | None) -> bool:
    """True when ``secret`` is the secret of token ``token_id`` of ``org`` (constant time)."""
    if isinstance(secret, bytes):
        try:
            secret = secret.decode("utf-8")
        except UnicodeDecodeError:
            return False
    record = snapshot.tokens.get(token_id)
    candidate = digest_key(pepper, secret or "")
    expected = record.digest if record is not None else "0" * len(candidate)
    return hmac.compare_digest(candidate, expected) and record is not None and record.org == org and bool(secret)
