"""`--database` / FLEET_DATABASE_URL on every command that touches the database, and its one-line errors."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from fleet.cli import cli
from fleet.config.settings import load_settings

DATABASE_COMMANDS = [["org", "add"], ["org", "list"], ["org", "remove"], ["org", "rotate"], ["up"], ["broker"],
                     ["collector"], ["web"], ["mosquitto-config"], ["export"], ["db", "info"], ["db", "vacuum"]]


def run(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.mark.parametrize("command", DATABASE_COMMANDS, ids=" ".join)
def test_every_command_that_touches_the_database_takes_database(command):
    assert "--database URL" in run(*command, "--help").stdout


@pytest.mark.parametrize("command", [["agent"], ["simulate"]], ids=" ".join)
def test_commands_without_a_database_do_not(command):
    assert "--database" not in run(*command, "--help").stdout


@pytest.mark.postgresql
def test_org_commands_on_postgresql(tmp_path, pg_server):
    url = pg_server.database()
    added = run("org", "add", "acme", "--json", "--data-dir", str(tmp_path), "--database", url)
    assert added.exit_code == 0, added.stderr
    assert json.loads(added.stdout)["org"] == "acme"
    assert run("org", "list", "--data-dir", str(tmp_path), env={"FLEET_DATABASE_URL": url}).stdout.split() == ["acme"]
    # The flag beats the environment; SQLite's fleet.db is made only when SQLite is the database.
    assert run("org", "list", "--data-dir", str(tmp_path), "--database", f"sqlite:///{tmp_path}/other.db",
               env={"FLEET_DATABASE_URL": url}).stdout == ""
    assert not (tmp_path / "fleet.db").exists()
    rotated = run("org", "rotate", "acme", "--role", "agent", "--json", "--data-dir", str(tmp_path), "--database", url)
    assert json.loads(rotated.stdout)["role"] == "agent"
    assert run("org", "remove", "acme", "--data-dir", str(tmp_path), "--database", url).exit_code == 0


@pytest.mark.parametrize(("url", "expected"), [
    ("mysql://u:hunter2@h/d", "unsupported database URL"),
    ("postgresql://u:hunter2@127.0.0.1:notaport/d", "bad PostgreSQL URL"),
    ("postgresql://u:hunter2@127.0.0.1:1/d", "cannot open database postgresql://u:***@127.0.0.1:1/d"),
])
def test_bad_or_unreachable_databases_are_one_line_errors_without_the_password(tmp_path, url, expected):
    result = run("org", "list", "--data-dir", str(tmp_path), "--database", url)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert expected in result.stderr
    assert "hunter2" not in result.stderr
    assert "Traceback" not in result.stderr


def test_postgresql_without_psycopg_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)
    result = run("org", "list", "--data-dir", str(tmp_path), "--database", "postgresql://u:p@127.0.0.1:1/d")
    assert result.exit_code == 1
    assert result.stderr == ("fleet: error: a postgresql:// database needs psycopg: "
                             "pip install 'fleet-telemetry[postgres]'\n")


def test_database_url_setting(tmp_path):
    config = tmp_path / "fleet.toml"
    config.write_text('database_url = "postgresql://u:secret@db/fleet"\n')
    settings = load_settings(config, env={})
    assert settings.database == "postgresql://u:secret@db/fleet"
    assert "secret" not in repr(settings)
    assert load_settings(config, env={"FLEET_DATABASE_URL": "sqlite:////x.db"}).database == "sqlite:////x.db"
    default = load_settings(env={}, flags={"data_dir": tmp_path})
    assert default.database == f"sqlite:///{tmp_path}/fleet.db"
