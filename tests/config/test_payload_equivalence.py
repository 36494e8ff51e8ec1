"""The fast payload validator gives exactly the verdicts of the original one (tests/config/payloads_reference.py)."""

from __future__ import annotations

import json
import math

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from fleet.config import payloads
from fleet.config.errors import PayloadError
from tests.config import payloads_reference as reference

REPORT_TOPIC = "fleet/acme/web-1/report"
PING_TOPIC = "fleet/acme/web-1/ping"

BASE_REPORT = payloads.build_report(
    "web-1", "0x1a2b", "s-1", 7, 1_700_000_000.5,
    {"cpu_percent": 12.5, "cpu_count": 8, "load_avg": [0.4, 0.3, 0.2], "swap_percent": 0.0,
     "memory": {"total": 16_000, "used": 8_000, "percent": 50.0},
     "disks": [{"mount": "/", "total": 500, "used": 100, "percent": 20.0}],
     "net": {"bytes_sent": 1, "bytes_recv": 2, "sent_per_s": 0.5}, "uptime_s": 10, "process_count": 3,
     "custom": {"queue_depth": 3.0, 'queue_depth{queue="mail"}': 7},
     "processes": [{"name": "nginx", "pid": 10, "cpu_percent": 1.5, "memory_percent": 0.25}],
     "process_counts": {"nginx": 2, "re:gunicorn.*app": 0}},
    {"hostname": "web-1", "os": "Linux", "hardware_id": "0x1a2b"})
BASE_PING = payloads.build_ping("web-1", "0x1a2b", "s-1", "offline", 10, ts=1.0, reason="lost")
ONLINE_PING = payloads.build_ping("web-1", "0x1a2b", "s-2", "online", 10, ts=1.0, prev=("s-1", 41))

# Values where decoders and type checks disagree in practice: big and huge ints, bools, -0.0, floats
# that overflow, lone surrogates, non-ASCII text, nested containers.
edge_numbers = st.sampled_from([0, -1, 1, True, False, None, -0.0, 1e308, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1,
                                2**64 - 1, 2**64, 10**19, 10**20, 10**30, 0.1, 86400, 86400.0001, 3.5])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12) | edge_numbers,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
REPORT_PATHS = [("v",), ("machine_id",), ("hardware_id",), ("session",), ("seq",), ("ts",), ("metrics",),
                ("system",), ("metrics", "cpu_percent"), ("metrics", "cpu_count"), ("metrics", "load_avg"),
                ("metrics", "memory"), ("metrics", "memory", "total"), ("metrics", "memory", "percent"),
                ("metrics", "disks"), ("metrics", "net"), ("metrics", "net", "bytes_sent"),
                ("metrics", "uptime_s"), ("system", "os"), ("system", "hostname"),
                ("metrics", "custom"), ("metrics", "custom", "queue_depth"), ("metrics", "custom", "x y"),
                ("metrics", "custom", 'a{b="c"}'), ("metrics", "custom", "1abc"), ("metrics", "custom", "a{b"),
                ("metrics", "processes"), ("metrics", "process_counts"), ("metrics", "process_counts", "nginx"),
                ("metrics", "process_counts", "re:a.*"), ("metrics", "process_counts", "")]
PING_PATHS = [("v",), ("status",), ("reason",), ("ts",), ("interval_s",), ("session",), ("hardware_id",),
              ("machine_id",), ("prev_session",), ("prev_seq",)]
# Containers at these paths are replaced by lists or dicts of entries, each mutated in turn.
PROCESS_ENTRY = {"name": "nginx", "pid": 10, "cpu_percent": 1.5, "memory_percent": 0.25}


def verdict(parse, raw: bytes, topic: str):
    """The reason code of a rejection, or the parsed value's fields."""
    try:
        value = parse(raw, topic)
    except PayloadError as exc:
        return ("rejected", exc.reason)
    return ("parsed", *(getattr(value, name) for name in value.__slots__))


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


