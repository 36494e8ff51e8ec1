"""Development PKI: a local CA and a server certificate for the broker, created on first start.

The server certificate names localhost, 127.0.0.1, this machine's hostname and the configured
host, so clients verify it with hostname checks on. It is regenerated before it expires or when
the configured host is not among its names. Private keys are written 0600; nothing is committed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet.broker.errors import BrokerError
from fleet.config.enrolment import fingerprint_der
from fleet.config.settings import WILDCARD_HOSTS

CA_DAYS = 3650
SERVER_DAYS = 397
RENEW_BEFORE_DAYS = 30


@dataclass(frozen=True)
class CertPaths:
    """Where the CA certificate, the server certificate and its key live."""

    ca: Path
    cert: Path
    key: Path
    ca_key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, private: bool) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def server_names(hosts: Iterable[str] = ()) -> tuple[set[str], set[str]]:
    """DNS names and IP addresses the server certificate must cover."""
    dns, ips = {"localhost"}, {"127.0.0.1"}
    try:
        hostname = socket.gethostname()
    except OSError:
        hostname = ""
    for host in (hostname, *hosts):
        if host in WILDCARD_HOSTS or host is None:
            continue
        try:
            ips.add(str(ipaddress.ip_address(host)))
        except ValueError:
            dns.add(host.lower())
    return dns, ips


def _make_ca(paths: CertPaths) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fleet development CA ({socket.gethostname()})")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(paths.ca_key, _key_pem(key), private=True)
    _write(paths.ca, cert.public_bytes(serialization.Encoding.PEM), private=False)


def _make_server(paths: CertPaths, dns: set[str], ips: set[str]) -> None:
    ca_cert = x509.load_pem_x509_certificate(paths.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise BrokerError(f"{paths.ca_key} is not the ECDSA key fleet generates; move the CA away to make a new one")
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = [x509.DNSName(name) for name in sorted(dns)]
    alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in sorted(ips)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet broker")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(paths.key, _key_pem(key), private=True)
    _write(paths.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def _needs_renewal(cert_path: Path, dns: set[str], ips: set[str], days: int) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return True
    if cert.not_valid_after_utc - _now() < dt.timedelta(days=days):
        return True
    if not dns and not ips:
        return False
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    have_dns = set(alt.get_values_for_type(x509.DNSName))
    have_ips = {str(ip) for ip in alt.get_values_for_type(x509.IPAddress)}
    return not (dns <= have_dns and ips <= have_ips)


def ca_fingerprint(ca_path: Path) -> str:
    """The CA's SHA-256 fingerprint (lowercase hex of the DER), as enrolment tokens carry it."""
    cert = x509.load_pem_x509_certificate(Path(ca_path).read_bytes())
    return fingerprint_der(cert.public_bytes(serialization.Encoding.DER))


def server_chain(paths: CertPaths) -> Path:
    """``server-chain.pem`` beside the server certificate: it and the CA, what the broker presents, so an agent
    holding only the CA's fingerprint (in its enrolment token) can find and check the CA before trusting it."""
    chain = paths.cert.with_name("server-chain.pem")
    data = paths.cert.read_bytes() + paths.ca.read_bytes()
    try:
        if chain.read_bytes() == data:
            return chain
    except OSError:
        pass
    _write(chain, data, private=False)
    return chain


def ensure_certs(certs_dir: Path, hosts: Iterable[str] = ()) -> CertPaths:
    """Create (or renew) the development CA and server certificate in ``certs_dir``; idempotent."""
    certs_dir = Path(certs_dir)
    paths = CertPaths(certs_dir / "ca.pem", certs_dir / "server.pem", certs_dir / "server.key", certs_dir / "ca.key")
    try:
        certs_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(certs_dir, 0o700)
        dns, ips = server_names(hosts)
        renew_ca = _needs_renewal(paths.ca, set(), set(), RENEW_BEFORE_DAYS) or not paths.ca_key.exists()
        if renew_ca:
            _make_ca(paths)
        if renew_ca or not paths.key.exists() or _needs_renewal(paths.cert, dns, ips, RENEW_BEFORE_DAYS):
            _make_server(paths, dns, ips)
    except (OSError, ValueError) as exc:
        raise BrokerError(f"cannot create certificates in {certs_dir}: {exc}") from exc
    return paths
