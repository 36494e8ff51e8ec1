"""Open-file limits: what a broker holding thousands of connections needs from its process."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("fleet.broker")


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
