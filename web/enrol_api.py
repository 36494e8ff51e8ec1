"""``/api/enrol``: an org's enrolment tokens, for admins (``fleet enrol create/list/revoke``).

The token is in the answer that makes it, once, with the agent command line to copy.
"""

from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify

from fleet.config.enrolment import agent_command
from fleet.store import identity
from fleet.web import db
from fleet.web.auth import role_required
from fleet.web.changes import body, duration, field, json_errors

bp = json_errors(Blueprint("enrol", __name__, url_prefix="/api"))


@bp.get("/enrol")
@role_required("admin")
def tokens():
    """``{"data": [{"id", "uses", "used", "expires_at", "created_at", "revoked"}, …]}``, never a token."""
    return jsonify({"data": db.read(lambda conn: identity.list_tokens(conn, g.org))})


@bp.post("/enrol")
@role_required("admin")
def create():
    """Make a token ``{"uses", "expires"}`` (default 1 and ``24h``): ``{"org", "id", "token", "uses",
    "expires_at", "command"}``."""
    data = body()
    uses = field(data, "uses", int, 1)
    expires_s = duration(data, "expires", "24h")
    settings = current_app.config["FLEET_SETTINGS"]
    fingerprint = identity.installation_ca_fingerprint(settings.certs_dir)
    made = db.write(lambda conn: identity.create_token(conn, settings.data_dir, fingerprint, g.org, uses, expires_s,
                                                       actor=g.actor))
    command = agent_command(settings.agents_broker_url, g.org, str(made.token))
    return jsonify({**made.as_dict(), "command": command})


@bp.delete("/enrol/<token_id>")
@role_required("admin")
def revoke(token_id: str):
    """Revoke an enrolment token of the org: it enrols nothing more; 404 when there is none of that id."""
    db.write(lambda conn: identity.revoke_token(conn, g.org, token_id, actor=g.actor))
    return jsonify({"revoked": token_id})
