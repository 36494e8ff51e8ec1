"""Validation, drop counting and the per-agent rate limit applied to each received message."""

import logging

from fleet.collector.intake import RATE_LIMITED, DropCounter, RateLimiter, parse_message
from fleet.config import payloads
from fleet.config.payloads import Ping, Report


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def _report_bytes(machine="m1", seq=0):
    return payloads.encode(payloads.build_report(machine, "hw", "s1", seq, 1.0, {}, {}))


def test_valid_report_and_ping_are_queued_with_their_receive_time():
    drops = DropCounter()
    item = parse_message("fleet/acme/m1/report", _report_bytes(), False, 5.0, None, drops)
    assert isinstance(item.message, Report)
    assert item.received == 5.0
    assert item.message.seq == 0
    raw = payloads.encode(payloads.build_ping("m1", "hw", "s1", "online", 10.0, ts=1.0))
    item = parse_message("fleet/acme/m1/ping", raw, True, 5.0, None, drops)
    assert isinstance(item.message, Ping)
    assert item.retained
    assert drops.totals() == {}


def test_empty_ping_is_ignored_silently_but_empty_report_is_a_drop():
    drops = DropCounter()
    assert parse_message("fleet/acme/m1/ping", b"", True, 0.0, None, drops) is None
    assert drops.totals() == {}
    assert parse_message("fleet/acme/m1/report", b"", False, 0.0, None, drops) is None
    assert drops.totals() == {"not_json": 1}


def test_each_bad_message_is_counted_by_reason():
    drops = DropCounter()
    bad = [
        ("fleet/acme/m1/report", b"\xff\xfe"),
        ("fleet/acme/m1/report", b"nope"),
        ("fleet/acme/m1/report", b"42"),
        ("fleet/acme/m1/report", b"x" * (64 * 1024 + 1)),
        ("fleet/acme/bad id/report", _report_bytes()),
        ("fleet/acme/m2/report", _report_bytes("m1")),
        ("fleet/acme/m1/report", b'{"v": 1, "machine_id": "m1", "hardware_id": 5}'),
    ]
    for topic, raw in bad:
        assert parse_message(topic, raw, False, 0.0, None, drops) is None
    assert drops.totals() == {"not_utf8": 1, "not_json": 1, "not_object": 1, "too_large": 1, "bad_topic": 1,
                              "machine_mismatch": 1, "bad_field": 1}
    assert drops.take_unsaved() == drops.totals()
    assert drops.take_unsaved() == {}
    drops.restore({"not_json": 2})
    assert drops.take_unsaved() == {"not_json": 2}


def test_drops_are_logged_at_most_once_per_minute_per_reason(caplog):
    clock = FakeClock()
    drops = DropCounter(clock)
    with caplog.at_level(logging.WARNING, logger="fleet.collector.intake"):
        for _ in range(100):
            drops.add("not_json", "fleet/a/m/report", "x")
        drops.add("bad_field", "fleet/a/m/report", "x")
        clock.now += 61
        drops.add("not_json", "fleet/a/m/report", "x")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "100 dropped" in lines[2]  # 99 not logged before, plus this one
    assert drops.totals() == {"not_json": 101, "bad_field": 1}


def test_rate_limit_is_per_machine_and_refills():
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, clock=clock)
    burst = int(limiter.capacity)
    assert sum(limiter.allow("a", "flood") for _ in range(burst + 500)) == burst
    assert limiter.allow("a", "quiet")
    assert limiter.allow("b", "flood")
    clock.now += 1.0
    assert sum(limiter.allow("a", "flood") for _ in range(10)) == 2


def test_flooding_agent_is_dropped_as_rate_limited_while_another_passes():
    clock = FakeClock()
    limiter = RateLimiter(rate=5.0, clock=clock)
    drops = DropCounter(clock)
    passed = {"m1": 0, "m2": 0}
    for i in range(10_000):
        if parse_message("fleet/acme/m1/report", _report_bytes("m1", i), False, 0.0, limiter, drops):
            passed["m1"] += 1
        if i % 1000 == 0 and parse_message("fleet/acme/m2/report", _report_bytes("m2", i), False, 0.0, limiter,
                                            drops):
            passed["m2"] += 1
    assert passed == {"m1": int(limiter.capacity), "m2": 10}
    assert drops.totals() == {RATE_LIMITED: 10_000 - int(limiter.capacity)}
    # Retained messages (the broker's stored state at subscribe) are never rate-limited.
    raw = payloads.encode(payloads.build_ping("m1", "hw", "s1", "online", 10.0, ts=1.0))
    assert parse_message("fleet/acme/m1/ping", raw, True, 0.0, limiter, drops) is not None


def test_internal_errors_are_counted_not_raised(monkeypatch):
    drops = DropCounter()

    def boom(*_):
        raise KeyError("surprise")

    monkeypatch.setattr(payloads, "parse_report", boom)
    assert parse_message("fleet/acme/m1/report", _report_bytes(), False, 0.0, None, drops) is None
    assert drops.totals() == {"internal": 1}


def test_limiter_memory_is_bounded(monkeypatch):
    import fleet.collector.intake as intake

    monkeypatch.setattr(intake, "MAX_BUCKETS", 100)
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, clock=clock)
    for i in range(1000):
        limiter.allow("a", f"m{i}")
        clock.now += 0.01
    assert len(limiter._buckets) <= 100  # noqa: SLF001 - the bound is the point, and nothing public shows it
