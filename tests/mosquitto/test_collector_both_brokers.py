"""The collector on both brokers' real access rules: the embedded broker and Mosquitto on `fleet mosquitto-config`.

The service account subscribes to every org with one wildcard filter per kind: both
brokers must grant it, and a new org's first report must reach history although the collector's periodic
org refresh (slowed to a minute here) has not run yet.
"""

from __future__ import annotations

import pytest

from fleet.collector import service, writer
from fleet.config import payloads
from fleet.config.settings import Settings
from fleet.config.topics import agent_client_id, report_topic
from tests import stores
from tests.dbhelpers import rows
from tests.helpers import close, connect_client, wait_for

pytestmark = pytest.mark.mosquitto


@pytest.fixture(params=["embedded", "mosquitto"])
def any_broker(request):
    return request.getfixturevalue("broker" if request.param == "embedded" else "mosquitto_broker")


@pytest.fixture
def collector(any_broker, monkeypatch):
    monkeypatch.setattr(writer, "ORG_REFRESH_MAX_S", 60.0)
    running = service.start(Settings(data_dir=any_broker.data_dir, broker_url=any_broker.url,
                                     ca=str(any_broker.ca_path), reload_interval_s=5.0, batch_interval_s=0.05))
    assert running.wait_subscribed(10)
    yield running
    running.stop()


def publish_report(broker, org: str, key: str, machine: str, seq: int) -> None:
    client = connect_client(broker, f"{org}/agent", key, agent_client_id(org, machine))
    try:
        raw = payloads.encode(payloads.build_report(machine, "0xhw", "s1", seq, 1.0, {"cpu_percent": 1.0}, {}))
        info = client.publish(report_topic(org, machine), raw, qos=1)
        info.wait_for_publish(10)
        assert info.is_published()
    finally:
        close(client)


def history(broker, org: str) -> list[int]:
    found = rows(str(broker.data_dir / "fleet.db"), "SELECT seq FROM reports WHERE org=? ORDER BY seq", org)
    return [row[0] for row in found]


def test_org_add_then_an_agent_at_once_and_history_holds_seq_0(any_broker, collector, acme):
    publish_report(any_broker, "acme", acme.agent_key, "web-1", 0)  # the wildcard subscription was granted
    wait_for(lambda: history(any_broker, "acme") == [0], 10, "acme's report in history")

    keys = stores.add_org(any_broker.data_dir, "initech")  # fleet org add
    if hasattr(any_broker, "reload"):
        any_broker.reload()  # Mosquitto: regenerate passwd/acl and SIGHUP, as docs/deployment.md says

    def accepted() -> bool:
        try:
            publish_report(any_broker, "initech", keys.agent_key, "m1", 0)
        except AssertionError:
            return False  # refused: the broker has not loaded the new credentials yet
        return True

    wait_for(accepted, 10, "the broker to accept initech's agent", interval=0.02)
    wait_for(lambda: history(any_broker, "initech") == [0], 10, "seq 0 of the new org in history")
    assert collector.stats().dropped == {}
