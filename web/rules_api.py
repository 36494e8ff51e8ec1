"""``/api/rules``: an org's alert rules; admins add and remove them (``fleet alert list/add/remove``)."""

from __future__ import annotations

from flask import Blueprint, g, jsonify

from fleet.config.rules import Rule
from fleet.store import alerting
from fleet.web import db
from fleet.web.auth import org_required, role_required
from fleet.web.changes import body, field, json_errors

bp = json_errors(Blueprint("rules", __name__, url_prefix="/api"))


@bp.get("/rules")
@org_required
def rules():
    """``{"data": [{"name", "when", "for_s", "machines", "severity"}, …]}``: the org's rules by name."""
    return jsonify({"data": [rule.as_dict() for rule in db.read(lambda conn: alerting.list_rules(conn, g.org))]})


@bp.post("/rules")
@role_required("admin")
def create():
    """Add a rule: ``{"name", "when", "for", "machines", "severity"}`` (the last three optional); the rule as listed."""
    data = body()
    rule = Rule.parse(g.org, field(data, "name", str), field(data, "when", str), field(data, "for", str, "0s"),
                      field(data, "machines", str, "*"), field(data, "severity", str, "warning"))
    db.write(lambda conn: alerting.add_rule(conn, rule, actor=g.actor))
    return jsonify(rule.as_dict())


@bp.delete("/rules/<name>")
@role_required("admin")
def remove(name: str):
    """Remove a rule of the org (its alerts resolve); 404 when the org has none of that name."""
    db.write(lambda conn: alerting.remove_rule(conn, g.org, name, actor=g.actor))
    return jsonify({"deleted": name})
