"""Forgetting a machine (``DELETE /api/fleet/<machine>``, ``fleet machine forget``) with a real broker and collector.

Its row is gone at once; the collector drops it from memory at its next refresh (event ``evicted``/``forgotten``,
alerts resolved, retained ping cleared), so neither the collector's next write nor its restart brings it back.
History stays. A machine that reports again afterwards is back, as a new one.
"""

from __future__ import annotations

import pytest

from fleet.store.database import open_database
from fleet.store.errors import NotFound
from fleet.store.forgotten import forget_machine
from tests.collector.collector_fixtures import SimAgent, query
from tests.collector.test_collector_e2e import _retained_cleared, events, machine_row, seqs
from tests.helpers import wait_for


def forget(endpoint, machine: str) -> None:
    with open_database(endpoint.database) as db:
        forget_machine(db, "acme", machine)


def forgets_done(endpoint) -> bool:
    return query(endpoint, "SELECT count(*) FROM machine_forgets") == [(0,)]


@pytest.mark.slow
def test_a_forgotten_machine_leaves_the_live_view_and_stays_gone_across_a_collector_restart(endpoint, collectors):
    collector = collectors(endpoint.settings())
    agent = SimAgent(endpoint, "m1").connect()
    agent.ping("online")
    agent.report()
    agent.ping("offline", reason="shutdown")
    agent.close()
    wait_for(lambda: (machine_row(endpoint) or ("",))[0] == "offline", message="m1 offline")
    forget(endpoint, "m1")
    assert machine_row(endpoint) is None  # at once, whatever the collector does
    wait_for(lambda: forgets_done(endpoint), message="the collector to apply the forget")
    assert events(endpoint)[-1][1:] == ("evicted", "forgotten")
    wait_for(lambda: _retained_cleared(endpoint), message="the broker to drop the retained ping")
    assert seqs(endpoint) == [0]  # history stays
    assert query(endpoint, "SELECT expired FROM org_stats WHERE org = 'acme'") in ([], [(0,)])  # not a TTL eviction
    collector.stop()
    collectors(endpoint.settings())
    marker = SimAgent(endpoint, "marker").connect()
    marker.report()
    wait_for(lambda: query(endpoint, "SELECT 1 FROM machines WHERE machine_id = 'marker'"), message="marker stored")
    assert machine_row(endpoint) is None
    marker.close()


@pytest.mark.slow
def test_a_forgotten_machine_that_reports_again_is_back(endpoint, collectors):
    collectors(endpoint.settings())
    agent = SimAgent(endpoint, "m1").connect()
    agent.ping("online")
    agent.report()
    wait_for(lambda: machine_row(endpoint), message="m1 stored")
    forget(endpoint, "m1")
    wait_for(lambda: forgets_done(endpoint), message="the collector to apply the forget")
    assert machine_row(endpoint) is None
    agent.report()
    wait_for(lambda: machine_row(endpoint), message="m1 back")
    agent.close()


def test_forgetting_an_unknown_machine_or_another_orgs_is_not_found(tmp_path, acme, globex, database_url):
    with open_database(database_url) as db:
        db.execute("INSERT INTO machines(org, machine_id, status, last_seen, updated) VALUES ('globex', 'g1', "
                   "'online', 1.0, 1.0)")
        with pytest.raises(NotFound):
            forget_machine(db, "acme", "g1")
        with pytest.raises(NotFound):
            forget_machine(db, "acme", "nothing")
        assert db.query("SELECT machine_id FROM machines") == [("g1",)]


@pytest.mark.slow
def test_a_machine_forgotten_while_no_collector_runs_is_dropped_when_one_starts(endpoint, collectors):
    collector = collectors(endpoint.settings())
    agent = SimAgent(endpoint, "m1").connect()
    agent.ping("online")
    agent.report()
    agent.ping("offline", reason="shutdown")
    agent.close()
    wait_for(lambda: (machine_row(endpoint) or ("",))[0] == "offline", message="m1 offline")
    collector.stop()
    forget(endpoint, "m1")
    collectors(endpoint.settings())  # its broker session brings m1's retained ping back
    wait_for(lambda: forgets_done(endpoint), message="the new collector to apply the forget")
    marker = SimAgent(endpoint, "marker").connect()
    marker.report()
    wait_for(lambda: query(endpoint, "SELECT 1 FROM machines WHERE machine_id = 'marker'"), message="marker stored")
    assert machine_row(endpoint) is None
    wait_for(lambda: _retained_cleared(endpoint), message="the broker to drop the retained ping")
    marker.close()
