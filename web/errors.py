"""Error root of the web package."""


class WebError(Exception):
    """Root of every error raised by the web package."""
