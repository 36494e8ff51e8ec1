"""Run the embedded broker: configuration, start-up, credential reloads, heartbeats, clean stop."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.errors import BrokerError as AmqttBrokerError

from fleet.broker import sessions, tls_memory
from fleet.broker.errors import BrokerError
from fleet.broker.hardened import FleetBroker
from fleet.broker.pki import CertPaths, ensure_certs
from fleet.broker.plugins import POLICIES
from fleet.broker.policy import AccessPolicy
from fleet.broker.retained import RetainedStore
from fleet.config import credentials
from fleet.config.database import DatabaseError, open_database
from fleet.config.settings import Settings

log = logging.getLogger("fleet.broker")
HEARTBEAT_S = 2.0
RETAINED_FLUSH_S = 0.5


def broker_config(settings: Settings, certs: CertPaths, policy_id: str) -> dict[str, Any]:
    """amqtt configuration: a TLS listener, an optional loopback-only plain one, only our plugins."""
    listeners: dict[str, Any] = {
        "default": {"type": "tcp", "bind": f"{settings.host}:{settings.mqtt_port}", "ssl": True,
                    "certfile": str(certs.cert), "keyfile": str(certs.key),
                    "max_connections": settings.max_connections},
    }
    if settings.mqtt_plain_port:
        listeners["plain"] = {"type": "tcp", "bind": f"127.0.0.1:{settings.mqtt_plain_port}", "ssl": False,
                              "max_connections": settings.max_connections}
    plugins = {"fleet.broker.plugins.FleetAuthPlugin": {"policy": policy_id},
               "fleet.broker.plugins.FleetTopicPlugin": {"policy": policy_id}}
    return {"listeners": listeners, "plugins": plugins}


def _load_records(database: str, migrate: bool = False) -> dict[str, credentials.CredentialRecord]:
    with open_database(database, readonly=not migrate) as db:
        return credentials.load_records(db)


def _write_heartbeat(database: str, detail: dict[str, Any]) -> None:
    with open_database(database, migrate=False) as db:
        db.execute("INSERT INTO heartbeats(component, ts, detail) VALUES ('broker', ?, ?) ON CONFLICT(component)"
                   " DO UPDATE SET ts = excluded.ts, detail = excluded.detail", (time.time(), json.dumps(detail)))


@dataclass
class BrokerHandle:
    """What a started broker exposes to its runner."""

    broker: FleetBroker
    certs: CertPaths
    port: int
    plain_port: int | None
    stats: dict[str, int] = field(default_factory=dict)


async def run_broker(settings: Settings, stop: asyncio.Event,
                     on_started: Any = None) -> None:
    """Run the broker until ``stop`` is set; ``on_started(handle)`` is called once it listens."""
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    certs = await asyncio.to_thread(ensure_certs, settings.certs_dir, [settings.host])
    try:
        await asyncio.to_thread(credentials.ensure_service_key, data_dir, settings.database)
        records = await asyncio.to_thread(_load_records, settings.database, True)
    except DatabaseError as exc:
        raise BrokerError(str(exc)) from exc
    pepper = await asyncio.to_thread(credentials.load_pepper, data_dir)
    policy = AccessPolicy(pepper, records)
    policy_id = uuid.uuid4().hex
    POLICIES[policy_id] = policy
    retained = await asyncio.to_thread(RetainedStore, data_dir / "broker.db")
    tls_memory.install()
    sessions.install()
    broker = FleetBroker(broker_config(settings, certs, policy_id), policy, settings.max_queued_messages,
                         settings.service_queued_messages, retained)
    try:
        await broker.start()
    except AmqttBrokerError as exc:
        POLICIES.pop(policy_id, None)
        cause = exc.__cause__ or exc
        raise BrokerError(f"cannot start broker on {settings.host}:{settings.mqtt_port}: {cause}") from exc
    broker.load_retained(await asyncio.to_thread(retained.load))
    restored = broker.restore_sessions(await asyncio.to_thread(retained.load_subscriptions))
    ports = broker.bound_ports
    handle = BrokerHandle(broker, certs, ports.get("default", settings.mqtt_port), ports.get("plain"))
    log.info("broker listening on mqtts://%s:%s (CA %s)%s; %d persistent sessions restored", settings.host,
             handle.port, certs.ca, f", plain mqtt://127.0.0.1:{handle.plain_port}" if handle.plain_port else "",
             restored)

    async def reload_credentials() -> None:
        while True:
            await asyncio.sleep(settings.reload_interval_s)
            try:
                fresh = await asyncio.to_thread(_load_records, settings.database)
            except Exception as exc:  # noqa: BLE001 - keep the old snapshot, try again
                log.warning("credential reload failed: %s", exc)
                continue
            if policy.replace_records(fresh):
                log.info("credentials changed: %d principals", len(fresh))
                broker.disconnect_revoked()

    async def housekeeping() -> None:
        last_beat = 0.0
        while True:
            await asyncio.sleep(RETAINED_FLUSH_S)
            try:
                await asyncio.to_thread(retained.flush)
                if time.monotonic() - last_beat >= HEARTBEAT_S:
                    last_beat = time.monotonic()
                    detail = {"connected": broker.connected_count(), **broker.stats}
                    await asyncio.to_thread(_write_heartbeat, settings.database, detail)
            except Exception as exc:  # noqa: BLE001 - a locked database must not stop the broker
                log.warning("broker housekeeping failed: %s", exc)

    tasks = [asyncio.create_task(reload_credentials()), asyncio.create_task(housekeeping())]
    try:
        if on_started is not None:
            on_started(handle)
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await broker.shutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.warning("broker shutdown: %s", exc)
        await asyncio.to_thread(retained.flush)
        POLICIES.pop(policy_id, None)
        log.info("broker stopped")


def serve(settings: Settings) -> None:
    """``fleet broker``: run until SIGINT/SIGTERM."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_broker(settings, stop)

    asyncio.run(main())


@dataclass
class RunningBroker:
    """A broker running on its own event loop in a background thread."""

    settings: Settings
    host: str
    port: int
    plain_port: int | None
    ca_path: Path
    data_dir: Path
    _broker: FleetBroker = field(repr=False)
    _loop: asyncio.AbstractEventLoop = field(repr=False)
    _stop: asyncio.Event = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        """TLS URL clients connect to."""
        return f"mqtts://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, int]:
        """Counters: refused connects/subscribes, dropped publishes by reason, routed messages."""
        return dict(self._broker.stats)

    def stop(self) -> None:
        """Stop the broker and wait for its thread (idempotent)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)


def start_in_thread(settings: Settings, timeout: float = 30.0) -> RunningBroker:
    """Start the broker in a background thread; return once it listens (port 0 = pick a free port)."""
    started = threading.Event()
    box: dict[str, Any] = {}

    def on_started(handle: BrokerHandle) -> None:
        box["handle"] = handle
        started.set()

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        box["loop"] = loop
        box["stop"] = asyncio.Event()
        try:
            loop.run_until_complete(run_broker(settings, box["stop"], on_started))
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            box["error"] = exc
            started.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="fleet-broker", daemon=True)
    thread.start()
    if not started.wait(timeout):
        raise BrokerError("broker did not start in time")
    if "error" in box:
        error = box["error"]
        raise error if isinstance(error, BrokerError) else BrokerError(str(error))
    handle: BrokerHandle = box["handle"]
    return RunningBroker(settings.replace(mqtt_port=handle.port), settings.host, handle.port, handle.plain_port,
                         handle.certs.ca, settings.data_dir, handle.broker, box["loop"], box["stop"], thread)
