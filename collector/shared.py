"""What the collector's threads share besides the message queue (collector.handoff), each piece written by one thread.

- ``LinkState``: the broker connection, written by the MQTT link's network thread;
- ``ServedOrgs``: the orgs the collector serves, replaced by the writer thread;
- ``WriteCounts``: what the writer thread has stored;
- ``CollectorStats``: a snapshot of the counters, for ``RunningCollector.stats()`` and the heartbeat.

Readers on other threads take a value without a lock: each is one reference or one int, replaced whole.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CollectorStats:
    """A snapshot of the collector's counters."""

    broker_connected: bool
    orgs: tuple[str, ...]
    received: int
    stored: int
    dropped: dict[str, int] = field(default_factory=dict)
    queued: int = 0
    machines: int = 0
    commits: int = 0  # write transactions: stored / commits is the mean batch


class LinkState:
    """The broker connection as the network thread last saw it; the ``mark_*`` methods are the network thread's."""

    def __init__(self) -> None:
        self.started = time.monotonic()  # when the collector began waiting for its first subscription
        self._connected = threading.Event()
        self._subscribed = threading.Event()  # connected and subscribed at least once
        self._since: float | None = None  # wall clock of the current connection's CONNACK

    def mark_connected(self, now: float) -> None:
        """The broker accepted the connection at ``now`` (wall clock)."""
        self._since = now
        self._connected.set()

    def mark_disconnected(self) -> bool:
        """The connection is gone; returns whether it was up."""
        was = self._connected.is_set()
        self._since = None
        self._connected.clear()
        return was

    def mark_subscribed(self) -> None:
        """The broker answered the subscriptions of a connection."""
        self._subscribed.set()

    def is_connected(self) -> bool:
        """Whether the broker connection is up."""
        return self._connected.is_set()

    def is_subscribed(self) -> bool:
        """Whether the collector has been connected and subscribed at least once."""
        return self._subscribed.is_set()

    def wait_subscribed(self, timeout: float) -> bool:
        """Block until connected and subscribed once (True), or ``timeout`` seconds (False)."""
        return self._subscribed.wait(timeout)

    @property
    def connected_since(self) -> float | None:
        """Wall clock of the current connection's CONNACK; None while disconnected."""
        return self._since


class ServedOrgs:
    """The orgs the collector serves: those of its shard (every org without one) that exist.

    Set by ``start()`` before the threads run, then replaced only by the writer thread.
    """

    def __init__(self, shard: Iterable[str]) -> None:
        self._shard = frozenset(shard)
        self._current: frozenset[str] = frozenset()

    def __contains__(self, org: object) -> bool:
        return org in self._current

    def get(self) -> frozenset[str]:
        """The orgs served now."""
        return self._current

    def wanted(self, existing: Iterable[str]) -> frozenset[str]:
        """The orgs to serve, of ``existing`` (the orgs table)."""
        if self._shard:
            return frozenset(org for org in existing if org in self._shard)
        return frozenset(existing)

    def replace(self, orgs: frozenset[str]) -> None:
        """Serve ``orgs`` from now on."""
        self._current = orgs


@dataclass
class WriteCounts:
    """What the writer thread has stored; only the writer counts, stats() reads."""

    stored: int = 0  # reports
    commits: int = 0  # write transactions
    last_write: float | None = None  # monotonic time of the last committed transaction
    summary: dict[str, Any] = field(default_factory=dict)  # orgs, machines per status, alerts firing
