"""Nothing acknowledged is lost for want of a subscription.

An agent may publish as soon as the broker accepts its org's credentials, and a broker drops what nobody
is subscribed to. The collector's periodic org refresh is slowed down here to a minute, so these tests
show that storing a new org's first report does not depend on it.
"""

from __future__ import annotations

import dataclasses

import pytest

from fleet.collector import writer
from fleet.collector.intake import UNKNOWN_ORG
from fleet.store import credentials
from tests import stores
from tests.collector.collector_fixtures import Endpoint, SimAgent, query
from tests.helpers import wait_for


@pytest.fixture(autouse=True)
def slow_org_refresh(monkeypatch):
    monkeypatch.setattr(writer, "ORG_REFRESH_MAX_S", 60.0)


def history(ep: Endpoint, org: str, machine: str = "m1") -> list[int]:
    return [row[0] for row in query(ep, "SELECT seq FROM reports WHERE org=? AND machine_id=? ORDER BY seq",
                                    org, machine)]


def agent_at_once(ep: Endpoint, keys: credentials.OrgSecrets, machine: str = "m1") -> SimAgent:
    """An agent of ``keys.org`` connecting the moment the broker accepts its credentials."""
    as_org = dataclasses.replace(ep, keys=keys)

    def attempt() -> SimAgent | None:
        try:
            return SimAgent(as_org, machine).connect()
        except AssertionError:
            return None  # refused: the broker has not loaded the new credentials yet

    return wait_for(attempt, 10, f"the broker to accept {keys.org}'s agent", interval=0.02)


def test_a_new_orgs_first_report_is_stored_without_waiting_for_the_collector(endpoint, collectors):
    collector = collectors(endpoint.settings(reload_interval_s=5.0))
    keys = stores.add_org(endpoint.data_dir, "initech")  # fleet org add
    agent = agent_at_once(endpoint, keys)
    assert agent.report() == 0
    agent.close()
    wait_for(lambda: history(endpoint, "initech") == [0], 10, "seq 0 of the new org in history")
    assert "initech" in collector.stats().orgs
    assert UNKNOWN_ORG not in collector.stats().dropped


def test_a_shard_is_subscribed_to_its_orgs_before_they_exist(endpoint, collectors):
    collector = collectors(endpoint.settings(orgs=("initech",), reload_interval_s=5.0))
    assert collector.stats().orgs == ()
    assert collector.subscriptions() == [("fleet/initech/+/report", 1), ("fleet/initech/+/ping", 1)]
    acme = SimAgent(endpoint, "m1").connect()  # not this shard's org: never even delivered
    acme.report()
    acme.close()
    keys = stores.add_org(endpoint.data_dir, "initech")
    agent = agent_at_once(endpoint, keys)
    agent.report()
    agent.close()
    wait_for(lambda: history(endpoint, "initech") == [0], 10, "seq 0 of the shard's new org in history")
    assert collector.stats().orgs == ("initech",)
    assert history(endpoint, "acme") == []
    assert collector.stats().dropped == {}


def test_an_unsharded_collector_subscribes_to_every_org_with_one_filter_per_kind(endpoint, collectors):
    collector = collectors(endpoint.settings())
    assert collector.subscriptions() == [("fleet/+/+/report", 1), ("fleet/+/+/ping", 1)]


def test_messages_of_an_org_that_does_not_exist_are_counted_and_dropped(mosquitto_endpoint, collectors):
    ep = mosquitto_endpoint  # anonymous Mosquitto: anyone may publish under any org name
    collector = collectors(ep.settings())
    ghost = SimAgent(dataclasses.replace(ep, keys=credentials.OrgSecrets("ghost", "k", "k")), "m1").connect()
    ghost.report()
    ghost.ping("online")
    ghost.close()
    acme = SimAgent(ep, "m1").connect()
    acme.report()
    acme.close()
    wait_for(lambda: history(ep, "acme") == [0], 10, "acme's report")
    wait_for(lambda: collector.stats().dropped.get(UNKNOWN_ORG) == 2, 10, "ghost's report and ping counted")
    assert history(ep, "ghost") == []
    assert collector.stats().orgs == ("acme",)
    assert query(ep, "SELECT count(*) FROM machines WHERE org='ghost'")[0][0] == 0
    wait_for(lambda: dict(query(ep, "SELECT reason, count FROM drops")).get(UNKNOWN_ORG) == 2, 10,
             "the drop stored")
