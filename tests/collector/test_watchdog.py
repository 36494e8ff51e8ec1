"""``--watchdog`` channels: the active collector sends the always-firing FleetWatchdog alert again and again."""

from __future__ import annotations

from click.testing import CliRunner

from fleet import notify
from fleet.cli import cli
from tests.collector.http_recorder import recording

INTERVAL = 0.5


def test_a_watchdog_webhook_gets_fleet_watchdog_again_and_again(endpoint, collectors):
    with recording() as receiver:
        added = CliRunner().invoke(cli, ["alert", "channel", "add", "acme", "dms", receiver.url + "/dms", "--watchdog",
                                         "--data-dir", str(endpoint.data_dir), "--database", endpoint.database])
        assert added.exit_code == 0, added.stderr
        collectors(endpoint.settings(watchdog_interval_s=INTERVAL, alert_group_wait=0))
        got = receiver.wait_for_count(3, timeout=15)
        for request in got:
            body = request.json()
            assert body["status"] == "firing"
            [alert] = body["alerts"]
            assert alert["labels"] == {"alertname": notify.WATCHDOG_RULE, "org": "acme", "machine_id": "fleet",
                                       "severity": "none"}
            assert alert["endsAt"] == "0001-01-01T00:00:00Z"
        assert len({r.headers["Idempotency-Key"] for r in got}) == len(got)  # each one a new notification
