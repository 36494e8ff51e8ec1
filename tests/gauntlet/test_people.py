"""Gauntlet, people: attacks on sign-in and sessions through the real server (waitress) over real sockets.

Session fixation, CSRF, a role too low, another org's ids, guessing passwords (per address and per account, the
addresses being other loopback addresses), sign-out, a removed person or a revoked role, and secrets in logs.
"""

from __future__ import annotations

import http.client
import json
import logging
import statistics
import time
from dataclasses import dataclass, field

import pytest

from fleet.config.settings import Settings
from fleet.store import accounts, people
from fleet.store.database import open_database
from fleet.web.server import start_in_thread
from tests import stores
from tests.helpers import wait_for

PASSWORD = "correct horse battery"


@dataclass
class Browser:
    """An HTTP client from one loopback address that keeps the ``fleet_session`` cookie, as a browser does."""

    port: int
    source: str = "127.0.0.1"
    cookie: str | None = None
    csrf: str = ""
    set_cookies: list[str] = field(default_factory=list)

    def request(self, method: str, path: str, body: object = None, headers: dict | None = None,
                csrf: bool = True) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30, source_address=(self.source, 0))
        sent = dict(headers or {})
        if self.cookie is not None:
            sent["Cookie"] = f"fleet_session={self.cookie}"
        if csrf and self.csrf and method != "GET":
            sent["X-CSRF-Token"] = self.csrf
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=sent)
            res = conn.getresponse()
            raw = res.read()
            for header in res.headers.get_all("Set-Cookie") or []:
                self.set_cookies.append(header)
                if header.startswith("fleet_session="):
                    value = header.split(";", 1)[0].split("=", 1)[1]
                    self.cookie = value or None
            return res.status, json.loads(raw) if raw.startswith(b"{") else {}
        finally:
            conn.close()

    def sign_in(self, email: str, password: str = PASSWORD) -> int:
        status, body = self.request("POST", "/api/session", {"email": email, "password": password})
        if status == 200:
            self.csrf = body["csrf_token"]
        return status


@pytest.fixture
def server(tmp_path):
    """The web app on waitress over SQLite: orgs acme and globex; ann admin of acme, vera viewer of acme, gus
    admin of globex."""
    data = tmp_path / "fleet-data"
    keys = {org: stores.add_org(data, org) for org in ("acme", "globex")}
    settings = Settings(data_dir=data, http_port=0, mqtt_port=1, rate_limit_api="100000/minute")
    with open_database(settings.database) as db:
        for email, roles in (("ann@example.com", {"acme": "admin"}), ("vera@example.com", {"acme": "viewer"}),
                             ("gus@example.com", {"globex": "admin"})):
            people.add_person(db, email, roles, PASSWORD)
        db.insert("machines", [{"org": "globex", "machine_id": "secret-box", "status": "online",
                                "system": "{}", "metrics": "{}"}])
    running = start_in_thread(settings)
    running.settings = settings  # type: ignore[attr-defined]
    running.keys = keys  # type: ignore[attr-defined]
    yield running
    running.stop()


def test_a_cookie_set_before_sign_in_is_not_the_one_after(server):
    browser = Browser(server.port, cookie="attacker-chosen-session-id")
    assert browser.sign_in("ann@example.com") == 200
    assert browser.cookie not in (None, "attacker-chosen-session-id")
    planted = Browser(server.port, cookie="attacker-chosen-session-id")
    assert planted.request("GET", "/api/session")[0] == 401
    # A valid session the browser held before signing in again ends: each sign-in has a new id.
    before = browser.cookie
    assert browser.sign_in("ann@example.com") == 200
    assert browser.cookie != before
    assert Browser(server.port, cookie=before).request("GET", "/api/session")[0] == 401
    assert browser.request("GET", "/api/session")[0] == 200


