"""Machine certificates on Debian's Mosquitto, configured and kept current by `fleet mosquitto-config --watch`:
enrolment, the org key refused for an enrolled machine's topics, revocation and the org key switch within 5 s."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from fleet.agent.identity import IdentityFiles, enrol
from fleet.broker.mosquitto import cert_port, kick_machine, watch
from fleet.config.mqtt import BrokerAddress
from fleet.config.settings import Settings
from fleet.config.topics import report_topic
from fleet.store import identity
from fleet.store.database import open_database
from tests.helpers import Inbox, close, connect_client, wait_for
from tests.identity.conftest import (
    assert_key_off_ends_org_key_connections,
    connect_with_cert,
    make_token,
    running_signer,
)

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
    yield from running_signer(mosquitto_settings)


def _connect_cert(broker, settings: Settings, files: IdentityFiles, expect_refusal: bool = False) -> Any:
    """A machine's connection to Mosquitto's certificate listener; with ``expect_refusal``, how it was refused."""
    port = cert_port(settings)
    return connect_with_cert(broker, files, expect_rc=1 if expect_refusal else 0, port=port)


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
    assert_key_off_ends_org_key_connections(mosquitto_broker, mosquitto_settings, acme)
