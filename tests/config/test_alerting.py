"""An org's alerting setup in fleet.db: default rules (new orgs and by migration), channels sealed at rest,
silences, and everything dropped with the org."""

from __future__ import annotations

import sqlite3

import pytest

from fleet.config import alerting, credentials, database
from fleet.config.errors import CredentialError
from fleet.config.rules import DEFAULT_RULES, Rule, RuleError
from fleet.config.secretbox import secret_box

SPEC_DEFAULTS = [("disk-full", "disk_percent > 90", 600.0, "warning"),
                 ("machine-offline", "status == offline", 120.0, "critical"),
                 ("machine-stale", "status == stale", 300.0, "warning")]


def _rows(data_dir, sql, *args):
    conn = sqlite3.connect(data_dir / "fleet.db")
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def test_a_new_org_starts_with_the_three_default_rules(tmp_path):
    credentials.add_org(tmp_path, "acme")
    assert [(r.name, str(r.when), r.for_s, r.severity) for r in alerting.list_rules(tmp_path, "acme")] == SPEC_DEFAULTS
    assert sorted((n, w, f, s) for n, w, f, s in DEFAULT_RULES) == SPEC_DEFAULTS


def test_the_migration_gives_existing_orgs_the_default_rules(tmp_path):
    conn = database.connect(tmp_path / "fleet.db")
    for statement in database.statements(database.SCHEMA):  # a fleet.db of schema version 1 with two orgs
        conn.execute(statement)
    conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', '1')")
    conn.executemany("INSERT INTO orgs(name, created) VALUES (?, 1.0)", [("acme",), ("globex",)])
    conn.commit()
    database.ensure_schema(conn)
    assert database.schema_version(conn) == database.SCHEMA_VERSION
    for org in ("acme", "globex"):
        assert [(r.name, str(r.when), r.for_s, r.severity) for r in alerting.list_rules(tmp_path, org)] == SPEC_DEFAULTS


def test_rules_add_list_remove(tmp_path):
    credentials.add_org(tmp_path, "acme")
    alerting.add_rule(tmp_path, Rule.parse("acme", "hot", "cpu_percent > 90", "5m", "web-*", "critical"))
    with pytest.raises(RuleError, match="already has a rule"):
        alerting.add_rule(tmp_path, Rule.parse("acme", "hot", "conflict"))
    with pytest.raises(CredentialError, match="no such org"):
        alerting.add_rule(tmp_path, Rule.parse("nope", "hot", "conflict"))
    assert "hot" in [r.name for r in alerting.list_rules(tmp_path, "acme")]
    alerting.remove_rule(tmp_path, "acme", "hot")
    with pytest.raises(RuleError, match="no rule named"):
        alerting.remove_rule(tmp_path, "acme", "hot")


def test_channel_url_and_secret_are_encrypted_at_rest(tmp_path):
    credentials.add_org(tmp_path, "acme")
    url, secret = "https://hooks.example.com/services/T0KEN", "s3cret-signing-key"
    alerting.store_channel(tmp_path, "acme", "hook", "webhook", url, secret, "https://hooks.example.com/***")
    raw = (tmp_path / "fleet.db").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("fleet.db-*"))
    assert b"T0KEN" not in raw
    assert secret.encode() not in raw
    listed = alerting.list_channels(tmp_path, "acme")
    assert [c.as_dict()["target"] for c in listed] == ["https://hooks.example.com/***"]
    assert secret not in repr(listed) + str([c.as_dict() for c in listed])
    loaded = alerting.get_channel(tmp_path, "acme", "hook")
    assert (loaded.url, loaded.secret) == (url, secret)
    assert secret not in repr(loaded)
    assert url not in repr(loaded)
    with pytest.raises(RuleError, match="already has a channel"):
        alerting.store_channel(tmp_path, "acme", "hook", "webhook", url, secret, "x")


def test_a_secret_sealed_under_another_pepper_does_not_open(tmp_path):
    box = secret_box(tmp_path)
    token = box.seal("hello")
    assert box.open(token) == "hello"
    assert "hello" not in repr(box)
    other = secret_box(tmp_path / "other")
    with pytest.raises(CredentialError, match="cannot decrypt"):
        other.open(token)


def test_silences_add_list_expire(tmp_path):
    credentials.add_org(tmp_path, "acme")
    silence = alerting.add_silence(tmp_path, "acme", 3600, "web-*", "machine-offline", "maintenance", now=1000.0)
    assert (silence.starts_at, silence.ends_at, silence.rule, silence.machines) == (1000.0, 4600.0, "machine-offline",
                                                                                    "web-*")
    assert [s.id for s in alerting.list_silences(tmp_path, "acme", now=2000.0)] == [silence.id]
    alerting.expire_silence(tmp_path, "acme", silence.id, now=2000.0)
    assert alerting.list_silences(tmp_path, "acme", now=2000.0) == []
    with pytest.raises(RuleError, match="no silence"):
        alerting.expire_silence(tmp_path, "acme", 999)
    with pytest.raises(RuleError, match="no rule named"):
        alerting.add_silence(tmp_path, "acme", 60, rule="typo")
    with pytest.raises(RuleError, match="longer than 0s"):
        alerting.add_silence(tmp_path, "acme", 0)


def test_removing_an_org_drops_its_alerting_but_not_another_orgs(tmp_path):
    for org in ("acme", "globex"):
        credentials.add_org(tmp_path, org)
        alerting.store_channel(tmp_path, org, "hook", "webhook", "https://example.com/h", "s", "https://example.com/***")
        alerting.add_silence(tmp_path, org, 60)
    conn = database.connect(tmp_path / "fleet.db")
    with conn:
        for org in ("acme", "globex"):
            conn.execute("INSERT INTO alerts(org, rule, machine_id, state, severity, active_at) "
                         "VALUES (?, 'disk-full', 'm1', 'firing', 'warning', 1.0)", (org,))
            conn.execute("INSERT INTO alert_outbox(org, channel, group_key, notices, created, next_attempt) "
                         "VALUES (?, 'hook', 'k', '[]', 1.0, 1.0)", (org,))
    conn.close()
    credentials.remove_org(tmp_path, "acme")
    for table in alerting.ORG_TABLES:
        orgs = {row[0] for row in _rows(tmp_path, f"SELECT org FROM {table}")}
        assert orgs == {"globex"}, table
