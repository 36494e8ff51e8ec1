"""/api/alerts, /api/silences, fleet_alerts_firing in /metrics, FEATURES.alerts: org-scoped like the rest."""

from __future__ import annotations

import time

import pytest

from tests import stores
from tests.helpers import bearer

pytestmark = pytest.mark.both_engines
SPEC_KEYS = {"id", "rule", "machine_id", "state", "severity", "value", "started_at", "resolved_at", "silenced"}


def _alert(fleet, org, rule, machine, state, severity="warning", value=None, active_at=None, fired_at=None,
           resolved_at=None):
    fleet.insert("alerts", [{"org": org, "rule": rule, "machine_id": machine, "state": state, "severity": severity,
                             "value": value, "active_at": active_at or time.time() - 100, "fired_at": fired_at,
                             "resolved_at": resolved_at, "notified": ""}])


@pytest.fixture
def alerts(fleet):
    now = time.time()
    _alert(fleet, "acme", "machine-offline", "web-1", "firing", "critical", fired_at=now - 50)
    _alert(fleet, "acme", "disk-full", "db-1", "pending", value=93.5)
    _alert(fleet, "acme", "disk-full", "web-2", "resolved", value=91.0, fired_at=now - 90, resolved_at=now - 10)
    _alert(fleet, "acme", "disk-full", "old-1", "resolved", fired_at=now - 9000, resolved_at=now - 8000)
    _alert(fleet, "globex", "machine-offline", "g-1", "firing", "critical", fired_at=now - 5)
    return now


def test_alerts_are_org_scoped_with_spec_fields(client, fleet, alerts):
    body = client.get("/api/alerts", headers=bearer(fleet.acme.reader_key)).get_json()
    assert {a["machine_id"] for a in body["data"]} == {"web-1", "db-1", "web-2", "old-1"}
    for alert in body["data"]:
        assert SPEC_KEYS <= set(alert)
        assert alert["silenced"] is False
    firing = next(a for a in body["data"] if a["state"] == "firing")
    assert (firing["rule"], firing["severity"], firing["started_at"], firing["resolved_at"]) == (
        "machine-offline", "critical", pytest.approx(alerts - 50), None)
    pending = next(a for a in body["data"] if a["state"] == "pending")
    assert pending["value"] == 93.5
    globex = client.get("/api/alerts", headers=bearer(fleet.globex.reader_key)).get_json()
    assert [a["machine_id"] for a in globex["data"]] == ["g-1"]


def test_state_and_since_filters(client, fleet, alerts):
    def ids(query):
        res = client.get(f"/api/alerts{query}", headers=bearer(fleet.acme.reader_key))
        assert res.status_code == 200
        return sorted(a["machine_id"] for a in res.get_json()["data"])

    assert ids("?state=firing") == ["web-1"]
    assert ids("?state=pending") == ["db-1"]
    assert ids("?state=resolved") == ["old-1", "web-2"]
    assert ids(f"?state=resolved&since={alerts - 60}") == ["web-2"]
    assert ids(f"?since={alerts - 60}") == ["db-1", "web-1", "web-2"]  # live alerts are always listed
    assert client.get("/api/alerts?state=bogus", headers=bearer(fleet.acme.reader_key)).status_code == 400
    assert client.get("/api/alerts?since=soon", headers=bearer(fleet.acme.reader_key)).status_code == 400


def test_one_alert_by_id_and_404_for_another_orgs(client, fleet, alerts):
    listed = client.get("/api/alerts", headers=bearer(fleet.acme.reader_key)).get_json()["data"]
    one = client.get(f"/api/alerts/{listed[0]['id']}", headers=bearer(fleet.acme.reader_key))
    assert one.get_json() == listed[0]
    theirs = client.get("/api/alerts?state=firing", headers=bearer(fleet.globex.reader_key)).get_json()["data"][0]
    res = client.get(f"/api/alerts/{theirs['id']}", headers=bearer(fleet.acme.reader_key))
    assert res.status_code == 404
    assert "error" in res.get_json()
    assert client.get("/api/alerts/999999", headers=bearer(fleet.acme.reader_key)).status_code == 404


@pytest.mark.parametrize("path", ["/api/alerts", "/api/alerts/1", "/api/silences"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
def test_missing_or_wrong_token_is_401_json(client, path, headers):
    res = client.get(path, headers=headers)
    assert res.status_code == 401
    assert "error" in res.get_json()


def test_silenced_alerts_say_so_and_silences_are_listed(client, fleet, alerts):
    silence = stores.add_silence(fleet.data_dir, "acme", 3600, "web-*", "machine-offline", "maintenance",
                                   database=fleet.database)
    stores.add_silence(fleet.data_dir, "globex", 3600, database=fleet.database)
    body = client.get("/api/alerts", headers=bearer(fleet.acme.reader_key)).get_json()
    assert {a["machine_id"]: a["silenced"] for a in body["data"]} == {"web-1": True, "db-1": False, "web-2": False,
                                                                      "old-1": False}
    listed = client.get("/api/silences", headers=bearer(fleet.acme.reader_key)).get_json()["data"]
    assert [(s["id"], s["rule"], s["machines"], s["comment"]) for s in listed] == [
        (silence.id, "machine-offline", "web-*", "maintenance")]


def test_metrics_count_firing_alerts_per_rule(client, fleet, alerts):
    text = client.get("/metrics", headers=bearer(fleet.acme.reader_key)).get_data(as_text=True)
    assert "# TYPE fleet_alerts_firing gauge" in text
    assert 'fleet_alerts_firing{org="acme",rule="machine-offline",severity="critical"} 1.0' in text
    assert 'fleet_alerts_firing{org="acme",rule="disk-full",severity="warning"} 0.0' in text
    assert "globex" not in text


def test_config_announces_alerts(client):
    assert client.get("/api/config").get_json()["FEATURES"]["alerts"] is True
