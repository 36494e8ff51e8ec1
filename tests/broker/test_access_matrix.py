"""Access matrix of the embedded broker: who may connect, publish and subscribe, over real TLS.

Roles: acme's agent (client id fleet-acme-web-1), acme's reader, globex's agent and reader,
anonymous, a wrong key. Topics: acme's own machine, another acme machine, a globex machine.
"""

from __future__ import annotations

import socket
import ssl

import pytest

from fleet.collector.mqtt_codec import Connack, Connect, encode
from fleet.config.topics import alert_topic
from fleet.store import credentials
from tests import stores
from tests.helpers import Inbox, close, connect_client

OWN = "fleet/acme/web-1"
OTHER_MACHINE = "fleet/acme/db-1"
OTHER_ORG = "fleet/globex/web-1"


@pytest.fixture
def orgs(acme, globex):
    return {"acme": acme, "globex": globex}


def _login(broker, orgs, who):
    if who == "service":  # the collector's account
        return connect_client(broker, credentials.SERVICE_USERNAME, stores.ensure_service_key(broker.data_dir),
                              "collector")
    if who == "acme-agent":
        return connect_client(broker, "acme/agent", orgs["acme"].agent_key, "fleet-acme-web-1")
    if who == "acme-reader":
        return connect_client(broker, "acme/reader", orgs["acme"].reader_key, "acme-dashboard")
    if who == "globex-agent":
        return connect_client(broker, "globex/agent", orgs["globex"].agent_key, "fleet-globex-web-1")
    if who == "globex-reader":
        return connect_client(broker, "globex/reader", orgs["globex"].reader_key, "globex-dashboard")
    raise ValueError(who)


@pytest.mark.parametrize(("username", "key", "client_id", "code"), [
    (None, None, "anon", 5),
    ("acme/agent", "wrong-key", "fleet-acme-web-1", 5),
    ("acme/reader", "acme-agent-key", "x", 5),         # an agent key is not a reader key
    ("ghost/agent", "x", "fleet-ghost-web-1", 5),
    ("acme/agent", "acme-agent-key", "web-1", 2),      # agents must use fleet-<org>-<machine>
    ("acme/agent", "acme-agent-key", "fleet-globex-web-1", 2),
])
def test_refused_connections(broker, orgs, username, key, client_id, code):
    key = orgs["acme"].agent_key if key == "acme-agent-key" else key
    assert connect_client(broker, username, key, client_id, expect_rc=1) == code


@pytest.mark.parametrize(("who", "topic_filter", "allowed"), [
    ("acme-reader", "fleet/acme/#", True),
    ("acme-reader", "fleet/acme/+/ping", True),
    ("acme-reader", "fleet/#", False),
    ("acme-reader", "#", False),
    ("acme-reader", "fleet/+/web-1/report", False),
    ("acme-reader", "fleet/globex/#", False),
    ("acme-reader", "$SYS/#", False),
    ("acme-agent", f"{OWN}/#", True),
    ("acme-agent", f"{OTHER_MACHINE}/#", False),
    ("acme-agent", "fleet/acme/#", False),
    ("acme-agent", f"{OTHER_ORG}/#", False),
    ("globex-reader", "fleet/acme/#", False),
])
def test_subscribe_matrix(broker, orgs, who, topic_filter, allowed):
    client = _login(broker, orgs, who)
    try:
        codes = Inbox(client).subscribe(topic_filter, qos=1)
        assert (codes[0] != 0x80) is allowed, codes
    finally:
        close(client)


@pytest.mark.parametrize(("who", "topic", "retain", "delivered"), [
    ("acme-agent", f"{OWN}/report", False, True),
    ("acme-agent", f"{OWN}/ping", True, True),
    ("acme-agent", f"{OWN}/other", False, False),
    ("acme-agent", f"{OTHER_MACHINE}/report", False, False),
    ("acme-agent", f"{OTHER_ORG}/report", False, False),
    ("acme-reader", f"{OWN}/report", False, False),
    ("globex-agent", f"{OWN}/report", False, False),
    # fleet/<org>/<machine>/alert: only the collector's service account, retained
    ("service", f"{OWN}/alert", True, True),
    ("service", f"{OTHER_ORG}/alert", True, True),
    ("service", f"{OWN}/alert", False, False),
    ("service", f"{OWN}/report", False, False),
    ("acme-agent", f"{OWN}/alert", True, False),
    ("acme-agent", f"{OWN}/alert", False, False),
    ("acme-agent", f"{OTHER_MACHINE}/alert", True, False),
    ("acme-reader", f"{OWN}/alert", True, False),
    ("globex-agent", f"{OWN}/alert", True, False),
])
def test_publish_matrix(broker, orgs, who, topic, retain, delivered):
    """A refused publish is dropped (and counted); the publisher stays connected; nobody receives it."""
    watcher = connect_client(broker, credentials.SERVICE_USERNAME, stores.ensure_service_key(broker.data_dir),
                             "watcher")
    inbox = Inbox(watcher)
    inbox.subscribe("fleet/#")
    client = _login(broker, orgs, who)
    try:
        client.publish(topic, b"payload", qos=1, retain=retain).wait_for_publish(5)
        # A marker from acme's agent, published afterwards on the same broker, bounds the wait.
        marker = _login(broker, orgs, "acme-agent") if who != "acme-agent" else client
        marker.publish(f"{OWN}/ping", b"marker", qos=1).wait_for_publish(5)
        inbox.wait_for_topic(f"{OWN}/ping")
        got = [m for m in inbox.messages if m.topic == topic and m.payload == b"payload"]
        assert bool(got) is delivered
        if not delivered:
            assert broker.stats().get("dropped_not_allowed", 0) >= 1
            assert client.is_connected()
        if marker is not client:
            close(marker)
    finally:
        close(client)
        close(watcher)


