"""FleetBroker: amqtt 0.12.1's Broker with the defects that break SPEC's guarantees closed.

Each override names the stock behaviour it replaces (line numbers of amqtt/broker.py 0.12.1):
- authentication and the will-topic check run before any existing session is deleted or taken
  over (stock deletes/kicks first, ~511/~559), and a client id held by another user is refused;
- no retained re-publish for every filter of every client on CONNECT (~601); retained messages go
  out only on SUBSCRIBE, through the subscriber's own filter and the receive rule;
- incoming PUBLISHes are routed synchronously before PUBACK (stock acks once queued, so a publisher
  disconnecting after its PUBACKs lost messages), at min(publish QoS, subscription QoS);
- a PUBLISH to a ``$`` topic, over 64 KiB, or not allowed is dropped and counted, and the connection
  stays usable (stock stopped reading that client's messages after a ``$`` topic);
- a silent client is dropped after 1.5 x keepalive and its will published (stock never drops it);
- per-session queues (live in-flight and offline) are bounded; what they drop is counted;
- queued messages of a persistent session are delivered with retain=0.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import OUTGOING
from amqtt.mqtt.puback import PubackPacket
from amqtt.session import Session
from transitions import MachineError

from fleet.broker.plugins import grant_of
from fleet.broker.policy import AccessPolicy, Grant
from fleet.broker.retained import RetainedStore
from fleet.config.connack import ACCEPTED, IDENTIFIER_REJECTED, NOT_AUTHORIZED
from fleet.config.credentials import Principal
from fleet.config.topics import machine_from_client_id

log = logging.getLogger("fleet.broker")

CONNECT_TIMEOUT_S = 10.0
KEEPALIVE_FACTOR = 1.5
MAX_PACKET_BYTES = 1024 * 1024  # larger packets close the connection before being buffered
SUBACK_FAILURE = 0x80

Router = Callable[[Session, str, bytes, int, bool], None]


class GuardedReader:
    """Reader adapter that will not buffer a packet body over MAX_PACKET_BYTES: it closes the connection.

    amqtt's reader loop treats read errors as "try again", so after tripping every read returns EOF
    (otherwise the rest of the oversized payload would be parsed as packets).
    """

    def __init__(self, inner: Any, on_oversize: Callable[[int], None]) -> None:
        self._inner = inner
        self._on_oversize = on_oversize
        self.tripped = False
        self.last_read = time.monotonic()

    async def read(self, n: int = -1) -> bytes:
        """Read like the wrapped adapter; EOF for ever once an oversized body was announced."""
        if self.tripped:
            return b""
        if n > MAX_PACKET_BYTES:
            self.tripped = True
            self._on_oversize(n)
            return b""
        data = await self._inner.read(n)
        self.last_read = time.monotonic()
        return data

    def feed_eof(self) -> None:
        """Pass EOF through."""
        self._inner.feed_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class FleetProtocolHandler(BrokerProtocolHandler):
    """Per-connection protocol handler: routes before PUBACK and enforces keepalive."""

    router: Router | None = None
    on_keepalive_expired: Callable[[Session], None] | None = None

    def handle_read_timeout(self) -> None:
        """Nothing arrived for 1.5 x keepalive: close the connection so the will is published."""
        session = self.session
        if session is not None and self.on_keepalive_expired is not None:
            self.on_keepalive_expired(session)
        writer = getattr(self.writer, "_writer", None)
        if writer is not None:
            writer.transport.abort()

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        """Outgoing QoS 1 waits for its PUBACK without a per-message timer; unacknowledged messages stay
        in flight (stock gave up after 5 s and forgot them) and are sent again when a persistent session
        returns, while closing the connection cancels the wait."""
        if app_message.direction != OUTGOING or self.session is None:
            await super()._handle_qos1_message_flow(app_message)
            return
        packet_id = app_message.packet_id
        self.session.inflight_out.setdefault(packet_id, app_message)
        packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
        await self._send_packet(packet)
        app_message.publish_packet = packet
        waiter = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            app_message.puback_packet = await waiter
        finally:
            self._puback_waiters.pop(packet_id, None)
        self.session.inflight_out.pop(packet_id, None)

    async def handle_publish(self, publish_packet: Any) -> None:
        """Route QoS 0/1 at once, then acknowledge; QoS 2 keeps amqtt's flow (routed on PUBREL)."""
        qos = publish_packet.qos
        topic = publish_packet.topic_name
        if qos == QOS_2 or self.router is None or self.session is None:
            await super().handle_publish(publish_packet)
            return
        if topic is None:
            return
        # amqtt parses a zero-length payload as None; it is a valid message (and clears a retained topic).
        self.router(self.session, topic, bytes(publish_packet.data or b""), qos, bool(publish_packet.retain_flag))
        if qos == QOS_1:
            await self._send_packet(PubackPacket.build(publish_packet.variable_header.packet_id))


