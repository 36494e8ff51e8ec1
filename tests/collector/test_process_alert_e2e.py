"""A ``process.<name> < 1`` alert rule fires when the process an agent checks for is gone.

Through the alert API (``fleet.config.rules``, ``fleet.store.alerting``, the ``alerts`` table and
``GET /api/alerts``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.config import rules
from fleet.config.settings import Settings
from fleet.web.app import create_app
from tests import stores
from tests.collector.collector_fixtures import embedded_endpoint, end_agent_and_probe, query
from tests.helpers import bearer, wait_for

ROOT = Path(__file__).resolve().parents[2]


def alert_states(ep):
    return query(ep, "SELECT machine_id, state FROM alerts WHERE org = 'acme' AND rule = 'probe-down' ORDER BY id")


@pytest.mark.slow
def test_a_process_rule_fires_when_the_checked_process_is_killed_and_resolves_when_it_is_back(
        broker, acme, collectors, tmp_path):
    ep = embedded_endpoint(broker, acme)
    program = tmp_path / "fleet-probe-z"
    shutil.copy(shutil.which("sleep"), program)
    probe = subprocess.Popen([str(program), "300"])
    settings = ep.settings(alert_group_wait=0.5)
    stores.add_rule(ep.data_dir, rules.Rule.parse("acme", "probe-down", "process.fleet-probe-z < 1", "0s"))
    collectors(settings)
    cmd = [sys.executable, "-m", "fleet.cli", "agent", "--data-dir", str(tmp_path / "agent"), "--broker", ep.url,
           "--org", "acme", "--key", acme.agent_key, "--machine", "app-1", "--ca", str(ep.ca), "--interval", "0.3",
           "--process", "fleet-probe-z"]
    agent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    web = create_app(Settings(data_dir=ep.data_dir, database_url=ep.database, mqtt_port=1)).test_client()
    try:
        def counted():
            rows = query(ep, "SELECT metrics FROM machines WHERE machine_id = 'app-1'")
            return rows and '"process_counts":{"fleet-probe-z":1}' in rows[0][0]

        wait_for(counted, 20, "the probe counted once")
        assert alert_states(ep) == []  # the process runs: the rule does not hold
        probe.kill()
        probe.wait(5)
        wait_for(lambda: alert_states(ep) == [("app-1", "firing")], 20, "the rule fires")
        body = web.get("/api/alerts?state=firing", headers=bearer(acme.reader_key)).get_json()
        assert [(a["rule"], a["machine_id"], a["value"]) for a in body["data"]] == [("probe-down", "app-1", 0)]
        probe = subprocess.Popen([str(program), "300"])
        wait_for(lambda: alert_states(ep) == [("app-1", "resolved")], 20, "resolved once it runs again")
    finally:
        end_agent_and_probe(agent, probe)
