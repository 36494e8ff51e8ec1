"""Error root of the broker package."""


class BrokerError(Exception):
    """Root of every error raised by the broker package."""
