"""Debian's Mosquitto run with `fleet mosquitto-config`: the same users, keys and access rules."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from fleet.config import payloads
from fleet.store import credentials
from tests import stores
from tests.helpers import Inbox, close, connect_client, wait_for

pytestmark = pytest.mark.mosquitto


@pytest.fixture
def mosquitto(mosquitto_broker):
    return mosquitto_broker


def test_generated_files(mosquitto, acme):
    conf = (mosquitto.out_dir / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf
    assert "max_packet_size" in conf
    assert "\nautosave_interval 1\nautosave_on_changes false\n" in conf  # a crash loses at most ~1 s
    passwd = (mosquitto.out_dir / "passwd").read_text()
    assert "acme/agent:$7$" in passwd
    assert acme.agent_key not in passwd
    assert (mosquitto.out_dir / "passwd").stat().st_mode & 0o077 == 0
    acl = (mosquitto.out_dir / "acl").read_text()
    blocks = {block.splitlines()[0]: block.splitlines()[1:] for block in acl.split("\n\n") if block.startswith("user ")}
    writers = [user for user, lines in blocks.items() if "topic write fleet/+/+/alert" in lines]
    assert writers == [f"user {credentials.SERVICE_USERNAME}"]  # only the collector writes alert lists
    assert not [line for lines in blocks.values() for line in lines if "alert" in line and "+/+/alert" not in line]


@pytest.mark.parametrize(("who", "key_attr", "client_id", "code"), [
    ("acme/reader", "reader_key", "r1", 0), ("acme/agent", "agent_key", "fleet-acme-web-1", 0),
    ("acme/agent", "wrong", "fleet-acme-web-1", 5), (None, None, "anon", 5),
])
def test_connect(mosquitto, acme, who, key_attr, client_id, code):
    key = getattr(acme, key_attr) if key_attr and key_attr != "wrong" else ("nope" if key_attr else None)
    if code == 0:
        close(connect_client(mosquitto, who, key, client_id))
    else:
        assert connect_client(mosquitto, who, key, client_id, expect_rc=1) in (4, 5)


@pytest.mark.parametrize("topic_filter", ["fleet/acme/#", "fleet/#", "#", "fleet/globex/#", "fleet/+/+/report"])
def test_reader_receives_only_its_org_whatever_it_subscribes(mosquitto, acme, globex, topic_filter):
    """Mosquitto 2.0 grants wide subscriptions and checks each delivery against the ACL (the embedded
    broker refuses the SUBSCRIBE with 0x80 instead); either way a reader never sees another org."""
    client = connect_client(mosquitto, "acme/reader", acme.reader_key, "r")
    inbox = Inbox(client)
    inbox.subscribe(topic_filter)
    own = connect_client(mosquitto, "acme/agent", acme.agent_key, "fleet-acme-web-1")
    other = connect_client(mosquitto, "globex/agent", globex.agent_key, "fleet-globex-web-1")
    other.publish("fleet/globex/web-1/report", b"globex", qos=1).wait_for_publish(5)
    own.publish("fleet/acme/web-1/report", b"acme", qos=1).wait_for_publish(5)
    if topic_filter != "fleet/globex/#":
        inbox.wait_for_topic("fleet/acme/web-1/report")
    else:
        wait_for(lambda: True)
    assert all(m.topic.startswith("fleet/acme/") for m in inbox.messages)
    for c in (client, own, other):
        close(c)


def test_isolation_and_presence(mosquitto, acme, globex):
    reader = connect_client(mosquitto, "acme/reader", acme.reader_key, "r")
    inbox = Inbox(reader)
    inbox.subscribe("fleet/acme/#")
    will = payloads.encode(payloads.build_ping("web-1", "0x1", "s1", "offline", 1, reason="lost"))
    agent = connect_client(mosquitto, "acme/agent", acme.agent_key, "fleet-acme-web-1",
                           will=("fleet/acme/web-1/ping", will, 1, True))
    other = connect_client(mosquitto, "globex/agent", globex.agent_key, "fleet-globex-web-1")
    other.publish("fleet/acme/web-1/report", b"forged", qos=1).wait_for_publish(5)  # other org: denied
    agent.publish("fleet/acme/web-1/report", b"real", qos=1).wait_for_publish(5)
    agent.publish("fleet/acme/web-1/ping", b"online", qos=1, retain=True).wait_for_publish(5)
    inbox.wait_for_topic("fleet/acme/web-1/ping")
    assert [m.payload for m in inbox.on("fleet/acme/web-1/report")] == [b"real"]
    agent.socket().close()  # abrupt loss: Mosquitto publishes the will
    agent.loop_stop()
    wait_for(lambda: any(m.payload == will for m in inbox.on("fleet/acme/web-1/ping")), timeout=10,
             message="last will")
    close(other)
    close(reader)


def test_org_changes_apply_after_regenerate_and_sighup(mosquitto, acme):
    new = stores.add_org(mosquitto.data_dir, "initech")
    mosquitto.reload()
    wait_for(lambda: _can_connect(mosquitto, "initech/reader", new.reader_key), timeout=5, message="new org works")
    initech = connect_client(mosquitto, "initech/reader", new.reader_key, "initech-dashboard")
    bystander = connect_client(mosquitto, "acme/reader", acme.reader_key, "acme-dashboard")
    stores.remove_org(mosquitto.data_dir, "initech")
    mosquitto.reload()
    wait_for(lambda: not _can_connect(mosquitto, "initech/reader", new.reader_key), timeout=5,
             message="removed org refused")
    # On reload Mosquitto also drops live connections whose credentials are gone, and only those.
    wait_for(lambda: not initech.is_connected(), timeout=5, message="removed org's connection dropped")
    assert bystander.is_connected()
    initech.loop_stop()
    close(bystander)


def _can_connect(broker, user, key) -> bool:
    code = connect_client(broker, user, key, f"probe-{time.monotonic_ns()}", expect_rc=1)
    return code == 0


def test_payloads_over_64_kib_are_dropped_and_the_publisher_stays(mosquitto, acme):
    reader = connect_client(mosquitto, "acme/reader", acme.reader_key, "r")
    inbox = Inbox(reader)
    inbox.subscribe("fleet/acme/#")
    agent = connect_client(mosquitto, "acme/agent", acme.agent_key, "fleet-acme-web-1")
    agent.publish("fleet/acme/web-1/report", b"x" * (payloads.MAX_PAYLOAD_BYTES + 1), qos=1).wait_for_publish(5)
    agent.publish("fleet/acme/web-1/report", b"y" * payloads.MAX_PAYLOAD_BYTES, qos=1).wait_for_publish(5)
    agent.publish("fleet/acme/web-1/ping", b"marker", qos=1).wait_for_publish(5)
    inbox.wait_for_topic("fleet/acme/web-1/ping")
    assert [len(m.payload) for m in inbox.on("fleet/acme/web-1/report")] == [payloads.MAX_PAYLOAD_BYTES]
    assert agent.is_connected()
    close(agent)
    close(reader)


@pytest.mark.slow
def test_rotation_drops_the_old_key_and_its_live_connection(mosquitto, acme):
    reader = connect_client(mosquitto, "acme/reader", acme.reader_key, "acme-dashboard")
    agent = connect_client(mosquitto, "acme/agent", acme.agent_key, "fleet-acme-web-1")
    new_key = stores.rotate_key(mosquitto.data_dir, "acme", "reader")
    mosquitto.reload()
    wait_for(lambda: _can_connect(mosquitto, "acme/reader", new_key), timeout=5, message="new reader key works")
    assert not _can_connect(mosquitto, "acme/reader", acme.reader_key)
    wait_for(lambda: not reader.is_connected(), timeout=5, message="old reader key's connection dropped")
    assert agent.is_connected()
    reader.loop_stop()
    close(agent)


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop happens only when Mosquitto starts as root")
def test_started_as_root_it_drops_to_the_mosquitto_user(fleet_dir, acme):
    import psutil

    from tests.mosquitto.process import start_mosquitto

    out_dir = Path(tempfile.mkdtemp(prefix="fleet-mosquitto-", dir="/tmp"))
    out_dir.chmod(0o755)  # as /etc/mosquitto/... would be
    broker = start_mosquitto(fleet_dir, out_dir, run_as=None)
    try:
        assert psutil.Process(broker.proc.pid).username() == "mosquitto"
        assert "\nuser " not in (out_dir / "mosquitto.conf").read_text()
        close(connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-web-1"))
        broker.reload()  # the reloaded files are readable too
        close(connect_client(broker, "acme/reader", acme.reader_key, "r"))
    finally:
        broker.stop()
        shutil.rmtree(out_dir, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop happens only when Mosquitto starts as root")
def test_out_dir_the_mosquitto_user_cannot_reach_keeps_root(fleet_dir, acme, tmp_path):
    from tests.mosquitto.process import start_mosquitto

    tmp_path.chmod(0o700)
    broker = start_mosquitto(fleet_dir, tmp_path / "mq", run_as=None)
    try:
        conf = (tmp_path / "mq" / "mosquitto.conf").read_text()
        assert "not reachable by user mosquitto" in conf
        assert "\nuser root\n" in conf
        close(connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-web-1"))
    finally:
        broker.stop()


def test_plain_listener_is_loopback_only_and_keeps_the_access_rules(fleet_dir, acme, tmp_path):
    from tests.mosquitto.process import start_mosquitto

    broker = start_mosquitto(fleet_dir, tmp_path / "mq", plain=True)
    try:
        plain = broker.settings.mqtt_plain_port
        assert f"listener {plain} 127.0.0.1\n" in (tmp_path / "mq" / "mosquitto.conf").read_text()
        url = f"mqtt://127.0.0.1:{plain}"
        wait_for(lambda: connect_client(broker, "acme/reader", acme.reader_key, "r", url=url, expect_rc=1) == 0,
                 timeout=5, message="plain listener up")
        assert connect_client(broker, None, None, "anon", url=url, expect_rc=1) == 5
        assert connect_client(broker, "acme/reader", "wrong", "r", url=url, expect_rc=1) == 5
    finally:
        broker.stop()


@pytest.mark.slow
def test_what_the_last_save_holds_survives_a_sigkill(mosquitto, acme):
    """Mosquitto saves its in-memory state every second with the generated config: messages queued for an
    offline persistent session, and the session itself, survive a SIGKILL once a save has covered them."""
    key = stores.ensure_service_key(mosquitto.data_dir)
    collector = connect_client(mosquitto, credentials.SERVICE_USERNAME, key, "collector", clean_session=False)
    Inbox(collector).subscribe("fleet/acme/+/report", qos=1)
    close(collector)
    agent = connect_client(mosquitto, "acme/agent", acme.agent_key, "fleet-acme-web-1")
    for i in range(20):
        agent.publish("fleet/acme/web-1/report", f"m{i}".encode(), qos=1).wait_for_publish(5)
    close(agent)
    acknowledged = time.time_ns()
    db = mosquitto.out_dir / "data" / "mosquitto.db"
    wait_for(lambda: db.exists() and db.stat().st_mtime_ns > acknowledged, timeout=10, message="a save after them")
    mosquitto.kill()
    from tests.mosquitto.process import start_mosquitto

    restarted = start_mosquitto(mosquitto.data_dir, mosquitto.out_dir, port=mosquitto.port)
    try:
        inboxes = []
        back = connect_client(restarted, credentials.SERVICE_USERNAME, key, "collector", clean_session=False,
                              before_connect=lambda client: inboxes.append(Inbox(client)))
        got = inboxes[0].wait_for_count(20, timeout=10)
        assert [m.payload for m in got] == [f"m{i}".encode() for i in range(20)]
        close(back)
    finally:
        restarted.stop()
