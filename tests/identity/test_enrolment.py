"""Enrolment end to end on the embedded broker: refusals with reasons, revocation and the org key switch
within 5 s, bad requests refused and counted, nothing signed."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.agent.errors import AgentError
from fleet.agent.identity import IdentityFiles, check_private, enrol
from fleet.collector.enrolment import check_csr
from fleet.config import connack
from fleet.config.enrolment import BAD_CSR, EnrolmentError, Token, enrol_username, exchange_topic
from fleet.config.mqtt import BrokerAddress
from fleet.config.topics import report_topic
from fleet.store import identity
from fleet.store.database import open_database
from tests.helpers import Inbox, close, connect_client, wait_for
from tests.identity.conftest import (
    assert_key_off_ends_org_key_connections,
    connect_with_cert,
    enrol_machine,
    make_token,
)


def _csr(cn: str, key: Any = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM).decode()


def test_refused_tokens_exit_with_their_reason(broker, broker_settings, signer, tmp_path: Path) -> None:
    token = make_token(broker_settings, uses=1)
    enrol_machine(broker, broker_settings, tmp_path / "a", "web1", token=str(token.token))
    with pytest.raises(AgentError, match="enrolment refused: used up"):
        enrol_machine(broker, broker_settings, tmp_path / "b", "web2", token=str(token.token))
    expired = make_token(broker_settings, expires_s=0.01)
    with pytest.raises(AgentError, match="enrolment refused: expired"):
        enrol_machine(broker, broker_settings, tmp_path / "c", "web3", token=str(expired.token))
    revoked = make_token(broker_settings)
    with open_database(broker_settings.database) as db:
        identity.revoke_token(db, "acme", revoked.token.id)
    with pytest.raises(AgentError, match="enrolment refused: revoked"):
        enrol_machine(broker, broker_settings, tmp_path / "d", "web4", token=str(revoked.token))
    forged = Token(token.token.ca_fingerprint, token.token.id, "x" * 43)
    with pytest.raises(AgentError, match="enrolment refused: unknown"):
        enrol_machine(broker, broker_settings, tmp_path / "e", "web5", token=str(forged))
    assert signer.refused["used up"] == 1
    assert signer.refused["expired"] == 1
    assert signer.refused["revoked"] == 1


def test_a_token_of_another_installation_is_refused_before_anything_is_sent(broker, broker_settings, signer,
                                                                             tmp_path: Path) -> None:
    token = make_token(broker_settings)
    other = Token("00" * 32, token.token.id, token.token.secret)
    def mqtt_connections() -> int:  # connections that got past TLS
        stats = broker.stats()
        return stats.get("connections", 0) - stats.get("connect_invalid", 0)

    before = mqtt_connections()
    with pytest.raises(AgentError, match="does not present the CA the enrolment token names"):
        enrol_machine(broker, broker_settings, tmp_path / "a", "web1", token=str(other))
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    with pytest.raises(AgentError, match="is not the CA the enrolment token names"):
        enrol(BrokerAddress.parse(broker.url), IdentityFiles(tmp_path / "b", "acme", "web1"), str(token.token),
              str(tmp_path / "other-ca.pem"))
    # Only TLS handshakes: each connection ends before a CONNECT (counted invalid once the broker sees it close).
    wait_for(lambda: mqtt_connections() == before, 5)
    assert broker.stats().get("connect_refused", 0) == 0


def test_revocation_closes_the_connection_and_refuses_the_certificate(broker, broker_settings, signer,
                                                                      tmp_path: Path) -> None:
    files = enrol_machine(broker, broker_settings, tmp_path / "agent", "db1")
    client = connect_with_cert(broker, files)
    gone = threading.Event()
    client.on_disconnect = lambda *_: gone.set()
    with open_database(broker_settings.database) as db:
        identity.revoke_machine(db, "acme", "db1")
        assert identity.list_machines(db, "acme")[0]["revoked"] is True
    assert gone.wait(5), "the revoked machine's connection stays open"
    client.loop_stop()
    assert connect_with_cert(broker, files, expect_rc=1) == connack.NOT_AUTHORIZED
    again = enrol_machine(broker, broker_settings, tmp_path / "agent2", "db1")  # a new token enrols the name again
    close(connect_with_cert(broker, again))


def test_agent_key_off_applies_within_5_s(broker, broker_settings, signer, acme, tmp_path: Path) -> None:
    files = enrol_machine(broker, broker_settings, tmp_path / "agent", "db1")
    assert_key_off_ends_org_key_connections(broker, broker_settings, acme)
    close(connect_with_cert(broker, files))  # enrolled machines still connect
    with open_database(broker_settings.database) as db:
        identity.set_agent_key(db, "acme", True)
    wait_for(lambda: connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-web1", expect_rc=1)
             == connack.ACCEPTED, 6)


def test_the_exchange_is_private_to_the_machine(broker, broker_settings, signer, acme, tmp_path: Path) -> None:
    reader = connect_client(broker, "acme/reader", acme.reader_key, "reader-1")
    inbox = Inbox(reader)
    assert inbox.subscribe("fleet/acme/#") == [1]
    assert inbox.subscribe("fleet/acme/db1/cert") == [0x80]
    enrol_machine(broker, broker_settings, tmp_path / "agent", "db1")
    marker = connect_client(broker, "acme/agent", acme.agent_key, "fleet-acme-web9")
    marker.publish("fleet/acme/web9/report", b"{}", qos=1).wait_for_publish(5)
    inbox.wait_for_topic("fleet/acme/web9/report")
    assert not [m for m in inbox.messages if m.topic.rsplit("/", 1)[1] in ("enrol", "cert", "renew")]
    close(marker)
    close(reader)


def _raw_request(broker, broker_settings, machine: str, body: dict[str, Any]) -> dict[str, Any]:
    """Publish an enrolment request as an enrolling client would, return the signer's answer."""
    token = make_token(broker_settings, uses=5).token
    deadline = time.monotonic() + 6
    while True:
        client = connect_client(broker, enrol_username("acme", token.id), token.secret, f"fleet-acme-{machine}",
                                expect_rc=1)
        if client == 0 or time.monotonic() > deadline:
            break
    client = connect_client(broker, enrol_username("acme", token.id), token.secret, f"fleet-acme-{machine}")
    inbox = Inbox(client)
    assert inbox.subscribe(exchange_topic("acme", machine, "cert")) == [1]
    client.publish(exchange_topic("acme", machine, "enrol"), json.dumps({"v": 1, "request": "r1", "token_id": token.id,
                                                                          **body}), qos=1)
    answer = json.loads(inbox.wait_for_topic(exchange_topic("acme", machine, "cert"), 10).payload)
    close(client)
    return answer


