"""The machine's own credential: its private key, certificate and CA in the agent's data dir, enrolment and renewal.

Files (beside the outbox): ``agent-<org>-<machine>.key`` (made here, never sent), ``agent-<org>-<machine>.pem``
(the certificate the signer returned) and ``agent-ca.pem`` (the CA the enrolment token's fingerprint named).
The directory is 0700 and the files 0600; like ssh, the agent refuses a key others can read. ``cryptography``
is imported only to make a key and a request (enrolment, renewal), so a plain start stays small.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.agent.errors import AgentError
from fleet.config.enrolment import (
    CERT_KIND,
    ENROL_KIND,
    RENEW_AT,
    EnrolmentError,
    Token,
    enrol_username,
    exchange_topic,
    request_payload,
    subject_name,
)
from fleet.config.errors import ConfigError
from fleet.config.mqtt import BrokerAddress, new_client
from fleet.config.tls import fingerprint_der
from fleet.config.topics import agent_client_id

AGENT_CA_FILE = "agent-ca.pem"
ANSWER_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 10.0
TOKEN_PROPAGATION_S = 6.0


@dataclass(frozen=True)
class IdentityFiles:
    """Where one machine's key, certificate and CA live in the agent's data dir."""

    data_dir: Path
    org: str
    machine: str

    @property
    def key(self) -> Path:
        """The machine's private key (PEM, 0600)."""
        return self.data_dir / f"agent-{self.org}-{self.machine}.key"

    @property
    def cert(self) -> Path:
        """The machine's certificate (PEM, 0600)."""
        return self.data_dir / f"agent-{self.org}-{self.machine}.pem"

    @property
    def ca(self) -> Path:
        """The CA checked against the enrolment token's fingerprint."""
        return self.data_dir / AGENT_CA_FILE

    def enrolled(self) -> bool:
        """True when a certificate and its key are in the data dir."""
        return self.cert.exists() and self.key.exists()

    def client_cert(self) -> tuple[Path, Path]:
        """(certificate, key) to present, after checking that nobody else can read the key."""
        check_private(self.key)
        return self.cert, self.key


def check_private(path: Path) -> None:
    """Refuse (AgentError) a key file that its group or others can read or write, as ssh does."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AgentError(f"{path} is readable by others (mode {stat.S_IMODE(mode):04o}): run chmod 600 {path}")


def write_private(path: Path, data: bytes) -> None:
    """Write ``path`` 0600 atomically, in a 0700 directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # several writers, one file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def make_request(files: IdentityFiles) -> str:
    """A certificate signing request (PEM) for the machine's key, made (ECDSA P-256) on first use."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if files.key.exists():
        check_private(files.key)
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AgentError(f"{files.key} is not an ECDSA key: move it away to make a new one")
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        write_private(files.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_name(files.org, files.machine))])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def validity(cert_path: Path) -> tuple[float, float]:
    """(not_before, not_after) of a PEM certificate, read with the ssl module (no cryptography import)."""
    decoded = ssl._ssl._test_decode_cert(str(cert_path))  # type: ignore[attr-defined]  # noqa: SLF001
    return ssl.cert_time_to_seconds(decoded["notBefore"]), ssl.cert_time_to_seconds(decoded["notAfter"])


def renew_due(cert_path: Path, now: float) -> float:
    """When the certificate should be renewed: two thirds into its life."""
    start, end = validity(cert_path)
    return start + (end - start) * RENEW_AT


def fetch_ca(address: BrokerAddress, fingerprint: str) -> bytes:
    """The CA certificate (PEM) the broker presents whose SHA-256 fingerprint is ``fingerprint``.

    Nothing is sent but the TLS handshake: the chain is read unverified, the CA is picked by its fingerprint,
    and the caller then verifies the broker with it (hostname included) before sending anything."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((address.host, address.port), timeout=PROBE_TIMEOUT_S) as raw, \
                ctx.wrap_socket(raw, server_hostname=address.host) as tls:
            chain = tls._sslobj.get_unverified_chain() or []  # type: ignore[attr-defined]  # noqa: SLF001 - 3.13: public
            ders = [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in chain]  # type: ignore[attr-defined]  # noqa: SLF001
    except (OSError, ssl.SSLError) as exc:
        raise AgentError(f"cannot reach broker {address.url}: {exc}") from exc
    for der in ders:
        if fingerprint_der(der) == fingerprint:
            return ssl.DER_cert_to_PEM_cert(der).encode("ascii")
    raise AgentError(f"the broker at {address.url} does not present the CA the enrolment token names"
                     f" (fingerprint {fingerprint[:16]}…): wrong broker, or a token of another installation")


def _pem_fingerprint(pem: bytes) -> str:
    return fingerprint_der(ssl.PEM_cert_to_DER_cert(pem.decode("ascii")))


