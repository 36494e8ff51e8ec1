"""``/api/people``: an org's people, managed by its admins (invite, grant a role, take it away)."""

from __future__ import annotations

import logging

from flask import Blueprint, abort, current_app, g, jsonify, request

from fleet.store import accounts, people
from fleet.store.errors import PeopleError
from fleet.web import db
from fleet.web.auth import role_required

log = logging.getLogger("fleet.web")
bp = Blueprint("people", __name__, url_prefix="/api")


@bp.get("/people")
@role_required("admin")
def listing():
    """``{"data": [{"email", "role", "password"}]}``: the people with a role in the org."""
    return jsonify({"data": db.read(lambda conn: people.people_in_org(conn, g.org))})


@bp.post("/people")
@role_required("admin")
def add():
    """``{"org", "email", "role"}``: give that role in the org; a new person also gets a sign-in link (24 h)."""
    body = request.get_json(silent=True) or {}
    email, role = body.get("email"), body.get("role", "viewer")
    if not isinstance(email, str) or not isinstance(role, str):
        abort(400, description='send {"org": …, "email": …, "role": …} as JSON')
    try:
        email = people.normalise_email(email)
        people.check_role(role)
    except PeopleError as exc:
        abort(400, description=str(exc))

    def add_or_grant(conn):
        if people.find_by_email(conn, email) is None:
            return accounts.add_user(conn, email, {g.org: role}, None, g.actor).invitation
        accounts.grant_role(conn, email, g.org, role, g.actor)
        return None

    invitation = db.write(add_or_grant)
    base = current_app.config["FLEET_SETTINGS"].effective_web_url
    log.info("%s gave %s the %s role in org %s", g.actor, email, role, g.org)
    return jsonify({"email": email, "org": g.org, "role": role,
                    "link": invitation.url(base) if invitation else None,
                    "expires_at": invitation.expires_at if invitation else None})


@bp.delete("/people/<email>")
@role_required("admin")
def remove(email: str):
    """Take away the person's role in the org (and their tokens there); 404 when they have none there."""

    def revoke(conn):
        person = people.find_by_email(conn, email)
        if person is None or g.org not in person.orgs:
            return None
        return accounts.revoke_role(conn, person.email, g.org, g.actor)

    before = db.write(revoke)
    if before is None:
        abort(404, description=f"no such person in org {g.org!r}")
    log.info("%s took away the role of %s in org %s", g.actor, email[:254], g.org)
    return jsonify({"email": email.strip().lower(), "org": g.org, "revoked": before})
