"""Notification channels of alerts: webhook (signed), Prometheus Alertmanager, email (SMTP) and Apprise URLs.

The alerting side (rules, outbox, grouping, the delivery worker) calls only what is exported here. Each name is
imported from its module on first use, so a process that only catches ``NotifyError`` (every ``fleet`` command,
the agent among them) loads no sender and none of the HTTP, email and crypto modules they need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.notify.errors import DeliveryError, NotifyError
    from fleet.notify.kinds import channel_kind, deliver, new_secret, resend_interval
    from fleet.notify.mail import SmtpServer, parse_smtp_url
    from fleet.notify.notice import WATCHDOG_RULE, Notice, fingerprint, group_key, test_notices, watchdog_notices
    from fleet.notify.retry import RETRY_FOR_S, retry_delay
    from fleet.notify.urls import redact
    from fleet.notify.webhook import SIGNATURE_HEADER, signature, verify

_HOMES = {
    "errors": ("DeliveryError", "NotifyError"),
    "kinds": ("channel_kind", "deliver", "new_secret", "resend_interval"),
    "mail": ("SmtpServer", "parse_smtp_url"),
    "notice": ("WATCHDOG_RULE", "Notice", "fingerprint", "group_key", "test_notices", "watchdog_notices"),
    "retry": ("RETRY_FOR_S", "retry_delay"),
    "urls": ("redact",),
    "webhook": ("SIGNATURE_HEADER", "signature", "verify"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "RETRY_FOR_S", "SIGNATURE_HEADER", "DeliveryError", "Notice", "NotifyError", "SmtpServer", "channel_kind",
    "deliver", "fingerprint", "group_key", "new_secret", "parse_smtp_url", "redact", "resend_interval", "retry_delay",
    "signature", "test_notices", "verify", "WATCHDOG_RULE", "watchdog_notices",
]


def __getattr__(name: str) -> Any:
    """An exported name, imported from its module the first time it is used (PEP 562)."""
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'fleet.notify' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fleet.notify.{module}"), name)
    globals()[name] = value
    return value
