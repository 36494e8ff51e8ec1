"""Channel administration for the ``fleet alert channel`` commands: add one (URL checked, secret made), test one.

The senders are ``fleet.collector.alerts.notify``; the stored form (URL and secret encrypted) is
``fleet.store.alerting``. Nothing in the engine or the delivery worker imports this module.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fleet.collector.alerts import notify
from fleet.collector.alerts.delivery import send
from fleet.config.settings import Settings
from fleet.store import alerting
from fleet.store.database import open_database
from fleet.store.secretbox import secret_box

log = logging.getLogger("fleet.collector.alerts")


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


def add_channel(settings: Settings, org: str, name: str, url: str, watchdog: bool = False) -> NewChannel:
    """Check ``url``, make a webhook's secret, store the channel (encrypted); NotifyError/RuleError when invalid.

    ``watchdog``: the channel also gets the always-firing FleetWatchdog alert (webhook and Alertmanager only).
    """
    kind = notify.channel_kind(url)
    if watchdog and kind not in WATCHDOG_KINDS:
        raise notify.NotifyError(f"--watchdog is for webhook and Alertmanager channels, not {kind}")
    if kind == "email" and not settings.smtp_url:
        log.warning("channel %s/%s is email but FLEET_SMTP_URL is not set: deliveries will fail until it is",
                    org, name)
    secret = notify.new_secret(kind)
    with open_database(settings.database) as db:
        alerting.store_channel(db, secret_box(settings.data_dir), org, name, kind, url, secret, notify.redact(url),
                               watchdog)
    log.info("alert channel %s/%s added (%s, %s%s)", org, name, kind, notify.redact(url),
             ", watchdog" if watchdog else "")
    return NewChannel(org, name, kind, secret)


def send_test(settings: Settings, org: str, name: str) -> None:
    """Send the one test notification to a channel and record the outcome; raises with the reason if it fails."""
    with open_database(settings.database) as db:
        channel = alerting.get_channel(db, secret_box(settings.data_dir, create=False), org, name)
        error: str | None = None
        try:
            send(settings, channel, notify.test_notices(org, name), notify.group_key(org))
        except notify.NotifyError as exc:
            error = str(exc) or type(exc).__name__
            raise
        finally:
            with db.transaction():
                alerting.record_delivery(db, org, name, time.time(), error)
            log.info("alert channel %s/%s test: %s", org, name, error or "delivered")
