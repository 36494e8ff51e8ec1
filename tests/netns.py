"""Other hosts for tests: network namespaces on a small LAN with the root namespace, where the server runs.

A ``Lan`` is a bridge in the root namespace holding the server's address (``lan.server_ip``, e.g. 10.231.7.1);
each ``lan.add_host(name)`` is a network namespace joined to that bridge by a veth pair, with its own address
(``host.ip``), its own hostname (an UTS namespace per command) and its own /etc/hosts (``host.resolve``).
Commands run inside a host with ``host.run(...)`` / ``host.popen(...)`` (``ip netns exec``); ``host.cut()``
takes its link down (packets vanish, as when a cable is pulled) and ``host.restore()`` brings it back.
``lan.close()`` kills what the hosts still run and removes namespaces, links and files, also after a failure.

Safe to use from several pytest processes (xdist workers, other checkouts) at once: names carry a random
token, and subnets are chosen under a lock file among those no interface of the machine uses. A LAN left
behind by a killed run is removed by the next one (the bridge's alias names the pid that made it).
Needs root and iproute2; ``unavailable_reason()`` says why not, for a pytest skip.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IP = shutil.which("ip") or "/usr/sbin/ip"
LOCK_FILE = Path("/run/lock/fleet-test-netns.lock")
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/FILE over /etc/FILE
POOL = ipaddress.ip_network("10.231.0.0/16")  # one /24 per LAN
ALIAS_PREFIX = "fleet-test pid="
HOST_IFACE = "eth0"
LINK_UP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no iproute2, no netns support), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (the tests and CI run as root)"
    if not os.path.exists(IP):
        return "iproute2's `ip` is missing (apt-get install iproute2)"
    if shutil.which("unshare") is None or shutil.which("hostname") is None:
        return "util-linux's `unshare` or `hostname` is missing"
    probe = f"fltest-probe-{os.getpid()}"
    made = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run([IP, "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip ARGS``; a failure raises with ip's own message."""
    done = subprocess.run([IP, *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


@dataclass
class Host:
    """One other host: a network namespace with its own address, hostname and /etc/hosts."""

    name: str  # its hostname, e.g. "host-a"
    netns: str
    ip: str
    link: str  # the root-namespace end of its veth pair, on the bridge
    procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def command(self, *args: str) -> list[str]:
        """``args`` as a command line run inside this host (its network and its hostname)."""
        return [IP, "netns", "exec", self.netns, "unshare", "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', self.name, *args]

    def run(self, *args: str, timeout: float = 30.0, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run ``args`` inside this host to the end (text output captured unless told otherwise)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(*args), timeout=timeout, **kwargs)

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen:
        """Start ``args`` inside this host; it is killed by ``lan.close()`` if still running."""
        proc = subprocess.Popen(self.command(*args), **kwargs)
        self.procs.append(proc)
        return proc

    def resolve(self, names: dict[str, str]) -> None:
        """This host's /etc/hosts: localhost plus ``names`` (name -> address), as a DNS server would answer."""
        directory = NETNS_ETC / self.netns
        directory.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost", *(f"{addr} {name}" for name, addr in names.items())]
        (directory / "hosts").write_text("\n".join(lines) + "\n")

    def cut(self) -> None:
        """Take this host's link down: its packets to and from the LAN vanish (no reset, no error)."""
        ip("link", "set", self.link, "down")

    def restore(self) -> None:
        """Bring this host's link back up."""
        ip("link", "set", self.link, "up")
        _wait_link_up(self.netns)

    def stop(self) -> None:
        """SIGTERM what this host still runs (SIGKILL after a grace), and reap it."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)


def _wait_link_up(netns: str) -> None:
    deadline = time.monotonic() + LINK_UP_TIMEOUT_S
    while True:
        shown = json.loads(ip("-n", netns, "-j", "link", "show", HOST_IFACE).stdout)
        if shown and "LOWER_UP" in shown[0].get("flags", ()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{HOST_IFACE} of {netns} not up within {LINK_UP_TIMEOUT_S} s")
        time.sleep(0.02)


def _used_networks() -> list[ipaddress.IPv4Network]:
    shown = json.loads(ip("-j", "-4", "addr", "show").stdout)
    return [ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
            for link in shown for a in link.get("addr_info", ())]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_abandoned() -> None:
    """Remove the bridges, links and namespaces of LANs whose test process is gone (killed mid-test)."""
    for link in json.loads(ip("-j", "link", "show", "type", "bridge").stdout):
        alias = link.get("ifalias", "")
        if not alias.startswith(ALIAS_PREFIX):
            continue
        pid_text, _, token = alias[len(ALIAS_PREFIX):].partition(" token=")
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            _remove(token, link["ifname"])


def _remove(token: str, bridge: str) -> None:
    """Delete every namespace, veth, /etc/netns dir and the bridge of LAN ``token`` (what exists of them)."""
    for netns in ip("netns", "list", check=False).stdout.split():
        if netns.startswith(f"fltest-{token}-"):
            ip("netns", "del", netns, check=False)  # takes its end of the veth pair, and so the pair, with it
            shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)
    for link in json.loads(ip("-j", "link", "show").stdout):
        if link["ifname"].startswith(f"flv{token}"):
            ip("link", "del", link["ifname"], check=False)
    ip("link", "del", bridge, check=False)


class Lan:
    """A bridge in the root namespace (the server's side) and the hosts joined to it."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(4)
        self.bridge = f"flb{self.token}"
        self.hosts: list[Host] = []
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        with open(LOCK_FILE, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # choosing a subnet and taking it is one step for every process
            _sweep_abandoned()
            used = _used_networks()
            subnets = list(POOL.subnets(new_prefix=24))
            start = secrets.randbelow(len(subnets))
            free = next((net for net in subnets[start:] + subnets[:start]
                         if not any(net.overlaps(other) for other in used)), None)
            if free is None:
                raise RuntimeError(f"no free /24 left in {POOL}")
            self.network = free
            self.server_ip = str(free.network_address + 1)
            ip("link", "add", self.bridge, "type", "bridge")
            try:
                ip("link", "set", self.bridge, "alias", f"{ALIAS_PREFIX}{os.getpid()} token={self.token}")
                ip("addr", "add", f"{self.server_ip}/{free.prefixlen}", "dev", self.bridge)
                ip("link", "set", self.bridge, "up")
            except BaseException:
                ip("link", "del", self.bridge, check=False)
                raise

    def add_host(self, name: str) -> Host:
        """A new host named ``name`` (also its hostname) on this LAN, with the next free address."""
        index = len(self.hosts) + 1
        host = Host(name, f"fltest-{self.token}-{index}", str(self.network.network_address + 1 + index),
                    f"flv{self.token}{index}")
        self.hosts.append(host)  # before making anything, so close() removes what was made
        ip("netns", "add", host.netns)
        ip("link", "add", host.link, "type", "veth", "peer", "name", HOST_IFACE, "netns", host.netns)
        ip("link", "set", host.link, "master", self.bridge)
        ip("link", "set", host.link, "up")
        ip("-n", host.netns, "addr", "add", f"{host.ip}/{self.network.prefixlen}", "dev", HOST_IFACE)
        ip("-n", host.netns, "link", "set", HOST_IFACE, "up")
        ip("-n", host.netns, "link", "set", "lo", "up")
        _wait_link_up(host.netns)
        return host

    def close(self) -> None:
        """Stop the hosts' processes, then remove namespaces, links, files and the bridge; idempotent."""
        for host in self.hosts:
            host.stop()
        _remove(self.token, self.bridge)
        self.hosts.clear()
