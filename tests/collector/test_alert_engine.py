"""Alert evaluation and grouping with an injected clock: the collector's state machine, a real fleet.db, no broker."""

from __future__ import annotations

import json

import pytest

from fleet.collector import history
from fleet.collector.alerts.engine import AlertEngine
from fleet.config.rules import Rule
from fleet.config.topics import alert_topic
from fleet.store.database import open_database
from tests import stores
from tests.collector.collector_builders import T0, ping, report, tracker

ORGS = {"acme", "globex"}
pytestmark = pytest.mark.both_engines  # the alert tables' SQL (upserts, partial indexes) on both


class Harness:
    """A tracker and an alert engine over a real fleet.db, driven with explicit times."""

    def __init__(self, data_dir, database, group_wait=10.0):
        self.data_dir = data_dir
        self.database = database
        self.db = open_database(database)
        self.tracker = tracker()
        self.blind = False
        self.group_wait = group_wait
        self.published: list[tuple[str, bytes]] = []
        self.engine = self.new_engine()

    def new_engine(self):
        engine = AlertEngine(self.tracker, self.group_wait, lambda machine, now: self.blind)
        engine.load(self.db, ORGS, T0)
        return engine

    def restart(self, now):
        """A new tracker and engine from what the database holds (the collector restarted)."""
        self.flush()
        self.tracker = tracker()
        self.tracker.load(history.load_machines(self.db, None), now)
        self.engine = AlertEngine(self.tracker, self.group_wait, lambda machine, t: self.blind)
        self.engine.load(self.db, ORGS, now)
        self.flush()

    def rule(self, org, name, when, for_="0s", machines="*", severity="warning"):
        stores.add_rule(self.data_dir, Rule.parse(org, name, when, for_, machines, severity), self.database)
        self.engine.refresh(self.db, ORGS, T0)  # the collector re-reads rules every 2 s

    def channel(self, org, name="hook"):
        stores.store_channel(self.data_dir, org, name, "webhook", "http://127.0.0.1:9/h", "s", "http://127.0.0.1:9",
                               self.database)

    def apply(self, message, now):
        if message.__class__.__name__ == "Report":
            transitions = self.tracker.on_report(message, now)
        else:
            transitions = self.tracker.on_ping(message, now)
        machine = self.tracker.get(message.org, message.machine_id)
        self.engine.evaluate(machine, now, metrics_changed=message.__class__.__name__ == "Report")
        self.flush()
        return transitions

    def tick(self, now):
        self.engine.after_tick(*self.tracker.tick(now), now)
        self.engine.timers(self.db, ORGS, now)
        self.flush()

    def flush(self):
        batch = history.Batch(machines=self.tracker.take_dirty(), alerts=self.engine.take_writes())
        history.write_batch(self.db, batch, T0)
        self.published += self.engine.take_publishes()

    def alerts(self, org="acme"):
        return self.db.query("SELECT rule, machine_id, state, notified FROM alerts WHERE org = ? ORDER BY id", (org,))

    def outbox(self, org="acme"):
        rows = self.db.query("SELECT channel, notices FROM alert_outbox WHERE org = ? ORDER BY id", (org,))
        return [(channel, [(n["status"], n["rule"], n["machine_id"]) for n in json.loads(notices)])
                for channel, notices in rows]


@pytest.fixture
def h(tmp_path, database_url):
    data_dir = tmp_path / "fleet-data"
    for org in sorted(ORGS):
        stores.add_org(data_dir, org, database_url)
    harness = Harness(data_dir, database_url)
    harness.channel("acme")
    harness.engine.timers(harness.db, ORGS, T0)
    yield harness
    harness.db.close()


def _offline(h, machine="web-1", t=T0):
    h.apply(ping("online", ts=t, machine=machine), t)
    h.apply(ping("offline", reason="lost", ts=None, machine=machine), t + 1)


def test_offline_fires_after_for_then_resolves_each_notified_once(h):
    _offline(h)
    assert h.alerts() == [("machine-offline", "web-1", "pending", "")]
    h.tick(T0 + 100)
    assert h.alerts()[0][2] == "pending"  # for 2m not reached
    h.tick(T0 + 122)
    assert h.alerts() == [("machine-offline", "web-1", "firing", "")]
    h.tick(T0 + 133)  # the group is sealed group_wait (10 s) after it opened
    assert h.alerts() == [("machine-offline", "web-1", "firing", "firing")]
    assert h.outbox() == [("hook", [("firing", "machine-offline", "web-1")])]
    h.apply(ping("online", session="s2", ts=T0 + 200), T0 + 200)
    h.tick(T0 + 211)
    assert h.alerts() == [("machine-offline", "web-1", "resolved", "resolved")]
    assert h.outbox() == [("hook", [("firing", "machine-offline", "web-1")]),
                          ("hook", [("resolved", "machine-offline", "web-1")])]
    h.tick(T0 + 400)
    assert len(h.outbox()) == 2


