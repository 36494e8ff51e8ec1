"""A small fleet of two orgs stored with the collector's own writes, and the rows an export of it must hold.

Every org has machines ``db-1`` and ``web-1``, each with two sessions of three reports; session ``s2``
starts at the ts where ``s1`` ends, so (ts, session, seq) decides the order of tied rows. ``s2`` reports
carry memory and history fields (custom series, a process count); ``s1`` reports have neither. globex's
values differ from acme's, so a row of the wrong org shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.collector import history
from fleet.collector.alerts.engine import Alert, AlertWrites
from fleet.collector.state import Transition
from fleet.config import payloads
from fleet.config.topics import report_topic
from fleet.store.database import open_database
from fleet.store.export import fields_text
from tests import stores

ORGS = ("acme", "globex")
MACHINES = ("db-1", "web-1")
T0 = 1_700_000_000.0
RECEIVE_DELAY = 0.5


@dataclass(frozen=True)
class StoredReport:
    """One report as stored, with the history row an export must show for it."""

    org: str
    machine_id: str
    session: str
    seq: int
    ts: float
    metrics: dict[str, Any]

    def row(self) -> tuple:
        """The expected export row (store.export.HISTORY_COLUMNS)."""
        m = self.metrics
        memory = m.get("memory", {}).get("percent")
        names, values = history.report_fields(m)
        fields = fields_text(dict(zip(names, values, strict=True)))
        return (self.org, self.machine_id, self.session, self.seq, self.ts, self.ts + RECEIVE_DELAY,
                m["cpu_percent"], memory, m["disks"][0]["percent"], m["load_avg"][0], m["net"]["bytes_sent"],
                m["net"]["bytes_recv"], fields)


def reports(org: str) -> list[StoredReport]:
    """The reports stored for ``org``, in the order an export lists them (machine, then ts, session, seq)."""
    bias = 100.0 if org == "globex" else 0.0
    out = []
    for m_index, machine in enumerate(MACHINES):
        for session, start in (("s1", 0.0), ("s2", 20.0)):
            for seq in range(3):
                metrics: dict[str, Any] = {
                    "cpu_percent": bias + 10.5 * seq + m_index, "load_avg": [0.5 + seq, 0.25, 0.125],
                    "disks": [{"mount": "/", "total": 100, "used": 50, "percent": 50.0 + seq}],
                    "net": {"bytes_sent": 1000 * seq + int(bias), "bytes_recv": 7 * seq}}
                if session == "s2":
                    metrics["memory"] = {"total": 8, "used": 4, "percent": 40.0 + seq}
                    metrics["custom"] = {"queue_depth": seq + bias, 'jobs{kind="mail"}': 3}
                    metrics["process_counts"] = {"nginx": 2}
                out.append(StoredReport(org, machine, session, seq, T0 + start + 10 * seq + m_index * 0.25, metrics))
    return sorted(out, key=lambda r: (r.machine_id, r.ts, r.session, r.seq))


def events(org: str) -> list[Transition]:
    """The status transitions stored for ``org``, in the order they were written (and so of their ids)."""
    out = []
    for machine in MACHINES:
        out += [Transition(org, machine, T0 - 5, None, "online", "connect"),
                Transition(org, machine, T0 + 25, "online", "offline", "lost"),
                Transition(org, machine, T0 + 25, "offline", "online", "connect")]  # the same ts: ordered by id
    return out


def alerts(org: str) -> list[Alert]:
    """The alerts stored for ``org``: resolved before the test window, firing inside it, pending after it."""
    return [Alert(org, "disk-full", "web-1", "warning", "resolved", T0 - 100, "disk_percent is 95.5 on web-1",
                  95.5, fired_at=T0 - 50, resolved_at=T0 - 10, notified="resolved"),
            Alert(org, "machine-offline", "db-1", "critical", "firing", T0 + 25, "db-1 is offline",
                  fired_at=T0 + 30, notified="firing"),
            Alert(org, "cpu-hot", "web-1", "warning", "pending", T0 + 100, "cpu_percent is 99 on web-1", 99.0)]


def _alert_row(alert: Alert) -> tuple:
    # The row the alert engine hands to the writer (AlertEngine.take_writes).
    return (alert.org, alert.rule, alert.machine_id, alert.active_at, alert.state, alert.severity, alert.summary,
            alert.value, alert.fired_at, alert.resolved_at, alert.notified)


def fill(data_dir: Path, database: str) -> None:
    """Create both orgs and store their reports, events and alerts through the collector's writer."""
    for org in ORGS:
        stores.add_org(data_dir, org, database)
    with open_database(database) as db:
        for org in ORGS:
            batch = history.Batch(events=events(org), alerts=AlertWrites(alerts=[_alert_row(a) for a in alerts(org)]))
            for stored in reports(org):
                report = payloads.build_report(stored.machine_id, "0x1", stored.session, stored.seq, stored.ts,
                                               stored.metrics, {"os": "Linux"})
                raw = payloads.encode(report)
                parsed = payloads.parse_report(raw, report_topic(org, stored.machine_id))
                batch.reports.append(history.report_row(parsed, stored.ts + RECEIVE_DELAY))
            history.write_batch(db, batch, T0 + 200)
