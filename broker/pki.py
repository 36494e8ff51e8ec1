"""Development PKI: a local CA and a server certificate for the broker, created on first start.

The server certificate names localhost, 127.0.0.1, this machine's hostname, the configured host (with a
wildcard host, every address of the machine's interfaces) and each ``cert_names`` entry, so clients on other
hosts verify it with hostname checks on. It is re-issued from the same CA before it expires or when those
names change, so agents keep the CA they have. Private keys are written 0600; nothing is committed.
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
from fleet.config.settings import WILDCARD_HOSTS, Settings
from fleet.config.tls import ca_fingerprint, cert_name, is_ip_address

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


@dataclass(frozen=True)
class ServerIdentity:
    """What a client checks of the server: the names its certificate carries and its CA's fingerprint."""

    names: tuple[str, ...]
    ca_sha256: str

    def lines(self) -> list[str]:
        """The lines ``fleet up``, ``fleet broker`` and ``fleet mosquitto-config`` print at start."""
        return [f"  cert names:   {', '.join(self.names)}", f"  CA SHA-256:   {self.ca_sha256}"]


def cert_paths(certs_dir: Path) -> CertPaths:
    """Where the files live in ``certs_dir``."""
    certs_dir = Path(certs_dir)
    return CertPaths(certs_dir / "ca.pem", certs_dir / "server.pem", certs_dir / "server.key", certs_dir / "ca.key")


def interface_addresses() -> set[str]:
    """Every IPv4 and IPv6 address of this machine's interfaces (without an IPv6 zone)."""
    import psutil

    families = (socket.AF_INET, socket.AF_INET6)
    return {cert_name(addr.address) for addrs in psutil.net_if_addrs().values() for addr in addrs
            if addr.family in families}


def server_names(hosts: Iterable[str] = (), extra: Iterable[str] = ()) -> tuple[set[str], set[str]]:
    """DNS names and IP addresses the server certificate must cover: localhost, 127.0.0.1, the hostname, each
    of ``hosts`` (every interface address for a wildcard one) and each of ``extra`` (validated)."""
    names = {"localhost", "127.0.0.1"}
    try:
        names.add(cert_name(socket.gethostname()))
    except (OSError, ValueError):
        pass  # a hostname no certificate can carry: clients use another name
    for host in hosts:
        if host is None:
            continue
        if host in WILDCARD_HOSTS:
            names |= interface_addresses()
        else:
            names.add(_checked(host))
    names.update(_checked(name) for name in extra)
    ips = {name for name in names if is_ip_address(name)}
    return names - ips, ips


def _checked(name: str) -> str:
    try:
        return cert_name(name)
    except ValueError as exc:
        raise BrokerError(f"cannot name the server certificate: {exc}") from None


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
    addresses = sorted((ipaddress.ip_address(ip) for ip in ips), key=lambda ip: (ip.version, ip))
    alt += [x509.IPAddress(ip) for ip in addresses]
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


def _needs_renewal(cert_path: Path, dns: set[str] | None, ips: set[str] | None, days: int) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return True
    if cert.not_valid_after_utc - _now() < dt.timedelta(days=days):
        return True
    if dns is None or ips is None:
        return False
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    have_dns = set(alt.get_values_for_type(x509.DNSName))
    have_ips = {str(ip) for ip in alt.get_values_for_type(x509.IPAddress)}
    return have_dns != dns or have_ips != ips


def ensure_certs(certs_dir: Path, hosts: Iterable[str] = (), names: Iterable[str] = ()) -> CertPaths:
    """Create the development CA and a server certificate for ``hosts`` and ``names`` in ``certs_dir``, or
    re-issue the server certificate from the same CA when it nears its end or its names differ; idempotent."""
    paths = cert_paths(certs_dir)
    dns, ips = server_names(hosts, names)
    try:
        paths.ca.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(paths.ca.parent, 0o700)
        renew_ca = _needs_renewal(paths.ca, None, None, RENEW_BEFORE_DAYS) or not paths.ca_key.exists()
        if renew_ca:
            _make_ca(paths)
        if renew_ca or not paths.key.exists() or _needs_renewal(paths.cert, dns, ips, RENEW_BEFORE_DAYS):
            _make_server(paths, dns, ips)
    except (OSError, ValueError) as exc:
        raise BrokerError(f"cannot create certificates in {paths.ca.parent}: {exc}") from exc
    return paths


def ensure_server_certs(settings: Settings) -> CertPaths:
    """``ensure_certs`` for the server these settings run: their host and ``cert_names``."""
    return ensure_certs(settings.certs_dir, [settings.host], settings.cert_names)


def server_identity(paths: CertPaths) -> ServerIdentity:
    """The names the server certificate carries (DNS names, then addresses) and its CA's fingerprint."""
    try:
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        fingerprint = ca_fingerprint(paths.ca.read_bytes())
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise BrokerError(f"cannot read the certificates in {paths.ca.parent}: {exc}") from exc
    names = [*alt.get_values_for_type(x509.DNSName), *(str(ip) for ip in alt.get_values_for_type(x509.IPAddress))]
    return ServerIdentity(tuple(names), fingerprint)
