"""`fleet machine label`, `--label` and `--machines SELECTOR` on the command line: as documented, one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fleet.cli import cli
from fleet.launch import parse_agent_args
from tests import stores


def run(data_dir, *args):
    return CliRunner().invoke(cli, [*args, "--data-dir", str(data_dir)], catch_exceptions=False)


@pytest.fixture
def data_dir(tmp_path):
    stores.add_org(tmp_path, "acme")
    return tmp_path


def test_machine_label_sets_and_removes_server_labels(data_dir):
    result = run(data_dir, "machine", "label", "acme", "web-1", "env=prod", "site=par", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"machine_id": "web-1", "labels": {"env": "prod", "site": "par"}}
    result = run(data_dir, "machine", "label", "acme", "web-1", "role=web", "--remove", "site")
    assert result.stdout.strip() == "machine web-1 of org acme: env=prod,role=web"
    for args, named in ((["Env=prod"], "'Env'"), (["env"], "'env'"), (["--remove", "Bad"], "'Bad'"),
                        (["env=a", "--remove", "env"], "both set and removed")):
        bad = run(data_dir, "machine", "label", "acme", "web-1", *args)
        assert bad.exit_code == 1
        assert bad.stderr.count("\n") == 1
        assert named in bad.stderr
    assert run(data_dir, "machine", "label", "nope", "web-1", "env=prod").exit_code == 1
    assert run(data_dir, "machine", "label", "acme", "web-1").exit_code == 2  # nothing to do: a usage error


def test_alert_rules_and_silences_take_a_label_selector(data_dir):
    added = run(data_dir, "alert", "add", "acme", "prod-hot", "--when", "cpu_percent > 90", "--machines",
                "env=prod,role!=db")
    assert added.exit_code == 0, added.stderr
    listed = json.loads(run(data_dir, "alert", "list", "acme", "--json").stdout)
    assert {r["name"]: r["machines"] for r in listed}["prod-hot"] == "env=prod,role!=db"
    bad = run(data_dir, "alert", "add", "acme", "x", "--when", "conflict", "--machines", "Env=prod")
    assert bad.exit_code == 1
    assert "invalid machine selector" in bad.stderr
    silenced = run(data_dir, "alert", "silence", "acme", "--for", "1h", "--machines", "env=dev", "--json")
    assert silenced.exit_code == 0, silenced.stderr
    silences = json.loads(run(data_dir, "alert", "silences", "acme", "--json").stdout)
    assert [s["machines"] for s in silences] == ["env=dev"]


def test_agent_label_flags_are_parsed_without_click_and_a_bad_one_exits_1(data_dir):
    params = parse_agent_args(["--label", "env=prod", "--label=role=web", "--print"])
    assert params is not None
    assert params["labels"] == ("env=prod", "role=web")
    bad = CliRunner().invoke(cli, ["agent", "--print", "--once", "--label", "role", "--data-dir", str(data_dir)])
    assert bad.exit_code == 1
    assert "invalid label 'role'" in bad.stderr