@pytest.mark.parametrize("csrf", [None, "", "wrong-token"])
def test_a_state_change_with_the_cookie_needs_the_csrf_header(server, csrf):
    browser = Browser(server.port)
    assert browser.sign_in("ann@example.com") == 200
    headers = {} if csrf is None else {"X-CSRF-Token": csrf}
    for method, path, body in (("POST", "/api/tokens", {"org": "acme", "name": "x"}),
                               ("POST", "/api/people", {"org": "acme", "email": "x@example.com"}),
                               ("DELETE", "/api/people/vera@example.com?org=acme", None),
                               ("DELETE", "/api/session", None)):
        status, answer = browser.request(method, path, body, headers=headers, csrf=False)
        assert status == 403, (method, path)
        assert "error" in answer
    assert browser.request("GET", "/api/session")[0] == 200  # still signed in: the DELETE was refused
    assert browser.request("POST", "/api/tokens", {"org": "acme", "name": "x"})[0] == 200  # with the header


def test_a_viewer_cannot_change_anything(server):
    browser = Browser(server.port)
    assert browser.sign_in("vera@example.com") == 200
    status, body = browser.request("POST", "/api/people", {"org": "acme", "email": "x@example.com"})
    assert status == 403
    assert "admin" in body["error"]
    assert browser.request("DELETE", "/api/people/ann@example.com?org=acme")[0] == 403
    assert browser.request("GET", "/api/audit?org=acme")[0] == 403
    reader = Browser(server.port)
    key = {"Authorization": f"Bearer {server.keys['acme'].reader_key}"}
    assert reader.request("POST", "/api/people", {"org": "acme", "email": "x@example.com"}, headers=key)[0] == 403


def test_another_orgs_ids_are_404(server):
    ann, gus = Browser(server.port), Browser(server.port)
    assert ann.sign_in("ann@example.com") == 200
    assert gus.sign_in("gus@example.com") == 200
    status, made = gus.request("POST", "/api/tokens", {"org": "globex", "name": "gus's"})
    assert status == 200
    assert ann.request("DELETE", f"/api/tokens/{made['id']}")[0] == 404
    assert ann.request("GET", "/api/fleet/secret-box?org=acme")[0] == 404
    assert ann.request("DELETE", "/api/people/gus@example.com?org=acme")[0] == 404
    assert ann.request("GET", "/api/fleet/secret-box?org=globex")[0] == 403  # no role there at all
    token = {"Authorization": f"Bearer {made['token']}"}
    assert Browser(server.port).request("GET", "/api/fleet/secret-box", headers=token)[0] == 200


def test_guessing_passwords_from_one_address_is_429(server):
    guesser = Browser(server.port, source="127.0.0.2")
    for i in range(10):
        assert guesser.sign_in(f"user{i}@example.com", "guess") == 401
    assert guesser.sign_in("ann@example.com") == 429  # even the right password, from there, for now
    assert Browser(server.port, source="127.0.0.3").sign_in("ann@example.com") == 200  # others are not locked out


def test_guessing_one_accounts_password_from_many_addresses_is_429(server):
    for i in range(10):
        assert Browser(server.port, source=f"127.0.1.{i + 1}").sign_in("ann@example.com", f"guess {i}") == 401
    assert Browser(server.port, source="127.0.1.200").sign_in("ANN@example.com", "guess") == 429
    assert Browser(server.port, source="127.0.1.201").sign_in("vera@example.com") == 200


def test_successful_sign_ins_do_not_count_as_failures(server):
    browser = Browser(server.port, source="127.0.2.1")
    for _ in range(12):
        assert browser.sign_in("vera@example.com") == 200


def test_an_unknown_email_takes_as_long_as_a_wrong_password(server):
    browser = Browser(server.port, source="127.0.3.1")

    def took(email: str) -> float:
        start = time.perf_counter()
        assert browser.sign_in(email, "wrong password") == 401
        return time.perf_counter() - start

    wrong = statistics.median(took("ann@example.com") for _ in range(4))
    unknown = statistics.median(took("nobody@example.com") for _ in range(4))
    # Without the dummy hash an unknown email would answer in a fraction of a millisecond, not tens of them.
    assert unknown > wrong / 3, (unknown, wrong)


