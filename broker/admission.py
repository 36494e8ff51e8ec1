"""Admission under overload: bounds on TLS handshakes in flight and on the accept rate, decided before TLS.

A connection turned away here costs an accept and a close, where one let through costs a TLS handshake: when
more agents knock than the broker can handshake, refusing the surplus at once (they back off and return
later) keeps the handshakes it does start short, instead of every one of them timing out half-way."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

BUSY = "handshakes_busy"  # as many handshakes in flight as allowed
RATE = "accept_rate"  # more new connections this second than allowed


@dataclass
class Admission:
    """Who may start a TLS handshake now: at most ``max_handshakes`` at once and ``accept_rate`` a second
    (a token bucket holding one second's worth; 0 = no rate limit)."""

    max_handshakes: int
    accept_rate: float
    in_flight: int = 0
    _tokens: float = field(default=0.0, repr=False)
    _stamp: float = field(default_factory=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        self._tokens = self.accept_rate

    def admit(self) -> str | None:
        """None when a new connection may start its handshake (it is in flight until ``done()``); else why not."""
        if self.in_flight >= self.max_handshakes:
            return BUSY
        if self.accept_rate:
            now = time.monotonic()
            self._tokens = min(self.accept_rate, self._tokens + (now - self._stamp) * self.accept_rate)
            self._stamp = now
            if self._tokens < 1.0:
                return RATE
            self._tokens -= 1.0
        self.in_flight += 1
        return None

    def done(self) -> None:
        """A handshake admitted by ``admit()`` has ended, either way."""
        self.in_flight -= 1
