"""``GET /metrics``: the org's machines in Prometheus text format (bearer token required)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import orjson
from flask import Blueprint, Response, g

from fleet.config import derived
from fleet.config.status import BROKER, MACHINE_STATUSES
from fleet.store import lease
from fleet.store.maintenance import database_size
from fleet.web import db
from fleet.web.auth import org_required

bp = Blueprint("metrics", __name__)


def escape_label(value: object) -> str:
    """Escape a label value per the exposition format (backslash, quote, newline)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]")


def label_names(labels: dict[str, str]) -> dict[str, str]:
    """A machine's labels as Prometheus label names: ``label_KEY``, anything outside [a-zA-Z0-9_] made ``_``."""
    return {"label_" + _NOT_NAME.sub("_", key): value for key, value in sorted(labels.items())}


def _labels(**labels: object) -> str:
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items()) + "}"


def _family(lines: list[str], name: str, kind: str, help_text: str, samples: Sequence[tuple[str, float]] = (),
            rendered: Sequence[str] = ()) -> None:
    """A family's HELP, TYPE and samples: ``(labels, value)`` pairs, or ``rendered`` as ``'{labels} value'``."""
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    lines.extend([f"{name}{labels} {float(value)!r}" for labels, value in samples])
    lines.extend([name + sample for sample in rendered])


def _machine_label(org_label: str, machine_id: str) -> str:
    """``org="…",machine_id="…"``: a machine's labels in every per-machine family."""
    return f'{org_label},machine_id="{escape_label(machine_id)}"'


def render(org: str) -> str:
    """The exposition text for one org.

    Built in one pass over the machines (each one's label text escaped once, each metrics object read
    once): with 10,000 machines it is 100,000 lines.
    """
    machines = db.machine_metrics(org)
    counts = db.status_counts(org)
    lines: list[str] = []
    org_label = f'org="{escape_label(org)}"'
    label_texts: dict[int, str] = {}  # machines share a few label sets: each one's text is made once
    # Samples rendered as they are made ('{labels} value'), one list per family, in one pass over the machines.
    rendered: list[list[str]] = [[] for _ in range(10)]
    status, info, cpu, memory, disk, seen, offset, conflict, lost, late = rendered
    custom: list[tuple[str, float]] = []
    counts_of_checks: list[tuple[str, float]] = []
    for machine_id, status_now, last_seen, clock_offset, in_conflict, lost_n, late_n, text_of_metrics, labels \
            in machines:
        metrics = _decoded(text_of_metrics)
        base = _machine_label(org_label, machine_id)
        key = f"{{{base}}}"
        for s in MACHINE_STATUSES:
            status.append(f'{{{base},status="{s}"}} {"1.0" if status_now == s else "0.0"}')
        text = label_texts.get(id(labels))
        if text is None:
            text = label_texts[id(labels)] = "".join(f',{name}="{escape_label(value)}"'
                                                     for name, value in label_names(labels).items())
        info.append(f"{{{base}{text}}} 1.0")
        # Derived fields are floats or None; the columns are numbers or NULL (never a bool).
        if (value := derived.cpu_percent(metrics)) is not None:
            cpu.append(f"{key} {value!r}")
        if (value := derived.memory_percent(metrics)) is not None:
            memory.append(f"{key} {value!r}")
        if (value := derived.disk_percent(metrics)) is not None:
            disk.append(f"{key} {value!r}")
        if last_seen is not None:
            seen.append(f"{key} {float(last_seen)!r}")
        if clock_offset is not None:
            offset.append(f"{key} {float(clock_offset)!r}")
        if lost_n is not None:
            lost.append(f"{key} {float(lost_n)!r}")
        if late_n is not None:
            late.append(f"{key} {float(late_n)!r}")
        conflict.append(f"{key} {'1.0' if in_conflict else '0.0'}")
        if "custom" in metrics or "process_counts" in metrics:
            agent_extras(custom, counts_of_checks, base, metrics)

    _family(lines, "fleet_machine_status", "gauge", "1 for the machine's current status (online, stale, offline).",
            rendered=status)
    _family(lines, "fleet_machine_cpu_percent", "gauge", "CPU busy, percent of all cores.", rendered=cpu)
    _family(lines, "fleet_machine_memory_percent", "gauge", "Memory used, percent.", rendered=memory)
    _family(lines, "fleet_machine_disk_percent", "gauge", "Fullest real filesystem, percent used.", rendered=disk)
    _family(lines, "fleet_machine_last_seen_timestamp_seconds", "gauge", "When the collector last heard from it.",
            rendered=seen)
    _family(lines, "fleet_machine_clock_offset_seconds", "gauge", "Receive time minus the agent's timestamp.",
            rendered=offset)
    _family(lines, "fleet_machine_conflict", "gauge", "1 while two hardware ids report under this name.",
            rendered=conflict)
    _family(lines, "fleet_reports_lost_total", "counter",
            "Reports of the machine's ended sessions that never arrived (counted after a grace period).",
            rendered=lost)
    _family(lines, "fleet_reports_late_total", "counter",
            "Reports of a session that arrived after its lost reports were counted (lost is not decremented).",
            rendered=late)
    _family(lines, "fleet_org_reports_lost_total", "counter",
            "Reports of the org's ended sessions that never arrived, evicted machines included.",
            [(_labels(org=org), db.lost_count(org))])
    _family(lines, "fleet_machine_labels", "gauge",
            "1 per machine, its labels as label_KEY labels (an info metric to join on).", rendered=info)
    _family(lines, "fleet_machine_custom", "gauge",
            "A series of the machine's textfile directory, named as in its file (label series).", custom)
    _family(lines, "fleet_machine_process_count", "gauge",
            "Processes matching a process check of the agent (label name: NAME or re:REGEX).", counts_of_checks)
    _family(lines, "fleet_machines", "gauge", "Machines per status.",
            [(_labels(org=org, status=s), counts[s]) for s in MACHINE_STATUSES])
    _family(lines, "fleet_machines_expired_total", "counter", "Machines evicted after the TTL.",
            [(_labels(org=org), counts["expired"])])
    _family(lines, "fleet_alerts_firing", "gauge", "Alerts firing now, per rule and severity.",
            [(_labels(org=org, rule=rule, severity=severity), n) for rule, severity, n in db.firing_counts(org)])
    _family(lines, "fleet_collector_dropped_messages_total", "counter", "Messages the collector dropped, by reason.",
            [(_labels(reason=reason), n) for reason, n in db.drop_counts().items()])
    _family(lines, "fleet_collector_active", "gauge",
            "1 for the collector process holding its shard's lease (active), 0 for one waiting to take over.",
            [(_labels(instance=c.instance), 1.0 if c.active else 0.0) for c in db.read(lease.collectors)])
    broker_samples(lines)
    size = db.read(database_size)
    _family(lines, "fleet_database_bytes", "gauge", "The database's size: SQLite's file, or pg_database_size.",
            [("", size.database_bytes)])
    # PostgreSQL's WAL is the server's, shared by all its databases: no sample rather than a made-up one.
    _family(lines, "fleet_database_wal_bytes", "gauge", "SQLite's write-ahead log file (fleet.db-wal).",
            [] if size.wal_bytes is None else [("", size.wal_bytes)])
    return "\n".join(lines) + "\n"


