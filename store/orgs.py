"""Orgs in the database: which exist. Creating and removing one is fleet.store.credentials' (keys come with it)."""

from __future__ import annotations

from fleet.config.ids import validate_id
from fleet.store.database import Database
from fleet.store.errors import CredentialError


def org_exists(db: Database, org: str) -> bool:
    """True when ``org`` exists."""
    return db.query_one("SELECT 1 FROM orgs WHERE name = ?", (org,)) is not None


def require_org(db: Database, org: str) -> None:
    """Raise CredentialError unless ``org`` is a valid id of an existing org."""
    if not org_exists(db, validate_id(org, "org")):
        raise CredentialError(f"no such org {org!r}")


def list_orgs(db: Database) -> list[str]:
    """Names of every org, sorted."""
    return [row[0] for row in db.query("SELECT name FROM orgs ORDER BY name")]
