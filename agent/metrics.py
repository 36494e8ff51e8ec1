"""What the agent measures (psutil) and the system inventory, as small registered collectors.

Each collector returns one field of the report's ``metrics`` object, with its units noted. A
collector that fails (permission, missing sensor) leaves its field out and logs once; the agent
keeps running.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fleet.agent.processes import Check, ProcessSampler
from fleet.agent.textfile import TextfileCollector

AGENT_VERSION = "0.1.0"
log = logging.getLogger("fleet.agent")

PSEUDO_FILESYSTEMS = frozenset({
    "tmpfs", "devtmpfs", "overlay", "squashfs", "proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue",
    "debugfs", "tracefs", "securityfs", "pstore", "bpf", "autofs", "configfs", "fusectl", "hugetlbfs",
    "nsfs", "ramfs", "rpc_pipefs", "binfmt_misc", "efivarfs", "fuse.lxcfs", "fuse.gvfsd-fuse", "nfsd",
    "selinuxfs", "zram", "iso9660",
})
MAX_DISKS = 32


@dataclass
class CollectorState:
    """What collectors remember between reports (previous net counters for rates; failures logged once)."""

    last_net: tuple[float, int, int] | None = None
    failed: set[str] = field(default_factory=set)
    textfile: TextfileCollector | None = None  # --textfile-dir
    processes: ProcessSampler | None = None  # top processes (previous CPU samples) and --process checks


def collector_state(textfile_dir: str = "", process_checks: tuple[str, ...] = (), top: bool = True) -> CollectorState:
    """State for the configured optional collectors (ValueError for a bad --process)."""
    checks = tuple(Check.parse(spec) for spec in dict.fromkeys(process_checks))
    return CollectorState(textfile=TextfileCollector(textfile_dir) if textfile_dir else None,
                          processes=ProcessSampler(checks) if top or checks else None)


def cpu_percent(_state: CollectorState) -> float:
    """CPU busy since the previous call, percent of all cores (0-100)."""
    return psutil.cpu_percent(interval=None)


def cpu_count(_state: CollectorState) -> int:
    """Logical CPUs (count)."""
    return psutil.cpu_count() or 1


def load_avg(_state: CollectorState) -> list[float]:
    """1, 5 and 15 minute load averages (runnable tasks)."""
    return [round(x, 2) for x in os.getloadavg()]


def memory(_state: CollectorState) -> dict[str, Any]:
    """RAM: total and used in bytes, used percent."""
    vm = psutil.virtual_memory()
    return {"total": int(vm.total), "used": int(vm.total - vm.available), "percent": float(vm.percent)}


def swap_percent(_state: CollectorState) -> float:
    """Swap used, percent (0 when there is no swap)."""
    return float(psutil.swap_memory().percent)


def disks(_state: CollectorState) -> list[dict[str, Any]]:
    """Real filesystems (pseudo ones skipped): mount point, total and used bytes, used percent."""
    result: list[dict[str, Any]] = []
    seen: set[str] = set()
    for part in psutil.disk_partitions(all=False):
        if part.fstype in PSEUDO_FILESYSTEMS or part.device in seen or len(result) >= MAX_DISKS:
            continue
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except (PermissionError, OSError):
            continue
        seen.add(part.device)
        result.append({"mount": part.mountpoint[:256], "total": int(usage.total), "used": int(usage.used),
                       "percent": float(usage.percent)})
    return result


def net(state: CollectorState) -> dict[str, float]:
    """Network totals since boot (bytes) and per-second rates since the previous report (bytes/s)."""
    counters = psutil.net_io_counters()
    now = time.monotonic()
    result: dict[str, float] = {"bytes_sent": int(counters.bytes_sent), "bytes_recv": int(counters.bytes_recv)}
    if state.last_net is not None:
        then, sent, recv = state.last_net
        elapsed = max(now - then, 1e-6)
        result["sent_per_s"] = round(max(0, counters.bytes_sent - sent) / elapsed, 1)
        result["recv_per_s"] = round(max(0, counters.bytes_recv - recv) / elapsed, 1)
    state.last_net = (now, counters.bytes_sent, counters.bytes_recv)
    return result


def uptime_s(_state: CollectorState) -> int:
    """Seconds since boot."""
    return int(time.time() - psutil.boot_time())


def process_count(_state: CollectorState) -> int:
    """Running processes (count)."""
    return len(psutil.pids())


def custom(state: CollectorState) -> dict[str, float] | None:
    """Series of the textfile directory's ``*.prom`` files (their own units); None when not configured."""
    return state.textfile.collect() if state.textfile is not None else None


