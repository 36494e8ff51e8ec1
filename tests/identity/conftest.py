"""Fixtures of the machine-identity tests: the embedded broker with the signer, tokens, enrolled machines."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.agent.identity import IdentityFiles, enrol
from fleet.collector.enrolment import CertificateAuthority, Signer
from fleet.config import connack
from fleet.config.mqtt import BrokerAddress, new_client
from fleet.config.settings import Settings
from fleet.config.tls import ca_fingerprint
from fleet.config.topics import agent_client_id
from fleet.store import credentials, identity
from fleet.store.database import open_database
from tests.helpers import connect_client


def running_signer(settings: Settings) -> Iterator[Signer]:
    """The signer (the collector's CA-holding part) for ``settings``, listening for requests; stopped after."""
    with open_database(settings.database) as db:
        key = credentials.ensure_service_key(db, settings.data_dir)
    running = Signer(settings, CertificateAuthority.load(settings.certs_dir), key).start()
    assert running.wait_subscribed(10)
    yield running
    running.stop()


@pytest.fixture
def signer(broker, broker_settings: Settings):
    """The signer connected to the test broker."""
    yield from running_signer(broker_settings.replace(broker_url=broker.url))


def make_token(settings: Settings, org: str = "acme", uses: int = 1, expires_s: float = 3600.0) -> identity.NewToken:
    """``fleet enrol create``."""
    fingerprint = ca_fingerprint((settings.certs_dir / "ca.pem").read_bytes())
    with open_database(settings.database) as db:
        return identity.create_token(db, settings.data_dir, fingerprint, org, uses, expires_s)


def enrol_machine(broker: Any, settings: Settings, agent_dir: Path, machine: str, org: str = "acme",
                  token: str | None = None) -> IdentityFiles:
    """Enrol ``machine`` as the agent does on its first start (no --ca: the token's fingerprint finds the CA)."""
    files = IdentityFiles(agent_dir, org, machine)
    enrol(BrokerAddress.parse(broker.url), files, token or str(make_token(settings, org).token), "")
    return files


HANDSHAKE_REFUSED = -1  # what connect_with_cert returns when the TLS handshake itself is refused (Mosquitto's CRL)


def connect_with_cert(broker: Any, files: IdentityFiles, client_id: str | None = None,
                      expect_rc: int = 0, timeout: float = 10.0, port: int | None = None) -> Any:
    """A paho client connected with the machine's certificate (no username), to ``port`` (default the broker's);
    or, when refused, the CONNACK code (HANDSHAKE_REFUSED when the handshake was)."""
    address = BrokerAddress.parse(broker.url)
    client = new_client(address, client_id or agent_client_id(files.org, files.machine), None, None, files.ca,
                        client_cert=files.client_cert())
    result: dict[str, int] = {}
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, reason_code: Any, _p: Any = None) -> None:
        result["rc"] = int(getattr(reason_code, "value", reason_code))
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *_: done.set()
    try:
        client.connect(address.host, port or address.port, keepalive=60)
    except OSError:  # ssl.SSLError among them
        if not expect_rc:
            raise
        return HANDSHAKE_REFUSED
    client.loop_start()
    if not done.wait(timeout):
        client.loop_stop()
        raise AssertionError("no CONNACK within timeout")
    rc = connack.from_reason_code(result.get("rc", connack.NOT_AUTHORIZED))
    if expect_rc or rc:
        client.loop_stop()
        client.disconnect()
        return rc
    return client


def assert_key_off_ends_org_key_connections(broker: Any, settings: Settings, org: credentials.OrgSecrets) -> None:
    """With ``--agent-key off`` an org-key connection is closed within 5 s and the key is refused after."""
    keyed = connect_client(broker, f"{org.org}/agent", org.agent_key, f"fleet-{org.org}-web1")
    gone = threading.Event()
    keyed.on_disconnect = lambda *_: gone.set()
    with open_database(settings.database) as db:
        identity.set_agent_key(db, org.org, False)
    assert gone.wait(5), "an org-key connection stays open with the key off"
    keyed.loop_stop()
    refused = connect_client(broker, f"{org.org}/agent", org.agent_key, f"fleet-{org.org}-web1", expect_rc=1)
    assert refused == connack.NOT_AUTHORIZED
