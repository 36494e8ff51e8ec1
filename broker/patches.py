"""The two process-wide patches the broker makes, applied only while a broker runs (``applied()``).

Both change a class every user of it in the process shares, so they are explicit, reference-counted
and undone when the last broker of the process stops (docs/broker.md, "Process-wide patches"):

- ``asyncio.sslproto.SSLProtocol.max_size``: CPython allocates (and zero-fills) a read buffer of this size
  for every TLS connection, 256 KiB, so 2,000 idle clients cost ~500 MB in buffers alone. A TLS record
  carries at most 16 KiB of plaintext; 4 KiB costs a few more reads per large record and keeps idle
  connections small. It is read when a connection is made, so connections keep the size they got.
- ``amqtt.session.Session._init_states``: amqtt builds a ``transitions.Machine`` per session (most of a
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

TLS_READ_BUFFER = 4 * 1024
_lock = threading.Lock()
_users = 0
_saved: dict[str, Any] = {}


def _light_states(session: Session) -> None:
    session.transitions = SessionState(session)


def _install() -> None:
    from asyncio import sslproto

    _saved["max_size"] = sslproto.SSLProtocol.__dict__.get("max_size")
    _saved["init_states"] = Session.__dict__["_init_states"]
    sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
    Session._init_states = _light_states  # noqa: SLF001 - the amqtt seam


def _uninstall() -> None:
    from asyncio import sslproto

    sslproto.SSLProtocol.max_size = _saved.pop("max_size")
    Session._init_states = _saved.pop("init_states")  # noqa: SLF001 - the amqtt seam


@contextmanager
def applied() -> Iterator[None]:
    """Apply both patches for the lifetime of the block; nested and concurrent brokers share them."""
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
