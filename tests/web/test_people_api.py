"""People on the web, SQLite and PostgreSQL: sign-in, sessions naming their org, personal tokens, roles, the audit
log, the people of an org and the sign-in link's page."""

from __future__ import annotations

import re

import pytest

from fleet.store import accounts, people
from fleet.web.app import create_app
from tests.helpers import bearer

pytestmark = pytest.mark.both_engines
PASSWORD = "correct horse battery"


@pytest.fixture
def staff(fleet):
    """ann: acme admin and globex viewer; otto: acme operator; vera: acme viewer."""
    with fleet.db() as db:
        for email, roles in (("ann@example.com", {"acme": "admin", "globex": "viewer"}),
                             ("otto@example.com", {"acme": "operator"}), ("vera@example.com", {"acme": "viewer"})):
            people.add_person(db, email, roles, PASSWORD)
    return fleet


def sign_in(client, email: str, password: str = PASSWORD) -> str:
    """Sign ``client`` in; its CSRF token."""
    res = client.post("/api/session", json={"email": email, "password": password})
    assert res.status_code == 200, res.get_json()
    return res.get_json()["csrf_token"]


def test_sign_in_answers_the_session_body_and_sets_a_strict_cookie(client, staff):
    res = client.post("/api/session", json={"email": " Ann@Example.COM", "password": PASSWORD})
    assert res.status_code == 200
    body = res.get_json()
    assert set(body) == {"email", "orgs", "csrf_token"}
    assert body["email"] == "ann@example.com"
    assert body["orgs"] == {"acme": "admin", "globex": "viewer"}
    cookie = res.headers["Set-Cookie"]
    assert cookie.startswith("fleet_session=")
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # plain HTTP here
    assert client.get("/api/session").get_json() == body


def test_the_cookie_is_secure_over_https(settings, staff):
    client = create_app(settings).test_client()
    res = client.post("/api/session", json={"email": "ann@example.com", "password": PASSWORD},
                      base_url="https://fleet.example.com")
    assert res.status_code == 200
    assert "Secure" in res.headers["Set-Cookie"]
    behind_a_proxy = create_app(settings.replace(web_url="https://fleet.example.com")).test_client()
    res = behind_a_proxy.post("/api/session", json={"email": "ann@example.com", "password": PASSWORD})
    assert "Secure" in res.headers["Set-Cookie"]


@pytest.mark.parametrize("body", [{"email": "ann@example.com", "password": "wrong password"},
                                  {"email": "nobody@example.com", "password": PASSWORD},
                                  {"email": "not an email", "password": PASSWORD}])
def test_a_wrong_email_or_password_is_the_same_401(client, staff, body):
    res = client.post("/api/session", json=body)
    assert res.status_code == 401
    assert res.get_json() == {"error": "wrong email or password", "status": 401}
    assert "Set-Cookie" not in res.headers


def test_a_person_without_a_password_cannot_sign_in(client, staff):
    with staff.db() as db:
        accounts.add_user(db, "new@example.com", {"acme": "viewer"}, None, "cli:test")
    for password in ("", PASSWORD):
        assert client.post("/api/session", json={"email": "new@example.com", "password": password}).status_code == 401


@pytest.mark.parametrize("body", [None, [], {"email": "ann@example.com"}, {"email": 1, "password": "x"}])
def test_a_malformed_sign_in_is_400(client, staff, body):
    res = client.post("/api/session", json=body) if body is not None else client.post("/api/session", data="x")
    assert res.status_code == 400
    assert "error" in res.get_json()


def test_signed_out_there_is_no_session(client, staff):
    assert client.get("/api/session").status_code == 401
    csrf = sign_in(client, "vera@example.com")
    res = client.delete("/api/session", headers={"X-CSRF-Token": csrf})
    assert res.status_code == 200
    assert "fleet_session=;" in res.headers["Set-Cookie"]
    assert client.get("/api/session").status_code == 401


def test_a_session_names_its_org(client, staff):
    sign_in(client, "ann@example.com")
    assert client.get("/api/fleet").status_code == 400
    assert client.get("/api/fleet?org=acme").get_json()["org"] == "acme"
    assert client.get("/api/fleet?org=globex").get_json()["org"] == "globex"
    assert client.get("/metrics?org=acme").status_code == 200
    refused = client.get("/api/fleet?org=initech")
    assert refused.status_code == 403
    assert "error" in refused.get_json()


