"""Every transition of the collector's state machine, driven with an injected clock (no broker)."""

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from fleet.collector.state import EVICTED, OFFLINE, ONLINE, STALE, STATUSES
from tests.collector.collector_builders import INTERVAL, T0, ping, report, tracker


def statuses(transitions):
    return [(t.old_status, t.new_status, t.reason) for t in transitions]


def test_first_ping_creates_online_machine():
    t = tracker()
    assert statuses(t.on_ping(ping(), T0)) == [(None, ONLINE, "ping")]
    m = t.get("acme", "web-1")
    assert (m.status, m.session, m.interval_s, m.last_seen, m.last_ping) == (ONLINE, "s1", INTERVAL, T0, T0)


def test_first_report_creates_online_machine_with_latest_data():
    t = tracker()
    assert statuses(t.on_report(report(), T0 + 0.5)) == [(None, ONLINE, "report")]
    m = t.get("acme", "web-1")
    assert m.status == ONLINE
    assert m.os == "Linux"
    assert m.metrics["cpu_percent"] == 5.0
    assert m.clock_offset_s == pytest.approx(0.5)
    assert [x.machine_id for x in t.take_dirty()] == ["web-1"]
    assert t.take_dirty() == []


def test_online_goes_stale_after_stale_factor_times_interval_then_back_online():
    t = tracker()
    t.on_ping(ping(interval=2.0), T0)
    assert t.tick(T0 + 5.9) == ([], [])  # 3 x 2 s not yet passed
    transitions, evicted = t.tick(T0 + 6.1)
    assert statuses(transitions) == [(ONLINE, STALE, "silent")]
    assert evicted == []
    assert t.tick(T0 + 7) == ([], [])  # no repeated event
    assert statuses(t.on_report(report(ts=T0 + 8), T0 + 8)) == [(STALE, ONLINE, "report")]


def test_stale_after_uses_default_interval_when_no_ping_seen():
    t = tracker()
    t.on_report(report(), T0)
    assert t.tick(T0 + 29)[0] == []
    assert statuses(t.tick(T0 + 31)[0]) == [(ONLINE, STALE, "silent")]


def test_stale_machine_back_online_on_ping():
    t = tracker()
    t.on_ping(ping(), T0)
    t.tick(T0 + 40)
    assert statuses(t.on_ping(ping(ts=T0 + 41), T0 + 41)) == [(STALE, ONLINE, "ping")]


@pytest.mark.parametrize("reason", ["lost", "shutdown"])
def test_offline_of_current_session(reason):
    t = tracker()
    t.on_ping(ping(), T0)
    assert statuses(t.on_ping(ping("offline", ts=None, reason=reason), T0 + 1)) == [(ONLINE, OFFLINE, reason)]
    assert t.tick(T0 + 100)[0] == []  # offline never turns stale


def test_offline_machine_back_online_with_new_session():
    t = tracker()
    t.on_ping(ping(), T0)
    t.on_ping(ping("offline", reason="shutdown"), T0 + 1)
    assert statuses(t.on_ping(ping(session="s2", ts=T0 + 5), T0 + 5)) == [(OFFLINE, ONLINE, "ping")]
    assert t.get("acme", "web-1").session == "s2"


def test_report_with_new_session_makes_it_current():
    t = tracker()
    t.on_ping(ping(), T0)
    t.on_ping(ping("offline", reason="lost", ts=None), T0 + 1)
    assert statuses(t.on_report(report(session="s2", ts=T0 + 2), T0 + 2)) == [(OFFLINE, ONLINE, "new_session")]
    assert t.get("acme", "web-1").session == "s2"


def test_takeover_race_late_will_of_old_session_is_ignored():
    """The new connection's online arrives before the old connection's last will."""
    t = tracker()
    t.on_ping(ping(session="old"), T0)
    t.on_ping(ping(session="new", ts=T0 + 1), T0 + 1)
    assert t.on_ping(ping("offline", session="old", ts=None, reason="lost"), T0 + 2) == []
    m = t.get("acme", "web-1")
    assert (m.status, m.session) == (ONLINE, "new")


