"""Gauntlet, HTTP: hostile requests get clear errors (JSON from the app), never a 500, never a leak."""

from __future__ import annotations

import http.client
import random
import string
import time

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from fleet.config.settings import Settings
from fleet.store.database import open_database
from fleet.web.app import create_app
from fleet.web.server import start_in_thread
from tests import stores
from tests.dbhelpers import ENGINES, insert_reports, sample

ENDPOINTS = ["/api/fleet", "/api/fleet/web-1", "/api/fleet/web-1/history", "/api/events", "/metrics",
             "/api/config", "/healthz"]
PARAMS = ["since", "until", "status", "os", "q", "limit", "offset", "sort", "order", "machine"]


@pytest.fixture(scope="module", params=ENGINES)
def env(request, tmp_path_factory):
    """The app over a database (each engine in turn) with one machine, its history and events."""
    data = tmp_path_factory.mktemp("gauntlet-http")
    database = request.getfixturevalue("pg_server").database() if request.param == "postgresql" else ""
    org = stores.add_org(data, "acme", database or None)
    settings = Settings(data_dir=data, database_url=database, mqtt_port=1, rate_limit_api="1000000/minute",
                        rate_limit_config="1000000/minute")
    now = time.time()
    with open_database(settings.database) as db:
        db.insert("machines", [{"org": "acme", "machine_id": "web-1", "status": "online", "last_seen": now,
                                "system": '{"hostname": "web-1"}', "metrics": '{"cpu_percent": 5}'}])
        insert_reports(db, [sample("acme", "web-1", "s", i, now - i, cpu_percent=1.0) for i in range(100)])
        db.insert("events", [{"org": "acme", "machine_id": "web-1", "ts": now, "new_status": "online"}])
    yield create_app(settings).test_client(), org.reader_key, settings
    if database:
        request.getfixturevalue("pg_server").drop(database)


@pytest.mark.slow
@hsettings(max_examples=300, deadline=None)
@given(endpoint=st.sampled_from(ENDPOINTS),
       params=st.dictionaries(st.sampled_from(PARAMS), st.text(max_size=40), max_size=4))
def test_random_query_strings_never_500(env, endpoint, params):
    client, token, _ = env
    res = client.get(endpoint, query_string=params, headers={"Authorization": f"Bearer {token}"})
    # /healthz answers 503 here (no broker, no collector); a 503 anywhere else would hide a database error.
    assert res.status_code < 500 or (endpoint == "/healthz" and res.status_code == 503), (endpoint, params,
                                                                                          res.status_code)
    if res.status_code >= 400:
        assert res.is_json
        if endpoint != "/healthz":  # /healthz answers 503 with its per-part report
            assert "error" in res.get_json()


@pytest.mark.parametrize("path", ["/../../etc/passwd", "/static/../../store/credentials.py", "/api/fleet/%2e%2e",
                                  "/api/fleet/..%2F..%2Ffleet.db", "/api/fleet/web-1/history/../../x",
                                  "/api/fleet/" + "a" * 5000, "/api/fleet/%00", "/%ff%fe"])
def test_traversal_and_odd_paths_are_json_404s(env, path):
    client, token, _ = env
    res = client.get(path, headers={"Authorization": f"Bearer {token}"})
    assert res.status_code in (400, 401, 404), (path, res.status_code)
    assert res.is_json
    assert b"pepper" not in res.data
    assert b"BEGIN" not in res.data


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_wrong_methods_are_json_405(env, method, endpoint):
    client, token, _ = env
    res = client.open(endpoint, method=method, headers={"Authorization": f"Bearer {token}"}, data=b"x" * 100)
    # DELETE /api/fleet/<machine> forgets the machine: an admin's, so the reader key is refused.
    assert res.status_code == (403 if (method, endpoint) == ("DELETE", "/api/fleet/web-1") else 405)
    assert res.is_json


def test_huge_headers_and_bodies_through_waitress_are_refused_not_500(env):
    _, token, settings = env
    running = start_in_thread(settings.replace(http_port=0))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        conn.putrequest("GET", "/api/fleet")
        conn.putheader("Authorization", f"Bearer {token}")
        conn.putheader("X-Junk", "x" * 300_000)
        conn.endheaders()
        res = conn.getresponse()
        assert 400 <= res.status < 500
        res.read()
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        conn.request("GET", "/api/fleet", headers={"Authorization": "Bearer " + "".join(
            random.choices(string.ascii_letters, k=8000))})
        res = conn.getresponse()
        assert res.status == 401
        assert b"error" in res.read()
        conn.close()
    finally:
        running.stop()
