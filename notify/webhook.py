"""The webhook channel: Alertmanager's webhook JSON (version 4), signed with HMAC-SHA256 of the exact body."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Any

import orjson

from fleet.notify.errors import DeliveryError
from fleet.notify.http_post import post_json
from fleet.notify.notice import Notice, rfc3339
from fleet.notify.render import group_status

SIGNATURE_HEADER = "X-Fleet-Signature"
# The same for every attempt of one notification, from whichever collector: a receiver that has seen it drops it.
ID_HEADER = "Idempotency-Key"
VERSION = "4"


def _common(mappings: Sequence[dict[str, str]]) -> dict[str, str]:
    """The name/value pairs every mapping shares."""
    first, *others = mappings
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in others)}


def payload(notices: Sequence[Notice], group_key: str, *, receiver: str = "fleet",
            external_url: str = "") -> dict[str, Any]:
    """The notification as Alertmanager's webhook receiver gets it."""
    orgs = {n.org for n in notices}
    return {
        "version": VERSION,
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": group_status(notices),
        "receiver": receiver,
        "groupLabels": {"org": next(iter(orgs))} if len(orgs) == 1 else {},
        "commonLabels": _common([n.labels for n in notices]),
        "commonAnnotations": _common([n.annotations for n in notices]),
        "externalURL": external_url,
        "alerts": [{
            "status": n.status,
            "labels": n.labels,
            "annotations": n.annotations,
            "startsAt": rfc3339(n.starts_at),
            "endsAt": rfc3339(n.ends_at),
            "generatorURL": external_url,
            "fingerprint": n.fingerprint,
        } for n in notices],
    }


def signature(secret: str, body: bytes) -> str:
    """The X-Fleet-Signature value: ``sha256=`` and the hex HMAC-SHA256 of ``body`` keyed with the secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """True when ``header`` is the signature of ``body`` with ``secret`` (constant-time comparison)."""
    return header is not None and hmac.compare_digest(signature(secret, body).encode(), header.encode())


def send(url: str, secret: str | None, notices: Sequence[Notice], group_key: str, *, timeout: float,
         receiver: str = "fleet", external_url: str = "", notification_id: str = "") -> None:
    """POST the signed notification to the webhook URL."""
    if not secret:
        raise DeliveryError("webhook channel has no signing secret: remove and add it again", retryable=False)
    body = orjson.dumps(payload(notices, group_key, receiver=receiver, external_url=external_url))
    headers = {SIGNATURE_HEADER: signature(secret, body)}
    if notification_id:
        headers[ID_HEADER] = notification_id
    post_json(url, body, timeout, headers)
