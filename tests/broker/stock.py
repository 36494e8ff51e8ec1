"""Stock amqtt 0.12.1, configured as close to fleet's broker as stock allows, shaped like RunningBroker.

Same TLS certificates, same users and keys, the access rules as far as amqtt's own plugins express
them: FileAuthPlugin with an argon2 password file, TopicAccessControlListPlugin with per-user publish and
subscribe lists (agents pinned to their org, as on Mosquitto, since it cannot read a client id). The
guarantee stories run against it as strict xfails: each one fails on stock and holds on fleet's broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from pwdlib.hashers.argon2 import Argon2Hasher

from fleet.broker.pki import ensure_certs
from fleet.broker.server import LoopThread, start_loop_thread
from fleet.store import credentials
from fleet.store.database import open_database
from tests import stores
from tests.helpers import free_port, port_open, wait_for


def access_lists(records: list[credentials.CredentialRecord]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(publish ACL, subscribe ACL) per username, in TopicAccessControlListPlugin's terms."""
    publish: dict[str, list[str]] = {}
    subscribe: dict[str, list[str]] = {}
    for r in records:
        if r.role == credentials.SERVICE_ROLE:
            publish[r.username], subscribe[r.username] = ["fleet/+/+/ping"], ["fleet/#"]
        elif r.role == "reader":
            subscribe[r.username] = [f"fleet/{r.org}/#"]
        elif r.role == "agent":
            publish[r.username] = [f"fleet/{r.org}/+/report", f"fleet/{r.org}/+/ping"]
            subscribe[r.username] = [f"fleet/{r.org}/+/#"]
    return publish, subscribe


def stock_config(data_dir: Path, keys: dict[str, str], port: int) -> dict[str, Any]:
    """amqtt configuration: one TLS listener, a password file for ``keys``, the access lists of fleet.db."""
    certs = ensure_certs(data_dir / "certs", ["127.0.0.1"])
    with open_database(data_dir / "fleet.db") as db:
        records = list(credentials.load_records(db).values())
    hasher = Argon2Hasher()
    password_file = data_dir / "stock-amqtt.passwd"
    password_file.write_text("".join(f"{user}:{hasher.hash(key)}\n" for user, key in keys.items()))
    publish, subscribe = access_lists(records)
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "ssl": True,
                                  "certfile": str(certs.cert), "keyfile": str(certs.key), "max_connections": 50_000}},
        "plugins": {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(password_file)},
                    "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {"publish_acl": publish,
                                                                                  "acl": subscribe}},
    }


@dataclass
class StockBroker:
    """A stock amqtt Broker on its own event loop in a thread (the attributes tests use on RunningBroker)."""

    host: str
    port: int
    ca_path: Path
    data_dir: Path
    broker: Broker = field(repr=False)
    _runner: LoopThread = field(repr=False)

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, int]:
        """Stock amqtt counts nothing it refuses or drops."""
        return {}

    def stop(self) -> None:
        self._runner.stop()


def start_stock(data_dir: Path, keys: dict[str, str], port: int | None = None) -> StockBroker:
    """Start stock amqtt for ``data_dir``'s users (``keys``: username -> key) on ``port`` (default: a free one)."""
    port = port or free_port()
    config = stock_config(data_dir, keys, port)

    async def serve(stop: asyncio.Event, on_started: Callable[[Any], None]) -> None:
        broker = Broker(config)
        await broker.start()
        on_started(broker)
        try:
            await stop.wait()
        finally:
            await broker.shutdown()

    runner, broker = start_loop_thread(serve, "stock-amqtt")
    wait_for(lambda: port_open(port), timeout=10, message="stock amqtt listening")
    return StockBroker("127.0.0.1", port, data_dir / "certs" / "ca.pem", data_dir, broker, runner)


def keys_of(data_dir: Path, *orgs: credentials.OrgSecrets) -> dict[str, str]:
    """username -> key for the orgs' agents and readers and the service user."""
    keys = {credentials.SERVICE_USERNAME: stores.ensure_service_key(data_dir)}
    for org in orgs:
        keys[f"{org.org}/agent"] = org.agent_key
        keys[f"{org.org}/reader"] = org.reader_key
    return keys
