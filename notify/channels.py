"""Channel administration for ``fleet alert channel`` and ``/api/channels``: add one (URL checked, secret made),
send to a loaded channel, test one.

The senders are ``fleet.notify``'s kinds; the stored form (URL and secret encrypted) is ``fleet.store.alerting``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet.config.settings import Settings
from fleet.notify.errors import NotifyError
from fleet.notify.kinds import channel_kind, deliver, new_secret
from fleet.notify.notice import Notice, group_key, test_notices
from fleet.notify.urls import redact
from fleet.store import alerting
from fleet.store.database import open_database
from fleet.store.secretbox import secret_box

log = logging.getLogger("fleet.collector.alerts")
SEND_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class NewChannel:
    """What ``fleet alert channel add`` shows once: the webhook's signing secret (None for other kinds)."""

    org: str
    channel: str
    kind: str
    secret: str | None = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The ``fleet alert channel add --json`` object: ``{"org", "channel", "secret"}``."""
        return {"org": self.org, "channel": self.channel, "secret": self.secret}


WATCHDOG_KINDS = ("webhook", "alertmanager")


def send(settings: Settings, channel: alerting.Channel, notices: Sequence[Notice], key: str,
         notification_id: str = "") -> None:
    """Deliver one notification to a loaded channel; DeliveryError/NotifyError when it fails."""
    deliver(channel.kind, channel.url, channel.secret, notices, key, smtp_url=settings.smtp_url or None,
            timeout=SEND_TIMEOUT_S, receiver=channel.name, notification_id=notification_id)


def add_channel(settings: Settings, org: str, name: str, url: str, watchdog: bool = False,
                actor: str | None = None) -> NewChannel:
    """Check ``url``, make a webhook's secret, store the channel (encrypted); NotifyError/RuleError when invalid.

    ``watchdog``: the channel also gets the always-firing FleetWatchdog alert (webhook and Alertmanager only).
    """
    kind = channel_kind(url)
    if watchdog and kind not in WATCHDOG_KINDS:
        raise NotifyError(f"--watchdog is for webhook and Alertmanager channels, not {kind}")
    if kind == "email" and not settings.smtp_url:
        log.warning("channel %s/%s is email but FLEET_SMTP_URL is not set: deliveries will fail until it is",
                    org, name)
    secret = new_secret(kind)
    with open_database(settings.database) as db:
        alerting.store_channel(db, secret_box(settings.data_dir), org, name, kind, url, secret, redact(url),
                               watchdog, actor=actor)
    log.info("alert channel %s/%s added (%s, %s%s)", org, name, kind, redact(url),
             ", watchdog" if watchdog else "")
    return NewChannel(org, name, kind, secret)


def send_test(settings: Settings, org: str, name: str, actor: str | None = None) -> None:
    """Send the one test notification to a channel and record the outcome; raises with the reason if it fails."""
    with open_database(settings.database) as db:
        channel = alerting.get_channel(db, secret_box(settings.data_dir, create=False), org, name)
        error: str | None = None
        try:
            send(settings, channel, test_notices(org, name), group_key(org))
        except NotifyError as exc:
            error = str(exc) or type(exc).__name__
            raise
        finally:
            with db.transaction():
                alerting.record_delivery(db, org, name, time.time(), error, actor=actor)
            log.info("alert channel %s/%s test: %s", org, name, error or "delivered")
