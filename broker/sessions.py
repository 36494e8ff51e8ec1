"""What the broker keeps per amqtt Session: a light state machine, and fleet's own per-session state.

amqtt builds a ``transitions.Machine`` for every session, most of a session's memory
(docs/benchmarks.md). The broker only uses connect(), disconnect(), is_connected() and
``state``, which SessionState provides (installed by broker/patches.py while a broker runs).
Fleet's per-session state (grant, keepalive, queues) lives in ``Session.attributes``, amqtt's place
for extension-owned data, under one key.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from amqtt.session import Session
from transitions import MachineError

from fleet.broker.policy import Grant

ATTRIBUTE = "fleet.broker"


class NoQueue:
    """Stands in for the asyncio.Queue objects amqtt makes for every session and protocol handler that fleet's
    broker never fills (four per connection, ~10 KiB with their deques and events): always empty, and
    putting into it is a bug."""

    __slots__ = ()

    def empty(self) -> bool:
        """Always empty."""
        return True

    def qsize(self) -> int:
        """Always 0."""
        return 0

    def get_nowait(self) -> Any:
        """Nothing to get."""
        raise asyncio.QueueEmpty

    def put_nowait(self, item: Any) -> None:
        """Refused: nothing consumes this queue."""
        raise RuntimeError("fleet's broker does not use this amqtt queue")

    async def put(self, item: Any) -> None:
        """Refused: nothing consumes this queue."""
        self.put_nowait(item)


NO_QUEUE = NoQueue()


def spare_queues(session: Session) -> Session:
    """Drop the two queues amqtt gives a session: its broadcast loop and QoS 2 flow, which fill them, are
    replaced (broker/routing.py, broker/protocol.py)."""
    session.retained_messages = session.delivered_message_queue = NO_QUEUE
    return session


class SessionState:
    """The three states of an MQTT session and the two moves between them."""

    __slots__ = ("state", "_session")

    def __init__(self, session: Session) -> None:
        self.state = "new"
        self._session = session

    def connect(self) -> None:
        """new/disconnected -> connected; a second connect raises MachineError like transitions does."""
        if self.state == "connected":
            raise MachineError("Can't trigger event connect from state connected!")
        self.state = "connected"
        # What amqtt's on-enter callback records (used by its session expiry).
        self._session.last_connect_time = int(time.time())
        self._session.last_disconnect_time = None

    def disconnect(self) -> None:
        """Any state -> disconnected."""
        self.state = "disconnected"
        self._session.last_disconnect_time = int(time.time())

    def is_connected(self) -> bool:
        """True while connected."""
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        """True once disconnected."""
        return self.state == "disconnected"

    def is_new(self) -> bool:
        """True before the first connect."""
        return self.state == "new"


@dataclass(slots=True)
class Extras:
    """Fleet's state of one session: who it is, its keepalive limit, what is in flight and queued for it."""

    grant: Grant | None = None
    keepalive_s: float = 0.0
    ready: bool = False  # connected, and what was in flight before has been sent again: deliver in order now
    queue: deque[Any] = field(default_factory=deque)  # messages held while a persistent session is offline
    connection: asyncio.Task[Any] | None = None  # the task serving its live connection
    peer: tuple[str, str] | None = None  # (subject CN, serial) of the client certificate TLS verified


def extras(session: Session) -> Extras:
    """The session's Extras, created on first use."""
    found = session.attributes.get(ATTRIBUTE)
    if found is None:
        found = session.attributes[ATTRIBUTE] = Extras()
    return found


def grant_of(session: Session | None) -> Grant | None:
    """The Grant attached to a session at CONNECT, if any."""
    if session is None:
        return None
    found = session.attributes.get(ATTRIBUTE)
    return found.grant if found is not None else None
