"""Apprise channels (slack://, tgram://, discord://, ntfys://, json://, …) through the optional apprise package.

Apprise and the HTTP libraries under it log URLs that carry tokens (at DEBUG); a filter on their loggers
replaces the secret pieces of the URLs being used with ``***`` before any handler sees a record.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from fleet.notify.errors import DeliveryError, NotifyError
from fleet.notify.urls import HIDDEN, redact, scheme_of, secret_parts

INSTALL_HINT = "pip install 'fleet-telemetry[notify]'"
# Loggers that may print an Apprise URL's tokens; each gets the scrubbing filter.
SCRUBBED_LOGGERS = ("apprise", "urllib3.connectionpool", "urllib3.util.retry", "requests")
_STATUS = re.compile(r"\b(?:error|status|code|http)\s*[=:]?\s*([1-5]\d\d)\b", re.IGNORECASE)
MAX_REASON_CHARS = 200


class _Scrubber(logging.Filter):
    """Replaces the registered secret pieces in log records (message, arguments, exception text)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._pieces: Counter[str] = Counter()
        self._ordered: tuple[str, ...] = ()

    @contextmanager
    def hiding(self, pieces: Sequence[str]) -> Iterator[None]:
        """Scrub ``pieces`` from every record logged while the block runs."""
        with self._lock:
            self._pieces.update(pieces)
            self._ordered = tuple(sorted(self._pieces, key=len, reverse=True))
        try:
            yield
        finally:
            with self._lock:
                self._pieces.subtract(pieces)
                self._pieces = +self._pieces
                self._ordered = tuple(sorted(self._pieces, key=len, reverse=True))

    def scrub(self, text: str) -> str:
        """``text`` with every registered piece replaced by ***."""
        for piece in self._ordered:
            text = text.replace(piece, HIDDEN)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._ordered:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is the logging module's to report
            return True
        record.msg, record.args = self.scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        return True


SCRUBBER = _Scrubber()
for _name in SCRUBBED_LOGGERS:
    logging.getLogger(_name).addFilter(SCRUBBER)


class _Reasons(logging.Handler):
    """Collects the warnings Apprise logs in this thread: its only account of why a send failed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.lines.append(" ".join(record.getMessage().split()))


def _apprise() -> Any:
    """The apprise module, imported on first use (it is optional and heavy); None when not installed."""
    try:
        import apprise
    except ImportError:
        return None
    return apprise


def available() -> bool:
    """True when the apprise package is installed."""
    return _apprise() is not None


def _instantiate(url: str) -> Any:
    apprise = _apprise()
    if apprise is None:
        found = scheme_of(url)
        scheme = found[0] if found else "this"
        raise NotifyError(f"{scheme}:// channels need Apprise: {INSTALL_HINT}")
    plugin = apprise.Apprise.instantiate(url, suppress_exceptions=True)
    if plugin is None:
        raise NotifyError(f"not a URL Apprise can send to: {redact(url)} (see https://github.com/caronc/apprise/wiki)")
    return plugin


def validate(url: str) -> None:
    """NotifyError unless Apprise is installed and understands ``url``."""
    with SCRUBBER.hiding(secret_parts(url)):
        _instantiate(url)


def _failure(url: str, lines: list[str]) -> DeliveryError:
    reason = lines[-1] if lines else "no reason given"
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS] + "…"
    codes = [int(m.group(1)) for line in lines for m in _STATUS.finditer(line)]
    permanent = bool(codes) and 400 <= codes[-1] < 500
    return DeliveryError(f"{redact(url)}: Apprise could not deliver: {reason}", retryable=not permanent)


def _notify_type(apprise_module: Any, status: str, severity: str) -> Any:
    kinds = apprise_module.NotifyType
    if status == "resolved":
        return kinds.SUCCESS
    return kinds.FAILURE if severity == "critical" else kinds.WARNING


def send(url: str, title: str, body: str, *, status: str, severity: str, timeout: float) -> None:
    """Send one notification through Apprise; DeliveryError (4xx not retryable) when it reports failure."""
    with SCRUBBER.hiding(secret_parts(url)):
        try:
            plugin = _instantiate(url)
        except NotifyError as exc:
            raise DeliveryError(str(exc), retryable=False) from None
        apprise = _apprise()
        plugin.socket_connect_timeout = timeout
        plugin.socket_read_timeout = timeout
        reasons = _Reasons()
        logger = logging.getLogger("apprise")
        logger.addHandler(reasons)
        try:
            ok = plugin.notify(body=body, title=title, notify_type=_notify_type(apprise, status, severity),
                               body_format=apprise.NotifyFormat.TEXT)
        except Exception as exc:  # a plugin's bug must not stop the delivery worker
            reason = SCRUBBER.scrub(" ".join(str(exc).split()))[:MAX_REASON_CHARS]
            raise DeliveryError(f"{redact(url)}: Apprise failed: {type(exc).__name__}: {reason}",
                                retryable=False) from None
        finally:
            logger.removeHandler(reasons)
        if not ok:
            raise _failure(url, [SCRUBBER.scrub(line) for line in reasons.lines])
