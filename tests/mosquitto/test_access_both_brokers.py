"""One access matrix run on both brokers: the embedded one and Debian's Mosquitto on `fleet mosquitto-config`.

Each row states what each broker does. Where they differ it is one of the two documented gaps of
Mosquitto's file ACLs (docs/deployment.md): agents are pinned to their org rather than their machine,
and wide subscriptions are granted, then filtered on delivery (never another org's messages).
"""

from __future__ import annotations

import pytest

from fleet.store import credentials
from tests import stores
from tests.helpers import Inbox, close, connect_client, wait_for

pytestmark = pytest.mark.mosquitto

OWN = "fleet/acme/web-1"
OTHER_MACHINE = "fleet/acme/db-1"
OTHER_ORG = "fleet/globex/web-1"
LOGINS = {  # who -> (username, org whose key, key attribute, client id)
    "acme-agent": ("acme/agent", "acme", "agent_key", "fleet-acme-web-1"),
    "acme-reader": ("acme/reader", "acme", "reader_key", "acme-dashboard"),
    "globex-agent": ("globex/agent", "globex", "agent_key", "fleet-globex-web-1"),
    "globex-reader": ("globex/reader", "globex", "reader_key", "globex-dashboard"),
    "service": (credentials.SERVICE_USERNAME, None, None, "collector"),  # the collector's account
}


@pytest.fixture(params=["embedded", "mosquitto"])
def kind(request):
    return request.param


@pytest.fixture
def any_broker(kind, request):
    return request.getfixturevalue("broker" if kind == "embedded" else "mosquitto_broker")


@pytest.fixture
def orgs(acme, globex):
    return {"acme": acme, "globex": globex}


def _login(broker, orgs, who):
    username, org, attr, client_id = LOGINS[who]
    key = stores.ensure_service_key(broker.data_dir) if org is None else getattr(orgs[org], attr)
    return connect_client(broker, username, key, client_id)


def _service(broker, client_id="watcher"):
    return connect_client(broker, credentials.SERVICE_USERNAME, stores.ensure_service_key(broker.data_dir),
                          client_id)


@pytest.mark.parametrize(("username", "key", "client_id", "embedded", "mosquitto"), [
    (None, None, "anon", 5, 5),
    ("acme/agent", "wrong-key", "fleet-acme-web-1", 5, 5),
    ("acme/reader", "acme-agent-key", "x", 5, 5),          # an agent key is not a reader key
    ("ghost/agent", "x", "fleet-ghost-web-1", 5, 5),
    ("acme/agent", "acme-agent-key", "fleet-acme-web-1", 0, 0),
    ("acme/agent", "acme-agent-key", "fleet-globex-web-1", 2, 0),  # gap: Mosquitto cannot check client ids
])
def test_connect(any_broker, kind, orgs, username, key, client_id, embedded, mosquitto):
    key = orgs["acme"].agent_key if key == "acme-agent-key" else key
    expected = embedded if kind == "embedded" else mosquitto
    if expected == 0:
        close(connect_client(any_broker, username, key, client_id))
    else:
        assert connect_client(any_broker, username, key, client_id, expect_rc=1) == expected


@pytest.mark.parametrize(("who", "topic", "embedded", "mosquitto"), [
    ("service", f"{OWN}/alert", True, True),                 # the collector's retained alert list
    ("service", f"{OTHER_ORG}/alert", True, True),
    ("service", f"{OWN}/report", False, False),
    ("acme-agent", f"{OWN}/alert", False, False),
    ("acme-agent", f"{OTHER_MACHINE}/alert", False, False),
    ("acme-reader", f"{OWN}/alert", False, False),
    ("globex-agent", f"{OWN}/alert", False, False),
    ("acme-agent", f"{OWN}/report", True, True),
    ("acme-agent", f"{OWN}/ping", True, True),
    ("acme-agent", f"{OWN}/other", False, False),
    ("acme-agent", f"{OTHER_MACHINE}/report", False, True),  # gap: org-level on Mosquitto
    ("acme-agent", f"{OTHER_ORG}/report", False, False),
    ("acme-agent", "fleet/acme/report", False, False),
    ("acme-reader", f"{OWN}/report", False, False),
    ("globex-agent", f"{OWN}/report", False, False),
    ("globex-reader", f"{OTHER_ORG}/ping", False, False),
])
def test_publish(any_broker, kind, orgs, who, topic, embedded, mosquitto):
    """A refused publish is dropped, nobody receives it, and the publisher stays connected."""
    watcher = _service(any_broker)
    inbox = Inbox(watcher)
    inbox.subscribe("fleet/#")
    client = _login(any_broker, orgs, who)
    marker = client if who == "acme-agent" else _login(any_broker, orgs, "acme-agent")
    try:
        client.publish(topic, b"payload", qos=1, retain=topic.endswith("/alert")).wait_for_publish(5)
        marker.publish(f"{OWN}/ping", b"marker", qos=1).wait_for_publish(5)
        inbox.wait_for_topic(f"{OWN}/ping")
        got = [m for m in inbox.messages if m.topic == topic and m.payload == b"payload"]
        assert bool(got) is (embedded if kind == "embedded" else mosquitto)
        assert client.is_connected()
    finally:
        for c in {id(client): client, id(marker): marker}.values():
            close(c)
        close(watcher)