def resolve_ca(address: BrokerAddress, token: Token, ca_file: str, files: IdentityFiles) -> Path:
    """The CA to trust for enrolment: ``--ca`` if given (it must be the token's), else the one the broker presents
    with the token's fingerprint, kept in the data dir."""
    if ca_file or files.ca.exists():
        ca_file = ca_file or str(files.ca)
        try:
            pem = Path(ca_file).read_bytes()
            found = _pem_fingerprint(pem)
        except (OSError, ValueError) as exc:
            raise AgentError(f"cannot read CA file {ca_file}: {exc}") from exc
        if found != token.ca_fingerprint:
            raise AgentError(f"{ca_file} is not the CA the enrolment token names (fingerprint {found[:16]}… is not"
                             f" {token.ca_fingerprint[:16]}…)")
    else:
        pem = fetch_ca(address, token.ca_fingerprint)
    if Path(ca_file or "") != files.ca:
        write_private(files.ca, pem)
    return files.ca


class Exchange:
    """One request/answer on the machine's cert topic over a connected paho client."""

    def __init__(self, request: str) -> None:
        self.request = request
        self.answer: dict[str, Any] | None = None
        self.done = threading.Event()

    def on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        """Take the answer to our request (others are ignored)."""
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(body, dict) and body.get("request") == self.request:
            self.answer = body
            self.done.set()


def enrol(address: BrokerAddress, files: IdentityFiles, token_text: str, ca_file: str) -> Path:
    """Enrol this machine with a token: key, request, signed certificate in the data dir. Returns the CA path.

    Refusals raise AgentError with one line saying why (unknown, expired, used up, revoked, ...)."""
    try:
        token = Token.parse(token_text)
    except EnrolmentError as exc:
        raise AgentError(f"enrolment refused: {exc}") from exc
    ca_path = resolve_ca(address, token, ca_file, files)
    csr = make_request(files)
    exchange = Exchange(os.urandom(8).hex())
    # A token made a moment ago reaches the broker within 5 s (its reload interval): a refusal is asked again
    # until then, and only then is it the token's fault.
    deadline = time.monotonic() + TOKEN_PROPAGATION_S
    while True:
        client = _connect_enrolling(address, files, token, ca_path, exchange)
        if client is not None:
            break
        if time.monotonic() >= deadline:
            raise AgentError("enrolment refused: unknown token (or the broker refused the client id)")
        time.sleep(1.0)
    try:
        subscribed = threading.Event()
        client.on_subscribe = lambda *_: subscribed.set()
        client.subscribe(exchange_topic(files.org, files.machine, CERT_KIND), qos=1)
        if not subscribed.wait(ANSWER_TIMEOUT_S):
            raise AgentError("enrolment: the broker did not confirm the subscription")
        body = request_payload(csr, exchange.request, token.id)
        client.publish(exchange_topic(files.org, files.machine, ENROL_KIND), json.dumps(body), qos=1)
        if not exchange.done.wait(ANSWER_TIMEOUT_S):
            raise AgentError(f"enrolment: no answer within {ANSWER_TIMEOUT_S:.0f} s (is the collector running?)")
    finally:
        client.disconnect()
        client.loop_stop()
    answer = exchange.answer or {}
    if not answer.get("ok") or not isinstance(answer.get("cert"), str):
        raise AgentError(f"enrolment refused: {answer.get('error', 'no reason given')}")
    write_private(files.cert, answer["cert"].encode("ascii"))
    return ca_path


def _connect_enrolling(address: BrokerAddress, files: IdentityFiles, token: Token, ca_path: Path,
                       exchange: Exchange) -> Any:
    """A client connected with the token (its loop running), or None when the broker refused the CONNECT."""
    connected = threading.Event()
    result: dict[str, int] = {}
    try:
        client = new_client(address, agent_client_id(files.org, files.machine), enrol_username(files.org, token.id),
                            token.secret, ca_path)
    except ConfigError as exc:
        raise AgentError(str(exc)) from exc

    def on_connect(_c: Any, _u: Any, _f: Any, reason_code: Any, _p: Any = None) -> None:
        result["rc"] = int(getattr(reason_code, "value", reason_code))
        connected.set()

    client.on_connect = on_connect
    client.on_message = exchange.on_message
    try:
        client.connect(address.host, address.port, keepalive=30)
    except ssl.SSLCertVerificationError as exc:
        raise AgentError(f"TLS verification of {address.url} failed ({exc.verify_message})") from exc
    except (OSError, ssl.SSLError) as exc:
        raise AgentError(f"cannot reach broker {address.url}: {exc}") from exc
    client.loop_start()
    if not connected.wait(ANSWER_TIMEOUT_S) or result["rc"]:
        client.loop_stop()
        client.disconnect()
        if not connected.is_set():
            raise AgentError(f"no answer from broker {address.url}")
        return None
    return client


def renewal_request(files: IdentityFiles) -> tuple[str, dict[str, Any]]:
    """(request id, renew payload) for the machine's current key."""
    request = os.urandom(8).hex()
    return request, request_payload(make_request(files), request)


def store_renewed(files: IdentityFiles, answer: dict[str, Any]) -> bool:
    """Keep a renewed certificate from the signer's answer; False when the answer is a refusal."""
    cert = answer.get("cert")
    if not answer.get("ok") or not isinstance(cert, str):
        return False
    write_private(files.cert, cert.encode("ascii"))
    return True


def next_renewal(files: IdentityFiles) -> float:
    """Wall-clock time at which the current certificate is due for renewal."""
    return renew_due(files.cert, time.time())
