"""``GET /api/config``: what the dashboard and clients need to know, without authentication."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from fleet.config.topics import PING_TEMPLATE, REPORT_TEMPLATE

bp = Blueprint("config", __name__)
API_VERSION = 1


@bp.get("/api/config")
def config():
    """TTL, refresh interval, API version, features and the broker URL with topic templates."""
    settings = current_app.config["FLEET_SETTINGS"]
    return jsonify({
        "FLEET_TTL_SECONDS": settings.ttl_seconds,
        "REFRESH_INTERVAL_MS": settings.refresh_interval_ms,
        "API_VERSION": API_VERSION,
        "FEATURES": {"history": True, "events": True, "metrics": True, "clock_skew": True, "conflicts": True,
                     "pagination": True, "custom_metrics": True, "processes": True, "lost_reports": True,
                     "alerts": True, "labels": True, "accounts": True, "oidc": settings.oidc_enabled},
        "MQTT": {"url": settings.effective_broker_url,
                 "topics": {"report": REPORT_TEMPLATE, "ping": PING_TEMPLATE}},
    })
