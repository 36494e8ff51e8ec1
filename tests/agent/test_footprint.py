"""The agent process does not load what it never uses (its RSS budget is 25 MB), and nothing breaks for it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LOADED = """
import sys
import fleet.cli, agent.runner, agent.connection
print(sorted(m for m in ("http.client", "email", "tomllib") if m in sys.modules))
"""

STILL_WORKS = """
import config.mqtt
import urllib.request
from urllib.request import Request
assert isinstance(urllib.request.getproxies(), dict)
assert Request("http://127.0.0.1/").full_url == "http://127.0.0.1/"
import sys
assert sys.modules["urllib.request"] is urllib.request and "http.client" in sys.modules
print("ok")
"""


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_agent_does_not_import_urllib_request_or_tomllib():
    assert run(LOADED) == "[]"


def test_the_deferred_module_imports_itself_on_first_use():
    assert run(STILL_WORKS) == "ok"
