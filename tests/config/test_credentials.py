"""Org credentials: generated keys, hashes only, constant-time checks, rotation and removal."""

import base64
import hashlib
import json

import pytest

from fleet.config.errors import InvalidId
from fleet.store import credentials
from fleet.store.database import open_database
from fleet.store.errors import CredentialError
from fleet.store.pepper import load_pepper
from tests import stores
from tests.dbhelpers import rows


def _stored_text(data_dir):
    return json.dumps(rows(stores.database_for(data_dir), "SELECT * FROM credentials"))


def test_add_org_stores_only_hashes(tmp_path):
    org = stores.add_org(tmp_path, "acme")
    assert len(org.agent_key) >= 43
    assert org.agent_key != org.reader_key
    text = _stored_text(tmp_path)
    assert org.agent_key not in text
    assert org.reader_key not in text
    assert org.agent_key not in repr(org)
    assert org.reader_key not in repr(org)
    assert stores.list_orgs(tmp_path) == ["acme"]
    assert (tmp_path / "pepper").stat().st_mode & 0o077 == 0


def test_duplicate_and_invalid_orgs(tmp_path):
    stores.add_org(tmp_path, "acme")
    with pytest.raises(CredentialError, match="already exists"):
        stores.add_org(tmp_path, "acme")
    with pytest.raises(InvalidId):
        stores.add_org(tmp_path, "ac/me")
    with pytest.raises(CredentialError, match="no such org"):
        stores.remove_org(tmp_path, "nope")
    with pytest.raises(CredentialError):
        stores.rotate_key(tmp_path, "acme", "admin")


def test_check_key_roles_and_rotation(tmp_path):
    org = stores.add_org(tmp_path, "acme")
    pepper = load_pepper(tmp_path)
    conn = open_database(tmp_path / "fleet.db")
    records = credentials.load_records(conn)
    assert credentials.check_key(records, pepper, "acme/agent", org.agent_key).role == "agent"
    assert credentials.check_key(records, pepper, "acme/reader", org.reader_key).org == "acme"
    assert credentials.check_key(records, pepper, "acme/agent", org.reader_key) is None
    assert credentials.check_key(records, pepper, "ghost/agent", org.agent_key) is None
    assert credentials.check_key(records, pepper, None, None) is None
    assert credentials.find_reader(conn, pepper, org.reader_key) == "acme"
    assert credentials.find_reader(conn, pepper, org.agent_key) is None  # agent keys are not API tokens

    new = stores.rotate_key(tmp_path, "acme", "reader")
    assert credentials.find_reader(conn, pepper, org.reader_key) is None
    assert credentials.find_reader(conn, pepper, new) == "acme"
    records = credentials.load_records(conn)
    assert credentials.check_key(records, pepper, "acme/agent", org.agent_key) is not None  # other role untouched

    stores.remove_org(tmp_path, "acme")
    assert credentials.load_records(conn) == {}
    assert credentials.find_reader(conn, pepper, new) is None


def test_service_key_is_stable_and_private(tmp_path):
    key = stores.ensure_service_key(tmp_path)
    assert stores.ensure_service_key(tmp_path) == key
    assert (tmp_path / credentials.SERVICE_KEY_FILE).stat().st_mode & 0o077 == 0
    records = credentials.load_records(open_database(tmp_path / "fleet.db"))
    principal = credentials.check_key(records, load_pepper(tmp_path), credentials.SERVICE_USERNAME, key)
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
    stores.add_org(first, "acme", database_url)
    key = stores.ensure_service_key(first, database_url)
    with pytest.raises(CredentialError, match="not the pepper"):
        stores.add_org(second, "globex", database_url)
    (second / "pepper").write_bytes((first / "pepper").read_bytes())
    stores.add_org(second, "globex", database_url)
    if engine == "postgresql":
        with pytest.raises(CredentialError, match="another data dir's service key"):
            stores.ensure_service_key(second, database_url)
        (second / credentials.SERVICE_KEY_FILE).write_text(key + "\n")
    assert stores.ensure_service_key(second, database_url) == (key if engine == "postgresql" else
                                                                    (second / "service.key").read_text().strip())
