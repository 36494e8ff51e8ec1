"""FLEET_HEARTBEAT_URL: a real collector requests a real loopback receiver while healthy, and only then."""

from __future__ import annotations

import logging

import pytest

from tests.collector.collector_fixtures import SimAgent, query
from tests.collector.http_recorder import recording
from tests.helpers import wait_for

INTERVAL = 0.3


def _embedded_only(endpoint) -> None:
    if endpoint.anonymous:
        pytest.skip("stopping and restarting the broker is the embedded fixture's")


def test_get_by_default_while_healthy_and_silence_while_the_broker_is_away(endpoint, collectors, caplog):
    _embedded_only(endpoint)
    caplog.set_level(logging.INFO, logger="fleet.collector")
    with recording() as receiver:
        collectors(endpoint.settings(heartbeat_url=receiver.url + "/ping/check-uuid", heartbeat_interval=INTERVAL))
        got = receiver.wait_for_count(2, timeout=10)
        assert {(r.method, r.path) for r in got} == {("GET", "/ping/check-uuid")}
        endpoint.stop()
        wait_for(lambda: "heartbeat not sent: not connected to the broker" in caplog.text, timeout=10,
                 message="the collector to notice the broker is gone")
        before = len(receiver.requests)
        # Three of the collector's own database heartbeats: many intervals without a request.
        beats = query(endpoint, "SELECT ts FROM heartbeats WHERE component = 'collector'")[0][0]
        wait_for(lambda: query(endpoint, "SELECT ts FROM heartbeats WHERE component = 'collector'")[0][0]
                 > beats + 4, timeout=15, message="two more database heartbeats")
        assert len(receiver.requests) == before
        endpoint.restart()
        receiver.wait_for_count(before + 1, timeout=20)


def test_post_sends_the_summary(endpoint, collectors):
    with recording() as receiver:
        collectors(endpoint.settings(heartbeat_url=receiver.url + "/push", heartbeat_interval=INTERVAL,
                                     heartbeat_method="POST"))
        agent = SimAgent(endpoint, "m1").connect()
        agent.ping()
        agent.report()
        found = receiver.wait_for(lambda r: r.json()["machines"]["online"] == 1, timeout=10)
        body = found.json()
        assert found.method == "POST"
        assert set(body) == {"orgs", "machines", "alerts_firing", "ts"}
        assert body["orgs"] == query(endpoint, "SELECT count(*) FROM orgs")[0][0]
        assert body["machines"] == {"online": 1, "stale": 0, "offline": 0}
        assert body["alerts_firing"] == 0
        agent.close()


def test_a_failing_or_hanging_endpoint_never_holds_the_collector(endpoint, collectors, caplog):
    caplog.set_level(logging.WARNING, logger="fleet.collector")
    with recording(status=500) as receiver:
        collectors(endpoint.settings(heartbeat_url=receiver.url + "/ping", heartbeat_interval=INTERVAL * 10))
        receiver.wait_for_count(2, timeout=10)  # retried within the interval
        wait_for(lambda: "heartbeat to the outside monitor failed" in caplog.text, timeout=10)
        assert "/ping" not in caplog.text  # the URL (it may hold a token) is never logged
        receiver.hang = True
        agent = SimAgent(endpoint, "m1").connect()
        for _ in range(5):
            agent.report()
        wait_for(lambda: query(endpoint, "SELECT count(*) FROM reports WHERE machine_id = 'm1'") == [(5,)],
                 timeout=10, message="reports stored while the endpoint hangs")
        agent.close()
