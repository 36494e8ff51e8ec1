"""config/payloads.py as it was before its fast path: the oracle the fast one must match.

(The fast path decodes with orjson and checks exact types without per-field closures.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from fleet.config.errors import PayloadError
from fleet.config.ids import is_valid_id
from fleet.config.payloads import (  # parse_topic did not change
    _INT_METRICS,
    _NUMBER_METRICS,
    _SYSTEM_FIELDS,
    BAD_FIELD,
    BAD_TOPIC,
    MACHINE_MISMATCH,
    MAX_CUSTOM_SERIES,
    MAX_DISKS,
    MAX_INT,
    MAX_PAYLOAD_BYTES,
    MAX_PREV_SEQ,
    MAX_PROCESS_CHECKS,
    MAX_PROCESS_COUNT,
    MAX_STRING,
    MAX_TOP_PROCESSES,
    NOT_JSON,
    NOT_OBJECT,
    NOT_UTF8,
    OFFLINE_REASONS,
    PING_STATUSES,
    SESSION_RE,
    TOO_LARGE,
    VERSION,
    Ping,
    Report,
    parse_topic,
)
from fleet.config.topics import Topic


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def decode_object(raw: bytes) -> dict[str, Any]:
    """Decode bytes into a JSON object, enforcing size, UTF-8, strict JSON (no NaN) and object type."""
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise PayloadError(TOO_LARGE, f"{len(raw)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(NOT_UTF8, str(exc)) from exc
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise PayloadError(NOT_JSON, str(exc)[:120]) from exc
    if not isinstance(value, dict):
        raise PayloadError(NOT_OBJECT, type(value).__name__)
    stack: list[Any] = [value]
    while stack:  # every key and string value, at any depth
        item = stack.pop()
        if isinstance(item, str) and "\x00" in item:
            raise PayloadError(BAD_FIELD, "strings must not contain NUL")
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return value


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return -MAX_INT <= value <= MAX_INT
    return math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -MAX_INT <= value <= MAX_INT


def _field(obj: Mapping[str, Any], name: str, check, required: bool = True) -> Any:
    if name not in obj:
        if required:
            raise PayloadError(BAD_FIELD, f"missing {name!r}")
        return None
    value = obj[name]
    if not check(value):
        raise PayloadError(BAD_FIELD, f"bad {name!r}: {str(value)[:60]!r}")
    return value


def _short_str(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_STRING and _encodable(value)


def _encodable(value: str) -> bool:
    # JSON escapes can carry lone surrogates ("\\ud800"): valid JSON, but not UTF-8 text, so SQLite
    # and every later encoder would fail on them.
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _session(value: Any) -> bool:
    return isinstance(value, str) and SESSION_RE.fullmatch(value) is not None


def _check_common(obj: Mapping[str, Any], topic: Topic) -> tuple[str, str, str]:
    if obj.get("v") != VERSION or isinstance(obj.get("v"), bool):
        raise PayloadError(BAD_FIELD, f"unsupported version {str(obj.get('v'))[:20]!r}")
    machine_id = _field(obj, "machine_id", is_valid_id)
    if machine_id != topic.machine:
        raise PayloadError(MACHINE_MISMATCH, f"payload says {machine_id!r}, topic says {topic.machine!r}")
    hardware_id = _field(obj, "hardware_id", _short_str)
    session = _field(obj, "session", _session)
    return machine_id, hardware_id, session


def _check_metrics(metrics: Any) -> None:
    if not isinstance(metrics, dict):
        raise PayloadError(BAD_FIELD, "metrics must be an object")
    for name in _NUMBER_METRICS:
        _field(metrics, name, _is_number, required=False)
    for name in _INT_METRICS:
        _field(metrics, name, _is_int, required=False)
    _field(metrics, "load_avg", lambda v: isinstance(v, list) and len(v) <= 3 and all(map(_is_number, v)), False)
    memory = _field(metrics, "memory", lambda v: isinstance(v, dict), False)
    if memory is not None:
        for name in ("total", "used"):
            _field(memory, name, _is_int, required=False)
        _field(memory, "percent", _is_number, required=False)
    disks = _field(metrics, "disks", lambda v: isinstance(v, list) and len(v) <= MAX_DISKS, False)
    for disk in disks or ():
        if not isinstance(disk, dict):
            raise PayloadError(BAD_FIELD, "disks entries must be objects")
        _field(disk, "mount", _short_str, required=False)
        for name in ("total", "used"):
            _field(disk, name, _is_int, required=False)
        _field(disk, "percent", _is_number, required=False)
    net = _field(metrics, "net", lambda v: isinstance(v, dict), False)
    if net is not None:
        for name, value in net.items():
            if not _is_number(value):
                raise PayloadError(BAD_FIELD, f"bad net.{str(name)[:40]!r}")
    custom = _field(metrics, "custom", lambda v: isinstance(v, dict) and len(v) <= MAX_CUSTOM_SERIES, False)
    for name, value in (custom or {}).items():
        if not (_series_name(name) and _is_number(value)):
            raise PayloadError(BAD_FIELD, f"bad custom series {str(name)[:60]!r}")
    processes = _field(metrics, "processes", lambda v: isinstance(v, list) and len(v) <= MAX_TOP_PROCESSES, False)
    for proc in processes or ():
        if not isinstance(proc, dict):
            raise PayloadError(BAD_FIELD, "processes entries must be objects")
        _field(proc, "name", _short_str, required=False)
        _field(proc, "pid", lambda v: _is_int(v) and v >= 0, required=False)
        for name in ("cpu_percent", "memory_percent"):
            _field(proc, name, lambda v: _is_number(v) and v >= 0, required=False)
    counts = _field(metrics, "process_counts", lambda v: isinstance(v, dict) and len(v) <= MAX_PROCESS_CHECKS, False)
    for name, value in (counts or {}).items():
        if not (_check_name(name) and _is_int(value) and 0 <= value <= MAX_PROCESS_COUNT):
            raise PayloadError(BAD_FIELD, f"bad process_counts {str(name)[:60]!r}")


def _printable(value: str) -> bool:
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)


def _series_name(value: Any) -> bool:
    # A metric name ([A-Za-z_:][A-Za-z0-9_:]*), optionally {labels} as written, printable, encodable.
    if not (isinstance(value, str) and 0 < len(value) <= MAX_STRING and _encodable(value) and _printable(value)):
        return False
    name, brace, labels = value.partition("{")
    if not name or not (name[0].isascii() and (name[0].isalpha() or name[0] in "_:")):
        return False
    if not all(c.isascii() and (c.isalnum() or c in "_:") for c in name):
        return False
    return not brace or labels.endswith("}")


def _check_name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_STRING and _encodable(value) and _printable(value)


def _check_system(system: Any) -> None:
    if not isinstance(system, dict):
        raise PayloadError(BAD_FIELD, "system must be an object")
    for name in _SYSTEM_FIELDS:
        _field(system, name, _short_str, required=False)


def parse_report(raw: bytes, topic: str | Topic) -> Report:
    """Validate a received report payload against its topic; raise PayloadError with a reason code."""
    t = topic if isinstance(topic, Topic) else parse_topic(topic)
    if t.kind != "report":
        raise PayloadError(BAD_TOPIC, f"expected a report topic, got {t}")
    obj = decode_object(raw)
    machine_id, hardware_id, session = _check_common(obj, t)
    seq = _field(obj, "seq", lambda v: _is_int(v) and v >= 0)
    ts = float(_field(obj, "ts", lambda v: _is_number(v) and v >= 0))
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
    status = _field(obj, "status", lambda v: v in PING_STATUSES)
    reason = _field(obj, "reason", lambda v: v in OFFLINE_REASONS, required=status == "offline")
    if status == "online":
        reason = None
    ts = _field(obj, "ts", lambda v: _is_number(v) and v >= 0, required=False)
    interval_s = _field(obj, "interval_s", lambda v: _is_number(v) and 0 < v <= 86400)
    has_prev = "prev_session" in obj or "prev_seq" in obj
    prev_session = _field(obj, "prev_session", lambda v: _session(v) and v != session, required=has_prev)
    prev_seq = _field(obj, "prev_seq", lambda v: _is_int(v) and 0 <= v <= MAX_PREV_SEQ and status == "online",
                      required=has_prev)
    return Ping(t.org, machine_id, hardware_id, session, status, reason,
                None if ts is None else float(ts), float(interval_s), obj, prev_session, prev_seq)
