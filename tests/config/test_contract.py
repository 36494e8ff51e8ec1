"""The wire contract: ids, topics and payload validation shared by every part."""

import json

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from fleet.config import payloads
from fleet.config.errors import ContractError, InvalidId, PayloadError
from fleet.config.ids import is_valid_id, sanitize_machine_id, validate_id
from fleet.config.topics import (
    Topic,
    agent_client_id,
    machine_from_client_id,
    org_filter,
    ping_topic,
    report_topic,
    topic_matches,
)


@pytest.mark.parametrize("value", ["a", "web-1", "A_b.c-9", "x" * 64])
def test_valid_ids(value):
    assert validate_id(value) == value


@pytest.mark.parametrize("value", ["", "-a", ".a", "_a", "a/b", "a+b", "a#", "$SYS", "x" * 65, "a b", "é", None, 5])
def test_invalid_ids(value):
    assert not is_valid_id(value)
    with pytest.raises(InvalidId):
        validate_id(value)


@pytest.mark.parametrize(("hostname", "expected"), [
    ("Web-1.Example.COM", "web-1.example.com"), ("my host!", "my-host-"), ("--x", "x"), ("", "machine"),
])
def test_sanitize_hostname(hostname, expected):
    assert sanitize_machine_id(hostname) == expected


@given(st.text(max_size=100))
def test_sanitize_always_gives_a_valid_id(hostname):
    assert is_valid_id(sanitize_machine_id(hostname))


def test_topics_round_trip():
    assert report_topic("acme", "web-1") == "fleet/acme/web-1/report"
    assert ping_topic("acme", "web-1") == "fleet/acme/web-1/ping"
    assert Topic.parse("fleet/acme/web-1/ping") == Topic("acme", "web-1", "ping")
    assert org_filter("acme") == "fleet/acme/#"
    bad_topics = ("fleet/acme/report", "fleet/acme/+/report", "x/acme/m/report", "fleet/acme/m/other",
                  "fleet/a/m/ping/x")
    for bad in bad_topics:
        with pytest.raises(ContractError):
            Topic.parse(bad)


def test_client_ids():
    assert agent_client_id("acme-eu", "web-1") == "fleet-acme-eu-web-1"
    assert machine_from_client_id("acme-eu", "fleet-acme-eu-web-1") == "web-1"
    assert machine_from_client_id("acme", "fleet-other-web-1") is None
    assert machine_from_client_id("acme", "fleet-acme-") is None


@pytest.mark.parametrize(("filter_", "topic", "expected"), [
    ("fleet/#", "fleet/a/m/report", True), ("fleet/a/+/ping", "fleet/a/m/ping", True),
    ("fleet/a/+/ping", "fleet/b/m/ping", False), ("#", "$SYS/x", False), ("fleet/a/#", "fleet/a", True),
    ("fleet/+", "fleet/a/b", False),
])
def test_filter_matching(filter_, topic, expected):
    assert topic_matches(filter_, topic) is expected


def _report(**overrides):
    body = payloads.build_report("web-1", "0x1a2b", "s1", 3, 1764000000.125,
                                 {"cpu_percent": 12.5, "memory": {"total": 10, "used": 5, "percent": 50.0},
                                  "disks": [{"mount": "/", "total": 10, "used": 1, "percent": 10.0}],
                                  "net": {"bytes_sent": 1, "bytes_recv": 2}, "load_avg": [0.1, 0.2, 0.3]},
                                 {"os": "Linux", "hostname": "web-1"})
    body.update(overrides)
    return body


def test_report_round_trip():
    raw = payloads.encode(_report())
    report = payloads.parse_report(raw, "fleet/acme/web-1/report")
    got = (report.org, report.machine_id, report.session, report.seq, report.ts)
    assert got == ("acme", "web-1", "s1", 3, 1764000000.125)


@pytest.mark.parametrize(("raw", "reason"), [
    (b"x" * (payloads.MAX_PAYLOAD_BYTES + 1), payloads.TOO_LARGE),
    (b"\xff\xfe{}", payloads.NOT_UTF8),
    (b"{not json", payloads.NOT_JSON),
    (b'{"cpu": NaN}', payloads.NOT_JSON),
    (b"[" * 5000 + b"]" * 5000, payloads.NOT_JSON),
    (b"[1, 2]", payloads.NOT_OBJECT),
    (json.dumps(_report(seq="3")).encode(), payloads.BAD_FIELD),
    (json.dumps(_report(seq=2**70)).encode(), payloads.BAD_FIELD),
    (json.dumps(_report(seq=True)).encode(), payloads.BAD_FIELD),
    (json.dumps(_report(session="a/b")).encode(), payloads.BAD_FIELD),
    (json.dumps(_report(v=2)).encode(), payloads.BAD_FIELD),
    (json.dumps(_report(metrics={"cpu_percent": "high"})).encode(), payloads.BAD_FIELD),
    (json.dumps(_report(machine_id="web-2")).encode(), payloads.MACHINE_MISMATCH),
])
def test_bad_reports_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(PayloadError) as info:
        payloads.parse_report(raw, "fleet/acme/web-1/report")
    assert info.value.reason == reason


def test_bad_topic_is_a_payload_error():
    with pytest.raises(PayloadError) as info:
        payloads.parse_report(payloads.encode(_report()), "fleet/ac$me/web-1/report")
    assert info.value.reason == payloads.BAD_TOPIC


def test_pings():
    will = payloads.build_ping("web-1", "0x1", "s1", "offline", 10, reason="lost")
    assert "ts" not in will
    ping = payloads.parse_ping(payloads.encode(will), "fleet/acme/web-1/ping")
    assert (ping.status, ping.reason, ping.ts) == ("offline", "lost", None)
    online = payloads.parse_ping(payloads.encode(payloads.build_ping("web-1", "0x1", "s2", "online", 10, ts=5.0)),
                                 "fleet/acme/web-1/ping")
    assert (online.status, online.reason, online.ts) == ("online", None, 5.0)
    no_reason = {k: v for k, v in will.items() if k != "reason"}
    for bad in ({**will, "status": "away"}, no_reason, {**will, "interval_s": 0}):
        with pytest.raises(PayloadError):
            payloads.parse_ping(json.dumps(bad).encode(), "fleet/acme/web-1/ping")
    with pytest.raises(ContractError):
        payloads.build_ping("web-1", "0x1", "s1", "offline", 10)


def test_encode_refuses_nan_and_oversize():
    with pytest.raises(ValueError, match="(?i)nan|float"):
        payloads.encode({"x": float("nan")})
    with pytest.raises(PayloadError):
        payloads.encode({"x": "y" * payloads.MAX_PAYLOAD_BYTES})


@hsettings(max_examples=300)
@given(st.binary(max_size=2048))
def test_any_bytes_either_parse_or_raise_payload_error(raw):
    for parse, topic in ((payloads.parse_report, "fleet/a/m/report"), (payloads.parse_ping, "fleet/a/m/ping")):
        try:
            parse(raw, topic)
        except PayloadError:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@hsettings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["v", "machine_id", "hardware_id", "session", "seq", "ts", "metrics", "system"]),
                       json_values))
def test_any_json_object_either_parses_or_raises_payload_error(obj):
    try:
        report = payloads.parse_report(json.dumps(obj).encode(), "fleet/a/m/report")
    except PayloadError:
        return
    assert isinstance(report.seq, int)
    assert report.seq >= 0