def test_reader_receives_only_its_org(broker, orgs):
    acme_reader = _login(broker, orgs, "acme-reader")
    globex_reader = _login(broker, orgs, "globex-reader")
    acme_inbox, globex_inbox = Inbox(acme_reader), Inbox(globex_reader)
    acme_inbox.subscribe("fleet/acme/#")
    globex_inbox.subscribe("fleet/globex/#")
    acme_agent, globex_agent = _login(broker, orgs, "acme-agent"), _login(broker, orgs, "globex-agent")
    acme_agent.publish(f"{OWN}/report", b"a", qos=1).wait_for_publish(5)
    globex_agent.publish(f"{OTHER_ORG}/report", b"g", qos=1).wait_for_publish(5)
    assert acme_inbox.wait_for_topic(f"{OWN}/report").payload == b"a"
    assert globex_inbox.wait_for_topic(f"{OTHER_ORG}/report").payload == b"g"
    assert [m.topic for m in acme_inbox.messages] == [f"{OWN}/report"]
    assert [m.topic for m in globex_inbox.messages] == [f"{OTHER_ORG}/report"]
    for c in (acme_reader, globex_reader, acme_agent, globex_agent):
        close(c)


def test_retained_alerts_reach_readers_of_their_org_only(broker, orgs):
    """The collector's retained alert lists reach each org's readers through fleet/<org>/#, never another org's."""
    collector = _login(broker, orgs, "service")
    for machine in (OWN, OTHER_MACHINE, OTHER_ORG):
        _, org, name = machine.split("/")
        assert alert_topic(org, name) == f"{machine}/alert"
        collector.publish(alert_topic(org, name), f"[{machine}]".encode(), qos=1, retain=True).wait_for_publish(5)
    close(collector)
    for who, org_filter, expected in (("acme-reader", "fleet/acme/#", {OWN, OTHER_MACHINE}),
                                      ("globex-reader", "fleet/globex/#", {OTHER_ORG})):
        reader = _login(broker, orgs, who)
        inbox = Inbox(reader)
        assert inbox.subscribe("fleet/+/+/alert") == [0x80]  # wider than its org
        inbox.subscribe(org_filter)
        inbox.subscribe(f"{org_filter[:-2]}/probe")  # retained messages of the first filter arrive before this SUBACK
        assert {m.topic.rsplit("/", 1)[0] for m in inbox.messages} == expected
        assert all(m.retain and m.payload == f"[{m.topic.rsplit('/', 1)[0]}]".encode() for m in inbox.messages)
        close(reader)


def test_plain_mqtt_to_the_tls_port_is_refused(broker):
    """A client speaking MQTT without TLS gets no CONNACK: the TLS listener only speaks TLS."""
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as sock:
        sock.sendall(encode(Connect("plain")))
        sock.settimeout(5)
        try:
            data = sock.recv(16)
        except (TimeoutError, ConnectionResetError):
            data = b""
        assert not data.startswith(encode(Connack())[:1])  # never a CONNACK


def test_client_not_trusting_the_ca_is_refused(broker, orgs, tmp_path):
    import trustme

    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    with pytest.raises(ssl.SSLError):
        connect_client(broker, "acme/reader", orgs["acme"].reader_key, "x", ca_path=other_ca)


def test_server_certificate_names_localhost_and_loopback(broker, orgs):
    for host in ("localhost", "127.0.0.1"):
        client = connect_client(broker, "acme/reader", orgs["acme"].reader_key, f"r-{host}",
                                url=f"mqtts://{host}:{broker.port}")
        close(client)
