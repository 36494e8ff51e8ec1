"""The broker remembers which subscription filters each topic matches: a filter added or removed later counts."""

from __future__ import annotations

import threading

from fleet.broker.server import start_in_thread
from fleet.store import credentials
from tests import stores
from tests.helpers import Inbox, close, connect_client

REPORT = "fleet/acme/web-1/report"


def test_a_filter_added_or_removed_after_a_topic_was_routed_changes_where_it_goes(broker_settings, acme):
    broker = start_in_thread(broker_settings)
    agent = connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-web-1")
    service_key = stores.ensure_service_key(broker.data_dir)
    first = connect_client(broker, credentials.SERVICE_USERNAME, service_key, "first")
    second = connect_client(broker, credentials.SERVICE_USERNAME, service_key, "second")
    try:
        inbox_first, inbox_second = Inbox(first), Inbox(second)
        inbox_first.subscribe("fleet/+/+/report")
        agent.publish(REPORT, b"1", qos=1).wait_for_publish(5)  # the topic is routed once: to first only
        assert [m.payload for m in inbox_first.wait_for_count(1)] == [b"1"]

        inbox_second.subscribe("fleet/acme/#")  # a new filter the topic matches
        agent.publish(REPORT, b"2", qos=1).wait_for_publish(5)
        assert [m.payload for m in inbox_second.wait_for_count(1)] == [b"2"]

        unsubscribed = threading.Event()
        first.on_unsubscribe = lambda *_args: unsubscribed.set()
        first.unsubscribe("fleet/+/+/report")
        assert unsubscribed.wait(5), "no UNSUBACK"
        close(second)  # its session (clean) and its filter go
        agent.publish(REPORT, b"3", qos=1).wait_for_publish(5)
        third = connect_client(broker, credentials.SERVICE_USERNAME, service_key, "third")
        inbox_third = Inbox(third)
        inbox_third.subscribe("fleet/acme/web-1/report")
        agent.publish(REPORT, b"4", qos=1).wait_for_publish(5)
        assert [m.payload for m in inbox_third.wait_for_count(1)] == [b"4"]
        assert [m.payload for m in inbox_first.messages] == [b"1", b"2"]  # nothing after its UNSUBSCRIBE
        close(third)
    finally:
        close(agent)
        close(first)
        broker.stop()
