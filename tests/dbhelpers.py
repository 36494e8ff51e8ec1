"""Database helpers for tests that run on both engines: read what a part stored, hold the write lock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from fleet.store.database import POSTGRESQL, open_database

# The engine fixture's parameters (tests/conftest.py); a module-scoped fixture may take them directly.
ENGINES = ("sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql))

# What the collector writes in every batch: a PostgreSQL writer touching any of them waits.
COLLECTOR_TABLES = "reports, machines, events, drops, org_stats"


def rows(database: str, sql: str, *args) -> list[tuple]:
    """Run a read query on a database URL (a fresh read-only connection, as the web does)."""
    with open_database(database, readonly=True) as db:
        return db.query(sql, args)


@contextmanager
def write_lock(database: str) -> Iterator[None]:
    """Another writer holding the database: SQLite's write lock, or exclusive locks on the collector's tables."""
    with open_database(database, migrate=False) as db, db.transaction():
        if db.engine == POSTGRESQL:
            db.execute(f"LOCK TABLE {COLLECTOR_TABLES} IN EXCLUSIVE MODE")
        yield
