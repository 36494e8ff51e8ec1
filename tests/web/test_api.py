"""The HTTP API over a real database, SQLite and PostgreSQL: contract shapes, org isolation, errors, limits, headers."""

from __future__ import annotations

import re
import time

import pytest

from fleet.config.settings import Settings
from fleet.web.app import create_app
from tests.helpers import bearer, descriptors_held

pytestmark = pytest.mark.both_engines


def test_config_needs_no_auth_and_matches_spec(client, settings):
    body = client.get("/api/config").get_json()
    assert body["FLEET_TTL_SECONDS"] == 3600
    assert body["REFRESH_INTERVAL_MS"] == 1000
    assert body["API_VERSION"] == 1
    assert isinstance(body["FEATURES"], dict)
    assert body["MQTT"] == {"url": settings.effective_broker_url,
                            "topics": {"report": "fleet/{org}/{machine}/report", "ping": "fleet/{org}/{machine}/ping"}}


@pytest.mark.parametrize("path", ["/api/fleet", "/api/fleet/web-1", "/api/fleet/web-1/history", "/api/events",
                                  "/metrics"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}])
def test_missing_or_wrong_token_is_401_json(client, path, headers):
    res = client.get(path, headers=headers)
    assert res.status_code == 401
    assert "error" in res.get_json()
    assert res.headers["WWW-Authenticate"].startswith("Bearer")


def test_agent_key_is_not_an_api_token(client, fleet):
    assert client.get("/api/fleet", headers=bearer(fleet.acme.agent_key)).status_code == 401


def test_fleet_is_org_scoped_and_filterable(client, fleet):
    fleet.machine("acme", "web-1", "online", "Linux")
    fleet.machine("acme", "db-1", "offline", "Linux")
    fleet.machine("acme", "win-1", "stale", "Windows")
    fleet.machine("globex", "web-1", "online", "Linux")
    fleet.insert("org_stats", [{"org": "acme", "expired": 4}], ("org",))
    body = client.get("/api/fleet", headers=bearer(fleet.acme.reader_key)).get_json()
    assert body["count"] == 3
    assert body["expired"] == 4
    assert {m["machine_id"] for m in body["data"]} == {"web-1", "db-1", "win-1"}
    assert all(m["org"] == "acme" for m in body["data"])
    machine = body["data"][0]
    for key in ("org", "machine_id", "hardware_id", "status", "last_seen", "last_ping", "clock_offset_s", "conflict",
                "system", "metrics"):
        assert key in machine
    assert isinstance(machine["conflict"], bool)
    assert isinstance(machine["system"], dict)
    only_online = client.get("/api/fleet?status=online", headers=bearer(fleet.acme.reader_key)).get_json()
    assert [m["machine_id"] for m in only_online["data"]] == ["web-1"]
    windows = client.get("/api/fleet?os=Windows", headers=bearer(fleet.acme.reader_key)).get_json()
    assert [m["machine_id"] for m in windows["data"]] == ["win-1"]
    paged = client.get("/api/fleet?limit=1&offset=1&sort=machine_id", headers=bearer(fleet.acme.reader_key)).get_json()
    assert paged["count"] == 3
    assert [m["machine_id"] for m in paged["data"]] == ["web-1"]
    search = client.get("/api/fleet?q=db", headers=bearer(fleet.acme.reader_key)).get_json()
    assert [m["machine_id"] for m in search["data"]] == ["db-1"]


def test_another_orgs_machine_is_a_plain_404(client, fleet):
    fleet.machine("globex", "secret-1")
    for path in ("/api/fleet/secret-1", "/api/fleet/secret-1/history", "/api/fleet/nobody"):
        res = client.get(path, headers=bearer(fleet.acme.reader_key))
        assert res.status_code == 404
        assert "error" in res.get_json()
    assert client.get("/api/fleet/secret-1", headers=bearer(fleet.globex.reader_key)).status_code == 200


def test_history_is_oldest_first_and_bounded_by_since_until(client, fleet):
    fleet.machine("acme", "web-1")
    start = time.time() - 600
    fleet.reports("acme", "web-1", 50, start)
    res = client.get(f"/api/fleet/web-1/history?since={start + 100}&until={start + 200}",
                     headers=bearer(fleet.acme.reader_key)).get_json()
    assert res["machine_id"] == "web-1"
    ts = [p["ts"] for p in res["points"]]
    assert ts == sorted(ts)
    assert ts[0] >= start + 100
    assert ts[-1] <= start + 200
    assert len(ts) == 11
    point = res["points"][0]
    for key in ("ts", "session", "seq", "cpu_percent", "memory_percent", "disk_percent"):
        assert key in point


def test_history_since_after_now_without_until_is_200_with_the_points_after_it(client, fleet):
    """A client polling with since=<last ts> gets 200 and the newer points, even when its clock runs ahead of ours."""
    fleet.machine("acme", "web-1")
    now = time.time()
    url = "/api/fleet/web-1/history?since={}"
    res = client.get(url.format(now + 3600), headers=bearer(fleet.acme.reader_key))
    assert res.status_code == 200
    assert res.get_json() == {"machine_id": "web-1", "points": []}
    fleet.reports("acme", "web-1", 5, now + 100, step=1.0)  # an agent whose clock is ahead of the server's
    res = client.get(url.format(now + 101.5), headers=bearer(fleet.acme.reader_key))
    assert res.status_code == 200
    assert [p["ts"] for p in res.get_json()["points"]] == [now + 100 + i for i in (2, 3, 4)]
    bounded = client.get(f"/api/fleet/web-1/history?since={now + 50}&until={now + 102}",
                         headers=bearer(fleet.acme.reader_key))
    assert [p["ts"] for p in bounded.get_json()["points"]] == [now + 100 + i for i in (0, 1, 2)]


