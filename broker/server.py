"""Run the embedded broker: configuration, start-up, credential reloads, heartbeats, clean stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.contexts import BrokerConfig
from amqtt.errors import BrokerError as AmqttBrokerError

from fleet.broker import patches
from fleet.broker.admission import Admission
from fleet.broker.errors import BrokerError
from fleet.broker.hardened import FleetBroker
from fleet.broker.lag import LoopLag
from fleet.broker.limits import raise_open_file_limit
from fleet.broker.pki import CertPaths, ensure_server_certs
from fleet.broker.plugins import POLICIES
from fleet.broker.policy import AccessPolicy
from fleet.broker.store import BrokerStore
from fleet.broker.throttle import asyncio_floods_throttled
from fleet.config.settings import Settings
from fleet.config.status import BROKER
from fleet.store import credentials
from fleet.store.database import DatabaseError, open_database
from fleet.store.heartbeats import write_heartbeat
from fleet.store.pepper import load_pepper

log = logging.getLogger("fleet.broker")
HEARTBEAT_S = 2.0


TLS_LISTENER = "default"
SERVICE_LISTENER = "service"  # the collector's: no admission limits, only the service credential
PLAIN_LISTENER = "plain"
SERVICE_HANDSHAKES = 16  # in flight on the collector's listener: a few collectors, never a crowd


def broker_config(settings: Settings, certs: CertPaths, policy_id: str) -> BrokerConfig:
    """amqtt configuration: the agents' TLS listener, the collector's, an optional loopback-only plain one, only
    our plugins.

    amqtt copies into every listener each field it leaves at the dataclass default from the listener
    named ``default``, and ``ssl: False`` is that default: the plain listener silently spoke TLS. Each
    listener's own fields are therefore set again once amqtt has merged them."""
    tls = {"type": "tcp", "ssl": True, "certfile": str(certs.cert), "keyfile": str(certs.key),
           "max_connections": settings.max_connections}
    listeners: dict[str, dict[str, Any]] = {
        TLS_LISTENER: {**tls, "bind": f"{settings.host}:{settings.mqtt_port}"},
        SERVICE_LISTENER: {**tls, "bind": f"{settings.host}:{settings.service_port}"},
    }
    if settings.mqtt_plain_port:
        listeners[PLAIN_LISTENER] = {"type": "tcp", "bind": f"127.0.0.1:{settings.mqtt_plain_port}", "ssl": False,
                                     "certfile": None, "keyfile": None, "max_connections": settings.max_connections}
    plugins = {"fleet.broker.plugins.FleetAuthPlugin": {"policy": policy_id},
               "fleet.broker.plugins.FleetTopicPlugin": {"policy": policy_id}}
    config = BrokerConfig.from_dict({"listeners": listeners, "plugins": plugins})
    for name, fields in listeners.items():
        for key, value in fields.items():
            setattr(config.listeners[name], key, value)
    return config


def _load_records(database: str, migrate: bool = False) -> dict[str, credentials.CredentialRecord]:
    with open_database(database, readonly=not migrate) as db:
        return credentials.load_records(db)


def _ensure_service_key(settings: Settings) -> None:
    with open_database(settings.database) as db:
        credentials.ensure_service_key(db, settings.data_dir)


def _write_heartbeat(database: str, detail: dict[str, Any]) -> None:
    with open_database(database, migrate=False) as db:
        write_heartbeat(db, BROKER, time.time(), detail)


@dataclass
class BrokerHandle:
    """What a started broker exposes to its runner."""

    broker: FleetBroker
    certs: CertPaths
    port: int
    service_port: int
    plain_port: int | None
    stats: dict[str, int] = field(default_factory=dict)


async def run_broker(settings: Settings, stop: asyncio.Event,
                     on_started: Any = None) -> None:
    """Run the broker until ``stop`` is set; ``on_started(handle)`` is called once it listens.

    The process-wide patches of broker/patches.py are applied for exactly as long as the broker runs."""
    with patches.applied():
        await _run_broker(settings, stop, on_started)


