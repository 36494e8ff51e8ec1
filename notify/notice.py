"""One alert as a notification carries it, its Alertmanager labels and fingerprint, and the channel test notice."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from fleet.notify.errors import NotifyError

STATUSES = ("firing", "resolved")
# Alertmanager's "zero" time: what its webhook sends as endsAt of an alert that is still firing.
ZERO_TIME = "0001-01-01T00:00:00Z"
TEST_RULE = "channel-test"
TEST_MACHINE = "fleet-test"

_FNV_OFFSET = 14695981039346656037
_FNV_PRIME = 1099511628211
_MASK64 = (1 << 64) - 1
_SEPARATOR = 0xFF  # prometheus/common model.SeparatorByte: cannot occur in UTF-8


def _number(name: str, value: object, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise NotifyError(f"notice {name} must be a finite number, not {value!r}")


@dataclass(frozen=True)
class Notice:
    """One alert in a notification: firing, or resolved at ``ends_at`` (Unix seconds)."""

    status: str
    org: str
    rule: str
    machine_id: str
    severity: str
    summary: str
    value: float | None
    starts_at: float
    ends_at: float | None
    fingerprint: str
    machine_labels: Mapping[str, str] = field(default_factory=dict)  # the machine's labels (docs/protocol.md)
    acked_by: str | None = None  # the person who acknowledged the alert (POST /api/alerts/<id>/ack)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise NotifyError(f"notice status must be firing or resolved, not {self.status!r}")
        for name in ("org", "rule", "machine_id", "severity", "fingerprint"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise NotifyError(f"notice {name} must be a non-empty string, not {value!r}")
        if not isinstance(self.machine_labels, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.machine_labels.items()):
            raise NotifyError(f"notice machine_labels must map strings to strings, not {self.machine_labels!r}")
        if not isinstance(self.summary, str):
            raise NotifyError(f"notice summary must be a string, not {self.summary!r}")
        if self.acked_by is not None and not isinstance(self.acked_by, str):
            raise NotifyError(f"notice acked_by must be a string, not {self.acked_by!r}")
        _number("value", self.value, optional=True)
        _number("starts_at", self.starts_at, optional=False)
        _number("ends_at", self.ends_at, optional=True)
        if self.status == "resolved" and self.ends_at is None:
            raise NotifyError("a resolved notice needs ends_at (when it resolved)")
        if self.status == "firing" and self.ends_at is not None:
            raise NotifyError("a firing notice has no ends_at")

    @property
    def labels(self) -> dict[str, str]:
        """The alert's Alertmanager labels: the machine's labels, then fleet's own."""
        return alert_labels(self.org, self.rule, self.machine_id, self.severity, self.machine_labels)

    @property
    def annotations(self) -> dict[str, str]:
        """The alert's Alertmanager annotations: its summary, and who acknowledged it once someone did."""
        if self.acked_by:
            return {"summary": self.summary, "acked_by": self.acked_by}
        return {"summary": self.summary}


def alert_labels(org: str, rule: str, machine_id: str, severity: str,
                 machine_labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """Labels of one alert, as webhook and Alertmanager channels carry them: the machine's labels (so receivers
    route on ``env``), then ``alertname``, ``org``, ``machine_id`` and ``severity``, which win over a machine label
    of the same name."""
    return {**(machine_labels or {}), "alertname": rule, "org": org, "machine_id": machine_id, "severity": severity}


def fingerprint(org: str, rule: str, machine_id: str, severity: str,
                machine_labels: Mapping[str, str] | None = None) -> str:
    """The alert's fingerprint exactly as Alertmanager computes it (FNV-1a 64 over the sorted labels)."""
    labels = alert_labels(org, rule, machine_id, severity, machine_labels)
    h = _FNV_OFFSET
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in part.encode():
                h = ((h ^ byte) * _FNV_PRIME) & _MASK64
            h = ((h ^ _SEPARATOR) * _FNV_PRIME) & _MASK64
    return f"{h:016x}"


def rfc3339(ts: float | None) -> str:
    """Unix seconds as an RFC 3339 UTC time with milliseconds; None is Alertmanager's zero time."""
    if ts is None:
        return ZERO_TIME
    moment = dt.datetime.fromtimestamp(ts, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def group_key(org: str) -> str:
    """The group key of an org's notifications (the webhook's ``groupKey``)."""
    return f'{{}}:{{org="{org}"}}'


def test_notices(org: str, channel: str) -> list[Notice]:
    """The one notice `fleet alert channel test` sends: a firing alert naming the org and the channel."""
    severity = "warning"
    return [Notice(
        status="firing", org=org, rule=TEST_RULE, machine_id=TEST_MACHINE, severity=severity,
        summary=f"Test notification from fleet for channel {channel} of org {org}: this channel works.",
        value=None, starts_at=time.time(), ends_at=None,
        fingerprint=fingerprint(org, TEST_RULE, TEST_MACHINE, severity),
    )]


WATCHDOG_RULE = "FleetWatchdog"
WATCHDOG_MACHINE = "fleet"
WATCHDOG_SEVERITY = "none"  # Prometheus' Watchdog: not a problem, a sign of life


def watchdog_notices(org: str, started: float) -> list[Notice]:
    """The always-firing FleetWatchdog alert: a receiver that stops getting it knows fleet is down."""
    return [Notice(
        status="firing", org=org, rule=WATCHDOG_RULE, machine_id=WATCHDOG_MACHINE, severity=WATCHDOG_SEVERITY,
        summary="fleet's alerting works: this alert always fires. If it stops arriving, fleet is down.",
        value=None, starts_at=started, ends_at=None,
        fingerprint=fingerprint(org, WATCHDOG_RULE, WATCHDOG_MACHINE, WATCHDOG_SEVERITY),
    )]


test_notices.__test__ = False  # type: ignore[attr-defined]  # not a pytest test, despite its name
