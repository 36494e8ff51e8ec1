"""fleet.config.derived: each derived field of a report, what counts as its value, and that no part reads it itself."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from fleet.config import derived, payloads

ROOT = Path(__file__).resolve().parents[2]
METRICS = {"cpu_percent": 37.5, "swap_percent": 3, "memory": {"total": 100, "used": 61, "percent": 61.5},
           "load_avg": [3.25, 2.5, 1.75], "net": {"bytes_sent": 2**62 + 1, "bytes_recv": 12.75},
           "disks": [{"mount": "/", "total": 10, "used": 4, "percent": 41.0},
                     {"mount": "/data", "total": 10, "used": 9, "percent": 93.5},
                     {"mount": "/boot", "total": 10, "used": 1, "percent": 12}]}


def test_every_field_of_a_full_report():
    assert derived.derive(METRICS) == {
        "cpu_percent": 37.5, "memory_percent": 61.5, "swap_percent": 3.0, "disk_percent": 93.5, "load1": 3.25,
        "load5": 2.5, "load15": 1.75, "net_bytes_sent": 2**62 + 1, "net_bytes_recv": 12.75, "disk_mount": "/data"}


def test_disk_percent_is_the_fullest_disk_whichever_mount_that_is():
    assert derived.fullest_disk(METRICS) is METRICS["disks"][1]
    assert (derived.disk_percent(METRICS), derived.disk_mount(METRICS)) == (93.5, "/data")
    # The first of equals; a disk without a percent, or whose percent is no finite number, is not a candidate.
    disks = [{"mount": "/a"}, {"mount": "/b", "percent": 50}, {"mount": "/c", "percent": 50.0},
             {"mount": "/d", "percent": True}, {"mount": "/e", "percent": math.nan},
             {"mount": "/f", "percent": math.inf}, "junk", {"percent": 20.0}]
    assert (derived.disk_percent({"disks": disks}), derived.disk_mount({"disks": disks})) == (50.0, "/b")
    assert type(derived.disk_percent({"disks": disks})) is float
    # A fullest disk without a mount still has its percent.
    assert (derived.disk_percent({"disks": disks[-1:]}), derived.disk_mount({"disks": disks[-1:]})) == (20.0, None)
    for nothing in ({}, {"disks": []}, {"disks": [{"mount": "/"}]}, {"disks": "/"}, {"disks": {"percent": 5}}):
        assert derived.disk_percent(nothing) is None
        assert derived.disk_mount(nothing) is None


@pytest.mark.parametrize(("value", "expected"), [
    (5, 5.0), (2.5, 2.5), (-1, -1.0), (0, 0.0), (True, None), (False, None), (math.nan, None), (math.inf, None),
    (-math.inf, None), ("5", None), (None, None), ([5], None),
])
def test_a_measurement_is_a_finite_number_never_a_bool(value, expected):
    got = derived.number(value)
    assert got == expected
    assert type(got) is type(expected)
    assert derived.cpu_percent({"cpu_percent": value}) == expected
    assert derived.memory_percent({"memory": {"percent": value}}) == expected
    assert derived.load15({"load_avg": [0, 0, value]}) == expected


def test_a_byte_counter_keeps_every_digit():
    assert derived.counter(2**62 + 1) == 2**62 + 1
    assert type(derived.counter(7)) is int
    assert derived.counter(1.5) == 1.5
    assert [derived.counter(v) for v in (True, math.nan, -math.inf, "1")] == [None] * 4
    assert derived.net_bytes_sent({"net": {"bytes_sent": 2**62 + 1}}) == 2**62 + 1
    assert derived.net_bytes_recv({"net": [1]}) is None


def test_absent_or_misshapen_sections_give_none():
    for metrics in ({}, {"memory": 5, "load_avg": 3, "net": "x", "disks": None},
                    {"memory": {}, "load_avg": [], "net": {}}):
        assert all(value is None for value in derived.derive(metrics).values()), metrics
    short = {"load_avg": [1.0]}
    assert (derived.load1(short), derived.load5(short), derived.load15(short)) == (1.0, None, None)


def test_the_derived_fields_of_a_validated_report():
    raw = payloads.encode(payloads.build_report("db-1", "0xhw", "s1", 0, 1.0, METRICS, {}))
    report = payloads.parse_report(raw, "fleet/acme/db-1/report")
    assert derived.derive(report.metrics) == derived.derive(METRICS)
    assert set(derived.FIELDS) == set(derived.MEASURES) | set(derived.COUNTERS)


# The report keys the derived fields come from: only fleet.config.derived reads them (the validator checks them).
RAW_KEYS = {"disks", "load_avg", "bytes_sent", "bytes_recv", "percent", "mount"}
READERS = ("collector", "web", "store", "fleet", "config")
ALLOWED = {ROOT / "config" / "derived.py", ROOT / "config" / "payloads.py"}


def raw_reads(path: Path) -> list[str]:
    """``file:line: key`` for each raw report key named in one module."""
    return [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}"
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in RAW_KEYS]


@pytest.mark.parametrize("part", READERS)
def test_no_part_derives_a_field_itself(part):
    reads = [hit for path in sorted((ROOT / part).rglob("*.py")) if path not in ALLOWED for hit in raw_reads(path)]
    assert reads == [], "report fields read outside fleet.config.derived:\n" + "\n".join(reads)
