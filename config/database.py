"""The shared SQLite schema (``fleet.db``): credentials, live machine state, history, events, health.

The collector writes machines/reports/rollups/events/drops/heartbeats, the ``fleet org`` commands
write orgs/credentials, the broker and web read. Every connection uses WAL and a busy timeout.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.config.errors import ConfigError

if TYPE_CHECKING:  # sqlite-utils costs ~20 MB of imports; the agent and the broker never need it
    import sqlite_utils

BUSY_TIMEOUT_MS = 5000

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


# Version 2 (issues 14 and 16): custom and process fields in history, tail accounting.
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


# Version 3: alerting (SPEC "Alerts"): rules, channels, alerts per (rule, machine), silences, and the
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
-- Notification channels. url and secret are encrypted at rest (config.secretbox); target is the URL
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
    notices TEXT NOT NULL,         -- JSON list of notices (collector.notify.Notice fields)
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


# (version, SQL script): applied in order, each once, recorded as meta.schema_version.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, SCHEMA),
    (2, CUSTOM_FIELDS_AND_TAILS),
    (3, ALERTS_SCHEMA),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


class DatabaseError(ConfigError):
    """The database cannot be opened or has an unexpected schema."""


def connect(path: str | Path, readonly: bool = False, check_same_thread: bool = True) -> sqlite3.Connection:
    """Open ``fleet.db`` (WAL, busy timeout); read-only connections never create or change it."""
    path = Path(path)
    try:
        if readonly:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                                   check_same_thread=check_same_thread)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=check_same_thread)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    except sqlite3.Error as exc:
        raise DatabaseError(f"cannot open database {path}: {exc}") from exc
    return conn


def open_db(path: str | Path, check_same_thread: bool = True) -> sqlite_utils.Database:
    """Open ``fleet.db`` for writing through sqlite-utils, creating the schema if needed."""
    import sqlite_utils

    conn = connect(path, check_same_thread=check_same_thread)
    ensure_schema(conn)
    return sqlite_utils.Database(conn)


def schema_version(conn: sqlite3.Connection) -> int:
    """The version recorded in ``meta`` (0 for a new database)."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError:  # no meta table yet
        return 0
    return int(row[0]) if row else 0


def statements(script: str) -> list[str]:
    """Split an SQL script into complete statements (comments and blank lines kept inside them)."""
    done, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            done.append(current.strip())
            current = ""
    if current.strip() and not all(part.strip().startswith("--") for part in current.splitlines() if part.strip()):
        raise DatabaseError(f"incomplete SQL statement in migration: {current.strip()[:60]}")
    return done


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Apply every migration newer than the database's version, each in its own write transaction.

    Several parts may start at once on one ``fleet.db``: the version is read again under the write lock,
    so each migration runs exactly once.
    """
    try:
        for version, script in MIGRATIONS:
            if version <= schema_version(conn):
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                current = schema_version(conn)
                if current < version:
                    for statement in statements(script):
                        conn.execute(statement)
                    conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?) ON CONFLICT(key)"
                                 " DO UPDATE SET value = excluded.value", (str(version),))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        current = schema_version(conn)
        if current > SCHEMA_VERSION:
            raise DatabaseError(f"database schema version {current} is newer than this fleet ({SCHEMA_VERSION})")
    except sqlite3.Error as exc:
        raise DatabaseError(f"cannot create or migrate the schema: {exc}") from exc
