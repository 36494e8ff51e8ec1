"""The alert rule language of the contract: conditions, durations, machine globs, severities.

A rule's EXPR (docs/protocol.md, docs/alerts.md) is ``status == offline``, ``status == stale``, ``conflict``, or
``FIELD OP NUMBER`` with OP one of ``> >= < <=``. FIELD names a numeric field of a machine's latest
report (the derived fields of ``fleet.config.derived``: ``cpu_percent``, ``memory_percent``,
``disk_percent`` (the fullest real filesystem), ``swap_percent``, ``load1``, ...; ``clock_offset_s``
(absolute value), any other numeric field, ``custom.<series>`` and ``process.<name>``). Text is
parsed into small frozen values, never evaluated as code; every problem raises RuleError with a
message naming it. The collector evaluates the parsed values; the CLI and the web share the glob and
duration rules from here.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any

from fleet.config import derived
from fleet.config.derived import number
from fleet.config.errors import ContractError
from fleet.config.ids import is_valid_id
from fleet.config.labels import LabelError, Selector, is_selector

MAX_EXPR = 512
MAX_GLOB = 128
MAX_COMMENT = 500
SEVERITIES = ("warning", "critical")
STATUS_VALUES = ("offline", "stale")
OPERATORS = (">=", "<=", ">", "<")
CUSTOM_PREFIX = "custom."
PROCESS_PREFIX = "process."
EXPR_FORMS = "'status == offline', 'status == stale', 'conflict' or 'FIELD OP NUMBER' (OP: > >= < <=)"

# The fields every report can carry, for help texts and the CLI's typo warning; any other numeric
# field of a report resolves too (see field_value).
KNOWN_FIELDS = (
    *derived.FIELDS, "clock_offset_s", "cert_days_left", "cpu_count", "uptime_s", "process_count", "memory_used",
    "memory_total", "net_sent_per_s", "net_recv_per_s",
)


class RuleError(ContractError):
    """A rule, duration, glob, severity or silence is not valid; the message names the problem."""


# --- conditions --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StatusIs:
    """``status == offline`` or ``status == stale``."""

    status: str

    def __post_init__(self) -> None:
        if self.status not in STATUS_VALUES:
            raise RuleError(f"status can be compared only with 'offline' or 'stale', not {self.status!r}")

    def __str__(self) -> str:
        return f"status == {self.status}"


@dataclass(frozen=True, slots=True)
class Conflict:
    """``conflict``: two hardware ids report under the machine's name."""

    def __str__(self) -> str:
        return "conflict"


@dataclass(frozen=True, slots=True)
class Threshold:
    """``FIELD OP NUMBER``; ``number`` keeps the text as written for display."""

    field: str
    op: str
    number: str
    limit: float = _field(init=False, repr=False, compare=False)  # the number as a float

    def __post_init__(self) -> None:
        check_field(self.field)
        if self.op not in OPERATORS:
            raise RuleError(f"operator {self.op!r} is not allowed: use >, >=, < or <=")
        object.__setattr__(self, "limit", parse_number(self.number))

    def holds(self, value: float) -> bool:
        """True when ``value OP number``."""
        return COMPARE[self.op](value, self.limit)

    def predicate(self) -> Callable[[float], bool]:
        """``holds`` as one fast call, for the collector's per-report evaluation."""
        return getattr(self.limit, _MIRRORED[self.op])

    def __str__(self) -> str:
        return f"{self.field} {self.op} {self.number}"


Condition = StatusIs | Conflict | Threshold

COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
}
# value OP limit as a bound method of the limit (one C call): value > limit is limit < value, and so on.
_MIRRORED = {">": "__lt__", ">=": "__le__", "<": "__gt__", "<=": "__ge__"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_OPERATOR = re.compile(r"==|!=|=|>=|<=|>|<")
_OPERATOR_RUN = re.compile(r"[<>=!]+")
_THRESHOLD = re.compile(r"(?P<field>.+?)\s*(?P<op>==|!=|=|>=|<=|>|<)\s*(?P<number>\S*)")


def parse_number(text: str) -> float:
    """A finite decimal number (``90``, ``0.5``, ``-3``, ``1e3``); RuleError otherwise."""
    if not _NUMBER.fullmatch(text):
        raise RuleError(f"{text[:40]!r} is not a number" if text else "a number is missing after the operator")
    value = float(text)
    if not math.isfinite(value):
        raise RuleError(f"{text[:40]!r} is too large")
    return value


def check_field(field: str) -> str:
    """Return ``field`` if it can name a numeric field: an identifier, ``custom.<series>`` or ``process.<name>``."""
    for prefix, what in ((CUSTOM_PREFIX, "series"), (PROCESS_PREFIX, "process name")):
        if field.startswith(prefix):
            name = field[len(prefix):]
            if not name:
                example = "queue_depth" if what == "series" else "nginx"
                raise RuleError(f"{prefix} needs a {what}, e.g. {prefix}{example}")
            if any(ch.isspace() for ch in name):
                raise RuleError(f"a {what} after {prefix} is written without spaces: {field[:60]!r}")
            return field
    if not _IDENT.fullmatch(field):
        raise RuleError(f"{field[:60]!r} is not a field name: use a name like cpu_percent, "
                        "custom.<series> or process.<name>")
    if field == "status":
        raise RuleError("status is compared with == (status == offline or status == stale)")
    if field == "conflict":
        raise RuleError("conflict takes no operator: write just 'conflict'")
    return field


def _check_text(text: object, what: str, max_len: int) -> str:
    if not isinstance(text, str):
        raise RuleError(f"{what} must be text")
    if len(text) > max_len:
        raise RuleError(f"{what} is longer than {max_len} characters")
    if not text.isprintable():
        raise RuleError(f"{what} contains a control or non-printable character")
    return text


def parse_condition(text: str) -> Condition:
    """Parse an EXPR into StatusIs, Conflict or Threshold; RuleError naming the problem otherwise."""
    text = _check_text(text, "the expression", MAX_EXPR).strip()
    if not text:
        raise RuleError(f"the expression is empty: expected {EXPR_FORMS}")
    if text == "conflict":
        return Conflict()
    word = _IDENT.match(text)
    if word is not None and word.group() == "status":
        return _parse_status(text[word.end():].strip())
    threshold = _THRESHOLD.fullmatch(text)
    if threshold is None:
        if word is not None and word.end() == len(text):
            raise RuleError(f"{text[:60]!r} needs an operator and a number, e.g. {text[:60]} > 90")
        raise RuleError(f"cannot read {text[:80]!r}: expected {EXPR_FORMS}")
    field, op, number = threshold.group("field"), threshold.group("op"), threshold.group("number")
    tail = field.rsplit(" ", 1)[-1]
    extra = _OPERATOR_RUN.match(number)
    if (" " in field and _OPERATOR_RUN.fullmatch(tail)) or extra:
        start = threshold.end("field") - len(tail) if " " in field and _OPERATOR_RUN.fullmatch(tail) \
            else threshold.start("op")
        end = threshold.start("number") + (len(extra.group()) if extra else 0)
        raise RuleError(f"unknown operator {text[start:end].strip()[:10]!r}: use >, >=, < or <=")
    if " " in field and not field.startswith((CUSTOM_PREFIX, PROCESS_PREFIX)):
        raise RuleError(f"cannot read {text[:80]!r}: one comparison per rule, {EXPR_FORMS}")
    check_field(field)
    if op in ("==", "!=", "="):
        raise RuleError(f"operator {op!r} is not allowed for {field[:60]!r}: use >, >=, < or <=")
    parse_number(number)
    return Threshold(field, op, number)


def _parse_status(rest: str) -> StatusIs:
    op = _OPERATOR.match(rest)
    if op is None:
        raise RuleError("status needs '==', e.g. status == offline")
    if op.group() != "==":
        raise RuleError(f"status is compared with '==', not {op.group()!r}")
    value = rest[op.end():].strip()
    if not value:
        raise RuleError("status == needs 'offline' or 'stale'")
    return StatusIs(value[:40])


# --- durations, globs, names, severities ----------------------------------------------------------
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, "w": 604_800.0}
_DURATION = re.compile(r"(?:\d+(?:ms|s|m|h|d|w))+")
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w)")
MAX_DURATION_S = 10 * 365 * 86_400.0


