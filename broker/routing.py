"""Routing and retained messages: the half of FleetBroker that decides who gets a message, and keeps it.

Stock behaviour replaced here (amqtt 0.12.1, broker.py):
- retained messages were re-published on every CONNECT for every filter any client held, without the
  receive rule (~601: a client received another org's retained ping without subscribing); here they go
  out only on SUBSCRIBE, through that subscriber's own filter and the receive rule;
- a PUBLISH to a ``$`` topic made the message loop stop routing that client's messages; here it is
  dropped and counted and the connection keeps working, like a PUBLISH over 64 KiB or not allowed;
- delivery was at the subscription's QoS; here at min(publish QoS, subscription QoS);
- per-session queues (live deliveries in flight, and messages held for an offline persistent session)
  were unbounded; here they are bounded and what they drop is counted; a session has at most
  INFLIGHT_WINDOW messages in flight (stock could run out of packet ids), the rest wait in its queue;
- messages for persistent sessions lived in memory only; here each QoS 1 one is written to broker.db
  before the publisher's PUBACK (broker/store.py) and deleted once the subscriber acknowledges it;
- a QoS 2 subscription was granted QoS 2 and outgoing QoS 2 gave up after 5 s; here subscriptions are
  granted QoS 1 at most (SUBACK 1), so every delivery is tracked until acknowledged;
- queued messages of a persistent session arrived with retain=1; here with retain=0;
- wills and QoS 2 messages went through a broadcast queue without the access rules; here every message
  takes the same checked fan-out.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any, NamedTuple

from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import BrokerConfig
from amqtt.mqtt.constants import QOS_0, QOS_1
from amqtt.session import Session

from fleet.broker.policy import AccessPolicy
from fleet.broker.protocol import FleetProtocolHandler, TrackedMessage
from fleet.broker.sessions import Extras, extras, grant_of
from fleet.broker.store import BrokerStore
from fleet.config.payloads import MAX_PAYLOAD_BYTES
from fleet.config.topics import topic_matches

log = logging.getLogger("fleet.broker")

SUBACK_FAILURE = 0x80
MAX_QOS = 1  # granted to every subscription: deliveries are QoS 0 or tracked QoS 1
INFLIGHT_WINDOW = 10_000  # messages in flight to one connection; below 65,535 packet ids with room to spare
MAX_DROP_LOG_KEYS = 10_000  # one warning per (reason, client); the set of keys logged is bounded too
MAX_ROUTED_TOPICS = 100_000  # topics whose matching filters are remembered; past it, the memo starts afresh


class QueuedMessage(NamedTuple):
    """A message waiting for a session: offline, or behind its in-flight window. ``seq``: its row in broker.db."""

    topic: str
    data: bytes
    qos: int
    retain: bool = False
    seq: int | None = None


class RoutingBroker(Broker):
    """amqtt Broker whose fan-out applies the access rules, min QoS and bounded queues to every message."""

    def __init__(self, config: BrokerConfig, policy: AccessPolicy, max_queued: int, max_queued_service: int,
                 store: BrokerStore | None = None) -> None:
        super().__init__(config)
        self.policy = policy
        self.max_queued = max_queued
        self.max_queued_service = max_queued_service
        self.stats: Counter[str] = Counter()
        self.store = store
        self._drop_logged: set[str] = set()
        # topic -> the subscription filters it matches, for the filters as they were at ``_filters_version``
        self._filters_of: dict[str, tuple[str, ...]] = {}
        self._filters_version = 0
        self._filters_seen: tuple[int, int] = (0, 0)

    # --- routing -------------------------------------------------------------------------------
    def count_drop(self, reason: str, session: Session | None, topic: str) -> None:
        """Count a dropped message by reason; warn once per reason and client."""
        self.stats[f"dropped_{reason}"] += 1
        client_id = session.client_id if session is not None else None
        key = f"{reason}:{client_id}"
        if key not in self._drop_logged and len(self._drop_logged) < MAX_DROP_LOG_KEYS:
            self._drop_logged.add(key)
            log.warning("dropped publish (%s) client_id=%s topic=%.100s", reason, client_id, topic)

    def route(self, session: Session, topic: str, data: bytes, qos: int, retain: bool) -> None:
        """Check a client's PUBLISH and hand it to every allowed subscriber before it is acknowledged."""
        grant = grant_of(session)
        if topic.startswith("$"):
            self.count_drop("dollar_topic", session, topic)
            return
        if "#" in topic or "+" in topic or not topic:
            self.count_drop("invalid_topic", session, topic)
            return
        if grant is None or not self.policy.may_publish(grant, topic, data, retain):
            too_large = grant is not None and len(data) > MAX_PAYLOAD_BYTES
            self.count_drop("too_large" if too_large else "not_allowed", session, topic)
            return
        self.deliver(session, topic, data, qos, retain)

    def deliver(self, source: Session | None, topic: str, data: bytes, qos: int, retain: bool) -> None:
        """Fan a checked message out to matching subscriptions (receive rule, min QoS, bounded queues)."""
        self.stats["routed"] += 1
        if retain:
            self._store_retained(source, topic, data, qos)
        subscriptions_of = self.subscriptions
        for topic_filter in self._matching_filters(topic):
            for target, sub_qos in subscriptions_of.get(topic_filter, ()):
                target_grant = grant_of(target)
                if target_grant is None or not AccessPolicy.may_receive(target_grant, topic):
                    continue
                self.send_to(target, topic, data, min(qos, sub_qos), retain=False)

    def filters_changed(self) -> None:
        """A subscription filter was added or removed: what each topic matches is worked out again."""
        self._filters_version += 1

    def _matching_filters(self, topic: str) -> tuple[str, ...]:
        """The subscription filters ``topic`` matches: worked out once per topic while the filters stay the same
        (every report of a machine goes to the same topic)."""
        seen = (self._filters_version, len(self.subscriptions))
        if seen != self._filters_seen or len(self._filters_of) >= MAX_ROUTED_TOPICS:
            self._filters_of.clear()
            self._filters_seen = seen
        filters = self._filters_of.get(topic)
        if filters is None:
            filters = self._filters_of[topic] = tuple(f for f in self.subscriptions if topic_matches(f, topic))
        return filters

    def queue_limit(self, session: Session) -> int:
        """How many messages a session may have in flight, or held while offline."""
        grant = grant_of(session)
        return self.max_queued_service if grant is not None and grant.role == "service" else self.max_queued

    def send_to(self, target: Session, topic: str, data: bytes, qos: int, retain: bool) -> None:
        """Deliver to a live connection, or hold for an offline persistent session (QoS 1); bounded. A QoS 1
        message for a persistent session is recorded in broker.db until the subscriber acknowledges it."""
        state = extras(target)
        connected = target.transitions.state == "connected"
        persistent = not target.clean_session
        if not connected and not (persistent and qos >= QOS_1):
            return  # nobody to deliver to, and nothing MQTT asks the broker to keep
        if len(target.inflight_out) + len(state.queue) >= self.queue_limit(target):
            self.count_drop("queue_full", target, topic)
            return
        seq = None
        if persistent and qos >= QOS_1 and self.store is not None:
            seq = self.store.append(target.client_id or "", topic, data, qos)
        if connected and not state.queue and self._window_open(target, state):
            self._start_delivery(target, state, topic, data, qos, retain, seq)
        else:
            state.queue.append(QueuedMessage(topic, data, qos, retain, seq))

    def _window_open(self, session: Session, state: Extras) -> bool:
        # In-flight QoS 1 messages include those resent after a reconnect; the bound keeps packet ids free.
        return state.ready and len(session.inflight_out) < INFLIGHT_WINDOW

    def _start_delivery(self, target: Session, state: Extras, topic: str, data: bytes, qos: int, retain: bool,
                        seq: int | None) -> bool:
        handler = self.sessions.get(target.client_id or "", (None, None))[1]
        if not isinstance(handler, FleetProtocolHandler) or not handler.is_open():  # its connection is ending
            state.queue.appendleft(QueuedMessage(topic, data, qos, retain, seq))
            return False
        handler.start_delivery(topic, data, qos, retain, seq)
        return True

    def deliver_queued(self, session: Session) -> None:
        """Send what waits for a connected session, in order, up to its in-flight window (retain=0 for what
        was held while it was offline)."""
        if session.transitions.state != "connected":
            return
        state = extras(session)
        while state.queue and self._window_open(session, state):
            if not self._start_delivery(session, state, *state.queue.popleft()):
                return

    def delivered(self, session: Session, message: TrackedMessage) -> None:
        """The subscriber acknowledged a tracked message: it leaves broker.db, and its window has room again."""
        if self.store is not None:
            self.store.ack(message.seq)
        if extras(session).queue:
            self.deliver_queued(session)

    async def _broadcast_message(self, session: Session | None, topic: str | None,  # the amqtt seam: wills
                                 data: bytes | bytearray | None, force_qos: int | None = None) -> None:
        """Messages the broker itself emits (last wills) go through the same fan-out as client publishes."""
        if topic is None or data is None:
            return
        self.deliver(session, topic, bytes(data), force_qos if force_qos is not None else QOS_0, retain=False)

    # --- retained --------------------------------------------------------------------------------
    def _store_retained(self, source: Session | None, topic: str, data: bytes, qos: int) -> None:
        if data:
            self.retained_messages[topic] = RetainedApplicationMessage(source, topic, data, qos)
        else:
            self.retained_messages.pop(topic, None)
        if self.store is not None:
            self.store.record(topic, data or None, qos)

    async def retain_message(self, source_session: Session | None, topic_name: str | None,
                             data: bytes | bytearray | None, qos: int | None = None) -> None:
        """Every retained change (including a will's) goes through the persisted store."""
        if topic_name is not None:
            self._store_retained(source_session, topic_name, bytes(data or b""), qos or QOS_0)

    def load_retained(self, items: list[tuple[str, bytes, int]]) -> None:
        """Restore retained messages persisted by an earlier run."""
        for topic, data, qos in items:
            self.retained_messages[topic] = RetainedApplicationMessage(None, topic, data, qos)

    # --- subscriptions ---------------------------------------------------------------------------
    async def _handle_subscription(self, client_session: Session, handler: Any,  # the amqtt seam: SUBSCRIBE
                                   subscribe_waiter: Any) -> None:
        """SUBACK every filter (0x80 when refused), then send matching retained messages it may receive."""
        subscriptions = subscribe_waiter.result()
        codes = [await self.add_subscription(sub, client_session) for sub in subscriptions.topics]
        barrier = self.store.barrier() if self.store is not None and not client_session.clean_session else None
        if barrier is not None:  # a persistent session's subscription is on disk before its SUBACK
            await asyncio.shield(barrier.wait())
        await handler.mqtt_acknowledge_subscription(subscriptions.packet_id, codes)
        grant = grant_of(client_session)
        for (topic_filter, _), code in zip(subscriptions.topics, codes, strict=False):
            if code == SUBACK_FAILURE:
                self.stats["subscribe_refused"] += 1
                log.info("refused SUBSCRIBE client_id=%s filter=%.100s", client_session.client_id, topic_filter)
                continue
            for topic, retained in list(self.retained_messages.items()):
                if grant is not None and topic_matches(topic_filter, topic) and AccessPolicy.may_receive(grant, topic):
                    self.send_to(client_session, topic, bytes(retained.data), min(code, retained.qos or QOS_0),
                                 retain=True)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """Stock checks and bookkeeping at QoS 1 at most; a persistent session's subscription is also written
        to disk."""
        code = await super().add_subscription((subscription[0], min(subscription[1], MAX_QOS)), session)
        self.filters_changed()
        if code != SUBACK_FAILURE and not session.clean_session and self.store is not None:
            self.store.record_subscription(session.client_id or "", session.username or "", subscription[0], code)
        return code

    async def _del_all_subscriptions(self, session: Session) -> None:  # the amqtt seam: a session deleted
        """Stock: the session's subscriptions go, and filters nobody holds any more with them."""
        await super()._del_all_subscriptions(session)
        self.filters_changed()

    async def _handle_unsubscription(self, client_session: Session, handler: Any,  # the amqtt seam: UNSUBSCRIBE
                                     unsubscribe_waiter: Any) -> None:
        """Stock UNSUBSCRIBE, and the subscription leaves the disk too."""
        if self.store is not None and not client_session.clean_session:
            for topic_filter in unsubscribe_waiter.result().topics:
                self.store.forget_subscription(client_session.client_id or "", topic_filter)
        await super()._handle_unsubscription(client_session, handler, unsubscribe_waiter)
        self.filters_changed()
