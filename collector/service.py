"""The running collector: MQTT subscriptions per org, a bounded queue, one writer thread owning state and the database.

Threads, each with its own object:
- the MQTT link's network thread (collector.mqtt_link) runs ``RunningCollector``'s callbacks: it validates each
  message (collector.intake) and puts it on the hand-off (collector.handoff), a bounded queue. When the queue is
  full it blocks there. That is the backpressure: nothing is acknowledged before it is committed, so a slow
  database slows the broker's delivery to us (the broker queues for our persistent session) instead of us
  dropping messages.
- the writer thread (collector.writer) takes batches from the hand-off, applies the state machine
  (collector.state), and stores each batch in one transaction (collector.history); it also runs the timers:
  stale/TTL checks, heartbeat, org refresh and history retention.
What else they share is in collector.shared: the link's state, the orgs served, the writer's counts.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
import time

from fleet.collector.alerts.delivery import DeliveryWorker
from fleet.collector.alerts.engine import AlertEngine
from fleet.collector.errors import CollectorError
from fleet.collector.handoff import Handoff
from fleet.collector.intake import INTERNAL, DropCounter, RateLimiter, parse_message
from fleet.collector.mqtt_link import LinkCallbacks, MqttLink
from fleet.collector.shared import CollectorStats, LinkState, ServedOrgs, WriteCounts
from fleet.collector.state import Machine, Tracker
from fleet.collector.writer import WriterPeers, WriterThread
from fleet.config import payloads
from fleet.config.errors import ConfigError
from fleet.config.mqtt import BrokerAddress
from fleet.config.settings import Settings
from fleet.config.topics import KINDS, every_org_filter, org_kind_filter
from fleet.store import credentials
from fleet.store.database import open_database
from fleet.store.errors import StoreError
from fleet.store.orgs import list_orgs

log = logging.getLogger("fleet.collector")

QUEUE_MAX = 20_000
KEEPALIVE_S = 30
SUBSCRIBE_CHUNK = 64


def client_id_for(orgs: tuple[str, ...]) -> str:
    """The collector's fixed MQTT client id for a shard (same shard, same persistent session).

    It starts with ``fleet.`` rather than ``fleet-``: agent ids are ``fleet-<org>-<machine>``, so no agent
    of an org named ``collector`` can ever take over the collector's session.
    """
    shard = ",".join(sorted(set(orgs))) or "*"
    return "fleet.collector-" + hashlib.sha256(shard.encode()).hexdigest()[:12]


class RunningCollector:
    """A collector running in background threads; ``stop()`` flushes every pending write."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address = BrokerAddress.parse(settings.collector_broker_url)
        self.client_id = client_id_for(settings.orgs)
        self.drops = DropCounter()
        self.limiter = RateLimiter(settings.agent_rate_limit_per_s)
        # The writer thread's; other threads only read it (stats() counts its machines).
        self.tracker = Tracker(settings.stale_factor, settings.interval, settings.ttl_seconds, settings.lost_grace_s)
        self.handoff = Handoff(QUEUE_MAX, settings.batch_max)
        self.link_state = LinkState()
        self.orgs = ServedOrgs(settings.orgs)
        self.counts = WriteCounts()
        self.alerts = AlertEngine(self.tracker, settings.alert_group_wait, self.blind)
        self.delivery = DeliveryWorker(settings, self.orgs.get)
        self._received = 0  # counted by the network thread
        self._stopping = threading.Event()
        self._link: MqttLink | None = None
        self._writer: WriterThread | None = None

    # --- public -------------------------------------------------------------------------------
    def start(self) -> RunningCollector:
        """Open the database, restore state, connect and subscribe; returns once the writer is ready."""
        try:
            with open_database(self.settings.database) as db:
                key = credentials.ensure_service_key(db, self.settings.data_dir)
                self.orgs.replace(self.orgs.wanted(list_orgs(db)))
            # PUBACK only once a message is committed (or dropped): a killed collector loses nothing, the
            # broker redelivers what was never acknowledged and the (machine, session, seq) key dedupes it.
            link = MqttLink(self.address, self.client_id, credentials.SERVICE_USERNAME, key, self.settings.ca_path,
                            KEEPALIVE_S, LinkCallbacks(self._on_connect, self._on_disconnect, self._on_message,
                                                       self._on_suback, self.handoff.nudge))
        except (ConfigError, StoreError, OSError) as exc:
            raise CollectorError(f"cannot start the collector: {exc}") from exc
        self._link = link
        peers = WriterPeers(self.handoff, link, self.link_state, self.orgs, self.counts, self.drops, self.stats,
                            self.delivery.wake)
        self._writer = WriterThread(self.settings, self.client_id, self.tracker, self.alerts, peers)
        self._writer.start()
        self.delivery.start()
        link.start()
        log.info("collector %s connecting to %s for orgs %s", self.client_id, self.address.url,
                 ", ".join(sorted(self.orgs.get())) or "(none yet)")
        return self

    def wait_subscribed(self, timeout: float) -> bool:
        """Block until connected and subscribed once (True), or ``timeout`` seconds (False)."""
        return self.link_state.wait_subscribed(timeout)

    def stats(self) -> CollectorStats:
        """Current counters."""
        return CollectorStats(self.link_state.is_connected(), tuple(sorted(self.orgs.get())), self._received,
                              self.counts.stored, self.drops.totals(), len(self.handoff), len(self.tracker.machines),
                              self.counts.commits)

    def stop(self, timeout: float = 30.0) -> None:
        """Disconnect (the broker keeps our session and queues for it), write everything pending, stop."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        link = self._link
        if link is not None:
            link.stop()
        self.handoff.close()
        writer = self._writer
        if writer is not None and writer.is_alive():
            writer.join(timeout)
        self.delivery.stop()
        self.link_state.mark_disconnected()
        log.info("collector stopped: received %d, stored %d, dropped %s", self._received, self.counts.stored,
                 self.drops.totals() or "none")

    def subscriptions(self) -> list[tuple[str, int]]:
        """What the collector subscribes to, fixed for its lifetime so that no org waits for a subscription.

        An agent may publish as soon as its org's credentials are valid, and a broker drops what nobody is
        subscribed to, so the filters do not follow the org list: without a shard, every org by wildcard
        (messages of orgs that do not exist are counted as ``unknown_org``); a shard, its orgs by name,
        whether they exist yet or not.
        """
        if self.settings.orgs:
            return [(org_kind_filter(org, kind), 1) for org in sorted(set(self.settings.orgs)) for kind in KINDS]
        return [(every_org_filter(kind), 1) for kind in KINDS]

    def blind(self, machine: Machine, now: float) -> bool:
        """True while the collector cannot tell the machine's status: disconnected, or within its stale_after of
        connecting (the backlog and fresh pings are still arriving). Status alerts do not fire meanwhile."""
        since = self.link_state.connected_since
        return since is None or now - since < self.tracker.stale_after(machine)

    # --- link callbacks (network thread: never block on anything but the bounded queue) ---------
    def _subscribe(self) -> None:
        link = self._link
        if link is None:
            return
        filters = self.subscriptions()
        for i in range(0, len(filters), SUBSCRIBE_CHUNK):
            link.subscribe(filters[i:i + SUBSCRIBE_CHUNK])

    def _on_connect(self, session_present: bool) -> None:
        self.link_state.mark_connected(time.time())
        log.info("collector connected to %s (session present: %s)", self.address.url, session_present)
        self._subscribe()

    def _on_disconnect(self, why: str) -> None:
        was = self.link_state.mark_disconnected()
        if was and not self._stopping.is_set():
            log.warning("collector lost the broker %s (%s); reconnecting", self.address.url, why)

    def _on_suback(self, codes: list[int]) -> None:
        refused = [code for code in codes if code >= 0x80]
        if refused:
            log.error("broker refused %d collector subscription(s)", len(refused))
        self.link_state.mark_subscribed()

    def _on_message(self, topic_bytes: bytes, payload: bytes, retained: bool, token: int) -> None:
        self._received += 1
        link = self._link
        assert link is not None  # the link calls back only once start() has made it
        try:
            topic = topic_bytes.decode("utf-8")
        except UnicodeDecodeError:
            self.drops.add(payloads.BAD_TOPIC, repr(topic_bytes[:100]), "topic is not UTF-8")
            link.ack((token,))
            return
        item = parse_message(topic, payload, retained, time.time(), self.limiter, self.drops)
        if item is None:
            link.ack((token,))  # nothing to store: counted, acknowledge now
            return
        if not self.handoff.put(item, token):  # the writer is gone (a bug, logged): never acknowledged
            self.drops.add(INTERNAL, f"fleet/{item.message.org}/{item.message.machine_id}", "writer is not running")


def start(settings: Settings) -> RunningCollector:
    """Start a collector in background threads (for ``fleet up``); call ``.stop()`` to end it."""
    return RunningCollector(settings).start()


def serve(settings: Settings) -> None:
    """``fleet collector``: run until SIGINT/SIGTERM, then stop cleanly, flushing pending writes."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    collector = start(settings)
    try:
        stop.wait()
    finally:
        collector.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
