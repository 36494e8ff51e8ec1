"""Single sign-on against a real OpenID Provider (oidc-provider on loopback): the whole authorization code flow
through its sign-in and consent pages, and each way a sign-in is refused."""

from __future__ import annotations

import json
import logging
import threading
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from fleet.config.settings import Settings
from fleet.web.app import create_app
from fleet.web.oidc import LOGIN_COOKIE, _sealer
from tests.oidc.conftest import CLIENT_ID, Browser, SignOn, bind_loopback, sign_on

SESSION_COOKIE = "fleet_session"


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def assert_refused(response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert words in response.text
    assert "Traceback" not in response.text
    assert SESSION_COOKIE not in response.cookies


def test_a_verified_email_naming_a_person_signs_in(sso: SignOn, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # Authlib, requests and urllib3 included
    browser = Browser(sso)
    assert browser.session().status_code == 401
    callback = browser.sign_in_at_provider("alice")
    code = dict(parse_qsl(urlsplit(callback).query))["code"]
    sealed = browser.http.cookies.get(LOGIN_COOKIE)
    verifier = json.loads(_sealer(sso.provider.client_secret).decrypt(sealed.encode()))["verifier"]
    done = browser.callback(callback)
    assert done.status_code == 302
    assert done.headers["Location"] == "/"
    cookie = next(c for c in browser.http.cookies if c.name == SESSION_COOKIE)
    assert cookie.has_nonstandard_attr("HttpOnly")
    assert LOGIN_COOKIE not in browser.http.cookies  # the sign-in in progress is over
    answer = browser.session()
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["email"] == "alice@example.com"
    assert body["orgs"] == {"acme": "operator"}
    assert body["csrf_token"]
    # What fleet logged, from the server's threads: the test's own HTTP client (the browser) logs its URLs.
    logged = "\n".join(r.getMessage() for r in caplog.records if r.threadName != threading.current_thread().name)
    assert "POST /token" in logged  # Authlib's requests to the provider are among them
    assert "signed in with single sign-on: alice@example.com" in logged
    for secret in (sso.provider.client_secret, code, verifier, sealed, cookie.value, body["csrf_token"]):
        assert secret not in logged


def test_an_email_naming_nobody_is_refused(sso: SignOn, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    browser = Browser(sso)
    refused = browser.callback(browser.sign_in_at_provider("mallory"))
    assert_refused(refused, 403, "mallory@example.com has no fleet account")
    assert refused.headers["Content-Type"].startswith("text/html")
    assert browser.session().status_code == 401
    assert [r.getMessage() for r in caplog.records if r.name == "fleet.web.oidc"] == [
        "single sign-on refused from 127.0.0.1 (403): mallory@example.com has no account"]


def test_an_unverified_email_is_refused(sso: SignOn) -> None:
    browser = Browser(sso)
    assert_refused(browser.callback(browser.sign_in_at_provider("carol")), 403, "has not verified carol@example.com")
    assert browser.session().status_code == 401


def test_no_email_claim_is_refused(sso: SignOn) -> None:
    browser = Browser(sso)
    assert_refused(browser.callback(browser.sign_in_at_provider("nomail")), 403, "gave no email address")


def test_a_tampered_state_is_refused(sso: SignOn) -> None:
    browser = Browser(sso)
    callback = browser.sign_in_at_provider("alice")
    assert_refused(browser.callback(with_query(callback, state="forged")), 400, "does not match")
    assert browser.session().status_code == 401


def test_a_callback_from_another_browser_is_refused(sso: SignOn) -> None:
    """Login CSRF: a callback URL carried to a browser that did not begin that sign-in is refused."""
    callback = Browser(sso).sign_in_at_provider("alice")
    victim = Browser(sso)
    assert_refused(victim.callback(callback), 400, "expired or was not started here")
    assert victim.session().status_code == 401


def signed_in_once(sso: SignOn) -> tuple[str, str]:
    """A sign-in as alice carried through: its callback URL and the sign-in cookie it was sent with."""
    browser = Browser(sso)
    callback = browser.sign_in_at_provider("alice")
    pending = browser.http.cookies.get(LOGIN_COOKIE)
    assert pending is not None
    assert browser.callback(callback).status_code == 302
    return callback, pending


def test_a_replayed_callback_is_refused(sso: SignOn) -> None:
    """The same answer twice, with the sign-in cookie put back: its state and nonce were used once already."""
    callback, pending = signed_in_once(sso)
    attacker = Browser(sso)
    attacker.http.cookies.set(LOGIN_COOKIE, pending, path="/login/oidc")
    assert_refused(attacker.callback(callback), 400, "already used")
    assert attacker.session().status_code == 401


def test_an_id_token_with_another_sign_ins_nonce_is_refused(sso: SignOn) -> None:
    """The provider's ID token carries the nonce its sign-in began with; here fleet expects another one (a token
    replayed into a different sign-in): the ID token is refused though the code and verifier are right."""
    sealer = _sealer(sso.provider.client_secret)
    browser = Browser(sso)
    callback = browser.sign_in_at_provider("alice")
    cookie = next(c for c in browser.http.cookies if c.name == LOGIN_COOKIE)
    pending = json.loads(sealer.decrypt(cookie.value.encode()))
    pending["nonce"] = "a-nonce-of-another-sign-in"
    cookie.value = sealer.encrypt(json.dumps(pending).encode()).decode()
    assert_refused(browser.callback(callback), 401, "ID token is not valid")
    assert browser.session().status_code == 401


def test_a_replay_to_another_server_is_refused_by_the_provider(sso: SignOn) -> None:
    """A second fleet web sharing the settings has not seen the state: the provider refuses the spent code."""
    callback, pending = signed_in_once(sso)
    peer = create_app(sso.web.settings).test_client()
    peer.set_cookie(LOGIN_COOKIE, pending, domain="127.0.0.1", path="/login/oidc")
    path = urlsplit(callback)
    refused = peer.get(f"{path.path}?{path.query}", base_url=sso.web.url, headers={"Accept": "application/json"})
    assert refused.status_code == 401, refused.text
    assert refused.get_json()["error"] == "the sign-in provider refused: invalid_grant"
    assert not any(c.startswith(SESSION_COOKIE) for c in refused.headers.getlist("Set-Cookie"))


def test_a_provider_error_is_shown(sso: SignOn) -> None:
    browser = Browser(sso)
    browser.to_provider()
    answer = with_query(sso.web.callback, state=browser.state, error="temporarily_unavailable")
    assert_refused(browser.callback(answer), 401, "the sign-in provider refused: temporarily_unavailable")


def test_a_cancelled_sign_in_is_the_providers_refusal(sso: SignOn) -> None:
    browser = Browser(sso)
    page = browser.to_provider()
    abort = page.url.rstrip("/") + "/abort"
    answer = browser.follow(browser.http.get(abort, allow_redirects=False, timeout=10), stop_at=sso.web.callback)
    assert isinstance(answer, str), answer
    assert_refused(browser.callback(answer), 401, "the sign-in provider refused: access_denied")


def test_json_errors_for_clients_that_ask(sso: SignOn) -> None:
    browser = Browser(sso)
    callback = browser.sign_in_at_provider("mallory")
    refused = browser.http.get(callback, headers={"Accept": "application/json"}, allow_redirects=False, timeout=10)
    assert refused.status_code == 403
    assert refused.json() == {"error": "mallory@example.com has no fleet account; ask an admin to add you",
                              "status": 403}


def test_config_says_single_sign_on_is_on(sso: SignOn) -> None:
    browser = Browser(sso)
    assert browser.http.get(f"{sso.web.url}/api/config", timeout=10).json()["FEATURES"]["oidc"] is True


@pytest.mark.slow
def test_email_from_userinfo_when_the_id_token_lacks_it(tmp_path) -> None:
    with sign_on(tmp_path / "fleet-data", email_in_id_token=False) as running:
        browser = Browser(running)
        assert browser.callback(browser.sign_in_at_provider("alice")).status_code == 302
        assert browser.session().json()["email"] == "alice@example.com"
        other = Browser(running)
        assert_refused(other.callback(other.sign_in_at_provider("carol")), 403, "has not verified")


def test_not_configured_is_404(tmp_path) -> None:
    client = create_app(Settings(data_dir=tmp_path / "fleet-data")).test_client()
    for path in ("/login/oidc", "/login/oidc/callback?code=x&state=y"):
        answer = client.get(path)
        assert answer.status_code == 404
        assert answer.get_json() == {"error": "single sign-on is not configured", "status": 404}
    assert client.get("/api/config").get_json()["FEATURES"]["oidc"] is False


def test_an_unreachable_provider_is_502_and_does_not_block_start(tmp_path, caplog) -> None:
    sock = bind_loopback()  # a port nobody listens on: connections are refused
    issuer = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = Settings(data_dir=tmp_path / "fleet-data", oidc_issuer=issuer, oidc_client_id=CLIENT_ID,
                        oidc_client_secret="not-logged-secret")
    client = create_app(settings).test_client()
    answer = client.get("/login/oidc", headers={"Accept": "application/json"})
    sock.close()
    assert answer.status_code == 502
    assert answer.get_json()["error"] == "the sign-in provider cannot be reached; try again later"
    assert "discovery at http://127.0.0.1" in caplog.text
    assert "not-logged-secret" not in caplog.text


def test_discovery_naming_another_issuer_is_502(sso: SignOn, tmp_path) -> None:
    """The provider at localhost calls itself 127.0.0.1: its document is not the configured issuer's."""
    port = urlsplit(sso.provider.issuer).port
    settings = Settings(data_dir=tmp_path / "fleet-data", oidc_issuer=f"http://localhost:{port}",
                        oidc_client_id=CLIENT_ID, oidc_client_secret=sso.provider.client_secret)
    answer = create_app(settings).test_client().get("/login/oidc", headers={"Accept": "application/json"})
    assert answer.status_code == 502
    assert answer.get_json()["error"] == "the sign-in provider is misconfigured"


def test_an_answer_naming_another_issuer_is_refused(sso: SignOn) -> None:
    browser = Browser(sso)
    callback = browser.sign_in_at_provider("alice")
    assert dict(parse_qsl(urlsplit(callback).query))["iss"] == sso.provider.issuer  # oidc-provider sends it
    assert_refused(browser.callback(with_query(callback, iss="https://evil.example")), 400, "another provider")


def test_behind_a_proxy_the_redirect_uri_is_under_web_url(sso: SignOn, tmp_path) -> None:
    settings = Settings(data_dir=tmp_path / "fleet-data", web_url="https://fleet.example.com/",
                        oidc_issuer=sso.provider.issuer, oidc_client_id=CLIENT_ID,
                        oidc_client_secret=sso.provider.client_secret)
    start = create_app(settings).test_client().get("/login/oidc")
    assert start.status_code == 302
    query = dict(parse_qsl(urlsplit(start.headers["Location"]).query))
    assert query["redirect_uri"] == "https://fleet.example.com/login/oidc/callback"
    assert query["code_challenge_method"] == "S256"
    assert query["scope"] == "openid email"
    assert query["response_type"] == "code"
    cookie = start.headers["Set-Cookie"]
    for flag in ("HttpOnly", "Secure", "SameSite=Lax", "Path=/login/oidc", "Max-Age=600"):
        assert flag in cookie
