"""Deferred imports: standard modules our dependencies import at start-up but the agent never uses.

`fleet agent` has an RSS budget of 25 MB (docs/benchmarks.md). Each module
in ``UNUSED`` is imported at module level by something the agent needs, and used only on a path the
agent never takes. ``defer(name)`` puts a stand-in module in ``sys.modules`` (and on its parent package);
the first attribute read on the stand-in imports the real module, which then takes the stand-in's place,
so code that does use the module still works and only its first use pays for the import.

``importlib.util.LazyLoader`` cannot do this on Python 3.11: the import system reads the new module's
``__spec__`` before ``import`` returns, and the lazy module loads itself on that first attribute read.

Only the agent's process calls ``defer_unused()`` (``fleet.cli.prepare_agent_process``, before the
importers below are imported): the stand-ins are process-wide, and pay only against the agent's budget,
so the broker, collector, web and ``fleet up`` import every module as usual. A module already imported
is left alone.
"""

from __future__ import annotations

import _thread
import importlib
import importlib.util
import sys
import types
from importlib.machinery import ModuleSpec
from typing import Any

UNUSED = {
    "urllib.request": "paho's proxy lookup, which returns early unless PySocks is installed "
                      "(urllib.request brings http.client, email, tempfile, shutil, bz2, lzma)",
    "hashlib": "paho's WebSocket handshake; fleet speaks MQTT over TCP",
    "base64": "paho's WebSocket handshake and ssl's DER/PEM converters",
    "inspect": "dataclasses, to write a docstring for a class without one (ours all have one)",
    "ipaddress": "urllib.parse, for [IPv6] hosts in URLs",
    "tokenize": "linecache (logging imports traceback, which imports it), to read source lines for a traceback",
    "textwrap": "traceback, to indent exception groups",
}

_swap = _thread.allocate_lock()  # two threads using a stand-in at once: one removes it, both import


class Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is read; then imports and forwards to it."""

    def __init__(self, name: str, spec: ModuleSpec) -> None:
        super().__init__(name)
        self.__spec__ = spec  # the real module's, for importlib.util.find_spec() and friends
        self.__deferred_module__: types.ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:  # only for attributes the stand-in lacks
        real = self.__deferred_module__
        if real is None:
            real = self.__deferred_module__ = _load(self)
        return getattr(real, attr)


def _load(stand_in: Deferred) -> types.ModuleType:
    name = stand_in.__name__
    with _swap:
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
    return importlib.import_module(name)  # which also puts it on its parent package


def defer(name: str) -> None:
    """Stand in for module ``name`` until an attribute of it is first read (no-op if already imported)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    stand_in = Deferred(name, spec)
    sys.modules[name] = stand_in
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, stand_in)  # find_spec imported the parent


def defer_unused() -> None:
    """Defer every module in ``UNUSED`` that is not imported yet."""
    for name in UNUSED:
        defer(name)
