"""Who is asking, and may they: an org's reader key, a personal API token, or a signed-in session cookie.

- A reader key (``Authorization: Bearer``) is a viewer of its org, checked in constant time against its keyed
  hash; the hash's pepper comes from the database (store.pepper), so every web server sharing it agrees.
- A personal API token (``Bearer fleet_pt_…``) acts in its one org with its person's current role there.
- A session cookie names no org, so the request does: the view's ``org`` path argument, else ``"org"`` in the
  JSON body, else ``?org=``. A state-changing request with a cookie must carry ``X-CSRF-Token``.

Roles and people are read at every request, so a removed person or a revoked role is refused at once.
The views see ``g.org``, ``g.role``, ``g.actor`` (for the audit log) and ``g.person`` (None for a reader key).
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from typing import Any

from flask import abort, current_app, g, request

from fleet.store import api_tokens, credentials, web_sessions
from fleet.store.database import DatabaseError
from fleet.store.errors import CredentialError
from fleet.store.people import ROLES, role_allows
from fleet.store.pepper import load_pepper, stored_key_pepper
from fleet.web import db
from fleet.web.db import DatabaseUnavailable, get_db

SESSION_COOKIE = "fleet_session"
CSRF_HEADER = "X-CSRF-Token"
STATE_CHANGING = frozenset(("POST", "PUT", "PATCH", "DELETE"))
READER_KEY_ACTOR = "reader-key"


def _pepper() -> bytes | None:
    pepper = current_app.config.get("FLEET_PEPPER")
    if pepper is None:
        pepper = stored_key_pepper(get_db())
        if pepper is None:
            try:  # an installation no part has upgraded yet: its keys are still hashed with the data dir's file
                pepper = load_pepper(current_app.config["FLEET_SETTINGS"].data_dir, create=False)
            except CredentialError:
                return None  # no org was ever created: every token is wrong
        current_app.config["FLEET_PEPPER"] = pepper
    return pepper


def bearer_token() -> str | None:
    """The token of an ``Authorization: Bearer …`` header, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def session_cookie() -> str | None:
    """The session id of the request's ``fleet_session`` cookie, if any."""
    return request.cookies.get(SESSION_COOKIE) or None


def named_org(view_kwargs: dict[str, Any]) -> str | None:
    """The org a request names: its ``org`` path argument, else ``"org"`` in a JSON body, else ``?org=``."""
    org = view_kwargs.get("org")
    if org is None and request.is_json:
        body = request.get_json(silent=True)
        if isinstance(body, dict):
            org = body.get("org")
    if org is None:
        org = request.args.get("org")
    if org is not None and not isinstance(org, str):
        abort(400, description="'org' must be a string")
    return org or None


def signed_in() -> web_sessions.SignedIn | None:
    """The live session of the request's cookie (its last_seen written when due); None without one."""
    session_id = session_cookie()
    if session_id is None:
        return None
    found = db.read(lambda conn: web_sessions.lookup(conn, session_id))
    if found is not None and found.touch_due:
        db.write(lambda conn: web_sessions.touch(conn, found.id_hash))
    return found


def check_csrf(session: web_sessions.SignedIn) -> None:
    """403 unless a state-changing request carries the session's CSRF token (compared in constant time)."""
    if request.method not in STATE_CHANGING:
        return
    sent = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode("utf-8", "replace"), session.csrf_token.encode("utf-8")):
        abort(403, description=f"missing or wrong {CSRF_HEADER} header")


def _bearer(token: str, org: str | None) -> None:
    """Authenticate a bearer token (a personal token or a reader key) into ``g``; 401/403 when refused."""
    if api_tokens.is_personal_token(token):
        use = db.read(lambda conn: api_tokens.lookup(conn, token))
        if use is None:
            abort(401, description="invalid token")
        if use.touch_due:
            db.write(lambda conn: api_tokens.touch(conn, use.id))
        role = use.person.orgs.get(use.org)
        if role is None:
            abort(403, description=f"no role in org {use.org!r}")
        g.org, g.role, g.person, g.actor = use.org, role, use.person, f"token:{use.person.email}"
    else:
        try:
            pepper = _pepper()
            reader_org = credentials.find_reader(get_db(), pepper, token) if pepper else None
        except DatabaseError as exc:
            raise DatabaseUnavailable(f"database error: {exc}") from exc
        if reader_org is None:
            abort(401, description="invalid token")
        g.org, g.role, g.person, g.actor = reader_org, "viewer", None, READER_KEY_ACTOR
    if org is not None and org != g.org:
        abort(403, description=f"this token belongs to another org than {org[:64]!r}")


def _authenticate(view_kwargs: dict[str, Any]) -> None:
    """Set ``g.org``, ``g.role``, ``g.person`` and ``g.actor`` from the request's credentials, or abort."""
    token = bearer_token()
    if token is not None:
        _bearer(token, named_org(view_kwargs))
        return
    session = signed_in() if session_cookie() is not None else None
    if session is None:
        if session_cookie() is not None:
            abort(401, description="not signed in (the session ended)")
        abort(401, description="missing bearer token (Authorization: Bearer <reader key>) or session")
    check_csrf(session)
    org = named_org(view_kwargs)
    if org is None:
        abort(400, description="name the org: ?org=ORG, or \"org\" in the JSON body")
    role = session.person.orgs.get(org)
    if role is None:
        abort(403, description=f"no role in org {org[:64]!r}")
    g.org, g.role, g.person, g.actor = org, role, session.person, f"user:{session.person.email}"


def org_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """Allow the request with any valid credential that may read its org (a viewer or more); sets ``g.org``…"""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _authenticate(kwargs)
        return view(*args, **kwargs)

    return wrapped


def role_required(role: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``org_required`` plus: the caller's role in the org allows ``role`` (403 otherwise) and, with a cookie,
    a state-changing request carries the CSRF token."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            _authenticate(kwargs)
            if not role_allows(g.role, role):
                abort(403, description=f"this needs the {role} role in org {g.org!r}; you are {g.role}")
            return view(*args, **kwargs)

        return wrapped

    return decorate


def person_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """Allow the request only from a signed-in session (CSRF-checked); sets ``g.person``, ``g.session``, ``g.actor``."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        session = signed_in()
        if session is None:
            abort(401, description="not signed in")
        check_csrf(session)
        g.person, g.session, g.actor = session.person, session, f"user:{session.person.email}"
        return view(*args, **kwargs)

    return wrapped
