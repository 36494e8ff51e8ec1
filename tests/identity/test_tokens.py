"""Enrolment tokens in the database: only hashes, uses and expiry counted atomically on both engines."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from fleet.config.enrolment import EXPIRED, REVOKED, UNKNOWN, USED_UP, EnrolmentError, Token
from fleet.store import identity
from fleet.store.database import open_database
from fleet.store.errors import CredentialError
from tests import stores

pytestmark = pytest.mark.both_engines
FINGERPRINT = "ab" * 32


@pytest.fixture
def org(tmp_path: Path, database_url: str) -> Path:
    data_dir = tmp_path / "fleet-data"
    stores.add_org(data_dir, "acme", database_url)
    return data_dir


def test_only_the_hash_is_stored_and_listing_never_shows_the_token(org: Path, database_url: str) -> None:
    with open_database(database_url) as db:
        made = identity.create_token(db, org, FINGERPRINT, "acme", uses=3, expires_s=600)
        assert Token.parse(str(made.token)) == made.token
        rows = db.query("SELECT * FROM enrol_tokens")
        listed = identity.list_tokens(db, "acme")
    assert made.token.secret not in repr(rows)
    assert made.token.secret not in repr(made)
    assert listed == [{"id": made.token.id, "uses": 3, "used": 0, "expires_at": made.expires_at,
                       "created_at": pytest.approx(made.expires_at - 600), "revoked": False}]
    assert set(made.as_dict()) == {"org", "id", "token", "uses", "expires_at"}


def test_uses_expiry_and_revocation_each_give_their_reason(org: Path, database_url: str) -> None:
    with open_database(database_url) as db:
        once = identity.create_token(db, org, FINGERPRINT, "acme", uses=1, expires_s=600, now=1000.0).token
        identity.redeem_token(db, "acme", once.id, 1001.0)
        with pytest.raises(EnrolmentError) as used:
            identity.redeem_token(db, "acme", once.id, 1002.0)
        assert used.value.reason == USED_UP
        with pytest.raises(EnrolmentError) as expired:
            identity.redeem_token(db, "acme", identity.create_token(db, org, FINGERPRINT, "acme", 5, 10,
                                                                    now=1000.0).token.id, 1011.0)
        assert expired.value.reason == EXPIRED
        revoked = identity.create_token(db, org, FINGERPRINT, "acme", 0, 600, now=1000.0).token
        identity.revoke_token(db, "acme", revoked.id)
        with pytest.raises(EnrolmentError) as gone:
            identity.redeem_token(db, "acme", revoked.id, 1001.0)
        assert gone.value.reason == REVOKED
        with pytest.raises(EnrolmentError) as unknown:
            identity.redeem_token(db, "acme", "00" * 8, 1001.0)
        assert unknown.value.reason == UNKNOWN
        with pytest.raises(CredentialError, match="no enrolment token"):
            identity.revoke_token(db, "acme", "00" * 8)
        many = identity.create_token(db, org, FINGERPRINT, "acme", 0, 600, now=1000.0).token
        for _ in range(20):
            identity.redeem_token(db, "acme", many.id, 1001.0)


def test_two_agents_racing_for_a_one_use_token_exactly_one_wins(org: Path, database_url: str) -> None:
    with open_database(database_url) as db:
        token = identity.create_token(db, org, FINGERPRINT, "acme", uses=1, expires_s=600).token
    racers = 8
    start = threading.Barrier(racers)
    outcomes: list[str] = []
    lock = threading.Lock()

    def race() -> None:
        with open_database(database_url) as db:
            start.wait()
            try:
                with db.transaction():
                    identity.redeem_token(db, "acme", token.id, identity_now())
                result = "won"
            except EnrolmentError as exc:
                result = exc.reason
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == sorted(["won"] + [USED_UP] * (racers - 1))


def identity_now() -> float:
    import time

    return time.time()
