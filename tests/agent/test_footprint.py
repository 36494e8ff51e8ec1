"""The agent process does not load what it never uses (its RSS budget is 25 MB), and nothing breaks for it.

Each check runs in a fresh interpreter: what a module imports is only visible before anything else has.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LOADED = """
import sys
before = set(sys.modules)  # whatever this interpreter loads at start-up is not the agent's doing
import fleet.cli
fleet.cli.prepare_agent_process()  # what `fleet agent` does first
import fleet.launch, fleet.agent.runner, fleet.agent.connection, fleet.agent.metrics, fleet.agent.outbox
from fleet.agent.deferred import Deferred
print(sorted(m for m in ("click", "http.client", "email", "tomllib", "_hashlib", "hmac", "secrets", "inspect",
                         "ipaddress", "base64", "tokenize", "textwrap") if m in sys.modules and m not in before
             and not isinstance(sys.modules[m], Deferred)))
print(isinstance(sys.modules["urllib.request"], Deferred), isinstance(sys.modules["hashlib"], Deferred))
"""

STILL_WORKS = """
import sys
import fleet.cli
fleet.cli.prepare_agent_process()
import fleet.launch, fleet.agent.runner
from fleet.agent.deferred import Deferred
import urllib.request
assert isinstance(urllib.request, Deferred) and "http.client" not in sys.modules
assert isinstance(urllib.request.getproxies(), dict)  # the first attribute read imports the real module
assert not isinstance(sys.modules["urllib.request"], Deferred) and urllib.request is sys.modules["urllib.request"]
assert "http.client" in sys.modules
from urllib.request import Request
assert Request("http://127.0.0.1/").full_url == "http://127.0.0.1/"

import importlib.util, hashlib
assert isinstance(hashlib, Deferred) and importlib.util.find_spec("hashlib").name == "hashlib"
from hashlib import md5
assert md5(b"").hexdigest() == "d41d8cd98f00b204e9800998ecf8427e"
assert hashlib.sha256(b"").hexdigest().startswith("e3b0c442")  # the stand-in still forwards
import hmac, secrets
assert hmac.new(b"k", b"m", "sha256").hexdigest().startswith("b60090e3") and len(secrets.token_hex(8)) == 16

import json, traceback
assert isinstance(sys.modules["tokenize"], Deferred)
try:
    json.loads("{")
except ValueError:
    text = traceback.format_exc()  # source lines come from linecache, which reads files with tokenize
assert "return _default_decoder.decode(s)" in text and not isinstance(sys.modules["tokenize"], Deferred)
print("ok")
"""

RACE = """
import sys, threading
import fleet.agent.deferred as deferred
for name in deferred.UNUSED:
    sys.modules.pop(name, None)
deferred.defer_unused()
import urllib.request, hashlib, base64, inspect, ipaddress, tokenize, textwrap
stand_ins = [urllib.request, hashlib, base64, inspect, ipaddress, tokenize, textwrap]
assert sorted(m.__name__ for m in stand_ins) == sorted(deferred.UNUSED)
start = threading.Barrier(8)
results = []

def use():
    start.wait()
    results.append((urllib.request.getproxies, hashlib.sha1, base64.b64encode, inspect.cleandoc,
                    ipaddress.ip_address("::1"), tokenize.open, textwrap.indent))

threads = [threading.Thread(target=use) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert len(results) == 8 and len(set(map(str, results))) == 1
for module in stand_ins:
    real = sys.modules[module.__name__]
    assert not isinstance(real, deferred.Deferred) and module.__deferred_module__ is real
print("ok")
"""


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


OTHER_PARTS = """
import sys
import fleet.cli, fleet.commands, fleet.up, fleet.broker.server, fleet.collector.service, fleet.web.app
import fleet.config.mqtt, fleet.agent.simulate
from fleet.agent.deferred import Deferred
print(sorted(name for name, module in sys.modules.items() if isinstance(module, Deferred)))
"""


def test_only_the_agent_process_gets_stand_in_modules():
    """The stand-ins are the agent's alone: other commands (and config/mqtt.py's importers) import the real modules."""
    assert run(OTHER_PARTS) == "[]"


def test_the_agent_does_not_load_click_urllib_request_hashlib_or_tomllib():
    assert run(LOADED).splitlines() == ["[]", "True True"]


def test_a_deferred_module_imports_itself_on_first_use():
    assert run(STILL_WORKS) == "ok"


def test_threads_using_a_deferred_module_at_once_all_get_the_real_one():
    assert run(RACE) == "ok"
