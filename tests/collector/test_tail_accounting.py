"""Tail accounting: reports of a previous session that never arrived, counted after a grace period.

The state machine is driven with an injected clock; the counts come from a real database (SQLite and
PostgreSQL) through the collector's own store functions, as the writer thread does it.
"""

from __future__ import annotations

import json

import pytest

from fleet.collector import history
from fleet.collector.state import Tail, TailStats, tail_lost
from fleet.config import payloads
from fleet.config.errors import PayloadError
from fleet.store.database import open_database
from tests.collector.collector_builders import INTERVAL, T0, ping, report, tracker

pytestmark = pytest.mark.both_engines
GRACE = 60.0


class History:
    """A tracker and the real history it writes, flushed as the writer does."""

    def __init__(self, database: str, grace: float = GRACE) -> None:
        self.db = open_database(database)
        self.t = tracker(grace=grace)

    def reports(self, session: str, seqs, now: float) -> None:
        batch = history.Batch()
        for seq in seqs:
            r = report(session=session, seq=seq, ts=T0 + seq * INTERVAL)
            batch.events += self.t.on_report(r, now)
            batch.reports.append(history.report_row(r, now))
        self.flush(batch, now)

    def ping(self, now: float, retained: bool = False, **kwargs) -> None:
        self.flush(history.Batch(events=self.t.on_ping(ping(**kwargs), now, retained)), now)

    def settle(self, now: float) -> int:
        """What the writer does after each flush: settle due tails and store the results."""
        batch, lost_total = history.Batch(), 0
        for tail in self.t.due_tails(now):
            lost, events = self.t.settle_tail(tail, history.tail_stats(self.db, tail), now)
            batch.events += events
            if lost:
                batch.lost[tail.org] = batch.lost.get(tail.org, 0) + lost
                lost_total += lost
        self.flush(batch, now)
        return lost_total

    def flush(self, batch: history.Batch, now: float) -> None:
        batch.machines = self.t.take_dirty()
        history.write_batch(self.db, batch, now)

    def row(self):
        return self.db.query_one("SELECT lost, late, tails FROM machines WHERE machine_id = 'web-1'")

    def org_lost(self) -> int:
        return self.db.query("SELECT lost FROM org_stats WHERE org = 'acme'")[0][0]


def test_a_lost_tail_is_counted_after_the_grace_period(database_url):
    h = History(database_url)
    h.ping(T0, session="a")
    h.reports("a", range(6), T0 + 1)  # seq 0-5 arrived; 6-9 were published but never got through
    h.ping(T0 + 100, session="b", ts=T0 + 100, prev=("a", 9))
    assert h.settle(T0 + 100 + GRACE - 1) == 0  # still within the grace period
    assert h.settle(T0 + 100 + GRACE) == 4
    machine = h.t.get("acme", "web-1")
    assert (machine.lost, machine.late) == (4, 0)
    assert h.row()[:2] == (4, 0)
    assert h.org_lost() == 4
    events = h.db.query("SELECT old_status, new_status, reason FROM events ORDER BY id")
    assert events[-1] == ("online", "online", "lost 4 of session a")
    assert h.settle(T0 + 1000) == 0  # settled once


def test_replays_within_the_grace_period_are_not_lost(database_url):
    h = History(database_url)
    h.reports("a", range(3), T0)
    h.ping(T0 + 50, session="b", ts=T0 + 50, prev=("a", 5))
    h.reports("a", [3, 5], T0 + 60)  # the outbox replays what it kept; seq 4 never comes
    h.reports("a", [3], T0 + 61)  # a redelivered duplicate changes nothing
    assert h.settle(T0 + 50 + GRACE) == 1


def test_a_late_arrival_after_the_count_is_recorded_not_subtracted(database_url):
    h = History(database_url)
    h.reports("a", range(3), T0)
    h.ping(T0 + 50, session="b", ts=T0 + 50, prev=("a", 4))
    h.reports("b", [0], T0 + 51)
    assert h.settle(T0 + 50 + GRACE) == 2
    h.reports("a", [3], T0 + 200)  # too late: lost stays a counter, the late arrival is counted apart
    h.reports("a", [9], T0 + 201)  # beyond what was announced: an old-session report, not a late one
    assert h.row()[:2] == (2, 1)
    assert h.t.get("acme", "web-1").session == "b"


def test_the_retained_ping_and_periodic_pings_do_not_count_twice(database_url):
    h = History(database_url)
    h.reports("a", range(3), T0)
    h.ping(T0 + 50, session="b", ts=T0 + 50, prev=("a", 4))
    h.ping(T0 + 100, session="b", ts=T0 + 100, prev=("a", 4))  # every 5th interval, same connection
    assert h.settle(T0 + 200) == 2
    h.ping(T0 + 300, session="b", ts=T0 + 100, prev=("a", 4), retained=True)  # re-subscribe delivers it again
    assert h.settle(T0 + 1000) == 0
    assert h.org_lost() == 2


