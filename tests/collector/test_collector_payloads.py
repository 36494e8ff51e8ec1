"""Property-based tests of the payload validator the collector relies on (config/payloads.py)."""

import json
import sqlite3

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from fleet.config import payloads
from fleet.config.errors import PayloadError

TOPIC_R = "fleet/acme/web-1/report"
TOPIC_P = "fleet/acme/web-1/ping"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
sessions = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")
short_text = st.text(st.characters(blacklist_characters="\x00"), max_size=40)  # NUL: a bad_field
finite = st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False)
counts = st.integers(min_value=0, max_value=2**62)


def valid_report(**changes):
    data = payloads.build_report("web-1", "hw", "s1", 3, 1764000000.5,
                                 {"cpu_percent": 1.5, "cpu_count": 2, "load_avg": [0.1, 0.2, 0.3],
                                  "memory": {"total": 10, "used": 5, "percent": 50.0},
                                  "disks": [{"mount": "/", "total": 1, "used": 1, "percent": 100.0}],
                                  "net": {"bytes_sent": 1, "bytes_recv": 2}},
                                 {"os": "Linux", "hardware_id": "hw"})
    data.update(changes)
    return data


def _accepted_or_reason(parse, raw, topic):
    try:
        parse(raw, topic)
    except PayloadError as exc:
        reason = exc.reason
    else:
        return None
    assert reason in payloads.REASONS
    return reason


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(raw):
    for parse, topic in ((payloads.parse_report, TOPIC_R), (payloads.parse_ping, TOPIC_P)):
        _accepted_or_reason(parse, raw, topic)


@given(json_values)
def test_arbitrary_json_is_either_a_valid_message_or_a_coded_rejection(value):
    raw = json.dumps(value).encode()
    for parse, topic in ((payloads.parse_report, TOPIC_R), (payloads.parse_ping, TOPIC_P)):
        reason = _accepted_or_reason(parse, raw, topic)
        if not isinstance(value, dict):
            assert reason == payloads.NOT_OBJECT


@given(st.sampled_from(["v", "machine_id", "hardware_id", "session", "seq", "ts", "metrics", "system"]), json_values)
def test_replacing_any_report_field_with_junk_never_crashes(name, junk):
    raw = json.dumps(valid_report(**{name: junk})).encode()
    reason = _accepted_or_reason(payloads.parse_report, raw, TOPIC_R)
    if name in ("seq", "ts", "session") and not isinstance(junk, (int, float, str)):
        assert reason == payloads.BAD_FIELD


@given(st.sampled_from(["cpu_percent", "cpu_count", "load_avg", "memory", "disks", "net", "uptime_s", "custom",
                        "processes", "process_counts"]), json_values)
def test_junk_in_metrics_never_crashes_and_what_passes_is_storable(name, junk):
    data = valid_report()
    data["metrics"][name] = junk
    try:
        report = payloads.parse_report(json.dumps(data).encode(), TOPIC_R)
    except PayloadError as exc:
        reason = exc.reason
    else:
        reason = None
    if reason is not None:
        assert reason == payloads.BAD_FIELD
        return
    # Whatever is accepted can be stored by the collector.
    from fleet.collector.history import report_row
    from fleet.store.samples import field_names_text, field_values_text, stored_number
    conn = sqlite3.connect(":memory:")
    row = report_row(report, 1.0)
    values = [stored_number("sqlite", getattr(row, name)) if name.endswith(("percent", "load1")) else getattr(row, name)
              for name in ("org", "machine_id", "session", "seq", "ts", "received", "cpu_percent", "memory_percent",
                           "disk_percent", "load1", "net_bytes_sent", "net_bytes_recv")]
    values += [field_names_text(row.field_names), field_values_text(row.field_values), json.dumps(row.system)]
    conn.execute("SELECT " + ",".join("?" * len(values)), values)


@given(machine=ids, hw=short_text, session=sessions, seq=counts, ts=finite, os_name=short_text)
@hsettings(suppress_health_check=[HealthCheck.too_slow])
def test_valid_reports_round_trip(machine, hw, session, seq, ts, os_name):
    data = payloads.build_report(machine, hw, session, seq, ts, {"cpu_percent": 1.0}, {"os": os_name})
    try:
        raw = payloads.encode(data)
    except UnicodeEncodeError:
        return  # lone surrogates cannot even be sent
    report = payloads.parse_report(raw, f"fleet/acme/{machine}/report")
    assert (report.machine_id, report.hardware_id, report.session, report.seq, report.ts) == (
        machine, hw, session, seq, float(ts))
    assert report.system["os"] == os_name


@given(machine=ids, status=st.sampled_from(["online", "offline"]), reason=st.sampled_from(["lost", "shutdown"]),
       interval=st.floats(min_value=0.001, max_value=86400), ts=st.none() | finite)
def test_valid_pings_round_trip(machine, status, reason, interval, ts):
    data = payloads.build_ping(machine, "hw", "sess", status, interval, ts=ts, reason=reason)
    ping = payloads.parse_ping(payloads.encode(data), f"fleet/acme/{machine}/ping")
    assert (ping.status, ping.interval_s, ping.ts) == (status, interval, ts)
    assert ping.reason == (reason if status == "offline" else None)


@given(ids, ids)
def test_machine_id_must_match_the_topic(a, b):
    raw = payloads.encode(valid_report(machine_id=a))
    reason = _accepted_or_reason(payloads.parse_report, raw, f"fleet/acme/{b}/report")
    assert reason == (None if a == b else payloads.MACHINE_MISMATCH)


@pytest.mark.parametrize(("raw", "reason"), [
    (b"x" * (64 * 1024 + 1), payloads.TOO_LARGE),
    (b'{"v": 1, "machine_id": "\xff"}', payloads.NOT_UTF8),
    (b"{not json", payloads.NOT_JSON),
    (b'{"v": NaN}', payloads.NOT_JSON),
    (b"[1, 2]", payloads.NOT_OBJECT),
    (b"[" * 60_000, payloads.NOT_JSON),
    (json.dumps(valid_report(seq=-1)).encode(), payloads.BAD_FIELD),
    (json.dumps(valid_report(seq=True)).encode(), payloads.BAD_FIELD),
    (json.dumps(valid_report(ts="now")).encode(), payloads.BAD_FIELD),
    (json.dumps(valid_report(seq=2**64)).encode(), payloads.BAD_FIELD),
    (json.dumps(valid_report(v=2)).encode(), payloads.BAD_FIELD),
    (json.dumps(valid_report(system={"os": "\ud800"})).encode(), payloads.BAD_FIELD),
    (b'{"v": 1, "seq": ' + b"9" * 5000 + b"}", payloads.NOT_JSON),
], ids=lambda value: value if isinstance(value, str) else None)
def test_each_bad_input_has_its_reason(raw, reason):
    assert _accepted_or_reason(payloads.parse_report, raw, TOPIC_R) == reason


@pytest.mark.parametrize("topic", ["fleet/acme/bad id/report", "fleet/acme/-x/report", "fleet/acme/m/other",
                                   "other/acme/m/report", "fleet/acme/m/report/extra", "fleet/ac$me/m/report"])
def test_bad_topics(topic):
    with pytest.raises(PayloadError) as info:
        payloads.parse_report(payloads.encode(valid_report()), topic)
    assert info.value.reason == payloads.BAD_TOPIC