@pytest.mark.parametrize(("csr", "why"), [
    ("-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n", "garbage PEM"),
    (_csr("acme/other"), "another machine"),
    (_csr("globex/db1"), "another org"),
    (_csr("acme/db1", rsa.generate_private_key(65537, 2048)), "an RSA key"),
])
def test_bad_requests_are_refused_and_nothing_is_signed(broker, broker_settings, signer, csr: str, why: str) -> None:
    answer = _raw_request(broker, broker_settings, "db1", {"csr": csr})
    assert answer == {"v": 1, "request": "r1", "ok": False, "error": BAD_CSR}, why
    assert signer.refused[BAD_CSR] == 1
    assert signer.signed == 0
    with open_database(broker_settings.database) as db:
        assert identity.machine_cert(db, "acme", "db1") is None
        assert [t["used"] for t in identity.list_tokens(db, "acme")] == [0]


def test_a_1_mib_request_is_refused(broker, broker_settings, signer) -> None:
    with pytest.raises(EnrolmentError, match="over"):
        check_csr("A" * (1 << 20), "acme", "db1")
    token = make_token(broker_settings, uses=5).token
    wait_for(lambda: connect_client(broker, enrol_username("acme", token.id), token.secret, "fleet-acme-db1",
                                    expect_rc=1) == 0, 6)
    client = connect_client(broker, enrol_username("acme", token.id), token.secret, "fleet-acme-db1")
    client.publish(exchange_topic("acme", "db1", "enrol"), b"x" * (1 << 20), qos=1)
    wait_for(lambda: broker.stats().get("dropped_packet_too_large", 0) + broker.stats().get("dropped_too_large", 0)
             >= 1 or not client.is_connected(), 5)
    client.loop_stop()
    assert signer.signed == 0


def test_the_agent_refuses_a_key_others_can_read(tmp_path: Path) -> None:
    key = tmp_path / "agent-acme-db1.key"
    key.write_text("k")
    key.chmod(0o644)
    with pytest.raises(AgentError, match="readable by others"):
        check_private(key)
    key.chmod(0o600)
    check_private(key)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=3000), st.binary(max_size=2000).map(lambda b: b.decode("latin-1")),
                 st.sampled_from(["acme/db1", "acme/db2", "x/db1", "acme/db1/x", "acme"]).map(_csr),
                 st.integers(), st.none(), st.lists(st.text(max_size=5))))
def test_csr_handling_refuses_anything_but_a_good_request(pem: Any) -> None:
    reasons: list[str] = []
    try:
        csr = check_csr(pem, "acme", "db1")
    except EnrolmentError as exc:
        reasons.append(exc.reason)
    else:
        assert csr.subject.rfc4514_string() == "CN=acme/db1"
    assert reasons in ([], [BAD_CSR])


