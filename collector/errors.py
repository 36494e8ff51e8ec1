"""Error root of the collector package."""


class CollectorError(Exception):
    """Root of every error raised by the collector package."""
