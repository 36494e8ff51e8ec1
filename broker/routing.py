"""Routing and retained messages: the half of FleetBroker that decides who gets a message, and keeps it.

Stock behaviour replaced here (amqtt 0.12.1, broker.py):
- retained messages were re-published on every CONNECT for every filter any client held, without the
  receive rule (~601: a client received another org's retained ping without subscribing); here they go
  out only on SUBSCRIBE, through that subscriber's own filter and the receive rule;
- a PUBLISH to a ``$`` topic made the message loop stop routing that client's messages; here it is
  dropped and counted and the connection keeps working, like a PUBLISH over 64 KiB or not allowed;
- delivery was at the subscription's QoS; here at min(publish QoS, subscription QoS);
- per-session queues (live deliveries in flight, and messages held for an offline persistent session)
  were unbounded; here they are bounded and what they drop is counted;
- queued messages of a persistent session arrived with retain=1; here with retain=0;
- wills and QoS 2 messages went through a broadcast queue without the access rules; here every message
  takes the same checked fan-out.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import BrokerConfig
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.session import Session

from fleet.broker.policy import AccessPolicy
from fleet.broker.retained import RetainedStore
from fleet.broker.sessions import extras, grant_of
from fleet.config.payloads import MAX_PAYLOAD_BYTES
from fleet.config.topics import topic_matches

log = logging.getLogger("fleet.broker")

SUBACK_FAILURE = 0x80
MAX_DROP_LOG_KEYS = 10_000  # one warning per (reason, client); the set of keys logged is bounded too


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message held for a persistent session while it is offline."""

    topic: str
    data: bytes
    qos: int


class RoutingBroker(Broker):
    """amqtt Broker whose fan-out applies the access rules, min QoS and bounded queues to every message."""

    def __init__(self, config: BrokerConfig, policy: AccessPolicy, max_queued: int, max_queued_service: int,
                 store: RetainedStore | None = None) -> None:
        super().__init__(config)
        self.policy = policy
        self.max_queued = max_queued
        self.max_queued_service = max_queued_service
        self.stats: Counter[str] = Counter()
        self.store = store
        self._delivery_tasks: set[asyncio.Task[Any]] = set()
        self._drop_logged: set[str] = set()

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
        for topic_filter, subscriptions in self.subscriptions.items():
            if not topic_matches(topic_filter, topic):
                continue
            for target, sub_qos in subscriptions:
                target_grant = grant_of(target)
                if target_grant is None or not AccessPolicy.may_receive(target_grant, topic):
                    continue
                self.send_to(target, topic, data, min(qos, sub_qos), retain=False)

    def queue_limit(self, session: Session) -> int:
        """How many messages a session may have in flight, or held while offline."""
        grant = grant_of(session)
        return self.max_queued_service if grant is not None and grant.role == "service" else self.max_queued

    def send_to(self, target: Session, topic: str, data: bytes, qos: int, retain: bool) -> None:
        """Deliver to a live connection, or hold for an offline persistent session (QoS 1/2); bounded."""
        state = extras(target)
        if target.transitions.state == "connected":
            handler = self.sessions.get(target.client_id or "", (None, None))[1]
            if handler is None:
                return
            if state.pending >= self.queue_limit(target):
                self.count_drop("queue_full", target, topic)
                return
            state.pending += 1
            task = asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=retain))
            self._delivery_tasks.add(task)
            task.add_done_callback(lambda t, s=target: self._delivery_done(t, s))
        elif not target.clean_session and qos in (QOS_1, QOS_2):
            if len(state.queue) >= self.queue_limit(target):
                self.count_drop("queue_full", target, topic)
                return
            state.queue.append(QueuedMessage(topic, data, qos))

    def _delivery_done(self, task: asyncio.Task[Any], session: Session) -> None:
        self._delivery_tasks.discard(task)
        extras(session).pending -= 1
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.stats["delivery_failed"] += 1
            log.debug("delivery to %s failed: %r", session.client_id, exc)

    def deliver_queued(self, session: Session) -> None:
        """Deliver what was held while a persistent session was offline (retain=0, in order)."""
        queue = extras(session).queue
        while queue:
            queued = queue.popleft()
            self.send_to(session, queued.topic, queued.data, queued.qos, retain=False)

    async def _broadcast_message(self, session: Session | None, topic: str | None,  # the amqtt seam: wills
                                 data: bytes | bytearray | None, force_qos: int | None = None) -> None:
        """Messages the broker itself emits (last wills) go through the same fan-out as client publishes."""
        if topic is None or data is None:
            return
        self.deliver(session, topic, bytes(data), force_qos if force_qos is not None else QOS_0, retain=False)

    async def _handle_message_delivery(self, client_session: Session, handler: Any,  # the amqtt seam: QoS 2
                                       wait_deliver: Any) -> bool:
        """QoS 2 messages (released by PUBREL) take the same checked route; the connection always survives."""
        message = wait_deliver.result()
        if message is not None and message.topic:
            self.route(client_session, message.topic, bytes(message.data or b""), message.qos or QOS_0,
                       bool(message.publish_packet and message.publish_packet.retain_flag))
        return True

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
        """Stock checks and bookkeeping; a persistent session's subscription is also written to disk."""
        code = await super().add_subscription(subscription, session)
        if code != SUBACK_FAILURE and not session.clean_session and self.store is not None:
            self.store.record_subscription(session.client_id or "", session.username or "", subscription[0], code)
        return code

    async def _handle_unsubscription(self, client_session: Session, handler: Any,  # the amqtt seam: UNSUBSCRIBE
                                     unsubscribe_waiter: Any) -> None:
        """Stock UNSUBSCRIBE, and the subscription leaves the disk too."""
        if self.store is not None and not client_session.clean_session:
            for topic_filter in unsubscribe_waiter.result().topics:
                self.store.forget_subscription(client_session.client_id or "", topic_filter)
        await super()._handle_unsubscription(client_session, handler, unsubscribe_waiter)
