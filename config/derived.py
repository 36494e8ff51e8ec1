"""The derived fields of a report (disk_percent, memory_percent, load1, ...), each defined once from its ``metrics``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

# Every function here takes a report's ``metrics`` object: a validated report's (config/payloads.py), or the
# JSON a collector stored from one. Decoded JSON holds plain dicts and lists, so exact type tests suffice;
# they are cheap (the collector derives a history row from every report) and keep a bool from counting as a
# number. The validator lets only finite numbers through where these fields come from; the checks below hold
# for any other input too.

# Where a field is one value of the report, its path in ``metrics`` (the web's SQL sorts by it there).
CPU_PERCENT_PATH = ("cpu_percent",)
MEMORY_PERCENT_PATH = ("memory", "percent")
(_CPU,) = CPU_PERCENT_PATH
_MEMORY, _PERCENT = MEMORY_PERCENT_PATH
_INF = math.inf


def number(value: Any) -> float | None:
    """A finite int or float as a float; None for anything else (a bool, NaN, an infinity, text, absent)."""
    kind = type(value)
    if kind is float:
        return value if -_INF < value < _INF else None
    return float(value) if kind is int else None


def counter(value: Any) -> int | float | None:
    """A finite int or float as it was sent (a byte counter keeps every digit); None for anything else."""
    kind = type(value)
    if kind is float:
        return value if -_INF < value < _INF else None
    return value if kind is int else None


def cpu_percent(metrics: Mapping[str, Any]) -> float | None:
    """CPU busy, percent of all cores."""
    return number(metrics.get(_CPU))


def memory_percent(metrics: Mapping[str, Any]) -> float | None:
    """Memory used, percent."""
    memory = metrics.get(_MEMORY)
    return number(memory.get(_PERCENT)) if type(memory) is dict else None


def swap_percent(metrics: Mapping[str, Any]) -> float | None:
    """Swap used, percent."""
    return number(metrics.get("swap_percent"))


def fullest_disk(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The disk with the highest percent used (the first of equals), or None when no disk has a percent.

    The agent reports real filesystems only, so this is the fullest real filesystem.
    """
    disks = metrics.get("disks")
    if type(disks) is not list:
        return None
    fullest: dict[str, Any] | None = None
    top = -_INF
    for disk in disks:
        if type(disk) is dict:
            value: Any = disk.get("percent")
            kind = type(value)
            # The exact types keep a bool out; NaN and the infinities fail the comparison.
            if (kind is float or kind is int) and top < value < _INF:
                fullest, top = disk, value
    return fullest


def disk_percent(metrics: Mapping[str, Any]) -> float | None:
    """Percent used of the fullest real filesystem (see fullest_disk), whichever mount that is."""
    disk = fullest_disk(metrics)
    return None if disk is None else float(disk["percent"])


def disk_mount(metrics: Mapping[str, Any]) -> str | None:
    """The mount point disk_percent comes from, or None."""
    disk = fullest_disk(metrics)
    mount = None if disk is None else disk.get("mount")
    return mount if type(mount) is str else None


def load1(metrics: Mapping[str, Any]) -> float | None:
    """The 1-minute load average."""
    load = metrics.get("load_avg")
    return number(load[0]) if type(load) is list and load else None


def load5(metrics: Mapping[str, Any]) -> float | None:
    """The 5-minute load average."""
    load = metrics.get("load_avg")
    return number(load[1]) if type(load) is list and len(load) > 1 else None


def load15(metrics: Mapping[str, Any]) -> float | None:
    """The 15-minute load average."""
    load = metrics.get("load_avg")
    return number(load[2]) if type(load) is list and len(load) > 2 else None


def net_bytes_sent(metrics: Mapping[str, Any]) -> int | float | None:
    """Bytes sent over every interface since boot, as the agent counted them."""
    net = metrics.get("net")
    return counter(net.get("bytes_sent")) if type(net) is dict else None


def net_bytes_recv(metrics: Mapping[str, Any]) -> int | float | None:
    """Bytes received over every interface since boot, as the agent counted them."""
    net = metrics.get("net")
    return counter(net.get("bytes_recv")) if type(net) is dict else None


# Every derived number by the name history points, alert rules, the API and /metrics give it: measurements
# (floats) and byte counters (as sent).
MEASURES: dict[str, Callable[[Mapping[str, Any]], float | None]] = {
    "cpu_percent": cpu_percent, "memory_percent": memory_percent, "swap_percent": swap_percent,
    "disk_percent": disk_percent, "load1": load1, "load5": load5, "load15": load15,
}
COUNTERS: dict[str, Callable[[Mapping[str, Any]], int | float | None]] = {
    "net_bytes_sent": net_bytes_sent, "net_bytes_recv": net_bytes_recv,
}
FIELDS: dict[str, Callable[[Mapping[str, Any]], int | float | None]] = {**MEASURES, **COUNTERS}


def derive(metrics: Mapping[str, Any]) -> dict[str, int | float | str | None]:
    """Every derived field of a report, and ``disk_mount``: which filesystem disk_percent is."""
    values: dict[str, int | float | str | None] = {name: read(metrics) for name, read in FIELDS.items()}
    values["disk_mount"] = disk_mount(metrics)
    return values
