"""``fleet user …`` and ``fleet audit``: people from the command line, sign-in links, JSON, one-line errors."""

from __future__ import annotations

import json
import re

from click.testing import CliRunner

from fleet.cli import cli
from fleet.config.settings import Settings
from fleet.web.app import create_app

PASSWORD = "correct horse battery"


def run(d, *args, stdin=None, env=None):
    return CliRunner().invoke(cli, [*args, "--data-dir", str(d)], input=stdin, env=env, catch_exceptions=False)


def test_user_add_prints_a_sign_in_link_where_the_person_chooses_a_password(tmp_path):
    assert run(tmp_path, "org", "add", "acme").exit_code == 0
    added = run(tmp_path, "user", "add", "Ann@Example.com", "--org", "acme", "--role", "operator",
                env={"FLEET_WEB_URL": "https://fleet.example.com/"})
    assert added.exit_code == 0, added.stderr
    link = re.search(r"https://fleet\.example\.com/invite/(\S+)", added.stdout)
    assert link, added.stdout
    client = create_app(Settings(data_dir=tmp_path)).test_client()
    assert client.get(f"/invite/{link.group(1)}").status_code == 200
    done = client.post(f"/invite/{link.group(1)}", data={"password": PASSWORD, "confirm": PASSWORD})
    assert done.status_code == 303
    signed = client.post("/api/session", json={"email": "ann@example.com", "password": PASSWORD})
    assert signed.get_json()["orgs"] == {"acme": "operator"}


def test_user_add_with_a_password_on_stdin_and_json(tmp_path):
    for org in ("acme", "globex"):
        run(tmp_path, "org", "add", org)
    added = run(tmp_path, "user", "add", "bob@example.com", "--org", "acme", "--role", "admin", "--org", "globex",
                "--role", "viewer", "--password-stdin", "--json", stdin=PASSWORD + "\n")
    assert added.exit_code == 0, added.stderr
    assert json.loads(added.stdout) == {"email": "bob@example.com", "orgs": {"acme": "admin", "globex": "viewer"},
                                        "link": None, "expires_at": None}
    client = create_app(Settings(data_dir=tmp_path)).test_client()
    assert client.post("/api/session", json={"email": "bob@example.com", "password": PASSWORD}).status_code == 200
    invited = json.loads(run(tmp_path, "user", "add", "c@example.com", "--org", "acme", "--json").stdout)
    assert invited["orgs"] == {"acme": "viewer"}
    assert invited["link"].startswith("http://127.0.0.1:8080/invite/")
    assert invited["expires_at"] > 0


def test_user_list_grant_revoke_remove_and_the_audit_log(tmp_path):
    run(tmp_path, "org", "add", "acme")
    run(tmp_path, "user", "add", "ann@example.com", "--org", "acme")
    assert run(tmp_path, "user", "grant", "ANN@example.com", "acme", "admin").exit_code == 0
    listed = json.loads(run(tmp_path, "user", "list", "--json").stdout)
    assert [(p["email"], p["orgs"], p["password"]) for p in listed] == [("ann@example.com", {"acme": "admin"}, False)]
    assert "ann@example.com  acme=admin  (no password yet)" in run(tmp_path, "user", "list").stdout
    assert run(tmp_path, "user", "revoke", "ann@example.com", "acme").exit_code == 0
    again = run(tmp_path, "user", "revoke", "ann@example.com", "acme")
    assert again.exit_code == 1
    assert again.stderr.count("\n") == 1
    assert run(tmp_path, "user", "remove", "ann@example.com").exit_code == 0
    assert run(tmp_path, "user", "list", "--json").stdout.strip() == "[]"
    entries = json.loads(run(tmp_path, "audit", "acme", "--json").stdout)
    assert [e["action"] for e in entries] == ["user.add", "user.grant", "user.revoke"]
    assert all(e["actor"].startswith("cli:") for e in entries)
    text = run(tmp_path, "audit", "acme").stdout.splitlines()
    assert len(text) == 3
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  cli:\S+  user\.add  ann@example\.com", text[0])
    assert json.loads(run(tmp_path, "audit", "acme", "--json", "--since", "2999-01-01").stdout) == []


def test_user_errors_are_one_line_and_usage_errors_exit_2(tmp_path):
    run(tmp_path, "org", "add", "acme")
    for args in (("user", "add", "not-an-email"), ("user", "add", "a@example.com", "--org", "nope"),
                 ("user", "remove", "nobody@example.com"), ("user", "grant", "nobody@example.com", "acme", "admin"),
                 ("audit", "nope"), ("audit", "acme", "--since", "yesterday")):
        res = run(tmp_path, *args)
        assert res.exit_code == 1, args
        assert res.stderr.startswith("fleet: error: ")
        assert res.stderr.count("\n") == 1
    short = run(tmp_path, "user", "add", "a@example.com", "--password-stdin", stdin="short\n")
    assert short.exit_code == 1
    assert "at least 8" in short.stderr
    run(tmp_path, "user", "add", "a@example.com")
    assert "already exists" in run(tmp_path, "user", "add", "A@example.com").stderr
    assert run(tmp_path, "user", "add", "b@example.com", "--org", "acme", "--role", "admin", "--role", "viewer"
               ).exit_code == 2
    assert run(tmp_path, "user", "grant", "a@example.com", "acme", "root").exit_code == 2
