"""Fixtures of the collector's end-to-end tests: a real broker as an endpoint, running collectors."""

from __future__ import annotations

import pytest

from fleet.config.settings import Settings
from tests.collector.collector_fixtures import Endpoint, embedded_endpoint, mosquitto_endpoint_at


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests using ``endpoint`` run on the embedded broker and on Mosquitto, with SQLite; marked ``both_engines``,
    also on the embedded broker with PostgreSQL. Which broker and which database are independent, so
    Mosquitto with PostgreSQL would add nothing."""
    if "endpoint" not in metafunc.fixturenames:
        return
    pairs = [("embedded", "sqlite"), pytest.param("mosquitto", "sqlite", marks=pytest.mark.mosquitto)]
    if metafunc.definition.get_closest_marker("both_engines"):
        pairs.append(pytest.param("embedded", "postgresql", marks=pytest.mark.postgresql))
    metafunc.parametrize(("endpoint", "engine"), pairs, indirect=True)


@pytest.fixture
def endpoint(request, tmp_path, database_url) -> Endpoint:
    """The collector's broker: the embedded one (TLS, real access rules) and Debian's Mosquitto."""
    if request.param == "mosquitto":
        ep = mosquitto_endpoint_at(tmp_path, database_url)
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