def test_machine_objects_say_how_the_machine_authenticates(broker, broker_settings, signer, acme,
                                                          tmp_path: Path) -> None:
    from fleet.store import alerting
    from fleet.web.app import create_app
    from tests.helpers import bearer

    enrol_machine(broker, broker_settings, tmp_path / "agent", "db1")
    with open_database(broker_settings.database) as db:
        now = time.time()
        db.executemany("INSERT INTO machines(org, machine_id, status, first_seen, updated) VALUES ('acme', ?,"
                       " 'online', ?, ?)", [("db1", now, now), ("web1", now, now)])
        rules = {r.name: str(r.when) for r in alerting.list_rules(db, "acme")}
        listed = {m["machine_id"]: m for m in identity.list_machines(db, "acme")}
    assert rules["cert-expiring"] == "cert_days_left < 14"
    assert listed["db1"]["auth"] == "certificate"
    assert listed["web1"]["auth"] == "org-key"
    client = create_app(broker_settings).test_client()
    fleet = {m["machine_id"]: m for m in client.get("/api/fleet", headers=bearer(acme.reader_key)).json["data"]}
    assert fleet["web1"]["auth"] == "org-key"
    assert fleet["web1"]["cert_not_after"] is None
    assert fleet["db1"]["auth"] == "certificate"
    assert fleet["db1"]["cert_not_after"] == pytest.approx(now + 365 * 86_400, abs=120)
    one = client.get("/api/fleet/db1", headers=bearer(acme.reader_key)).json
    assert one["auth"] == "certificate"
    assert one["cert_not_after"] == fleet["db1"]["cert_not_after"]


def test_fleet_agent_enrols_on_first_start_and_reuses_its_certificate(broker, broker_settings, signer,
                                                                      tmp_path: Path) -> None:
    from fleet.agent import runner
    from fleet.config.settings import Settings

    token = make_token(broker_settings)
    agent_dir = tmp_path / "agent"
    first = Settings(data_dir=agent_dir, broker_url=broker.url, org="acme", machine="db1", enrol=str(token.token),
                     interval=0.2)
    assert runner.run(first, once=True) == 0
    files = IdentityFiles(agent_dir, "acme", "db1")
    assert files.enrolled()
    assert (files.key.stat().st_mode & 0o777) == 0o600
    assert (agent_dir.stat().st_mode & 0o777) == 0o700
    again = Settings(data_dir=agent_dir, broker_url=broker.url, org="acme", machine="db1", interval=0.2)
    assert runner.run(again, once=True) == 0  # no token, no key, no --ca: the data dir's certificate and CA
    files.key.chmod(0o640)
    with pytest.raises(AgentError, match="readable by others"):
        runner.run(again, once=True)


def _agent(broker, agent_dir: Path, machine: str = "db1"):
    from fleet.agent.outbox import Outbox
    from fleet.agent.runner import Agent
    from fleet.config.settings import Settings

    settings = Settings(data_dir=agent_dir, broker_url=broker.url, org="acme", machine=machine, interval=0.2)
    files = IdentityFiles(agent_dir, "acme", machine)
    agent = Agent(settings, machine, Outbox(agent_dir / f"agent-acme-{machine}.db", 1000, 1 << 20))
    agent.ca_path, agent.identity = files.ca, files
    return agent