def test_offline_from_unknown_session_is_ignored():
    t = tracker()
    t.on_ping(ping(session="a"), T0)
    assert t.on_ping(ping("offline", session="zzz", reason="lost"), T0 + 1) == []
    assert t.get("acme", "web-1").status == ONLINE


def test_replayed_report_of_earlier_session_does_not_change_session_or_status():
    t = tracker()
    t.on_report(report(session="a", seq=0), T0)
    t.on_ping(ping(session="b", ts=T0 + 5), T0 + 5)
    t.on_ping(ping("offline", session="b", reason="shutdown", ts=T0 + 6), T0 + 6)
    assert t.on_report(report(session="a", seq=1, ts=T0 + 1), T0 + 7) == []
    m = t.get("acme", "web-1")
    assert (m.session, m.status) == ("b", OFFLINE)


def test_eviction_after_ttl_from_any_status():
    t = tracker(ttl=100)
    t.on_ping(ping(machine="a"), T0)
    t.on_ping(ping(machine="b"), T0)
    t.on_ping(ping("offline", machine="b", reason="shutdown"), T0 + 1)
    transitions, evicted = t.tick(T0 + 99)
    assert {(x.machine_id, x.new_status) for x in transitions} == {("a", STALE)}
    assert evicted == []
    transitions, evicted = t.tick(T0 + 102)
    assert sorted(statuses(transitions)) == [(OFFLINE, EVICTED, "ttl"), (STALE, EVICTED, "ttl")]
    assert sorted(m.machine_id for m in evicted) == ["a", "b"]
    assert t.get("acme", "a") is None
    assert t.machines == {}
    # It comes back later: a brand-new machine again.
    assert statuses(t.on_report(report(machine="a", ts=T0 + 500), T0 + 500)) == [(None, ONLINE, "report")]


def test_clock_offset_is_min_of_last_five():
    t = tracker()
    delays = [3.0, 0.2, 5.0, 4.0, 6.0, 7.0, 8.0]
    for i, delay in enumerate(delays):
        now = T0 + i * 10
        t.on_report(report(seq=i, ts=now - 100 - delay), now)  # agent clock 100 s behind
        expected = 100 + min(delays[max(0, i - 4): i + 1])
        assert t.get("acme", "web-1").clock_offset_s == pytest.approx(expected)


def test_conflict_while_two_hardware_ids_report_within_stale_after():
    t = tracker()
    t.on_report(report(hw="hw-a"), T0)
    assert not t.get("acme", "web-1").conflict
    t.on_report(report(hw="hw-b", session="s2", ts=T0 + 1), T0 + 1)
    assert t.get("acme", "web-1").conflict
    t.on_report(report(hw="hw-b", session="s2", seq=1, ts=T0 + 20), T0 + 20)
    assert t.get("acme", "web-1").conflict  # hw-a seen 20 s ago, within 30 s
    t.take_dirty()
    t.tick(T0 + 31)  # hw-a silent past stale_after: conflict clears on the timer
    m = t.get("acme", "web-1")
    assert not m.conflict
    assert m.hardware_id == "hw-b"
    assert [x.machine_id for x in t.take_dirty()] == ["web-1"]


def test_retained_ping_is_old_news_not_a_sign_of_life():
    t = tracker()
    # Fresh collector, retained online ping from an agent that last spoke 100 s ago: stale at once.
    assert statuses(t.on_ping(ping(ts=T0 - 100), T0, retained=True)) == [(None, STALE, "retained")]
    assert t.get("acme", "web-1").last_seen == T0 - 100
    # Retained last will of a machine never seen: known, offline.
    assert statuses(t.on_ping(ping("offline", machine="db", ts=None, reason="lost"), T0, retained=True)) == [
        (None, OFFLINE, "lost")]


def test_retained_ping_repeated_on_resubscribe_changes_nothing():
    t = tracker()
    t.on_ping(ping(ts=T0), T0)
    t.on_report(report(ts=T0 + 10), T0 + 10)
    assert t.on_ping(ping(ts=T0), T0 + 11, retained=True) == []
    m = t.get("acme", "web-1")
    assert (m.status, m.last_seen) == (ONLINE, T0 + 10)


