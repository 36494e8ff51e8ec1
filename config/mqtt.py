"""How every part reaches the broker: broker URLs and TLS-verifying paho clients (import paho from here)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as paho

from fleet.config.errors import SettingsError

DEFAULT_PORTS = {"mqtts": 8883, "mqtt": 1883}
MAX_REMAINING = 268_435_455  # a packet's remaining length in four bytes: the protocol's own limit


def remaining_length(n: int) -> bytes:
    """MQTT's variable-length encoding of a packet's remaining length (the broker's and the collector's)."""
    if n > MAX_REMAINING:
        raise ValueError(f"packet body of {n} bytes is over MQTT's limit")
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


@dataclass(frozen=True)
class BrokerAddress:
    """A parsed broker URL: ``mqtts://host:port`` (TLS) or ``mqtt://host:port`` (plain, loopback use only)."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse a broker URL; raise SettingsError for anything else."""
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname or port == -1:
            raise SettingsError(f"invalid broker URL {url!r}: expected mqtts://HOST:PORT")
        return cls(parts.hostname, port or DEFAULT_PORTS[parts.scheme], parts.scheme == "mqtts")

    @property
    def url(self) -> str:
        """The URL form."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def tls_context(ca_path: str | Path | None, client_cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """A client TLS context verifying the broker's certificate and hostname against ``ca_path``; with
    ``client_cert`` (certificate, key) it also presents the machine's certificate."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_path) if ca_path else None)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"cannot load CA file {ca_path}: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None:
        try:
            ctx.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(f"cannot load the machine certificate {client_cert[0]}: {exc}") from exc
    return ctx


def new_client(address: BrokerAddress, client_id: str, username: str | None, password: str | None,
               ca_path: str | Path | None = None, clean_session: bool = True,
               factory: type[paho.Client] = paho.Client,
               client_cert: tuple[Path, Path] | None = None) -> paho.Client:
    """A paho MQTT 3.1.1 client (callback API v2, of class ``factory``) set up for ``address``; not yet connected."""
    client = factory(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                     clean_session=clean_session, protocol=paho.MQTTv311)
    if username is not None:
        client.username_pw_set(username, password)
    if address.tls:
        client.tls_set_context(tls_context(ca_path, client_cert))
    return client
