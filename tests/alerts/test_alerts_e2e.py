"""Alerts end to end: the embedded broker, real agents and the collector, a loopback webhook, the web API.

Short group waits and ``for`` durations are injected; every wait is bounded and waits for an event or a
database state (or, where the point is that nothing happens, for the moment by which it would have).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.agent.simulate import start_simulation
from fleet.config.rules import Rule
from fleet.config.settings import Settings
from fleet.notify.channels import add_channel
from fleet.web.app import create_app
from tests import stores
from tests.alerts.proxy import Proxy
from tests.alerts.receiver import Receiver, signed_with
from tests.collector.collector_fixtures import SimAgent, embedded_endpoint
from tests.dbhelpers import rows
from tests.helpers import Inbox, bearer, close, connect_client, wait_for

ROOT = Path(__file__).resolve().parents[2]
GROUP_WAIT = 0.5


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make() -> Receiver:
        made.append(Receiver())
        return made[-1]

    yield make
    for r in made:
        r.close()


def _settings(broker, **changes) -> Settings:
    base = dict(data_dir=broker.data_dir, database_url=broker.settings.database_url, broker_url=broker.url,
                ca=str(broker.ca_path), batch_interval_s=0.05,
                reload_interval_s=0.5, interval=1.0, alert_group_wait=GROUP_WAIT)
    base.update(changes)
    return Settings(**base)


def _watch_offline(settings: Settings, org: str, receiver: Receiver, for_: str = "0s") -> str:
    """Rule ``down`` (status == offline) and a webhook channel to ``receiver``; returns the signing secret."""
    stores.add_rule(settings.data_dir, Rule.parse(org, "down", "status == offline", for_, severity="critical"),
                      settings.database)
    return add_channel(settings, org, "hook", receiver.url).secret


def query(database: str, sql: str, *args):
    """A read query on the test's database (a fresh read-only connection, as the web does)."""
    return rows(database, sql, *args)


def _alerts(database, org="acme", rule="down"):
    return query(database, "SELECT machine_id, state, notified FROM alerts WHERE org = ? AND rule = ? ORDER BY id",
                 org, rule)


def _outbox(database):
    return query(database, "SELECT count(*) FROM alert_outbox")[0][0]


def _channel(database, org="acme"):
    rows = query(database, "SELECT last_delivery, last_error, failures FROM alert_channels WHERE org = ?", org)
    return rows[0]


def _machines(broker, status: str) -> int:
    return query(broker.settings.database, "SELECT count(*) FROM machines WHERE status = ?", status)[0][0]


def _online(database, machine, org="acme"):
    rows = query(database, "SELECT status FROM machines WHERE org = ? AND machine_id = ?", org, machine)
    return bool(rows) and rows[0][0] == "online"


def _lose(ep, machine: str = "m1", org: str = "acme") -> None:
    """An agent comes online, then vanishes without a word (its last will says offline/lost)."""
    agent = SimAgent(ep, machine).connect()
    agent.ping("online")
    wait_for(lambda: _online(ep.database, machine, org), message=f"{machine} online")
    agent.drop()


def _quiet_until(deadline: float) -> bool:
    return time.time() >= deadline


