"""History as schema 4 stored it (one text-keyed row per report with its raw payload), for tests and benchmarks.

Frozen: this is what a database written before schema 5 holds, so the conversion and the compact layout can
be compared with it.
"""

from __future__ import annotations

from collections.abc import Iterable

from fleet.collector import history
from fleet.config.payloads import Report
from fleet.store.database import Database, migration_statements
from fleet.store.export import fields_text
from fleet.store.schema import MIGRATIONS

INSERT = ("INSERT INTO reports(org, machine_id, session, seq, ts, received, cpu_percent, memory_percent,"
          " disk_percent, load1, net_bytes_sent, net_bytes_recv, payload, fields)"
          " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING")


def create(db: Database) -> None:
    """Make ``db`` (empty, opened with ``migrate=False``) a schema-4 database."""
    with db.transaction():
        for _, migration in MIGRATIONS[:4]:
            for statement in migration_statements(migration, db.engine):
                db.execute(statement)
        db.execute("INSERT INTO meta(key, value) VALUES ('schema_version', '4')")


def row(report: Report, received: float, raw: str) -> tuple:
    """The schema-4 reports row of a report (``raw``: its JSON text as received)."""
    s = history.report_row(report, received)
    names, values = history.report_fields(report.metrics)
    return (s.org, s.machine_id, s.session, s.seq, s.ts, s.received, s.cpu_percent, s.memory_percent, s.disk_percent,
            s.load1, s.net_bytes_sent, s.net_bytes_recv, raw, fields_text(dict(zip(names, values, strict=True))))


def store(db: Database, reports: Iterable[tuple[Report, float, str]]) -> None:
    """Store (report, received, raw JSON) as the schema-4 collector did, in one transaction."""
    with db.transaction():
        db.executemany(INSERT, [row(*item) for item in reports])
