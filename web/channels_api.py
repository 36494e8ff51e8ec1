"""``/api/channels``: an org's notification channels, for admins (``fleet alert channel …``).

A webhook's signing secret is in the answer that adds it, once; lists never show a secret or a full URL.
"""

from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify

from fleet.notify.channels import add_channel, send_test
from fleet.notify.errors import NotifyError
from fleet.store import alerting
from fleet.web import db
from fleet.web.auth import role_required
from fleet.web.changes import body, field, json_errors

bp = json_errors(Blueprint("channels", __name__, url_prefix="/api"))
TEST_FAILED = 502  # the channel's receiver failed or refused: a bad gateway, with the reason


@bp.get("/channels")
@role_required("admin")
def channels():
    """``{"data": [channel, …]}``: each channel's kind, target, last delivery and last error (never a secret)."""
    found = db.read(lambda conn: alerting.list_channels(conn, g.org))
    return jsonify({"data": [channel.as_dict() for channel in found]})


@bp.post("/channels")
@role_required("admin")
def create():
    """Add a channel ``{"name", "url", "watchdog"}``: ``{"org", "channel", "kind", "secret"}`` (shown once)."""
    data = body()
    name = field(data, "name", str, None) or field(data, "channel", str)
    added = add_channel(current_app.config["FLEET_SETTINGS"], g.org, name, field(data, "url", str),
                        field(data, "watchdog", bool, False), actor=g.actor)
    return jsonify({**added.as_dict(), "kind": added.kind})


@bp.delete("/channels/<name>")
@role_required("admin")
def remove(name: str):
    """Remove a channel of the org with what was waiting to be sent to it; 404 when there is none."""
    db.write(lambda conn: alerting.remove_channel(conn, g.org, name, actor=g.actor))
    return jsonify({"deleted": name})


@bp.post("/channels/<name>/test")
@role_required("admin")
def test(name: str):
    """Send one test notification: ``{"channel", "delivered": true}``, or 502 with the reason it failed."""
    try:
        send_test(current_app.config["FLEET_SETTINGS"], g.org, name, actor=g.actor)
    except NotifyError as exc:
        response = jsonify({"error": str(exc) or type(exc).__name__, "status": TEST_FAILED, "channel": name,
                            "delivered": False})
        response.status_code = TEST_FAILED
        return response
    return jsonify({"channel": name, "delivered": True})
