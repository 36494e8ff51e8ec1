"""Notification channels of alerts: webhook (signed), Prometheus Alertmanager, email (SMTP) and Apprise URLs.

The alerting side (rules, outbox, grouping, the delivery worker) calls only what is exported here.
"""

from fleet.notify.errors import DeliveryError, NotifyError
from fleet.notify.kinds import channel_kind, deliver, new_secret, resend_interval
from fleet.notify.mail import SmtpServer, parse_smtp_url
from fleet.notify.notice import (
    WATCHDOG_RULE,
    Notice,
    fingerprint,
    group_key,
    test_notices,
    watchdog_notices,
)
from fleet.notify.retry import RETRY_FOR_S, retry_delay
from fleet.notify.urls import redact
from fleet.notify.webhook import SIGNATURE_HEADER, signature, verify

__all__ = [
    "RETRY_FOR_S", "SIGNATURE_HEADER", "DeliveryError", "Notice", "NotifyError", "SmtpServer", "channel_kind",
    "deliver", "fingerprint", "group_key", "new_secret", "parse_smtp_url", "redact", "resend_interval", "retry_delay",
    "signature", "test_notices", "verify", "WATCHDOG_RULE", "watchdog_notices",
]
