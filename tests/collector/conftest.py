"""Fixtures of the collector's end-to-end tests: a real broker as an endpoint, running collectors."""

from __future__ import annotations

import pytest

from fleet.config.settings import Settings
from tests.collector.collector_fixtures import Endpoint, embedded_endpoint, mosquitto_endpoint_at


@pytest.fixture(params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def endpoint(request, tmp_path) -> Endpoint:
    """The collector's broker: the embedded one (TLS, real access rules) and Debian's Mosquitto."""
    if request.param == "mosquitto":
        ep = mosquitto_endpoint_at(tmp_path)
        yield ep
        ep.stop()
    else:
        ep = embedded_endpoint(request.getfixturevalue("broker"), request.getfixturevalue("acme"))
        yield ep
        ep.stop()


@pytest.fixture
def mosquitto_endpoint(tmp_path) -> Endpoint:
    """Debian's Mosquitto on a free loopback port."""
    ep = mosquitto_endpoint_at(tmp_path)
    yield ep
    ep.stop()


@pytest.fixture
def collectors():
    """Start collectors with ``collectors(settings)``; every one still running is stopped after the test."""
    from fleet.collector.service import start

    running = []

    def make(settings: Settings):
        collector = start(settings)
        running.append(collector)
        assert collector.wait_subscribed(10), "collector did not subscribe"
        return collector

    yield make
    for collector in running:
        collector.stop()
