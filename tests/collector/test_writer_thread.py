"""The collector's writer thread on its own: a start that cannot restore state reports why and closes what it opened."""

from __future__ import annotations

import pytest

from fleet.collector import history, writer
from fleet.collector.alerts.engine import AlertEngine
from fleet.collector.errors import CollectorError
from fleet.collector.handoff import Handoff
from fleet.collector.intake import DropCounter
from fleet.collector.shared import CollectorStats, LinkState, ServedOrgs, WriteCounts
from fleet.collector.state import Tracker
from fleet.config.settings import Settings
from fleet.store.database import DatabaseError, open_database


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
