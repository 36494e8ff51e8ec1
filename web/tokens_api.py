"""``/api/tokens``: a signed-in person's personal API tokens (shown once at creation, never listed)."""

from __future__ import annotations

import logging

from flask import Blueprint, abort, g, jsonify, request

from fleet.store import api_tokens, audit
from fleet.store.errors import PeopleError
from fleet.web import db
from fleet.web.auth import person_required

log = logging.getLogger("fleet.web")
bp = Blueprint("tokens", __name__, url_prefix="/api")


@bp.post("/tokens")
@person_required
def create():
    """``{"org", "name"}`` -> ``{"id", "token"}``: a token acting with the person's role in that org."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("org"), str):
        abort(400, description='send {"org": …, "name": …} as JSON')
    org = body["org"]
    if org not in g.person.orgs:
        abort(403, description=f"no role in org {org[:64]!r}")
    try:
        name = api_tokens.check_name(body.get("name"))
    except PeopleError as exc:
        abort(400, description=str(exc))

    def create_and_record(conn):
        made = api_tokens.create(conn, g.person, org, name)
        audit.record(conn, org=org, actor=g.actor, action="token.create", target=name,
                     detail={"id": made.id, "email": g.person.email})
        return made

    try:
        made = db.write(create_and_record)
    except PeopleError as exc:
        abort(403 if "no role" in str(exc) else 400, description=str(exc))
    log.info("token %s created for %s in org %s", made.id, g.person.email, org)
    return jsonify({"id": made.id, "token": made.token, "org": org, "name": name})


@bp.get("/tokens")
@person_required
def listing():
    """``{"data": [{"id", "name", "org", "created", "last_used"}]}``: the person's tokens, never the tokens."""
    return jsonify({"data": db.read(lambda conn: api_tokens.list_tokens(conn, g.person.id))})


@bp.delete("/tokens/<int:token_id>")
@person_required
def delete(token_id: int):
    """Delete one of the person's tokens (refused from the next request); 404 for anyone else's."""

    def delete_and_record(conn):
        gone = api_tokens.delete(conn, g.person.id, token_id)
        if gone is not None:
            audit.record(conn, org=gone["org"], actor=g.actor, action="token.delete", target=gone["name"],
                         detail={"id": token_id, "email": g.person.email})
        return gone

    gone = db.write(delete_and_record)
    if gone is None:
        abort(404, description=f"no token {token_id}")
    log.info("token %s deleted by %s", token_id, g.person.email)
    return jsonify({"deleted": token_id})