def test_the_count_survives_a_collector_restart_without_double_counting(database_url):
    h = History(database_url)
    h.reports("a", range(3), T0)
    h.ping(T0 + 50, session="b", ts=T0 + 50, prev=("a", 4))
    h.reports("c", range(2), T0 + 60)  # another reconnect: c ends without a word yet
    h.ping(T0 + 70, session="d", ts=T0 + 70, prev=("c", 3))
    assert h.settle(T0 + 50 + GRACE) == 2  # a settled; c still within its grace period
    rows = history.load_machines(h.db, None)
    restarted = tracker(grace=GRACE)
    restarted.load(rows, now=T0 + 200)
    machine = restarted.get("acme", "web-1")
    assert (machine.lost, list(machine.settled_tails), [t.session for t in machine.pending_tails]) == (2, ["a"], ["c"])
    # A restart gives open checks a full grace period again: replays queued for the collector are still coming.
    assert restarted.due_tails(T0 + 200 + GRACE - 1) == []
    h.t = restarted
    h.ping(T0 + 210, session="d", ts=T0 + 80, prev=("c", 3), retained=True)  # the retained ping, again
    h.ping(T0 + 220, session="e", ts=T0 + 220, prev=("a", 4))  # a nonsense repeat of a settled session
    assert h.settle(T0 + 200 + GRACE) == 2  # c's seq 2 and 3
    assert h.org_lost() == 4
    assert h.row()[0] == 4


@pytest.mark.parametrize(("stats", "claimed", "lost"), [
    (TailStats(received=5, max_seq=4, max_ts=T0 + 40), 9, 5),  # 10 s interval, 100 s gap: could make 10 more
    (TailStats(received=5, max_seq=4, max_ts=T0 + 40), 10**9, 10),  # an absurd claim is capped by time
    (TailStats(received=0, max_seq=None, max_ts=None, machine_last_ts=T0), 10**6, 14),  # unseen: 140 s since
    (TailStats(received=0, max_seq=None, max_ts=None), 10**6, 0),  # nothing known: nothing trusted
    (TailStats(received=12, max_seq=11, max_ts=T0 + 110), 9, 0),  # more than claimed arrived
])
def test_claims_are_checked_against_what_the_agent_could_have_made(stats, claimed, lost):
    tail = Tail("acme", "web-1", "a", claimed, T0 + 140, INTERVAL, T0 + 200)
    assert tail_lost(tail, stats) == lost


@pytest.mark.parametrize("prev", [
    {"prev_session": "a", "prev_seq": -1},
    {"prev_session": "a", "prev_seq": 10**9 + 1},
    {"prev_session": "a", "prev_seq": 2**70},
    {"prev_session": "a", "prev_seq": 3.0},
    {"prev_session": "a", "prev_seq": True},
    {"prev_session": "a", "prev_seq": "3"},
    {"prev_session": 7, "prev_seq": 3},
    {"prev_session": "", "prev_seq": 3},
    {"prev_session": "x" * 65, "prev_seq": 3},
    {"prev_session": "a b", "prev_seq": 3},
    {"prev_session": "b", "prev_seq": 3},  # the ping's own session
    {"prev_session": "a"},
    {"prev_seq": 3},
])
def test_nonsense_previous_sessions_are_rejected(prev):
    body = {**payloads.build_ping("web-1", "hw", "b", "online", 10, ts=T0), **prev}
    with pytest.raises(PayloadError) as exc:
        payloads.parse_ping(json.dumps(body).encode(), "fleet/acme/web-1/ping")
    assert exc.value.reason == payloads.BAD_FIELD


def test_an_offline_ping_cannot_name_a_previous_session():
    body = {**payloads.build_ping("web-1", "hw", "b", "offline", 10, ts=T0, reason="lost"),
            "prev_session": "a", "prev_seq": 3}
    with pytest.raises(PayloadError):
        payloads.parse_ping(json.dumps(body).encode(), "fleet/acme/web-1/ping")
    good = payloads.parse_ping(payloads.encode(payloads.build_ping("web-1", "hw", "b", "online", 10, ts=T0,
                                                                   prev=("a", 3))), "fleet/acme/web-1/ping")
    assert (good.prev_session, good.prev_seq) == ("a", 3)


def test_open_checks_per_machine_are_bounded(database_url):
    h = History(database_url)
    for i in range(40):
        h.ping(T0 + i, session=f"s{i + 1}", ts=T0 + i, prev=(f"s{i}", 3))
    machine = h.t.get("acme", "web-1")
    assert len(machine.pending_tails) == 16
    assert len(json.loads(h.row()[2])["pending"]) == 16
