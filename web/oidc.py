"""Single sign-on with OpenID Connect: ``GET /login/oidc`` and ``GET /login/oidc/callback``.

Authlib speaks to the provider: discovery (fetched on first use, with a timeout, and kept), the authorization
code flow with PKCE (S256), the token exchange and the ID token's checks (signature by the provider's JWKS,
issuer, audience, nonce, expiry). The state, nonce and PKCE verifier of a sign-in in progress ride in a cookie
encrypted and authenticated with a key derived from the client secret, valid 10 minutes, so every ``fleet web``
sharing the settings finishes what another began. A verified ``email`` that names a person starts a session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import requests
from authlib.integrations.base_client import OAuthError
from authlib.integrations.flask_client import FlaskIntegration, FlaskOAuth2App
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flask import Blueprint, abort, current_app, jsonify, redirect, request, url_for
from joserfc.errors import JoseError
from werkzeug.wrappers import Response

from fleet.config.settings import Settings
from fleet.store.people import Person, find_by_email
from fleet.web.db import get_db
from fleet.web.errors import WebError
from fleet.web.session import begin_session

bp = Blueprint("oidc", __name__)
log = logging.getLogger("fleet.web.oidc")
# Authlib logs the PKCE verifier at DEBUG: never, whatever fleet's log level.
logging.getLogger("authlib").setLevel(max(logging.INFO, logging.getLogger("authlib").level))

SCOPE = "openid email"
LOGIN_COOKIE = "fleet_oidc"  # the sign-in in progress: state, nonce and PKCE verifier, sealed
LOGIN_PATH = "/login/oidc"
LOGIN_TTL_S = 600  # from leaving for the provider to coming back
HTTP_TIMEOUT_S = 10.0  # each request to the provider
METADATA_TTL_S = 24 * 3600.0  # discovery and keys are fetched again after this (keys also on an unknown key id)
CLOCK_LEEWAY_S = 60  # between our clock and the provider's, for the ID token's times
USED_STATES_MAX = 10_000  # the states already answered, remembered to refuse a replayed callback
_HKDF_INFO = b"fleet oidc sign-in v1"
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MAKING = threading.Lock()


class SignInRefused(WebError):
    """A sign-in that cannot finish: ``status`` and ``message`` for the person, ``reason`` for the log."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason or message


@dataclass
class _Provider:
    """Authlib's client of the provider, its discovery kept until ``expires``; used states, to refuse replays."""

    client: FlaskOAuth2App
    expires: float
    sealer: Fernet
    used: OrderedDict[str, float]
    lock: threading.Lock


def _settings() -> Settings:
    return current_app.config["FLEET_SETTINGS"]


def _new_client(settings: Settings) -> FlaskOAuth2App:
    return FlaskOAuth2App(
        FlaskIntegration("fleet"), name="fleet", client_id=settings.oidc_client_id,
        client_secret=settings.oidc_client_secret,
        server_metadata_url=settings.oidc_issuer.rstrip("/") + "/.well-known/openid-configuration",
        client_kwargs={"scope": SCOPE, "code_challenge_method": "S256", "default_timeout": HTTP_TIMEOUT_S},
    )


def _sealer(secret: str) -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(secret.encode("utf-8"))
    return Fernet(base64.urlsafe_b64encode(key))


def _provider() -> _Provider:
    """This app's provider client, made on first use and again once its discovery is a day old."""
    extensions = current_app.extensions
    now = time.monotonic()
    with _MAKING:
        state: _Provider | None = extensions.get("fleet_oidc")
        if state is None:
            settings = _settings()
            state = _Provider(_new_client(settings), now + METADATA_TTL_S, _sealer(settings.oidc_client_secret),
                              OrderedDict(), threading.Lock())
            extensions["fleet_oidc"] = state
        elif now > state.expires:
            state.client, state.expires = _new_client(_settings()), now + METADATA_TTL_S
    return state


