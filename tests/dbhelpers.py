"""Database helpers for tests that run on both engines: read what a part stored, hold the write lock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from fleet.store.database import POSTGRESQL, Database, open_database
from fleet.store.samples import Sample, SampleIds, write_samples

# The engine fixture's parameters (tests/conftest.py); a module-scoped fixture may take them directly.
ENGINES = ("sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql))

# What the collector writes in every batch: a PostgreSQL writer touching any of them waits.
COLLECTOR_TABLES = "samples, machines, events, drops, org_stats"


def sample(org: str, machine_id: str, session: str, seq: int, ts: float, received: float | None = None,
           cpu_percent: float | None = None, memory_percent: float | None = None, disk_percent: float | None = None,
           load1: float | None = None, net_bytes_sent: int | None = None, net_bytes_recv: int | None = None,
           fields: dict | None = None, system: dict | None = None) -> Sample:
    """A report as history stores it; ``received`` defaults to ``ts``."""
    fields = fields or {}
    return Sample(org, machine_id, session, seq, ts, ts if received is None else received, cpu_percent,
                  memory_percent, disk_percent, load1, net_bytes_sent, net_bytes_recv, tuple(fields),
                  tuple(fields.values()), system or {})


def insert_reports(db: Database, samples: list[Sample]) -> int:
    """Store reports straight into history (as the collector does), in one transaction; returns the new ones."""
    with db.transaction():
        return write_samples(db, SampleIds(), samples)


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
