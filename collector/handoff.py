"""The bounded queue from the MQTT link's network thread to the writer thread, and the wake-ups around it.

The network thread calls ``put`` for each message and ``nudge`` after each socket read; ``close`` follows
the network thread's end. The writer thread calls ``take`` for each batch, and ``writer_stopped`` when it ends.
When the queue is full, ``put`` blocks: nothing is acknowledged before it is committed, so a slow database
slows the broker's delivery to us (the broker queues for our persistent session) instead of us dropping messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from fleet.collector.intake import Received

log = logging.getLogger("fleet.collector")

# Commit grouping (docs/collector.md): a writer woken by a few messages waits up to GROUP_WAIT_S for
# GROUP_MIN of them, so a low rate is not one commit (and two wake-ups) per message. GROUP_MIN stays below
# the smallest common in-flight window of a broker (10: RabbitMQ's prefetch; 20: Mosquitto, VerneMQ), which
# holds the rest back until we acknowledge, so grouping never waits on a broker that waits on us.
GROUP_MIN = 8
GROUP_WAIT_S = 0.01
FULL_LOG_EVERY_S = 60.0

Item = tuple[Received, int]  # a message, and the token to acknowledge it with


class Handoff:
    """Messages on their way from the network thread to the writer: one appends, the other takes."""

    def __init__(self, capacity: int, batch_max: int) -> None:
        # A deque, not queue.Queue: the writer must not wake per message (each wake-up is a GIL hand-off,
        # costly at a high rate); it sleeps until a batch is full or its idle time passes.
        self._queue: deque[Item] = deque()
        self._capacity = capacity
        self._batch_max = batch_max
        self._wake = threading.Event()  # for the writer: a batch is ready
        self._space = threading.Event()  # for the network thread: the writer made room
        self._writer_idle = False  # the writer sleeps with nothing queued: the first message wakes it
        self._writer_gone = False
        self._closed = threading.Event()
        self._full_logged = 0.0

    def __len__(self) -> int:
        return len(self._queue)

    # --- network thread -----------------------------------------------------------------------
    def put(self, item: Received, ack: int) -> bool:
        """Queue a message; when the queue is full, wait until the writer has made room.

        False if the writer has stopped instead: the message is not queued, and must not be acknowledged.
        """
        q = self._queue
        q.append((item, ack))
        size = len(q)
        if size >= self._batch_max and not self._wake.is_set():
            self._wake.set()
        if size < self._capacity:
            return True
        return self._wait_for_room()

    def _wait_for_room(self) -> bool:
        """Hold the network thread (no PUBACK yet) until the writer has made room; False if it stopped."""
        q = self._queue
        now = time.monotonic()
        if now - self._full_logged > FULL_LOG_EVERY_S:
            self._full_logged = now
            log.warning("collector queue full (%d): holding back the broker until the database catches up",
                        self._capacity)
        self._wake.set()
        while len(q) >= self._capacity and not self._writer_gone:
            self._space.clear()
            if len(q) >= self._capacity and not self._writer_gone:
                self._space.wait(1.0)
        if len(q) < self._capacity:
            return True
        q.pop()  # only this thread appends, so the last item is the one just put
        return False

    def nudge(self) -> None:
        """After a socket read: wake the writer if what arrived should be committed now.

        The broker stops sending once its in-flight window (20 messages on a default Mosquitto) is
        unacknowledged, so what arrived is committed soon rather than when a batch fills: at once by an idle
        writer, then as soon as GROUP_MIN are queued.
        """
        q = self._queue
        if q and (self._writer_idle or len(q) >= GROUP_MIN) and not self._wake.is_set():
            self._wake.set()

    def close(self) -> None:
        """The network thread has ended: the writer takes what is queued and stops."""
        self._closed.set()
        self._wake.set()

    # --- writer thread ------------------------------------------------------------------------
    def take(self, idle_s: float) -> tuple[list[Item], bool]:
        """Wait for a batch, take up to batch_max messages and make room for more.

        Also returns whether this is the last batch: the network thread has ended and nothing is left.
        """
        q = self._queue
        if len(q) < self._batch_max:
            self._wait(idle_s)
        self._wake.clear()
        closed = self._closed.is_set()
        popleft = q.popleft
        items = [popleft() for _ in range(min(len(q), self._batch_max))]
        self._space.set()
        return items, closed and not q

    def _wait(self, idle_s: float) -> None:
        """Sleep until there is a batch to write: GROUP_MIN messages, or GROUP_WAIT_S after the first one.

        Unacknowledged messages hold the broker's in-flight window, so nothing waits longer than GROUP_WAIT_S;
        but committing whatever each socket read delivers would mean a commit and a wake-up every few reports
        at a fleet's steady rate (docs/benchmarks.md). ``nudge`` wakes an idle writer at the first message, then
        again once GROUP_MIN are queued. With nothing queued the writer sleeps up to ``idle_s``.
        """
        q = self._queue
        self._writer_idle = True
        if not q:
            self._wake.wait(idle_s)
            self._wake.clear()
        self._writer_idle = False
        if 0 < len(q) < GROUP_MIN and not self._closed.is_set():
            self._wake.wait(GROUP_WAIT_S)

    def writer_stopped(self) -> None:
        """The writer has ended: ``put`` stops waiting for room and refuses what does not fit."""
        self._writer_gone = True
        self._space.set()