@pytest.mark.parametrize(("who", "topic_filter", "embedded", "mosquitto"), [
    # (filter, what each broker delivers of the retained pings of acme/web-1, acme/db-1, globex/web-1)
    ("acme-reader", "fleet/acme/#", {OWN, OTHER_MACHINE}, {OWN, OTHER_MACHINE}),
    ("acme-reader", "fleet/acme/+/ping", {OWN, OTHER_MACHINE}, {OWN, OTHER_MACHINE}),
    ("acme-reader", "fleet/#", None, {OWN, OTHER_MACHINE}),       # gap: granted, filtered on delivery
    ("acme-reader", "#", None, {OWN, OTHER_MACHINE}),
    ("acme-reader", "fleet/+/web-1/ping", None, {OWN}),
    ("acme-reader", "fleet/globex/#", None, set()),
    ("acme-agent", f"{OWN}/#", {OWN}, set()),                      # Mosquitto: agents read nothing
    ("acme-agent", f"{OTHER_MACHINE}/#", None, set()),
    ("acme-agent", "fleet/#", None, set()),
    ("globex-reader", "fleet/acme/#", None, set()),
    ("globex-reader", "fleet/#", None, {OTHER_ORG}),
])
def test_subscribe_and_retained(any_broker, kind, orgs, who, topic_filter, embedded, mosquitto):
    """``None`` means SUBACK 0x80. Either way, no client ever receives what its org may not read."""
    for machine in (OWN, OTHER_MACHINE, OTHER_ORG):  # each machine's own agent leaves its retained ping
        _, org, name = machine.split("/")
        agent = connect_client(any_broker, f"{org}/agent", orgs[org].agent_key, f"fleet-{org}-{name}")
        agent.publish(f"{machine}/ping", machine.encode(), qos=1, retain=True).wait_for_publish(5)
        close(agent)
    client = _login(any_broker, orgs, who)
    try:
        inbox = Inbox(client)
        codes = inbox.subscribe(topic_filter, qos=1)
        expected = embedded if kind == "embedded" else mosquitto
        assert (codes[0] == 0x80) is (expected is None), codes
        # The broker sends a subscription's retained messages before it answers the next SUBSCRIBE,
        # so after this second SUBACK the inbox holds every retained message the first one got.
        inbox.subscribe(f"{OWN}/unused-probe", qos=1)
        got = {m.topic.rsplit("/", 1)[0] for m in inbox.messages}
        assert got == (expected or set())
    finally:
        close(client)


@pytest.mark.parametrize(("who", "topic_filter", "embedded", "mosquitto"), [
    ("acme-reader", "fleet/acme/#", {OWN, OTHER_MACHINE}, {OWN, OTHER_MACHINE}),
    ("acme-reader", "fleet/acme/+/alert", {OWN, OTHER_MACHINE}, {OWN, OTHER_MACHINE}),
    ("acme-reader", "fleet/+/+/alert", None, {OWN, OTHER_MACHINE}),  # gap: granted, filtered on delivery
    ("globex-reader", "fleet/globex/#", {OTHER_ORG}, {OTHER_ORG}),
    ("globex-reader", "fleet/acme/#", None, set()),
])
def test_retained_alerts_reach_readers_of_their_org_only(any_broker, kind, orgs, who, topic_filter, embedded,
                                                          mosquitto):
    """The collector publishes each machine's alert list retained; readers get their org's, never another's."""
    collector = _login(any_broker, orgs, "service")
    for machine in (OWN, OTHER_MACHINE, OTHER_ORG):
        collector.publish(f"{machine}/alert", b"[]", qos=1, retain=True).wait_for_publish(5)
    close(collector)
    client = _login(any_broker, orgs, who)
    try:
        inbox = Inbox(client)
        expected = embedded if kind == "embedded" else mosquitto
        assert (inbox.subscribe(topic_filter, qos=1)[0] == 0x80) is (expected is None)
        inbox.subscribe(f"{OWN}/unused-probe", qos=1)  # retained messages of the first filter arrive before this
        assert {m.topic.rsplit("/", 1)[0] for m in inbox.messages} == (expected or set())
        assert all(m.topic.endswith("/alert") and m.retain for m in inbox.messages)
    finally:
        close(client)


@pytest.mark.parametrize("will_topic", [f"{OTHER_ORG}/ping", f"{OTHER_MACHINE}/ping", f"{OWN}/report-x"])
def test_forbidden_last_will_is_never_published(any_broker, kind, orgs, will_topic):
    """Embedded: refused at CONNECT (CONNACK 5). Mosquitto 2.0 accepts the CONNECT and checks the will when it
    fires, so it is dropped then, except another machine of the same org (the org-level gap)."""
    watcher = _service(any_broker)
    inbox = Inbox(watcher)
    inbox.subscribe("fleet/#")
    will = (will_topic, b"forged-will", 1, True)
    if kind == "embedded":
        assert connect_client(any_broker, "acme/agent", orgs["acme"].agent_key, "fleet-acme-web-1", will=will,
                              expect_rc=1) == 5
    else:
        client = connect_client(any_broker, "acme/agent", orgs["acme"].agent_key, "fleet-acme-web-1", will=will)
        client.socket().close()  # abrupt loss: the broker would publish the will now
        client.loop_stop()
    # A legitimate will fired afterwards bounds the wait: the broker handled the first loss before it.
    marker = connect_client(any_broker, "acme/agent", orgs["acme"].agent_key, "fleet-acme-web-1",
                            will=(f"{OWN}/ping", b"marker-will", 1, False))
    marker.socket().close()
    marker.loop_stop()
    wait_for(lambda: inbox.on(f"{OWN}/ping"), timeout=10, message="the legitimate will")
    forged = [m for m in inbox.messages if m.payload == b"forged-will"]
    gap = kind == "mosquitto" and will_topic == f"{OTHER_MACHINE}/ping"
    assert bool(forged) is gap
    close(watcher)
