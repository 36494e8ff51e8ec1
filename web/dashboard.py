"""``GET /``: the dashboard page (its data comes from the API, as a signed-in person or with a reader key)."""

from __future__ import annotations

from flask import Blueprint, render_template

bp = Blueprint("dashboard", __name__)


@bp.get("/")
def index():
    """The single-page dashboard; static JS renders everything with textContent."""
    return render_template("index.html")
