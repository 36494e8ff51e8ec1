"""The heartbeat to an outside dead-man's switch (``FLEET_HEARTBEAT_URL``): requested only while fleet is healthy.

The active collector requests the URL every ``heartbeat_interval`` seconds on a thread of its own, and only while
it is healthy: connected to the broker, its writer committing (a write within WRITE_FRESH_S), and its queue not
full (draining, not backing up). Otherwise it stays silent, and the outside service (healthchecks.io, an Uptime
Kuma push monitor, Beszel's hub) raises the alarm. A failing endpoint is tried again a few times within the
interval and logged at most once per interval; requests have timeouts, so nothing here can hold the collector.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from fleet.config.settings import Settings

log = logging.getLogger("fleet.collector")

WRITE_FRESH_S = 10.0  # the writer commits its heartbeat every 2 s: older than this, the database is not writable
TIMEOUT_S = 10.0
RETRY_DELAYS_S = (1.0, 2.0, 4.0)  # within one interval, when the endpoint fails
USER_AGENT = "fleet-telemetry/0.1 (heartbeat)"


@dataclass(frozen=True)
class Health:
    """What the collector says about itself for one heartbeat: whether it is healthy, why not, and the summary."""

    healthy: bool
    why: str = ""
    summary: dict[str, Any] = field(default_factory=dict)  # the POST body: orgs, machines, alerts_firing


def request(url: str, method: str, summary: dict[str, Any], timeout: float = TIMEOUT_S) -> None:
    """One heartbeat request; OSError (urllib's errors among them) when it fails or answers other than 2xx."""
    body = None
    if method == "POST":
        body = post_body(summary)
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("User-Agent", USER_AGENT)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as response:  # noqa: S310 - an http(s) URL (settings check it)
        response.read(4096)


def post_body(summary: dict[str, Any]) -> bytes:
    """The POST body: the summary and the time it was sent."""
    return orjson.dumps({**summary, "ts": time.time()})


class DeadmanHeartbeat:
    """Requests ``heartbeat_url`` every ``heartbeat_interval`` while ``health()`` says healthy; ``start``/``stop``."""

    def __init__(self, settings: Settings, health: Callable[[], Health]) -> None:
        self.url = settings.heartbeat_url
        self.method = settings.heartbeat_method.upper()
        self.interval = settings.heartbeat_interval
        self.health = health
        self.sent = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="collector-deadman", daemon=True)
        self._unhealthy_logged = ""

    def start(self) -> None:
        """Start beating (nothing at all without a URL)."""
        if self.url:
            self._thread.start()

    def stop(self) -> None:
        """Stop beating; a request in flight ends within its timeout, unwaited."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(1.0)

    def _run(self) -> None:
        # At start the collector is still connecting and making its first commit: give it that long.
        deadline = time.monotonic() + WRITE_FRESH_S
        while not self.health().healthy and time.monotonic() < deadline and not self._stop.wait(0.1):
            pass
        while not self._stop.is_set():
            started = time.monotonic()
            self.beat_once()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def beat_once(self) -> bool:
        """Request the URL if healthy, trying again within the interval; True when a request succeeded."""
        health = self.health()
        if not health.healthy:
            if health.why != self._unhealthy_logged:
                self._unhealthy_logged = health.why
                log.warning("heartbeat not sent: %s", health.why)
            return False
        if self._unhealthy_logged:
            self._unhealthy_logged = ""
            log.info("heartbeat resumed: the collector is healthy again")
        error = ""
        deadline = time.monotonic() + self.interval
        for delay in (0.0, *RETRY_DELAYS_S):
            if delay and (time.monotonic() + delay >= deadline or self._stop.wait(delay)):
                break
            try:
                request(self.url, self.method, health.summary, min(TIMEOUT_S, self.interval))
            except (OSError, ValueError) as exc:
                error = _reason(exc)
                continue
            self.sent += 1
            return True
        self.failed += 1
        log.warning("heartbeat to the outside monitor failed (retrying next interval): %s", error)
        return False


def _reason(exc: BaseException) -> str:
    """One line saying why, never the URL (it may hold a token)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__
