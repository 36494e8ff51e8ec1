"""`fleet up --demo`: broker, collector, web and demo agents in one process, healthy within seconds."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from fleet.broker.pki import cert_paths, server_identity
from fleet.config.settings import Settings
from fleet.up import DEMO_KEYS_FILE, ensure_demo_org, start_system
from tests.helpers import free_port, wait_for


def get(url, token=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_up_with_demo_runs_everything_and_stops_cleanly(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", mqtt_port=0, http_port=0, interval=0.5, reload_interval_s=0.5)
    thresholds = gc.get_threshold()
    system = start_system(settings, demo=3, real_agent=False)
    try:
        assert gc.get_threshold() == thresholds  # fleet up leaves the GC thresholds alone
        wait_for(lambda: get(f"{system.http_url}/healthz")[0] == 200, timeout=15, message="healthz green")
        token = system.demo_keys.reader_key
        wait_for(lambda: get(f"{system.http_url}/api/fleet", token)[1].get("count") == 3, timeout=20,
                 message="three demo machines listed")
        status, config = get(f"{system.http_url}/api/config")
        assert config["MQTT"]["url"] == system.broker_url
    finally:
        system.stop()
    assert (settings.data_dir / "certs" / "ca.pem").exists()
    assert (settings.data_dir / "fleet.db").exists()


def test_demo_org_keys_are_reused_and_private(tmp_path):
    first = ensure_demo_org(Settings(data_dir=tmp_path))
    assert ensure_demo_org(Settings(data_dir=tmp_path)) == first
    assert (tmp_path / DEMO_KEYS_FILE).stat().st_mode & 0o077 == 0
    (tmp_path / DEMO_KEYS_FILE).unlink()  # keys lost: rotate rather than fail
    second = ensure_demo_org(Settings(data_dir=tmp_path))
    assert second.reader_key != first.reader_key



@pytest.mark.slow
def test_fleet_up_command_starts_and_stops_on_sigterm(tmp_path):
    http_port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "up", "--demo", "2", "--data-dir", str(tmp_path),
                             "--mqtt-port", str(free_port()), "--http-port", str(http_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        wait_for(lambda: _healthy(http_port), timeout=30, message="fleet up healthy")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert "reader key:" in out
        assert "dashboard:" in out
        assert all(line in out.splitlines() for line in server_identity(cert_paths(tmp_path / "certs")).lines())
    finally:
        if proc.poll() is None:
            proc.kill()


def _healthy(port):
    try:
        return get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    except OSError:
        return False
