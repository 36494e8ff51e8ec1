"""What the collector does with one received MQTT message before queueing it: validate, rate-limit, count drops.

Runs in the MQTT link's network thread (collector.mqtt_link), so it only parses; it never touches the database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fleet.config import payloads
from fleet.config.errors import PayloadError
from fleet.config.payloads import Ping, Report
from fleet.config.topics import Topic

log = logging.getLogger("fleet.collector.intake")

RATE_LIMITED = "rate_limited"
INTERNAL = "internal"
UNKNOWN_ORG = "unknown_org"  # a well-formed message of an org that does not exist (or is not this shard's)
BAD_LABELS = "bad_labels"  # a report kept without its labels (oversize, too many, malformed): logged once per machine
DROP_REASONS = payloads.REASONS + (RATE_LIMITED, INTERNAL, UNKNOWN_ORG)
# Bucket depth in seconds of the rate: a broker delivering a backlog after an outage is not a flood.
BURST_SECONDS = 20.0
LOG_EVERY_S = 60.0
MAX_BUCKETS = 100_000
MAX_CACHED_TOPICS = 100_000

_topics: dict[str, Topic] = {}


def _parse_topic(topic: str) -> Topic:
    # Each machine publishes on the same two topics forever: validate each topic string once.
    parsed = _topics.get(topic)
    if parsed is None:
        parsed = payloads.parse_topic(topic)
        if len(_topics) >= MAX_CACHED_TOPICS:
            _topics.clear()
        _topics[topic] = parsed
    return parsed


@dataclass(frozen=True, slots=True)
class Received:
    """A validated message waiting for the writer: a Report or a Ping, with its receive time."""

    message: Report | Ping
    received: float
    retained: bool


class DropCounter:
    """Thread-safe drop counts per reason, logging each reason at most once per ``LOG_EVERY_S``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._total: dict[str, int] = {}
        self._unsaved: dict[str, int] = {}
        self._last_log: dict[str, float] = {}
        self._since_log: dict[str, int] = {}

    def add(self, reason: str, topic: str, detail: str) -> None:
        """Count one dropped message; log it unless this reason was logged within the last minute."""
        now = self._clock()
        with self._lock:
            self._count(reason)
            self._since_log[reason] = self._since_log.get(reason, 0) + 1
            last = self._last_log.get(reason)
            if last is not None and now - last < LOG_EVERY_S:
                return
            self._last_log[reason] = now
            count = self._since_log.pop(reason)
        log.warning("dropped message on %r: %s (%r); %d dropped for this reason since the last such line",
                    topic[:200], reason, detail[:200], count)

    def add_quietly(self, reason: str) -> None:
        """Count one drop that its caller logs its own way."""
        with self._lock:
            self._count(reason)

    def _count(self, reason: str) -> None:
        self._total[reason] = self._total.get(reason, 0) + 1
        self._unsaved[reason] = self._unsaved.get(reason, 0) + 1

    def totals(self) -> dict[str, int]:
        """Drops per reason since the collector started."""
        with self._lock:
            return dict(self._total)

    def take_unsaved(self) -> dict[str, int]:
        """Drops counted since the last call (to add to the drops table)."""
        with self._lock:
            unsaved, self._unsaved = self._unsaved, {}
            return unsaved

    def restore(self, unsaved: dict[str, int]) -> None:
        """Put back counts whose write failed, so none are lost."""
        with self._lock:
            for reason, count in unsaved.items():
                self._unsaved[reason] = self._unsaved.get(reason, 0) + count


class RateLimiter:
    """Token bucket per (org, machine): ``rate`` messages/s sustained, ``rate * BURST_SECONDS`` at once."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = max(rate * BURST_SECONDS, 1.0)
        self._clock = clock
        self._buckets: dict[tuple[str, str], list[float]] = {}  # key -> [tokens, last refill]

    def allow(self, org: str, machine: str) -> bool:
        """Take one token for this machine; False when its bucket is empty."""
        now = self._clock()
        bucket = self._buckets.get((org, machine))
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._prune(now)
            self._buckets[(org, machine)] = [self.capacity - 1.0, now]
            return True
        tokens = min(self.capacity, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _prune(self, now: float) -> None:
        # A bucket that has refilled completely carries no information: forget it.
        full = [key for key, (tokens, last) in self._buckets.items()
                if tokens + (now - last) * self.rate >= self.capacity]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= MAX_BUCKETS:  # still full of active floods: forget the oldest half
            for key in list(self._buckets)[: MAX_BUCKETS // 2]:
                del self._buckets[key]


def parse_message(topic: str, raw: bytes, retained: bool, received: float, limiter: RateLimiter | None,
                  drops: DropCounter) -> Received | None:
    """Validate one message; return what to queue, or None when it is dropped (counted) or ignorable."""
    try:
        parsed_topic = _parse_topic(topic)
        if parsed_topic.kind == "ping" and not raw:
            return None  # a cleared retained ping (our own eviction, or an operator): nothing to do
        if limiter is not None and not retained and not limiter.allow(parsed_topic.org, parsed_topic.machine):
            drops.add(RATE_LIMITED, topic, f"over {limiter.rate:g} messages/s")
            return None
        if parsed_topic.kind == "report":
            report = payloads.parse_report(raw, parsed_topic)
            return Received(report, received, retained)
        return Received(payloads.parse_ping(raw, parsed_topic), received, retained)
    except PayloadError as exc:
        drops.add(exc.reason, topic, exc.detail)
    except Exception as exc:  # noqa: BLE001 - one bad message must never stop the collector
        drops.add(INTERNAL, topic, f"{type(exc).__name__}: {exc}")
        log.exception("internal error handling a message on %r", topic[:200])
    return None
