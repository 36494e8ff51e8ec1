"""Top processes by CPU and process checks (``--process NAME``), from one pass over the process table.

A process's CPU percent needs two samples of its CPU time. psutil's ``cpu_percent(interval=…)`` sleeps
between them; the agent instead keeps each process's previous sample (keyed by pid and start time, so a
reused pid is a new process) from the last interval, so a report costs one pass and no sleep. CPU
percent is of one core, as in top and psutil (a process busy on two cores shows 200).

On Linux one read of ``/proc/<pid>/stat`` gives name, state, CPU times, start time and RSS (psutil reads
two or three files per process for the same, several times the cost, which the agent's CPU budget of
0.1% of a core at 10 s notices; docs/benchmarks.md). Elsewhere psutil does it. Processes that
vanish or deny access during the pass are skipped.

Checks: ``NAME`` counts processes whose name equals NAME (the kernel keeps 15 characters of it; a longer
NAME is compared with the program name from the command line, as psutil's ``name()`` does);
``re:REGEX`` counts processes whose command line (arguments joined by spaces; the name when it has none,
as for kernel threads) contains a match, like ``pgrep -f``. The agent itself and zombies are not counted.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil

from fleet.config.payloads import MAX_STRING

TOP_N = 5
COMM_LEN = 15  # the kernel's TASK_COMM_LEN - 1
MIN_WINDOW_S = 0.2  # a shorter window between samples says nothing about CPU use


@dataclass(frozen=True, slots=True)
class Proc:
    """One process as sampled: CPU time used so far (seconds) and resident memory (bytes)."""

    pid: int
    start: float  # start time, in whatever unit the source uses (an identity, compared only for equality)
    name: str
    cpu_s: float
    rss: int
    zombie: bool = False


@dataclass(frozen=True)
class Check:
    """One ``--process`` check: an exact name, or ``re:`` and a regex searched in the command line."""

    spec: str
    regex: re.Pattern[str] | None

    @classmethod
    def parse(cls, spec: str) -> Check:
        """Build a check from its setting; ValueError for an empty name or a bad regex."""
        if spec.startswith("re:"):
            try:
                return cls(spec, re.compile(spec[3:]))
            except re.error as exc:
                raise ValueError(f"bad regex in --process {spec!r}: {exc}") from exc
        if not spec or len(spec) > MAX_STRING:
            raise ValueError(f"bad --process name {spec[:40]!r}")
        return cls(spec, None)


def _linux_source(proc_root: str = "/proc") -> Callable[[], Iterator[Proc]]:
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")

    def scan() -> Iterator[Proc]:
        for pid in psutil.pids():
            try:
                fd = os.open(f"{proc_root}/{pid}/stat", os.O_RDONLY)
                try:
                    raw = os.read(fd, 2048)
                finally:
                    os.close(fd)
                # "pid (comm) state ppid …": comm may hold spaces and parentheses, so cut at the last ")".
                close = raw.rindex(b")")
                name = raw[raw.index(b"(") + 1:close].decode("utf-8", "replace")
                fields = raw[close + 2:].split()
                yield Proc(pid, float(fields[19]), name, (int(fields[11]) + int(fields[12])) / ticks,
                           int(fields[21]) * page, fields[0] in (b"Z", b"X"))
            except (OSError, ValueError, IndexError):
                continue  # gone, denied, or a kernel that writes something else: skip it

    return scan


def _psutil_source() -> Iterator[Proc]:
    for process in psutil.process_iter():
        try:
            with process.oneshot():
                times = process.cpu_times()
                yield Proc(process.pid, process.create_time(), process.name(), times.user + times.system,
                           process.memory_info().rss, process.status() == psutil.STATUS_ZOMBIE)
        except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            continue


def default_source() -> Callable[[], Iterator[Proc]]:
    """Where processes are sampled from on this platform."""
    if sys.platform.startswith("linux") and os.path.exists("/proc/self/stat"):
        return _linux_source()
    return _psutil_source


MAX_CMDLINE = 32 * 1024  # what a check's regex sees of a longer command line (a Java class path, say)


def command_line(pid: int) -> list[str] | None:
    """The process's arguments (the first 32 KiB of them), or None when it is gone or denied."""
    if sys.platform.startswith("linux"):
        try:
            fd = os.open(f"/proc/{pid}/cmdline", os.O_RDONLY)
            try:
                raw = os.read(fd, MAX_CMDLINE)
            finally:
                os.close(fd)
        except OSError:
            return None
        return raw.rstrip(b"\0").decode("utf-8", "replace").split("\0") if raw else []
    try:
        return psutil.Process(pid).cmdline()
    except (psutil.Error, OSError):
        return None


