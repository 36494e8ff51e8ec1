"""Top processes and process checks: real processes started by the test, and process tables that fight back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import types

import psutil
import pytest

from fleet.agent import processes
from fleet.agent.metrics import collect_metrics, collector_state
from fleet.agent.processes import Check, Proc, ProcessSampler
from fleet.config import payloads
from tests.helpers import wait_for

BUSY = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"


@pytest.fixture
def spawn():
    """Start processes that are killed (and reaped) after the test."""
    started: list[subprocess.Popen] = []

    def start(args: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait(10)


def test_a_process_started_by_the_test_is_counted_then_zero_after_it_is_killed(tmp_path, spawn):
    program = tmp_path / "fleet-probe-x"  # a copy of sleep under a name no other process has
    shutil.copy(shutil.which("sleep"), program)
    sampler = ProcessSampler((Check.parse("fleet-probe-x"), Check.parse("re:fleet-probe-x 31[0-9]"),
                              Check.parse("nginx-not-here")))
    assert sampler.sample()["process_counts"] == {"fleet-probe-x": 0, "re:fleet-probe-x 31[0-9]": 0,
                                                  "nginx-not-here": 0}
    first = spawn([str(program), "311"])
    spawn([str(program), "312"])
    spawn([str(program), "400"])
    wait_for(lambda: sampler.sample()["process_counts"]["fleet-probe-x"] == 3, 5, "three probes counted")
    assert sampler.sample()["process_counts"] == {"fleet-probe-x": 3, "re:fleet-probe-x 31[0-9]": 2,
                                                  "nginx-not-here": 0}
    first.kill()
    first.wait(5)
    assert sampler.sample()["process_counts"] == {"fleet-probe-x": 2, "re:fleet-probe-x 31[0-9]": 1,
                                                  "nginx-not-here": 0}


def test_names_longer_than_the_kernel_keeps_are_matched_from_the_command_line(tmp_path, spawn):
    long_name = "fleet-probe-with-a-long-name"
    program = tmp_path / long_name
    shutil.copy(shutil.which("sleep"), program)
    spawn([str(program), "300"])
    sampler = ProcessSampler((Check.parse(long_name), Check.parse("fleet-probe-with-another-name")))
    wait_for(lambda: sampler.sample()["process_counts"][long_name] == 1, 5, "long name counted")
    assert sampler.sample()["process_counts"]["fleet-probe-with-another-name"] == 0


def test_the_busiest_process_tops_the_list_without_a_second_sleep(spawn):
    busy = spawn([sys.executable, "-c", BUSY])
    sampler = ProcessSampler()
    assert "processes" not in sampler.sample()  # one sample is no window yet
    time.sleep(1.0)  # the report interval: what the agent waits anyway
    top = sampler.sample()["processes"]
    assert len(top) == processes.TOP_N
    # Other work shares this machine's two cores, so the busy loop need not be first; it is among the top 5.
    mine = [p for p in top if p["pid"] == busy.pid]
    assert mine, top
    assert mine[0]["cpu_percent"] > 20
    assert mine[0]["name"].startswith("python")
    assert all(set(p) == {"name", "pid", "cpu_percent", "memory_percent"} for p in top)
    assert [p["cpu_percent"] for p in top] == sorted((p["cpu_percent"] for p in top), reverse=True)
    assert 0 < mine[0]["memory_percent"] < 5


def test_the_agent_itself_and_zombies_are_not_counted(tmp_path, spawn):
    program = tmp_path / "fleet-probe-me"
    shutil.copy(shutil.which("sleep"), program)
    me = spawn([str(program), "300"])
    zombie = spawn([str(program), "0.01"])  # exits at once; a zombie until it is reaped
    wait_for(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE, 5, "a zombie")
    checks = (Check.parse("fleet-probe-me"), Check.parse("re:fleet-probe-me"))
    assert ProcessSampler(checks, own_pid=me.pid).sample()["process_counts"] == {"fleet-probe-me": 0,
                                                                                "re:fleet-probe-me": 0}
    assert ProcessSampler(checks).sample()["process_counts"] == {"fleet-probe-me": 1, "re:fleet-probe-me": 1}


def test_cpu_percent_from_the_previous_sample_and_pid_reuse():
    table = [Proc(1, 100.0, "init", 10.0, 4096), Proc(2, 200.0, "worker", 50.0, 8192)]
    sampler = ProcessSampler((Check.parse("worker"),), source=lambda: iter(table), cmdline=lambda pid: [],
                             total_memory=1 << 20)
    sampler.sample(now=0.0)
    table[:] = [Proc(1, 100.0, "init", 10.5, 4096), Proc(2, 999.0, "worker", 3.0, 8192),  # pid 2 reused
                Proc(3, 300.0, "new", 1.0, 0), Proc(4, 400.0, "zombie", 99.0, 0, zombie=True)]
    result = sampler.sample(now=10.0)
    assert result["processes"] == [
        {"name": "worker", "pid": 2, "cpu_percent": 30.0, "memory_percent": 0.78},  # all 3 s of the new one
        {"name": "new", "pid": 3, "cpu_percent": 10.0, "memory_percent": 0.0},
        {"name": "init", "pid": 1, "cpu_percent": 5.0, "memory_percent": 0.39}]
    assert result["process_counts"] == {"worker": 1}


def test_processes_that_vanish_or_deny_access_are_skipped(monkeypatch):
    class Fake:
        def __init__(self, pid, error=None):
            self.pid, self.error = pid, error

        def oneshot(self):
            return self

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def _maybe_fail(self):
            if self.error is not None:
                raise self.error

        def cpu_times(self):
            self._maybe_fail()
            return types.SimpleNamespace(user=1.0, system=0.5)

        def create_time(self):
            return 1.0

        def name(self):
            return f"proc{self.pid}"

        def memory_info(self):
            return type("mem", (), {"rss": 1024})()

        def status(self):
            return psutil.STATUS_RUNNING

    table = [Fake(1), Fake(2, psutil.AccessDenied(2)), Fake(3, psutil.NoSuchProcess(3)),
             Fake(4, psutil.ZombieProcess(4)), Fake(5, PermissionError(13, "denied")), Fake(6)]
    monkeypatch.setattr(psutil, "process_iter", lambda *a, **k: iter(table))
    procs = list(processes._psutil_source())  # noqa: SLF001 - the portable source, driven directly
    assert [p.pid for p in procs] == [1, 6]
    assert procs[0] == Proc(1, 1.0, "proc1", 1.5, 1024)


def test_the_linux_source_skips_what_it_cannot_read(tmp_path, monkeypatch):
    root = tmp_path / "proc"
    entries = {
        10: b"10 (nginx) S 1 10 10 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 5000 1000000 300 18446744073709551615\n",
        11: b"11 (a (b) c) R 1 11 11 0 -1 0 0 0 0 0 100 0 0 0 20 0 1 0 6000 0 10 0\n",  # parentheses in the name
        12: b"garbage\n",
        13: None,  # vanished between the listing and the read
        14: b"14 (short) S 1\n",  # too few fields
    }
    for pid, stat in entries.items():
        (root / str(pid)).mkdir(parents=True)
        if stat is not None:
            (root / str(pid) / "stat").write_bytes(stat)
    monkeypatch.setattr(psutil, "pids", lambda: sorted(entries))
    scan = processes._linux_source(str(root))  # noqa: SLF001 - the Linux source, on a made-up /proc
    procs = list(scan())
    ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    assert procs == [Proc(10, 5000.0, "nginx", 300 / ticks, 300 * page), Proc(11, 6000.0, "a (b) c", 100 / ticks,
                                                                           10 * page)]


def test_bad_checks_are_refused():
    with pytest.raises(ValueError, match="bad regex"):
        Check.parse("re:(")
    with pytest.raises(ValueError, match="bad --process"):
        Check.parse("")


def test_the_report_carries_processes_and_counts_the_collector_accepts():
    state = collector_state(process_checks=("init", "re:python", "init"))
    collect_metrics(state)
    time.sleep(0.3)
    metrics = collect_metrics(state)
    assert set(metrics["process_counts"]) == {"init", "re:python"}
    assert 1 <= len(metrics["processes"]) <= 5
    raw = payloads.encode(payloads.build_report("m", "hw", "s", 0, 1.0, metrics, {}))
    assert payloads.parse_report(raw, "fleet/acme/m/report").metrics["process_counts"] == metrics["process_counts"]


def test_a_broken_process_table_leaves_the_fields_out_and_the_rest_of_the_report_in():
    def broken():
        raise OSError("no /proc")

    state = collector_state(process_checks=("x",))
    assert state.processes is not None
    state.processes.source = broken
    metrics = collect_metrics(state)
    assert "process_counts" not in metrics
    assert "cpu_percent" in metrics
