"""Web test fixtures: a real database (SQLite file or PostgreSQL) filled through the shared schema, and the app on top.

Every web test runs on both engines (``both_engines``): the API must answer alike on each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet.config.settings import Settings
from fleet.store import credentials
from fleet.store.database import Database, open_database
from fleet.web.app import create_app
from tests import stores
from tests.dbhelpers import insert_reports, sample

MACHINE_KEY = ("org", "machine_id")


@dataclass
class Fleet:
    """A data dir with orgs and machines, and helpers to add more rows."""

    data_dir: Path
    database: str
    acme: credentials.OrgSecrets
    globex: credentials.OrgSecrets

    def db(self) -> Database:
        return open_database(self.database)

    def insert(self, table: str, rows: list[dict], key: tuple[str, ...] = ()) -> None:
        with self.db() as db:
            db.insert(table, rows, key)

    def machine(self, org: str, machine_id: str, status: str = "online", os_name: str = "Linux", cpu: float = 10.0,
                hostname: str | None = None, last_seen: float | None = None, conflict: bool = False,
                offset: float = 0.05) -> None:
        now = time.time()
        system = {"hostname": hostname or machine_id, "os": os_name, "os_version": "12", "architecture": "x86_64"}
        metrics = {"cpu_percent": cpu, "memory": {"total": 100, "used": 40, "percent": 40.0},
                   "disks": [{"mount": "/", "total": 100, "used": 70, "percent": 70.0}]}
        self.insert("machines", [{
            "org": org, "machine_id": machine_id, "hardware_id": f"0x{abs(hash(machine_id)) % 10**12:012x}",
            "status": status, "session": "s1", "interval_s": 10.0, "last_seen": last_seen or now, "last_ping": now,
            "clock_offset_s": offset, "conflict": int(conflict), "os": os_name, "system": json.dumps(system),
            "metrics": json.dumps(metrics), "first_seen": now - 3600, "updated": now}], MACHINE_KEY)

    def reports(self, org: str, machine_id: str, n: int, start: float, step: float = 10.0,
                system: Callable[[int], dict] = lambda i: {}) -> None:
        """``n`` reports every ``step`` s from ``start``; report ``i`` carries the inventory ``system(i)``."""
        with self.db() as db:
            insert_reports(db, [sample(org, machine_id, "s1", i, start + i * step, cpu_percent=float(i % 100),
                                       memory_percent=40.0, disk_percent=70.0, load1=0.5, net_bytes_sent=1000 * i,
                                       net_bytes_recv=2000 * i, system=system(i))
                                for i in range(n)])

    def event(self, org: str, machine_id: str, ts: float, old: str | None, new: str, reason: str = "") -> None:
        self.insert("events", [{"org": org, "machine_id": machine_id, "ts": ts, "old_status": old,
                                "new_status": new, "reason": reason}])


@pytest.fixture
def fleet(tmp_path, database_url) -> Fleet:
    data_dir = tmp_path / "fleet-data"
    return Fleet(data_dir, database_url, stores.add_org(data_dir, "acme", database_url),
                 stores.add_org(data_dir, "globex", database_url))


@pytest.fixture
def settings(fleet) -> Settings:
    return Settings(data_dir=fleet.data_dir, database_url=fleet.database, mqtt_port=1, ttl_seconds=3600,
                    refresh_interval_ms=1000)


@pytest.fixture
def client(settings):
    return create_app(settings).test_client()
