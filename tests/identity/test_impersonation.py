"""The story of issue 21: with the org agent key, a second process connected as an enrolled machine's client id
and kicked the real machine off. An enrolled machine's certificate alone speaks for it now."""

from __future__ import annotations

from pathlib import Path

from fleet.config import connack
from fleet.config.topics import report_topic
from tests.helpers import Inbox, close, connect_client, wait_for
from tests.identity.conftest import connect_with_cert, enrol_machine


def test_org_key_cannot_take_over_an_enrolled_machine(broker, broker_settings, signer, acme, tmp_path: Path) -> None:
    files = enrol_machine(broker, broker_settings, tmp_path / "agent", "db1")
    real = connect_with_cert(broker, files)
    reader = connect_client(broker, "acme/reader", acme.reader_key, "reader-1")
    inbox = Inbox(reader)
    assert inbox.subscribe("fleet/acme/#") == [1]
    try:
        refused = connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-db1", expect_rc=1)
        assert refused == connack.NOT_AUTHORIZED
        assert real.is_connected()
        real.publish(report_topic("acme", "db1"), b'{"still": "me"}', qos=1).wait_for_publish(5)
        assert inbox.wait_for_topic(report_topic("acme", "db1")).payload == b'{"still": "me"}'
    finally:
        close(real)
        close(reader)


def test_org_key_still_works_for_machines_not_enrolled(broker, signer, acme) -> None:
    client = connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-web1")
    close(client)


def test_certificate_names_its_machine_not_the_client_id(broker, broker_settings, signer, tmp_path: Path) -> None:
    files = enrol_machine(broker, broker_settings, tmp_path / "agent", "db1")
    assert connect_with_cert(broker, files, "fleet-acme-db2", expect_rc=1) == connack.IDENTIFIER_REJECTED
    assert connect_with_cert(broker, files, "fleet-globex-db1", expect_rc=1) == connack.IDENTIFIER_REJECTED
    wait_for(lambda: broker.stats().get("connect_refused", 0) >= 2)
