"""Each contract constant has one home in config/: no part keeps its own copy.

Copies drift apart: the CONNACK table, the wildcard-host rule, the statuses and the heartbeat key are each
used by several parts, and each is defined once. This reads the parts' source with ``ast``
and fails on a literal that belongs to config/: a machine status, the heartbeat key, a wildcard bind
address, a CONNACK reason or a table of paho's MQTT 5 reason codes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fleet.config import connack, settings, status

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("agent", "broker", "collector", "web", "fleet")
CONTRACT_STRINGS = {
    *status.MACHINE_STATUSES, status.EVICTED, status.BROKER_CONNECTED,
    *(host for host in settings.WILDCARD_HOSTS if host), *connack.REASONS.values(),
}
PAHO_REASON_CODES = {0x84, 0x85, 0x86, 0x87, 0x88}


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
