"""The process-wide patch the broker makes, applied only while a broker runs (``applied()``).

It changes a class every user of it in the process shares, so it is explicit, reference-counted and undone
when the last broker of the process stops (docs/broker.md, "Process-wide patches"):
``amqtt.session.Session._init_states``: amqtt builds a ``transitions.Machine`` per session (most of a
session's memory; docs/benchmarks.md); sessions made while the patch is on get
``fleet.broker.sessions.SessionState`` instead.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from amqtt.session import Session

from fleet.broker.sessions import SessionState

_lock = threading.Lock()
_users = 0
_saved: dict[str, Any] = {}


def _light_states(session: Session) -> None:
    session.transitions = SessionState(session)


def _install() -> None:
    _saved["init_states"] = Session.__dict__["_init_states"]
    Session._init_states = _light_states  # noqa: SLF001 - the amqtt seam


def _uninstall() -> None:
    Session._init_states = _saved.pop("init_states")  # noqa: SLF001 - the amqtt seam


@contextmanager
def applied() -> Iterator[None]:
    """Apply the patch for the lifetime of the block; nested and concurrent brokers share them."""
    global _users
    with _lock:
        if _users == 0:
            _install()
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                _uninstall()


def active() -> bool:
    """True while at least one broker has the patches applied."""
    return _users > 0
