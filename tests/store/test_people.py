"""People in the store: emails in normal form (Hypothesis), argon2id passwords, roles, invitations, sessions,
personal tokens and the audit log, on SQLite and PostgreSQL."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from fleet.store import accounts, api_tokens, audit, people, web_sessions
from fleet.store.database import open_database
from fleet.store.errors import PeopleError
from tests import stores

PASSWORD = "correct horse battery"


# --- emails (no database) ------------------------------------------------------------------------------------
@hsettings(max_examples=300, deadline=None)
@given(st.emails().filter(lambda e: len(e) <= people.EMAIL_MAX))
def test_every_email_address_is_accepted_in_lowercase(email):
    assert people.normalise_email(email) == email.lower()
    assert people.normalise_email(f"  {email.upper()} ") == email.lower()


@hsettings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_an_email_in_normal_form_or_a_people_error(text):
    try:
        email = people.normalise_email(text)
    except PeopleError as exc:
        message = str(exc)
    else:
        message = ""
    if message:
        assert message.startswith("not an email address")
        assert "\n" not in message.replace("\\n", "")
        return
    assert email == email.strip().lower()
    assert len(email) <= people.EMAIL_MAX
    assert email.count("@") == 1
    assert not re.search(r"[\s<>\"(),;:\[\]\\]", email)
    assert people.normalise_email(email) == email


@pytest.mark.parametrize("bad", ["", "ann", "@example.com", "ann@", "ann@@example.com", "a b@example.com",
                                 "ann@exa mple.com", "ann@-example.com", "<ann@example.com>", "ann@exam\nple.com",
                                 "x" * 250 + "@example.com"])
def test_not_emails(bad):
    with pytest.raises(PeopleError):
        people.normalise_email(bad)


def test_passwords_are_argon2id_and_checked():
    stored = people.hash_password(PASSWORD)
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored
    assert people.verify_password(stored, PASSWORD)
    assert not people.verify_password(stored, PASSWORD + "!")
    assert not people.verify_password(None, PASSWORD)
    assert not people.verify_password("not a hash", PASSWORD)
    for bad in ("short", "x" * (people.PASSWORD_MAX + 1)):
        with pytest.raises(PeopleError):
            people.hash_password(bad)


def test_roles_are_ordered():
    assert people.role_allows("admin", "operator")
    assert people.role_allows("operator", "operator")
    assert not people.role_allows("viewer", "operator")
    assert not people.role_allows("nobody", "viewer")
    with pytest.raises(PeopleError):
        people.role_allows("admin", "root")
    with pytest.raises(PeopleError):
        people.Person(1, "Ann@example.com", {})


# --- the database, both engines ------------------------------------------------------------------------------
@pytest.fixture
def db(tmp_path, database_url):
    data = tmp_path / "fleet-data"
    for org in ("acme", "globex"):
        stores.add_org(data, org, database_url)
    with open_database(database_url) as conn:
        yield conn


@pytest.mark.both_engines
def test_people_and_their_roles(db):
    ann = people.add_person(db, "Ann@Example.com", {"acme": "admin"}, PASSWORD)
    assert ann.email == "ann@example.com"
    assert people.find_by_email(db, "ANN@example.com ") == ann
    assert people.get_person(db, ann.id) == ann
    assert people.find_by_email(db, "nobody@example.com") is None
    assert people.find_by_email(db, "not an email") is None
    with pytest.raises(PeopleError, match="already exists"):
        people.add_person(db, "ann@example.com")
    with pytest.raises(PeopleError, match="no such org"):
        people.add_person(db, "bob@example.com", {"initech": "viewer"})
    assert people.find_by_email(db, "bob@example.com") is None  # nothing half-made
    assert people.grant(db, "ann@example.com", "globex", "viewer") is None
    assert people.grant(db, "ann@example.com", "globex", "operator") == "viewer"
    assert people.find_by_email(db, "ann@example.com").orgs == {"acme": "admin", "globex": "operator"}
    assert people.revoke(db, "ann@example.com", "globex") == "operator"
    with pytest.raises(PeopleError, match="no role"):
        people.revoke(db, "ann@example.com", "globex")
    assert people.list_people(db)[0]["password"] is True
    assert people.people_in_org(db, "acme") == [{"email": "ann@example.com", "role": "admin", "password": True}]


@pytest.mark.both_engines
def test_invitations_are_one_time_and_expire(db):
    neo = people.add_person(db, "neo@example.com", {"acme": "viewer"}, now=1000.0)
    first = people.invite(db, neo.id, now=1000.0)
    second = people.invite(db, neo.id, now=1001.0)
    assert people.invitation_person(db, first.token, now=1002.0) is None  # replaced
    assert people.invitation_person(db, second.token, now=1001.0 + people.INVITATION_S - 1) == neo
    assert people.invitation_person(db, second.token, now=1001.0 + people.INVITATION_S) is None
    stored = db.query("SELECT token_hash FROM invitations")
    assert second.token not in str(stored)
    with pytest.raises(PeopleError):
        people.accept_invitation(db, second.token, PASSWORD, now=1001.0 + people.INVITATION_S)
    third = people.invite(db, neo.id)
    assert people.accept_invitation(db, third.token, PASSWORD) == neo
    with pytest.raises(PeopleError):
        people.accept_invitation(db, third.token, PASSWORD)
    person, stored_hash = people.password_hash(db, "neo@example.com")
    assert person == neo
    assert people.verify_password(stored_hash, PASSWORD)


@pytest.mark.both_engines
def test_sessions_end_on_sign_out_idle_age_and_removal(db):
    ann = people.add_person(db, "ann@example.com", {"acme": "admin"})
    new = web_sessions.begin(db, ann.id, now=1000.0)
    assert new.session_id not in str(db.query("SELECT * FROM web_sessions"))
    found = web_sessions.lookup(db, new.session_id, now=1000.5)
    assert found is not None
    assert found.person == ann
    assert found.csrf_token == new.csrf_token
    assert not found.touch_due
    assert web_sessions.lookup(db, new.session_id, now=1000.0 + people.TOUCH_S).touch_due
    assert web_sessions.lookup(db, new.session_id, now=1000.0 + web_sessions.SESSION_IDLE_S) is None
    web_sessions.touch(db, found.id_hash, now=1000.0 + web_sessions.SESSION_IDLE_S - 1)
    assert web_sessions.lookup(db, new.session_id, now=1000.0 + web_sessions.SESSION_IDLE_S) is not None
    assert web_sessions.lookup(db, new.session_id, now=1000.0 + web_sessions.SESSION_S) is None
    assert web_sessions.lookup(db, "another id", now=1001.0) is None
    assert web_sessions.end(db, new.session_id)
    assert web_sessions.lookup(db, new.session_id, now=1001.0) is None
    again = web_sessions.begin(db, ann.id)
    people.remove_person(db, "ann@example.com")
    assert web_sessions.lookup(db, again.session_id) is None


@pytest.mark.both_engines
def test_sessions_per_person_are_bounded(db):
    ann = people.add_person(db, "ann@example.com")
    made = [web_sessions.begin(db, ann.id, now=1000.0 + i) for i in range(web_sessions.MAX_SESSIONS_PER_PERSON + 5)]
    count = db.query_one("SELECT COUNT(*) FROM web_sessions")[0]
    assert count == web_sessions.MAX_SESSIONS_PER_PERSON
    assert web_sessions.lookup(db, made[-1].session_id, now=2000.0) is not None
    assert web_sessions.lookup(db, made[0].session_id, now=2000.0) is None


@pytest.mark.both_engines
def test_tokens_follow_their_persons_role(db):
    ann = people.add_person(db, "ann@example.com", {"acme": "operator"})
    made = api_tokens.create(db, ann, "acme", " deploy bot ")
    assert made.token.startswith(api_tokens.PREFIX)
    assert made.token not in repr(made)
    with pytest.raises(PeopleError):
        api_tokens.create(db, ann, "globex", "x")
    use = api_tokens.lookup(db, made.token)
    assert (use.org, use.person.orgs["acme"], use.touch_due) == ("acme", "operator", True)
    api_tokens.touch(db, made.id)
    assert not api_tokens.lookup(db, made.token).touch_due
    assert api_tokens.list_tokens(db, ann.id)[0]["name"] == "deploy bot"
    people.grant(db, "ann@example.com", "acme", "admin")
    assert api_tokens.lookup(db, made.token).person.orgs["acme"] == "admin"
    assert api_tokens.delete(db, ann.id + 1, made.id) is None
    people.revoke(db, "ann@example.com", "acme")
    assert api_tokens.lookup(db, made.token) is None  # revoking the role deleted the org's tokens
    assert api_tokens.lookup(db, api_tokens.PREFIX + "x") is None


@pytest.mark.both_engines
def test_removing_an_org_forgets_its_roles_and_tokens(db, tmp_path, database_url):
    ann = people.add_person(db, "ann@example.com", {"acme": "admin", "globex": "viewer"})
    made = api_tokens.create(db, ann, "acme", "x")
    stores.remove_org(tmp_path / "fleet-data", "acme", database_url)
    assert people.get_person(db, ann.id).orgs == {"globex": "viewer"}
    assert api_tokens.lookup(db, made.token) is None


@pytest.mark.both_engines
def test_each_change_is_audited_in_its_orgs(db):
    added = accounts.add_user(db, "ann@example.com", {"acme": "admin", "globex": "viewer"}, None, "cli:root")
    assert added.invitation is not None
    accounts.grant_role(db, "ANN@example.com", "acme", "operator", "user:boss@example.com")
    accounts.revoke_role(db, "ann@example.com", "globex", "cli:root")
    accounts.add_user(db, "loner@example.com", {}, PASSWORD, "cli:root")
    accounts.remove_user(db, "ann@example.com", "cli:root")
    acme = audit.entries(db, "acme")
    assert [(e["actor"], e["action"], e["target"]) for e in acme] == [
        ("cli:root", "user.add", "ann@example.com"), ("user:boss@example.com", "user.grant", "ann@example.com"),
        ("cli:root", "user.remove", "ann@example.com")]
    assert acme[0]["detail"] == {"orgs": {"acme": "admin", "globex": "viewer"}, "password": False}
    assert [e["action"] for e in audit.entries(db, "globex")] == ["user.add", "user.revoke"]
    assert [e["target"] for e in audit.entries(db, "")] == ["loner@example.com"]
    assert audit.entries(db, "acme", since=acme[-1]["ts"]) == acme[-1:]
    assert added.invitation.token not in str(db.query("SELECT * FROM audit_log"))
    assert PASSWORD not in str(db.query("SELECT * FROM audit_log"))
    assert audit.cli_actor().startswith("cli:")
