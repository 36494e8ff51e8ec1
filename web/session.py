"""``/api/session``: sign in with email and password, see who is signed in, sign out.

Sign-in answers an unknown email exactly as a wrong password, after the same argon2id work (a dummy hash is
checked), so neither the answer nor its timing tells whether a person exists. Failures are limited per
address and per account (create_app applies SIGN_IN_LIMIT to ``signin_bp``).

A burst of sign-ins never stalls the API: passwords are checked one at a time in a process of their own at a
lower CPU priority (a niced thread here would hold the GIL while the kernel keeps it waiting, stalling every
request). Sign-ins waiting for their check hold server threads that the server adds for them (SIGN_IN_MAX,
web/server.py), so the API keeps its own; past SIGN_IN_MAX at once, a sign-in is answered 503 (Retry-After).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, Response, abort, current_app, g, jsonify, request
from flask_limiter.util import get_remote_address
from werkzeug.wrappers import Response as BaseResponse

from fleet.store import people, web_sessions
from fleet.store.people import Person
from fleet.web import db
from fleet.web.auth import SESSION_COOKIE, person_required, session_cookie
from fleet.web.db import close_db

log = logging.getLogger("fleet.web")
bp = Blueprint("session", __name__, url_prefix="/api")
signin_bp = Blueprint("signin", __name__, url_prefix="/api")  # its own blueprint: it carries the failure limits
SIGN_IN_LIMIT = "10 per 15 minutes"  # failed sign-ins, per client address and per account
LIMITED = "too many failed sign-ins: try again later"
HASH_LANES = 1  # argon2id hashes at once: at most one core
HASH_NICE = 10  # the hashing process's nice value above the server's
SIGN_IN_MAX = 24  # sign-ins in progress at once (checking or waiting to); more get 503 and Retry-After
_in_progress = threading.BoundedSemaphore(SIGN_IN_MAX)
_pool_lock = threading.Lock()
_pool: list[ProcessPoolExecutor] = []  # one per server process, started at the first use


def _lower_priority() -> None:
    try:
        os.nice(HASH_NICE)
    except (AttributeError, OSError):  # not allowed here: the same priority as the server
        pass


def _hashing_pool() -> ProcessPoolExecutor:
    with _pool_lock:
        if not _pool:  # spawn, not fork: the server's process has threads (waitress, and in fleet up the broker)
            _pool.append(ProcessPoolExecutor(HASH_LANES, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_lower_priority))
        return _pool[0]


def session_body(person: Person, csrf_token: str) -> dict[str, Any]:
    """The ``/api/session`` answer: ``{"email", "orgs", "csrf_token"}``."""
    return {"email": person.email, "orgs": dict(person.orgs), "csrf_token": csrf_token}


def over_https() -> bool:
    """Whether people reach the app over HTTPS: this request came so, or ``web_url`` says so (a TLS proxy)."""
    return request.is_secure or current_app.config["FLEET_SETTINGS"].web_url.startswith("https://")


def begin_session(response: BaseResponse, person: Person) -> str:
    """Start a new server-side session for ``person``, set its cookie on ``response``; returns the CSRF token.

    A session the request came with ends here: signing in always gives a new session id (no fixation).
    """
    old = session_cookie()
    if old is not None:
        db.write(lambda conn: web_sessions.end(conn, old))
    new = db.write(lambda conn: web_sessions.begin(conn, person.id))
    response.set_cookie(SESSION_COOKIE, new.session_id, max_age=int(web_sessions.SESSION_S), path="/",
                        httponly=True, samesite="Lax", secure=over_https())
    return new.csrf_token


@contextmanager
def sign_in_slot() -> Iterator[None]:
    """Hold one of SIGN_IN_MAX sign-in slots; 503 with Retry-After when all are taken."""
    if not _in_progress.acquire(blocking=False):
        response = jsonify({"error": "too many sign-ins at once: try again in a second", "status": 503})
        response.status_code = 503
        response.headers["Retry-After"] = "1"
        abort(response)
    try:
        yield
    finally:
        _in_progress.release()


def check_password(stored: str | None, password: str) -> bool:
    """Whether ``password`` matches ``stored``, checked in the hashing process; without a stored hash the dummy
    one is checked, so it takes as long."""
    candidate = stored or people.dummy_hash()
    pool = _hashing_pool()
    try:
        ok = pool.submit(people.verify_password, candidate, password).result()
    except BrokenProcessPool:  # the hashing process died (killed): start another one next time, check here now
        with _pool_lock:
            if _pool and _pool[0] is pool:
                _pool.clear()
        ok = people.verify_password(candidate, password)
    return ok and stored is not None


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
    people.dummy_hash()


@signin_bp.post("/session")
def sign_in():
    """Check email and password; 200 with the session body and a new session cookie, else 401."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("email"), str) or not isinstance(body.get("password"),
                                                                                              str):
        abort(400, description='send {"email": …, "password": …} as JSON')
    email, password = body["email"], body["password"]
    with sign_in_slot():
        person, stored = db.read(lambda conn: people.password_hash(conn, email))
        close_db()  # the wait for the check needs no connection: another request may use it
        ok = check_password(stored, password)
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
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Lax", secure=over_https())
    log.info("signed out: %s", g.person.email)
    return response
