"""Disk accounting in the web app, on both engines: the database's size in /metrics, and /healthz's disk warning.

The disk figure comes from the collector's heartbeat, written here as the collector writes it; nothing is mocked.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from fleet.config.settings import Settings
from fleet.config.status import BROKER_CONNECTED, COLLECTOR, DATA_DISK_PERCENT, DISK_FULL_PERCENT
from fleet.store import wal
from fleet.store.database import DatabaseUrl, open_database
from fleet.store.heartbeats import write_heartbeat
from fleet.web.app import create_app
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


@pytest.fixture
def listening_broker():
    """Something accepting TCP connections where /healthz looks for the broker."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


@pytest.fixture
def healthy_client(fleet, listening_broker):
    settings = Settings(data_dir=fleet.data_dir, database_url=fleet.database, mqtt_port=listening_broker)
    return create_app(settings).test_client()


def collector_beat(fleet, **detail) -> None:
    with open_database(fleet.database) as db:
        write_heartbeat(db, COLLECTOR, time.time(), {BROKER_CONNECTED: True, **detail})


def test_a_nearly_full_disk_is_a_warning_in_healthz_not_a_503(healthy_client, fleet):
    collector_beat(fleet, **{DATA_DISK_PERCENT: 42.0})
    res = healthy_client.get("/healthz")
    assert res.status_code == 200
    assert res.get_json() == {"broker": "ok", "collector": "ok", "database": "ok", "disk": "ok",
                              "collectors": [], "collector_active": None}

    collector_beat(fleet, **{DATA_DISK_PERCENT: DISK_FULL_PERCENT + 4.5})
    res = healthy_client.get("/healthz")
    assert res.status_code == 200
    body = res.get_json()
    assert body["disk"].startswith("warning: ")
    assert f"{DISK_FULL_PERCENT + 4.5:g}% full" in body["disk"]
    assert {body[part] for part in ("broker", "collector", "database")} == {"ok"}


def test_healthz_disk_is_unknown_without_the_collectors_figure(healthy_client, fleet):
    assert healthy_client.get("/healthz").get_json()["disk"].startswith("unknown")  # no heartbeat at all
    collector_beat(fleet)  # a collector that does not report the figure
    res = healthy_client.get("/healthz")
    assert res.status_code == 200
    assert res.get_json()["disk"].startswith("unknown")


def test_healthz_and_metrics_name_the_active_collector(healthy_client, fleet):
    from fleet.store import lease

    with open_database(fleet.database) as db:
        lease.seen(db, "host-a:1", "fleet.collector-x")
        lease.seen(db, "host-b:2", "fleet.collector-x")
        assert lease.acquire(db, "fleet.collector-x", "host-b:2", 10) is not None
    body = healthy_client.get("/healthz").get_json()
    assert body["collector_active"] == "host-b:2"
    assert body["collectors"] == [{"instance": "host-a:1", "shard": "fleet.collector-x", "active": False},
                                  {"instance": "host-b:2", "shard": "fleet.collector-x", "active": True}]
    text = healthy_client.get("/metrics", headers=bearer(fleet.acme.reader_key)).get_data(as_text=True)
    assert 'fleet_collector_active{instance="host-a:1"} 0.0' in text
    assert 'fleet_collector_active{instance="host-b:2"} 1.0' in text
