"""``GET /api/alerts`` and ``GET /api/silences``: an org's alerts (with whether a silence covers them) and silences."""

from __future__ import annotations

import time

from flask import Blueprint, g, jsonify

from fleet.web import db, params
from fleet.web.auth import org_required

bp = Blueprint("alerts", __name__, url_prefix="/api")
STATES = ("pending", "firing", "resolved")


@bp.get("/alerts")
@org_required
def alerts():
    """``{"data": [alert, …]}`` of the caller's org: live alerts, and those resolved since ``since`` (default: all)."""
    state = params.choice("state", STATES)
    since = params.number("since", 0.0)
    machine_id = params.text("machine", 64)
    limit = params.integer("limit", 1000, 1, 10_000)
    return jsonify({"data": db.alerts(g.org, state, since, machine_id, limit, time.time())})


@bp.get("/silences")
@org_required
def silences():
    """``{"data": [silence, …]}``: the org's silences in force now or later."""
    return jsonify({"data": [s.as_dict() for s in db.silences(g.org, time.time())]})
