"""The load simulator speaks the real protocol: reports, retained pings, wills, clean shutdown."""

from __future__ import annotations

from fleet.agent.simulate import start_simulation
from fleet.config import payloads
from fleet.config.labels import Spread
from fleet.store import credentials
from tests import stores
from tests.helpers import Inbox, close, connect_client, wait_for


def test_simulated_agents_report_and_shut_down_cleanly(broker, acme):
    reader = connect_client(broker, credentials.SERVICE_USERNAME, stores.ensure_service_key(broker.data_dir),
                            "watcher")
    inbox = Inbox(reader)
    inbox.subscribe("fleet/acme/#", qos=1)
    settings = broker.settings.replace(org="acme", key=acme.agent_key, interval=0.3)
    sim = start_simulation(settings, agents=20, seed=1, spread=Spread.parse("env=prod,dev;role=web,db,worker"))
    try:
        def machines_reporting():
            return {m.topic.split("/")[2] for m in inbox.messages if m.topic.endswith("/report")}

        wait_for(lambda: len(machines_reporting()) == 20, timeout=20, message="reports from all 20 agents")
        for m in inbox.messages:
            if m.topic.endswith("/report"):
                payloads.parse_report(m.payload, m.topic)
        online = [m for m in inbox.messages if m.topic.endswith("/ping")]
        assert {payloads.parse_ping(m.payload, m.topic).status for m in online} == {"online"}
        assert len({payloads.parse_report(m.payload, m.topic).system["os"] for m in inbox.messages
                    if m.topic.endswith("/report")}) >= 3
        labels = {m.topic.split("/")[2]: payloads.report_labels(payloads.parse_report(m.payload, m.topic))[0]
                  for m in inbox.messages if m.topic.endswith("/report")}
        assert labels["sim-0001"] == {"env": "prod", "role": "web"}
        assert labels["sim-0002"] == {"env": "dev", "role": "web"}
        assert labels["sim-0003"] == {"env": "prod", "role": "db"}
        assert {tuple(sorted(v.items())) for v in labels.values()} == {
            (("env", e), ("role", r)) for e in ("prod", "dev") for r in ("web", "db", "worker")}
    finally:
        sim.stop()
    stats = sim.stats()
    assert stats["refused"] == 0
    assert stats["connected"] == 0
    wait_for(lambda: len([m for m in inbox.messages if m.topic.endswith("/report")]) >= stats["acked"], timeout=10,
             message="every acknowledged report delivered")
    shutdowns = {m.topic for m in inbox.messages if m.topic.endswith("/ping")
                 and payloads.parse_ping(m.payload, m.topic).reason == "shutdown"}
    wait_for(lambda: len({m.topic for m in inbox.messages if m.topic.endswith("/ping")
                          and payloads.parse_ping(m.payload, m.topic).reason == "shutdown"}) == 20, timeout=10,
             message=f"offline/shutdown from every agent (got {len(shutdowns)})")
    close(reader)


def test_after_a_reconnect_simulated_agents_name_their_previous_session(broker_settings, acme):
    from fleet.broker.server import start_in_thread

    first = start_in_thread(broker_settings)
    settings = first.settings.replace(org="acme", key=acme.agent_key, interval=0.2, reconnect_max_s=0.5)
    sim = start_simulation(settings, agents=3, seed=2)
    second = None
    try:
        wait_for(lambda: sim.stats()["acked"] >= 9, timeout=20, message="reports acknowledged")
        first.stop()
        wait_for(lambda: sim.stats()["connected"] == 0, timeout=20, message="agents see the broker gone")
        ended = {agent.machine: (agent.session, agent.seq - 1) for agent in sim.agents}
        second = start_in_thread(broker_settings.replace(mqtt_port=first.port))
        reader = connect_client(second, credentials.SERVICE_USERNAME,
                                stores.ensure_service_key(second.data_dir), "watcher")
        inbox = Inbox(reader)
        inbox.subscribe("fleet/acme/+/ping", qos=1)

        def named():
            pings = [payloads.parse_ping(m.payload, m.topic) for m in inbox.messages]
            return {p.machine_id: (p.prev_session, p.prev_seq) for p in pings if p.prev_session}

        wait_for(lambda: len(named()) == 3, timeout=20, message="every agent names its previous session")
        assert named() == ended
        close(reader)
    finally:
        sim.stop()
        if second is not None:
            second.stop()