def test_the_reader_key_is_still_a_viewer_of_its_org(client, staff):
    key = staff.acme.reader_key
    assert client.get("/api/fleet", headers=bearer(key)).get_json()["org"] == "acme"
    assert client.get("/api/fleet?org=acme", headers=bearer(key)).status_code == 200
    assert client.get("/api/fleet?org=globex", headers=bearer(key)).status_code == 403
    assert client.get("/api/audit", headers=bearer(key)).status_code == 403
    assert client.post("/api/people", json={"org": "acme", "email": "x@example.com"},
                       headers=bearer(key)).status_code == 403


def test_personal_tokens_act_with_the_persons_current_role(client, staff, settings):
    csrf = sign_in(client, "ann@example.com")
    made = client.post("/api/tokens", json={"org": "acme", "name": "ci"}, headers={"X-CSRF-Token": csrf})
    assert made.status_code == 200
    token = made.get_json()["token"]
    assert re.fullmatch(r"fleet_pt_[A-Za-z0-9_-]{43}", token)
    listed = client.get("/api/tokens").get_json()["data"]
    assert [(t["id"], t["name"], t["org"]) for t in listed] == [(made.get_json()["id"], "ci", "acme")]
    assert listed[0]["last_used"] is None
    assert token not in str(listed)

    other = create_app(settings).test_client()
    assert other.get("/api/fleet", headers=bearer(token)).get_json()["org"] == "acme"
    assert other.get("/api/audit", headers=bearer(token)).status_code == 200
    assert other.get("/api/fleet?org=globex", headers=bearer(token)).status_code == 403
    assert client.get("/api/tokens").get_json()["data"][0]["last_used"] is not None

    with staff.db() as db:
        accounts.grant_role(db, "ann@example.com", "acme", "viewer", "cli:test")
    assert other.get("/api/audit", headers=bearer(token)).status_code == 403  # the role of now
    assert other.get("/api/fleet", headers=bearer(token)).status_code == 200

    deleted = client.delete(f"/api/tokens/{made.get_json()['id']}", headers={"X-CSRF-Token": csrf})
    assert deleted.status_code == 200
    assert other.get("/api/fleet", headers=bearer(token)).status_code == 401
    assert client.get("/api/tokens").get_json()["data"] == []


def test_tokens_need_a_role_in_their_org_and_a_good_name(client, staff):
    csrf = {"X-CSRF-Token": sign_in(client, "vera@example.com")}
    assert client.post("/api/tokens", json={"org": "globex", "name": "x"}, headers=csrf).status_code == 403
    for name in ("", " ", "x" * 65, "a\nb", None):
        assert client.post("/api/tokens", json={"org": "acme", "name": name}, headers=csrf).status_code == 400
    assert client.post("/api/tokens", json={"name": "x"}, headers=csrf).status_code == 400


def test_someone_elses_token_is_404(client, staff, settings):
    csrf = sign_in(client, "ann@example.com")
    made = client.post("/api/tokens", json={"org": "acme", "name": "mine"}, headers={"X-CSRF-Token": csrf})
    other = create_app(settings).test_client()
    other_csrf = sign_in(other, "otto@example.com")
    res = other.delete(f"/api/tokens/{made.get_json()['id']}", headers={"X-CSRF-Token": other_csrf})
    assert res.status_code == 404
    assert other.delete("/api/tokens/999999", headers={"X-CSRF-Token": other_csrf}).status_code == 404
    assert len(client.get("/api/tokens").get_json()["data"]) == 1


