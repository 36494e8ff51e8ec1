"""Web test fixtures: a real fleet.db filled through the shared schema, and the app on top of it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet.config import credentials
from fleet.config.database import open_db
from fleet.config.settings import Settings
from fleet.web.app import create_app


@dataclass
class Fleet:
    """A data dir with orgs and machines, and helpers to add more rows."""

    data_dir: Path
    acme: credentials.OrgSecrets
    globex: credentials.OrgSecrets

    def db(self):
        return open_db(self.data_dir / "fleet.db")

    def machine(self, org: str, machine_id: str, status: str = "online", os_name: str = "Linux", cpu: float = 10.0,
                hostname: str | None = None, last_seen: float | None = None, conflict: bool = False,
                offset: float = 0.05) -> None:
        now = time.time()
        system = {"hostname": hostname or machine_id, "os": os_name, "os_version": "12", "architecture": "x86_64"}
        metrics = {"cpu_percent": cpu, "memory": {"total": 100, "used": 40, "percent": 40.0},
                   "disks": [{"mount": "/", "total": 100, "used": 70, "percent": 70.0}]}
        self.db()["machines"].insert({
            "org": org, "machine_id": machine_id, "hardware_id": f"0x{abs(hash(machine_id)) % 10**12:012x}",
            "status": status, "session": "s1", "interval_s": 10.0, "last_seen": last_seen or now, "last_ping": now,
            "clock_offset_s": offset, "conflict": int(conflict), "os": os_name, "system": json.dumps(system),
            "metrics": json.dumps(metrics), "first_seen": now - 3600, "updated": now}, replace=True)

    def reports(self, org: str, machine_id: str, n: int, start: float, step: float = 10.0) -> None:
        rows = [{"org": org, "machine_id": machine_id, "session": "s1", "seq": i, "ts": start + i * step,
                 "received": start + i * step, "cpu_percent": float(i % 100), "memory_percent": 40.0,
                 "disk_percent": 70.0, "load1": 0.5, "net_bytes_sent": 1000 * i, "net_bytes_recv": 2000 * i,
                 "payload": "{}"} for i in range(n)]
        self.db()["reports"].insert_all(rows, replace=True)

    def event(self, org: str, machine_id: str, ts: float, old: str | None, new: str, reason: str = "") -> None:
        self.db()["events"].insert({"org": org, "machine_id": machine_id, "ts": ts, "old_status": old,
                                    "new_status": new, "reason": reason})


@pytest.fixture
def fleet(tmp_path) -> Fleet:
    data_dir = tmp_path / "fleet-data"
    f = Fleet(data_dir, credentials.add_org(data_dir, "acme"), credentials.add_org(data_dir, "globex"))
    f.db()  # creates the schema
    return f


@pytest.fixture
def settings(fleet) -> Settings:
    return Settings(data_dir=fleet.data_dir, mqtt_port=1, ttl_seconds=3600, refresh_interval_ms=1000)


@pytest.fixture
def client(settings):
    return create_app(settings).test_client()
