"""What keeps the collector cheap with many machines still does its job."""

from __future__ import annotations

import sqlite3

from fleet.store.database import DatabaseUrl
from tests.collector.collector_fixtures import SimAgent
from tests.helpers import wait_for


def checkpointed_reports(database: str) -> int:
    """Reports in the SQLite file itself, without what is still only in its WAL."""
    conn = sqlite3.connect(f"file:{DatabaseUrl.parse(database).path}?immutable=1", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM reports").fetchone()[0]
    finally:
        conn.close()


def test_the_wal_is_checkpointed_off_the_writers_commit_path(endpoint, collectors):
    """The writer never checkpoints (a commit must not wait for an fsync); its own thread does, every second."""
    collector = collectors(endpoint.settings())
    agent = SimAgent(endpoint, "m1").connect()
    for _ in range(3):
        agent.report()
    agent.close()
    wait_for(lambda: collector.stats().stored == 3, 10, "three reports committed")
    wait_for(lambda: checkpointed_reports(endpoint.database) == 3, 10, "the reports copied into fleet.db")
    assert collector.stats().commits >= 1
