"""The mission across a network: the server in this namespace, agents and readers on other hosts (tests/netns.py).

One story, run on the embedded broker and on Debian's Mosquitto (`fleet mosquitto-config`, `fleet collector`,
`fleet web`): agents on two hosts verify the server's certificate by its address; `mosquitto_sub` on a third
host reads with the reader key, naming the server by a `--cert-name` DNS name; the API and the dashboard answer
another host;
then one agent's link is cut: its machine goes stale, then offline, its outbox holds what it measured, and when
the link returns every report arrives once, in order.

On the embedded broker the server side is README's "Putting an agent on a machine" as written: `fleet org add
acme --json`, `fleet up --host 0.0.0.0`, the CA copied to the machine, and on it `FLEET_KEY=… fleet agent
--broker mqtts://SERVER:PORT --org acme --ca …/etc/fleet/ca.pem` (free ports instead of 8883 and 8080, and a
1 s interval through the environment, so the story takes seconds).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleet.config.tls import ca_fingerprint
from fleet.up import stop_process
from tests.helpers import bearer, free_port, wait_for
from tests.mosquitto.process import MOSQUITTO, accepts_tls
from tests.netns import Host, Lan

pytestmark = [pytest.mark.slow, pytest.mark.netns]

FLEET = str(Path(sys.executable).with_name("fleet"))  # the checkout's virtual environment, as README installs it
README = Path(__file__).resolve().parents[2] / "README.md"
DNS_NAME = "fleet.example.test"  # what hosts on this LAN call the server besides its address (a --cert-name)
UNNAMED = "other.example.test"  # resolves to the server too, but its certificate does not carry it
ORG = "acme"
API_POLL_S = 0.2
PORT_ATTEMPTS = 5  # free ports another test may take before fleet up binds them
INTERVAL = "1"  # agent reports a second: stale after 3 s, offline once its keepalive (5 s) runs out 1.5 times
FETCH = """import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + sys.argv[2]} if sys.argv[2] else {})
with urllib.request.urlopen(req, timeout=10) as res:
    print(json.dumps({"status": res.status, "type": res.headers.get("Content-Type"), "body": res.read().decode()}))
"""


@dataclass
class Server:
    """What runs in this namespace: broker, collector and web, with their ports and data dir."""

    data_dir: Path
    mqtt_port: int
    http_port: int
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start(self, name: str, *args: str, cwd: Path | None = None) -> Path:
        """Start ``fleet ARGS`` here, its output in a file; returns the file."""
        log = self.data_dir.parent / f"{name}.log"
        with open(log, "w") as out:
            self.procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                               env=_env(FLEET_RELOAD_INTERVAL_S="0.5")))
        self.logs.append(log)
        return log

    def api(self, path: str, token: str) -> dict:
        """GET ``path`` of the web app from this namespace."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", headers=bearer(token))
        with urllib.request.urlopen(req, timeout=5) as res:
            return json.loads(res.read())

    def machine_status(self, token: str, machine: str) -> str | None:
        """The machine's status in /api/fleet, or None while unknown (or the web app not up yet)."""
        try:
            listed = self.api("/api/fleet", token)["data"]
        except OSError:
            return None
        return next((m["status"] for m in listed if m["machine_id"] == machine), None)

    def wait_status(self, token: str, machine: str, status: str, timeout: float) -> None:
        """Poll /api/fleet until ``machine`` has ``status`` (a few times a second: the API is rate limited); on
        a timeout, the end of each part's output comes with the error."""
        try:
            wait_for(lambda: self.machine_status(token, machine) == status, timeout=timeout, interval=API_POLL_S,
                     message=f"{machine} {status}")
        except AssertionError as exc:
            tails = "\n".join(f"--- {log.name}:\n{_tail(log)}" for log in self.logs)
            raise AssertionError(f"{exc}\n{tails}") from None

    def stop(self) -> None:
        """SIGTERM every part, newest first, and reap it."""
        for proc in reversed(self.procs):
            stop_process(proc, timeout=20)


