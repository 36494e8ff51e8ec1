"""The org-scoped JSON API: machines, one machine, its history and inventory, and status events."""

from __future__ import annotations

import json
import math
import time

from flask import Blueprint, Response, abort, g, jsonify

from fleet.config.ids import is_valid_id
from fleet.config.status import MACHINE_STATUSES
from fleet.web import db, params
from fleet.web.auth import org_required

bp = Blueprint("api", __name__, url_prefix="/api")
MAX_HISTORY_POINTS = 2000
DEFAULT_HISTORY_S = 3600.0


@bp.get("/fleet")
@org_required
def fleet():
    """``{"count", "expired", "data"}`` for the caller's org, with optional filters and pages."""
    status = params.choice("status", MACHINE_STATUSES)
    os_name = params.text("os")
    search = params.text("q")
    sort = params.choice("sort", db.SORTS, "machine_id")
    order = params.choice("order", ("asc", "desc"), "asc")
    limit = params.integer("limit", None, 1, 10_000)
    offset = params.integer("offset", 0, 0, 10**9)
    selector = params.selector()
    group = params.label_key("group")
    total, machines_json = db.list_machines_json(g.org, status, os_name, search, sort, order == "desc", limit,
                                                 offset, selector, group)
    counts = db.status_counts(g.org)
    fields = {"org": g.org, "count": total, "expired": counts["expired"], "counts": counts,
              "os_values": db.os_values(g.org), "server_time": time.time()}
    if group is not None:
        fields["groups"] = db.group_counts(g.org, group, status, os_name, search, selector)
    head = json.dumps(fields)
    # The machines array is already JSON (web/db.py); splice it in rather than decode and re-encode it.
    return Response(head[:-1].encode() + b', "data": ' + machines_json + b"}", mimetype="application/json")


def _machine_or_404(machine_id: str) -> dict:
    machine = db.get_machine(g.org, machine_id) if is_valid_id(machine_id) else None
    if machine is None:
        abort(404, description=f"no machine {machine_id[:64]!r}")
    return machine


@bp.get("/fleet/<machine_id>")
@org_required
def machine(machine_id: str):
    """One machine with its latest metrics and system info (404 for unknown or another org's)."""
    return jsonify(_machine_or_404(machine_id))


@bp.get("/fleet/<machine_id>/history")
@org_required
def history(machine_id: str):
    """``{"machine_id", "points"}`` from ``since`` (default: an hour ago) to ``until`` (default: no end), oldest first.

    Without ``until`` there is no upper bound: a client polling with ``since=<last ts>`` gets the points
    after it (none yet is an empty list, not an error), even when the agent's clock runs ahead of ours.
    """
    _machine_or_404(machine_id)
    until = params.number("until", math.inf)
    since = params.number("since", min(until, time.time()) - DEFAULT_HISTORY_S)
    if since > until:
        abort(400, description="'since' must not be after 'until'")
    points = db.history(g.org, machine_id, since, until, MAX_HISTORY_POINTS)
    return jsonify({"machine_id": machine_id, "points": points})


@bp.get("/fleet/<machine_id>/inventory")
@org_required
def inventory(machine_id: str):
    """``{"machine_id", "data"}``: the machine's system inventory as first reported and at each change, oldest first."""
    _machine_or_404(machine_id)
    return jsonify({"machine_id": machine_id, "data": db.inventory(g.org, machine_id)})


@bp.get("/labels")
@org_required
def labels():
    """``{"KEY": {"VALUE": count}}``: how many of the org's machines carry each label."""
    return jsonify(db.label_counts(g.org))


@bp.get("/events")
@org_required
def events():
    """Status transitions of the org since ``since`` (optionally of one ``machine``), oldest first."""
    since = params.number("since", 0.0)
    machine_id = params.text("machine", 64)
    limit = params.integer("limit", 1000, 1, 10_000)
    return jsonify({"events": db.events(g.org, since, machine_id, limit)})
