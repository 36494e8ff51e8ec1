"""The installation's peppers: the key pepper in the database (keys' hashes), the data dir's ``pepper`` (sealing).

Keys are hashed with the key pepper, kept in the database's ``meta`` so every host that shares the database
verifies the same keys from the database alone (``fleet web`` needs nothing else). Installations made before it
hashed keys with the data dir's ``pepper`` file: the first part that starts with that file copies it into the
database as the key pepper, so their keys keep working. The ``pepper`` file stays in the data dir to seal what
must be read back (store.secretbox): only the parts that open channel secrets need it. docs/deployment.md
weighs what each one protects.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from fleet.store.database import Database
from fleet.store.errors import CredentialError

PEPPER_FILE = "pepper"
PEPPER_BYTES = 32


KEY_PEPPER = "key_pepper"  # meta key of the key pepper (hex)
PEPPER_CHECK = "pepper_check"  # meta key of an HMAC of a fixed text under the data dir's pepper


def stored_key_pepper(db: Database) -> bytes | None:
    """The database's key pepper, or None before any part made or copied one (a read, for read-only connections)."""
    row = db.query_one("SELECT value FROM meta WHERE key = ?", (KEY_PEPPER,))
    return bytes.fromhex(row[0]) if row is not None else None


def pepper_digest(pepper: bytes) -> str:
    """What ``meta.pepper_check`` holds for a pepper: an HMAC of a fixed text (it reveals nothing of the pepper)."""
    return hmac.new(pepper, b"fleet pepper check", hashlib.sha256).hexdigest()


def key_pepper(db: Database, data_dir: Path) -> bytes:
    """The pepper keys are hashed with, from the database; made (or copied from the data dir's file) on first use.

    CredentialError when the database's keys were made with a ``pepper`` file this data dir lacks and no part
    holding it has started since: the keys cannot be verified here until it has (or the file is copied).
    """
    stored = stored_key_pepper(db)
    if stored is not None:
        return stored
    if db.query_one("SELECT 1 FROM credentials LIMIT 1") is None:
        value = secrets.token_bytes(PEPPER_BYTES)  # no key was hashed yet: a pepper of its own, not the file's
    else:
        value = _legacy_pepper(db, Path(data_dir))
    db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING", (KEY_PEPPER, value.hex()))
    stored = stored_key_pepper(db)  # another part may have been first
    assert stored is not None
    return stored


def _legacy_pepper(db: Database, data_dir: Path) -> bytes:
    """The data dir's pepper file, which the keys of an installation made before the key pepper were hashed with."""
    path = data_dir / PEPPER_FILE
    try:
        value = load_pepper(data_dir, create=False)
    except CredentialError:
        raise CredentialError(f"the keys in {db.url} were made with the pepper file of the first host's data dir"
                              f" and {path} is missing: start any fleet part on that host once (it moves the"
                              " pepper into the database), or copy the file here") from None
    check = db.query_one("SELECT value FROM meta WHERE key = ?", (PEPPER_CHECK,))
    if check is not None and not hmac.compare_digest(check[0], pepper_digest(value)):
        raise CredentialError(f"{path} is not the pepper the keys in {db.url} were made with:"
                              " copy it from the first host's data dir")
    return value


def sealing_pepper(db: Database, data_dir: Path) -> bytes:
    """The data dir's pepper, checked against the database's record of it: what seals channel secrets.

    A new installation makes it; a data dir without it, sharing a database that has one, is refused with a
    CredentialError naming the file (what it sealed cannot be opened without it).
    """
    path = Path(data_dir) / PEPPER_FILE
    if not path.exists() and db.query_one("SELECT 1 FROM meta WHERE key = ?", (PEPPER_CHECK,)) is not None:
        raise CredentialError(f"{path} is missing: copy it from the first host's data dir (it decrypts the alert"
                              " channels' secrets)")
    pepper = load_pepper(data_dir)
    check = pepper_digest(pepper)
    db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING", (PEPPER_CHECK, check))
    row = db.query_one("SELECT value FROM meta WHERE key = ?", (PEPPER_CHECK,))
    if row is None or not hmac.compare_digest(row[0], check):
        raise CredentialError(f"{path} is not the pepper the secrets in {db.url} were sealed with:"
                              " copy it (and service.key) from the first host's data dir")
    return pepper


def load_pepper(data_dir: Path, create: bool = True) -> bytes:
    """The installation's HMAC key, created (mode 0600) on first use."""
    path = Path(data_dir) / PEPPER_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        if not create:
            raise CredentialError(
                f"no credential store in {data_dir} (run 'fleet org add' or 'fleet up' first)") from None
    except ValueError as exc:
        raise CredentialError(f"corrupt pepper file {path}") from exc
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    write_private(path, secrets.token_bytes(PEPPER_BYTES).hex() + "\n")
    return load_pepper(data_dir, create=False)


def write_private(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 unless it exists (first writer wins)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
