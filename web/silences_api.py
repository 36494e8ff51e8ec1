"""``/api/silences``: an org's silences; operators create and end them (``fleet alert silences/silence/unsilence``)."""

from __future__ import annotations

import time

from flask import Blueprint, g, jsonify

from fleet.store import alerting
from fleet.web import db
from fleet.web.auth import org_required, role_required
from fleet.web.changes import body, duration, field, json_errors

bp = json_errors(Blueprint("silences", __name__, url_prefix="/api"))


@bp.get("/silences")
@org_required
def silences():
    """``{"data": [silence, …]}``: the org's silences in force now or later."""
    return jsonify({"data": [s.as_dict() for s in db.silences(g.org, time.time())]})


@bp.post("/silences")
@role_required("operator")
def create():
    """Silence the org's alerts matching ``machines`` (and ``rule``) ``for`` a while: ``{"id", "ends_at"}``."""
    data = body()
    for_s = duration(data, "for")
    silence = db.write(lambda conn: alerting.add_silence(
        conn, g.org, for_s, field(data, "machines", str, "*"), field(data, "rule", str, None),
        field(data, "comment", str, ""), actor=g.actor))
    return jsonify({"id": silence.id, "ends_at": silence.ends_at})


@bp.delete("/silences/<int:silence_id>")
@role_required("operator")
def end(silence_id: int):
    """End a silence of the org now; 404 for an unknown id or another org's."""
    db.write(lambda conn: alerting.expire_silence(conn, g.org, silence_id, actor=g.actor))
    return jsonify({"deleted": silence_id})
