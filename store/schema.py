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

# Version 5: compact history. A report row holds numbers and small ids instead of text keys and the raw JSON
# payload (which repeated the system inventory in every report); the inventory is kept when it changes. The old
# rows move to the new tables in chunks after the migration (store.conversion), resumably: ``reports_v4`` is
# the old table, empty and dropped once converted. The view ``reports`` reads the new tables with the old
# columns' names and values. Replays are ignored by (session, seq) as before: a session id names one (org,
# machine_id, session). ``samples.id`` follows the order rows were received in, so retention goes by id.
#
# SQLite keeps cpu_percent, memory_percent, disk_percent and load1 in untyped columns: a value with at most two
# decimals as an integer count of hundredths (2 bytes instead of 8), any other value as the REAL it is; the view
# turns the integers back (store.samples.stored_number writes them; n / 100.0 is the nearest double to the
# decimal, which is the value the agent sent). PostgreSQL keeps doubles.
_COMPACT_HISTORY_TABLES = """
ALTER TABLE reports RENAME TO reports_v4;
CREATE TABLE report_machines (
    id INTEGER PRIMARY KEY,
    org TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    UNIQUE (org, machine_id)
);
CREATE TABLE report_sessions (
    id INTEGER PRIMARY KEY,
    machine INTEGER NOT NULL,      -- report_machines.id
    session TEXT NOT NULL,
    UNIQUE (machine, session)
);
-- The names of a report's extra numeric fields, once per distinct list: a JSON list, in the report's order.
CREATE TABLE report_fields (
    id INTEGER PRIMARY KEY,
    names TEXT NOT NULL UNIQUE
);
-- A machine's system inventory from its first report and from each report that changed it.
CREATE TABLE inventory (
    machine INTEGER NOT NULL,      -- report_machines.id
    ts REAL NOT NULL,              -- the report's (agent) time
    received REAL NOT NULL,
    system TEXT NOT NULL,          -- JSON object
    PRIMARY KEY (machine, ts)
);
"""
_SQLITE_SAMPLES = """
CREATE TABLE samples (
    id INTEGER PRIMARY KEY,
    machine INTEGER NOT NULL,      -- report_machines.id
    session INTEGER NOT NULL,      -- report_sessions.id
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    received REAL NOT NULL,
    cpu_percent BLOB,              -- BLOB: no type affinity, so an integer stays one and a REAL stays one
    memory_percent BLOB,
    disk_percent BLOB,
    load1 BLOB,
    net_bytes_sent INTEGER,
    net_bytes_recv INTEGER,
    field_set INTEGER,             -- report_fields.id
    field_values TEXT              -- JSON list, one value per name of field_set
);
CREATE UNIQUE INDEX samples_session_seq ON samples(session, seq);
CREATE INDEX samples_machine_ts ON samples(machine, ts);
"""
_POSTGRESQL_TABLES = """
ALTER TABLE reports RENAME TO reports_v4;
CREATE TABLE report_machines (
    id INTEGER GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    org TEXT COLLATE "C" NOT NULL,
    machine_id TEXT COLLATE "C" NOT NULL,
    UNIQUE (org, machine_id)
);
CREATE TABLE report_sessions (
    id INTEGER GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    machine INTEGER NOT NULL,
    session TEXT COLLATE "C" NOT NULL,
    UNIQUE (machine, session)
);
CREATE TABLE report_fields (
    id INTEGER GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    names TEXT COLLATE "C" NOT NULL UNIQUE
);
CREATE TABLE inventory (
    machine INTEGER NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    received DOUBLE PRECISION NOT NULL,
    system TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (machine, ts)
);
"""
# PostgreSQL: 8-byte columns first, then 4-byte ones, so no row pads for alignment.
_POSTGRESQL_SAMPLES = """
CREATE TABLE samples (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    seq BIGINT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    received DOUBLE PRECISION NOT NULL,
    cpu_percent DOUBLE PRECISION,
    memory_percent DOUBLE PRECISION,
    disk_percent DOUBLE PRECISION,
    load1 DOUBLE PRECISION,
    net_bytes_sent BIGINT,
    net_bytes_recv BIGINT,
    machine INTEGER NOT NULL,
    session INTEGER NOT NULL,
    field_set INTEGER,
    field_values TEXT COLLATE "C"
);
CREATE UNIQUE INDEX samples_session_seq ON samples(session, seq);
CREATE INDEX samples_machine_ts ON samples(machine, ts);
"""
# The view ``reports``: history under the old columns' names and values; ``{number}`` reads a stored value.
_REPORTS_VIEW = """
CREATE VIEW reports AS
SELECT m.org AS org, m.machine_id AS machine_id, s.session AS session, r.seq AS seq, r.ts AS ts,
       r.received AS received, {cpu_percent} AS cpu_percent, {memory_percent} AS memory_percent,
       {disk_percent} AS disk_percent, {load1} AS load1,
       r.net_bytes_sent AS net_bytes_sent, r.net_bytes_recv AS net_bytes_recv,
       f.names AS field_names, r.field_values AS field_values,
       r.id AS id, r.machine AS machine_key, r.session AS session_key
FROM samples r
JOIN report_machines m ON m.id = r.machine
JOIN report_sessions s ON s.id = r.session
LEFT JOIN report_fields f ON f.id = r.field_set;
"""
_NUMBERS = ("cpu_percent", "memory_percent", "disk_percent", "load1")
_SQLITE_VIEW = _REPORTS_VIEW.format(**{
    c: f"CASE typeof(r.{c}) WHEN 'integer' THEN r.{c} / 100.0 ELSE r.{c} END" for c in _NUMBERS})