def _agent(ep, acme, machine):
    cmd = [sys.executable, "-m", "fleet.cli", "agent", "--data-dir", str(ep.database), "--broker", ep.url,
           "--org", "acme", "--key", acme.agent_key, "--machine", machine, "--ca", str(ep.ca), "--interval", "0.5"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkilled_agent_fires_a_signed_webhook_then_resolves_once_each(broker, acme, collectors, receivers):
    ep = embedded_endpoint(broker, acme)
    settings = _settings(broker)
    hook = receivers()
    secret = _watch_offline(settings, "acme", hook)
    collectors(settings)
    proc = _agent(ep, acme, "real-1")
    try:
        wait_for(lambda: _online(ep.database, "real-1"), timeout=20, message="the agent online")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        post = hook.wait_posts(1, timeout=30)[0]
        assert signed_with(post, secret)
        body = post.json()
        assert (body["version"], body["status"]) == ("4", "firing")
        assert [(a["status"], a["labels"]) for a in body["alerts"]] == [
            ("firing", {"alertname": "down", "org": "acme", "machine_id": "real-1", "severity": "critical"})]
        assert body["alerts"][0]["startsAt"].endswith("Z")
        proc = _agent(ep, acme, "real-1")
        posts = hook.wait_posts(2, timeout=30)
        assert signed_with(posts[1], secret)
        assert [a["status"] for a in posts[1].json()["alerts"]] == ["resolved"]
        wait_for(lambda: _alerts(ep.database) == [("real-1", "resolved", "resolved")] and _outbox(ep.database) == 0,
                 message="the alert resolved and nothing more to send")
        assert len(hook.posts) == 2
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.slow
def test_fifty_machines_lost_at_once_are_a_few_grouped_posts(broker, acme, collectors, receivers):
    settings = _settings(broker, alert_group_wait=3.0)
    hook = receivers()
    _watch_offline(settings, "acme", hook)
    collectors(settings)
    proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "simulate", "--data-dir", str(broker.data_dir),
                             "--broker", broker.url, "--org", "acme", "--key", acme.agent_key, "--agents", "50",
                             "--ca", str(broker.ca_path), "--interval", "1"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _machines(broker, "online") == 50,
                 timeout=60, message="50 simulated machines online")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

        def all_notified():
            machines = {m for status, _, m in hook.alerts() if status == "firing"}
            return len(machines) == 50

        wait_for(all_notified, timeout=60, message="every lost machine in a firing notification")
        assert len(hook.posts) <= 3
        assert all(len(p.json()["alerts"]) >= 1 for p in hook.posts)
        assert len(hook.alerts()) == 50  # each machine once
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.slow
def test_collector_away_15_s_while_agents_report_fires_nothing(broker, acme, collectors, receivers):
    settings = _settings(broker)
    hook = receivers()
    _watch_offline(settings, "acme", hook)
    stores.add_rule(broker.data_dir, Rule.parse("acme", "quiet", "status == stale", "0s"), broker.settings.database)
    first = collectors(settings)
    sim = start_simulation(settings.replace(org="acme", key=acme.agent_key), agents=5, seed=1)
    try:
        wait_for(lambda: _machines(broker, "online") == 5,
                 timeout=30, message="5 machines online")
        first.stop()
        sent = sim.stats()["sent"]
        wait_for(lambda: sim.stats()["sent"] >= sent + 15 * 5, timeout=40,
                 message="15 s of reports while the collector is away")
        second = collectors(settings)
        since = time.time()
        # Nothing may fire once the backlog is in, the blind window (stale_after = 3 s) has passed and a group
        # would have been sealed and delivered.
        wait_for(lambda: second.stats().stored >= 15 * 5, timeout=30, message="the backlog stored")
        wait_for(lambda: _quiet_until(since + 3.0 + GROUP_WAIT + 2.0), timeout=15)
        assert query(broker.settings.database, "SELECT count(*) FROM alerts WHERE state != 'pending'") == [(0,)]
        assert hook.attempts == 0
        assert _outbox(broker.settings.database) == 0
    finally:
        sim.stop()


