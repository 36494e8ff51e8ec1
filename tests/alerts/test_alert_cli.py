"""`fleet alert …`: rules, channels and silences as documented, one-line errors with exit 1, no secret ever shown."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fleet.cli import cli
from tests import stores
from tests.alerts.receiver import Receiver, signed_with


def run(data_dir, *args, env=None):
    return CliRunner().invoke(cli, [*args, "--data-dir", str(data_dir)], env=env, catch_exceptions=False)


@pytest.fixture
def data_dir(tmp_path):
    stores.add_org(tmp_path, "acme")
    return tmp_path


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_rules_add_list_remove(data_dir):
    added = run(data_dir, "alert", "add", "acme", "hot", "--when", "cpu_percent>90", "--for", "5m", "--machines",
                "web-*", "--severity", "critical")
    assert added.exit_code == 0, added.stderr
    listed = json.loads(run(data_dir, "alert", "list", "acme", "--json").stdout)
    assert {"name": "hot", "when": "cpu_percent > 90", "for_s": 300.0, "machines": "web-*",
            "severity": "critical"} in listed
    assert {r["name"] for r in listed} == {"hot", "machine-offline", "machine-stale", "disk-full", "cert-expiring"}
    assert set(listed[0]) == {"name", "when", "for_s", "machines", "severity"}
    dup = run(data_dir, "alert", "add", "acme", "hot", "--when", "conflict")
    assert (dup.exit_code, dup.stderr.count("\n")) == (1, 1)
    assert run(data_dir, "alert", "remove", "acme", "hot").exit_code == 0
    assert "hot" not in run(data_dir, "alert", "list", "acme").stdout
    assert run(data_dir, "alert", "remove", "acme", "hot").exit_code == 1


@pytest.mark.parametrize(("args", "problem"), [
    (("--when", "cpu_percent >> 90"), "unknown operator"),
    (("--when", "status == online"), "'online'"),
    (("--when", "os.system('x')"), "cannot read"),
    (("--when", "conflict", "--for", "5 minutes"), "invalid duration"),
    (("--when", "conflict", "--machines", "a b"), "glob"),
])
def test_bad_rules_exit_1_naming_the_problem(data_dir, args, problem):
    result = run(data_dir, "alert", "add", "acme", "r1", *args)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert problem in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_org_and_bad_severity(data_dir):
    assert run(data_dir, "alert", "list", "nope").exit_code == 1
    assert run(data_dir, "alert", "add", "acme", "r", "--when", "conflict", "--severity", "page").exit_code == 2


def test_webhook_channel_add_test_list(data_dir, receiver):
    added = run(data_dir, "alert", "channel", "add", "acme", "hook", receiver.url, "--json")
    assert added.exit_code == 0, added.stderr
    body = json.loads(added.stdout)
    assert set(body) == {"org", "channel", "secret"}
    assert (body["org"], body["channel"]) == ("acme", "hook")
    secret = body["secret"]
    assert len(secret) >= 32

    tested = run(data_dir, "alert", "channel", "test", "acme", "hook")
    assert tested.exit_code == 0, tested.stderr
    post = receiver.wait_posts(1)[0]
    assert signed_with(post, secret)
    assert post.json()["version"] == "4"

    listed = run(data_dir, "alert", "channel", "list", "acme", "--json")
    channels = json.loads(listed.stdout)
    assert [(c["channel"], c["kind"], c["failures"]) for c in channels] == [("hook", "webhook", 0)]
    assert channels[0]["last_delivery"] is not None
    text = run(data_dir, "alert", "channel", "list", "acme")
    for output in (listed.stdout, text.stdout, listed.stderr, text.stderr, tested.stdout, tested.stderr):
        assert secret not in output
    assert run(data_dir, "alert", "channel", "add", "acme", "hook", receiver.url).exit_code == 1


def test_a_failing_channel_test_exits_1_with_the_reason_and_shows_in_the_list(data_dir, receiver):
    receiver.answers.append(404)
    assert run(data_dir, "alert", "channel", "add", "acme", "hook", receiver.url).exit_code == 0
    tested = run(data_dir, "alert", "channel", "test", "acme", "hook")
    assert tested.exit_code == 1
    assert "404" in tested.stderr
    channel = json.loads(run(data_dir, "alert", "channel", "list", "acme", "--json").stdout)[0]
    assert channel["failures"] == 1
    assert "404" in channel["last_error"]
    assert channel["last_delivery"] is None


def test_other_channel_kinds_have_no_secret_and_bad_urls_exit_1(data_dir):
    added = run(data_dir, "alert", "channel", "add", "acme", "am", "alertmanager+http://127.0.0.1:9093", "--json")
    assert json.loads(added.stdout)["secret"] is None
    assert json.loads(run(data_dir, "alert", "channel", "add", "acme", "mail", "mailto:ops@example.com",
                          "--json").stdout)["secret"] is None
    bad = run(data_dir, "alert", "channel", "add", "acme", "x", "ftp//nothing")
    assert (bad.exit_code, bad.stderr.count("\n")) == (1, 1)
    assert run(data_dir, "alert", "channel", "remove", "acme", "am").exit_code == 0
    assert run(data_dir, "alert", "channel", "remove", "acme", "am").exit_code == 1


def test_silence_and_unsilence(data_dir):
    result = run(data_dir, "alert", "silence", "acme", "--for", "2h", "--machines", "web-*", "--rule",
                 "machine-offline", "--comment", "maintenance", "--json")
    assert result.exit_code == 0, result.stderr
    body = json.loads(result.stdout)
    assert set(body) == {"id", "ends_at"}
    listed = json.loads(run(data_dir, "alert", "silences", "acme", "--json").stdout)
    assert [(s["id"], s["rule"], s["machines"], s["comment"]) for s in listed] == [
        (body["id"], "machine-offline", "web-*", "maintenance")]
    assert run(data_dir, "alert", "unsilence", "acme", str(body["id"])).exit_code == 0
    assert json.loads(run(data_dir, "alert", "silences", "acme", "--json").stdout) == []
    assert run(data_dir, "alert", "unsilence", "acme", "999").exit_code == 1
    assert run(data_dir, "alert", "silence", "acme", "--for", "soon").exit_code == 1


def test_watchdog_is_for_webhook_and_alertmanager_channels(data_dir, receiver):
    assert run(data_dir, "alert", "channel", "add", "acme", "hook", receiver.url, "--watchdog").exit_code == 0
    assert run(data_dir, "alert", "channel", "add", "acme", "am", "alertmanager+http://127.0.0.1:9093",
               "--watchdog").exit_code == 0
    bad = run(data_dir, "alert", "channel", "add", "acme", "mail", "mailto:ops@example.com", "--watchdog")
    assert (bad.exit_code, bad.stderr.count("\n")) == (1, 1)
    assert "--watchdog" in bad.stderr
    listed = json.loads(run(data_dir, "alert", "channel", "list", "acme", "--json").stdout)
    assert {c["channel"]: c["watchdog"] for c in listed} == {"am": True, "hook": True}
