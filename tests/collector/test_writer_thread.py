"""The collector's writer thread on its own: a start that cannot restore state reports why and closes what it opened;
the heartbeat tells how full the data dir's file system is."""

from __future__ import annotations

import logging
from collections import namedtuple
from pathlib import Path

import pytest

from fleet.collector import history, writer
from fleet.collector.alerts.engine import AlertEngine
from fleet.collector.errors import CollectorError
from fleet.collector.handoff import Handoff
from fleet.collector.intake import DropCounter
from fleet.collector.shared import CollectorStats, LinkState, ServedOrgs, WriteCounts
from fleet.collector.state import Tracker
from fleet.config.settings import Settings
from fleet.config.status import COLLECTOR, DATA_DISK_PERCENT
from fleet.store.database import DatabaseError, open_database
from fleet.store.heartbeats import read_heartbeat
from tests.helpers import wait_for


def test_a_failed_restore_is_reported_and_closes_the_writers_connection(tmp_path, monkeypatch):
    settings = Settings(data_dir=tmp_path)
    opened = []

    def recording_open(*args, **kwargs):
        db = open_database(*args, **kwargs)
        opened.append(db)
        return db

    def broken_restore(*args, **kwargs):
        raise DatabaseError("machines table unreadable")

    monkeypatch.setattr(writer, "open_database", recording_open)
    monkeypatch.setattr(history, "load_machines", broken_restore)
    tracker = Tracker(settings.stale_factor, settings.interval, settings.ttl_seconds, settings.lost_grace_s)
    handoff = Handoff(capacity=10, batch_max=5)
    peers = writer.WriterPeers(handoff, None, LinkState(), ServedOrgs(()), WriteCounts(), DropCounter(),
                               lambda: CollectorStats(False, (), 0, 0), lambda: None)
    thread = writer.WriterThread(settings, "c1", tracker, AlertEngine(tracker, 0.0, lambda m, t: False), peers)
    with pytest.raises(CollectorError, match="machines table unreadable"):
        thread.start(timeout=10)
    thread.join(10)
    assert not thread.is_alive()
    assert len(opened) == 1
    assert opened[0].raw is None  # closed
    item = object()
    assert handoff.put(item, 1) is True  # room left: the put is queued
    for n in range(9):
        handoff.put(item, n)
    assert handoff.put(item, 99) is False  # full, and the writer is gone: refused at once, not held


DiskUsage = namedtuple("DiskUsage", "total used free")


def test_a_nearly_full_data_disk_is_logged_once_per_crossing_and_reported_in_the_heartbeat(tmp_path, monkeypatch,
                                                                                             caplog):
    settings = Settings(data_dir=tmp_path, batch_interval_s=0.02)
    percent = [50.0]

    def disk_usage(path):  # the one thing a test cannot fill: the file system
        assert Path(path) == settings.data_dir
        used = int(percent[0] * 10)
        return DiskUsage(1000, used, 1000 - used)

    monkeypatch.setattr(writer.shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(writer, "HEARTBEAT_EVERY_S", 0.02)
    tracker = Tracker(settings.stale_factor, settings.interval, settings.ttl_seconds, settings.lost_grace_s)
    handoff = Handoff(capacity=10, batch_max=5)
    peers = writer.WriterPeers(handoff, None, LinkState(), ServedOrgs(()), WriteCounts(), DropCounter(),
                               lambda: CollectorStats(True, (), 0, 0), lambda: None)
    thread = writer.WriterThread(settings, "c1", tracker, AlertEngine(tracker, 0.0, lambda m, t: False), peers)
    caplog.set_level(logging.INFO, logger="fleet.collector")
    seen: list[float] = []

    def beats_at(value: float, count: int) -> bool:
        """``count`` heartbeats in a row carried ``value`` (each a new one: its time moved on)."""
        with open_database(settings.database, readonly=True) as db:
            beat = read_heartbeat(db, COLLECTOR)
        if beat is not None and (not seen or beat[0] != seen[-1]):
            seen.append(beat[0])
            if beat[1].get(DATA_DISK_PERCENT) != value:
                seen.clear()
        return len(seen) >= count

    thread.start(timeout=10)
    try:
        for value in (50.0, 95.0, 50.0, 96.0):
            percent[0] = value
            seen.clear()
            wait_for(lambda v=value: beats_at(v, 3), 10, f"three heartbeats at {value}%")
    finally:
        handoff.close()
        thread.join(10)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "file system holding" in r.getMessage()]
    assert [level for level, _ in lines] == ["WARNING", "INFO", "WARNING"]
    assert f"{tmp_path} is 95.0% full (over 90%)" in lines[0][1]
    assert f"{tmp_path} is 96.0% full (over 90%)" in lines[2][1]