@dataclass
class ProcessSampler:
    """The previous CPU sample of every process, and the checks to count."""

    checks: tuple[Check, ...] = ()
    source: Callable[[], Iterator[Proc]] = field(default_factory=default_source)
    cmdline: Callable[[int], list[str] | None] = command_line
    total_memory: int = 0
    own_pid: int = field(default_factory=os.getpid)
    _previous: dict[tuple[int, float], float] = field(default_factory=dict)
    _previous_at: float | None = None

    def sample(self, now: float | None = None) -> dict[str, Any]:
        """``processes`` (top by CPU since the previous call, when there was one) and ``process_counts``."""
        now = time.monotonic() if now is None else now
        total = self.total_memory or psutil.virtual_memory().total
        self.total_memory = total
        window = None if self._previous_at is None else now - self._previous_at
        current: dict[tuple[int, float], float] = {}
        busiest: list[tuple[float, Proc]] = []
        counts = dict.fromkeys((c.spec for c in self.checks), 0)
        regexes = [c for c in self.checks if c.regex is not None]
        names = {c.spec for c in self.checks if c.regex is None}
        long_prefixes = {n[:COMM_LEN] for n in names if len(n) > COMM_LEN}
        for proc in self.source():
            key = (proc.pid, proc.start)
            current[key] = proc.cpu_s
            if window is not None and window >= MIN_WINDOW_S and not proc.zombie:
                before = self._previous.get(key)
                # A process born since the previous pass has used all its CPU time within the window.
                busiest.append((max(0.0, proc.cpu_s - (before or 0.0)) / window * 100, proc))
            if proc.zombie or proc.pid == self.own_pid or not self.checks:
                continue
            self._count(proc, counts, names, long_prefixes, regexes)
        self._previous, self._previous_at = current, now
        result: dict[str, Any] = {}
        if window is not None and window >= MIN_WINDOW_S:
            busiest.sort(key=lambda item: (-item[0], item[1].pid))
            result["processes"] = [self._entry(proc, cpu, total) for cpu, proc in busiest[:TOP_N]]
        if self.checks:
            result["process_counts"] = counts
        return result

    def _count(self, proc: Proc, counts: dict[str, int], names: set[str], long_prefixes: set[str],
               regexes: list[Check]) -> None:
        if proc.name in names:
            counts[proc.name] += 1
        elif proc.name in long_prefixes:
            full = self._full_name(proc)
            if full in names:
                counts[full] += 1
        if regexes:
            args = self.cmdline(proc.pid)
            if args is None:
                return  # gone or denied: skipped
            text = " ".join(args) if args else proc.name
            for check in regexes:
                if check.regex is not None and check.regex.search(text):
                    counts[check.spec] += 1

    def _full_name(self, proc: Proc) -> str:
        """The name beyond the kernel's 15 characters: the program from the command line (as psutil does)."""
        if len(proc.name) < COMM_LEN:
            return proc.name
        args = self.cmdline(proc.pid)
        if args:
            program = os.path.basename(args[0])
            if program.startswith(proc.name):
                return program
        return proc.name

    def _entry(self, proc: Proc, cpu: float, total: int) -> dict[str, Any]:
        return {"name": self._full_name(proc)[:MAX_STRING], "pid": proc.pid, "cpu_percent": round(cpu, 1),
                "memory_percent": round(proc.rss / total * 100, 2) if total else 0.0}