@pytest.mark.slow
def test_a_collector_cut_off_the_broker_does_not_blame_the_fleet(broker, acme, collectors, receivers):
    """The collector keeps running but loses the broker for 15 s: machines look silent to it, yet nothing fires."""
    proxy = Proxy("127.0.0.1", broker.port)
    settings = _settings(broker)
    hook = receivers()
    _watch_offline(settings, "acme", hook)
    stores.add_rule(broker.data_dir, Rule.parse("acme", "quiet", "status == stale", "0s"), broker.settings.database)
    collector = collectors(settings.replace(broker_url=f"mqtts://127.0.0.1:{proxy.port}"))
    sim = start_simulation(settings.replace(org="acme", key=acme.agent_key), agents=5, seed=2)
    try:
        wait_for(lambda: _machines(broker, "online") == 5,
                 timeout=30, message="5 machines online")
        proxy.cut()
        wait_for(lambda: not collector.stats().broker_connected, message="the collector noticed")
        sent = sim.stats()["sent"]
        wait_for(lambda: sim.stats()["sent"] >= sent + 15 * 5, timeout=40, message="15 s of reports meanwhile")
        wait_for(lambda: _machines(broker, "stale") == 5,
                 message="to the collector the machines went stale")
        assert hook.attempts == 0
        proxy.restore()
        wait_for(lambda: collector.stats().broker_connected, timeout=15, message="reconnected")
        since = time.time()
        wait_for(lambda: _machines(broker, "online") == 5,
                 timeout=20, message="the backlog says they never left")
        wait_for(lambda: _quiet_until(since + 3.0 + GROUP_WAIT + 2.0), timeout=15)
        assert query(broker.settings.database, "SELECT count(*) FROM alerts WHERE state != 'pending'") == [(0,)]
        assert hook.attempts == 0
    finally:
        sim.stop()
        proxy.close()


@pytest.mark.both_engines
@pytest.mark.slow
def test_a_restarted_collector_does_not_notify_a_firing_alert_again(broker, acme, collectors, receivers):
    ep = embedded_endpoint(broker, acme)
    settings = _settings(broker)
    hook = receivers()
    _watch_offline(settings, "acme", hook)
    first = collectors(settings)
    _lose(ep)
    hook.wait_posts(1)
    wait_for(lambda: _alerts(ep.database) == [("m1", "firing", "firing")] and _outbox(ep.database) == 0)
    first.stop()
    second = collectors(settings)
    since = time.time()
    wait_for(lambda: _quiet_until(since + 3.0 + GROUP_WAIT + 1.5), timeout=15)
    assert second.stats().broker_connected
    assert len(hook.posts) == 1
    assert _alerts(ep.database) == [("m1", "firing", "firing")]
    again = SimAgent(ep, "m1").connect()
    again.ping("online")
    posts = hook.wait_posts(2)
    assert [a["status"] for a in posts[1].json()["alerts"]] == ["resolved"]
    again.close()


@pytest.mark.both_engines
@pytest.mark.slow
def test_a_500_then_200_is_delivered_once(broker, acme, collectors, receivers):
    ep = embedded_endpoint(broker, acme)
    settings = _settings(broker)
    hook = receivers()
    hook.answers.append(500)
    _watch_offline(settings, "acme", hook)
    collectors(settings)
    _lose(ep)
    assert len(hook.wait_posts(1, timeout=15)) == 1
    assert hook.attempts == 2
    wait_for(lambda: _outbox(ep.database) == 0 and _channel(ep.database)[0] is not None, message="delivery recorded")
    last_delivery, last_error, failures = _channel(ep.database)
    assert failures == 0
    assert "500" in last_error


@pytest.mark.slow
def test_a_4xx_is_not_retried_and_the_error_is_visible(broker, acme, collectors, receivers):
    ep = embedded_endpoint(broker, acme)
    settings = _settings(broker)
    hook = receivers()
    hook.answers.append(403)
    _watch_offline(settings, "acme", hook)
    collectors(settings)
    _lose(ep)
    hook.wait_attempts(1)
    wait_for(lambda: _channel(ep.database)[1] is not None and _outbox(ep.database) == 0, message="error recorded")
    last_delivery, last_error, failures = _channel(ep.database)
    assert (last_delivery, failures) == (None, 1)
    assert "403" in last_error
    assert "not retried" in last_error
    assert hook.attempts == 1  # and nothing is left in the outbox to try again