def test_a_pending_alert_whose_condition_ends_is_dropped_without_notice(h):
    _offline(h)
    h.apply(ping("online", session="s2", ts=T0 + 30), T0 + 30)
    h.tick(T0 + 55)
    h.tick(T0 + 200)
    assert [a for a in h.alerts() if a[0] == "machine-offline"] == []
    assert h.outbox() == []


def test_the_collectors_blindness_holds_status_alerts_back(h):
    h.rule("acme", "down-now", "status == offline")
    h.tick(T0)
    h.blind = True
    _offline(h)
    h.tick(T0 + 5)
    assert ("down-now", "web-1", "pending", "") in h.alerts()
    h.blind = False
    h.tick(T0 + 6)
    assert ("down-now", "web-1", "firing", "") in h.alerts()


def test_thresholds_carry_their_value_and_resolve_with_a_report(h):
    h.rule("acme", "hot", "cpu_percent > 90", machines="web-*", severity="critical")
    h.tick(T0)
    for i, machine in enumerate(("web-1", "db-1")):
        msg = report(seq=i, ts=T0, machine=machine)
        object.__setattr__(msg, "metrics", {"cpu_percent": 97.5})
        h.apply(msg, T0)
    assert [a for a in h.alerts() if a[0] == "hot"] == [("hot", "web-1", "firing", "")]
    h.tick(T0 + 11)
    posted = json.loads(h.db.query_one("SELECT notices FROM alert_outbox")[0])
    assert posted[0]["value"] == 97.5
    assert posted[0]["severity"] == "critical"
    assert "97.5" in posted[0]["summary"]
    cool = report(seq=5, ts=T0 + 20, machine="web-1")
    h.apply(cool, T0 + 20)
    assert [a[2] for a in h.alerts() if a[0] == "hot"] == ["resolved"]


def test_many_machines_lost_at_once_make_one_message_per_channel(h):
    h.rule("acme", "down-now", "status == offline")
    h.channel("acme", "second")
    h.tick(T0)
    for i in range(100):
        _offline(h, f"m{i:03d}", T0 + i * 0.01)
    h.tick(T0 + 12)
    outbox = h.outbox()
    assert [channel for channel, _ in outbox] == ["hook", "second"]
    assert len(outbox[0][1]) == 100
    assert {status for status, _, _ in outbox[0][1]} == {"firing"}


def test_a_silence_holds_notices_back_while_the_alert_still_shows(h):
    h.rule("acme", "down-now", "status == offline")
    silence = stores.add_silence(h.data_dir, "acme", 60, "web-*", now=T0, database=h.database)
    h.tick(T0 + 3)
    _offline(h, t=T0 + 3)
    h.tick(T0 + 20)
    assert ("down-now", "web-1", "firing", "") in h.alerts()
    assert h.outbox() == []
    assert json.loads(h.published[-1][1])[0]["rule"] == "down-now"
    stores.expire_silence(h.data_dir, "acme", silence.id, now=T0 + 21, database=h.database)
    h.tick(T0 + 23)  # silences are read again within 2 s
    h.tick(T0 + 34)
    assert h.outbox() == [("hook", [("firing", "down-now", "web-1")])]


def test_a_restart_neither_resends_nor_forgets(h):
    h.rule("acme", "down-now", "status == offline")
    h.tick(T0)
    _offline(h, "sent")
    h.tick(T0 + 12)
    assert h.outbox() == [("hook", [("firing", "down-now", "sent")])]
    _offline(h, "unsent", T0 + 20)  # fires, but the collector dies inside the group wait
    assert ("down-now", "unsent", "firing", "") in h.alerts()
    h.restart(T0 + 25)
    h.tick(T0 + 40)
    h.tick(T0 + 300)
    assert h.outbox() == [("hook", [("firing", "down-now", "sent")]), ("hook", [("firing", "down-now", "unsent")])]
    pending = h.db.query_one("SELECT active_at FROM alerts WHERE rule = 'machine-offline' AND machine_id = 'sent'")
    assert pending[0] == T0 + 1  # the pending alert kept its start across the restart


