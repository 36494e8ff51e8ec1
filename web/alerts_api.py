"""``/api/alerts``: an org's alerts (with whether a silence covers them and who acknowledged them); operators
acknowledge firing ones."""

from __future__ import annotations

import time

from flask import Blueprint, abort, g, jsonify

from fleet.store import alerting
from fleet.web import db, params
from fleet.web.auth import org_required, role_required
from fleet.web.changes import json_errors

bp = json_errors(Blueprint("alerts", __name__, url_prefix="/api"))
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
    return jsonify(_alert_or_404(alert_id))


def _alert_or_404(alert_id: int) -> dict:
    found = db.alerts(g.org, None, 0.0, None, 1, time.time(), alert_id=alert_id)
    if not found:
        abort(404, description=f"no alert {alert_id}")
    return found[0]


@bp.post("/alerts/<int:alert_id>/ack")
@role_required("operator")
def ack(alert_id: int):
    """Acknowledge a firing alert of the org as the caller (it keeps firing); the alert as ``GET`` shows it.

    404 for an unknown id or another org's, 409 when the alert is not firing; the first acknowledgement stands.
    """
    by = g.person.email if g.person is not None else g.actor
    db.write(lambda conn: alerting.ack_alert(conn, g.org, alert_id, by, actor=g.actor))
    return jsonify(_alert_or_404(alert_id))
