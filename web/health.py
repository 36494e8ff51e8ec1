"""``GET /healthz``: broker, collector and database, each "ok" or a reason; 503 when one is down.

``disk``, how full the file system holding the collector's data dir is (from its heartbeat), is a warning
only: a nearly full disk does not stop any part from answering, so it never turns the answer into a 503.
``collectors`` and ``collector_active`` say which collector processes run and which one holds the lease.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from flask import Blueprint, current_app, jsonify

from fleet.config.mqtt import BrokerAddress
from fleet.config.status import BROKER_CONNECTED, COLLECTOR, DATA_DISK_PERCENT, DISK_FULL_PERCENT
from fleet.store import lease
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


Heartbeat = tuple[float, dict[str, Any]] | None


def collector_heartbeat() -> Heartbeat | str:
    """The collector's last heartbeat, or why it cannot be read."""
    try:
        return db.heartbeat(COLLECTOR)
    except db.DatabaseUnavailable:
        return "unknown: database unavailable"


def check_collector(beat: Heartbeat | str) -> str:
    """Has the collector written its heartbeat recently?"""
    if isinstance(beat, str):
        return beat
    if beat is None:
        return "no heartbeat yet"
    age = time.time() - beat[0]
    if age > COLLECTOR_STALE_S:
        return f"no heartbeat for {age:.0f} s"
    if beat[1].get(BROKER_CONNECTED) is False:
        return "running, but not connected to the broker"
    return "ok"


def check_disk(beat: Heartbeat | str) -> str:
    """Is the file system holding the collector's data dir under DISK_FULL_PERCENT, by its last heartbeat?"""
    percent = beat[1].get(DATA_DISK_PERCENT) if isinstance(beat, tuple) else None
    if not isinstance(percent, (int, float)) or isinstance(percent, bool):
        return "unknown: no figure from the collector"
    if percent > DISK_FULL_PERCENT:
        return f"warning: the collector's data dir is on a file system {percent:g}% full (over {DISK_FULL_PERCENT:g}%)"
    return "ok"


def check_broker() -> str:
    """Does the broker accept TCP connections?"""
    address = BrokerAddress.parse(current_app.config["FLEET_SETTINGS"].effective_broker_url)
    try:
        with socket.create_connection((address.host, address.port), timeout=BROKER_TIMEOUT_S):
            return "ok"
    except OSError as exc:
        return f"unreachable at {address.host}:{address.port}: {exc.strerror or exc}"


def collector_instances() -> list[dict[str, Any]]:
    """Every collector process, active or waiting, as ``{"instance", "shard", "active"}``; [] when unreadable."""
    try:
        return [{"instance": c.instance, "shard": c.shard, "active": c.active} for c in db.read(lease.collectors)]
    except db.DatabaseUnavailable:
        return []


@bp.get("/healthz")
def healthz():
    """200 when broker, collector and database are ok, else 503 with the reasons; ``disk`` only warns.

    ``collectors`` lists the collector processes and which is active; informative, like ``disk``.
    """
    beat = collector_heartbeat()
    result: dict[str, Any] = {"broker": check_broker(), "collector": check_collector(beat),
                              "database": check_database()}
    healthy = all(value == "ok" for value in result.values())
    result["disk"] = check_disk(beat)
    instances = collector_instances()
    result["collectors"] = instances
    result["collector_active"] = next((c["instance"] for c in instances if c["active"]), None)
    return jsonify(result), 200 if healthy else 503