def parse_duration(text: str) -> float:
    """``0s``, ``30s``, ``5m``, ``2h``, ``1d``, ``500ms`` or combined (``1h30m``) to seconds; ``0`` is 0 s."""
    text = _check_text(text, "the duration", 64).strip()
    if text == "0":
        return 0.0
    if not _DURATION.fullmatch(text):
        raise RuleError(f"invalid duration {text[:40]!r}: use a number with a unit, e.g. 0s, 30s, 5m, 2h, 1d")
    seconds = sum(int(n) * DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))
    if seconds > MAX_DURATION_S:
        raise RuleError(f"duration {text[:40]!r} is longer than ten years")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as the shortest duration text ``parse_duration`` reads back (``120`` -> ``2m``)."""
    if seconds <= 0:
        return "0s"
    millis = round(seconds * 1000)
    out = []
    for unit, size in (("w", 604_800_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000),
                       ("ms", 1)):
        n, millis = divmod(millis, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)


_GLOB_CHARS = re.compile(r"[A-Za-z0-9_.\-*?\[\]!]+")


def check_glob(glob: str) -> str:
    """A machine-id glob (``*``, ``?``, ``[...]``, as in a shell); RuleError for anything else."""
    glob = _check_text(glob, "the machine glob", MAX_GLOB)
    if not glob:
        raise RuleError("the machine glob is empty: use * for every machine")
    if not _GLOB_CHARS.fullmatch(glob):
        raise RuleError(f"invalid machine glob {glob[:60]!r}: use machine-id characters and * ? [ ] !")
    return glob


@functools.lru_cache(maxsize=1024)
def _glob_regex(glob: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(glob))


def glob_matches(glob: str, machine_id: str) -> bool:
    """True when ``machine_id`` matches the glob (case-sensitive, like machine ids)."""
    return glob == "*" or _glob_regex(glob).match(machine_id) is not None


def check_machines(machines: str) -> str:
    """The machines of a rule or silence: a machine-id glob, or a label selector (``env=prod,role!=db``)."""
    if isinstance(machines, str) and is_selector(machines):
        try:
            _selector(machines)
        except LabelError as exc:
            raise RuleError(f"invalid machine selector {machines[:60]!r}: {exc}") from None
        return machines
    return check_glob(machines)


@functools.lru_cache(maxsize=1024)
def _selector(text: str) -> Selector:
    return Selector.parse(text)


def machines_match(machines: str, machine_id: str, labels: Mapping[str, str] | None) -> bool:
    """True when a glob covers ``machine_id``, or a label selector holds for ``labels`` (None: no labels)."""
    if machines == "*":
        return True
    if is_selector(machines):
        return _selector(machines).matches(labels or {})
    return _glob_regex(machines).match(machine_id) is not None


def check_name(name: str, what: str) -> str:
    """A rule or channel name follows the id rule (letters, digits, ``_.-``, at most 64 characters)."""
    if not is_valid_id(name):
        raise RuleError(f"invalid {what} name {str(name)[:70]!r}: letters, digits, '_', '.', '-', "
                        "at most 64 characters, starting with a letter or digit")
    return name


def check_severity(severity: str) -> str:
    """``warning`` or ``critical``."""
    if severity not in SEVERITIES:
        raise RuleError(f"invalid severity {str(severity)[:40]!r}: use warning or critical")
    return severity


def check_comment(comment: str) -> str:
    """A silence's free-text comment: printable, bounded."""
    return _check_text(comment, "the comment", MAX_COMMENT)


# --- rules and silences -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One alert rule of an org; validates itself on creation."""

    org: str
    name: str
    when: Condition
    for_s: float = 0.0
    machines: str = "*"
    severity: str = "warning"

    def __post_init__(self) -> None:
        check_name(self.org, "org")
        check_name(self.name, "rule")
        if not isinstance(self.when, (StatusIs, Conflict, Threshold)):
            raise RuleError("a rule needs a parsed condition")
        if not (isinstance(self.for_s, (int, float)) and 0 <= self.for_s <= MAX_DURATION_S):
            raise RuleError(f"invalid for duration {self.for_s!r}")
        check_machines(self.machines)
        check_severity(self.severity)

    @classmethod
    def parse(cls, org: str, name: str, when: str, for_: str = "0s", machines: str = "*",
              severity: str = "warning") -> Rule:
        """Build a rule from command-line text."""
        return cls(org, name, parse_condition(when), parse_duration(for_), machines, severity)

    @property
    def is_status(self) -> bool:
        """True for ``status == …`` rules, which the collector's own blindness holds back."""
        return isinstance(self.when, StatusIs)

    @property
    def by_labels(self) -> bool:
        """True when ``machines`` is a label selector (its outcome changes with the machine's labels)."""
        return is_selector(self.machines)

    def applies_to(self, machine_id: str, labels: Mapping[str, str] | None = None) -> bool:
        """True when the rule's glob or label selector covers the machine."""
        return machines_match(self.machines, machine_id, labels)

    def as_dict(self) -> dict[str, Any]:
        """The ``fleet alert list --json`` object."""
        return {"name": self.name, "when": str(self.when), "for_s": float(self.for_s), "machines": self.machines,
                "severity": self.severity}


