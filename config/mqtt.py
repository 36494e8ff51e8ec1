"""How every part reaches the broker: broker URLs and TLS-verifying paho clients (import paho from here)."""

from __future__ import annotations

import importlib
import ssl
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from config.errors import SettingsError


def defer_import(name: str) -> None:
    """Stand in for module ``name`` until an attribute of it is first used, then import the real one."""
    if name in sys.modules:
        return
    parent_name, _, child = name.rpartition(".")
    parent = importlib.import_module(parent_name)

    class Deferred(types.ModuleType):
        def __getattr__(self, attr: str):  # only called for attributes the stand-in lacks
            if sys.modules.get(name) is self:
                del sys.modules[name]
            real = importlib.import_module(name)
            setattr(parent, child, real)
            return getattr(real, attr)

    stand_in = Deferred(name)
    sys.modules[name] = stand_in
    setattr(parent, child, stand_in)


# paho imports urllib.request at start-up but uses it only to look up a proxy, and only when PySocks is
# installed. urllib.request brings http.client, email, tempfile, shutil, bz2 and lzma: 2 MB of the agent's
# 25 MB budget (python3 bench/agent.py). If anything does use it, the stand-in imports it then.
defer_import("urllib.request")

import paho.mqtt.client as paho  # after the stand-in above

DEFAULT_PORTS = {"mqtts": 8883, "mqtt": 1883}


@dataclass(frozen=True)
class BrokerAddress:
    """A parsed broker URL: ``mqtts://host:port`` (TLS) or ``mqtt://host:port`` (plain, loopback use only)."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
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


def tls_context(ca_path: str | Path | None) -> ssl.SSLContext:
    """A client TLS context verifying the broker's certificate and hostname against ``ca_path``."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_path) if ca_path else None)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"cannot load CA file {ca_path}: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def new_client(address: BrokerAddress, client_id: str, username: str | None, password: str | None,
               ca_path: str | Path | None = None, clean_session: bool = True) -> paho.Client:
    """A paho MQTT 3.1.1 client (callback API v2) set up for ``address``; not yet connected."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=clean_session, protocol=paho.MQTTv311)
    if username is not None:
        client.username_pw_set(username, password)
    if address.tls:
        client.tls_set_context(tls_context(ca_path))
    return client