def readme_commands() -> list[list[str]]:
    """The commands of README's "Putting an agent on a machine", split as the shell would, comments dropped."""
    section = README.read_text().split("## Putting an agent on a machine", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README.md: no sh block under 'Putting an agent on a machine'"
    commands = [shlex.split(line, comments=True) for line in block.group(1).splitlines()]
    return [command for command in commands if command]


def readme_command(first: str, *then: str) -> list[str]:
    """README's command starting (after VAR=value assignments) with ``first`` and ``then``, e.g. ("fleet", "up")."""
    for command in readme_commands():
        words = [word for word in command if not re.match(r"^[A-Z_]+=", word)]
        if words[: 1 + len(then)] == [first, *then]:
            return command
    raise AssertionError(f"README's 'Putting an agent on a machine' has no `{' '.join((first, *then))}` any more")


def _fleet_argv(command: list[str]) -> list[str]:
    assert command[0] == "fleet", command
    return [FLEET, *command[1:]]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    return {**env, **extra}


def _output(log: Path) -> str:
    return log.read_text(errors="replace")


def _tail(log: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a part's output, for an error message."""
    return "\n".join(_output(log).splitlines()[-lines:])


def _fleet(*args: str, cwd: Path) -> str:
    done = subprocess.run([FLEET, *args], capture_output=True, text=True, cwd=cwd, env=_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@contextmanager
def embedded_server(work: Path, cert_name: str) -> Iterator[Server]:
    """README's `fleet up --host 0.0.0.0`, plus `--cert-name NAME`: every part in one process, every interface.
    Ports another test took between free_port() and the bind are tried again with new ones."""
    up = _fleet_argv(readme_command("fleet", "up"))  # fleet up --host 0.0.0.0
    for _ in range(PORT_ATTEMPTS):
        server = Server(work / "fleet-data", free_port(), free_port())
        try:
            log = server.start("up", *up, "--cert-name", cert_name, "--mqtt-port", str(server.mqtt_port),
                               "--http-port", str(server.http_port), cwd=work)
            proc = server.procs[-1]
            wait_for(lambda log=log, proc=proc: "Press Ctrl-C" in _output(log) or proc.poll() is not None,
                     timeout=60, message="fleet up started")
            if proc.poll() is None:
                yield server
                return
            if "Address already in use" not in _output(log):
                raise AssertionError(f"fleet up exited:\n{_tail(log)}")
        finally:
            server.stop()
    raise AssertionError(f"fleet up found its ports taken {PORT_ATTEMPTS} times")


@contextmanager
def mosquitto_server(work: Path, cert_name: str) -> Iterator[Server]:
    """Debian's Mosquitto on `fleet mosquitto-config --host 0.0.0.0 --cert-name NAME`, plus `fleet collector`
    and `fleet web --host 0.0.0.0` pointed at it."""
    if not os.path.exists(MOSQUITTO):
        pytest.fail("Debian's mosquitto is missing (apt-get install mosquitto)")
    server = Server(work / "fleet-data", free_port(), free_port())
    try:
        # The listener for machine certificates on a port known to be free (its default, the next one, may not be).
        out = _fleet("mosquitto-config", "--out", "mosquitto", "--host", "0.0.0.0", "--cert-name", cert_name,
                     "--mqtt-port", str(server.mqtt_port), "--cert-port", str(free_port()), cwd=work)
        server.logs.append(work / "mosquitto-config.log")
        server.logs[-1].write_text(out)
        server.start("mosquitto", MOSQUITTO, "-c", str(work / "mosquitto" / "mosquitto.conf"))
        # The collector starts once Mosquitto listens: a refused first connect would cost it a backoff.
        wait_for(lambda: accepts_tls(server.mqtt_port, server.data_dir / "certs" / "ca.pem"), timeout=30,
                 message="mosquitto listening")
        url = f"mqtts://127.0.0.1:{server.mqtt_port}"
        server.start("collector", FLEET, "collector", "--broker", url, cwd=work)
        web = server.start("web", FLEET, "web", "--host", "0.0.0.0", "--http-port", str(server.http_port),
                           "--broker", url, cwd=work)
        wait_for(lambda: "dashboard:" in _output(web), timeout=60, message="fleet web started")
        yield server
    finally:
        server.stop()


SERVERS = {"embedded": embedded_server, "mosquitto": mosquitto_server}


def start_agent(host: Host, home: Path, server: str, port: int, agent_key: str) -> subprocess.Popen:
    """README's agent command on ``host``, its paths under ``home`` (the host's own files, where its outbox
    lives), naming the server ``server`` on ``port``."""
    command = readme_command("fleet", "agent")
    env = dict(word.split("=", 1) for word in command if re.match(r"^[A-Z_]+=", word))
    assert env == {"FLEET_KEY": "<agent_key>"}, env
    argv = [word.replace("mqtts://server:8883", f"mqtts://{server}:{port}") for word in command[len(env):]]
    argv = [str(home / word.lstrip("/")) if word.startswith("/") else word for word in argv]
    log = open(home / "agent.log", "w")
    return host.popen(*_fleet_argv(argv), cwd=home, stdout=log, stderr=subprocess.STDOUT,
                      env=_env(FLEET_KEY=agent_key, FLEET_INTERVAL=INTERVAL, FLEET_RECONNECT_MAX_S="1"))


def install_ca(work: Path, home: Path) -> Path:
    """README's `scp fleet-data/certs/ca.pem machine:/etc/fleet/`: the CA copied into the host's own files."""
    scp, source, target = readme_command("scp")
    directory = home / target.split(":", 1)[1].lstrip("/")
    directory.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(work / source, directory))


def fetch(host: Host, url: str, token: str = "") -> dict:
    """GET ``url`` from ``host``: {"status", "type", "body"}."""
    done = host.run(sys.executable, "-c", FETCH, url, token)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def held(home: Path, machine: str) -> list[tuple[str, int]]:
    """(session, seq) of the reports the agent on that machine holds, not yet acknowledged by the broker."""
    path = home / "fleet-data" / f"agent-{ORG}-{machine}.db"
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        reports = [json.loads(payload) for (payload,) in db.execute("SELECT payload FROM outbox ORDER BY id")]
    return [(report["session"], report["seq"]) for report in reports]


def _sessions(points: list[dict]) -> dict[str, list[int]] | None:
    """History points (oldest first) as {session: [seq, …]}, once there are two sessions (before and after a cut)."""
    sessions: dict[str, list[int]] = {}
    for point in points:
        sessions.setdefault(point["session"], []).append(point["seq"])
    return sessions if len(sessions) >= 2 else None


@pytest.mark.parametrize("kind", sorted(SERVERS))
def test_agents_on_other_hosts_verify_the_server_and_survive_a_cut(lan: Lan, tmp_path: Path, kind: str) -> None:
    work = tmp_path
    org_add = readme_command("fleet", "org", "add")  # fleet org add acme --json
    assert org_add[3] == ORG
    keys = json.loads(_fleet(*org_add[1:], cwd=work))
    host_a, host_b, host_c = lan.add_host("host-a"), lan.add_host("host-b"), lan.add_host("host-c")
    for host in (host_a, host_b, host_c):
        host.resolve({DNS_NAME: lan.server_ip, UNNAMED: lan.server_ip})
    with SERVERS[kind](work, DNS_NAME) as server:
        ca = server.data_dir / "certs" / "ca.pem"
        fingerprint = ca_fingerprint(ca.read_bytes())
        printed = "\n".join(_output(log) for log in server.logs)
        assert f"CA SHA-256:   {fingerprint}" in printed
        names = next(line for line in printed.splitlines() if "cert names:" in line).split(":", 1)[1]
        assert {lan.server_ip, DNS_NAME, "127.0.0.1", "localhost"} <= set(names.strip().split(", "))
        # Agents on two hosts name the server by its address.
        home_a, home_b, home_c = (work / host.name for host in (host_a, host_b, host_c))
        ca_a = install_ca(work, home_a)
        agent_a = start_agent(host_a, home_a, lan.server_ip, server.mqtt_port, keys["agent_key"])
        install_ca(work, home_b)
        start_agent(host_b, home_b, lan.server_ip, server.mqtt_port, keys["agent_key"])
        reader = keys["reader_key"]
        # What the operator compares on the machine (docs/deployment.md) is what the server printed.
        seen = host_a.run("sh", "-c", f"openssl x509 -in {ca_a} -outform der | sha256sum")
        assert seen.stdout.split()[0] == fingerprint, seen.stderr
        for machine in ("host-a", "host-b"):
            server.wait_status(reader, machine, "online", timeout=30)
        assert agent_a.poll() is None

        # A reader on a third host: mosquitto_sub with the reader key, naming the server by its --cert-name, and
        # the API and dashboard over HTTP.
        ca_c = install_ca(work, home_c)
        sub = host_c.run("mosquitto_sub", "-h", DNS_NAME, "-p", str(server.mqtt_port), "--cafile", str(ca_c),
                         "-u", f"{ORG}/reader", "-P", reader, "-t", f"fleet/{ORG}/+/report", "-v", "-C", "6",
                         "-W", "20")
        assert sub.returncode == 0, sub.stderr
        assert {line.split()[0] for line in sub.stdout.splitlines()} == \
            {f"fleet/{ORG}/host-a/report", f"fleet/{ORG}/host-b/report"}
        # A name the certificate does not carry is refused, in one line that says so.
        refused = host_c.run(FLEET, "agent", "--once", "--broker", f"mqtts://{UNNAMED}:{server.mqtt_port}", "--org",
                             ORG, "--ca", str(ca_c), env=_env(FLEET_KEY=keys["agent_key"]))
        assert refused.returncode == 1
        assert "Hostname mismatch" in refused.stderr, refused.stderr
        assert refused.stderr.count("\n") == 1, refused.stderr
        web = f"http://{lan.server_ip}:{server.http_port}"
        listed = fetch(host_c, f"{web}/api/fleet", reader)
        assert listed["status"] == 200
        assert {m["machine_id"]: m["status"] for m in json.loads(listed["body"])["data"]} == \
            {"host-a": "online", "host-b": "online"}
        page = fetch(host_c, f"{web}/")
        assert (page["status"], page["type"].split(";")[0]) == (200, "text/html")
        assert "<html" in page["body"]

        # host-a's link is cut: stale, then offline (its keepalive runs out); meanwhile it keeps measuring.
        host_a.cut()
        server.wait_status(reader, "host-a", "stale", timeout=15)
        server.wait_status(reader, "host-a", "offline", timeout=20)
        def three_held() -> list[tuple[str, int]] | None:
            reports = held(home_a, "host-a")
            return reports if len(reports) >= 3 else None

        kept = wait_for(three_held, timeout=15, message="host-a's outbox holding what it measured")
        assert server.machine_status(reader, "host-b") == "online"

        # The link returns: everything host-a measured arrives once, in order, and it is online again.
        host_a.restore()
        server.wait_status(reader, "host-a", "online", timeout=30)
        wait_for(lambda: not held(home_a, "host-a"), timeout=30, message="host-a's outbox sent")
        sessions = wait_for(lambda: _sessions(server.api("/api/fleet/host-a/history?since=0", reader)["points"]),
                            timeout=15, interval=API_POLL_S, message="reports of host-a's new connection")
        for seqs in sessions.values():
            assert seqs == list(range(len(seqs))), seqs  # each session's reports all there, once, in order
        assert all(seq in sessions.get(session, ()) for session, seq in kept)  # what the outbox held among them
        events = server.api("/api/events?machine=host-a", reader)["events"]
        changes = [e["new_status"] for e in events]
        assert changes[:4] == ["online", "stale", "offline", "online"], changes
        assert agent_a.poll() is None
