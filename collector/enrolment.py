"""The signer: the collector's part that holds the CA key, answers enrolment and renewal requests with certificates.

Agents publish a certificate signing request on ``fleet/<org>/<machine>/enrol`` (with a token) or ``…/renew``
(over their certificate connection); the signer checks the token and the request and answers on
``fleet/<org>/<machine>/cert``. It has its own MQTT connection (the service user): paho's network thread only
queues requests, one worker thread checks, signs and stores them. Every refusal is one counted log line.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet.config import payloads
from fleet.config.enrolment import (
    BAD_CSR,
    CERT_KIND,
    ENROL_KIND,
    ENROLLED,
    MAX_CSR_BYTES,
    NOT_ENROLLED,
    RENEW_KIND,
    EnrolmentError,
    answer_payload,
    exchange_topic,
    subject_name,
)
from fleet.config.errors import ContractError
from fleet.config.ids import is_valid_id
from fleet.config.mqtt import BrokerAddress, new_client
from fleet.config.settings import Settings
from fleet.config.topics import ROOT
from fleet.store import credentials, identity
from fleet.store.database import Database, DatabaseError, open_database

log = logging.getLogger("fleet.collector")
QUEUE_MAX = 1000  # requests waiting for the worker; more are dropped and counted (the agent asks again)
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)  # what both the embedded broker (OpenSSL) and Mosquitto accept


@dataclass(frozen=True)
class CertificateAuthority:
    """The installation's CA: its certificate and private key (``certs/ca.pem``, ``certs/ca.key``)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, certs_dir: Path) -> CertificateAuthority:
        """Read the CA from a certs dir; OSError or ValueError when it is not there or not ours."""
        cert = x509.load_pem_x509_certificate((certs_dir / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((certs_dir / "ca.key").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key is not an ECDSA key")
        return cls(cert, key)


def check_csr(pem: Any, org: str, machine: str) -> x509.CertificateSigningRequest:
    """The request, parsed and checked: a PEM CSR, validly self-signed, subject CN ``<org>/<machine>`` and nothing
    else, an ECDSA P-256 or P-384 key. EnrolmentError(bad csr) naming the problem otherwise."""
    if not isinstance(pem, str) or not pem:
        raise EnrolmentError(BAD_CSR, "no certificate signing request")
    if len(pem) > MAX_CSR_BYTES:
        raise EnrolmentError(BAD_CSR, f"request of {len(pem)} bytes is over {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise EnrolmentError(BAD_CSR, "not a PEM certificate signing request") from exc
    if not csr.is_signature_valid:
        raise EnrolmentError(BAD_CSR, "the request's signature does not verify")
    attributes = list(csr.subject)
    wanted = subject_name(org, machine)
    if len(attributes) != 1 or attributes[0].oid != NameOID.COMMON_NAME or attributes[0].value != wanted:
        raise EnrolmentError(BAD_CSR, f"subject must be CN={wanted}")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ACCEPTED_CURVES):
        raise EnrolmentError(BAD_CSR, "key must be ECDSA P-256 or P-384")
    return csr


def key_sha256(csr: x509.CertificateSigningRequest) -> str:
    """SHA-256 of the request's public key (SubjectPublicKeyInfo DER): the same key, the same request."""
    der = csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def issue(ca: CertificateAuthority, csr: x509.CertificateSigningRequest, days: int, now: float) -> x509.Certificate:
    """A client certificate for the request's subject and key, signed by the CA, valid ``days`` days."""
    start = dt.datetime.fromtimestamp(now, dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(csr.subject).issuer_name(ca.cert.subject).public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - dt.timedelta(minutes=5))
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def answer_request(db: Database, ca: CertificateAuthority, kind: str, org: str, machine: str, body: dict[str, Any],
                   days: int, now: float | None = None) -> str:
    """Check and sign one request (kind enrol or renew); returns the certificate PEM, or raises EnrolmentError.

    An enrolment uses one use of its token; the same key asking again (a lost answer) gets the stored
    certificate back without using the token again. A machine holding an unrevoked certificate is enrolled
    again only by that same key; a renewal needs an unrevoked certificate."""
    now = time.time() if now is None else now
    csr = check_csr(body.get("csr"), org, machine)
    key_hash = key_sha256(csr)
    with db.transaction():
        current = identity.machine_cert(db, org, machine)
        live = current is not None and not current.revoked
        if kind == ENROL_KIND:
            token_id = body.get("token_id")
            if not isinstance(token_id, str):
                raise EnrolmentError(BAD_CSR, "no token_id")
            if live and current is not None and current.key_sha256 == key_hash:
                return current.cert
            if live:
                raise EnrolmentError(ENROLLED, f"{org}/{machine} holds a certificate: revoke it to enrol again")
            identity.redeem_token(db, org, token_id, now)
        elif not live:
            raise EnrolmentError(NOT_ENROLLED, f"{org}/{machine} has no certificate to renew")
        cert = issue(ca, csr, days, now)
        pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        identity.store_cert(db, org, machine, format(cert.serial_number, "x"), key_hash, pem,
                            cert.not_valid_after_utc.timestamp(), now, renewal=kind == RENEW_KIND)
    return pem


class Signer:
    """Answers enrolment and renewal requests over its own MQTT connection, one request at a time."""

    def __init__(self, settings: Settings, ca: CertificateAuthority, service_key: str) -> None:
        self.settings = settings
        self.ca = ca
        self.refused: Counter[str] = Counter()
        self.signed = 0
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(QUEUE_MAX)
        self._subscribed = threading.Event()
        address = BrokerAddress.parse(settings.collector_broker_url)
        self._client = new_client(address, f"fleet.signer-{time.monotonic_ns():x}", credentials.SERVICE_USERNAME,
                                  service_key, settings.ca_path, clean_session=True)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._address = address
        self._worker = threading.Thread(target=self._work, name="fleet-signer", daemon=True)

    def start(self) -> Signer:
        """Connect (paho reconnects on its own) and start the worker."""
        self._worker.start()
        self._client.connect_async(self._address.host, self._address.port, keepalive=30)
        self._client.loop_start()
        return self

    def wait_subscribed(self, timeout: float) -> bool:
        """True once the signer listens for requests."""
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        """Disconnect and stop the worker."""
        self._client.disconnect()
        self._client.loop_stop()
        self._queue.put(None)
        self._worker.join(10)

    def _on_connect(self, client: Any, _u: Any, _flags: Any, reason_code: Any, _p: Any = None) -> None:
        if not getattr(reason_code, "is_failure", False):
            client.subscribe([(f"{ROOT}/+/+/{ENROL_KIND}", 1), (f"{ROOT}/+/+/{RENEW_KIND}", 1)])

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            self._queue.put_nowait((msg.topic, bytes(msg.payload)))
        except queue.Full:
            self._refuse("?", "?", "busy", "too many requests waiting")

    def _refuse(self, org: str, machine: str, reason: str, detail: str) -> None:
        self.refused[reason] += 1
        log.warning("refused certificate request org=%s machine=%s: %s (%s); %d refused so far", org, machine,
                    reason, detail, sum(self.refused.values()))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._handle(*item)
            except Exception:  # noqa: BLE001 - one bad request never stops the signer
                log.exception("certificate request on %s failed", item[0][:200])

    def _handle(self, topic: str, raw: bytes) -> None:
        parts = topic.split("/")
        if len(parts) != 4 or parts[3] not in (ENROL_KIND, RENEW_KIND):
            return
        org, machine, kind = parts[1], parts[2], parts[3]
        if not (is_valid_id(org) and is_valid_id(machine)):
            return
        try:
            body = payloads.decode_object(raw)
            request = body.get("request")
            if not isinstance(request, str) or not 0 < len(request) <= 64:
                raise ContractError("no request id")
        except ContractError as exc:
            self._refuse(org, machine, BAD_CSR, str(exc))
            return
        try:
            with open_database(self.settings.database, migrate=False) as db:
                pem = answer_request(db, self.ca, kind, org, machine, body, self.settings.cert_days)
        except EnrolmentError as exc:
            self._refuse(org, machine, exc.reason, str(exc))
            answer = answer_payload(request, error=exc.reason)
        except DatabaseError as exc:
            log.warning("certificate request org=%s machine=%s not answered: %s", org, machine, exc)
            return
        else:
            self.signed += 1
            log.info("signed a certificate for org=%s machine=%s (%s)", org, machine, kind)
            answer = answer_payload(request, cert_pem=pem)
        self._client.publish(exchange_topic(org, machine, CERT_KIND), payloads.encode(answer), qos=1)


def start_signer(settings: Settings, service_key: str) -> Signer | None:
    """A running signer when this data dir holds the CA key, else None (a collector on another host)."""
    try:
        ca = CertificateAuthority.load(settings.certs_dir)
    except (OSError, ValueError) as exc:
        log.info("not signing machine certificates: no CA key in %s (%s)", settings.certs_dir, exc)
        return None
    return Signer(settings, ca, service_key).start()
