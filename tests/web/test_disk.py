"""Disk accounting in the web app, on both engines: the database's size in /metrics."""

from __future__ import annotations

import re

import pytest

from fleet.store import wal
from fleet.store.database import DatabaseUrl
from tests.helpers import bearer

pytestmark = pytest.mark.both_engines


def samples(text: str, family: str) -> list[float]:
    """The values of one family's samples in an exposition text."""
    return [float(value) for value in re.findall(rf"^{family}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)]


def test_metrics_export_the_database_and_wal_sizes(client, fleet, engine):
    with fleet.db() as db:  # kept open, as a running collector's connection is: the WAL stays
        db.execute("INSERT INTO meta(key, value) VALUES ('wal-test', ?)", ("x" * 10_000,))
        text = client.get("/metrics", headers=bearer(fleet.acme.reader_key)).get_data(as_text=True)
        assert "# TYPE fleet_database_bytes gauge" in text
        assert "# TYPE fleet_database_wal_bytes gauge" in text
        [size] = samples(text, "fleet_database_bytes")
        if engine == "sqlite":
            path = DatabaseUrl.parse(fleet.database).path
            assert path is not None
            assert size == path.stat().st_size
            [wal_size] = samples(text, "fleet_database_wal_bytes")
            assert wal_size == wal.file_bytes(wal.wal_file(path))
            assert wal_size > 10_000
        else:
            assert size == db.query_one("SELECT pg_database_size(current_database())")[0]
            assert samples(text, "fleet_database_wal_bytes") == []  # the server's WAL is not one database's
