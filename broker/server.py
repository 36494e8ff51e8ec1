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
from fleet.broker.pacing import coalescing_loop
from fleet.broker.pki import CertPaths, ensure_server_certs, server_chain
from fleet.broker.plugins import POLICIES
from fleet.broker.policy import AccessPolicy
from fleet.broker.store import BrokerStore
from fleet.broker.throttle import asyncio_floods_throttled
from fleet.config.settings import Settings
from fleet.config.status import BROKER
from fleet.config.tls import ca_fingerprint
from fleet.store import credentials, identity
from fleet.store.database import POSTGRESQL, DatabaseError, open_database
from fleet.store.heartbeats import write_heartbeat
from fleet.store.pepper import key_pepper

log = logging.getLogger("fleet.broker")
HEARTBEAT_S = 2.0
CA_FINGERPRINT = "ca_fingerprint"  # meta: the SHA-256 of the CA the first broker made (hex)
ON_DEMAND_RELOAD_S = 1.0  # an unknown certificate or token reloads the credentials at most this often


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
    # The chain (server certificate and CA) lets an agent holding only the CA's fingerprint find the CA; cafile
    # asks for client certificates (machine identities), optional beside passwords.
    tls = {"type": "tcp", "ssl": True, "certfile": str(server_chain(certs)), "keyfile": str(certs.key),
           "cafile": str(certs.ca), "max_connections": settings.max_connections}
    listeners: dict[str, dict[str, Any]] = {
        TLS_LISTENER: {**tls, "bind": f"{settings.host}:{settings.mqtt_port}"},
        SERVICE_LISTENER: {**tls, "bind": f"{settings.host}:{settings.service_port}"},
    }
    if settings.mqtt_plain_port:
        listeners[PLAIN_LISTENER] = {"type": "tcp", "bind": f"127.0.0.1:{settings.mqtt_plain_port}", "ssl": False,
                                     "certfile": None, "keyfile": None, "cafile": None,
                                     "max_connections": settings.max_connections}
    plugins = {"fleet.broker.plugins.FleetAuthPlugin": {"policy": policy_id},
               "fleet.broker.plugins.FleetTopicPlugin": {"policy": policy_id}}
    config = BrokerConfig.from_dict({"listeners": listeners, "plugins": plugins})
    for name, fields in listeners.items():
        for key, value in fields.items():
            setattr(config.listeners[name], key, value)
    return config


def _load_records(database: str, migrate: bool = False) -> tuple[dict[str, credentials.CredentialRecord],
                                                                  identity.IdentitySnapshot]:
    with open_database(database, readonly=not migrate) as db:
        return credentials.load_records(db), identity.load_snapshot(db)


def _check_ca(settings: Settings) -> None:
    """A broker sharing a PostgreSQL database with another signs with that one's CA: without ``certs/ca.key``
    it stops here, since a CA of its own would be refused by every agent holding the first one's."""
    paths = (settings.certs_dir / "ca.pem", settings.certs_dir / "ca.key")
    with open_database(settings.database) as db:
        if db.engine != POSTGRESQL or all(path.exists() for path in paths):
            return
        known = db.query_one("SELECT value FROM meta WHERE key = ?", (CA_FINGERPRINT,))
    if known is not None:
        missing = next(path for path in paths if not path.exists())
        raise BrokerError(f"{missing} is missing: copy certs/ from the first broker host's data dir (agents trust its"
                          f" CA, SHA-256 {known[0]})")


def _record_ca(settings: Settings, certs: CertPaths) -> None:
    """Record the CA's fingerprint, so a broker on another host without it stops rather than make its own."""
    fingerprint = ca_fingerprint(certs.ca.read_bytes())
    with open_database(settings.database) as db:
        db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                   (CA_FINGERPRINT, fingerprint))


def _key_pepper(settings: Settings) -> bytes:
    with open_database(settings.database) as db:
        return key_pepper(db, settings.data_dir)


def _ensure_service_key(settings: Settings) -> None:
    with open_database(settings.database) as db:
        if db.engine == POSTGRESQL and credentials.service_credential_exists(db):
            return  # another host made it: the broker checks it against the database and needs no copy
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
    await asyncio.to_thread(_check_ca, settings)
    certs = await asyncio.to_thread(ensure_server_certs, settings)
    await asyncio.to_thread(_record_ca, settings, certs)
    try:
        await asyncio.to_thread(_ensure_service_key, settings)
        records, snapshot = await asyncio.to_thread(_load_records, settings.database, True)
    except DatabaseError as exc:
        raise BrokerError(str(exc)) from exc
    pepper = await asyncio.to_thread(_key_pepper, settings)
    policy = AccessPolicy(pepper, records, snapshot)
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

    reloading = asyncio.Lock()
    last_reload = [time.monotonic()]

    async def reload_now(min_gap_s: float = 0.0) -> None:
        """Reload the snapshot; with ``min_gap_s``, not sooner than that after the last reload, and not at all
        when one started after this was asked (one reload serves every CONNECT waiting for it)."""
        asked = time.monotonic()
        async with reloading:
            if min_gap_s and last_reload[0] > asked:
                return
            if (wait := last_reload[0] + min_gap_s - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            last_reload[0] = time.monotonic()
            try:
                fresh, snapshot = await asyncio.to_thread(_load_records, settings.database)
            except Exception as exc:  # noqa: BLE001 - keep the old snapshot, try again
                log.warning("credential reload failed: %s", exc)
                return
            if policy.replace_records(fresh, snapshot):
                log.info("credentials changed: %d principals, %d machine certificates", len(fresh),
                         len(snapshot.serials))
                broker.disconnect_revoked()

    async def reload_credentials() -> None:
        while True:
            await asyncio.sleep(settings.reload_interval_s)
            await reload_now()

    policy.refresh = lambda: reload_now(ON_DEMAND_RELOAD_S)

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
    """The broker's event loop: asyncio's own, letting events gather ``broker_coalesce_ms`` (broker/pacing.py),
    or uvloop's (``broker_loop``); None means asyncio's default."""
    if settings.broker_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if settings.broker_coalesce_ms:
        return coalescing_loop(settings.broker_coalesce_ms)
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
    def loop(self) -> asyncio.AbstractEventLoop:
        """The broker's event loop (for inspection: it runs in the broker's thread)."""
        return self._runner.loop

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
