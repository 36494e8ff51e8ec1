"""The alert rule language: every documented form parses into a typed value, everything else raises RuleError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.config import rules
from fleet.config.rules import Conflict, Rule, RuleError, Silence, StatusIs, Threshold


@pytest.mark.parametrize(("text", "expected"), [
    ("status == offline", StatusIs("offline")),
    ("status==stale", StatusIs("stale")),
    ("  status ==   offline ", StatusIs("offline")),
    ("conflict", Conflict()),
    ("cpu_percent > 90", Threshold("cpu_percent", ">", "90")),
    ("disk_percent>=90.5", Threshold("disk_percent", ">=", "90.5")),
    ("load1 < -0.5", Threshold("load1", "<", "-0.5")),
    ("clock_offset_s <= 1e3", Threshold("clock_offset_s", "<=", "1e3")),
    ("process.nginx < 1", Threshold("process.nginx", "<", "1")),
    ('custom.queue_depth{queue="mail"} > 100', Threshold('custom.queue_depth{queue="mail"}', ">", "100")),
    ("process.re:gunicorn.*app < 1", Threshold("process.re:gunicorn.*app", "<", "1")),
])
def test_spec_forms_parse(text, expected):
    parsed = rules.parse_condition(text)
    assert parsed == expected
    assert rules.parse_condition(str(parsed)) == parsed  # the canonical text reads back the same


@pytest.mark.parametrize(("text", "problem"), [
    ("", "empty"),
    ("status", "needs '=='"),
    ("status = offline", "'=='"),
    ("status == online", "'online'"),
    ("status > 3", "'=='"),
    ("cpu_percent", "needs an operator"),
    ("cpu_percent >", "number is missing"),
    ("cpu_percent == 5", "'=='"),
    ("cpu_percent > ninety", "'ninety' is not a number"),
    ("cpu_percent > 1e999", "too large"),
    ("conflict == 1", "conflict takes no operator"),
    ("custom. > 1", "needs a series"),
    ("process. < 1", "needs a process name"),
    ("9lives > 1", "not a field name"),
    ("__import__('os').system('x') > 1", "not a field name"),
    ("cpu_percent > 5 and memory_percent > 5", "cannot read"),
    ("cpu\x00 > 1", "control"),
    ("x" * 600, "longer than"),
])
def test_bad_expressions_name_the_problem(text, problem):
    with pytest.raises(RuleError) as info:
        rules.parse_condition(text)
    assert problem in str(info.value)
    assert "\n" not in str(info.value)


@given(st.text(max_size=80))
def test_any_string_parses_or_raises_rule_error(text):
    try:
        parsed = rules.parse_condition(text)
    except RuleError:
        return
    assert isinstance(parsed, (StatusIs, Conflict, Threshold))
    assert rules.parse_condition(str(parsed)) == parsed


@given(st.from_regex(r"\s*(status|conflict|cpu_percent|custom\.[a-z{}=\"]+|process\.[a-z]+)\s*(==|>=|<=|>|<|=)?"
                     r"\s*(offline|stale|online|-?[0-9.e]+|x)?\s*", fullmatch=True))
def test_near_misses_parse_or_raise_rule_error(text):
    try:
        rules.parse_condition(text)
    except RuleError:
        pass


@given(st.text(max_size=20))
def test_any_duration_and_glob_parse_or_raise_rule_error(text):
    for check in (rules.parse_duration, rules.check_glob):
        try:
            check(text)
        except RuleError:
            pass


@pytest.mark.parametrize(("text", "seconds"), [("0s", 0), ("0", 0), ("30s", 30), ("5m", 300), ("2h", 7200),
                                               ("1d", 86400), ("1h30m", 5400), ("500ms", 0.5)])
def test_durations(text, seconds):
    assert rules.parse_duration(text) == seconds
    assert rules.parse_duration(rules.format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "5", "-5s", "5 m", "5min", "1.5m", "s", "99999999w"])
def test_bad_durations(text):
    with pytest.raises(RuleError):
        rules.parse_duration(text)


def test_globs_match_machine_ids():
    assert rules.glob_matches("*", "anything")
    assert rules.glob_matches("web-*", "web-1")
    assert not rules.glob_matches("web-*", "db-1")
    assert rules.glob_matches("web-[12]", "web-2")
    assert not rules.glob_matches("web-?", "web-10")
    assert not rules.glob_matches("Web-*", "web-1")  # machine ids are case-sensitive
    for bad in ("", "web 1", "web/1", "a" * 200):
        with pytest.raises(RuleError):
            rules.check_glob(bad)


def test_rule_validates_itself_and_lists_as_spec_json():
    rule = Rule.parse("acme", "hot", "cpu_percent>90", "5m", "web-*", "critical")
    assert rule.as_dict() == {"name": "hot", "when": "cpu_percent > 90", "for_s": 300.0, "machines": "web-*",
                              "severity": "critical"}
    assert not rule.is_status
    assert Rule.parse("acme", "down", "status == offline").is_status
    assert rule.applies_to("web-3")
    assert not rule.applies_to("db-1")
    with pytest.raises(RuleError, match="severity"):
        Rule.parse("acme", "hot", "conflict", severity="page")
    with pytest.raises(RuleError, match="rule name"):
        Rule.parse("acme", "bad name", "conflict")


def test_default_rules_are_valid():
    parsed = [Rule("acme", name, rules.parse_condition(when), for_s, "*", severity)
              for name, when, for_s, severity in rules.DEFAULT_RULES]
    assert [r.as_dict()["when"] for r in parsed] == ["status == offline", "status == stale", "disk_percent > 90",
                                                        "cert_days_left < 14"]


METRICS = {"cpu_percent": 12.5, "load_avg": [0.4, 0.3, 0.2], "memory": {"total": 100, "used": 40, "percent": 40.0},
           "swap_percent": 0.0, "disks": [{"mount": "/", "percent": 50.0}, {"mount": "/data", "percent": 93.0}],
           "net": {"bytes_sent": 10, "bytes_recv": 20, "sent_per_s": 1.5}, "process_count": 99,
           "custom": {"queue_depth": 7, 'queue_depth{queue="mail"}': 3}, "process_counts": {"nginx": 0},
           "flag": True}


@pytest.mark.parametrize(("field", "value"), [
    ("cpu_percent", 12.5), ("memory_percent", 40.0), ("disk_percent", 93.0), ("swap_percent", 0.0),
    ("load1", 0.4), ("load15", 0.2), ("process_count", 99), ("net_bytes_sent", 10), ("net_sent_per_s", 1.5),
    ("memory_used", 40), ("custom.queue_depth", 7), ('custom.queue_depth{queue="mail"}', 3),
    ("process.nginx", 0), ("process.sshd", None), ("custom.missing", None), ("no_such_field", None),
    ("flag", None), ("clock_offset_s", 2.5),
])
def test_field_values(field, value):
    assert rules.field_value(field, METRICS, clock_offset_s=-2.5) == value


def test_silence_covers_rule_and_machines_while_active():
    silence = Silence(1, "acme", "web-*", "hot", 100.0, 200.0)
    assert silence.covers("hot", "web-1", 150.0)
    assert not silence.covers("cold", "web-1", 150.0)
    assert not silence.covers("hot", "db-1", 150.0)
    assert not silence.covers("hot", "web-1", 200.0)
    assert Silence(2, "acme", "*", None, 0.0, 10.0).covers("anything", "any", 5.0)


def test_machines_take_a_glob_or_a_label_selector():
    rule = rules.Rule.parse("acme", "r", "cpu_percent > 90", machines="env=prod,role!=db")
    assert rule.by_labels
    assert rule.applies_to("any", {"env": "prod", "role": "web"})
    assert not rule.applies_to("any", {"env": "prod", "role": "db"})
    assert not rule.applies_to("any")
    assert not rules.Rule.parse("acme", "r", "conflict", machines="web-*").by_labels
    silence = rules.Silence(1, "acme", "env=dev", None, 0.0, 10.0)
    assert silence.covers("r", "m", 5.0, {"env": "dev"})
    assert not silence.covers("r", "m", 5.0, {"env": "prod"})
    for bad in ("Env=prod", "env=", "env=prod,", "=x"):
        with pytest.raises(RuleError, match="invalid machine selector"):
            rules.check_machines(bad)


@given(st.text(max_size=60))
def test_any_machines_text_is_a_glob_a_selector_or_a_rule_error(text):
    try:
        rules.check_machines(text)
    except RuleError:
        return
    assert isinstance(rules.machines_match(text, "web-1", {"env": "prod"}), bool)
