"""A second host with only the database URL: ``fleet web`` serves the same keys; a part that lacks a secret says so.

Real PostgreSQL, real ``fleet`` processes, a second data dir that starts empty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fleet.store import credentials
from fleet.store.database import open_database
from fleet.store.pepper import KEY_PEPPER, load_pepper
from tests import stores
from tests.helpers import free_port, port_open, wait_for

pytestmark = [pytest.mark.postgresql, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def engine() -> str:
    return "postgresql"


def _fleet(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fleet.cli", *args], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _status(port: int, token: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/fleet", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _web(data_dir: Path, database: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = _fleet("web", "--data-dir", str(data_dir), "--database", database, "--http-port", str(port))
    wait_for(lambda: port_open(port) or proc.poll() is not None, timeout=20, message="fleet web to listen or exit")
    return proc, port


def _one_line_exit(proc: subprocess.Popen) -> str:
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("fleet: error:")]  # log lines may precede it
    return line


def test_fleet_web_on_a_fresh_host_serves_the_same_keys(tmp_path, database_url):
    first, second = tmp_path / "first", tmp_path / "second"
    keys = stores.add_org(first, "acme", database_url)
    stores.ensure_service_key(first, database_url)
    second.mkdir()
    proc, port = _web(second, database_url)
    try:
        assert proc.poll() is None, proc.communicate()[1]
        assert _status(port, keys.reader_key) == 200
        assert _status(port, keys.agent_key) == 401
        assert _status(port, "not-a-key") == 401
        rotated = stores.rotate_key(first, "acme", "reader", database_url)
        assert _status(port, rotated) == 200
        assert _status(port, keys.reader_key) == 401
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    assert sorted(p.name for p in second.iterdir()) == []  # it needed nothing of its own


def test_parts_that_need_a_local_secret_exit_1_naming_it(tmp_path, database_url):
    first, second = tmp_path / "first", tmp_path / "second"
    stores.add_org(first, "acme", database_url)
    stores.ensure_service_key(first, database_url)
    second.mkdir()
    collector = _fleet("collector", "--data-dir", str(second), "--database", database_url,
                       "--broker", "mqtts://127.0.0.1:1")
    assert "service.key is missing" in _one_line_exit(collector)
    (second / credentials.SERVICE_KEY_FILE).write_bytes((first / credentials.SERVICE_KEY_FILE).read_bytes())
    collector = _fleet("collector", "--data-dir", str(second), "--database", database_url,
                       "--broker", "mqtts://127.0.0.1:1")
    assert "pepper is missing" in _one_line_exit(collector)


def test_an_older_installation_keeps_its_keys_once_a_part_holding_its_pepper_starts(tmp_path, database_url):
    """Before the key pepper, keys were hashed with the first data dir's pepper file alone."""
    first, second = tmp_path / "first", tmp_path / "second"
    keys = stores.add_org(first, "acme", database_url)
    legacy = load_pepper(first)
    with open_database(database_url) as db:  # what such a database holds: digests under the file's pepper
        db.execute("DELETE FROM meta WHERE key = ?", (KEY_PEPPER,))
        for role, key in (("agent", keys.agent_key), ("reader", keys.reader_key)):
            db.execute("UPDATE credentials SET digest = ? WHERE username = ?",
                       (credentials.digest_key(legacy, key), f"acme/{role}"))
    second.mkdir()
    proc, _ = _web(second, database_url)
    err = _one_line_exit(proc)  # it would refuse everyone: it stops and says why
    assert "pepper" in err
    assert str(second / "pepper") in err

    proc, port = _web(first, database_url)  # the first host, upgraded: it moves its pepper into the database
    try:
        assert _status(port, keys.reader_key) == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    proc, port = _web(second, database_url)
    try:
        assert proc.poll() is None
        assert _status(port, keys.reader_key) == 200
        assert json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/config", timeout=5).read())
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_a_broker_without_the_installations_ca_exits_1_naming_it(tmp_path, database_url):
    first, second = tmp_path / "first", tmp_path / "second"
    stores.add_org(first, "acme", database_url)
    port = free_port()
    broker = _fleet("broker", "--data-dir", str(first), "--database", database_url, "--mqtt-port", str(port))
    try:
        wait_for(lambda: port_open(port) or broker.poll() is not None, timeout=30, message="the first broker")
        assert broker.poll() is None, broker.communicate()[1]
    finally:
        broker.terminate()
        broker.communicate(timeout=20)
    second.mkdir()
    other = _fleet("broker", "--data-dir", str(second), "--database", database_url, "--mqtt-port", str(free_port()))
    err = _one_line_exit(other)
    assert "ca.pem is missing" in err
    assert not (second / "certs" / "ca.key").exists()  # it made no CA of its own
