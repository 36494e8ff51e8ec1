"""Machine certificates on Debian's Mosquitto, configured and kept current by `fleet mosquitto-config --watch`:
enrolment, the org key refused for an enrolled machine's topics, revocation and the org key switch within 5 s."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from fleet.agent.identity import IdentityFiles, enrol
from fleet.broker.mosquitto import kick_machine, watch
from fleet.collector.enrolment import CertificateAuthority, Signer
from fleet.config import connack
from fleet.config.mqtt import BrokerAddress, new_client
from fleet.config.settings import Settings
from fleet.config.topics import report_topic
from fleet.store import credentials, identity
from fleet.store.database import open_database
from tests.helpers import Inbox, close, connect_client, wait_for
from tests.identity.conftest import make_token

pytestmark = pytest.mark.mosquitto


@pytest.fixture
def mosquitto_settings(mosquitto_broker) -> Settings:
    return mosquitto_broker.settings.replace(broker_url=mosquitto_broker.url, reload_interval_s=0.5)


@pytest.fixture
def watcher(mosquitto_broker, mosquitto_settings: Settings):
    stop = threading.Event()
    thread = threading.Thread(target=watch, args=(mosquitto_settings, mosquitto_broker.out_dir,
                                                  mosquitto_broker.run_as, stop,
                                                  lambda org, m: kick_machine(mosquitto_settings, org, m)),
                              daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(10)


@pytest.fixture
def mosquitto_signer(mosquitto_broker, mosquitto_settings: Settings, watcher):
    with open_database(mosquitto_settings.database) as db:
        key = credentials.ensure_service_key(db, mosquitto_settings.data_dir)
    running = Signer(mosquitto_settings, CertificateAuthority.load(mosquitto_settings.certs_dir), key).start()
    assert running.wait_subscribed(10)
    yield running
    running.stop()


def _connect_cert(broker, settings: Settings, files: IdentityFiles, expect_refusal: bool = False) -> Any:
    address = BrokerAddress.parse(broker.url)
    client = new_client(address, f"fleet-{files.org}-{files.machine}", None, None, files.ca,
                        client_cert=files.client_cert())
    result: dict[str, int] = {}
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, reason_code: Any, _p: Any = None) -> None:
        result["rc"] = int(getattr(reason_code, "value", reason_code))
        done.set()

    client.on_connect = on_connect
    port = settings.mqtt_cert_port or settings.mqtt_port + 1
    try:
        client.connect(address.host, port, keepalive=30)
    except OSError:  # the CRL refuses the certificate in the handshake
        assert expect_refusal
        return None
    client.loop_start()
    assert done.wait(10) or expect_refusal
    if expect_refusal:
        client.loop_stop()
        return result.get("rc", -1)
    assert result["rc"] == 0
    return client


def test_enrol_publish_impersonation_and_revocation_on_mosquitto(mosquitto_broker, mosquitto_settings,
                                                                  mosquitto_signer, acme, tmp_path: Path) -> None:
    token = make_token(mosquitto_settings, uses=2)
    files = IdentityFiles(tmp_path / "agent", "acme", "db1")
    enrol(BrokerAddress.parse(mosquitto_broker.url), files, str(token.token), "")  # no --ca: the token's fingerprint
    reader = connect_client(mosquitto_broker, "acme/reader", acme.reader_key, "dash")
    inbox = Inbox(reader)
    inbox.subscribe("fleet/acme/#")
    machine = _connect_cert(mosquitto_broker, mosquitto_settings, files)
    machine.publish(report_topic("acme", "db1"), b'{"me": 1}', qos=1).wait_for_publish(5)
    assert inbox.wait_for_topic(report_topic("acme", "db1")).payload == b'{"me": 1}'
    machine.publish(report_topic("acme", "db2"), b'{"not me": 1}', qos=1).wait_for_publish(5)

    # The org key no longer speaks for db1 (once the watcher has written the ACL): its reports are dropped.
    impostor = connect_client(mosquitto_broker, "acme/agent", acme.agent_key, "fleet-acme-impostor")
    marker = report_topic("acme", "web1")

    def impostor_refused() -> bool:
        impostor.publish(report_topic("acme", "db1"), b'{"impostor": 1}', qos=1).wait_for_publish(5)
        impostor.publish(marker, b"{}", qos=1).wait_for_publish(5)
        inbox.wait_for_topic(marker)
        with inbox._cond:  # noqa: SLF001 - the test's own inbox
            inbox.messages.clear()
        impostor.publish(report_topic("acme", "db1"), b'{"impostor": 2}', qos=1).wait_for_publish(5)
        impostor.publish(marker, b"{}", qos=1).wait_for_publish(5)
        inbox.wait_for_topic(marker)
        return not inbox.on(report_topic("acme", "db1"))

    wait_for(impostor_refused, 5)
    assert not inbox.on(report_topic("acme", "db2"))  # the certificate only speaks for db1
    close(impostor)

    gone = threading.Event()
    machine.on_disconnect = lambda *_: gone.set()
    with open_database(mosquitto_settings.database) as db:
        identity.revoke_machine(db, "acme", "db1")
    assert gone.wait(5), "the revoked machine is still connected to Mosquitto"
    machine.loop_stop()
    assert _connect_cert(mosquitto_broker, mosquitto_settings, files, expect_refusal=True) != 0
    close(reader)


def test_agent_key_off_reaches_mosquitto_within_5_s(mosquitto_broker, mosquitto_settings, watcher, acme) -> None:
    keyed = connect_client(mosquitto_broker, "acme/agent", acme.agent_key, "fleet-acme-web1")
    gone = threading.Event()
    keyed.on_disconnect = lambda *_: gone.set()
    with open_database(mosquitto_settings.database) as db:
        identity.set_agent_key(db, "acme", False)
    assert gone.wait(5), "an org-key connection stays open on Mosquitto with the key off"
    keyed.loop_stop()
    assert connect_client(mosquitto_broker, "acme/agent", acme.agent_key, "fleet-acme-web1", expect_rc=1) \
        == connack.NOT_AUTHORIZED
