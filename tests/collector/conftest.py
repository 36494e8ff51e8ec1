"""Fixtures of the collector's end-to-end tests: a real broker as an endpoint, running collectors."""

from __future__ import annotations

import pytest

from fleet.config.settings import Settings
from tests.collector.collector_fixtures import Endpoint, embedded_endpoint, mosquitto_endpoint_at


def pytest_collection_modifyitems(config, items) -> None:
    """Run the end-to-end tests on Mosquitto with SQLite only: which broker and which database are independent,
    and embedded x PostgreSQL covers the database's side."""
    skipped = [item for item in items if getattr(item, "callspec", None) is not None
               and item.callspec.params.get("endpoint") == "mosquitto"
               and item.callspec.params.get("engine") == "postgresql"]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [item for item in items if item not in skipped]


@pytest.fixture(params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
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
