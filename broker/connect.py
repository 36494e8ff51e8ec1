"""Connections and sessions: the half of FleetBroker that admits a client and keeps its session.

Stock behaviour replaced here (amqtt 0.12.1, broker.py):
- an existing session was deleted (clean=1, ~511) or taken over (clean=0, ~559) before the CONNECT was
  authenticated, so a wrong password with a victim's client id wiped or kicked the victim; here the
  CONNECT is authenticated, and its will topic checked, before any session is touched, and a client id
  held by another user is refused;
- keepalive was never enforced; here a client silent for 1.5 x its keepalive is dropped (one timer for
  all connections, broker/keepalive.py), and its will is published;
- a takeover raced the older connection's end (a retry loop, then a second takeover path); here the
  older connection is dropped and its end awaited before the new one is admitted;
- every connection, health checks included, logged at INFO, and one closing before CONNECT logged an
  error with two tracebacks; here it is one DEBUG line.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import ssl
from functools import partial
from typing import Any

from amqtt.contexts import ListenerType
from amqtt.errors import AMQTTError, CodecError, MQTTError, NoDataError, ProtocolHandlerError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.protocol.broker_handler import Subscription, UnSubscription
from amqtt.session import Session

from fleet.broker.admission import Admission
from fleet.broker.framing import MAX_PACKET_BYTES, GuardedReader, PacketProtocol
from fleet.broker.keepalive import KeepaliveWheel
from fleet.broker.listener import listen, reset
from fleet.broker.pacing import selector_of
from fleet.broker.policy import AccessPolicy, Grant
from fleet.broker.protocol import FleetProtocolHandler, StreamWriter, abort, abort_transport
from fleet.broker.routing import MAX_QOS, QueuedMessage, RoutingBroker
from fleet.broker.sessions import extras, grant_of, spare_queues
from fleet.broker.throttle import ThrottledLog
from fleet.broker.tlstransport import TLSSocketTransport, handshake, read_buffer
from fleet.config.connack import ACCEPTED, IDENTIFIER_REJECTED, NOT_AUTHORIZED, SERVER_UNAVAILABLE
from fleet.config.topics import machine_from_client_id
from fleet.store.credentials import SERVICE_ROLE, Principal

log = logging.getLogger("fleet.broker")

CONNECT_TIMEOUT_S = 10.0  # the TLS handshake, and then the CONNECT, each
STOP_RETRY_S = 0.5
KEEPALIVE_FACTOR = 1.5
TAKEOVER_TIMEOUT_S = 10.0  # the older connection's will and cleanup; a new CONNECT waits this long at most
# Above this share of max_connections, a listener admits only the collector and clients whose persistent session
# holds queued messages: a full broker still serves those who would lose something.
RESERVED_SHARE = 0.05
MAX_UNSENT_BYTES = 1 << 20  # per connection: a client that reads nothing is dropped past this
SERVICE_MAX_UNSENT_BYTES = 64 << 20  # the collector's: a busy moment of its own must not cost it its connection
# What reading a client's first packet raises when the client leaves, stalls or sends garbage: routine, one DEBUG line.
CONNECT_FAILURES = (TimeoutError, EOFError, OSError, AMQTTError, MQTTError, NoDataError, CodecError, ValueError)


def tls_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """amqtt's server context, made lighter per handshake: a client certificate is asked for only when the
    listener names a CA to check it against (machine certificates; without one, CERT_NONE), and no TLS 1.3
    session tickets are sent (MQTT clients here, paho included, never resume a session)."""
    verifies = context.cert_store_stats().get("x509_ca", 0) > 0
    context.verify_mode = ssl.CERT_OPTIONAL if verifies else ssl.CERT_NONE
    context.num_tickets = 0
    return context


def peer_identity(writer: asyncio.StreamWriter) -> tuple[str, str] | None:
    """(subject CN, lowercase hex serial) of the client certificate the handshake verified, or None."""
    cert = writer.get_extra_info("peercert")
    if not cert:
        return None
    common_name = next((value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"), "")
    try:
        serial = format(int(cert.get("serialNumber", ""), 16), "x")
    except ValueError:
        return None
    return common_name, serial


def _resolved(value: Subscription | UnSubscription) -> asyncio.Future[Any]:
    """A done future holding ``value``: amqtt's subscription handlers take the waiter its message loop made."""
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


