"""The `fleet` command line: org management, JSON output, one-line errors with exit 1, usage errors exit 2."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fleet.cli import cli
from fleet.launch import parse_agent_args


def run(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_org_lifecycle_json(tmp_path):
    d = str(tmp_path)
    added = run("org", "add", "acme", "--json", "--data-dir", d)
    assert added.exit_code == 0
    body = json.loads(added.stdout)
    assert set(body) == {"org", "agent_key", "reader_key"}
    assert body["org"] == "acme"

    assert run("org", "list", "--data-dir", d).stdout.split() == ["acme"]
    rotated = json.loads(run("org", "rotate", "acme", "--role", "reader", "--json", "--data-dir", d).stdout)
    assert rotated["org"] == "acme"
    assert rotated["role"] == "reader"
    assert rotated["key"] != body["reader_key"]

    dup = run("org", "add", "acme", "--data-dir", d)
    assert dup.exit_code == 1
    assert dup.stderr.count("\n") == 1
    assert "already exists" in dup.stderr

    assert run("org", "remove", "acme", "--data-dir", d).exit_code == 0
    assert run("org", "list", "--data-dir", d).stdout == ""
    gone = run("org", "remove", "acme", "--data-dir", d)
    assert gone.exit_code == 1
    assert "no such org" in gone.stderr


def test_bad_setting_exits_1_with_one_line(tmp_path):
    result = run("org", "list", "--data-dir", str(tmp_path), env={"FLEET_TTL_SECONDS": "soon"})
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0
    assert "ttl_seconds" in result.stderr


def test_usage_errors_exit_2(tmp_path):
    assert run("org", "rotate", "acme", "--role", "admin", "--data-dir", str(tmp_path)).exit_code == 2
    assert run("no-such-command").exit_code == 2


def test_installed_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "fleet.cli", "--help"], capture_output=True, text=True,
                            env={**os.environ}, timeout=30)
    assert result.returncode == 0
    for command in ("up", "org", "agent", "broker", "collector", "web", "simulate"):
        assert command in result.stdout


# `fleet agent` parses a plain command line without click (fleet/launch.py); click stays the reference.
def agent_params_by_click(args):
    return cli.commands["agent"].make_context("agent", list(args)).params


def test_plain_agent_command_lines_parse_as_click_parses_them(tmp_path):
    config_file = tmp_path / "fleet.toml"
    config_file.write_text("")
    command_lines = [
        [],
        ["--broker", "mqtts://h:1", "--org", "acme", "--key", "-starts-with-a-dash", "--machine", "m", "--ca",
         "ca.pem", "--interval", "2.5", "--once", "--print", "--data-dir", str(tmp_path / "new"), "--config",
         str(tmp_path / "absent.toml")],
        ["--interval=1", "--org=a=b", "--data-dir", str(tmp_path), "--config", str(config_file)],
        ["--key", "--once"],  # an option's value is the next word, whatever it looks like
        ["--print", "--interval", " 3 ", "--data-dir", "", "--machine="],
        ["--process", "nginx", "--textfile-dir", "/var/lib/prom", "--process=re:gunicorn.*app,x", "--process", ""],
    ]
    for args in command_lines:
        assert parse_agent_args(args) == agent_params_by_click(args), args


def test_other_agent_command_lines_are_left_to_click(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for args in (["--help"], ["-h"], ["--bogus"], ["extra"], ["--org"], ["--org", "a", "--org", "b"], ["--once=1"],
                 ["--interval", "soon"], ["--data-dir", str(a_file)], ["--config", str(tmp_path)], ["--", "--once"]):
        assert parse_agent_args(args) is None, args
    result = subprocess.run([sys.executable, "-m", "fleet.cli", "agent", "--interval", "soon"], capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "'soon' is not a valid float" in result.stderr


def test_the_agent_runs_without_importing_click():
    code = ("import sys, fleet.cli\n"
            "try:\n"
            "    fleet.cli.main(['agent', '--print', '--once', '--interval', '0.1'])\n"
            "except SystemExit as stop:\n"
            "    print('exit', stop.code, 'click' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    report, verdict = result.stdout.strip().splitlines()
    assert json.loads(report)["seq"] == 0, result.stderr
    assert verdict == "exit 0 False", result.stderr


def test_process_checks_and_the_textfile_dir_from_flags_environment_and_file(tmp_path):
    from fleet.config.errors import SettingsError
    from fleet.config.settings import load_settings

    flags = parse_agent_args(["--process", "nginx", "--process", "re:a{1,2}"])
    assert flags["processes"] == ("nginx", "re:a{1,2}")
    assert load_settings(None, env={}, flags={"processes": flags["processes"]}).processes == ("nginx", "re:a{1,2}")
    assert load_settings(None, env={"FLEET_PROCESSES": "nginx, sshd", "FLEET_TEXTFILE_DIR": "/t"}).processes == (
        "nginx", "sshd")
    config_file = tmp_path / "agent.toml"
    config_file.write_text('processes = ["re:gunicorn.*app,worker", "nginx"]\ntextfile_dir = "/var/lib/prom"\n')
    settings = load_settings(config_file, env={})
    assert (settings.processes, settings.textfile_dir) == (("re:gunicorn.*app,worker", "nginx"), "/var/lib/prom")
    for bad in (("re:(",), ("re:",), ("x\x01",), tuple(f"p{i}" for i in range(65))):
        with pytest.raises(SettingsError, match="processes"):
            load_settings(None, env={}, flags={"processes": bad})
    result = subprocess.run([sys.executable, "-m", "fleet.cli", "agent", "--print", "--once", "--process", "re:("],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "processes" in result.stderr
    assert "bad regex" in result.stderr


def test_half_configured_single_sign_on_exits_1_with_one_line(tmp_path):
    env = {"FLEET_OIDC_ISSUER": "https://id.example.com", "FLEET_OIDC_CLIENT_SECRET": "never-shown"}
    result = run("web", "--data-dir", str(tmp_path), env=env)
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0
    assert "FLEET_OIDC_CLIENT_ID" in result.stderr
    assert "never-shown" not in result.stderr + result.stdout