def test_eviction_resolves_and_clears_the_alert_topic(h):
    h.rule("acme", "down-now", "status == offline")
    h.tick(T0)
    _offline(h)
    h.tick(T0 + 12)
    assert h.published[-1] == (alert_topic("acme", "web-1"), h.published[-1][1])
    assert json.loads(h.published[-1][1])[0]["rule"] == "down-now"
    h.tick(T0 + 4000)  # TTL 3600 s
    assert (alert_topic("acme", "web-1"), b"") in h.published
    assert {state for _, _, state, _ in h.alerts()} == {"resolved"}
    h.tick(T0 + 4011)
    assert h.outbox()[-1] == ("hook", [("resolved", "down-now", "web-1")])


def test_removing_a_rule_resolves_its_alerts(h):
    h.rule("acme", "down-now", "status == offline")
    h.tick(T0)
    _offline(h)
    h.tick(T0 + 12)
    stores.remove_rule(h.data_dir, "acme", "down-now", h.database)
    h.tick(T0 + 15)
    assert ("down-now", "web-1", "resolved", "") in [(r, m, s, "") for r, m, s, _ in h.alerts()]
    h.tick(T0 + 30)
    assert h.outbox()[-1] == ("hook", [("resolved", "down-now", "web-1")])


def test_alert_topic_lists_firing_alerts_and_empties_on_resolve(h):
    h.rule("acme", "down-now", "status == offline", severity="critical")
    h.tick(T0)
    _offline(h)
    topic, payload = h.published[-1]
    assert topic == "fleet/acme/web-1/alert"
    body = json.loads(payload)
    assert body == [{"rule": "down-now", "severity": "critical", "since": T0 + 1, "value": None}]
    h.apply(ping("online", session="s2", ts=T0 + 5), T0 + 5)
    assert h.published[-1] == ("fleet/acme/web-1/alert", b"[]")


def test_orgs_are_isolated(h):
    h.rule("globex", "down-now", "status == offline")
    h.tick(T0)
    h.apply(ping("online", ts=T0, org="globex"), T0)
    h.apply(ping("offline", reason="lost", ts=None, org="globex"), T0 + 1)
    h.tick(T0 + 12)
    assert h.alerts("acme") == []
    assert h.outbox("acme") == []
    assert ("down-now", "web-1", "firing", "firing") in h.alerts("globex")  # no channel: nothing queued
    assert h.outbox("globex") == []
    assert all(topic.startswith("fleet/globex/") for topic, _ in h.published)


def test_removing_the_org_forgets_its_alerts(h):
    h.rule("acme", "down-now", "status == offline")
    h.tick(T0)
    _offline(h)
    stores.remove_org(h.data_dir, "acme", h.database)
    h.engine.forget_org("acme")
    h.flush()
    assert h.alerts() == []
    assert ("fleet/acme/web-1/alert", b"") in h.published


def test_alertmanager_channels_get_firing_alerts_again_while_they_fire(h):
    stores.store_channel(h.data_dir, "acme", "am", "alertmanager", "alertmanager+http://127.0.0.1:9093", None,
                           "alertmanager+http://127.0.0.1:9093", h.database)
    h.rule("acme", "down-now", "status == offline")
    h.tick(T0)
    _offline(h)
    h.tick(T0 + 12)
    assert sorted(channel for channel, _ in h.outbox()) == ["am", "hook"]
    h.db.execute("DELETE FROM alert_outbox")  # delivered
    h.tick(T0 + 40)
    assert h.outbox() == []
    h.tick(T0 + 75)  # 60 s after the channel was first seen
    assert h.outbox() == [("am", [("firing", "down-now", "web-1")])]
    h.tick(T0 + 140)  # the re-send is still queued: no pile-up
    assert len(h.outbox()) == 1


def test_a_conflict_alert_resolves_when_the_tracker_timer_ends_the_conflict(h):
    h.rule("acme", "clone", "conflict", severity="critical")
    h.tick(T0)
    h.apply(report(seq=0, ts=T0, hw="hw-a"), T0)
    h.apply(report(session="s2", seq=0, ts=T0 + 1, hw="hw-b"), T0 + 1)
    assert ("clone", "web-1", "firing", "") in h.alerts()
    h.tick(T0 + 45)  # both hardware ids silent past stale_after (30 s): no conflict any more
    assert ("clone", "web-1", "resolved", "") in [(r, m, s, "") for r, m, s, _ in h.alerts()]


