"""``GET /healthz``: broker, collector and database, each "ok" or a reason; 503 when one is down."""

from __future__ import annotations

import socket
import time

from flask import Blueprint, current_app, jsonify

from fleet.config.mqtt import BrokerAddress
from fleet.config.status import BROKER_CONNECTED, COLLECTOR
from fleet.web import db

bp = Blueprint("health", __name__)
COLLECTOR_STALE_S = 10.0
BROKER_TIMEOUT_S = 1.0


def check_database() -> str:
    """Can fleet.db be opened and queried?"""
    try:
        db.query("SELECT count(*) FROM machines")
        return "ok"
    except db.DatabaseUnavailable as exc:
        return str(exc)


def check_collector() -> str:
    """Has the collector written its heartbeat recently?"""
    try:
        beat = db.heartbeat(COLLECTOR)
    except db.DatabaseUnavailable:
        return "unknown: database unavailable"
    if beat is None:
        return "no heartbeat yet"
    age = time.time() - beat[0]
    if age > COLLECTOR_STALE_S:
        return f"no heartbeat for {age:.0f} s"
    if beat[1].get(BROKER_CONNECTED) is False:
        return "running, but not connected to the broker"
    return "ok"


def check_broker() -> str:
    """Does the broker accept TCP connections?"""
    address = BrokerAddress.parse(current_app.config["FLEET_SETTINGS"].effective_broker_url)
    try:
        with socket.create_connection((address.host, address.port), timeout=BROKER_TIMEOUT_S):
            return "ok"
    except OSError as exc:
        return f"unreachable at {address.host}:{address.port}: {exc.strerror or exc}"


@bp.get("/healthz")
def healthz():
    """200 when everything is ok, else 503 with the reasons."""
    result = {"broker": check_broker(), "collector": check_collector(), "database": check_database()}
    healthy = all(value == "ok" for value in result.values())
    return jsonify(result), 200 if healthy else 503