def _metadata(provider: _Provider) -> dict[str, Any]:
    """The provider's discovery document, fetched on first use; 502 when it cannot be had or is not the issuer's."""
    issuer = _settings().oidc_issuer
    try:
        metadata = provider.client.load_server_metadata()
    except (requests.RequestException, ValueError) as exc:
        raise SignInRefused(502, "the sign-in provider cannot be reached; try again later",
                            f"discovery at {issuer} failed: {_describe(exc)}") from exc
    if str(metadata.get("issuer", "")).rstrip("/") != issuer.rstrip("/") or not metadata.get("jwks_uri"):
        provider.expires = 0.0  # fetch it again next time: the provider may be fixed by then
        raise SignInRefused(502, "the sign-in provider is misconfigured",
                            f"discovery at {issuer} names issuer {metadata.get('issuer')!r}"
                            f"{'' if metadata.get('jwks_uri') else ' and no jwks_uri'}")
    return metadata


def _describe(exc: BaseException) -> str:
    """An exception in a few words for the log: its class, and an HTTP status when it has one."""
    response = getattr(exc, "response", None)
    status = f" (HTTP {response.status_code})" if response is not None else ""
    return f"{type(exc).__name__}{status}"


def _redirect_uri() -> str:
    """Where the provider sends the browser back: under ``web_url`` when set (behind a proxy), else this address."""
    settings = _settings()
    if settings.web_url:
        return f"{settings.effective_web_url}{LOGIN_PATH}/callback"
    return url_for("oidc.callback", _external=True)


def _over_https() -> bool:
    """Whether the browser speaks HTTPS to us: this request's scheme, or ``web_url``'s behind a proxy ending TLS."""
    return request.is_secure or _settings().web_url.startswith("https://")


def _state_key(state: str) -> str:
    return hashlib.sha256(state.encode("utf-8")).hexdigest()


def _use_state(provider: _Provider, state: str) -> None:
    """Mark a state answered; a second answer to it (a replayed callback) is refused."""
    key, now = _state_key(state), time.monotonic()
    with provider.lock:
        while provider.used and next(iter(provider.used.values())) < now:
            provider.used.popitem(last=False)
        if key in provider.used:
            raise SignInRefused(400, "this sign-in was already used; sign in again", "a callback was replayed")
        provider.used[key] = now + LOGIN_TTL_S
        if len(provider.used) > USED_STATES_MAX:
            provider.used.popitem(last=False)


def _not_configured() -> None:
    if not _settings().oidc_enabled:
        abort(404, description="single sign-on is not configured")


@bp.get(LOGIN_PATH)
def login() -> Response:
    """Send the browser to the provider's sign-in page, remembering what the callback must find."""
    _not_configured()
    try:
        provider = _provider()
        _metadata(provider)
        started = provider.client.create_authorization_url(redirect_uri=_redirect_uri())
    except SignInRefused as refused:
        return _refusal(refused)
    pending = {"state": started["state"], "nonce": started["nonce"], "verifier": started["code_verifier"]}
    response = redirect(started["url"])
    response.set_cookie(LOGIN_COOKIE, provider.sealer.encrypt(json.dumps(pending).encode()).decode(),
                        max_age=LOGIN_TTL_S, path=LOGIN_PATH, httponly=True, samesite="Lax", secure=_over_https())
    return response


@bp.get(f"{LOGIN_PATH}/callback")
def callback() -> Response:
    """Finish the sign-in the provider sends back: a verified email naming a person starts their session."""
    _not_configured()
    try:
        person = _verified_person()
    except SignInRefused as refused:
        response = _refusal(refused)
    else:
        response = redirect("/")
        begin_session(response, person)
        log.info("signed in with single sign-on: %s", person.email)
    response.delete_cookie(LOGIN_COOKIE, path=LOGIN_PATH, httponly=True, samesite="Lax", secure=_over_https())
    return response


def _pending(provider: _Provider) -> dict[str, str]:
    """The state, nonce and verifier of the sign-in this browser began here, or 400."""
    sealed = request.cookies.get(LOGIN_COOKIE, "")
    try:
        pending = json.loads(provider.sealer.decrypt(sealed.encode(), ttl=LOGIN_TTL_S)) if sealed else None
    except (InvalidToken, ValueError):
        pending = None
    if not isinstance(pending, dict) or not all(isinstance(pending.get(k), str) for k in ("state", "nonce",
                                                                                             "verifier")):
        raise SignInRefused(400, "this sign-in expired or was not started here; sign in again",
                            "no sign-in in progress (cookie missing, expired or altered)")
    return pending


