"""Logging set-up for every fleet process: one line per event, to stderr."""

from __future__ import annotations

import logging
import sys


class _FleetHandler(logging.StreamHandler):
    """The one stderr handler fleet installs (recognised so a second call does not add another)."""


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once: ``time level logger: message``."""
    root = logging.getLogger()
    if any(isinstance(h, _FleetHandler) for h in root.handlers):
        root.setLevel(level.upper())
        return
    handler = _FleetHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # amqtt and paho are chatty at INFO; their warnings still show.
    for name in ("amqtt", "transitions", "waitress.queue"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