def test_the_audit_log_shows_web_and_cli_changes_to_admins(client, staff):
    with staff.db() as db:
        accounts.grant_role(db, "vera@example.com", "acme", "operator", "cli:ops")
    csrf = sign_in(client, "ann@example.com")
    made = client.post("/api/tokens", json={"org": "acme", "name": "ci"}, headers={"X-CSRF-Token": csrf}).get_json()
    client.delete(f"/api/tokens/{made['id']}", headers={"X-CSRF-Token": csrf})
    entries = client.get("/api/audit?org=acme").get_json()["data"]
    assert [(e["actor"], e["action"], e["target"]) for e in entries] == [
        ("cli:ops", "user.grant", "vera@example.com"),
        ("user:ann@example.com", "token.create", "ci"), ("user:ann@example.com", "token.delete", "ci")]
    assert set(entries[0]) == {"ts", "actor", "action", "target", "detail"}
    assert entries[0]["detail"] == {"role": "operator", "before": "viewer"}
    assert made["token"] not in str(entries)
    later = client.get(f"/api/audit?org=acme&since={entries[1]['ts']}").get_json()["data"]
    assert [e["action"] for e in later] == ["token.create", "token.delete"]
    assert client.get("/api/audit?org=globex").status_code == 403  # a viewer there
    assert client.get("/api/audit?org=acme&since=x").status_code == 400


def test_admins_manage_their_orgs_people(client, staff, settings):
    csrf = {"X-CSRF-Token": sign_in(client, "ann@example.com")}
    added = client.post("/api/people", json={"org": "acme", "email": "Neo@Example.com", "role": "operator"},
                        headers=csrf).get_json()
    assert added["email"] == "neo@example.com"
    assert added["link"].startswith(settings.effective_web_url + "/invite/")
    granted = client.post("/api/people", json={"org": "acme", "email": "otto@example.com", "role": "admin"},
                          headers=csrf).get_json()
    assert granted["link"] is None
    listed = {p["email"]: p for p in client.get("/api/people?org=acme").get_json()["data"]}
    assert listed["neo@example.com"] == {"email": "neo@example.com", "role": "operator", "password": False}
    assert listed["otto@example.com"]["role"] == "admin"
    assert client.delete("/api/people/neo@example.com?org=acme", headers=csrf).get_json()["revoked"] == "operator"
    assert client.delete("/api/people/neo@example.com?org=acme", headers=csrf).status_code == 404
    # globex: ann is a viewer there
    assert client.post("/api/people", json={"org": "globex", "email": "x@example.com"}, headers=csrf).status_code == 403
    assert client.post("/api/people", json={"org": "acme", "email": "bad"}, headers=csrf).status_code == 400
    assert client.post("/api/people", json={"org": "acme", "email": "x@example.com", "role": "root"},
                       headers=csrf).status_code == 400


def test_the_sign_in_link_sets_a_password_once(client, staff):
    with staff.db() as db:
        added = accounts.add_user(db, "neo@example.com", {"acme": "operator"}, None, "cli:test")
    assert added.invitation is not None
    path = f"/invite/{added.invitation.token}"
    page = client.get(path)
    assert page.status_code == 200
    assert b"neo@example.com" in page.data
    assert b"<script" not in page.data
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert client.post(path, data={"password": "short", "confirm": "short"}).status_code == 400
    assert client.post(path, data={"password": PASSWORD, "confirm": "other one!"}).status_code == 400
    done = client.post(path, data={"password": PASSWORD, "confirm": PASSWORD})
    assert done.status_code == 303
    assert done.headers["Location"].endswith("/")
    assert client.get("/api/session").get_json()["email"] == "neo@example.com"
    assert client.get(path).status_code == 404  # used up
    assert client.post(path, data={"password": PASSWORD, "confirm": PASSWORD}).status_code == 400
    assert client.get("/invite/" + "x" * 43).status_code == 404
    assert client.post("/api/session", json={"email": "neo@example.com", "password": PASSWORD}).status_code == 200


def test_a_script_may_use_the_sign_in_link_with_json(client, staff):
    with staff.db() as db:
        added = accounts.add_user(db, "bot@example.com", {"acme": "viewer"}, None, "cli:test")
    path = f"/invite/{added.invitation.token}"
    refused = client.post(path, json={"password": "short"})
    assert refused.status_code == 400
    assert "at least 8" in refused.get_json()["error"]
    done = client.post(path, json={"password": PASSWORD})
    assert done.status_code == 200
    assert done.get_json()["orgs"] == {"acme": "viewer"}
    assert "fleet_session=" in done.headers["Set-Cookie"]
    assert client.post(path, json={"password": PASSWORD}).status_code == 400
    assert client.post(path, data={"password": PASSWORD}).status_code == 400  # used up: the page says so


def test_config_announces_accounts(client):
    assert client.get("/api/config").get_json()["FEATURES"]["accounts"] is True