def _bump(session: Session, name: str, delta: int) -> int:
    value = getattr(session, name, 0) + delta
    setattr(session, name, value)
    return value


class FleetBroker(Broker):
    """amqtt Broker with SPEC's guarantees; ``policy`` decides, ``stats`` counts what was refused or dropped."""

    def __init__(self, config: dict[str, Any], policy: AccessPolicy, max_queued: int, max_queued_service: int,
                 store: RetainedStore | None = None) -> None:
        super().__init__(config)
        self.policy = policy
        self.max_queued = max_queued
        self.max_queued_service = max_queued_service
        self.stats: Counter[str] = Counter()
        self._store = store
        self._delivery_tasks: set[asyncio.Task[Any]] = set()
        self._drop_logged: set[str] = set()

    # --- connect -------------------------------------------------------------------------------
    async def _client_connected(self, listener_name: str, reader: Any, writer: Any) -> None:
        """Read CONNECT (bounded in time), authenticate, and only then touch sessions."""
        server = self._servers.get(listener_name)
        if server is None:
            raise AMQTTError(f"Invalid listener name '{listener_name}'")
        await server.acquire_connection()
        self.stats["connections"] += 1
        try:
            reader = GuardedReader(reader, lambda n: self._oversize(writer, n))
            try:
                handler, incoming = await asyncio.wait_for(
                    FleetProtocolHandler.init_from_connect(reader, writer, self.plugins_manager),
                    CONNECT_TIMEOUT_S)
            except (TimeoutError, AMQTTError, MQTTError, NoDataError, ConnectionError, ValueError) as exc:
                self.stats["connect_invalid"] += 1
                log.debug("connection closed before a valid CONNECT: %s", exc)
                await writer.close()
                return
            if not await self._authenticate(incoming, self.listeners_config[listener_name]):
                await self._refuse(incoming, writer)
                return
            grant = grant_of(incoming)
            assert grant is not None  # set by FleetAuthPlugin when it accepts
            existing = self._sessions.get(incoming.client_id or "")
            if existing is not None and existing[0].username != incoming.username:
                # A client id is owned by the user who holds it: no cross-user takeover.
                await self._refuse(incoming, writer, IDENTIFIER_REJECTED, "client id in use by another user")
                return
            session = await self._attach_session(incoming, grant)
            await self._run_session(session, handler, reader, writer)
        finally:
            server.release_connection()

    def _oversize(self, writer: Any, size: int) -> None:
        self.stats["dropped_packet_too_large"] += 1
        log.warning("closing connection from %s: packet of %d bytes exceeds %d", writer.get_peer_info(), size,
                    MAX_PACKET_BYTES)
        transport = getattr(getattr(writer, "_writer", None), "transport", None)
        if transport is not None:
            transport.abort()

    async def _refuse(self, incoming: Session, writer: Any, code: int | None = None, reason: str = "") -> None:
        if code is None:
            verdict = self.policy.check_connect(incoming.username, incoming.password, incoming.client_id or "",
                                                incoming.will_topic if incoming.will_flag else None,
                                                incoming.will_message, bool(incoming.will_retain))
            if verdict.code != ACCEPTED:
                code, reason = verdict.code, verdict.reason
            else:
                code, reason = NOT_AUTHORIZED, "refused by a plugin"
        self.stats["connect_refused"] += 1
        log.info("refused CONNECT client_id=%s user=%s: %s", incoming.client_id, incoming.username, reason)
        try:
            await ConnackPacket.build(0, code).to_stream(writer)
        except (ConnectionError, OSError):
            pass
        await writer.close()

    async def _attach_session(self, incoming: Session, grant: Grant) -> Session:
        """Stock clean/persistent session handling, run only after authentication succeeded."""
        client_id = incoming.client_id or ""
        existing = self._sessions.get(client_id)
        if existing is not None and existing[0].transitions.state == "connected":
            log.info("session takeover client_id=%s: closing the older connection", client_id)
            await self._close_connection(existing[0], existing[1])
        if incoming.clean_session:
            await self._delete_session(client_id)
            incoming.parent = 0
            session = incoming
        elif client_id in self._sessions:
            session = self._sessions[client_id][0]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password", "clean_session"):
                setattr(session, name, getattr(incoming, name))
            session.parent = 1
        else:
            incoming.parent = 0
            session = incoming
        session.fleet_grant = grant  # type: ignore[attr-defined]
        # amqtt wraps every read in wait_for(keepalive) and re-arms a write timer per packet (a task and
        # two timers per message); with keep_alive 0 it does neither, and _watch_keepalive enforces it.
        session.fleet_keepalive = session.keep_alive * KEEPALIVE_FACTOR  # type: ignore[attr-defined]
        session.keep_alive = 0
        return session

    async def _close_connection(self, session: Session, handler: Any) -> None:
        """Drop a live connection as if its network failed (its will is published) and wait for it to end."""
        writer = getattr(handler.writer, "_writer", None)
        if writer is not None:
            writer.transport.abort()
        await handler.handle_connection_closed()
        for _ in range(50):
            if session.transitions.state != "connected":
                return
            await asyncio.sleep(0.02)

    async def _run_session(self, session: Session, handler: FleetProtocolHandler, reader: Any, writer: Any) -> None:
        """Take over a live connection of the same user, accept, deliver queued messages, run the loop."""
        while True:
            try:
                session.transitions.connect()
                break
            except (MachineError, ValueError):
                if session.transitions.is_connected():
                    log.info("session takeover client_id=%s", session.client_id)
                    old = self._sessions[session.client_id]
                    await old[1].handle_connection_closed()
                    await old[1].stop()
                    break
                await asyncio.sleep(0.1)
        handler.router = self._route
        handler.on_keepalive_expired = self._keepalive_expired
        handler.attach(session, reader, writer)
        self._sessions[session.client_id] = (session, handler)
        await handler.mqtt_connack_authorize(True)
        grant = grant_of(session)
        log.info("connected client_id=%s user=%s org=%s", session.client_id, session.username,
                 grant.org if grant else None)
        from amqtt.events import BrokerEvents

        await self.plugins_manager.fire_event(BrokerEvents.CLIENT_CONNECTED, client_id=session.client_id,
                                              client_session=session)
        await handler.start()
        self._watch_keepalive(session, handler, reader)
        await self._publish_session_retained_messages(session)
        await self._client_message_loop(session, handler)

    def _watch_keepalive(self, session: Session, handler: FleetProtocolHandler, reader: GuardedReader) -> None:
        """Drop the connection once nothing was read for 1.5 x keepalive (one timer per connection)."""
        limit = getattr(session, "fleet_keepalive", 0)
        if not limit:
            return
        loop = asyncio.get_running_loop()

        def check() -> None:
            current = self._sessions.get(session.client_id or "")
            if current is None or current[1] is not handler or session.transitions.state != "connected":
                return
            idle = time.monotonic() - reader.last_read
            if idle >= limit:
                handler.handle_read_timeout()
            else:
                loop.call_later(limit - idle, check)

        loop.call_later(limit, check)

    def _keepalive_expired(self, session: Session) -> None:
        self.stats["keepalive_expired"] += 1
        log.info("keepalive expired client_id=%s user=%s: closing, will follows", session.client_id, session.username)

    # --- routing -------------------------------------------------------------------------------
    def _count_drop(self, reason: str, session: Session | None, topic: str) -> None:
        self.stats[f"dropped_{reason}"] += 1
        key = f"{reason}:{getattr(session, 'client_id', None)}"
        if key not in self._drop_logged and len(self._drop_logged) < 10_000:
            self._drop_logged.add(key)
            log.warning("dropped publish (%s) client_id=%s topic=%.100s", reason,
                        getattr(session, "client_id", None), topic)

    def _route(self, session: Session, topic: str, data: bytes, qos: int, retain: bool) -> None:
        """Check a client's PUBLISH and hand it to every allowed subscriber before it is acknowledged."""
        grant = grant_of(session)
        if topic.startswith("$"):
            self._count_drop("dollar_topic", session, topic)
            return
        if "#" in topic or "+" in topic or not topic:
            self._count_drop("invalid_topic", session, topic)
            return
        if grant is None or not self.policy.may_publish(grant, topic, data, retain):
            self._count_drop("too_large" if grant is not None and len(data) > self._max_payload() else "not_allowed",
                             session, topic)
            return
        self._deliver(session, topic, data, qos, retain)

    @staticmethod
    def _max_payload() -> int:
        from fleet.config.payloads import MAX_PAYLOAD_BYTES

        return MAX_PAYLOAD_BYTES

    def _deliver(self, source: Session | None, topic: str, data: bytes, qos: int, retain: bool) -> None:
        """Fan a checked message out to matching subscriptions (receive rule, min QoS, bounded queues)."""
        self.stats["routed"] += 1
        if retain:
            self._store_retained(source, topic, data, qos)
        for topic_filter, subscriptions in self._subscriptions.items():
            if not self._matches(topic, topic_filter):
                continue
            for target, sub_qos in subscriptions:
                target_grant = grant_of(target)
                if target_grant is None or not AccessPolicy.may_receive(target_grant, topic):
                    continue
                out_qos = min(qos, sub_qos)
                self._send_to(target, topic, data, out_qos, retain=False)

    def _queue_limit(self, session: Session) -> int:
        grant = grant_of(session)
        return self.max_queued_service if grant is not None and grant.role == "service" else self.max_queued

    def _send_to(self, target: Session, topic: str, data: bytes, qos: int, retain: bool) -> None:
        if target.transitions.state == "connected":
            handler = self._get_handler(target)
            if handler is None:
                return
            if getattr(target, "fleet_pending", 0) >= self._queue_limit(target):
                self._count_drop("queue_full", target, topic)
                return
            _bump(target, "fleet_pending", 1)
            task = asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=retain))
            self._delivery_tasks.add(task)
            task.add_done_callback(lambda t, s=target: self._delivery_done(t, s))
        elif not target.clean_session and qos in (QOS_1, QOS_2):
            if target.retained_messages.qsize() >= self._queue_limit(target):
                self._count_drop("queue_full", target, topic)
                return
            target.retained_messages.put_nowait(RetainedApplicationMessage(None, topic, data, qos))

    def _delivery_done(self, task: asyncio.Task[Any], session: Session) -> None:
        self._delivery_tasks.discard(task)
        _bump(session, "fleet_pending", -1)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.stats["delivery_failed"] += 1
            log.debug("delivery to %s failed: %r", session.client_id, exc)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Deliver what was queued while a persistent session was offline (retain=0, in order)."""
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            self._send_to(session, queued.topic, queued.data, queued.qos or QOS_0, retain=False)

    async def _broadcast_message(self, session: Session | None, topic: str | None, data: bytes | bytearray | None,
                                 force_qos: int | None = None) -> None:
        """Messages the broker itself emits (last wills) go through the same fan-out as client publishes."""
        if topic is None or data is None:
            return
        self._deliver(session, topic, bytes(data), force_qos if force_qos is not None else QOS_0, retain=False)

    async def _handle_message_delivery(self, client_session: Session, handler: Any, wait_deliver: Any) -> bool:
        """QoS 2 messages (released by PUBREL) take the same checked route; the connection always survives."""
        message = wait_deliver.result()
        if message is not None and message.topic:
            self._route(client_session, message.topic, bytes(message.data or b""), message.qos or QOS_0,
                        bool(message.publish_packet and message.publish_packet.retain_flag))
        return True

    # --- retained --------------------------------------------------------------------------------
    def _store_retained(self, source: Session | None, topic: str, data: bytes, qos: int) -> None:
        if data:
            self._retained_messages[topic] = RetainedApplicationMessage(source, topic, data, qos)
        else:
            self._retained_messages.pop(topic, None)
        if self._store is not None:
            self._store.record(topic, data or None, qos)

    async def retain_message(self, source_session: Session | None, topic_name: str | None,
                             data: bytes | bytearray | None, qos: int | None = None) -> None:
        """Every retained change (including a will's) goes through the persisted store."""
        if topic_name is not None:
            self._store_retained(source_session, topic_name, bytes(data or b""), qos or QOS_0)

    def load_retained(self, items: list[tuple[str, bytes, int]]) -> None:
        """Restore retained messages persisted by an earlier run."""
        for topic, data, qos in items:
            self._retained_messages[topic] = RetainedApplicationMessage(None, topic, data, qos)

    async def _handle_subscription(self, client_session: Session, handler: Any, subscribe_waiter: Any) -> None:
        """SUBACK every filter (0x80 when refused), then send matching retained messages it may receive."""
        subscriptions = subscribe_waiter.result()
        codes = [await self.add_subscription(sub, client_session) for sub in subscriptions.topics]
        await handler.mqtt_acknowledge_subscription(subscriptions.packet_id, codes)
        grant = grant_of(client_session)
        for (topic_filter, _), code in zip(subscriptions.topics, codes, strict=False):
            if code == SUBACK_FAILURE:
                self.stats["subscribe_refused"] += 1
                log.info("refused SUBSCRIBE client_id=%s filter=%.100s", client_session.client_id, topic_filter)
                continue
            for topic, retained in list(self._retained_messages.items()):
                if grant is not None and self._matches(topic, topic_filter) and AccessPolicy.may_receive(grant, topic):
                    self._send_to(client_session, topic, bytes(retained.data), min(code, retained.qos or QOS_0),
                                  retain=True)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """Stock checks and bookkeeping; a persistent session's subscription is also written to disk."""
        code = await super().add_subscription(subscription, session)
        if code != SUBACK_FAILURE and not session.clean_session and self._store is not None:
            self._store.record_subscription(session.client_id or "", session.username or "", subscription[0], code)
        return code

    async def _handle_unsubscription(self, client_session: Session, handler: Any, unsubscribe_waiter: Any) -> None:
        """Stock UNSUBSCRIBE, and the subscription leaves the disk too."""
        if self._store is not None and not client_session.clean_session:
            for topic_filter in unsubscribe_waiter.result().topics:
                self._store.forget_subscription(client_session.client_id or "", topic_filter)
        await super()._handle_unsubscription(client_session, handler, unsubscribe_waiter)

    async def _delete_session(self, client_id: str) -> None:
        """A clean session replacing a persistent one also deletes its stored subscriptions."""
        if self._store is not None:
            self._store.forget_subscription(client_id)
        await super()._delete_session(client_id)

    def restore_sessions(self, rows: list[tuple[str, str, str, int]]) -> int:
        """Recreate persistent sessions (offline) with their subscriptions, so messages for them are queued
        from the first second after a restart; returns how many sessions. Removed users are skipped."""
        for client_id, username, topic_filter, qos in rows:
            if client_id not in self._sessions:
                record = self.policy.records.get(username)
                if record is None:
                    continue
                machine = machine_from_client_id(record.org or "", client_id) if record.role == "agent" else None
                handler, session = self.create_offline_session(client_id)
                session.username, session.clean_session = username, False
                session.fleet_grant = Grant(Principal(username, record.org, record.role), machine)  # type: ignore
                self._sessions[client_id] = (session, handler)
            session = self._sessions[client_id][0]
            grant = grant_of(session)
            if grant is not None and AccessPolicy.may_subscribe(grant, topic_filter):
                self._subscriptions.setdefault(topic_filter, []).append((session, qos))
        return len({row[0] for row in rows if row[0] in self._sessions})

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Session) -> None:
        """Disabled: stock called this for every filter of every client on each CONNECT (retained leak)."""
        return

    # --- credentials changes -------------------------------------------------------------------
    def disconnect_revoked(self) -> int:
        """Close live connections whose key was rotated or whose org was removed; returns how many."""
        closed = 0
        for session, handler in list(self._sessions.values()):
            if session.transitions.state != "connected":
                continue
            if not self.policy.still_valid(session.username, session.password):
                writer = getattr(handler.writer, "_writer", None)
                if writer is not None:
                    log.info("disconnecting client_id=%s user=%s: credentials revoked", session.client_id,
                             session.username)
                    writer.transport.abort()
                    closed += 1
        self.stats["revoked_disconnects"] += closed
        return closed

    @property
    def bound_ports(self) -> dict[str, int]:
        """Actual port of each listener (for port 0)."""
        ports = {}
        for name, server in self._servers.items():
            sockets = getattr(server.instance, "sockets", None) or []
            if sockets:
                ports[name] = sockets[0].getsockname()[1]
        return ports

    def connected_count(self) -> int:
        """Clients connected right now."""
        return sum(1 for s, _ in self._sessions.values() if s.transitions.state == "connected")