def _labelled_report(h, machine, labels, t, cpu=95.0, seq=0):
    message = report(machine=machine, seq=seq, ts=t, metrics={"cpu_percent": cpu})
    h.tracker.on_report(message, t, labels)
    h.engine.evaluate(h.tracker.get("acme", machine), t)
    h.flush()


def test_a_label_selector_picks_the_machines_and_notices_carry_their_labels(h):
    h.rule("acme", "prod-hot", "cpu_percent > 90", machines="env=prod,role!=db")
    _labelled_report(h, "web-1", {"env": "prod", "role": "web"}, T0)
    _labelled_report(h, "db-1", {"env": "prod", "role": "db"}, T0)
    _labelled_report(h, "dev-1", {"env": "dev"}, T0)
    _labelled_report(h, "bare", {}, T0)
    assert [a[:3] for a in h.alerts() if a[0] == "prod-hot"] == [("prod-hot", "web-1", "firing")]
    h.tick(T0 + 11)
    (_, body), = h.db.query("SELECT channel, notices FROM alert_outbox WHERE org = 'acme'")
    (notice,) = json.loads(body)
    assert notice["machine_labels"] == {"env": "prod", "role": "web"}
    # Its labels change so the selector no longer holds: the alert resolves, with the labels it fired with.
    _labelled_report(h, "web-1", {"env": "dev", "role": "web"}, T0 + 20, seq=1)
    assert [a[:3] for a in h.alerts() if a[0] == "prod-hot"] == [("prod-hot", "web-1", "resolved")]
    h.tick(T0 + 31)
    resolved = json.loads(h.db.query("SELECT notices FROM alert_outbox WHERE org = 'acme' ORDER BY id")[-1][0])
    assert [(n["status"], n["machine_labels"]) for n in resolved] == [("resolved", {"env": "prod", "role": "web"})]
    assert resolved[0]["fingerprint"] == notice["fingerprint"]


def test_a_silence_by_label_holds_back_matching_notices(h):
    from fleet.store.alerting import add_silence

    h.rule("acme", "hot", "cpu_percent > 90")
    add_silence(h.db, "acme", 3600, "env=dev", now=T0)
    h.engine.refresh(h.db, ORGS, T0)
    _labelled_report(h, "web-1", {"env": "prod"}, T0)
    _labelled_report(h, "dev-1", {"env": "dev"}, T0)
    h.tick(T0 + 11)
    notices = [n for (body,) in h.db.query("SELECT notices FROM alert_outbox WHERE org = 'acme'")
               for n in json.loads(body)]
    assert [n["machine_id"] for n in notices if n["rule"] == "hot"] == ["web-1"]


def test_an_acknowledgement_reaches_the_alert_topic_and_the_resolved_notice(h):
    from fleet.store.alerting import ack_alert

    h.rule("acme", "down-now", "status == offline")
    h.tick(T0)
    _offline(h)
    h.tick(T0 + 12)
    assert "acked_by" not in json.loads(h.published[-1][1])[0]
    (alert_id,) = h.db.query_one("SELECT id FROM alerts WHERE rule = 'down-now' AND state = 'firing'")
    ack_alert(h.db, "acme", alert_id, "neo@example.com", now=T0 + 20)
    h.engine.refresh(h.db, ORGS, T0 + 21)  # what the collector does every 2 s
    h.flush()
    topic, payload = h.published[-1]
    assert topic == alert_topic("acme", "web-1")
    assert json.loads(payload)[0]["acked_by"] == "neo@example.com"
    assert ("down-now", "web-1", "firing", "firing") in h.alerts()  # it keeps firing
    h.apply(ping("online", session="s2", ts=T0 + 30), T0 + 30)
    h.tick(T0 + 41)
    notices = json.loads(h.db.query("SELECT notices FROM alert_outbox WHERE org = 'acme' ORDER BY id")[-1][0])
    assert [(n["status"], n["rule"], n["acked_by"]) for n in notices] == [("resolved", "down-now", "neo@example.com")]
    assert h.db.query_one("SELECT acked_by, acked_at FROM alerts WHERE id = ?", (alert_id,)) == (
        "neo@example.com", T0 + 20)  # the collector's writes leave the acknowledgement alone
