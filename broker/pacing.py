"""The embedded broker's event loop, which lets events gather for a few milliseconds after it wakes.

Thousands of agents each sending a report every few seconds wake an event loop that waits on their
sockets once per report: one ``epoll_wait``, one turn of the loop, one send to the collector per message.
Network cards solve the same problem with interrupt moderation; here, once the loop has nothing left to
run, it waits until ``coalesce`` seconds have passed since it last woke before it polls again (never past
its next timer), so what arrived meanwhile is handled in one turn and sent on in one write per connection.
A message waits that much longer at most; a loop with work ready never waits, and neither does one serving
a client that keeps answering the broker at once (``answered``): a publisher whose every PUBLISH follows its
last PUBACK within the window would otherwise be held to one exchange a window.
"""

from __future__ import annotations

import asyncio
import selectors
import time
import weakref
from collections.abc import Callable

# A client seen waiting on the broker stops the gathering this long after its last PUBLISH: its exchange may
# span a group commit (broker/store.py) and more than one wake-up.
RUSH_S = 0.25
RUSH_STREAK = 3  # PUBLISHes in a row, each soon after the broker's last answer: the client waits on the broker


class CoalescingSelector(selectors.DefaultSelector):
    """The platform's selector, polled at most once per ``coalesce`` seconds while the loop would block."""

    def __init__(self, coalesce: float) -> None:
        super().__init__()
        self.coalesce = coalesce
        self._woke = 0.0
        self._rush_until = 0.0  # no gathering before then: a client waits on the broker's answers
        self.gathered = 0  # waits held back so far

    def answered(self, answered_at: float, streak: int) -> int:
        """A client sent a PUBLISH; the broker last answered it (PUBACK, PUBREC, PUBCOMP) at ``answered_at``
        (time.monotonic()), and ``streak`` of its PUBLISHes in a row came that soon after an answer. Returns the
        streak with this one: it counts if it came within two windows (the loop sees a reply up to one window
        late). A streak of RUSH_STREAK is a client that waits on the broker: the loop stops gathering for
        RUSH_S. One PUBLISH that follows an answer (an agent's ping after its report) is no streak."""
        now = time.monotonic()
        if now - answered_at >= 2 * self.coalesce:
            return 0
        if streak + 1 >= RUSH_STREAK:
            self._rush_until = now + RUSH_S
        return streak + 1

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """What is ready; when asked to wait (timeout None or over 0), not before ``coalesce`` since the last
        wake-up, nor past ``timeout``."""
        if timeout is None or timeout > 0:
            now = time.monotonic()
            gather = self._woke + self.coalesce - now
            if gather > 0 and now >= self._rush_until:
                if timeout is not None:
                    gather = min(gather, timeout)
                    timeout -= gather
                self.gathered += 1
                time.sleep(gather)
        ready: list[tuple[selectors.SelectorKey, int]] = super().select(timeout)
        self._woke = time.monotonic()
        return ready


_selectors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CoalescingSelector] = weakref.WeakKeyDictionary()


def coalescing_loop(coalesce_ms: float) -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory of asyncio event loops whose selector lets events gather ``coalesce_ms`` after each wake-up."""

    def new_loop() -> asyncio.AbstractEventLoop:
        selector = CoalescingSelector(coalesce_ms / 1000)
        loop = asyncio.SelectorEventLoop(selector)
        _selectors[loop] = selector
        return loop

    return new_loop


def selector_of(loop: asyncio.AbstractEventLoop) -> CoalescingSelector | None:
    """The coalescing selector of a loop made by coalescing_loop(); None for any other loop."""
    return _selectors.get(loop)
