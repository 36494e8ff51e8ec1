"""Report and ping payloads of the wire contract: build, encode, and validate received bytes.

Validation is strict on what the collector relies on (ids, session, seq, ts, number types) and
tolerant of missing metric fields, since one failing agent-side collector leaves its field out.
Every rejection raises PayloadError with a short ``reason`` code used by drop counters.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from fleet.config.errors import ContractError, PayloadError
from fleet.config.ids import is_valid_id
from fleet.config.labels import LabelError, Labels
from fleet.config.status import OFFLINE, ONLINE
from fleet.config.topics import Topic

VERSION = 1
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_INT = 2**63 - 1
SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PING_STATUSES = (ONLINE, OFFLINE)
OFFLINE_REASONS = ("lost", "shutdown")

# Reason codes (stable: they name drop counters in /metrics and /healthz).
TOO_LARGE = "too_large"
NOT_UTF8 = "not_utf8"
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
BAD_FIELD = "bad_field"
BAD_TOPIC = "bad_topic"
MACHINE_MISMATCH = "machine_mismatch"
REASONS = (TOO_LARGE, NOT_UTF8, NOT_JSON, NOT_OBJECT, BAD_FIELD, BAD_TOPIC, MACHINE_MISMATCH)

_NUMBER_METRICS = ("cpu_percent", "swap_percent")
_INT_METRICS = ("cpu_count", "uptime_s", "process_count")
_SYSTEM_FIELDS = (
    "hostname", "os", "os_version", "platform", "architecture",
    "python_version", "hardware_id", "agent_version",
)
_SIZES = ("total", "used")
_PERCENT = ("percent",)
_MOUNT = ("mount",)
_PROCESS_PERCENTS = ("cpu_percent", "memory_percent")
MAX_STRING = 256
MAX_DISKS = 64
# Optional metrics (docs/protocol.md, report): custom series, top processes, process checks.
MAX_CUSTOM_SERIES = 64
MAX_TOP_PROCESSES = 16  # the agent sends 5; a little room for a future --top option
MAX_PROCESS_CHECKS = 64
MAX_PROCESS_COUNT = 10**7  # above any pid_max: a larger count is nonsense
# A series as the agent writes it: a Prometheus metric name, then its labels as in the file, no spaces.
SERIES_RE = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*(?:\{[^\x00-\x1f\x7f]*\})?")
CHECK_NAME_RE = re.compile(r"[^\x00-\x1f\x7f]+")  # a process name or re:<regex>, printable
MAX_PREV_SEQ = 10**9  # 31 years of reports at 1 s: a larger previous seq is nonsense


@dataclass(frozen=True, slots=True)
class Report:
    """A validated report; ``data`` is the decoded JSON object as received."""

    org: str
    machine_id: str
    hardware_id: str
    session: str
    seq: int
    ts: float
    metrics: Mapping[str, Any]
    system: Mapping[str, Any]
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Ping:
    """A validated presence ping; ``ts`` is None in a last will."""

    org: str
    machine_id: str
    hardware_id: str
    session: str
    status: str
    reason: str | None
    ts: float | None
    interval_s: float
    data: Mapping[str, Any]
    prev_session: str | None = None  # online pings: the previous connection's session and its last seq
    prev_seq: int | None = None


def encode(payload: Mapping[str, Any]) -> bytes:
    """Serialise a payload to compact UTF-8 JSON; refuses NaN/Infinity and oversize results."""
    raw = json.dumps(payload, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode("utf-8")
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise PayloadError(TOO_LARGE, f"{len(raw)} bytes > {MAX_PAYLOAD_BYTES}")
    return raw


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# orjson decodes a report several times faster than json (docs/benchmarks.md). Where the two differ (integers outside
# [-2**63, 2**64 - 1], which orjson turns into floats: any of 19 digits or more goes to json; lone
# surrogate escapes and overflowing floats, which it refuses; nesting between json's recursion limit and
# orjson's 1024 levels), the standard parser decides, so both paths give the same verdict
# (tests/config/test_payload_equivalence.py).
_DIGIT_MAP = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))  # digits to "0", the rest to " "
_LONG_DIGITS = b"0" * 19  # -2**63 - 1 has 19 digits; searched in the mapped text, far cheaper than a regular expression
_MAX_FAST_OPENERS = 500  # fewer "[" and "{" than this: nested less deeply than either parser's limit
_orjson: Any = None


def _loads(raw: bytes, text: str) -> Any:
    global _orjson
    if _orjson is None:
        import orjson  # not at import time: the agent only encodes, and stays small

        _orjson = orjson
    if raw.count(b"[") + raw.count(b"{") < _MAX_FAST_OPENERS and _LONG_DIGITS not in raw.translate(_DIGIT_MAP):
        try:
            return _orjson.loads(raw)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(text, parse_constant=_reject_constant)


def decode_object(raw: bytes) -> dict[str, Any]:
    """Decode bytes into a JSON object, enforcing size, UTF-8, strict JSON (no NaN) and object type."""
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise PayloadError(TOO_LARGE, f"{len(raw)} bytes > {MAX_PAYLOAD_BYTES}")
    raw = bytes(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(NOT_UTF8, str(exc)) from exc
    try:
        value = _loads(raw, text)
    except (ValueError, RecursionError) as exc:
        raise PayloadError(NOT_JSON, str(exc)[:120]) from exc
    if type(value) is not dict:
        raise PayloadError(NOT_OBJECT, type(value).__name__)
    # A NUL can only arrive escaped; the byte search finds it fast and the walk makes sure it is in a string.
    if b"\\u0000" in raw and _holds_nul(value):
        raise PayloadError(BAD_FIELD, "strings must not contain NUL (\\u0000)")
    return value


def _holds_nul(value: Any) -> bool:
    # PostgreSQL cannot store NUL in text, nor read a JSON document holding \u0000 anywhere with ->>, so
    # one such string in any key or value would break every JSON query over that machine's org.
    if type(value) is str:
        return "\x00" in value
    if type(value) is dict:
        return any("\x00" in key or _holds_nul(item) for key, item in value.items())
    if type(value) is list:
        return any(_holds_nul(item) for item in value)
    return False


# The checks below see only what a JSON decoder produced, so exact type tests are enough (a bool is
# never mistaken for an int) and stay cheap: the collector runs them for every message.
def _is_number(value: Any) -> TypeGuard[int | float]:
    kind = type(value)
    if kind is float:
        return math.isfinite(value)
    return kind is int and -MAX_INT <= value <= MAX_INT


def _is_int(value: Any) -> bool:
    return type(value) is int and -MAX_INT <= value <= MAX_INT


def _short_str(value: Any) -> bool:
    return type(value) is str and len(value) <= MAX_STRING and (value.isascii() or _encodable(value))


def _encodable(value: str) -> bool:
    # JSON escapes can carry lone surrogates ("\\ud800"): valid JSON, but not UTF-8 text, so SQLite
    # and every later encoder would fail on them.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_series_name(value: Any) -> bool:
    """True for a custom series name the contract accepts (``queue_depth``, ``queue_depth{queue="mail"}``)."""
    return (type(value) is str and len(value) <= MAX_STRING and SERIES_RE.fullmatch(value) is not None
            and (value.isascii() or _encodable(value)))


def is_check_name(value: Any) -> bool:
    """True for a process check name the contract accepts (a name, or ``re:`` and a regex)."""
    return (type(value) is str and len(value) <= MAX_STRING and CHECK_NAME_RE.fullmatch(value) is not None
            and (value.isascii() or _encodable(value)))


def _bad(name: str, value: Any) -> PayloadError:
    return PayloadError(BAD_FIELD, f"bad {name!r}: {str(value)[:60]!r}")


def _required(obj: Mapping[str, Any], name: str) -> Any:
    if name not in obj:
        raise PayloadError(BAD_FIELD, f"missing {name!r}")
    return obj[name]


def _check_optional(obj: Mapping[str, Any], names: tuple[str, ...], check: Callable[[Any], bool]) -> None:
    for name in names:
        if name in obj and not check(obj[name]):
            raise _bad(name, obj[name])


def _check_common(obj: Mapping[str, Any], topic: Topic) -> tuple[str, str, str]:
    version = obj.get("v")
    if version != VERSION or type(version) is bool:
        raise PayloadError(BAD_FIELD, f"unsupported version {str(version)[:20]!r}")
    machine_id = _required(obj, "machine_id")
    if not is_valid_id(machine_id):
        raise _bad("machine_id", machine_id)
    if machine_id != topic.machine:
        raise PayloadError(MACHINE_MISMATCH, f"payload says {machine_id!r}, topic says {topic.machine!r}")
    hardware_id = _required(obj, "hardware_id")
    if not _short_str(hardware_id):
        raise _bad("hardware_id", hardware_id)
    session = _required(obj, "session")
    if type(session) is not str or SESSION_RE.fullmatch(session) is None:
        raise _bad("session", session)
    return machine_id, hardware_id, session


_DISK_FIELDS = ((_MOUNT, _short_str), (_SIZES, _is_int), (_PERCENT, _is_number))
_PROCESS_FIELDS = ((("name",), _short_str), (("pid",), lambda v: _is_int(v) and v >= 0),
                   (_PROCESS_PERCENTS, lambda v: _is_number(v) and v >= 0))


def _check_metrics(metrics: Any) -> None:
    if type(metrics) is not dict:
        raise PayloadError(BAD_FIELD, "metrics must be an object")
    _check_optional(metrics, _NUMBER_METRICS, _is_number)
    _check_optional(metrics, _INT_METRICS, _is_int)
    if "load_avg" in metrics:
        load = metrics["load_avg"]
        if type(load) is not list or len(load) > 3 or not all(map(_is_number, load)):
            raise _bad("load_avg", load)
    if "memory" in metrics:
        memory = metrics["memory"]
        if type(memory) is not dict:
            raise _bad("memory", memory)
        _check_optional(memory, _SIZES, _is_int)
        _check_optional(memory, _PERCENT, _is_number)
    if "disks" in metrics:
        _check_entries("disks", metrics["disks"], MAX_DISKS, _DISK_FIELDS)
    if "net" in metrics:
        net = metrics["net"]
        if type(net) is not dict:
            raise _bad("net", net)
        for name, value in net.items():
            if not _is_number(value):
                raise PayloadError(BAD_FIELD, f"bad net.{str(name)[:40]!r}")
    if "custom" in metrics:
        _check_named_values("custom", metrics["custom"], MAX_CUSTOM_SERIES, is_series_name, _is_number)
    if "processes" in metrics:
        _check_entries("processes", metrics["processes"], MAX_TOP_PROCESSES, _PROCESS_FIELDS)
    if "process_counts" in metrics:
        _check_named_values("process_counts", metrics["process_counts"], MAX_PROCESS_CHECKS, is_check_name,
                            _is_process_count)


def _check_entries(name: str, entries: Any, limit: int,
                   fields: tuple[tuple[tuple[str, ...], Callable[[Any], bool]], ...]) -> None:
    """A list of at most ``limit`` objects whose optional fields pass their checks (disks, processes)."""
    if type(entries) is not list or len(entries) > limit:
        raise _bad(name, entries)
    for entry in entries:
        if type(entry) is not dict:
            raise PayloadError(BAD_FIELD, f"{name} entries must be objects")
        for names, check in fields:
            _check_optional(entry, names, check)


def _check_named_values(name: str, values: Any, limit: int, key_ok: Callable[[Any], bool],
                        value_ok: Callable[[Any], bool]) -> None:
    """An object of at most ``limit`` names and values, each passing its check (custom, process_counts)."""
    if type(values) is not dict or len(values) > limit:
        raise _bad(name, values)
    for key, value in values.items():
        if not key_ok(key) or not value_ok(value):
            raise PayloadError(BAD_FIELD, f"bad {name} {str(key)[:60]!r}")


def _is_process_count(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= MAX_PROCESS_COUNT


def _check_system(system: Any) -> None:
    if type(system) is not dict:
        raise PayloadError(BAD_FIELD, "system must be an object")
    _check_optional(system, _SYSTEM_FIELDS, _short_str)


def parse_topic(topic: str) -> Topic:
    """Parse a received topic, converting a contract violation into PayloadError(bad_topic)."""
    try:
        return Topic.parse(topic)
    except ContractError as exc:
        raise PayloadError(BAD_TOPIC, str(exc)) from exc


def parse_report(raw: bytes, topic: str | Topic) -> Report:
    """Validate a received report payload against its topic; raise PayloadError with a reason code."""
    t = topic if isinstance(topic, Topic) else parse_topic(topic)
    if t.kind != "report":
        raise PayloadError(BAD_TOPIC, f"expected a report topic, got {t}")
    obj = decode_object(raw)
    machine_id, hardware_id, session = _check_common(obj, t)
    seq = _required(obj, "seq")
    if not (_is_int(seq) and seq >= 0):
        raise _bad("seq", seq)
    ts = _required(obj, "ts")
    if not (_is_number(ts) and ts >= 0):
        raise _bad("ts", ts)
    ts = float(ts)
    metrics = obj.get("metrics", {})
    _check_metrics(metrics)
    system = obj.get("system", {})
    _check_system(system)
    return Report(t.org, machine_id, hardware_id, session, seq, ts, metrics, system, obj)


def parse_ping(raw: bytes, topic: str | Topic) -> Ping:
    """Validate a received ping payload against its topic; raise PayloadError with a reason code."""
    t = topic if isinstance(topic, Topic) else parse_topic(topic)
    if t.kind != "ping":
        raise PayloadError(BAD_TOPIC, f"expected a ping topic, got {t}")
    obj = decode_object(raw)
    machine_id, hardware_id, session = _check_common(obj, t)
    status = _required(obj, "status")
    if status not in PING_STATUSES:
        raise _bad("status", status)
    reason = obj.get("reason")
    if status == OFFLINE and "reason" not in obj:
        raise PayloadError(BAD_FIELD, "missing 'reason'")
    if "reason" in obj and reason not in OFFLINE_REASONS:
        raise _bad("reason", reason)
    if status == ONLINE:
        reason = None
    ts = obj.get("ts")
    if "ts" in obj and not (_is_number(ts) and ts >= 0):
        raise _bad("ts", ts)
    interval_s = _required(obj, "interval_s")
    if not (_is_number(interval_s) and 0 < interval_s <= 86400):
        raise _bad("interval_s", interval_s)
    prev_session = prev_seq = None
    if "prev_session" in obj or "prev_seq" in obj:
        prev_session, prev_seq = _required(obj, "prev_session"), _required(obj, "prev_seq")
        if type(prev_session) is not str or SESSION_RE.fullmatch(prev_session) is None or prev_session == session:
            raise _bad("prev_session", prev_session)
        if not (_is_int(prev_seq) and 0 <= prev_seq <= MAX_PREV_SEQ) or status != "online":
            raise _bad("prev_seq", prev_seq)
    return Ping(t.org, machine_id, hardware_id, session, status, reason,
                None if ts is None else float(ts), float(interval_s), obj, prev_session, prev_seq)


def build_ping(machine_id: str, hardware_id: str, session: str, status: str, interval_s: float,
               ts: float | None = None, reason: str | None = None, prev: tuple[str, int] | None = None
               ) -> dict[str, Any]:
    """Build a ping payload; omit ``ts`` for a last will (it is sent later by the broker).

    ``prev`` (online pings only) is the previous connection's session and the last seq made in it.
    """
    if status not in PING_STATUSES:
        raise ContractError(f"invalid ping status {status!r}")
    if status == OFFLINE and reason not in OFFLINE_REASONS:
        raise ContractError(f"offline ping needs a reason in {OFFLINE_REASONS}")
    payload: dict[str, Any] = {"v": VERSION, "status": status, "machine_id": machine_id,
                               "hardware_id": hardware_id, "session": session, "interval_s": interval_s}
    if status == OFFLINE:
        payload["reason"] = reason
    if ts is not None:
        payload["ts"] = ts
    if prev is not None and status == "online":
        payload["prev_session"], payload["prev_seq"] = prev
    return payload


def build_report(machine_id: str, hardware_id: str, session: str, seq: int, ts: float,
                 metrics: Mapping[str, Any], system: Mapping[str, Any],
                 labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Build a report payload in the contract's shape (``labels``: the machine's, ``{}`` for none)."""
    return {"v": VERSION, "machine_id": machine_id, "hardware_id": hardware_id, "session": session,
            "seq": seq, "ts": ts, "metrics": dict(metrics), "system": dict(system), "labels": dict(labels or {})}


def report_labels(report: Report) -> tuple[dict[str, str], str | None]:
    """A report's labels and, when they break the contract, why: the report is kept and such labels dropped.

    Labels are not checked by ``parse_report``: bad labels cost the labels, never the report's metrics.
    """
    raw = report.data.get("labels")
    if raw is None or raw == {}:
        return {}, None
    try:
        return Labels.from_mapping(raw).as_dict(), None
    except LabelError as exc:
        return {}, str(exc)
