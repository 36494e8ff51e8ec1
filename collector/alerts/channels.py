"""An org's notification channels: add one (URL checked, webhook secret made) and send it a test.

The senders are ``fleet.collector.alerts.notify``; the stored form (URL and secret encrypted) is
``fleet.store.alerting``. The ``fleet alert channel`` commands are thin layers over these functions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet.collector.alerts import notify
from fleet.config.settings import Settings
from fleet.store import alerting
from fleet.store.alerting import Channel
from fleet.store.database import open_database

log = logging.getLogger("collector.alerts")
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class NewChannel:
    """What ``fleet alert channel add`` shows once: the webhook's signing secret (None for other kinds)."""

    org: str
    channel: str
    kind: str
    secret: str | None = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` object of SPEC: ``{"org", "channel", "secret"}``."""
        return {"org": self.org, "channel": self.channel, "secret": self.secret}


def add_channel(settings: Settings, org: str, name: str, url: str) -> NewChannel:
    """Check ``url``, make a webhook's secret, store the channel (encrypted); NotifyError/RuleError when invalid."""
    kind = notify.channel_kind(url)
    if kind == "email" and not settings.smtp_url:
        log.warning("channel %s/%s is email but FLEET_SMTP_URL is not set: deliveries will fail until it is",
                    org, name)
    secret = notify.new_secret(kind)
    alerting.store_channel(settings.data_dir, org, name, kind, url, secret, notify.redact(url), settings.database)
    log.info("alert channel %s/%s added (%s, %s)", org, name, kind, notify.redact(url))
    return NewChannel(org, name, kind, secret)


def group_key(org: str) -> str:
    """The group key of an org's notifications (the webhook's ``groupKey``)."""
    return f'{{}}:{{org="{org}"}}'


def send(settings: Settings, channel: Channel, notices: Sequence[notify.Notice], key: str) -> None:
    """Deliver one notification to a loaded channel; DeliveryError/NotifyError when it fails."""
    notify.deliver(channel.kind, channel.url, channel.secret, notices, key, smtp_url=settings.smtp_url or None,
                   timeout=TIMEOUT_S, receiver=channel.name)


def send_test(settings: Settings, org: str, name: str) -> None:
    """Send the one test notification to a channel and record the outcome; raises with the reason if it fails."""
    channel = alerting.get_channel(settings.data_dir, org, name, settings.database)
    error: str | None = None
    try:
        send(settings, channel, notify.test_notices(org, name), group_key(org))
    except notify.NotifyError as exc:
        error = str(exc) or type(exc).__name__
        raise
    finally:
        with open_database(settings.database) as db, db.transaction():
            alerting.record_delivery(db, org, name, time.time(), error)
        log.info("alert channel %s/%s test: %s", org, name, error or "delivered")
