"""``fleet enrol``, ``fleet machine`` and ``fleet org set``: JSON shapes as the contract gives them, one-line errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleet.broker.pki import ensure_certs
from fleet.cli import cli
from fleet.config.enrolment import Token
from fleet.config.tls import ca_fingerprint
from fleet.store import identity
from fleet.store.database import open_database, sqlite_url


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_enrol_create_list_revoke(tmp_path: Path) -> None:
    d = str(tmp_path)
    ensure_certs(tmp_path / "certs")
    assert run("org", "add", "acme", "--data-dir", d).exit_code == 0
    made = json.loads(run("enrol", "create", "acme", "--uses", "500", "--expires", "2h", "--json",
                          "--data-dir", d).stdout)
    assert set(made) == {"org", "id", "token", "uses", "expires_at"}
    assert (made["org"], made["uses"]) == ("acme", 500)
    assert made["expires_at"] == pytest.approx(time.time() + 7200, abs=30)
    token = Token.parse(made["token"])
    assert token.id == made["id"]
    assert token.ca_fingerprint == ca_fingerprint((tmp_path / "certs" / "ca.pem").read_bytes())
    plain = run("enrol", "create", "acme", "--data-dir", d)
    assert plain.exit_code == 0
    assert "fleet agent --broker mqtts://127.0.0.1:8883 --org acme --enrol K10" in plain.stdout
    listed = json.loads(run("enrol", "list", "acme", "--json", "--data-dir", d).stdout)
    assert [set(t) for t in listed] == [{"id", "uses", "used", "expires_at", "created_at", "revoked"}] * 2
    assert made["token"] not in json.dumps(listed)
    assert run("enrol", "revoke", "acme", made["id"], "--data-dir", d).exit_code == 0
    revoked = {t["id"]: t["revoked"] for t in json.loads(run("enrol", "list", "acme", "--json", "--data-dir",
                                                                d).stdout)}
    assert revoked[made["id"]] is True
    missing = run("enrol", "revoke", "acme", "0" * 16, "--data-dir", d)
    assert missing.exit_code == 1
    assert missing.stderr.count("\n") == 1
    assert run("enrol", "create", "nope", "--data-dir", d).exit_code == 1
    assert run("enrol", "create", "acme", "--expires", "soon", "--data-dir", d).exit_code == 1


def test_machine_list_revoke_and_org_set(tmp_path: Path) -> None:
    d = str(tmp_path)
    assert run("org", "add", "acme", "--data-dir", d).exit_code == 0
    with open_database(sqlite_url(tmp_path / "fleet.db")) as db:
        identity.store_cert(db, "acme", "db1", "abc", "k" * 64, "PEM", 2e9, 1e9, renewal=False)
        db.execute("INSERT INTO machines(org, machine_id, status) VALUES ('acme', 'web1', 'online')")
    listed = json.loads(run("machine", "list", "acme", "--json", "--data-dir", d).stdout)
    assert listed == [
        {"machine_id": "db1", "auth": "certificate", "serial": "abc", "not_after": 2e9, "enrolled_at": 1e9,
         "revoked": False},
        {"machine_id": "web1", "auth": "org-key", "serial": None, "not_after": None, "enrolled_at": None,
         "revoked": False}]
    assert run("machine", "revoke", "acme", "db1", "--data-dir", d).exit_code == 0
    assert json.loads(run("machine", "list", "acme", "--json", "--data-dir", d).stdout)[0]["revoked"] is True
    no_cert = run("machine", "revoke", "acme", "web1", "--data-dir", d)
    assert no_cert.exit_code == 1
    assert "has no certificate" in no_cert.stderr
    assert run("org", "set", "acme", "--agent-key", "off", "--data-dir", d).exit_code == 0
    with open_database(sqlite_url(tmp_path / "fleet.db")) as db:
        assert identity.load_snapshot(db).key_off == frozenset({"acme"})
    assert run("org", "set", "acme", "--agent-key", "on", "--data-dir", d).exit_code == 0
    assert run("org", "set", "acme", "--agent-key", "maybe", "--data-dir", d).exit_code == 2
