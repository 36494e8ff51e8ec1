"""Server certificate names (setting ``cert_names``, ``--cert-name``) and the CA fingerprint every part shares."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleet.broker.pki import cert_paths, server_identity
from fleet.commands import cli
from fleet.config.errors import SettingsError
from fleet.config.settings import load_settings
from fleet.config.tls import ca_fingerprint, cert_name


@pytest.mark.parametrize(("given", "named"), [
    ("fleet.example.com", "fleet.example.com"), ("Fleet.Example.COM.", "fleet.example.com"), ("srv1", "srv1"),
    ("*.example.com", "*.example.com"), ("my_host.lan", "my_host.lan"), ("10.0.0.5", "10.0.0.5"),
    ("2001:DB8::1", "2001:db8::1"), ("fe80::1%eth0", "fe80::1"), (" 192.0.2.1 ", "192.0.2.1"),
])
def test_dns_names_and_addresses_are_names(given: str, named: str) -> None:
    assert cert_name(given) == named


@pytest.mark.parametrize("bad", ["", "bad name", "-lead.example", "trail-.example", "a..b", "10.0.0.256",
                                 "x" * 64 + ".example", "fleet.example.com/path", "*", "a.*.example", "ünï.example"])
def test_anything_else_is_not_a_name(bad: str) -> None:
    with pytest.raises(ValueError, match="neither a DNS name nor an IP address"):
        cert_name(bad)


def test_cert_names_come_from_flags_environment_and_file(tmp_path: Path) -> None:
    config_file = tmp_path / "fleet.toml"
    config_file.write_text('cert_names = ["fleet.example.com", "203.0.113.7"]\n')
    assert load_settings(config_file, env={}).cert_names == ("fleet.example.com", "203.0.113.7")
    env = {"FLEET_CERT_NAMES": "lb.example.net, 198.51.100.2"}
    assert load_settings(config_file, env=env).cert_names == ("lb.example.net", "198.51.100.2")
    assert load_settings(config_file, env=env, flags={"cert_names": ("x.example",)}).cert_names == ("x.example",)
    with pytest.raises(SettingsError, match=r"cert_names \(FLEET_CERT_NAMES='no way'\)"):
        load_settings(None, env={"FLEET_CERT_NAMES": "ok.example,no way"})


@pytest.mark.parametrize("command", [["up"], ["broker"], ["mosquitto-config", "--out", "m"]])
def test_a_bad_cert_name_exits_1_with_one_line(tmp_path: Path, command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--data-dir", str(tmp_path), "--cert-name", "fleet.example.com",
                                      "--cert-name", "not a name"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "cert_names" in result.stderr
    assert "'not a name'" in result.stderr
    assert not (tmp_path / "certs").exists()  # refused before anything was made


def test_mosquitto_config_prints_the_paths_then_the_names_and_fingerprint(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["mosquitto-config", "--out", str(tmp_path / "m"), "--data-dir",
                                      str(tmp_path / "d"), "--host", "0.0.0.0", "--cert-name", "mqtt.example.org"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:3] == [str(tmp_path / "m" / name) for name in ("mosquitto.conf", "passwd", "acl")]
    identity = server_identity(cert_paths(tmp_path / "d" / "certs"))
    assert lines[3:] == identity.lines()
    assert "mqtt.example.org" in identity.names
    # Mosquitto serves the same certificate fleet made.
    copied = cert_paths(tmp_path / "m" / "certs")
    assert copied.cert.read_bytes() == (tmp_path / "d" / "certs" / "server.pem").read_bytes()


def test_the_fingerprint_is_the_sha256_of_the_der(tmp_path: Path) -> None:
    import trustme

    pem = trustme.CA().cert_pem.bytes()
    expected = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()
    assert ca_fingerprint(pem) == ca_fingerprint(pem.decode()) == expected
    assert ca_fingerprint(b"junk\n" + pem + pem) == expected  # the first certificate of a bundle
    with pytest.raises(ValueError, match="no PEM certificate"):
        ca_fingerprint(b"no certificate here")
