"""The Alertmanager channel: alerts POSTed to its /api/v2/alerts, firing ones re-sent so they never go stale."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson

from fleet.notify.http_post import post_json
from fleet.notify.notice import Notice, rfc3339

RESEND_INTERVAL_S = 60.0
# Like Prometheus: a firing alert claims to last 4 resend intervals, so a collector that dies leaves
# its alerts to resolve by themselves, while a living one re-sends them long before.
FIRING_VALID_FOR_S = 4 * RESEND_INTERVAL_S
API_PATH = "/api/v2/alerts"


def endpoint(url: str) -> str:
    """``alertmanager+http(s)://HOST:PORT[/prefix]`` as the http(s) URL of its alerts API."""
    scheme, _, rest = url.partition("+")[2].partition("://")
    return f"{scheme}://{rest.rstrip('/')}{API_PATH}"


def alerts(notices: Sequence[Notice], now: float, external_url: str = "") -> list[dict[str, Any]]:
    """The alerts as Alertmanager's API takes them; firing ones end in FIRING_VALID_FOR_S unless re-sent."""
    posted = []
    for notice in notices:
        ends_at = notice.ends_at if notice.ends_at is not None else max(now, notice.starts_at) + FIRING_VALID_FOR_S
        alert: dict[str, Any] = {"labels": notice.labels, "annotations": notice.annotations,
                                 "startsAt": rfc3339(notice.starts_at), "endsAt": rfc3339(ends_at)}
        if external_url:
            alert["generatorURL"] = external_url
        posted.append(alert)
    return posted


def send(url: str, notices: Sequence[Notice], *, timeout: float, external_url: str = "") -> None:
    """POST the alerts to the Alertmanager."""
    post_json(endpoint(url), orjson.dumps(alerts(notices, time.time(), external_url)), timeout)