class SessionBroker(RoutingBroker):
    """RoutingBroker that authenticates before touching sessions and enforces keepalive."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connection_tasks: set[asyncio.Task[Any]] = set()
        self._tls: dict[str, ssl.SSLContext] = {}  # listener name -> its TLS context (negotiated per connection)
        self._stopping = False
        self._connected = 0
        self._keepalive = KeepaliveWheel(self._still_serving, lambda handler: handler.handle_read_timeout())
        self.admission: dict[str, Admission] = {}  # listener name -> its bounds on handshakes, if any
        self.reserved_listeners: set[str] = set()  # listeners that admit only the collector's credential
        self.max_unsent_bytes = MAX_UNSENT_BYTES
        self.throttled = ThrottledLog(log)

    # --- listening -------------------------------------------------------------------------------
    async def _create_server_instance(self, listener_name: str, listener_type: ListenerType,  # the amqtt seam
                                      address: str | None, port: int, ssl_context: ssl.SSLContext | None) -> Any:
        """A TCP listener with an accept loop of our own (broker/listener.py): admission is decided on the bare
        socket, and TLS is negotiated in each connection's own task (serve_socket), so a handshake is bounded by
        CONNECT_TIMEOUT_S and ended by a broker stop like any connection. asyncio's TLS listener did handshakes
        outside any task of ours: at stop they went on, and their clients got a session on a broker shutting
        down whose socket nobody closed."""
        if listener_type != ListenerType.TCP:
            return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)
        if ssl_context is not None:
            self._tls[listener_name] = tls_context(ssl_context)
            read_buffer()  # made now, on the loop's thread, rather than at the first connection
        return await listen(address, port, partial(self._accepted, listener_name=listener_name), self._accept_failed)

    def _accepted(self, sock: socket.socket, listener_name: str) -> None:
        """A connection arrived: turn it away now if the listener is at its admission bounds, else serve it."""
        if self._stopping:  # accepted in the instant before the listeners closed
            reset(sock)
            return
        admission = self.admission.get(listener_name)
        refused = admission.admit() if admission is not None else None
        if refused is not None:
            self._turn_away(sock, refused)
            return
        task = asyncio.get_running_loop().create_task(self.serve_socket(sock, listener_name, admission))
        self._connection_tasks.add(task)
        task.add_done_callback(self._connection_tasks.discard)

    def _accept_failed(self, exc: OSError) -> None:
        self.stats["accept_failed"] += 1
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.throttled("accept", logging.WARNING, "cannot accept connections: %s (open file limit %d); raise"
                       " LimitNOFILE or lower max_connections", exc.strerror or exc, soft)

    # --- one connection, from accept to close --------------------------------------------------
    async def serve_socket(self, sock: socket.socket, listener_name: str, admission: Admission | None) -> None:
        """TLS (on a TLS listener), then serve the connection with our writer adapter; end quietly on shutdown.

        Python 3.11's asyncio reports a connection task that ends cancelled or raising as an unhandled
        error, so this task always returns normally; a broker stop cancels it and it aborts its connection."""
        try:
            opened = await self._open(sock, listener_name)
        finally:
            if admission is not None:
                admission.done()
        if opened is None:
            return
        reader, writer = opened
        try:
            adapter = StreamWriter(writer, self.max_unsent_bytes, self._unread)
            adapter.identity = peer_identity(writer) if listener_name in self._tls else None
            await self._client_connected(listener_name, reader, adapter)
        except (asyncio.CancelledError, ProtocolHandlerError):  # a stop (amqtt's _send_packet makes it the latter)
            abort_transport(writer.transport)
        except OSError as exc:  # the peer left while we were writing to it
            log.debug("connection lost: %s", exc)
            abort_transport(writer.transport)

    async def _open(self, sock: socket.socket,
                    listener_name: str) -> tuple[GuardedReader, asyncio.StreamWriter] | None:
        """The connection's reader and writer once TLS (on a TLS listener) is up; None (socket closed, counted) if
        it failed."""
        loop = asyncio.get_running_loop()
        reader = GuardedReader()
        protocol = PacketProtocol(reader, loop)
        context = self._tls.get(listener_name)
        try:
            peer = sock.getpeername()
        except OSError:  # already gone
            reset(sock)
            return None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                if context is None:
                    transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
                else:
                    transport = TLSSocketTransport(loop, await handshake(sock, context), protocol)
        except TimeoutError:
            self.stats["handshake_timeouts"] += 1
            self.throttled("handshake_timeout", logging.WARNING, "TLS handshakes did not finish within %.0f s",
                           CONNECT_TIMEOUT_S)
            reset(sock)
            return None
        except asyncio.CancelledError:  # a broker stop
            reset(sock)
            return None
        except CONNECT_FAILURES as exc:  # a port probe, plain MQTT on the TLS port, an untrusting client
            self.stats["connect_invalid"] += 1
            if isinstance(exc, ssl.SSLCertVerificationError):  # a client certificate not from our CA, or expired
                self.stats["cert_refused"] += 1
                self.throttled("cert_refused", logging.INFO, "refused a client certificate from %s: %s", peer,
                               exc.verify_message)
            else:
                log.debug("connection from %s closed in the TLS handshake: %r", peer, exc)
            reset(sock)
            return None
        return reader, asyncio.StreamWriter(transport, protocol, protocol.stream, loop)

    def _turn_away(self, sock: socket.socket, why: str) -> None:
        """Close a connection before its TLS handshake: the broker has as many handshakes as it can take."""
        self.stats[f"refused_{why}"] += 1
        self.throttled(why, logging.WARNING, "turning new connections away before TLS (%s): the broker is at its"
                       " admission limit; they retry with backoff", why.replace("_", " "))
        reset(sock)

    def _unread(self, writer: StreamWriter) -> None:
        """A client let more than max_unsent_bytes pile up unread: drop it, as if its network failed."""
        self.stats["dropped_slow_reader"] += 1
        self.throttled("slow_reader", logging.WARNING, "dropped a connection from %s: more than %d bytes unsent",
                       writer.get_peer_info(), self.max_unsent_bytes)
        writer.abort()

    async def _client_connected(self, listener_name: str, reader: Any, writer: Any) -> None:  # the amqtt seam
        """Read CONNECT (bounded in time), authenticate, and only then touch sessions."""
        server = self._servers.get(listener_name)
        if server is None:
            raise AMQTTError(f"Invalid listener name '{listener_name}'")
        # Server.acquire_connection() logs at INFO for every connection, health checks included, and waits
        # without end when the listener is full: here a full listener answers CONNACK "server unavailable".
        server.conn_count += 1
        self.stats["connections"] += 1
        try:
            reader.on_oversize = lambda n: self._oversize(writer, n)
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancellation (a broker stop) that
                # comes as the CONNECT is read, and the connection went on into a session nobody would end.
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    handler, incoming = await FleetProtocolHandler.init_from_connect(reader, writer,
                                                                                     self.plugins_manager)
                spare_queues(incoming)
                extras(incoming).peer = getattr(writer, "identity", None)
            except CONNECT_FAILURES as exc:
                self.stats["connect_invalid"] += 1
                log.debug("connection from %s closed before a valid CONNECT: %s", writer.get_peer_info(),
                          exc or type(exc).__name__)
                await writer.close()
                return
            if not await self._authenticate(incoming, self.listeners_config[listener_name]):
                await self._refuse(incoming, writer)
                return
            grant = grant_of(incoming)
            assert grant is not None  # set by FleetAuthPlugin when it accepts
            incoming.username = grant.principal.username  # a certificate's identity, not the username it sent
            client_id = incoming.client_id or ""
            if listener_name in self.reserved_listeners and grant.principal.role != SERVICE_ROLE:
                await self._refuse(incoming, writer, NOT_AUTHORIZED, "this listener is reserved for the collector")
                return
            if grant.principal.role == SERVICE_ROLE:
                writer.max_unsent = max(writer.max_unsent, SERVICE_MAX_UNSENT_BYTES)
            if not self._has_room(server.conn_count, self.listeners_config[listener_name].max_connections, grant,
                                  client_id):
                self.stats["refused_broker_full"] += 1
                await self._refuse(incoming, writer, SERVER_UNAVAILABLE, "the broker is full")
                return
            existing = self.sessions.get(client_id)
            if existing is not None and existing[0].username != incoming.username:
                # A client id is owned by the user who holds it: no cross-user takeover.
                await self._refuse(incoming, writer, IDENTIFIER_REJECTED, "client id in use by another user")
                return
            # Loop: another CONNECT with this client id may have taken the session over while we waited.
            while (existing := self.sessions.get(client_id)) is not None and existing[0].transitions.is_connected():
                if not await self._end_live_connection(existing[0], existing[1]):
                    await self._refuse(incoming, writer, SERVER_UNAVAILABLE, "the older connection did not end")
                    return
            # No await from here to connect(): nothing else can attach this client id in between.
            session = await self._attach_session(incoming, grant)
            await self._run_session(session, handler, reader, writer)
        finally:
            server.conn_count -= 1

    def _has_room(self, connections: int, limit: int | None, grant: Grant, client_id: str) -> bool:
        """Whether a listener holding ``connections`` (this one included) admits this client: anyone below the
        reserve, then only the collector and clients whose persistent session holds queued messages."""
        if not limit or connections <= limit - max(1, int(limit * RESERVED_SHARE)):
            return True
        if connections > limit:
            return False
        if grant.principal.role == SERVICE_ROLE:
            return True
        existing = self.sessions.get(client_id)
        return existing is not None and not existing[0].clean_session and bool(extras(existing[0]).queue)

    def _oversize(self, writer: Any, size: int) -> None:
        self.stats["dropped_packet_too_large"] += 1
        log.warning("closing connection from %s: packet of %d bytes exceeds %d", writer.get_peer_info(), size,
                    MAX_PACKET_BYTES)
        abort(writer)

    async def _refuse(self, incoming: Session, writer: Any, code: int | None = None, reason: str = "") -> None:
        if code is None:
            verdict = self.policy.check_connect(incoming.username, incoming.password, incoming.client_id or "",
                                                incoming.will_topic if incoming.will_flag else None,
                                                incoming.will_message, bool(incoming.will_retain),
                                                extras(incoming).peer)
            code, reason = (verdict.code, verdict.reason) if verdict.code != ACCEPTED else (NOT_AUTHORIZED,
                                                                                            "refused by a plugin")
        self.stats["connect_refused"] += 1
        log.info("refused CONNECT client_id=%s user=%s: %s", incoming.client_id, incoming.username, reason)
        try:
            await ConnackPacket.build(0, code).to_stream(writer)
        except OSError:
            pass
        await writer.close()

    async def _end_live_connection(self, session: Session, handler: Any) -> bool:
        """Takeover: drop the session's live connection as if its network failed (its will is published) and
        wait until it has ended; False if it did not end in time."""
        log.info("session takeover client_id=%s: closing the older connection", session.client_id)
        abort(handler.writer)
        older = extras(session).connection
        if older is not None and older is not asyncio.current_task():
            await asyncio.wait({older}, timeout=TAKEOVER_TIMEOUT_S)
        return session.transitions.state != "connected"

    async def _attach_session(self, incoming: Session, grant: Grant) -> Session:
        """Stock clean/persistent session handling, run only after authentication succeeded."""
        client_id = incoming.client_id or ""
        if incoming.clean_session:
            await self._delete_session(client_id)
            incoming.parent = 0
            session = incoming
        elif client_id in self.sessions:
            session = self.sessions[client_id][0]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password", "clean_session"):
                setattr(session, name, getattr(incoming, name))
            session.parent = 1
        else:
            incoming.parent = 0
            session = incoming
        state = extras(session)
        state.grant = grant
        # amqtt wraps every read in wait_for(keepalive) and re-arms a write timer per packet (a task and
        # two timers per message); with keep_alive 0 it does neither, and _watch_keepalive enforces it.
        state.keepalive_s = session.keep_alive * KEEPALIVE_FACTOR
        session.keep_alive = 0
        return session

    async def _run_session(self, session: Session, handler: FleetProtocolHandler, reader: GuardedReader,
                           writer: Any) -> None:
        """Accept, deliver what was held for the session, serve the connection in this task until it ends,
        then end the session (its will unless the client sent DISCONNECT)."""
        session.transitions.connect()  # not connected: _end_live_connection ended any live connection
        self._connected += 1
        state = extras(session)
        state.connection = asyncio.current_task()
        state.ready = False  # until what was in flight has been sent again: new messages queue behind it
        handler.router = self.route
        handler.durable_barrier = self.store.barrier if self.store is not None else None
        handler.hurry_barrier = self.store.hurry if self.store is not None else None
        selector = selector_of(asyncio.get_running_loop())
        handler.answered = selector.answered if selector is not None else None
        handler.on_delivered = self.delivered
        handler.on_keepalive_expired = self._keepalive_expired
        handler.on_dropped = self.count_drop
        handler.on_subscribe = lambda sub: self._handle_subscription(session, handler, _resolved(sub))
        handler.on_unsubscribe = lambda unsub: self._handle_unsubscription(session, handler, _resolved(unsub))
        handler.attach(session, reader, writer)
        self.sessions[session.client_id or ""] = (session, handler)
        clean = False
        try:
            await handler.mqtt_connack_authorize(True)
            grant = grant_of(session)
            log.info("connected client_id=%s user=%s org=%s", session.client_id, session.username,
                     grant.org if grant else None)
            await self.plugins_manager.fire_event(BrokerEvents.CLIENT_CONNECTED, client_id=session.client_id,
                                                  client_session=session)
            await handler._retry_deliveries()  # noqa: SLF001 - the amqtt seam: what was in flight, sent again
            self._watch_keepalive(session, handler, reader)
            state.ready = True
            self.deliver_queued(session)
            clean = await handler.serve()
        except asyncio.CancelledError:  # the broker stops: the connection is dropped, no will
            abort(writer)
            clean = True
            raise
        finally:
            await self._end_session(session, handler, clean)

    async def _end_session(self, session: Session, handler: FleetProtocolHandler, clean: bool) -> None:
        """The connection ended: publish the will unless it ended cleanly, close, mark the session offline."""
        try:
            if not clean and session.will_flag and session.will_topic is not None:
                await self._broadcast_message(session, session.will_topic, session.will_message, session.will_qos)
                if session.will_retain:
                    await self.retain_message(session, session.will_topic, session.will_message, session.will_qos)
            await handler.stop()
        except Exception as exc:  # noqa: BLE001 - logged; the session must end all the same
            log.warning("error while ending the connection of client_id=%s: %r", session.client_id, exc)
        finally:  # whatever failed above, the session is no longer connected (or its client id is locked out)
            session.transitions.disconnect()
            self._connected -= 1
        await self.plugins_manager.fire_event(BrokerEvents.CLIENT_DISCONNECTED, client_id=session.client_id,
                                              client_session=session)
        client_id = session.client_id or ""
        if session.clean_session and self.sessions.get(client_id, (None, None))[0] is session:
            await self._cleanup_session(client_id)  # noqa: SLF001 - the amqtt seam: a clean session ends with it

    async def _session_monitor(self) -> None:  # the amqtt seam: no per-second scan of every session
        """Nothing to do: amqtt scanned every session once a second for ended clean sessions (18,000 at a
        time, for a few each second); here a clean session is removed when its connection ends
        (_end_session), and persistent sessions do not expire (no session_expiry_interval is set)."""

    def connected_count(self) -> int:
        """Clients connected right now (kept as they come and go, not counted over every session)."""
        return self._connected

    def _watch_keepalive(self, session: Session, handler: FleetProtocolHandler, reader: GuardedReader) -> None:
        """Drop the connection once nothing was read for 1.5 x keepalive (the keepalive wheel's one timer)."""
        limit = extras(session).keepalive_s
        if limit:
            self._keepalive.watch(handler, reader, limit)

    def _still_serving(self, handler: FleetProtocolHandler) -> bool:
        """True while ``handler`` serves its session's live connection (not ended, not taken over)."""
        session = handler.session
        if session is None or session.transitions.state != "connected":
            return False
        current = self.sessions.get(session.client_id or "")
        return current is not None and current[1] is handler

    def _keepalive_expired(self, session: Session) -> None:
        self.stats["keepalive_expired"] += 1
        log.info("keepalive expired client_id=%s user=%s: closing, will follows", session.client_id, session.username)

    async def shutdown(self) -> None:
        """Close the listeners first, then drop every connection (in its TLS handshake, before CONNECT or in a
        session; no wills: the clients did nothing wrong), then amqtt's shutdown. A client connecting meanwhile
        is dropped at once: none is left connected to a broker that is gone."""
        self._stopping = True
        self._keepalive.stop()
        for server in self._servers.values():
            if server.instance is not None:
                server.instance.close()
        while self._connection_tasks:
            tasks = list(self._connection_tasks)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=STOP_RETRY_S)  # again for any that absorbed its cancellation
        await super().shutdown()

    # --- sessions --------------------------------------------------------------------------------
    async def _delete_session(self, client_id: str) -> None:  # the amqtt seam: clean session
        """A clean session replacing a persistent one also deletes its stored subscriptions and queue."""
        existing = self.sessions.get(client_id)
        if self.store is not None and existing is not None and not existing[0].clean_session:
            self.store.forget_subscription(client_id)
            self.store.forget_queue(client_id)
        await super()._delete_session(client_id)

    def restore_sessions(self, rows: list[tuple[str, str, str, int]]) -> int:
        """Recreate persistent sessions (offline) with their subscriptions, so messages for them are queued
        from the first second after a restart; returns how many sessions. Removed users are skipped."""
        for client_id, username, topic_filter, qos in rows:
            if client_id not in self.sessions:
                record = self.policy.records.get(username)
                if record is None:
                    continue
                machine = machine_from_client_id(record.org or "", client_id) if record.role == "agent" else None
                handler, session = self.create_offline_session(client_id)
                spare_queues(session)
                session.username, session.clean_session = username, False
                extras(session).grant = Grant(Principal(username, record.org, record.role), machine)
                self.sessions[client_id] = (session, handler)
            session = self.sessions[client_id][0]
            grant = grant_of(session)
            if grant is not None and AccessPolicy.may_subscribe(grant, topic_filter):
                self.subscriptions.setdefault(topic_filter, []).append((session, min(qos, MAX_QOS)))
                self.filters_changed()
        return len({row[0] for row in rows if row[0] in self.sessions})

    def restore_queue(self, rows: list[tuple[int, str, str, bytes, int]]) -> int:
        """Put the messages broker.db kept for persistent sessions back in their queues, in order; rows of a
        session that is gone (its user removed) are deleted. Returns how many were restored."""
        restored = 0
        for seq, client_id, topic, payload, qos in rows:
            entry = self.sessions.get(client_id)
            if entry is None or entry[0].clean_session:
                if self.store is not None:
                    self.store.ack(seq)
                continue
            extras(entry[0]).queue.append(QueuedMessage(topic, payload, qos, False, seq))
            restored += 1
        return restored

    def disconnect_revoked(self) -> int:
        """Close live connections whose key was rotated or whose org was removed; returns how many."""
        closed = 0
        for session, handler in list(self.sessions.values()):
            if session.transitions.state != "connected":
                continue
            if not self.policy.still_valid(session.username, session.password, grant_of(session)) \
                    and abort(handler.writer):
                log.info("disconnecting client_id=%s user=%s: credentials revoked", session.client_id,
                         session.username)
                closed += 1
        self.stats["revoked_disconnects"] += closed
        return closed
