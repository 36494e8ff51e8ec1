"""The channel kinds: which kind a URL is, its signing secret, how a notification is delivered and re-sent."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence

from fleet.notify import alertmanager, apprise_channel, mail, render, webhook
from fleet.notify.errors import DeliveryError, NotifyError
from fleet.notify.notice import Notice
from fleet.notify.urls import Parts, mail_recipients, redact, scheme_of, split

log = logging.getLogger(__name__)

KINDS = ("webhook", "alertmanager", "email", "apprise")
SECRET_BYTES = 32  # 256 bits
_USAGE = ("expected http(s)://… (webhook), alertmanager+http(s)://HOST:PORT, mailto:ADDR "
          "or an Apprise URL such as slack://…")


def _need_host(url: str, parts: Parts | None, kind: str) -> Parts:
    if parts is None or not parts.host:
        raise NotifyError(f"{kind} URL needs a host: {redact(url)}")
    if parts.port_text and parts.port is None:
        raise NotifyError(f"{kind} URL has a bad port: {redact(url)}")
    return parts


def channel_kind(url: str) -> str:
    """"webhook", "alertmanager", "email" or "apprise" for a channel URL; NotifyError (one line) if unusable."""
    if not isinstance(url, str) or not url.strip():
        raise NotifyError(f"channel URL is empty: {_USAGE}")
    if any(c.isspace() for c in url):
        raise NotifyError(f"channel URL must not contain spaces: {redact(url)}")
    found = scheme_of(url)
    if not found:
        raise NotifyError(f"not a channel URL: {_USAGE}")
    scheme, parts = found[0], split(url)
    if scheme in ("http", "https"):
        _need_host(url, parts, "webhook")
        return "webhook"
    if scheme in ("alertmanager+http", "alertmanager+https"):
        parts = _need_host(url, parts, "alertmanager")
        if parts.port is None:
            raise NotifyError(f"alertmanager URL needs HOST:PORT (Alertmanager listens on 9093): {redact(url)}")
        if "?" in parts.rest or "#" in parts.rest:
            raise NotifyError(f"alertmanager URL takes no query or fragment: {redact(url)}")
        return "alertmanager"
    if scheme.startswith("alertmanager"):
        raise NotifyError("Alertmanager channel URL is alertmanager+http://HOST:PORT or alertmanager+https://HOST:PORT")
    if scheme == "mailto" and parts is None:
        mail_recipients(url)
        return "email"
    if parts is None:
        raise NotifyError(f"unsupported channel URL {redact(url)}: {_USAGE}")
    apprise_channel.validate(url)
    return "apprise"


def new_secret(kind: str) -> str | None:
    """A new signing secret for a webhook channel (256 random bits, URL-safe text); None for other kinds."""
    if kind not in KINDS:
        raise NotifyError(f"unknown channel kind {kind!r}: one of {', '.join(KINDS)}")
    return secrets.token_urlsafe(SECRET_BYTES) if kind == "webhook" else None


def resend_interval(kind: str) -> float | None:
    """Seconds between re-sends of a still-firing alert: Alertmanager forgets alerts not re-sent; others None."""
    return alertmanager.RESEND_INTERVAL_S if kind == "alertmanager" else None


def deliver(kind: str, url: str, secret: str | None, notices: Sequence[Notice], group_key: str, *,
            smtp_url: str | None, timeout: float = 10.0, receiver: str = "fleet", external_url: str = "",
            notification_id: str = "") -> None:
    """Send one notification listing ``notices`` to the channel; DeliveryError says whether to retry.

    ``receiver`` (the channel's name) and ``external_url`` (the dashboard) fill the webhook fields of the same
    names; ``notification_id`` is the same for every attempt of one notification (a webhook's Idempotency-Key).
    Nothing is sent for an empty ``notices``.
    """
    if not notices:
        return
    try:
        _send(kind, url, secret, notices, group_key, smtp_url=smtp_url, timeout=timeout, receiver=receiver,
              external_url=external_url, notification_id=notification_id)
    except DeliveryError:
        raise
    except NotifyError as exc:  # a channel that cannot work: no retry will fix it
        raise DeliveryError(str(exc), retryable=False) from None
    log.debug("notify: %d notice(s) of group %s sent to %s %s", len(notices), group_key, kind, redact(url))


def _send(kind: str, url: str, secret: str | None, notices: Sequence[Notice], group_key: str, *,
          smtp_url: str | None, timeout: float, receiver: str, external_url: str, notification_id: str) -> None:
    if kind == "webhook":
        webhook.send(url, secret, notices, group_key, timeout=timeout, receiver=receiver, external_url=external_url,
                     notification_id=notification_id)
    elif kind == "alertmanager":
        alertmanager.send(url, notices, timeout=timeout, external_url=external_url)
    elif kind == "email":
        mail.send(url, notices, group_key, smtp_url=smtp_url, timeout=timeout)
    elif kind == "apprise":
        status = render.group_status(notices)
        severity = "critical" if any(n.severity == "critical" for n in notices if n.status == status) else "warning"
        apprise_channel.send(url, render.subject(notices), render.body(notices, group_key, render.MAX_CHAT_ALERTS),
                             status=status, severity=severity, timeout=timeout)
    else:
        raise DeliveryError(f"unknown channel kind {kind!r} for {redact(url)}", retryable=False)
