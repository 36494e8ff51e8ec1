"""Shared fixtures: a data dir with real certificates, the embedded broker on a free port, two orgs, the database.

The database is SQLite in the test's data dir. Tests marked ``both_engines`` (whole modules, via
``pytestmark``) run once per engine: ``engine`` is then "sqlite" or "postgresql", and ``database_url``
is a fresh database on a PostgreSQL server started once per test run (tests/postgres.py).
``lan`` gives a test other hosts: network namespaces joined to this one, where the server runs (tests/netns.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.broker.pki import ensure_certs
from fleet.broker.server import RunningBroker, start_in_thread
from fleet.config.settings import Settings
from fleet.store import credentials
from fleet.store.database import open_database, sqlite_url
from tests import netns, stores
from tests.dbhelpers import ENGINES
from tests.postgres import PostgresServer, unavailable_reason


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run tests marked ``both_engines`` that touch the database on SQLite and on PostgreSQL."""
    if "engine" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_engines"):
        if "endpoint" not in metafunc.fixturenames:  # tests/collector/conftest.py pairs the two itself
            metafunc.parametrize("engine", ENGINES, indirect=True)


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> str:
    """The database engine of this test: "sqlite" unless parametrised by ``both_engines``."""
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL server for the whole run, started on first use; skipped where it cannot run."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    server = PostgresServer().start()
    yield server
    server.destroy()


@pytest.fixture
def database_url(engine: str, tmp_path: Path, request: pytest.FixtureRequest):
    """The test's own empty database: ``fleet.db`` in the data dir, or a fresh PostgreSQL database."""
    if engine != "postgresql":
        yield sqlite_url(tmp_path / "fleet-data" / "fleet.db")
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    url = server.database()
    yield url
    server.drop(url)


@pytest.fixture
def db(database_url: str):
    """The test's database, open (its schema created)."""
    opened = open_database(database_url)
    yield opened
    opened.close()


@pytest.fixture(scope="session")
def netns_unavailable() -> str | None:
    """Why this machine cannot make network namespaces for ``lan`` (None when it can), checked once a run."""
    return netns.unavailable_reason()


@pytest.fixture
def lan(netns_unavailable: str | None):
    """A LAN of other hosts (tests/netns.py) joined to this namespace, where the server runs; removed after the
    test, passed or failed. Skipped where namespaces cannot be made (not root, no iproute2)."""
    if netns_unavailable:
        pytest.skip(netns_unavailable)
    made = netns.Lan()
    yield made
    made.close()


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Path:
    """A data dir with a freshly generated CA and server certificate."""
    data_dir = tmp_path / "fleet-data"
    ensure_certs(data_dir / "certs", ["127.0.0.1"])
    return data_dir


@pytest.fixture
def broker_settings(fleet_dir: Path, database_url: str) -> Settings:
    """Settings of a test broker: free port, fast credential reloads."""
    return Settings(data_dir=fleet_dir, database_url=database_url, mqtt_port=0, reload_interval_s=0.5)


@pytest.fixture
def broker(broker_settings: Settings, acme, globex):
    """The embedded broker on a free TLS port, started after orgs acme and globex exist."""
    running: RunningBroker = start_in_thread(broker_settings)
    yield running
    running.stop()


@pytest.fixture
def acme(fleet_dir: Path, database_url: str) -> credentials.OrgSecrets:
    """Org ``acme`` and its keys."""
    return stores.add_org(fleet_dir, "acme", database_url)


@pytest.fixture
def globex(fleet_dir: Path, database_url: str) -> credentials.OrgSecrets:
    """Org ``globex`` and its keys."""
    return stores.add_org(fleet_dir, "globex", database_url)
