"""The server certificate's names: every interface address for a wildcard host, --cert-name, re-issue from the
same CA when the names change, and the names and CA fingerprint the server prints."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from fleet.broker.errors import BrokerError
from fleet.broker.pki import cert_paths, ensure_certs, ensure_server_certs, server_identity, server_names
from fleet.config.settings import Settings
from fleet.config.tls import ca_fingerprint, cert_name
from tests.helpers import free_port, wait_for


def san(path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {*alt.get_values_for_type(x509.DNSName), *(str(ip) for ip in alt.get_values_for_type(x509.IPAddress))}


def serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
def test_a_wildcard_host_names_every_interface_address(tmp_path: Path, wildcard: str) -> None:
    paths = ensure_certs(tmp_path, [wildcard])
    addresses = {addr.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for addr in addrs
                 if addr.family in (socket.AF_INET, socket.AF_INET6)}
    names = san(paths.cert)
    assert {cert_name(address) for address in addresses} <= names
    assert {"localhost", "127.0.0.1", cert_name(socket.gethostname())} <= names
    assert wildcard not in names


def test_a_named_host_and_cert_names_are_the_names(tmp_path: Path) -> None:
    paths = ensure_certs(tmp_path, ["10.9.8.7"], ["Fleet.Example.COM.", "*.lb.example.net", "2001:DB8::1"])
    assert san(paths.cert) == {"localhost", "127.0.0.1", cert_name(socket.gethostname()), "10.9.8.7",
                               "fleet.example.com", "*.lb.example.net", "2001:db8::1"}


def test_changed_names_reissue_the_server_certificate_from_the_same_ca(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, cert_names=("one.example",))
    paths = ensure_server_certs(settings)
    ca, ca_key, first = paths.ca.read_bytes(), paths.ca_key.read_bytes(), serial(paths.cert)
    assert serial(ensure_server_certs(settings).cert) == first  # same names: left alone

    for names in (("one.example", "two.example"), ("two.example",)):  # a name added, then one taken away
        paths = ensure_server_certs(settings.replace(cert_names=names))
        assert san(paths.cert) & {"one.example", "two.example"} == set(names)
        assert serial(paths.cert) != first
        first = serial(paths.cert)
        assert (paths.ca.read_bytes(), paths.ca_key.read_bytes()) == (ca, ca_key)
    # So a client holding the first ca.pem verifies the re-issued certificate.
    issued = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    issued.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))


def test_a_bad_name_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="neither a DNS name nor an IP address"):
        server_names([], ["bad name"])
    assert not (tmp_path / "server.pem").exists()


def test_the_identity_is_the_certificates_names_and_the_cas_sha256(tmp_path: Path) -> None:
    paths = ensure_certs(tmp_path, ["192.0.2.10"], ["fleet.example.com"])
    identity = server_identity(paths)
    ca = x509.load_pem_x509_certificate(paths.ca.read_bytes())
    assert identity.ca_sha256 == ca.fingerprint(hashes.SHA256()).hex() == ca_fingerprint(paths.ca.read_text())
    assert set(identity.names) == san(paths.cert)
    assert identity.names.index("fleet.example.com") < identity.names.index("127.0.0.1")  # names, then addresses
    assert identity.lines() == [f"  cert names:   {', '.join(identity.names)}",
                                f"  CA SHA-256:   {identity.ca_sha256}"]


def test_fleet_broker_prints_the_names_and_the_fingerprint(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "broker.out"
    with open(out, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "broker", "--data-dir", str(tmp_path),
                                 "--mqtt-port", str(port), "--cert-name", "mqtt.example.org"],
                                stdout=fh, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: proc.poll() is not None or "CA SHA-256" in out.read_text(), timeout=30,
                 message="fleet broker printing its certificate")
        printed = out.read_text()
    finally:
        proc.terminate()
        proc.wait(20)
    identity = server_identity(cert_paths(tmp_path / "certs"))
    assert "mqtt.example.org" in identity.names
    assert all(line in printed.splitlines() for line in identity.lines()), printed
    assert f"mqtts://127.0.0.1:{port}" in printed