def test_the_agent_renews_over_its_own_connection(broker, broker_settings, signer, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    files = enrol_machine(broker, broker_settings, tmp_path / "agent", "db1")
    first = files.cert.read_bytes()
    with open_database(broker_settings.database) as db:
        before = identity.machine_cert(db, "acme", "db1")
    agent = _agent(broker, tmp_path / "agent")
    agent.connect()
    agent.renew_at = 0.0  # two thirds of its life have passed

    def renewed() -> bool:
        agent.pump()
        agent.maybe_renew()
        return files.cert.read_bytes() != first

    wait_for(renewed, 10)
    with open_database(broker_settings.database) as db:
        after = identity.machine_cert(db, "acme", "db1")
    assert after is not None
    assert before is not None
    assert after.serial != before.serial
    assert after.prev_serial == before.serial
    assert after.enrolled_at == before.enrolled_at
    assert agent.renew_at > time.time() + 86_400 * 200
    agent.shutdown()
    close(connect_with_cert(broker, files))  # the new certificate connects
    agent.outbox.close()


def test_a_failing_renewal_keeps_the_old_certificate_and_logs_once(broker, broker_settings, signer, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    files = enrol_machine(broker, broker_settings, tmp_path / "agent", "db1")
    first = files.cert.read_bytes()
    agent = _agent(broker, tmp_path / "agent")
    agent.connect()
    signer.stop()  # nobody answers
    agent.renew_at = 0.0
    agent.maybe_renew()
    assert agent.renewal is not None
    for _ in range(3):
        agent.renewal = (agent.renewal[0] if agent.renewal else "x", 0.0)  # its answer is overdue
        agent.maybe_renew()
        agent.renew_at = 0.0
    failures = [r for r in caplog.records if "certificate renewal failed" in r.getMessage()]
    assert len(failures) == 1
    assert files.cert.read_bytes() == first
    assert agent.conn is not None
    assert agent.conn.is_connected()
    agent.shutdown()
    agent.outbox.close()


def test_simulate_enrols_its_machines_and_connects_with_their_certificates(broker, broker_settings, signer,
                                                                           tmp_path: Path) -> None:
    from fleet.agent.simulate import start_simulation
    from fleet.config.settings import Settings

    token = make_token(broker_settings, uses=5)
    settings = Settings(data_dir=tmp_path / "sim", broker_url=broker.url, org="acme", enrol=str(token.token),
                        interval=0.5)
    sim = start_simulation(settings, 5, seed=1, connect_rate=100)
    try:
        wait_for(lambda: sim.stats()["connected"] == 5 and sim.stats()["acked"] >= 5, 20)
    finally:
        sim.stop()
    with open_database(broker_settings.database) as db:
        machines = identity.list_machines(db, "acme")
    assert [m["machine_id"] for m in machines if m["auth"] == "certificate"] == [f"sim-{i:04d}" for i in range(1, 6)]
    again = start_simulation(settings, 5, seed=1, connect_rate=100)  # the data dir's certificates: no new enrolment
    try:
        wait_for(lambda: again.stats()["connected"] == 5, 20)
    finally:
        again.stop()


def test_a_copied_data_dir_is_flagged_as_a_conflict(broker, broker_settings, tmp_path: Path) -> None:
    import shutil

    from fleet.collector.service import start
    from fleet.config import payloads

    collector = start(broker_settings.replace(broker_url=broker.url))
    try:
        assert collector.wait_subscribed(10)
        assert collector.signer is not None
        assert collector.signer.wait_subscribed(10)
        files = enrol_machine(broker, broker_settings, tmp_path / "original", "db1")
        shutil.copytree(tmp_path / "original", tmp_path / "copy")
        copy = IdentityFiles(tmp_path / "copy", "acme", "db1")
        for n, (which, hw) in enumerate(((files, "0xaaaaaaaaaaaa"), (copy, "0xbbbbbbbbbbbb"),
                                         (files, "0xaaaaaaaaaaaa"))):
            client = connect_with_cert(broker, which)
            report = payloads.build_report("db1", hw, f"s{n}", 0, time.time(), {"cpu_percent": 1.0},
                                           {"hardware_id": hw})
            client.publish(report_topic("acme", "db1"), payloads.encode(report), qos=1).wait_for_publish(5)
            close(client)

        def conflict() -> bool:
            with open_database(broker_settings.database) as db:
                row = db.query_one("SELECT conflict FROM machines WHERE org = 'acme' AND machine_id = 'db1'")
            return bool(row and row[0])

        wait_for(conflict, 10)
    finally:
        collector.stop()


def test_cert_days_left_in_alert_rules() -> None:
    from fleet.collector.alerts.engine import compile_rule
    from fleet.collector.state import Machine
    from fleet.config.rules import Rule

    rule = compile_rule(Rule.parse("acme", "cert-expiring", "cert_days_left < 14", "1h"))
    expiring = Machine("acme", "db1", "online", "s", cert_not_after=time.time() + 10 * 86_400)
    fresh = Machine("acme", "db2", "online", "s", cert_not_after=time.time() + 300 * 86_400)
    keyed = Machine("acme", "web1", "online", "s")
    holds, value = rule.check(expiring, {})
    assert holds
    assert value == pytest.approx(10, abs=0.01)
    assert not rule.check(fresh, {})[0]
    assert rule.check(keyed, {}) == (False, None)  # only machines with certificates have the field


def test_a_certificate_from_another_ca_is_refused_and_counted(broker, tmp_path: Path) -> None:
    import socket
    import ssl

    other = trustme.CA()
    cert = other.issue_cert("db1.example", common_name="acme/db1")
    ctx = ssl.create_default_context(cafile=str(broker.ca_path))
    cert.configure_cert(ctx)
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"\x10\x00")  # TLS 1.3: the server's verdict on our certificate comes after the handshake
                tls.recv(10)
        except (ssl.SSLError, OSError):
            pass
    wait_for(lambda: broker.stats().get("cert_refused", 0) == 1, 5)
