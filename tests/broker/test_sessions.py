"""Session takeover: a second CONNECT with a client id (same user) ends the live connection first, then is
admitted; the older connection's will is published and a persistent session keeps its subscriptions."""

from __future__ import annotations

import threading

from fleet.collector.mqtt_codec import Connect, encode
from fleet.store import credentials
from tests import stores
from tests.helpers import Inbox, close, connect_client, tls_socket, wait_for

PING = "fleet/acme/web-1/ping"
REPORT = "fleet/acme/web-1/report"


def _watcher(broker):
    watcher = connect_client(broker, credentials.SERVICE_USERNAME, stores.ensure_service_key(broker.data_dir),
                             "watcher")
    inbox = Inbox(watcher)
    inbox.subscribe("fleet/acme/#")
    return watcher, inbox


def test_takeover_ends_the_older_connection_and_publishes_its_will(broker, acme):
    watcher, inbox = _watcher(broker)
    older = connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-web-1", will=(PING, b"lost", 1, True))
    older.reconnect_delay_set(60, 60)  # stays down once dropped, so the newer one is the only one left
    dropped = threading.Event()
    older.on_disconnect = lambda *_args: dropped.set()
    newer = connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-web-1")
    assert dropped.wait(5)
    assert inbox.wait_for_topic(PING).payload == b"lost"
    newer.publish(REPORT, b"from-newer", qos=1).wait_for_publish(5)
    assert inbox.wait_for_topic(REPORT).payload == b"from-newer"
    assert broker.broker.connected_count() == 2  # the watcher and the newer agent
    older.loop_stop()
    close(newer)
    close(watcher)


def test_takeover_of_a_persistent_session_keeps_its_subscriptions(broker, acme):
    first = connect_client(broker, "acme/reader", acme.reader_key, "dash", clean_session=False)
    first.reconnect_delay_set(60, 60)
    Inbox(first).subscribe("fleet/acme/#")
    inboxes = []
    second = connect_client(broker, "acme/reader", acme.reader_key, "dash", clean_session=False,
                            before_connect=lambda client: inboxes.append(Inbox(client)))
    wait_for(lambda: not first.is_connected(), timeout=5, message="older connection dropped")
    agent = connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-web-1")
    agent.publish(REPORT, b"still-subscribed", qos=1).wait_for_publish(5)
    assert inboxes[0].wait_for_topic(REPORT).payload == b"still-subscribed"
    first.loop_stop()
    close(agent)
    close(second)


def test_simultaneous_takeovers_leave_exactly_one_connection(broker, acme):
    original = connect_client(broker, "acme/reader", acme.reader_key, "dash")
    original.reconnect_delay_set(60, 60)
    clients: list = []

    def take_over() -> None:
        client = connect_client(broker, "acme/reader", acme.reader_key, "dash", timeout=15)
        client.reconnect_delay_set(60, 60)
        clients.append(client)

    threads = [threading.Thread(target=take_over) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: sum(c.is_connected() for c in [original, *clients]) == 1, timeout=10,
             message="one connection left")
    assert broker.broker.connected_count() == 1
    for client in [original, *clients]:
        client.loop_stop()


def test_a_client_leaving_right_after_connect_leaves_no_session_behind(broker, acme):
    """A client that gives up before its CONNACK (its own timeout, under load) closes right after CONNECT.
    amqtt's handler made the connection's disconnect waiter only after its reader had started, so such a
    connection never ended: the session stayed connected for ever, and each later CONNECT with that client
    id waited 10 s for the takeover and was refused (CONNACK 3), again and again."""
    for i in range(20):
        sock = tls_socket(broker)
        sock.sendall(encode(Connect(f"fleet-acme-m{i}", "acme/agent", acme.agent_key)))
        sock.close()
    wait_for(lambda: broker.stats().get("connections", 0) >= 20, timeout=10, message="all 20 connections handled")
    # Each CONNECT is still authenticated (a key hash in a worker thread) before its session exists and then
    # ends: under a loaded suite that takes seconds. The defect was a session connected for ever.
    wait_for(lambda: broker.broker.connected_count() == 0, timeout=30, message="no session left connected")
    again = connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-m0", timeout=5)
    close(again)


def test_a_connection_whose_close_fails_still_frees_its_client_id(broker, acme, monkeypatch):
    """Python 3.11.2's TLS transport raises AttributeError from abort() once its connection is gone; that ended
    the connection's task before its session was marked disconnected, and every later CONNECT with the client
    id was refused ("the older connection did not end"). Whatever fails while a connection ends, it ends."""
    from fleet.broker.protocol import FleetProtocolHandler

    real_stop = FleetProtocolHandler.stop
    failures = []

    async def failing_stop(self):
        await real_stop(self)
        failures.append(self)
        raise AttributeError("'NoneType' object has no attribute '_abort'")

    monkeypatch.setattr(FleetProtocolHandler, "stop", failing_stop)
    first = connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-web-1", clean_session=False)
    first.disconnect()
    first.loop_stop()
    wait_for(lambda: failures and broker.broker.connected_count() == 0, timeout=10, message="first connection ended")
    monkeypatch.setattr(FleetProtocolHandler, "stop", real_stop)
    again = connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-web-1", clean_session=False, timeout=5)
    close(again)
