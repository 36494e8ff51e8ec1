"""A light session state machine for amqtt's Session (new -> connected <-> disconnected).

amqtt builds a ``transitions.Machine`` for every session: about 16 KiB and 240 objects per client,
two thirds of a session's memory. The broker only uses connect(), disconnect(), is_connected() and
``state``, which this small class provides with the same callbacks and the same MachineError.
"""

from __future__ import annotations

from amqtt.session import Session
from transitions import MachineError


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
        self._session._on_enter_connected()

    def disconnect(self) -> None:
        """Any state -> disconnected."""
        self.state = "disconnected"
        self._session._on_enter_disconnected()

    def is_connected(self) -> bool:
        """True while connected."""
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        """True once disconnected."""
        return self.state == "disconnected"

    def is_new(self) -> bool:
        """True before the first connect."""
        return self.state == "new"


def _init_states(self: Session) -> None:
    self.transitions = SessionState(self)


def install() -> None:
    """Make every amqtt Session use SessionState (idempotent)."""
    Session._init_states = _init_states  # type: ignore[method-assign]
