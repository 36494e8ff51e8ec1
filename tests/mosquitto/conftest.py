"""Mosquitto fixture: Debian's broker started on a free port with the config fleet exports."""

from __future__ import annotations

import pytest

from tests.mosquitto.process import start_mosquitto


@pytest.fixture
def mosquitto_broker(fleet_dir, acme, globex, tmp_path):
    """Debian's Mosquitto on `fleet mosquitto-config` output for a data dir with orgs acme and globex."""
    running = start_mosquitto(fleet_dir, tmp_path / "mosquitto")
    yield running
    running.stop()