def process_fields(state: CollectorState) -> dict[str, Any]:
    """``processes`` (top 5 by CPU: percent of one core, memory percent) and ``process_counts`` (count)."""
    return state.processes.sample() if state.processes is not None else {}


COLLECTORS: list[tuple[str, Callable[[CollectorState], Any]]] = [
    ("cpu_percent", cpu_percent),
    ("cpu_count", cpu_count),
    ("load_avg", load_avg),
    ("memory", memory),
    ("swap_percent", swap_percent),
    ("disks", disks),
    ("net", net),
    ("uptime_s", uptime_s),
    ("process_count", process_count),
    ("custom", custom),
]
# Collectors that return several fields of ``metrics`` at once (one pass over the process table).
FIELD_GROUPS: list[tuple[str, Callable[[CollectorState], dict[str, Any]]]] = [
    ("processes", process_fields),
]


def collect_metrics(state: CollectorState,
                    collectors: list[tuple[str, Callable[[CollectorState], Any]]] = COLLECTORS,
                    groups: list[tuple[str, Callable[[CollectorState], dict[str, Any]]]] = FIELD_GROUPS
                    ) -> dict[str, Any]:
    """Run every collector; a failing one (or one with nothing to say: None) leaves its field out, logged once."""
    metrics: dict[str, Any] = {}
    for name, collector in [*collectors, *groups]:
        try:
            value = collector(state)
        except Exception as exc:  # noqa: BLE001 - one broken sensor must not stop the agent
            if name not in state.failed:
                state.failed.add(name)
                log.warning("metric %s unavailable: %s", name, exc)
            continue
        if value is None:
            continue
        if (name, collector) in groups:
            metrics.update(value)
        else:
            metrics[name] = value
    return metrics


def prime_cpu(state: CollectorState | None = None) -> None:
    """psutil's first cpu_percent() call returns 0.0; start its measuring window (and the processes') now."""
    psutil.cpu_percent(interval=None)
    if state is not None and state.processes is not None:
        try:
            state.processes.sample()
        except Exception as exc:  # noqa: BLE001 - collect_metrics logs it again if it persists
            log.warning("process sampling unavailable: %s", exc)


def hardware_id(machine_id_file: Path = Path("/etc/machine-id")) -> str:
    """Stable id of this hardware: the MAC as 0x…, or /etc/machine-id when the MAC is random or missing."""
    node = uuid.getnode()
    if not node >> 40 & 0x01:  # uuid.getnode() sets the multicast bit when it had to invent a MAC
        return f"0x{node:012x}"
    try:
        text = machine_id_file.read_text().strip()
        if text:
            return f"mid-{text[:64]}"
    except OSError:
        pass
    return f"0x{node:012x}"


def system_info(hw_id: str) -> dict[str, str]:
    """Inventory: hostname, OS and version, platform, architecture, Python, hardware id, agent version."""
    uname = platform.uname()
    os_version = uname.release
    try:
        os_release = platform.freedesktop_os_release()
        os_version = os_release.get("PRETTY_NAME", os_version)
    except OSError:
        pass
    return {
        "hostname": socket.gethostname()[:256],
        "os": uname.system,
        "os_version": os_version[:256],
        "platform": platform.platform()[:256],
        "architecture": uname.machine,
        "python_version": sys.version.split()[0],
        "hardware_id": hw_id,
        "agent_version": AGENT_VERSION,
    }
