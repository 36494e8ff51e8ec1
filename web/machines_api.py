"""Admins' actions on one machine: revoke its certificate, forget it (``fleet machine revoke``, ``forget``)."""

from __future__ import annotations

from flask import Blueprint, g, jsonify

from fleet.store import forgotten, identity
from fleet.web import db
from fleet.web.auth import role_required
from fleet.web.changes import json_errors

bp = json_errors(Blueprint("machines", __name__, url_prefix="/api"))


@bp.post("/fleet/<machine_id>/revoke")
@role_required("admin")
def revoke(machine_id: str):
    """Revoke the machine's certificate: the broker closes its connection and refuses it within 5 s."""
    db.write(lambda conn: identity.revoke_machine(conn, g.org, machine_id, actor=g.actor))
    return jsonify({"revoked": machine_id})


@bp.delete("/fleet/<machine_id>")
@role_required("admin")
def forget(machine_id: str):
    """Forget the machine: gone from the live view now (the collector's within its refresh), history kept."""
    db.write(lambda conn: forgotten.forget_machine(conn, g.org, machine_id, actor=g.actor))
    return jsonify({"deleted": machine_id})
