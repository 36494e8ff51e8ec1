"""Shared fixtures: a data dir with real certificates, the embedded broker on a free port, two orgs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.broker.pki import ensure_certs
from fleet.broker.server import RunningBroker, start_in_thread
from fleet.config import credentials
from fleet.config.settings import Settings


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Path:
    """A data dir with a freshly generated CA and server certificate."""
    data_dir = tmp_path / "fleet-data"
    ensure_certs(data_dir / "certs", ["127.0.0.1"])
    return data_dir


@pytest.fixture
def broker_settings(fleet_dir: Path) -> Settings:
    """Settings of a test broker: free port, fast credential reloads."""
    return Settings(data_dir=fleet_dir, mqtt_port=0, reload_interval_s=0.5)


@pytest.fixture
def broker(broker_settings: Settings, acme, globex):
    """The embedded broker on a free TLS port, started after orgs acme and globex exist."""
    running: RunningBroker = start_in_thread(broker_settings)
    yield running
    running.stop()


@pytest.fixture
def acme(fleet_dir: Path) -> credentials.OrgSecrets:
    """Org ``acme`` and its keys."""
    return credentials.add_org(fleet_dir, "acme")


@pytest.fixture
def globex(fleet_dir: Path) -> credentials.OrgSecrets:
    """Org ``globex`` and its keys."""
    return credentials.add_org(fleet_dir, "globex")