@pytest.mark.both_engines
@pytest.mark.slow
def test_a_silenced_alert_sends_nothing_but_is_listed(broker, acme, collectors, receivers):
    ep = embedded_endpoint(broker, acme)
    settings = _settings(broker)
    hook = receivers()
    _watch_offline(settings, "acme", hook)
    stores.add_silence(ep.data_dir, "acme", 3600, "m*", None, "planned work", database=ep.database)
    collectors(settings)
    _lose(ep)
    wait_for(lambda: _alerts(ep.database) == [("m1", "firing", "")], message="firing")
    fired = query(ep.database, "SELECT fired_at FROM alerts WHERE rule = 'down'")[0][0]
    wait_for(lambda: _quiet_until(fired + GROUP_WAIT + 2.0), timeout=10)
    assert hook.attempts == 0
    assert _outbox(ep.database) == 0
    api = create_app(settings).test_client()
    listed = api.get("/api/alerts?state=firing", headers=bearer(acme.reader_key)).get_json()["data"]
    assert [(a["rule"], a["machine_id"], a["silenced"]) for a in listed] == [("down", "m1", True)]


def _readers(broker, keys_by_org) -> dict[str, Inbox]:
    readers = {}
    for org, keys in keys_by_org.items():
        readers[org] = Inbox(connect_client(broker, f"{org}/reader", keys.reader_key, f"reader-{org}"))
        assert readers[org].subscribe(f"fleet/{org}/#") == [1]
    return readers


@pytest.mark.slow
def test_two_orgs_never_see_each_others_alerts(broker, acme, globex, collectors, receivers):
    settings = _settings(broker)
    hooks = {"acme": receivers(), "globex": receivers()}
    for org, hook in hooks.items():
        _watch_offline(settings, org, hook)
    collectors(settings)
    readers = _readers(broker, {"acme": acme, "globex": globex})
    ep = embedded_endpoint(broker, globex)
    _lose(ep, "g1", "globex")
    post = hooks["globex"].wait_posts(1)[0]
    assert {a["labels"]["org"] for a in post.json()["alerts"]} == {"globex"}
    wait_for(lambda: _outbox(ep.database) == 0, message="globex delivered")
    assert hooks["acme"].attempts == 0
    assert not [m for m in readers["acme"].messages if "/globex/" in m.topic]
    api = create_app(settings).test_client()
    assert api.get("/api/alerts", headers=bearer(acme.reader_key)).get_json()["data"] == []
    assert [a["machine_id"] for a in api.get("/api/alerts", headers=bearer(globex.reader_key)).get_json()["data"]
            if a["rule"] == "down"] == ["g1"]
    for inbox in readers.values():
        close(inbox.client)


@pytest.mark.slow
def test_the_alert_topic_is_retained_and_reaches_its_org_only(broker, acme, globex, collectors):
    """Needs the broker's rule that lets the collector's service account publish fleet/<org>/<m>/alert."""
    settings = _settings(broker)
    stores.add_rule(settings.data_dir, Rule.parse("globex", "down", "status == offline", severity="critical"),
                      settings.database)
    collectors(settings)
    readers = _readers(broker, {"acme": acme, "globex": globex})
    ep = embedded_endpoint(broker, globex)
    _lose(ep, "g1", "globex")
    live = readers["globex"].wait_for_topic("fleet/globex/g1/alert")
    body = json.loads(live.payload)
    assert [(a["rule"], a["severity"], a["value"]) for a in body] == [("down", "critical", None)]
    assert body[0]["since"] > 0
    late = Inbox(connect_client(broker, "globex/reader", globex.reader_key, "reader-late"))
    late.subscribe("fleet/globex/+/alert")
    retained = late.wait_for_topic("fleet/globex/g1/alert")
    assert (retained.retain, json.loads(retained.payload)) == (True, body)
    back = SimAgent(ep, "g1").connect()
    back.ping("online")
    wait_for(lambda: [m.payload for m in readers["globex"].on("fleet/globex/g1/alert")][-1] == b"[]",
             message="an empty list once it resolves")
    assert not [m for m in readers["acme"].messages if "/globex/" in m.topic]
    back.close()
    for inbox in (*readers.values(), late):
        close(inbox.client)
