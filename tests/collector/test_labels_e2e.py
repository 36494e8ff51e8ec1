"""Labels through a real broker and collector: stored per machine, changes as events, bad ones dropped and counted."""

from __future__ import annotations

import json
import logging
import time

import pytest

from fleet.config import payloads
from fleet.config.topics import report_topic
from fleet.store.database import open_database
from fleet.store.labels import set_labels
from tests.collector.collector_fixtures import SimAgent, query
from tests.helpers import wait_for


def _report(agent: SimAgent, labels) -> int:
    seq = agent.seq
    body = payloads.build_report(agent.machine, agent.hardware_id, agent.session, seq, time.time(),
                                 {"cpu_percent": 10.0}, {"os": "Linux"})
    body["labels"] = labels
    agent.publish(report_topic(agent.endpoint.keys.org, agent.machine), payloads.encode(body))
    agent.seq += 1
    return seq


def _stored(ep, machine="m1"):
    rows = query(ep, "SELECT agent_labels FROM machines WHERE org='acme' AND machine_id=?", machine)
    return json.loads(rows[0][0]) if rows else None


def _label_events(ep, machine="m1"):
    return [r for r, in query(ep, "SELECT reason FROM events WHERE org='acme' AND machine_id=? AND reason LIKE "
                                  "'labels:%' ORDER BY id", machine)]


@pytest.mark.both_engines
def test_agent_labels_are_stored_and_a_change_is_an_event(endpoint, collectors):
    collector = collectors(endpoint.settings())
    agent = SimAgent(endpoint, "m1").connect()
    _report(agent, {"env": "dev", "role": "web"})
    wait_for(lambda: _stored(endpoint) == {"env": "dev", "role": "web"}, message="labels stored")
    assert _label_events(endpoint) == []  # a machine's first labels are no change
    _report(agent, {"env": "prod"})
    wait_for(lambda: _stored(endpoint) == {"env": "prod"}, message="labels changed")
    assert _label_events(endpoint) == ["labels: env=dev->prod, -role"]
    # A server label wins, and the collector's own view (used by alert rules) follows within the reload interval.
    with open_database(endpoint.database) as db:
        set_labels(db, "acme", "m1", ["env=staging"], [])
    wait_for(lambda: collector.tracker.get("acme", "m1").labels == {"env": "staging"}, message="server label")
    assert _label_events(endpoint)[-1] == "labels: env=prod->staging"
    _report(agent, {"env": "prod", "site": "par"})
    wait_for(lambda: _stored(endpoint) == {"env": "prod", "site": "par"}, message="labels changed again")
    assert collector.tracker.get("acme", "m1").labels == {"env": "staging", "site": "par"}
    assert _label_events(endpoint)[-1] == "labels: +site=par"
    agent.close()


def test_bad_labels_keep_the_report_drop_the_labels_count_and_log_once(endpoint, collectors, caplog):
    collectors(endpoint.settings())
    agent = SimAgent(endpoint, "m1").connect()
    _report(agent, {"env": "prod"})
    wait_for(lambda: _stored(endpoint) == {"env": "prod"}, message="good labels")
    caplog.set_level(logging.WARNING, logger="fleet.collector")
    bad = [{f"k{i}": "v" for i in range(17)}, {"env": "x" * 65}, {"Env": "prod"}, "env=prod"]
    for labels in bad:
        _report(agent, labels)
    wait_for(lambda: query(endpoint, "SELECT count FROM drops WHERE reason='bad_labels'") == [(len(bad),)],
             message="dropped labels counted")
    seqs = [row[0] for row in query(endpoint, "SELECT seq FROM reports WHERE org='acme' AND machine_id='m1'")]
    assert sorted(seqs) == list(range(len(bad) + 1))  # every report kept
    assert _stored(endpoint) == {"env": "prod"}  # the labels it had stay
    logged = [r for r in caplog.records if "labels dropped" in r.getMessage()]
    assert len(logged) == 1
    assert "acme/m1" in logged[0].getMessage()
    agent.close()
