"""Outgoing QoS 1 deliveries of the protocol handler: each one is completed by its PUBACK, however soon it comes."""

from __future__ import annotations

import asyncio
import logging

import pytest
from amqtt.mqtt.packet import PUBACK
from amqtt.plugins.manager import PluginManager
from amqtt.session import Session

from fleet.broker.protocol import FleetProtocolHandler, StreamWriter


class AnsweringClient(StreamWriter):
    """The broker's side of a connection whose client acknowledges each PUBLISH as soon as it is written, while
    the broker's drain() is still waiting for the transport (a full TCP buffer, or amqtt's WebSocket writer,
    which sends inside drain() and lets the loop run meanwhile)."""

    def __init__(self, handler: FleetProtocolHandler) -> None:  # no stream: this stands in for one
        self.handler = handler
        self.is_closed = False
        self.peer = None
        self.acked: list[int] = []

    def write(self, data: bytes) -> None:
        assert data[0] >> 4 == 3, "only PUBLISH goes out here"
        length_bytes = 1
        while data[length_bytes] & 0x80:
            length_bytes += 1
        at = 1 + length_bytes
        at += 2 + int.from_bytes(data[at:at + 2], "big")  # skip the topic
        packet_id = int.from_bytes(data[at:at + 2], "big")
        self.acked.append(packet_id)
        self.handler.packet_received(PUBACK, 0, packet_id.to_bytes(2, "big"))  # before write() returns

    async def drain(self) -> None:
        await asyncio.sleep(0)

    async def close(self) -> None:
        self.is_closed = True


async def _deliver_with_instant_acks() -> tuple[bool, int, list[int]]:
    handler = FleetProtocolHandler(PluginManager("fleet.tests.no_plugins", None))
    session = Session()
    session.client_id = "collector"
    client = AnsweringClient(handler)
    handler.attach(session, None, client)  # type: ignore[arg-type] - serve() is not run: no reader
    delivered = []
    handler.on_delivered = lambda _session, message: delivered.append(message.packet_id)
    for i in range(5):
        handler.start_delivery(f"fleet/acme/m{i}/report", b"{}", 1, False, None)
    return not session.inflight_out, len(delivered), client.acked


# amqtt's PluginManager warns from inside an asyncio callback, so pyproject's amqtt-module filter misses it.
@pytest.mark.filterwarnings("ignore:Loading plugins from EntryPoints:DeprecationWarning")
def test_a_puback_that_comes_before_the_write_returns_completes_the_delivery(caplog):
    """amqtt's flow registered the PUBACK waiter only after awaiting the write: an acknowledgement arriving
    meanwhile was logged as "Received PUBACK for unknown pending message" and the delivery then waited for
    ever, its message stuck in flight."""
    caplog.set_level(logging.WARNING)
    completed, delivered, acked = asyncio.run(_deliver_with_instant_acks())
    assert len(acked) == 5
    assert completed, "a delivery is still waiting for a PUBACK the client already sent"
    assert delivered == 5
    assert not [r for r in caplog.records if "unknown pending" in r.getMessage()]