def assert_same(raw: bytes, kind: str) -> None:
    topic = REPORT_TOPIC if kind == "report" else PING_TOPIC
    fast = verdict(getattr(payloads, f"parse_{kind}"), raw, topic)
    ref = verdict(getattr(reference, f"parse_{kind}"), raw, topic)
    assert len(fast) == len(ref), (raw, fast, ref)
    assert all(same(a, b) for a, b in zip(fast, ref, strict=True)), (raw, fast, ref)


def mutate(base: dict, path: tuple[str, ...], value, delete: bool) -> dict:
    obj = json.loads(json.dumps(base))
    node = obj
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if delete:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return obj


@hsettings(max_examples=600)
@given(st.sampled_from(REPORT_PATHS), json_values, st.booleans())
def test_reports_with_one_field_changed(path, value, delete):
    assert_same(json.dumps(mutate(BASE_REPORT, path, value, delete)).encode(), "report")


@hsettings(max_examples=300)
@given(st.sampled_from(PING_PATHS), json_values | st.sampled_from(["online", "offline", "lost", "shutdown"]),
       st.booleans(), st.booleans())
def test_pings_with_one_field_changed(path, value, delete, online):
    base = ONLINE_PING if online else BASE_PING
    assert_same(json.dumps(mutate(base, path, value, delete)).encode(), "ping")


series_names = st.text(alphabet=st.sampled_from('az_:09{}="\\ \x01é'), max_size=12) | st.sampled_from(
    ["a" * 256, "a" * 257, 'q{l="v"}', "q{}", "\ud800", "x\x7f"])


@hsettings(max_examples=300)
@given(st.dictionaries(series_names, json_values, max_size=4) | st.integers(), st.integers(0, 70))
def test_custom_series(custom, extra):
    if isinstance(custom, dict):
        custom = {**custom, **{f"s{i}": i for i in range(extra)}}
    assert_same(json.dumps(mutate(BASE_REPORT, ("metrics", "custom"), custom, False)).encode(), "report")


@hsettings(max_examples=300)
@given(st.sampled_from(list(PROCESS_ENTRY)), json_values, st.booleans(), st.integers(1, 18))
def test_process_entries(key, value, delete, copies):
    entry = mutate(PROCESS_ENTRY, (key,), value, delete)
    processes = [PROCESS_ENTRY] * (copies - 1) + [entry]
    assert_same(json.dumps(mutate(BASE_REPORT, ("metrics", "processes"), processes, False)).encode(), "report")
    assert_same(json.dumps(mutate(BASE_REPORT, ("metrics", "processes"), [value], False)).encode(), "report")


@hsettings(max_examples=300)
@given(st.dictionaries(series_names, json_values | st.integers(-2, 10**7 + 2), max_size=4), st.integers(0, 70))
def test_process_counts(counts, extra):
    counts = {**counts, **{f"p{i}": i for i in range(extra)}}
    assert_same(json.dumps(mutate(BASE_REPORT, ("metrics", "process_counts"), counts, False)).encode(), "report")


@hsettings(max_examples=300)
@given(st.binary(max_size=512))
def test_any_bytes(raw):
    assert_same(raw, "report")
    assert_same(raw, "ping")


def test_where_the_decoders_differ():
    report = json.dumps(BASE_REPORT)
    for raw in [
        report.replace('"ts": 1700000000.5', '"ts": 123456789012345678901234567890').encode(),  # orjson: float
        report.replace('"ts": 1700000000.5', '"ts": 18446744073709551615').encode(),
        report.replace('"ts": 1700000000.5', '"ts": 1e400').encode(),  # json: inf, orjson: error
        report.replace('"ts": 1700000000.5', '"ts": NaN').encode(),
        report.replace('"os": "Linux"', '"os": "\\ud800"').encode(),  # lone surrogate
        report.replace('"os": "Linux"', '"other": "\\ud800"').encode(),
        b"\xef\xbb\xbf" + report.encode(),  # BOM
        report.encode() + b"  \n",
        report.replace('"seq": 7', '"seq": 7.0').encode(),
        report.replace('"seq": 7', '"seq": -0').encode(),
        report.replace('"v": 1', '"v": 1.0').encode(),
        report.replace('"v": 1', '"v": true').encode(),
        report[:-1].encode(),
    ]:
        assert_same(raw, "report")