def test_events_of_the_org_since(client, fleet):
    now = time.time()
    fleet.event("acme", "web-1", now - 100, None, "online")
    fleet.event("acme", "web-1", now - 50, "online", "offline", "lost")
    fleet.event("globex", "x", now - 10, None, "online")
    body = client.get(f"/api/events?since={now - 60}", headers=bearer(fleet.acme.reader_key)).get_json()
    assert [(e["machine_id"], e["new_status"], e["reason"]) for e in body["events"]] == [("web-1", "offline", "lost")]


@pytest.mark.parametrize("path", ["/api/events?since=abc", "/api/fleet/web-1/history?since=abc",
                                  "/api/fleet/web-1/history?until=nan", "/api/fleet?status=sleeping",
                                  "/api/fleet?limit=0", "/api/fleet?sort=password",
                                  "/api/fleet/web-1/history?since=10&until=5"])
def test_bad_query_params_are_400_json(client, fleet, path):
    fleet.machine("acme", "web-1")
    res = client.get(path, headers=bearer(fleet.acme.reader_key))
    assert res.status_code == 400
    assert "error" in res.get_json()


def test_unknown_routes_wrong_methods_and_traversal_are_json(client, fleet):
    assert client.get("/api/nothing").status_code == 404
    res = client.post("/api/fleet", headers=bearer(fleet.acme.reader_key))
    assert res.status_code == 405
    assert res.get_json()["error"]
    res = client.get("/api/fleet/..%2F..%2Fetc%2Fpasswd", headers=bearer(fleet.acme.reader_key))
    assert res.status_code == 404
    assert res.is_json
    res = client.get("/static/../../store/credentials.py")
    assert res.status_code == 404


def test_metrics_is_prometheus_text_for_the_org(client, fleet):
    fleet.machine("acme", "web-1", cpu=12.5)
    fleet.machine("acme", 'we"ird', conflict=True)
    fleet.machine("globex", "hidden")
    fleet.insert("drops", [{"reason": "not_json", "count": 3}], ("reason",))
    res = client.get("/metrics", headers=bearer(fleet.acme.reader_key))
    assert res.status_code == 200
    assert res.mimetype == "text/plain"
    text = res.get_data(as_text=True)
    label = r'[a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?'
    sample = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{(" + label + r")*\})? -?[0-9.e+-]+(inf)?$")
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert 'fleet_machine_cpu_percent{org="acme",machine_id="web-1"} 12.5' in text
    assert 'machine_id="we\\"ird"' in text
    assert 'fleet_collector_dropped_messages_total{reason="not_json"} 3.0' in text
    assert "hidden" not in text


def test_security_headers_on_every_response(client):
    for path in ("/", "/api/config", "/healthz", "/static/app.js"):
        res = client.get(path)
        csp = res.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp
        assert "'unsafe-inline'" not in csp
        assert res.headers["X-Content-Type-Options"] == "nosniff"
        assert res.headers["X-Frame-Options"] == "DENY"


def test_rate_limits_answer_429_json(fleet):
    app = create_app(Settings(data_dir=fleet.data_dir, database_url=fleet.database, rate_limit_config="3/minute",
                              rate_limit_api="5/minute"))
    client = app.test_client()
    codes = [client.get("/api/config").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    assert client.get("/api/config").get_json()["error"]
    codes = [client.get("/api/fleet", headers=bearer(fleet.acme.reader_key)).status_code for _ in range(6)]
    assert codes[-1] == 429


def test_healthz_reports_each_part(client, fleet):
    res = client.get("/healthz")
    body = res.get_json()
    assert res.status_code == 503  # no broker on port 1, no collector heartbeat
    assert body["database"] == "ok"
    assert body["collector"] != "ok"
    assert body["broker"] != "ok"
    fleet.insert("heartbeats", [{"component": "collector", "ts": time.time(), "detail": '{"broker_connected": true}'}],
                 ("component",))
    assert client.get("/healthz").get_json()["collector"] == "ok"


def test_served_by_waitress(settings, fleet):
    import urllib.request

    from fleet.web.server import start_in_thread

    running = start_in_thread(settings.replace(http_port=0))
    try:
        with urllib.request.urlopen(f"{running.url}/api/config", timeout=5) as res:
            assert res.status == 200
            assert res.headers["Server"] == "fleet"
    finally:
        running.stop()


def test_serves_when_the_process_holds_more_than_1024_descriptors(settings, fleet):
    import urllib.request

    from fleet.web.server import start_in_thread

    with descriptors_held():
        running = start_in_thread(settings.replace(http_port=0))
        try:
            for _ in range(3):
                with urllib.request.urlopen(f"{running.url}/api/config", timeout=5) as res:
                    assert res.status == 200
        finally:
            running.stop()
