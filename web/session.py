"""``/api/session``: sign in with email and password, see who is signed in, sign out.

Sign-in answers an unknown email exactly as a wrong password, after the same argon2id work (a dummy hash is
checked), so neither the answer nor its timing tells whether a person exists. Failures are limited per
address and per account (create_app applies SIGN_IN_LIMIT to ``signin_bp``). Hashing takes one core; at most
SIGN_IN_MAX sign-ins hold a server thread at once, so a burst of them never takes every thread from the API.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, Response, abort, g, jsonify, request
from flask_limiter.util import get_remote_address
from werkzeug.wrappers import Response as BaseResponse

from fleet.store import people, web_sessions
from fleet.store.people import Person
from fleet.web import db
from fleet.web.auth import SESSION_COOKIE, person_required, session_cookie

log = logging.getLogger("fleet.web")
bp = Blueprint("session", __name__, url_prefix="/api")
signin_bp = Blueprint("signin", __name__, url_prefix="/api")  # its own blueprint: it carries the failure limits
SIGN_IN_LIMIT = "10 per 15 minutes"  # failed sign-ins, per client address and per account
HASH_LANES = 1  # argon2id hashes at once: one core, the other stays with the API
SIGN_IN_MAX = 4  # sign-ins in progress at once (hashing or waiting for the lane); more get 503 and Retry-After
_lanes = threading.Semaphore(HASH_LANES)
_in_progress = threading.BoundedSemaphore(SIGN_IN_MAX)


def session_body(person: Person, csrf_token: str) -> dict[str, Any]:
    """The ``/api/session`` answer: ``{"email", "orgs", "csrf_token"}``."""
    return {"email": person.email, "orgs": dict(person.orgs), "csrf_token": csrf_token}


def begin_session(response: BaseResponse, person: Person) -> str:
    """Start a new server-side session for ``person``, set its cookie on ``response``; returns the CSRF token.

    A session the request came with ends here: signing in always gives a new session id (no fixation).
    """
    old = session_cookie()
    if old is not None:
        db.write(lambda conn: web_sessions.end(conn, old))
    new = db.write(lambda conn: web_sessions.begin(conn, person.id))
    response.set_cookie(SESSION_COOKIE, new.session_id, max_age=int(web_sessions.SESSION_S), path="/",
                        httponly=True, samesite="Lax", secure=request.is_secure)
    return new.csrf_token


@contextmanager
def password_lane() -> Iterator[None]:
    """Hold one of the argon2id lanes; 503 with Retry-After when SIGN_IN_MAX sign-ins are in progress already."""
    if not _in_progress.acquire(blocking=False):
        response = jsonify({"error": "too many sign-ins at once: try again in a second", "status": 503})
        response.status_code = 503
        response.headers["Retry-After"] = "1"
        abort(response)
    try:
        with _lanes:
            yield
    finally:
        _in_progress.release()


def account_key() -> str:
    """The rate-limit key of the account a sign-in names (its email as given, lowercased)."""
    body = request.get_json(silent=True)
    email = body.get("email") if isinstance(body, dict) else None
    return "account:" + (email.strip().lower()[:people.EMAIL_MAX] if isinstance(email, str) else "")


def address_key() -> str:
    """The rate-limit key of the client's address."""
    return "address:" + get_remote_address()


def failed(response: Response) -> bool:
    """Whether a sign-in's answer counts against the limits (a wrong email or password)."""
    return response.status_code == 401


def warm_up() -> None:
    """Compute the dummy hash now, so the first sign-in with an unknown email takes as long as any other."""
    people.verify_password(None, "")


@signin_bp.post("/session")
def sign_in():
    """Check email and password; 200 with the session body and a new session cookie, else 401."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("email"), str) or not isinstance(body.get("password"),
                                                                                              str):
        abort(400, description='send {"email": …, "password": …} as JSON')
    email, password = body["email"], body["password"]
    with password_lane():
        person, stored = db.read(lambda conn: people.password_hash(conn, email))
        ok = people.verify_password(stored, password)
    if person is None or not ok:
        log.info("sign-in refused from %s", get_remote_address())
        abort(401, description="wrong email or password")
    response = jsonify({})
    csrf = begin_session(response, person)
    response.set_data(jsonify(session_body(person, csrf)).get_data())
    log.info("signed in: %s", person.email)
    return response


@bp.get("/session")
@person_required
def current():
    """Who is signed in: the same body as sign-in gives."""
    return jsonify(session_body(g.person, g.session.csrf_token))


@bp.delete("/session")
@person_required
def sign_out():
    """End the session (its cookie is refused from now on) and clear the cookie."""
    session_id = session_cookie()
    if session_id is not None:
        db.write(lambda conn: web_sessions.end(conn, session_id))
    response = jsonify({"signed_out": True, "email": g.person.email})
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Lax", secure=request.is_secure)
    log.info("signed out: %s", g.person.email)
    return response
