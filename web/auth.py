"""Bearer-token authentication: an org's reader key, checked in constant time against its hash.

The hash's pepper comes from the database (store.pepper), so every web server sharing it accepts the same keys.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import abort, current_app, g, request

from fleet.store import credentials
from fleet.store.database import DatabaseError
from fleet.store.errors import CredentialError
from fleet.store.pepper import load_pepper, stored_key_pepper
from fleet.web.db import DatabaseUnavailable, get_db


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


def org_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """Allow the request only with a valid reader key; the view sees its org as ``g.org``."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        token = bearer_token()
        if token is None:
            abort(401, description="missing bearer token (Authorization: Bearer <reader key>)")
        try:
            pepper = _pepper()
            org = credentials.find_reader(get_db(), pepper, token) if pepper else None
        except DatabaseError as exc:
            raise DatabaseUnavailable(f"database error: {exc}") from exc
        if org is None:
            abort(401, description="invalid token")
        g.org = org
        return view(*args, **kwargs)

    return wrapped
