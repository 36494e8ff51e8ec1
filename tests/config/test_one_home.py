"""Each contract constant has one home in config/: no part keeps its own copy.

Copies drift apart: the CONNACK table, the wildcard-host rule, the statuses and the heartbeat key are each
used by several parts, and each is defined once. This reads the parts' source with ``ast``
and fails on a literal that belongs to config/: a machine status, the heartbeat key, a wildcard bind
address, a CONNACK reason or a table of paho's MQTT 5 reason codes.

Shared code has one home too, checked on the installed packages' source: the heartbeat SQL lives in
fleet.store.heartbeats (the broker and the collector write their heartbeats through it, the web reads them),
and the GC threshold policy in fleet.launch, applied by ``fleet broker`` and ``fleet collector`` alone.
"""

from __future__ import annotations

import ast
import gc
import importlib
import re
import time
from pathlib import Path

import pytest

from fleet import launch
from fleet.config import connack, settings, status
from fleet.store import heartbeats

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("agent", "broker", "collector", "web", "store", "fleet")
CONTRACT_STRINGS = {
    *status.MACHINE_STATUSES, status.EVICTED, status.BROKER_CONNECTED,
    *(host for host in settings.WILDCARD_HOSTS if host), *connack.REASONS.values(),
}
PAHO_REASON_CODES = {0x84, 0x85, 0x86, 0x87, 0x88}
INSTALLED = ("fleet", "fleet.config", "fleet.store", "fleet.broker", "fleet.agent", "fleet.collector", "fleet.web")
HEARTBEAT_SQL = re.compile(r"\b(INSERT\s+INTO|FROM|UPDATE)\s+heartbeats\b", re.IGNORECASE)


def installed_sources() -> list[Path]:
    """Every module of the installed fleet packages (their folders, wherever they are installed)."""
    files: set[Path] = set()
    for name in INSTALLED:
        for folder in importlib.import_module(name).__path__:
            files.update(path.resolve() for path in Path(folder).rglob("*.py"))
    return sorted(files)


def source_of(module: str) -> Path:
    """The file an installed module is loaded from."""
    return Path(importlib.import_module(module).__file__ or "").resolve()


def calls_in(path: Path, names: set[str]) -> list[tuple[str, str]]:
    """(innermost enclosing function or ``<module>``, called name) for each call in one module of a function
    or method named in ``names``."""
    found = []

    def visit(node: ast.AST, where: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            where = node.name
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in names:
                found.append((where, name))
        for child in ast.iter_child_nodes(node):
            visit(child, where)

    visit(ast.parse(path.read_text(), str(path)), "<module>")
    return found


def heartbeat_sql_in(path: Path) -> list[str]:
    """``file:line`` for each string in one module that reads or writes the heartbeats table."""
    return [f"{path}:{node.lineno}" for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and HEARTBEAT_SQL.search(node.value)]


def copies_in(path: Path) -> list[str]:
    """``file:line: value`` for each contract literal in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in CONTRACT_STRINGS:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
        if isinstance(node, ast.Dict) and PAHO_REASON_CODES & {k.value for k in node.keys
                                                               if isinstance(k, ast.Constant)}:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: a CONNACK reason code table")
    return found


@pytest.mark.parametrize("part", PARTS)
def test_parts_take_contract_constants_from_config(part):
    copies = [hit for path in sorted((ROOT / part).rglob("*.py")) for hit in copies_in(path)]
    assert copies == [], "contract constants copied outside config/:\n" + "\n".join(copies)


def test_the_homes_hold_what_the_parts_rely_on():
    assert status.MACHINE_STATUSES == ("online", "stale", "offline")
    assert connack.from_reason_code(0x87) == connack.NOT_AUTHORIZED == 5
    assert connack.describe(connack.BAD_CREDENTIALS) == "bad user name or password"
    assert connack.describe(99) == "return code 99"
    assert settings.local_host("0.0.0.0") == settings.local_host("::") == "127.0.0.1"
    assert settings.local_host("10.1.2.3") == "10.1.2.3"
    assert settings.Settings(host="").effective_broker_url == "mqtts://127.0.0.1:8883"


def test_the_heartbeat_sql_has_one_home():
    home = source_of("fleet.store.heartbeats")
    sources = installed_sources()
    assert home in sources
    assert heartbeat_sql_in(home), "the scan must see the home's own SQL"
    elsewhere = [hit for path in sources if path != home for hit in heartbeat_sql_in(path)]
    assert elsewhere == [], "heartbeat SQL outside fleet.store.heartbeats:\n" + "\n".join(elsewhere)


@pytest.mark.both_engines
def test_a_heartbeat_reads_back_as_its_last_write(db):
    assert heartbeats.read_heartbeat(db, status.COLLECTOR) is None
    now = time.time()
    heartbeats.write_heartbeat(db, status.COLLECTOR, now - 2, {status.BROKER_CONNECTED: True})
    heartbeats.write_heartbeat(db, status.COLLECTOR, now, {status.BROKER_CONNECTED: False, "orgs": ["acme"]})
    heartbeats.write_heartbeat(db, status.BROKER, now, {"connected": 3})
    assert heartbeats.read_heartbeat(db, status.COLLECTOR) == (now, {status.BROKER_CONNECTED: False, "orgs": ["acme"]})
    assert heartbeats.read_heartbeat(db, status.BROKER) == (now, {"connected": 3})
    assert db.query_one("SELECT count(*) FROM heartbeats") == (2,)


def test_the_gc_threshold_policy_has_one_home():
    home = source_of("fleet.launch")
    sources = installed_sources()
    assert home in sources
    assert calls_in(home, {"set_threshold"}), "the scan must see the home's own call"
    elsewhere = [f"{path}: {function}()" for path in sources if path != home
                 for function, _ in calls_in(path, {"set_threshold"})]
    assert elsewhere == [], "gc.set_threshold outside fleet.launch:\n" + "\n".join(elsewhere)


def test_only_fleet_broker_and_fleet_collector_apply_the_gc_policy():
    """Not ``fleet up``, nor a part started in-process: only the two commands that run one part alone."""
    policy = {"serve_alone", "collect_garbage_less_often"}
    callers = {(path, function) for path in installed_sources() for function, _ in calls_in(path, policy)}
    assert callers == {(source_of("fleet.commands"), "broker"), (source_of("fleet.commands"), "collector"),
                       (source_of("fleet.launch"), "serve_alone")}


def test_a_lone_process_raises_the_young_threshold_once():
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        seen = []
        launch.serve_alone(lambda settings: seen.append(gc.get_threshold()), settings.Settings())
        assert seen == [(launch.GC_YOUNG_THRESHOLD, 10, 10)]  # raised before the part runs
        launch.collect_garbage_less_often()
        assert gc.get_threshold() == (launch.GC_YOUNG_THRESHOLD, 10, 10)  # idempotent
        gc.set_threshold(launch.GC_YOUNG_THRESHOLD * 2, 10, 10)
        launch.collect_garbage_less_often()
        assert gc.get_threshold()[0] == launch.GC_YOUNG_THRESHOLD * 2  # never lowered
        gc.set_threshold(0, 10, 10)
        launch.collect_garbage_less_often()
        assert gc.get_threshold()[0] == 0  # a GC turned off stays off
    finally:
        gc.set_threshold(*saved)
