"""Org credentials: generate keys with ``secrets``, store only keyed hashes, verify in constant time.

Keys are 256-bit random tokens, so a fast keyed hash (HMAC-SHA256 with a per-installation pepper
kept in the database, store.pepper) is the right tool: slow password hashes would cap the broker at a
few connections per second. Each key is also stored in Mosquitto's password-file format so the
same access model can be exported to Mosquitto. Keys never appear in a repr or a log line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleet.config.ids import validate_id
from fleet.store import alerting, audit, labels, people
from fleet.store.database import POSTGRESQL, Database
from fleet.store.errors import CredentialError
from fleet.store.orgs import org_exists, require_org
from fleet.store.pepper import PEPPER_FILE, key_pepper, sealing_pepper, write_private

__all__ = ["PEPPER_FILE", "SERVICE_KEY_FILE"]  # the data dir's files, named here for the parts that check them

ROLES = ("agent", "reader")
SERVICE_USERNAME = "fleet-service"
SERVICE_ROLE = "service"
KEY_BYTES = 32
SERVICE_KEY_FILE = "service.key"
MOSQUITTO_ITERATIONS = 101  # mosquitto_passwd's default for $7$ hashes
MOSQUITTO_SALT_BYTES = 12


@dataclass(frozen=True)
class OrgSecrets:
    """Keys of a new org, shown once; never printed by repr."""

    org: str
    agent_key: str = field(repr=False)
    reader_key: str = field(repr=False)

    def as_dict(self) -> dict[str, str]:
        """The ``fleet org add --json`` object."""
        return {"org": self.org, "agent_key": self.agent_key, "reader_key": self.reader_key}


@dataclass(frozen=True)
class Principal:
    """Who a verified key belongs to: ``org`` is None for the internal service user."""

    username: str
    org: str | None
    role: str


@dataclass(frozen=True)
class CredentialRecord:
    """A stored credential row (hashes only)."""

    username: str
    org: str | None
    role: str
    digest: str = field(repr=False)
    mosquitto_hash: str = field(repr=False)


def username_for(org: str, role: str) -> str:
    """MQTT username of an org role: ``<org>/agent`` or ``<org>/reader``."""
    if role not in ROLES:
        raise CredentialError(f"unknown role {role!r}: use agent or reader")
    return f"{validate_id(org, 'org')}/{role}"


def generate_key() -> str:
    """A new random key with 256 bits of entropy."""
    return secrets.token_urlsafe(KEY_BYTES)


def digest_key(pepper: bytes, key: str) -> str:
    """The stored form of a key: hex HMAC-SHA256 under the installation pepper."""
    return hmac.new(pepper, key.encode("utf-8"), hashlib.sha256).hexdigest()


def mosquitto_hash(key: str, salt: bytes | None = None, iterations: int = MOSQUITTO_ITERATIONS) -> str:
    """The key in Mosquitto 2's password-file format: ``$7$<iterations>$<salt b64>$<hash b64>``."""
    salt = salt if salt is not None else secrets.token_bytes(MOSQUITTO_SALT_BYTES)
    derived = hashlib.pbkdf2_hmac("sha512", key.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(derived).decode()}"


def _store(db: Database, pepper: bytes, username: str, org: str | None, role: str, key: str) -> None:
    db.execute(
        "INSERT INTO credentials(username, org, role, digest, mosquitto_hash, created) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(username) DO UPDATE SET org = excluded.org, role = excluded.role, digest = excluded.digest,"
        " mosquitto_hash = excluded.mosquitto_hash, created = excluded.created",
        (username, org, role, digest_key(pepper, key), mosquitto_hash(key), time.time()),
    )


def add_org(db: Database, data_dir: Path, org: str, actor: str | None = None) -> OrgSecrets:
    """Create an org with fresh agent and reader keys and the default alert rules; CredentialError if it exists."""
    validate_id(org, "org")
    secrets_ = OrgSecrets(org, generate_key(), generate_key())
    with db.transaction():
        sealing_pepper(db, data_dir)  # the org's channels will be sealed with it: one per installation
        pepper = key_pepper(db, data_dir)
        if org_exists(db, org):
            raise CredentialError(f"org {org!r} already exists")
        now = time.time()
        db.execute("INSERT INTO orgs(name, created) VALUES (?, ?)", (org, now))
        alerting.insert_default_rules(db, org, now)
        _store(db, pepper, username_for(org, "agent"), org, "agent", secrets_.agent_key)
        _store(db, pepper, username_for(org, "reader"), org, "reader", secrets_.reader_key)
        if actor is not None:
            audit.record(db, org=org, actor=actor, action="org.add", target=org)
    return secrets_