def limit_admission(broker: FleetBroker, settings: Settings) -> None:
    """The overload bounds of docs/broker.md: handshakes and accept rate per listener, unsent bytes per client."""
    broker.admission[TLS_LISTENER] = Admission(settings.max_handshakes, settings.accept_rate)
    broker.admission[SERVICE_LISTENER] = Admission(SERVICE_HANDSHAKES, 0)
    broker.reserved_listeners.add(SERVICE_LISTENER)
    broker.max_unsent_bytes = settings.max_unsent_bytes


async def _run_broker(settings: Settings, stop: asyncio.Event, on_started: Any) -> None:
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    certs = await asyncio.to_thread(ensure_server_certs, settings)
    try:
        await asyncio.to_thread(_ensure_service_key, settings)
        records = await asyncio.to_thread(_load_records, settings.database, True)
    except DatabaseError as exc:
        raise BrokerError(str(exc)) from exc
    pepper = await asyncio.to_thread(load_pepper, data_dir)
    policy = AccessPolicy(pepper, records)
    policy_id = uuid.uuid4().hex
    POLICIES[policy_id] = policy
    store = await asyncio.to_thread(BrokerStore, data_dir / "broker.db", settings.broker_durability)
    retained, subscriptions, queued = await asyncio.to_thread(
        lambda: (store.load(), store.load_subscriptions(), store.load_queue()))
    broker = FleetBroker(broker_config(settings, certs, policy_id), policy, settings.max_queued_messages,
                         settings.service_queued_messages, store)
    limit_admission(broker, settings)
    store.start(asyncio.get_running_loop())
    try:
        await broker.start()
    except AmqttBrokerError as exc:
        POLICIES.pop(policy_id, None)
        await store.close()
        cause = exc.__cause__ or exc
        raise BrokerError(f"cannot start broker on {settings.host}:{settings.mqtt_port}: {cause}") from exc
    # No await from here to the end of the restore: a client connecting now finds its session restored.
    broker.load_retained(retained)
    restored = broker.restore_sessions(subscriptions)
    requeued = broker.restore_queue(queued)
    ports = broker.bound_ports
    handle = BrokerHandle(broker, certs, ports.get(TLS_LISTENER, settings.mqtt_port),
                          ports.get(SERVICE_LISTENER, settings.service_port), ports.get(PLAIN_LISTENER))
    log.info("broker listening on mqtts://%s:%s (collector: port %s; CA %s)%s; %d persistent sessions restored with"
             " %d queued messages", settings.host, handle.port, handle.service_port, certs.ca,
             f", plain mqtt://127.0.0.1:{handle.plain_port}" if handle.plain_port else "", restored, requeued)

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

    lag = LoopLag()

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                detail = {"connected": broker.connected_count(), "handshakes": broker.admission[TLS_LISTENER].in_flight,
                          **lag.summary(), **broker.stats, **store.stats}
                await asyncio.to_thread(_write_heartbeat, settings.database, detail)
            except Exception as exc:  # noqa: BLE001 - a locked database must not stop the broker
                log.warning("broker heartbeat failed: %s", exc)

    tasks = [asyncio.create_task(job) for job in (reload_credentials(), heartbeat(), lag.run())]
    try:
        if on_started is not None:
            on_started(handle)
        with asyncio_floods_throttled(broker.stats):
            await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await broker.shutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.warning("broker shutdown: %s", exc)
        await store.close()
        POLICIES.pop(policy_id, None)
        log.info("broker stopped")


def check_open_file_limit(settings: Settings) -> None:
    """Raise the process's open file limit (each connection holds one) and say what it allows."""
    limit = raise_open_file_limit()
    log.info("open file limit %d: at most about that many connections (max_connections %d)", limit,
             settings.max_connections)


