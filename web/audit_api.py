"""``GET /api/audit``: an org's audit log, for its admins."""

from __future__ import annotations

from flask import Blueprint, g, jsonify

from fleet.store import audit
from fleet.web import db, params
from fleet.web.auth import role_required

bp = Blueprint("audit", __name__, url_prefix="/api")


@bp.get("/audit")
@role_required("admin")
def entries():
    """``{"data": [{"ts", "actor", "action", "target", "detail"}]}`` from ``since`` (default: all), oldest first."""
    since = params.number("since", float("-inf"))
    return jsonify({"data": db.read(lambda conn: audit.entries(conn, g.org, since))})
