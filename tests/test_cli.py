"""The `fleet` command line: org management, JSON output, one-line errors with exit 1, usage errors exit 2."""

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from fleet.cli import cli


def run(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_org_lifecycle_json(tmp_path):
    d = str(tmp_path)
    added = run("org", "add", "acme", "--json", "--data-dir", d)
    assert added.exit_code == 0
    body = json.loads(added.stdout)
    assert set(body) == {"org", "agent_key", "reader_key"} and body["org"] == "acme"

    assert run("org", "list", "--data-dir", d).stdout.split() == ["acme"]
    rotated = json.loads(run("org", "rotate", "acme", "--role", "reader", "--json", "--data-dir", d).stdout)
    assert rotated["org"] == "acme" and rotated["role"] == "reader" and rotated["key"] != body["reader_key"]

    dup = run("org", "add", "acme", "--data-dir", d)
    assert dup.exit_code == 1 and dup.stderr.count("\n") == 1 and "already exists" in dup.stderr

    assert run("org", "remove", "acme", "--data-dir", d).exit_code == 0
    assert run("org", "list", "--data-dir", d).stdout == ""
    gone = run("org", "remove", "acme", "--data-dir", d)
    assert gone.exit_code == 1 and "no such org" in gone.stderr


def test_bad_setting_exits_1_with_one_line(tmp_path):
    result = run("org", "list", "--data-dir", str(tmp_path), env={"FLEET_TTL_SECONDS": "soon"})
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "ttl_seconds" in result.stderr


def test_usage_errors_exit_2(tmp_path):
    assert run("org", "rotate", "acme", "--role", "admin", "--data-dir", str(tmp_path)).exit_code == 2
    assert run("no-such-command").exit_code == 2


def test_installed_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "fleet.cli", "--help"], capture_output=True, text=True,
                            env={**os.environ}, timeout=30)
    assert result.returncode == 0
    for command in ("up", "org", "agent", "broker", "collector", "web", "simulate"):
        assert command in result.stdout