_POSTGRESQL_VIEW = _REPORTS_VIEW.format(**{c: f"r.{c}" for c in _NUMBERS})
COMPACT_HISTORY = {SQLITE: _COMPACT_HISTORY_TABLES + _SQLITE_SAMPLES + _SQLITE_VIEW,
                   POSTGRESQL: _POSTGRESQL_TABLES + _POSTGRESQL_SAMPLES + _POSTGRESQL_VIEW}

# Version 6: standby collectors. One lease per shard (its MQTT client id): the active collector renews it,
# waiting ones take it over once it expires; ``epoch`` grows with each holder, and every write transaction of
# the holder checks it (store.lease), so a collector that lost the lease writes nothing more. ``collectors``
# lists every collector process, active or waiting, for /healthz and /metrics. Watchdog channels.
COLLECTOR_LEASE = """
CREATE TABLE IF NOT EXISTS collector_lease (
    shard TEXT PRIMARY KEY,        -- the shard's MQTT client id
    holder TEXT NOT NULL,          -- the holding collector's instance name
    host TEXT NOT NULL,            -- its hostname and pid: a holder on this host whose process is gone is dead
    pid INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    expires REAL NOT NULL,         -- the database's clock, Unix seconds
    renewed REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS collectors (
    instance TEXT PRIMARY KEY,
    shard TEXT NOT NULL,
    seen REAL NOT NULL             -- the database's clock at its last sign of life
);
-- 1: the channel also gets the always-firing FleetWatchdog alert (fleet alert channel add --watchdog).
ALTER TABLE alert_channels ADD COLUMN watchdog INTEGER NOT NULL DEFAULT 0;
"""

# Version 7: when a notification's send started. A row found sending when a collector becomes active was
# being sent by a collector that died: the receiver may have it, so it is not sent again (collector.alerts).
OUTBOX_SENDING = """
ALTER TABLE alert_outbox ADD COLUMN sending_since REAL;
"""

# Version 8: machine identity. Enrolment tokens (only a keyed hash of the secret; uses counted in the row, so a
# conditional UPDATE redeems one atomically on both engines), each machine's current certificate, the org key's
# on/off switch, and the default rule on certificate expiry for existing orgs.
MACHINE_IDENTITY = """
CREATE TABLE IF NOT EXISTS enrol_tokens (
    id TEXT PRIMARY KEY,           -- 16 hex digits, printed in the token
    org TEXT NOT NULL,
    digest TEXT NOT NULL,          -- hex HMAC-SHA256(pepper, secret)
    mosquitto_hash TEXT NOT NULL,  -- the secret in Mosquitto's password-file format
    uses INTEGER NOT NULL,         -- 0 = any number until it expires
    used INTEGER NOT NULL DEFAULT 0,
    expires_at REAL NOT NULL,
    created_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS enrol_tokens_org ON enrol_tokens(org);
-- One row per enrolled machine: its current certificate (the previous one is still accepted after a renewal).
CREATE TABLE IF NOT EXISTS machine_certs (
    org TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    serial TEXT NOT NULL,          -- hex
    prev_serial TEXT,
    key_sha256 TEXT NOT NULL,      -- of the public key (SubjectPublicKeyInfo DER): the same request, the same answer
    cert TEXT NOT NULL,            -- PEM
    not_after REAL NOT NULL,
    enrolled_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (org, machine_id)
);
ALTER TABLE orgs ADD COLUMN agent_key INTEGER NOT NULL DEFAULT 1;
INSERT INTO alert_rules(org, name, expr, for_s, machines, severity, created)
SELECT name, 'cert-expiring', 'cert_days_left < 14', 3600, '*', 'warning', created FROM orgs WHERE true
ON CONFLICT(org, name) DO NOTHING;
"""

