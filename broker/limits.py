"""Open-file limits and accept errors: what a broker holding thousands of connections needs from its process."""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
from typing import Any

from fleet.broker.throttle import EVERY_S, ThrottledLog

log = logging.getLogger("fleet.broker")

# accept() failing for want of resources: asyncio logs each one at ERROR with a traceback, up to 100 per
# listener a second (its accept loop tries a backlog's worth), then retries after a second.
ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (each connection is one); return it.

    Like Mosquitto or nginx would need, without which a systemd service's default of 1,024 caps the broker
    at about a thousand agents whatever ``max_connections`` says."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, target, exc)
    return soft


class AcceptErrors:
    """A loop exception handler that turns accept() resource errors into one WARNING line per 10 s (and a
    count); everything else goes to the loop's default handler."""

    def __init__(self, stats: dict[str, int], every_s: float = EVERY_S) -> None:
        self.stats = stats
        self.throttled = ThrottledLog(log, every_s)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        callback = getattr(context.get("handle"), "_callback", None)
        if getattr(callback, "__name__", "") == "_start_serving" and isinstance(exc, (ValueError, OSError)):
            # asyncio's accept retry, a second after such an error, ran after the listener had closed (a stop).
            log.debug("accept retry after the listener closed: %s", exc)
            return
        if not (isinstance(exc, OSError) and exc.errno in ACCEPT_RESOURCE_ERRNOS
                and "accept" in str(context.get("message", ""))):
            loop.default_exception_handler(context)
            return
        self.stats["accept_failed"] = self.stats.get("accept_failed", 0) + 1
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.throttled("accept", logging.WARNING, "cannot accept connections: %s (open file limit %d); raise"
                       " LimitNOFILE or lower max_connections", exc.strerror or exc, soft)
