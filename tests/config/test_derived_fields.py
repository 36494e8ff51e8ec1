"""One report through the real broker, collector, database and web app: every surface shows the same derived fields.

The report's root mount is not its fullest disk, so a surface that took the root's percent for disk_percent
(as history once did) would disagree with the others.
"""

from __future__ import annotations

import re
import time

import pytest

from fleet.config import derived, rules
from fleet.config.rules import Rule
from fleet.config.settings import Settings
from fleet.store import alerting
from fleet.store.database import open_database
from fleet.web.app import create_app
from tests.collector.collector_fixtures import SimAgent, embedded_endpoint
from tests.collector.conftest import collectors  # noqa: F401 - the running collectors fixture, shared
from tests.helpers import bearer, wait_for

pytestmark = pytest.mark.both_engines

METRICS = {"cpu_percent": 37.5, "swap_percent": 4.5, "memory": {"total": 2**34, "used": 2**33, "percent": 61.5},
           "load_avg": [3.25, 2.5, 1.75], "net": {"bytes_sent": 2**40 + 1, "bytes_recv": 12_345},
           "disks": [{"mount": "/", "total": 2**36, "used": 2**35, "percent": 41.0},
                     {"mount": "/data", "total": 2**40, "used": 2**39, "percent": 93.5},
                     {"mount": "/boot", "total": 2**30, "used": 2**27, "percent": 12.25}]}
EXPECTED = {"cpu_percent": 37.5, "memory_percent": 61.5, "swap_percent": 4.5, "disk_percent": 93.5, "load1": 3.25,
            "load5": 2.5, "load15": 1.75, "net_bytes_sent": 2**40 + 1, "net_bytes_recv": 12_345, "disk_mount": "/data"}
FIRE = {"disk-over-90": "disk_percent > 90", "memory-over-60": "memory_percent > 60", "load-over-3": "load1 > 3"}
QUIET = {"disk-over-95": "disk_percent > 95", "disk-under-50": "disk_percent < 50"}
HISTORY_COLUMNS = ("cpu_percent", "memory_percent", "disk_percent", "load1", "net_bytes_sent", "net_bytes_recv")
GAUGES = {"cpu_percent": "fleet_machine_cpu_percent", "memory_percent": "fleet_machine_memory_percent",
          "disk_percent": "fleet_machine_disk_percent"}


def gauge(text: str, name: str, machine_id: str) -> float:
    """One machine's sample of a /metrics gauge."""
    match = re.search(rf'^{name}{{org="acme",machine_id="{machine_id}"}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name} of {machine_id} missing from /metrics"
    return float(match.group(1))


def test_history_machine_metrics_and_alert_rules_agree_on_one_report(broker, acme, collectors):  # noqa: F811
    ep = embedded_endpoint(broker, acme)
    with open_database(ep.database) as db, db.transaction():
        for name, when in {**FIRE, **QUIET}.items():
            assert alerting.insert_rule(db, Rule.parse("acme", name, when, "0s"), time.time())
    collectors(ep.settings())
    client = create_app(Settings(data_dir=ep.data_dir, database_url=ep.database, mqtt_port=1,
                                 ttl_seconds=3600)).test_client()

    def get(path: str):
        res = client.get(path, headers=bearer(ep.keys.reader_key))
        assert res.status_code == 200, res.get_data(as_text=True)
        return res

    agent = SimAgent(ep, "db-1").connect()
    try:
        agent.report(**METRICS)
    finally:
        agent.close()

    def alerts() -> dict[str, dict]:
        return {a["rule"]: a for a in get("/api/alerts?machine=db-1").get_json()["data"]}

    # The rules of one report are evaluated together: once these fire, the quiet ones have had their chance.
    wait_for(lambda: all(alerts().get(name, {}).get("state") == "firing" for name in FIRE), 15,
             "the disk, memory and load rules firing")
    machine = get("/api/fleet/db-1").get_json()
    points = get("/api/fleet/db-1/history?since=0").get_json()["points"]
    exposition = get("/metrics").get_data(as_text=True)
    fired = alerts()

    # The machine object: its derived fields are the module's, and the root's 41% is nowhere.
    assert machine["derived"] == EXPECTED
    assert machine["metrics"]["disks"] == METRICS["disks"]  # the existing fields as they were
    assert derived.derive(machine["metrics"]) == EXPECTED
    # History (the charts and /api/fleet/<m>/history): the one point holds the same numbers.
    assert len(points) == 1
    assert {column: points[0][column] for column in HISTORY_COLUMNS} == {c: EXPECTED[c] for c in HISTORY_COLUMNS}
    # /metrics: the gauges.
    assert {field: gauge(exposition, name, "db-1") for field, name in GAUGES.items()} == {
        field: EXPECTED[field] for field in GAUGES}
    # Alert rules: the collector's readers saw the same values; the rules that should not fire did not; the
    # default disk-full rule (for 10m) is pending on the fullest disk's 93.5%.
    assert {name: fired[name]["value"] for name in FIRE} == {
        "disk-over-90": EXPECTED["disk_percent"], "memory-over-60": EXPECTED["memory_percent"],
        "load-over-3": EXPECTED["load1"]}
    assert not set(QUIET) & set(fired)
    assert (fired["disk-full"]["state"], fired["disk-full"]["value"]) == ("pending", EXPECTED["disk_percent"])
    # Every field a rule can name by a derived name reads the stored metrics as the machine object shows them.
    assert {field: rules.field_value(field, machine["metrics"]) for field in derived.FIELDS} == {
        field: EXPECTED[field] for field in derived.FIELDS}
