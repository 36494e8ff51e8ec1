"""An org's alerting setup in fleet.db: default rules (new orgs and by migration), channels sealed at rest,
silences, and everything dropped with the org."""

from __future__ import annotations

import itertools

import pytest

from fleet.config.rules import DEFAULT_RULES, Rule, RuleError
from fleet.store import alerting, credentials, database, schema
from fleet.store.errors import CredentialError
from fleet.store.secretbox import secret_box
from tests.dbhelpers import rows

pytestmark = pytest.mark.both_engines

SPEC_DEFAULTS = [("cert-expiring", "cert_days_left < 14", 3600.0, "warning"),
                 ("disk-full", "disk_percent > 90", 600.0, "warning"),
                 ("machine-offline", "status == offline", 120.0, "critical"),
                 ("machine-stale", "status == stale", 300.0, "warning")]


@pytest.fixture
def d(tmp_path, database_url):
    """Call store functions with ``d(func, *args)``: each on a new connection to this test's database."""
    def call(func, *args, **kwargs):
        with database.open_database(database_url) as db:
            return func(db, *args, **kwargs)
    call.data_dir = tmp_path
    call.database = database_url
    call.box = secret_box(tmp_path)
    return call


def test_a_new_org_starts_with_the_four_default_rules(d):
    d(credentials.add_org, d.data_dir, "acme")
    assert [(r.name, str(r.when), r.for_s, r.severity) for r in d(alerting.list_rules, "acme")] == SPEC_DEFAULTS
    assert sorted((n, w, f, s) for n, w, f, s in DEFAULT_RULES) == SPEC_DEFAULTS


def test_the_migration_gives_existing_orgs_the_default_rules(d, monkeypatch):
    # The migrations before alerts' (later ones, such as 4, would mark the database as past version 3).
    before = tuple(itertools.takewhile(lambda m: m[1] is not schema.ALERTS_SCHEMA, database.MIGRATIONS))
    with monkeypatch.context() as m:  # a database from before alerts, with two orgs
        m.setattr(database, "MIGRATIONS", before)
        m.setattr(database, "SCHEMA_VERSION", before[-1][0])
        with database.open_database(d.database) as db:
            db.executemany("INSERT INTO orgs(name, created) VALUES (?, 1.0)", [("acme",), ("globex",)])
    with database.open_database(d.database) as db:
        assert database.schema_version(db) == database.SCHEMA_VERSION
    for org in ("acme", "globex"):
        assert [(r.name, str(r.when), r.for_s, r.severity) for r in d(alerting.list_rules, org)] == SPEC_DEFAULTS


def test_rules_add_list_remove(d):
    d(credentials.add_org, d.data_dir, "acme")
    d(alerting.add_rule, Rule.parse("acme", "hot", "cpu_percent > 90", "5m", "web-*", "critical"))
    with pytest.raises(RuleError, match="already has a rule"):
        d(alerting.add_rule, Rule.parse("acme", "hot", "conflict"))
    with pytest.raises(CredentialError, match="no such org"):
        d(alerting.add_rule, Rule.parse("nope", "hot", "conflict"))
    assert "hot" in [r.name for r in d(alerting.list_rules, "acme")]
    d(alerting.remove_rule, "acme", "hot")
    with pytest.raises(RuleError, match="no rule named"):
        d(alerting.remove_rule, "acme", "hot")


def test_channel_url_and_secret_are_encrypted_at_rest(d):
    d(credentials.add_org, d.data_dir, "acme")
    url, secret = "https://hooks.example.com/services/T0KEN", "s3cret-signing-key"
    d(alerting.store_channel, d.box, "acme", "hook", "webhook", url, secret, "https://hooks.example.com/***")
    stored = str(rows(d.database, "SELECT * FROM alert_channels"))
    assert "T0KEN" not in stored
    assert secret not in stored
    if d.database.startswith("sqlite"):
        db_file = database.DatabaseUrl.parse(d.database).path
        raw = b"".join(p.read_bytes() for p in db_file.parent.glob("fleet.db*"))
        assert b"T0KEN" not in raw
        assert secret.encode() not in raw
    listed = d(alerting.list_channels, "acme")
    assert [c.as_dict()["target"] for c in listed] == ["https://hooks.example.com/***"]
    assert secret not in repr(listed) + str([c.as_dict() for c in listed])
    loaded = d(alerting.get_channel, d.box, "acme", "hook")
    assert (loaded.url, loaded.secret) == (url, secret)
    assert secret not in repr(loaded)
    assert url not in repr(loaded)
    with pytest.raises(RuleError, match="already has a channel"):
        d(alerting.store_channel, d.box, "acme", "hook", "webhook", url, secret, "x")


def test_a_secret_sealed_under_another_pepper_does_not_open(tmp_path):
    box = secret_box(tmp_path)
    token = box.seal("hello")
    assert box.open(token) == "hello"
    assert "hello" not in repr(box)
    other = secret_box(tmp_path / "other")
    with pytest.raises(CredentialError, match="cannot decrypt"):
        other.open(token)


def test_silences_add_list_expire(d):
    d(credentials.add_org, d.data_dir, "acme")
    silence = d(alerting.add_silence, "acme", 3600, "web-*", "machine-offline", "maintenance", now=1000.0)
    assert (silence.starts_at, silence.ends_at, silence.rule, silence.machines) == (1000.0, 4600.0, "machine-offline",
                                                                                    "web-*")
    assert [s.id for s in d(alerting.list_silences, "acme", now=2000.0)] == [silence.id]
    d(alerting.expire_silence, "acme", silence.id, now=2000.0)
    assert d(alerting.list_silences, "acme", now=2000.0) == []
    with pytest.raises(RuleError, match="no silence"):
        d(alerting.expire_silence, "acme", 999)
    with pytest.raises(RuleError, match="no rule named"):
        d(alerting.add_silence, "acme", 60, rule="typo")
    with pytest.raises(RuleError, match="longer than 0s"):
        d(alerting.add_silence, "acme", 0)


def test_removing_an_org_drops_its_alerting_but_not_another_orgs(d):
    for org in ("acme", "globex"):
        d(credentials.add_org, d.data_dir, org)
        d(alerting.store_channel, d.box, org, "hook", "webhook", "https://example.com/h", "s", "https://example.com/***")
        d(alerting.add_silence, org, 60)
    with database.open_database(d.database) as db, db.transaction():
        for org in ("acme", "globex"):
            db.execute("INSERT INTO alerts(org, rule, machine_id, state, severity, active_at) "
                       "VALUES (?, 'disk-full', 'm1', 'firing', 'warning', 1.0)", (org,))
            db.execute("INSERT INTO alert_outbox(org, channel, group_key, notices, created, next_attempt) "
                       "VALUES (?, 'hook', 'k', '[]', 1.0, 1.0)", (org,))
    d(credentials.remove_org, "acme")
    for table in alerting.ORG_TABLES:
        orgs = {row[0] for row in rows(d.database, f"SELECT org FROM {table}")}
        assert orgs == {"globex"}, table
