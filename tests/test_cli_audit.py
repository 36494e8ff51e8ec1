"""Changes made with the ``fleet`` commands are in the org's audit log as ``cli:<unix user>``, with no secret;
``fleet machine forget`` and ``fleet enrol create``'s command line, which the web API shares."""

from __future__ import annotations

import json

from click.testing import CliRunner

from fleet.broker.pki import ensure_certs
from fleet.cli import cli
from fleet.config.settings import Settings
from fleet.store import audit
from fleet.store.database import open_database


def run(data_dir, *args):
    result = CliRunner().invoke(cli, [*args, "--data-dir", str(data_dir)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_every_change_made_with_the_cli_is_audited_under_the_unix_user(tmp_path):
    d = tmp_path / "fleet-data"
    ensure_certs(d / "certs")
    keys = json.loads(run(d, "org", "add", "acme", "--json"))
    run(d, "org", "rotate", "acme", "--role", "reader")
    run(d, "org", "set", "acme", "--agent-key", "off")
    run(d, "alert", "add", "acme", "hot", "--when", "cpu_percent > 90", "--for", "5m")
    run(d, "alert", "remove", "acme", "hot")
    secret = json.loads(run(d, "alert", "channel", "add", "acme", "ops", "https://hooks.example.com/x", "--json"))
    run(d, "alert", "channel", "remove", "acme", "ops")
    silence = json.loads(run(d, "alert", "silence", "acme", "--for", "1h", "--comment", "deploy", "--json"))["id"]
    run(d, "alert", "unsilence", "acme", str(silence))
    token = json.loads(run(d, "enrol", "create", "acme", "--json"))
    run(d, "enrol", "revoke", "acme", token["id"])
    run(d, "machine", "label", "acme", "m1", "env=prod")
    database = Settings(data_dir=d).database
    with open_database(database) as db:
        db.execute("INSERT INTO machines(org, machine_id, status, last_seen, updated) VALUES ('acme', 'm1', 'online',"
                   " 1.0, 1.0)")
        db.execute("INSERT INTO machine_certs(org, machine_id, serial, key_sha256, cert, not_after, enrolled_at)"
                   " VALUES ('acme', 'm1', 'ab', 'k', 'pem', 9e9, 1)")
    run(d, "machine", "revoke", "acme", "m1")
    assert run(d, "machine", "forget", "acme", "m1") == "forgot machine acme/m1\n"
    with open_database(database) as db:
        entries = audit.entries(db, "acme")
        assert db.query("SELECT machine_id FROM machines") == []
    actor = audit.cli_actor()
    assert {e["actor"] for e in entries} == {actor}
    assert [(e["action"], e["target"]) for e in entries] == [
        ("org.add", "acme"), ("org.rotate", "acme"), ("org.set", "acme"), ("rule.create", "hot"),
        ("rule.delete", "hot"), ("channel.create", "ops"), ("channel.delete", "ops"),
        ("silence.create", str(silence)), ("silence.delete", str(silence)), ("enrol.create", token["id"]),
        ("enrol.revoke", token["id"]), ("machine.label", "m1"), ("machine.revoke", "m1"), ("machine.forget", "m1")]
    assert entries[3]["detail"]["when"] == "cpu_percent > 90"
    assert entries[7]["detail"]["comment"] == "deploy"
    assert entries[11]["detail"] == {"set": {"env": "prod"}, "removed": []}
    text = json.dumps(entries)
    for value in (keys["agent_key"], keys["reader_key"], secret["secret"], token["token"]):
        assert value not in text


def test_enrol_create_prints_the_agent_command_line_the_web_api_gives(tmp_path):
    d = tmp_path / "fleet-data"
    ensure_certs(d / "certs")
    run(d, "org", "add", "acme")
    out = run(d, "enrol", "create", "acme")
    token = out.splitlines()[0].removeprefix("token: ")
    assert f"  fleet agent --broker mqtts://127.0.0.1:8883 --org acme --enrol {token}" in out.splitlines()
