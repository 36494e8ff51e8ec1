"""``GET /``: the dashboard page (its data comes from the API, as a reader key or a signed-in person), and
``GET /api/people``: the people of an org and their roles, for its admins' People panel."""

from __future__ import annotations

from flask import Blueprint, g, jsonify, render_template

from fleet.store import people
from fleet.web import db
from fleet.web.auth import role_required

bp = Blueprint("dashboard", __name__)


@bp.get("/")
def index():
    """The single-page dashboard; static JS renders everything with textContent."""
    return render_template("index.html")


@bp.get("/api/people")
@role_required("admin")
def org_people():
    """``{"data": [{"email", "role", "password"}]}``: who holds a role in the org (password: whether one is set)."""
    return jsonify({"data": db.read(lambda conn: people.people_in_org(conn, g.org))})