def _verified_person() -> Person:
    provider = _provider()
    pending = _pending(provider)
    state = request.args.get("state", "")
    if not hmac.compare_digest(state.encode(), pending["state"].encode()):
        raise SignInRefused(400, "the sign-in answer does not match the sign-in begun here; sign in again",
                            "state mismatch")
    _use_state(provider, state)
    error = request.args.get("error")
    if error is not None:
        name = error if _ERROR_CODE.fullmatch(error) else "invalid"
        raise SignInRefused(401, f"the sign-in provider refused: {name}", f"the provider answered {name}")
    code = request.args.get("code")
    if not code:
        raise SignInRefused(400, "the sign-in answer has no code", "callback without a code")
    claims = _claims(provider, code, pending)
    email = claims.get("email")
    if not isinstance(email, str) or not email:
        raise SignInRefused(403, "the sign-in provider gave no email address", f"no email for subject {claims['sub']}")
    if claims.get("email_verified") not in (True, "true"):  # some providers send the JSON string
        raise SignInRefused(403, f"the provider has not verified {email}", f"{email} is not verified")
    person = find_by_email(get_db(), email)
    if person is None:
        raise SignInRefused(403, f"{email} has no fleet account; ask an admin to add you", f"{email} has no account")
    return person


def _claims(provider: _Provider, code: str, pending: dict[str, str]) -> dict[str, Any]:
    """Exchange the code and check the ID token; its claims, with the email ones from userinfo if it lacks them."""
    metadata = _metadata(provider)
    answered_by = request.args.get("iss")  # RFC 9207: which provider answered, against mix-ups
    if answered_by is not None and answered_by != metadata["issuer"]:
        raise SignInRefused(400, "the sign-in answer comes from another provider",
                            f"callback from issuer {answered_by[:200]!r}")
    client = provider.client
    try:
        token = client.fetch_access_token(redirect_uri=_redirect_uri(), code=code, code_verifier=pending["verifier"])
        if "id_token" not in token:
            raise SignInRefused(502, "the sign-in provider sent no ID token", "token response without id_token")
        issuer, client_id = metadata["issuer"], _settings().oidc_client_id
        options = {"iss": {"essential": True, "value": issuer}, "aud": {"essential": True, "value": client_id},
                   "exp": {"essential": True}, "iat": {"essential": True},
                   "nonce": {"essential": True, "value": pending["nonce"]}}
        claims = dict(client.parse_id_token(token, nonce=pending["nonce"], claims_options=options,
                                            leeway=CLOCK_LEEWAY_S))
        if "email" not in claims and metadata.get("userinfo_endpoint"):
            info = client.userinfo(token=token)
            if info.get("sub") != claims.get("sub"):
                raise SignInRefused(401, "the sign-in provider's answers disagree", "userinfo names another subject")
            claims.update({key: info[key] for key in ("email", "email_verified") if key in info})
    except OAuthError as exc:
        code_name = exc.error if isinstance(exc.error, str) and _ERROR_CODE.fullmatch(exc.error) else "invalid"
        raise SignInRefused(401, f"the sign-in provider refused: {code_name}",
                            f"the token endpoint answered {code_name}") from exc
    except JoseError as exc:
        raise SignInRefused(401, "the sign-in provider's ID token is not valid",
                            f"ID token refused: {exc.description or exc.error}") from exc
    except (requests.RequestException, ValueError) as exc:
        raise SignInRefused(502, "the sign-in provider cannot be reached; try again later",
                            f"provider request failed: {_describe(exc)}") from exc
    return claims


def _refusal(refused: SignInRefused) -> Response:
    """The answer to a sign-in that cannot finish: a small page for a browser, JSON for anything else."""
    # A provider out of reach or misconfigured is the operator's to fix; the rest are people's mistakes or attacks.
    level = logging.WARNING if refused.status >= 500 else logging.INFO
    log.log(level, "single sign-on refused from %s (%d): %s", request.remote_addr, refused.status, refused.reason)
    if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
        page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign-in failed · fleet</title>'
                f'</head><body><h1>Sign-in failed</h1><p>{html.escape(refused.message)}</p>'
                f'<p><a href="/">Back to fleet</a></p></body></html>')
        return Response(page, status=refused.status, mimetype="text/html")
    response = jsonify({"error": refused.message, "status": refused.status})
    response.status_code = refused.status
    return response
