"""The seam between fleet's broker and amqtt: every private amqtt name the broker relies on is listed here
with why, and checked against the installed amqtt, so an upgrade that moves one fails here first and by
name. The two process-wide patches are applied only while a broker runs."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import re
import tomllib
from pathlib import Path

import pytest
from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from fleet.broker import patches
from fleet.broker.server import start_in_thread
from fleet.broker.sessions import SessionState
from fleet.config.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BROKER_DIR = ROOT / "broker"
AMQTT_VERSION = "0.12.1"

# owner class -> private name -> how the broker uses it
SEAM: dict[type, dict[str, str]] = {
    Broker: {
        "_client_connected": "override: authenticate before touching sessions (stream_connected calls it)",
        "_servers": "read: each listener's Server (connection limit, bound sockets)",
        "_create_server_instance": "override: a plain TCP listener with a deep backlog; each connection's task "
                                   "negotiates TLS (bounded, and ended by a stop)",
        "_authenticate": "call: amqtt's plugin authentication (FleetAuthPlugin)",
        "_session_monitor": "override: a no-op; amqtt scanned every session each second for ended clean ones",
        "_cleanup_session": "call: a clean session is removed when its connection ends",
        "_delete_session": "override and call: a clean session also forgets the stored subscriptions",
        "_broadcast_message": "override: wills take the checked fan-out instead of the broadcast queue",
        "_handle_subscription": "override and call (from serve()): SUBACK, then retained messages through the "
                                "receive rule",
        "_handle_unsubscription": "override and call (from serve()): the subscription also leaves broker.db",
        "_del_all_subscriptions": "override and call: a deleted session's filters leave the routing memo",
    },
    BrokerProtocolHandler: {
        "_retry_deliveries": "override and call: resend what was in flight, without waiting for the PUBACKs",
        "_pending_subscriptions": "write: an empty stand-in; serve() hands SUBSCRIBE to the broker directly",
        "_pending_unsubscriptions": "write: an empty stand-in; serve() hands UNSUBSCRIBE to the broker directly",
    },
    Session: {
        "_init_states": "patched while a broker runs: a small state machine instead of transitions.Machine",
    },
}


def _amqtt_defines(owner: type, name: str) -> bool:
    """A method or class attribute of ``owner`` (or its amqtt bases), or an attribute its code assigns."""
    for cls in owner.__mro__:
        if not cls.__module__.startswith("amqtt"):
            continue
        if name in vars(cls) or re.search(rf"self\.{re.escape(name)}\b\s*(:[^=]*)?=", inspect.getsource(cls)):
            return True
    return False


def _broker_modules():
    for path in sorted(BROKER_DIR.glob("*.py")):
        yield path, importlib.import_module(f"fleet.broker.{path.stem}")


def _private_uses() -> list[tuple[str, type, str, int]]:
    """(file, amqtt owner, name, line) for each private name fleet's broker code uses on an amqtt class or
    inside one of its own subclasses of an amqtt class."""
    uses = []
    for path, module in _broker_modules():
        tree = ast.parse(path.read_text())
        amqtt_names = {name: obj for name, obj in vars(module).items()
                       if inspect.isclass(obj) and obj.__module__.startswith("amqtt")}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                cls = getattr(module, node.name, None)
                bases = [b for b in getattr(cls, "__mro__", ())[1:] if b.__module__.startswith("amqtt")]
                if not bases:
                    continue
                for inner in ast.walk(node):
                    if isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef):
                        name = inner.name
                    elif isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name) \
                            and inner.value.id == "self":
                        name = inner.attr
                    else:
                        continue
                    if name.startswith("_") and not name.startswith("__"):
                        uses.append((path.name, bases[0], name, inner.lineno))
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in amqtt_names and node.attr.startswith("_") and not node.attr.startswith("__"):
                uses.append((path.name, amqtt_names[node.value.id], node.attr, node.lineno))
    return uses


def _owner_in_seam(owner: type, name: str) -> type | None:
    return next((cls for cls in SEAM if issubclass(owner, cls) and name in SEAM[cls]), None)


def test_amqtt_is_pinned_to_the_version_the_seam_was_checked_against():
    assert importlib.metadata.version("amqtt") == AMQTT_VERSION
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"amqtt=={AMQTT_VERSION}" in dependencies


@pytest.mark.parametrize(("owner", "name"), [(owner, name) for owner, names in SEAM.items() for name in names])
def test_every_listed_private_name_still_exists_in_amqtt(owner, name):
    assert _amqtt_defines(owner, name), f"amqtt {AMQTT_VERSION} has no {owner.__name__}.{name}: re-check the seam"


def test_every_private_amqtt_name_the_broker_uses_is_listed():
    """A private name used in a subclass is amqtt's (then it must be listed) or ours (then amqtt must not have
    it, or we would be overriding something by accident)."""
    unlisted = sorted({f"{file}:{line} {owner.__name__}.{name}" for file, owner, name, line in _private_uses()
                       if _amqtt_defines(owner, name) and _owner_in_seam(owner, name) is None})
    assert not unlisted, f"private amqtt names used but not in SEAM: {unlisted}"


def test_the_seam_lists_nothing_the_broker_no_longer_uses():
    used = {(_owner_in_seam(owner, name), name) for _file, owner, name, _line in _private_uses()}
    stale = [f"{owner.__name__}.{name}" for owner, names in SEAM.items() for name in names if (owner, name) not in used]
    assert not stale, f"listed in SEAM but unused: {stale}"


def test_overrides_keep_amqtts_signatures():
    for _path, module in _broker_modules():
        for cls in [obj for obj in vars(module).values() if inspect.isclass(obj) and obj.__module__ == module.__name__]:
            for owner, names in SEAM.items():
                if not issubclass(cls, owner):
                    continue
                for name in names:
                    if name in vars(cls) and callable(vars(cls)[name]) and callable(getattr(owner, name, None)):
                        ours = list(inspect.signature(vars(cls)[name]).parameters)
                        theirs = list(inspect.signature(getattr(owner, name)).parameters)
                        assert ours == theirs, f"{cls.__name__}.{name}{ours} != amqtt's {theirs}"


def test_noqa_slf001_only_on_seam_lines():
    listed = {name for names in SEAM.values() for name in names}
    for path in sorted(BROKER_DIR.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "noqa: SLF001" in line:
                names = set(re.findall(r"\.(_[a-z]\w*)", line))
                assert names, f"{path.name}:{number} has noqa: SLF001 but no private name: {line.strip()}"
                assert names <= listed, f"{path.name}:{number} is not a seam line: {line.strip()}"


def test_process_wide_patches_are_applied_only_while_a_broker_runs(fleet_dir):
    stock_init = vars(Session)["_init_states"]
    import fleet.broker.hardened  # noqa: F401 - importing the broker patches nothing

    assert not patches.active()
    assert vars(Session)["_init_states"] is stock_init
    broker = start_in_thread(Settings(data_dir=fleet_dir, mqtt_port=0))
    try:
        assert patches.active()
        assert isinstance(Session().transitions, SessionState)
    finally:
        broker.stop()
    assert not patches.active()
    assert vars(Session)["_init_states"] is stock_init
    assert not isinstance(Session().transitions, SessionState)
