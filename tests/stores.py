"""The stores called the way tests set things up: by data dir and an optional database URL, one connection a call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleet.config.rules import Rule, Silence
from fleet.config.settings import Settings
from fleet.store import alerting, credentials, orgs
from fleet.store.database import open_database
from fleet.store.secretbox import secret_box


def database_for(data_dir: Path, database: str | None = None) -> str:
    """``database`` if given, else the data dir's default database (Settings.database)."""
    return Settings(data_dir=Path(data_dir), database_url=database or "").database


def add_org(data_dir: Path, org: str, database: str | None = None) -> credentials.OrgSecrets:
    """``fleet org add``."""
    with open_database(database_for(data_dir, database)) as db:
        return credentials.add_org(db, data_dir, org)


def remove_org(data_dir: Path, org: str, database: str | None = None) -> None:
    """``fleet org remove``."""
    with open_database(database_for(data_dir, database)) as db:
        credentials.remove_org(db, org)


def rotate_key(data_dir: Path, org: str, role: str, database: str | None = None) -> str:
    """``fleet org rotate``."""
    with open_database(database_for(data_dir, database)) as db:
        return credentials.rotate_key(db, data_dir, org, role)


def list_orgs(data_dir: Path, database: str | None = None) -> list[str]:
    """``fleet org list``."""
    with open_database(database_for(data_dir, database)) as db:
        return orgs.list_orgs(db)


def org_exists(data_dir: Path, org: str, database: str | None = None) -> bool:
    """Is there such an org?"""
    with open_database(database_for(data_dir, database)) as db:
        return orgs.org_exists(db, org)


def ensure_service_key(data_dir: Path, database: str | None = None) -> str:
    """The internal service user's key, as the broker and collector make it at start."""
    with open_database(database_for(data_dir, database)) as db:
        return credentials.ensure_service_key(db, data_dir)


def add_rule(data_dir: Path, rule: Rule, database: str | None = None) -> None:
    """``fleet alert add``."""
    with open_database(database_for(data_dir, database)) as db:
        alerting.add_rule(db, rule)


def list_rules(data_dir: Path, org: str, database: str | None = None) -> list[Rule]:
    """``fleet alert list``."""
    with open_database(database_for(data_dir, database)) as db:
        return alerting.list_rules(db, org)


def remove_rule(data_dir: Path, org: str, name: str, database: str | None = None) -> None:
    """``fleet alert remove``."""
    with open_database(database_for(data_dir, database)) as db:
        alerting.remove_rule(db, org, name)


def store_channel(data_dir: Path, org: str, name: str, kind: str, url: str, secret: str | None, target: str,
                  database: str | None = None) -> None:
    """A channel stored as ``fleet alert channel add`` stores it (no URL check)."""
    with open_database(database_for(data_dir, database)) as db:
        alerting.store_channel(db, secret_box(data_dir), org, name, kind, url, secret, target)


def list_channels(data_dir: Path, org: str, database: str | None = None) -> list[alerting.Channel]:
    """``fleet alert channel list``."""
    with open_database(database_for(data_dir, database)) as db:
        return alerting.list_channels(db, org)


def get_channel(data_dir: Path, org: str, name: str, database: str | None = None) -> alerting.Channel:
    """One channel, decrypted."""
    with open_database(database_for(data_dir, database)) as db:
        return alerting.get_channel(db, secret_box(data_dir, create=False), org, name)


def add_silence(data_dir: Path, org: str, for_s: float, *args: Any, database: str | None = None,
                **kwargs: Any) -> Silence:
    """``fleet alert silence``."""
    with open_database(database_for(data_dir, database)) as db:
        return alerting.add_silence(db, org, for_s, *args, **kwargs)


def expire_silence(data_dir: Path, org: str, silence_id: int, now: float | None = None,
                   database: str | None = None) -> None:
    """``fleet alert unsilence``."""
    with open_database(database_for(data_dir, database)) as db:
        alerting.expire_silence(db, org, silence_id, now)