def test_load_restores_state_from_rows():
    t = tracker()
    t.load([{"org": "acme", "machine_id": "m", "status": OFFLINE, "session": "s9", "hardware_id": "h",
             "interval_s": 5.0, "last_seen": T0, "last_ping": T0, "clock_offset_s": 0.3, "conflict": 0,
             "os": "Linux", "system": "{}", "metrics": "{}", "first_seen": T0 - 10}])
    assert t.on_ping(ping("offline", machine="m", session="other", reason="lost"), T0 + 1) == []
    assert statuses(t.on_ping(ping(machine="m", session="s10", ts=T0 + 2), T0 + 2)) == [(OFFLINE, ONLINE, "ping")]



operations = st.lists(st.one_of(
    st.tuples(st.just("report"), st.sampled_from(["a", "b", "c"]), st.sampled_from(["hw1", "hw2"])),
    st.tuples(st.just("online"), st.sampled_from(["a", "b", "c"]), st.booleans()),
    st.tuples(st.just("offline"), st.sampled_from(["a", "b", "c"]), st.sampled_from(["lost", "shutdown"])),
    st.tuples(st.just("wait"), st.floats(min_value=0.1, max_value=40.0), st.just(None)),
), max_size=40)


@given(operations)
@hsettings(max_examples=300, deadline=None)
def test_any_message_sequence_keeps_the_state_machine_consistent(ops):
    t = tracker(ttl=60.0)
    now = T0
    status = None  # what the event log says, replayed
    seq = 0
    for kind, arg, extra in ops:
        before = t.get("acme", "web-1")
        current = before.session if before else None
        if kind == "wait":
            now += arg
            transitions, _ = t.tick(now)
        elif kind == "report":
            seq += 1
            transitions = t.on_report(report(session=arg, seq=seq, ts=now - 1, hw=extra), now)
        elif kind == "online":
            transitions = t.on_ping(ping(session=arg, ts=now - 1), now, retained=extra)
        else:
            transitions = t.on_ping(ping("offline", session=arg, reason=extra, ts=None), now)
            if before is not None and arg != current:
                assert transitions == []  # only the current session may say offline
        for tr in transitions:
            assert tr.old_status == status, "events must chain: each starts where the last ended"
            status = None if tr.new_status == "evicted" else tr.new_status
        machine = t.get("acme", "web-1")
        assert (machine.status if machine else None) == status
        if machine is not None:
            assert machine.status in STATUSES
            assert machine.clock_offset_s is None or machine.clock_offset_s >= 0.999
            assert machine.conflict == (len(machine.hardware_seen) > 1)
            assert len(machine.past_sessions) <= 16
            assert len(machine.offsets) <= 5


def test_replayed_reports_of_a_never_seen_older_session_do_not_take_over():
    """An agent that started while the broker was down replays reports of a session nobody saw."""
    t = tracker()
    t.on_ping(ping(session="s2", ts=T0 + 100), T0 + 100)  # connected: new session announced
    for seq in range(3):
        assert t.on_report(report(session="s0", seq=seq, ts=T0 + seq), T0 + 101) == []
    m = t.get("acme", "web-1")
    assert (m.session, m.status) == ("s2", ONLINE)
    assert statuses(t.on_ping(ping("offline", session="s2", reason="shutdown", ts=T0 + 200), T0 + 200)) == [
        (ONLINE, OFFLINE, "shutdown")]


def test_after_a_restart_replays_older_than_the_stored_state_are_history_only():
    t = tracker()
    t.load([{"org": "acme", "machine_id": "web-1", "status": ONLINE, "session": "s2", "hardware_id": "h",
             "interval_s": 10.0, "last_seen": T0 + 100, "last_ping": T0 + 100, "clock_offset_s": 0.0,
             "conflict": 0, "os": "", "system": "{}", "metrics": "{}", "first_seen": T0}])
    assert t.on_report(report(session="s1", ts=T0 + 50), T0 + 101) == []
    assert t.get("acme", "web-1").session == "s2"
    # A genuinely new connection later on does take over.
    t.on_ping(ping("offline", session="s2", reason="lost", ts=None), T0 + 102)
    assert statuses(t.on_ping(ping(session="s3", ts=T0 + 110), T0 + 110)) == [(OFFLINE, ONLINE, "ping")]
