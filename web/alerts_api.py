"""``GET /api/alerts`` and ``GET /api/silences``: an org's alerts (with whether a silence covers them) and silences."""

from __future__ import annotations

import time

from flask import Blueprint, abort, g, jsonify

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


@bp.get("/alerts/<int:alert_id>")
@org_required
def alert(alert_id: int):
    """One alert of the caller's org; 404 for an unknown id or another org's alert (not told apart)."""
    found = db.alerts(g.org, None, 0.0, None, 1, time.time(), alert_id=alert_id)
    if not found:
        abort(404, description=f"no alert {alert_id}")
    return jsonify(found[0])


@bp.get("/silences")
@org_required
def silences():
    """``{"data": [silence, …]}``: the org's silences in force now or later."""
    return jsonify({"data": [s.as_dict() for s in db.silences(g.org, time.time())]})