# The embedded broker's heartbeat counters behind each family, by label value.
BROKER_REFUSED = {"handshakes_busy": "refused_handshakes_busy", "accept_rate": "refused_accept_rate",
                  "broker_full": "refused_broker_full"}
BROKER_DROPPED = {"slow_reader": "dropped_slow_reader", "keepalive": "keepalive_expired",
                  "revoked": "revoked_disconnects"}


def broker_samples(lines: list[str]) -> None:
    """The embedded broker's admission and overload counters, from its last heartbeat (none on Mosquitto)."""
    beat = db.heartbeat(BROKER)
    detail = beat[1] if beat is not None else {}

    def counted(names: dict[str, str], label: str) -> list[tuple[str, float]]:
        return [(_labels(**{label: value}), detail.get(key, 0)) for value, key in names.items()] if detail else []

    def single(key: str, scale: float = 1.0) -> list[tuple[str, float]]:
        return [("", detail.get(key, 0) * scale)] if detail else []

    _family(lines, "fleet_broker_clients_connected", "gauge", "Clients connected to the embedded broker.",
            single("connected"))
    _family(lines, "fleet_broker_connections_refused_total", "counter",
            "Connections the embedded broker turned away, by reason.", counted(BROKER_REFUSED, "reason"))
    _family(lines, "fleet_broker_connections_dropped_total", "counter",
            "Connections the embedded broker dropped, by reason.", counted(BROKER_DROPPED, "reason"))
    _family(lines, "fleet_broker_handshake_timeouts_total", "counter",
            "TLS handshakes that did not finish in time.", single("handshake_timeouts"))
    _family(lines, "fleet_broker_loop_lag_seconds", "gauge",
            "How late the embedded broker's event loop ran a timer: p99 over the last minute.",
            single("loop_lag_p99_ms", 0.001))
    _family(lines, "fleet_broker_gc_pause_seconds", "gauge",
            "The embedded broker's longest full garbage collection over the last minute (it stops the loop).",
            single("gc_full_max_ms", 0.001))


def agent_extras(custom: list[tuple[str, float]], counts: list[tuple[str, float]], base: str,
                 metrics: dict[str, Any]) -> None:
    """A machine's custom series and process check counts, one labelled sample each."""
    for series, value in (metrics.get("custom") or {}).items():
        custom.append((f'{{{base},series="{escape_label(series)}"}}', value))
    for name, value in (metrics.get("process_counts") or {}).items():
        counts.append((f'{{{base},name="{escape_label(name)}"}}', value))


def _decoded(text: str) -> dict[str, Any]:
    """A stored metrics object, ``{}`` if unreadable."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


@bp.get("/metrics")
@org_required
def metrics():
    """Prometheus text exposition (version 0.0.4)."""
    return Response(render(g.org), mimetype="text/plain; version=0.0.4; charset=utf-8")
