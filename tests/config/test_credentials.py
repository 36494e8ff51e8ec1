"""Org credentials: generated keys, hashes only, constant-time checks, rotation and removal."""

import base64
import hashlib
import json

import pytest

from fleet.config.errors import InvalidId
from fleet.store import credentials, orgs
from fleet.store.database import open_database
from fleet.store.errors import CredentialError
from fleet.store.pepper import load_pepper, stored_key_pepper


@pytest.fixture
def db(tmp_path):
    """The data dir's own fleet.db, as every command opens it."""
    with open_database(tmp_path / "fleet.db") as conn:
        yield conn


def _stored_text(db):
    return json.dumps(db.query("SELECT * FROM credentials"))


def test_add_org_stores_only_hashes(tmp_path, db):
    org = credentials.add_org(db, tmp_path, "acme")
    assert len(org.agent_key) >= 43
    assert org.agent_key != org.reader_key
    text = _stored_text(db)
    assert org.agent_key not in text
    assert org.reader_key not in text
    assert org.agent_key not in repr(org)
    assert org.reader_key not in repr(org)
    assert orgs.list_orgs(db) == ["acme"]
    assert (tmp_path / "pepper").stat().st_mode & 0o077 == 0


def test_duplicate_and_invalid_orgs(tmp_path, db):
    credentials.add_org(db, tmp_path, "acme")
    with pytest.raises(CredentialError, match="already exists"):
        credentials.add_org(db, tmp_path, "acme")
    with pytest.raises(InvalidId):
        credentials.add_org(db, tmp_path, "ac/me")
    with pytest.raises(CredentialError, match="no such org"):
        credentials.remove_org(db, "nope")
    with pytest.raises(CredentialError):
        credentials.rotate_key(db, tmp_path, "acme", "admin")


def test_check_key_roles_and_rotation(tmp_path, db):
    org = credentials.add_org(db, tmp_path, "acme")
    pepper = stored_key_pepper(db)
    assert pepper is not None
    assert pepper != load_pepper(tmp_path)  # the sealing pepper stays in the data dir
    conn = db
    records = credentials.load_records(conn)
    assert credentials.check_key(records, pepper, "acme/agent", org.agent_key).role == "agent"
    assert credentials.check_key(records, pepper, "acme/reader", org.reader_key).org == "acme"
    assert credentials.check_key(records, pepper, "acme/agent", org.reader_key) is None
    assert credentials.check_key(records, pepper, "ghost/agent", org.agent_key) is None
    assert credentials.check_key(records, pepper, None, None) is None
    assert credentials.find_reader(conn, pepper, org.reader_key) == "acme"
    assert credentials.find_reader(conn, pepper, org.agent_key) is None  # agent keys are not API tokens

    new = credentials.rotate_key(db, tmp_path, "acme", "reader")
    assert credentials.find_reader(conn, pepper, org.reader_key) is None
    assert credentials.find_reader(conn, pepper, new) == "acme"
    records = credentials.load_records(conn)
    assert credentials.check_key(records, pepper, "acme/agent", org.agent_key) is not None  # other role untouched

    credentials.remove_org(db, "acme")
    assert credentials.load_records(conn) == {}
    assert credentials.find_reader(conn, pepper, new) is None


def test_service_key_is_stable_and_private(tmp_path, db):
    key = credentials.ensure_service_key(db, tmp_path)
    assert credentials.ensure_service_key(db, tmp_path) == key
    assert (tmp_path / credentials.SERVICE_KEY_FILE).stat().st_mode & 0o077 == 0
    records = credentials.load_records(db)
    principal = credentials.check_key(records, stored_key_pepper(db), credentials.SERVICE_USERNAME, key)
    assert principal.role == "service"
    assert principal.org is None


def test_mosquitto_hash_format():
    salt = b"0123456789ab"
    line = credentials.mosquitto_hash("secret", salt=salt)
    _, kind, iterations, salt_b64, hash_b64 = line.split("$")
    assert kind == "7"
    assert int(iterations) == credentials.MOSQUITTO_ITERATIONS
    assert base64.b64decode(salt_b64) == salt
    assert base64.b64decode(hash_b64) == hashlib.pbkdf2_hmac("sha512", b"secret", salt, int(iterations))


@pytest.mark.both_engines
def test_another_hosts_pepper_or_service_key_is_refused(tmp_path, database_url, engine):
    """Hosts sharing one database must share the pepper (and, on PostgreSQL, the service key) of the first one."""
    first, second = tmp_path / "first", tmp_path / "second"
    with open_database(database_url) as db:
        credentials.add_org(db, first, "acme")
        key = credentials.ensure_service_key(db, first)
        with pytest.raises(CredentialError, match="second/pepper is missing"):
            credentials.add_org(db, second, "globex")
        (tmp_path / "third").mkdir()
        (tmp_path / "third" / "pepper").write_text("00" * 32 + "\n")
        with pytest.raises(CredentialError, match="not the pepper"):
            credentials.add_org(db, tmp_path / "third", "globex")
        second.mkdir()
        (second / "pepper").write_bytes((first / "pepper").read_bytes())
        credentials.add_org(db, second, "globex")
        if engine == "postgresql":
            with pytest.raises(CredentialError, match="service.key is missing"):
                credentials.ensure_service_key(db, second)
            (second / credentials.SERVICE_KEY_FILE).write_text(key + "\n")
        assert credentials.ensure_service_key(db, second) == (key if engine == "postgresql" else
                                                               (second / "service.key").read_text().strip())