def test_sign_out_invalidates_the_cookie(server):
    browser = Browser(server.port)
    assert browser.sign_in("ann@example.com") == 200
    cookie = browser.cookie
    assert browser.request("DELETE", "/api/session")[0] == 200
    assert browser.cookie is None
    replay = Browser(server.port, cookie=cookie, csrf=browser.csrf)
    assert replay.request("GET", "/api/session")[0] == 401
    assert replay.request("GET", "/api/fleet?org=acme")[0] == 401
    assert replay.request("POST", "/api/tokens", {"org": "acme", "name": "x"})[0] == 401


def test_a_removed_persons_session_and_tokens_die_within_5_s(server):
    browser = Browser(server.port)
    assert browser.sign_in("ann@example.com") == 200
    status, made = browser.request("POST", "/api/tokens", {"org": "acme", "name": "ci"})
    assert status == 200
    token = Browser(server.port)
    auth = {"Authorization": f"Bearer {made['token']}"}
    assert browser.request("GET", "/api/fleet?org=acme")[0] == 200
    with open_database(server.settings.database) as db:
        accounts.remove_user(db, "ann@example.com", "cli:test")
    wait_for(lambda: browser.request("GET", "/api/fleet?org=acme")[0] == 401, 5.0, "the session still works")
    wait_for(lambda: token.request("GET", "/api/fleet", headers=auth)[0] == 401, 5.0, "the token still works")


def test_a_revoked_role_applies_to_the_session_within_5_s(server):
    browser = Browser(server.port)
    assert browser.sign_in("ann@example.com") == 200
    assert browser.request("GET", "/api/audit?org=acme")[0] == 200
    with open_database(server.settings.database) as db:
        accounts.grant_role(db, "ann@example.com", "acme", "viewer", "cli:test")
    wait_for(lambda: browser.request("GET", "/api/audit?org=acme")[0] == 403, 5.0, "still an admin")
    with open_database(server.settings.database) as db:
        accounts.revoke_role(db, "ann@example.com", "acme", "cli:test")
    wait_for(lambda: browser.request("GET", "/api/fleet?org=acme")[0] == 403, 5.0, "still a viewer")


def test_no_password_token_or_session_id_in_any_log_line(server, caplog):
    caplog.set_level(logging.DEBUG)
    with open_database(server.settings.database) as db:
        added = accounts.add_user(db, "neo@example.com", {"acme": "operator"}, None, "cli:test")
    assert added.invitation is not None
    link = f"/invite/{added.invitation.token}"
    browser = Browser(server.port)
    assert browser.request("GET", link)[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", link, body=f"password={PASSWORD.replace(' ', '+')}&confirm={PASSWORD.replace(' ', '+')}",
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    res = conn.getresponse()
    res.read()
    conn.close()
    assert res.status == 303
    assert browser.sign_in("neo@example.com", "a wrong password") == 401
    assert browser.sign_in("neo@example.com") == 200
    status, made = browser.request("POST", "/api/tokens", {"org": "acme", "name": "ci"})
    assert status == 200
    used = Browser(server.port)
    assert used.request("GET", "/api/fleet", headers={"Authorization": f"Bearer {made['token']}"})[0] == 200
    assert used.request("GET", "/api/fleet", headers={"Authorization": "Bearer fleet_pt_wrong"})[0] == 401
    assert browser.request("DELETE", "/api/session")[0] == 200
    secrets_ = [PASSWORD, "a wrong password", added.invitation.token, made["token"], browser.csrf,
                *(c.split(";", 1)[0].split("=", 1)[1] for c in browser.set_cookies if c.split("=", 1)[1][:1] != ";")]
    text = caplog.text
    assert "signed in: neo@example.com" in text  # the log was captured
    for secret in secrets_:
        assert secret
        assert secret not in text