def remove_org(db: Database, org: str, actor: str | None = None) -> None:
    """Delete an org, its credentials (its keys stop working at once) and its alerting; history stays."""
    validate_id(org, "org")
    with db.transaction():
        if db.execute("DELETE FROM orgs WHERE name = ?", (org,)) == 0:
            raise CredentialError(f"no such org {org!r}")
        db.execute("DELETE FROM credentials WHERE org = ?", (org,))
        alerting.drop_org(db, org)
        labels.drop_org(db, org)
        people.drop_org(db, org)
        if actor is not None:
            audit.record(db, org=org, actor=actor, action="org.remove", target=org)


def rotate_key(db: Database, data_dir: Path, org: str, role: str, actor: str | None = None) -> str:
    """Replace one role's key of an org; the old key is invalid from now on. Returns the new key."""
    username = username_for(org, role)
    key = generate_key()
    with db.transaction():
        pepper = key_pepper(db, data_dir)
        require_org(db, org)
        _store(db, pepper, username, org, role, key)
        if actor is not None:
            audit.record(db, org=org, actor=actor, action="org.rotate", target=org, detail={"role": role})
    return key


def ensure_service_key(db: Database, data_dir: Path) -> str:
    """The internal service user's key (collector, web health checks), created on first start.

    On PostgreSQL the key is the first host's: a data dir without ``service.key`` sharing a database that has
    one is refused with a CredentialError naming the file (the collector needs it to log in to the broker).
    """
    data_dir = Path(data_dir)
    path = data_dir / SERVICE_KEY_FILE
    with db.transaction():
        pepper = key_pepper(db, data_dir)
        row = db.query_one("SELECT digest FROM credentials WHERE username = ?", (SERVICE_USERNAME,))
        if not path.exists():
            if row is not None and db.engine == POSTGRESQL:
                raise CredentialError(f"{path} is missing: copy service.key from the data dir of the host that made"
                                      f" the service credential in {db.url} (the collector logs in to the broker"
                                      " with it)")
            data_dir.mkdir(parents=True, exist_ok=True)
            write_private(path, generate_key() + "\n")
        key = path.read_text().strip()
        if row is not None and not hmac.compare_digest(row[0], digest_key(pepper, key)) and db.engine == POSTGRESQL:
            # A shared database: the key belongs to the host that made it, whose collector still uses it.
            raise CredentialError(f"{db.url} holds another data dir's service key: copy service.key (and pepper)"
                                  f" from the first host's data dir into {data_dir}")
        if row is None or not hmac.compare_digest(row[0], digest_key(pepper, key)):
            _store(db, pepper, SERVICE_USERNAME, None, SERVICE_ROLE, key)  # SQLite: the data dir's file wins
    return key


def service_credential_exists(db: Database) -> bool:
    """Whether the database holds the internal service user's credential."""
    return db.query_one("SELECT 1 FROM credentials WHERE username = ?", (SERVICE_USERNAME,)) is not None


def load_records(db: Database) -> dict[str, CredentialRecord]:
    """Every stored credential by username (a snapshot the broker keeps in memory and reloads)."""
    rows = db.query("SELECT username, org, role, digest, mosquitto_hash FROM credentials")
    return {row[0]: CredentialRecord(*row) for row in rows}


def check_key(records: dict[str, CredentialRecord], pepper: bytes, username: str | None,
              key: str | bytes | None) -> Principal | None:
    """Verify a username/key pair against a snapshot in constant time; None when refused."""
    if not username or key is None:
        return None
    if isinstance(key, bytes):
        try:
            key = key.decode("utf-8")
        except UnicodeDecodeError:
            return None
    record = records.get(username)
    candidate = digest_key(pepper, key)
    # Compare even for unknown users so timing does not reveal which usernames exist.
    expected = record.digest if record is not None else "0" * len(candidate)
    if hmac.compare_digest(candidate, expected) and record is not None:
        return Principal(record.username, record.org, record.role)
    return None


def find_reader(db: Database, pepper: bytes, token: str) -> str | None:
    """The org whose reader key is ``token`` (HTTP bearer auth), compared in constant time; else None."""
    if not token:
        return None
    candidate = digest_key(pepper, token)
    row = db.query_one("SELECT org, digest FROM credentials WHERE digest = ? AND role = 'reader'", (candidate,))
    if row is not None and hmac.compare_digest(row[1], candidate):
        return row[0]
    return None
