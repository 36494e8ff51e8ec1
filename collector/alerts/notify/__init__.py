"""Notification channels of alerts: webhook (signed), Prometheus Alertmanager, email (SMTP) and Apprise URLs.

The alerting side (rules, outbox, grouping, the delivery worker) calls only what is exported here.
"""

from fleet.collector.notify.channels import channel_kind, deliver, new_secret, resend_interval
from fleet.collector.notify.errors import DeliveryError, NotifyError
from fleet.collector.notify.mail import SmtpServer, parse_smtp_url
from fleet.collector.notify.notice import Notice, fingerprint, test_notices
from fleet.collector.notify.retry import RETRY_FOR_S, retry_delay
from fleet.collector.notify.urls import redact
from fleet.collector.notify.webhook import SIGNATURE_HEADER, signature, verify

__all__ = [
    "RETRY_FOR_S", "SIGNATURE_HEADER", "DeliveryError", "Notice", "NotifyError", "SmtpServer", "channel_kind",
    "deliver", "fingerprint", "new_secret", "parse_smtp_url", "redact", "resend_interval", "retry_delay",
    "signature", "test_notices", "verify",
]