def serve(settings: Settings, on_started: Callable[[BrokerHandle], Any] | None = None) -> None:
    """``fleet broker``: run until SIGINT/SIGTERM; ``on_started(handle)`` once it listens."""
    check_open_file_limit(settings)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_broker(settings, stop, on_started)

    with asyncio.Runner(loop_factory=loop_factory(settings)) as runner:
        runner.run(main())


def loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The broker's event loop: asyncio's own, or uvloop's (``broker_loop``); None means asyncio's default."""
    if settings.broker_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


@dataclass
class LoopThread:
    """An event loop in its own thread, running one server coroutine until ``stop()``."""

    loop: asyncio.AbstractEventLoop = field(repr=False)
    stop_event: asyncio.Event = field(repr=False)
    thread: threading.Thread = field(repr=False)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the coroutine to return and wait for the thread (idempotent)."""
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
            self.thread.join(timeout)


Serve = Callable[[asyncio.Event, Callable[[Any], None]], Coroutine[Any, Any, None]]


def start_loop_thread(serve: Serve, name: str, timeout: float = 30.0,
                      new_loop: Callable[[], asyncio.AbstractEventLoop] | None = None) -> tuple[LoopThread, Any]:
    """Run ``serve(stop, on_started)`` on a new event loop (made by ``new_loop``, asyncio's by default) in a thread;
    return once it called ``on_started(value)``, with that value. What ``serve`` raises before that is raised here;
    TimeoutError if it takes too long."""
    started = threading.Event()
    box: dict[str, Any] = {}

    def on_started(value: Any) -> None:
        box["value"] = value
        started.set()

    def run() -> None:
        # asyncio.Runner, like asyncio.run, cancels what is left (e.g. a TLS handshake in progress) before closing
        # the loop, so a stop never leaves "Task was destroyed but it is pending" behind.
        with asyncio.Runner(loop_factory=new_loop) as runner:
            box["loop"] = runner.get_loop()
            box["stop"] = asyncio.Event()
            try:
                runner.run(serve(box["stop"], on_started))
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                box["error"] = exc
                started.set()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    if not started.wait(timeout):
        raise TimeoutError(f"{name} did not start in {timeout:.0f} s")
    if "error" in box and "value" not in box:
        raise box["error"]
    return LoopThread(box["loop"], box["stop"], thread), box["value"]


@dataclass
class RunningBroker:
    """A broker running on its own event loop in a background thread."""

    settings: Settings
    host: str
    port: int
    service_port: int
    plain_port: int | None
    ca_path: Path
    data_dir: Path
    broker: FleetBroker = field(repr=False)  # the amqtt broker itself, for inspection
    _runner: LoopThread = field(repr=False)

    @property
    def url(self) -> str:
        """TLS URL clients connect to."""
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def service_url(self) -> str:
        """TLS URL of the listener reserved for the collector."""
        return f"mqtts://127.0.0.1:{self.service_port}"

    def stats(self) -> dict[str, int]:
        """Counters: refused connects/subscribes, dropped publishes by reason, routed messages."""
        store = self.broker.store
        return {**self.broker.stats, **(store.stats if store is not None else {})}

    def stop(self) -> None:
        """Stop the broker and wait for its thread (idempotent)."""
        self._runner.stop()


def start_in_thread(settings: Settings, timeout: float = 30.0) -> RunningBroker:
    """Start the broker in a background thread; return once it listens (port 0 = pick a free port)."""
    try:
        runner, handle = start_loop_thread(lambda stop, on_started: run_broker(settings, stop, on_started),
                                           "fleet-broker", timeout, loop_factory(settings))
    except BrokerError:
        raise
    except TimeoutError as exc:
        raise BrokerError("broker did not start in time") from exc
    except BaseException as exc:
        raise BrokerError(str(exc)) from exc
    return RunningBroker(settings.replace(mqtt_port=handle.port, mqtt_service_port=handle.service_port),
                         settings.host, handle.port, handle.service_port, handle.plain_port, handle.certs.ca,
                         settings.data_dir, handle.broker, runner)