# Every new org starts with these (and existing orgs get them by migration).
DEFAULT_RULES: tuple[tuple[str, str, float, str], ...] = (
    ("machine-offline", "status == offline", 120.0, "critical"),
    ("machine-stale", "status == stale", 300.0, "warning"),
    ("disk-full", "disk_percent > 90", 600.0, "warning"),
    ("cert-expiring", "cert_days_left < 14", 3600.0, "warning"),
)


@dataclass(frozen=True)
class Silence:
    """No notifications for an org's alerts matching ``rule`` (None: any) and ``machines`` in [starts_at, ends_at)."""

    id: int
    org: str
    machines: str
    rule: str | None
    starts_at: float
    ends_at: float
    comment: str = ""

    def active(self, now: float) -> bool:
        """True while the silence is in force."""
        return self.starts_at <= now < self.ends_at

    def covers(self, rule: str, machine_id: str, now: float, labels: Mapping[str, str] | None = None) -> bool:
        """True when it silences the alert of ``rule`` on ``machine_id`` (with ``labels``) at ``now``."""
        return (self.active(now) and (self.rule is None or self.rule == rule)
                and machines_match(self.machines, machine_id, labels))

    def as_dict(self) -> dict[str, Any]:
        """A silence as the CLI and the API show it."""
        return {"id": self.id, "machines": self.machines, "rule": self.rule, "starts_at": self.starts_at,
                "ends_at": self.ends_at, "comment": self.comment}


# --- field values --------------------------------------------------------------------------------------
# Decoded JSON holds plain dicts; isinstance(x, dict) is several times cheaper than the ABC check of Mapping.
Reader = Callable[[Mapping[str, Any]], float | None]


def _nested(section: str, key: str) -> Reader:
    def value(metrics: Mapping[str, Any]) -> float | None:
        inner = metrics.get(section)
        return number(inner.get(key)) if isinstance(inner, dict) else None
    return value


def _top(key: str) -> Reader:
    def value(metrics: Mapping[str, Any]) -> float | None:
        direct = metrics.get(key)
        if direct is not None:
            return number(direct)
        # Any other numeric field of a nested object, named <object>_<key> as history points name them
        # (memory_used, net_sent_per_s, ...).
        section, _, rest = key.partition("_")
        while rest:
            inner = metrics.get(section)
            if isinstance(inner, dict) and rest in inner:
                return number(inner[rest])
            head, _, rest = rest.partition("_")
            section = f"{section}_{head}"
        return None
    return value


def _as_float(read: Callable[[Mapping[str, Any]], int | float | None]) -> Reader:
    # A byte counter is derived as sent (every digit); a rule compares, stores and shows it as a float.
    return lambda metrics: number(read(metrics))


# The derived fields (fleet.config.derived), as alert rules compare them: as floats.
_DERIVED: dict[str, Reader] = {**derived.MEASURES,
                               **{name: _as_float(read) for name, read in derived.COUNTERS.items()}}


CERT_DAYS_LEFT = "cert_days_left"  # not in a report: the collector reads the machine's certificate end


def cert_days_left(not_after: float, now: float) -> float:
    """Days until a machine's certificate ends (negative once it has), as rules and the API give it."""
    return round((not_after - now) / 86_400.0, 3)


def metric_reader(field: str) -> Callable[[Mapping[str, Any]], float | None]:
    """A function reading ``field`` from a report's ``metrics`` object (None when absent or not a number).

    ``clock_offset_s`` is not in a report; the collector reads it from its own state.
    """
    check_field(field)
    if field.startswith(CUSTOM_PREFIX):
        return _nested("custom", field[len(CUSTOM_PREFIX):])
    if field.startswith(PROCESS_PREFIX):
        return _nested("process_counts", field[len(PROCESS_PREFIX):])
    return _DERIVED.get(field) or _top(field)


def field_value(field: str, metrics: Mapping[str, Any], clock_offset_s: float | None = None) -> float | None:
    """The value of ``field`` for a machine's latest metrics and clock offset (absolute), or None."""
    if field == "clock_offset_s":
        return None if clock_offset_s is None else abs(clock_offset_s)
    return metric_reader(field)(metrics)
