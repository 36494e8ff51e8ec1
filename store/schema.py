"""The schema every engine shares: its tables as versioned migrations, written once for SQLite and PostgreSQL.

Schema changes: append ``(version, script)`` to MIGRATIONS; never edit an applied migration. A script is
portable SQL in SQLite's spelling (CREATE TABLE/INDEX IF NOT EXISTS, ALTER TABLE ADD COLUMN, INTEGER/REAL/
TEXT/BLOB, ``INTEGER PRIMARY KEY AUTOINCREMENT``, ``INSERT ... ON CONFLICT``); fleet.store.database
translates its DDL types for PostgreSQL. Where a migration cannot be portable, give
``{"sqlite": ..., "postgresql": ...}`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping

SQLITE = "sqlite"
POSTGRESQL = "postgresql"

# Version 1: the tables every part shares. Later versions are appended to MIGRATIONS, never edited.
SCHEMA = """
CREATE TABLE IF NOT EXISTS orgs (
    name TEXT PRIMARY KEY,
    created REAL NOT NULL
);
-- One row per MQTT/HTTP principal: '<org>/agent', '<org>/reader', or the internal service user.
CREATE TABLE IF NOT EXISTS credentials (
    username TEXT PRIMARY KEY,
    org TEXT,                      -- NULL for the service user
    role TEXT NOT NULL,            -- 'agent' | 'reader' | 'service'
    digest TEXT NOT NULL,          -- hex HMAC-SHA256(pepper, key)
    mosquitto_hash TEXT NOT NULL,  -- the same key in Mosquitto's password-file format ($7$ PBKDF2-SHA512)
    created REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS credentials_digest ON credentials(digest);
-- Live state of each machine, kept by the collector.
CREATE TABLE IF NOT EXISTS machines (
    org TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    hardware_id TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,          -- 'online' | 'stale' | 'offline'  (evicted machines are deleted)
    session TEXT NOT NULL DEFAULT '',
    interval_s REAL,
    last_seen REAL,
    last_ping REAL,
    clock_offset_s REAL,
    conflict INTEGER NOT NULL DEFAULT 0,
    os TEXT NOT NULL DEFAULT '',
    system TEXT NOT NULL DEFAULT '{}',    -- JSON object
    metrics TEXT NOT NULL DEFAULT '{}',   -- JSON object
    first_seen REAL,
    updated REAL,
    PRIMARY KEY (org, machine_id)
);
CREATE INDEX IF NOT EXISTS machines_org_status ON machines(org, status);
-- Raw report history; (org, machine_id, session, seq) makes agent replays idempotent.
CREATE TABLE IF NOT EXISTS reports (
    org TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    received REAL NOT NULL,
    cpu_percent REAL,
    memory_percent REAL,
    disk_percent REAL,
    load1 REAL,
    net_bytes_sent INTEGER,
    net_bytes_recv INTEGER,
    payload TEXT NOT NULL,
    PRIMARY KEY (org, machine_id, session, seq)
);
CREATE INDEX IF NOT EXISTS reports_machine_ts ON reports(org, machine_id, ts);
CREATE INDEX IF NOT EXISTS reports_ts ON reports(ts);
-- Retention ages raw history out by receive time (an agent's clock cannot keep rows forever).
CREATE INDEX IF NOT EXISTS reports_received ON reports(received);
-- One-minute rollups kept after raw history ages out.
CREATE TABLE IF NOT EXISTS rollups (
    org TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    minute REAL NOT NULL,          -- start of the minute, Unix seconds
    samples INTEGER NOT NULL,
    cpu_percent REAL,
    memory_percent REAL,
    disk_percent REAL,
    load1 REAL,
    net_bytes_sent INTEGER,
    net_bytes_recv INTEGER,
    PRIMARY KEY (org, machine_id, minute)
);
-- Status transitions: online/offline/stale/evicted.
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    org TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    ts REAL NOT NULL,
    old_status TEXT,
    new_status TEXT NOT NULL,      -- 'online' | 'stale' | 'offline' | 'evicted'
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_org_ts ON events(org, ts);
-- Per-org counters kept by the collector (expired = machines evicted by TTL).
CREATE TABLE IF NOT EXISTS org_stats (
    org TEXT PRIMARY KEY,
    expired INTEGER NOT NULL DEFAULT 0
);
-- Dropped-message counters of the collector, per reason code (config.payloads.REASONS and others).
CREATE TABLE IF NOT EXISTS drops (
    reason TEXT PRIMARY KEY,
    count INTEGER NOT NULL DEFAULT 0
);
-- Liveness of long-running parts: component ('collector', 'broker', ...) -> last beat and detail JSON.
CREATE TABLE IF NOT EXISTS heartbeats (
    component TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

Migration = str | Mapping[str, str]  # portable SQL, or one script per engine

# Version 2: custom and process fields in history, tail accounting.
CUSTOM_FIELDS_AND_TAILS = """
-- Extra numeric history fields of a report, as a JSON object: {"custom.<series>": n, "process.<name>": n}.
ALTER TABLE reports ADD COLUMN fields TEXT;
-- The same, rolled up per minute: {"<field>": [sum, samples]}.
ALTER TABLE rollups ADD COLUMN fields TEXT;
-- Tail accounting: reports of ended sessions that never arrived, those that arrived after their count was
-- settled, and the open and settled checks:
-- {"pending": [[session, last_seq, ts, interval_s, due]], "settled": [[session, last_seq]]}.
ALTER TABLE machines ADD COLUMN lost INTEGER NOT NULL DEFAULT 0;
ALTER TABLE machines ADD COLUMN late INTEGER NOT NULL DEFAULT 0;
ALTER TABLE machines ADD COLUMN tails TEXT NOT NULL DEFAULT '{}';
ALTER TABLE org_stats ADD COLUMN lost INTEGER NOT NULL DEFAULT 0;
"""


# Version 3: alerting: rules, channels, alerts per (rule, machine), silences, and the
# notification outbox; existing orgs get the three default rules.
ALERTS_SCHEMA = """
-- An org's alert rules; expr is the canonical text of the parsed condition (config.rules).
CREATE TABLE IF NOT EXISTS alert_rules (
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    expr TEXT NOT NULL,
    for_s REAL NOT NULL DEFAULT 0,
    machines TEXT NOT NULL DEFAULT '*',   -- glob over machine ids
    severity TEXT NOT NULL DEFAULT 'warning',
    created REAL NOT NULL,
    PRIMARY KEY (org, name)
);
-- Notification channels. url and secret are encrypted at rest (store.secretbox); target is the URL
-- without credentials or path, for display.
CREATE TABLE IF NOT EXISTS alert_channels (
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,            -- 'webhook' | 'alertmanager' | 'email' | 'apprise'
    target TEXT NOT NULL,
    url_enc TEXT NOT NULL,
    secret_enc TEXT,
    created REAL NOT NULL,
    last_delivery REAL,
    last_error TEXT,
    last_error_at REAL,
    failures INTEGER NOT NULL DEFAULT 0,   -- failed attempts since the last delivery
    PRIMARY KEY (org, name)
);
-- One row per alert: a (rule, machine) from pending through firing to resolved. A pending alert whose
-- condition stops is deleted; a resolved one stays (history) and the next one is a new row.
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    org TEXT NOT NULL,
    rule TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    state TEXT NOT NULL,           -- 'pending' | 'firing' | 'resolved'
    severity TEXT NOT NULL,
    summary TEXT NOT NULL DEFAULT '',
    value REAL,
    active_at REAL NOT NULL,       -- when the condition began to hold
    fired_at REAL,
    resolved_at REAL,
    notified TEXT NOT NULL DEFAULT ''  -- the last state handed to the org's channels: '', 'firing', 'resolved'
);
CREATE UNIQUE INDEX IF NOT EXISTS alerts_active ON alerts(org, rule, machine_id) WHERE state != 'resolved';
CREATE UNIQUE INDEX IF NOT EXISTS alerts_key ON alerts(org, rule, machine_id, active_at);
CREATE INDEX IF NOT EXISTS alerts_org_state ON alerts(org, state);
CREATE INDEX IF NOT EXISTS alerts_resolved_at ON alerts(resolved_at);
CREATE TABLE IF NOT EXISTS alert_silences (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    org TEXT NOT NULL,
    machines TEXT NOT NULL DEFAULT '*',
    rule TEXT,                     -- NULL: every rule
    comment TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    starts_at REAL NOT NULL,
    ends_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS alert_silences_org ON alert_silences(org, ends_at);
-- Grouped notifications waiting for delivery to one channel; deleted once delivered or given up.
CREATE TABLE IF NOT EXISTS alert_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    org TEXT NOT NULL,
    channel TEXT NOT NULL,
    group_key TEXT NOT NULL,
    notices TEXT NOT NULL,         -- JSON list of notices (collector.alerts.notify.Notice fields)
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS alert_outbox_channel ON alert_outbox(org, channel, id);
INSERT INTO alert_rules(org, name, expr, for_s, machines, severity, created)
SELECT name, 'machine-offline', 'status == offline', 120, '*', 'critical', created FROM orgs WHERE true
ON CONFLICT(org, name) DO NOTHING;
INSERT INTO alert_rules(org, name, expr, for_s, machines, severity, created)
SELECT name, 'machine-stale', 'status == stale', 300, '*', 'warning', created FROM orgs WHERE true
ON CONFLICT(org, name) DO NOTHING;
INSERT INTO alert_rules(org, name, expr, for_s, machines, severity, created)
SELECT name, 'disk-full', 'disk_percent > 90', 600, '*', 'warning', created FROM orgs WHERE true
ON CONFLICT(org, name) DO NOTHING;
"""

# Version 4: on PostgreSQL, room in each machines page for the row's next version. The collector rewrites a
# machine's row for nearly every report; with full pages (fillfactor 100) every UPDATE moves the row to
# another page and adds an entry to both of its indexes, while an update within the page ("HOT") touches no
# index, which matters for a row rewritten with every report (docs/benchmarks.md). SQLite updates rows in place
# and has no such setting.
MACHINES_FILLFACTOR = {SQLITE: "", POSTGRESQL: "ALTER TABLE machines SET (fillfactor = 50);"}

# (version, SQL script): applied in order, each once, recorded as meta.schema_version.
MIGRATIONS: tuple[tuple[int, Migration], ...] = (
    (1, SCHEMA),
    (2, CUSTOM_FIELDS_AND_TAILS),
    (3, ALERTS_SCHEMA),
    (4, MACHINES_FILLFACTOR),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
