"""Error root of the notify package: a bad channel, and a failed send that may or may not be retried."""

from __future__ import annotations


class NotifyError(Exception):
    """A channel URL or setting that cannot work (bad URL, missing extra); the message is one line, no secret."""


class DeliveryError(NotifyError):
    """A send that failed; ``retryable`` says whether trying again later may succeed."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable

    def __repr__(self) -> str:
        return f"DeliveryError({str(self)!r}, retryable={self.retryable})"