# Version 9: machine labels. ``machines.agent_labels`` holds the labels of the machine's newest report (JSON
# object, written by the collector); ``machine_labels`` the labels set on the server (``fleet machine label``),
# which win over the agent's for the same key. A machine's labels are the two merged (config.labels.merge).
MACHINE_LABELS = """
ALTER TABLE machines ADD COLUMN agent_labels TEXT NOT NULL DEFAULT '{}';
CREATE TABLE IF NOT EXISTS machine_labels (
    org TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (org, machine_id, key)
);
"""

# Version 10: people. A person (lowercased email; an argon2id password hash, NULL until chosen) holds roles per
# org; web sessions, one-time invitations and personal API tokens are stored as SHA-256 hashes of their random
# secrets only; the audit log records every change made through the web or the CLI, per org.
PEOPLE = """
CREATE TABLE IF NOT EXISTS people (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    email TEXT NOT NULL UNIQUE,    -- lowercased
    password_hash TEXT,            -- argon2id, PHC string; NULL until the person chooses a password
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS person_roles (
    person INTEGER NOT NULL,       -- people.id
    org TEXT NOT NULL,
    role TEXT NOT NULL,            -- 'viewer' | 'operator' | 'admin'
    granted REAL NOT NULL,
    PRIMARY KEY (person, org)
);
CREATE INDEX IF NOT EXISTS person_roles_org ON person_roles(org);
CREATE TABLE IF NOT EXISTS web_sessions (
    id_hash TEXT PRIMARY KEY,      -- hex SHA-256 of the session id (the cookie's value)
    person INTEGER NOT NULL,
    csrf_token TEXT NOT NULL,
    created REAL NOT NULL,
    last_seen REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS web_sessions_person ON web_sessions(person);
CREATE TABLE IF NOT EXISTS invitations (
    token_hash TEXT PRIMARY KEY,   -- hex SHA-256 of the sign-in link's token
    person INTEGER NOT NULL,
    created REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS invitations_person ON invitations(person);
CREATE TABLE IF NOT EXISTS api_tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    person INTEGER NOT NULL,
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    digest TEXT NOT NULL UNIQUE,   -- hex SHA-256 of the token
    created REAL NOT NULL,
    last_used REAL
);
CREATE INDEX IF NOT EXISTS api_tokens_person ON api_tokens(person);
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    org TEXT NOT NULL,             -- '' for a change that concerns no org (a person without roles)
    ts REAL NOT NULL,
    actor TEXT NOT NULL,           -- 'user:EMAIL' | 'token:EMAIL' | 'cli:UNIX_USER' | 'reader-key'
    action TEXT NOT NULL,          -- dotted: 'user.add', 'token.create', 'silence.create', ...
    target TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'  -- JSON object, never a secret
);
CREATE INDEX IF NOT EXISTS audit_log_org_ts ON audit_log(org, ts);
"""

# Version 11: actions from the web. A firing alert acknowledged by a person (who, when; the collector's upserts
# leave these columns alone). Machines an admin forgot: their row is deleted at once; the collector serving the
# org drops them from its memory and clears their retained ping at its next refresh, then deletes the request.
WEB_ACTIONS = """
ALTER TABLE alerts ADD COLUMN acked_by TEXT;
ALTER TABLE alerts ADD COLUMN acked_at REAL;
CREATE TABLE IF NOT EXISTS machine_forgets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    org TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    ts REAL NOT NULL
);
"""

# (version, SQL script): applied in order, each once, recorded as meta.schema_version.
MIGRATIONS: tuple[tuple[int, Migration], ...] = (
    (1, SCHEMA),
    (2, CUSTOM_FIELDS_AND_TAILS),
    (3, ALERTS_SCHEMA),
    (4, MACHINES_FILLFACTOR),
    (5, COMPACT_HISTORY),
    (6, COLLECTOR_LEASE),
    (7, OUTBOX_SENDING),
    (8, MACHINE_IDENTITY),
    (9, MACHINE_LABELS),
    (10, PEOPLE),
    (11, WEB_ACTIONS),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
