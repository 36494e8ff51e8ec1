"""broker/framing.py: bytes cut into MQTT packets however they arrive, handled at once or by the connection's
task, in order; oversized and malformed input ends the stream; a full queue pauses reading."""

from __future__ import annotations

import asyncio

import pytest
from amqtt.errors import MQTTError
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.broker.framing import MAX_BODY_BYTES, MAX_HELD, GuardedReader
from fleet.config.mqtt import remaining_length

PUBLISH, PUBACK, SUBSCRIBE = 3, 4, 8


def encode(kind: int, flags: int, body: bytes) -> bytes:
    """One packet on the wire."""
    return bytes(((kind << 4) | flags,)) + remaining_length(len(body)) + body


class Transport:
    """What the reader asks of a transport: pause and resume reading."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False


packets = st.lists(st.tuples(st.sampled_from([PUBLISH, PUBACK, SUBSCRIBE]), st.integers(0, 15),
                             st.binary(max_size=300)), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(packets=packets, cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_packets_arrive_whole_and_in_order_however_the_bytes_are_cut(packets, cuts) -> None:
    """PUBLISH and PUBACK are handled as they arrive, SUBSCRIBE by the task; a packet left to the task holds
    back every later one until the task has taken it, so the handled order is the sent order."""
    wire = b"".join(encode(*packet) for packet in packets)
    bounds = sorted({0, len(wire), *(cut % (len(wire) + 1) for cut in cuts)})
    chunks = [wire[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    async def run() -> list[tuple[int, int, bytes]]:
        handled: list[tuple[int, int, bytes]] = []
        reader = GuardedReader()
        reader.connection_made(Transport())  # type: ignore[arg-type]

        def dispatch(kind: int, flags: int, body: bytes) -> bool:
            if kind == SUBSCRIBE:
                return False
            handled.append((kind, flags, body))
            return True

        reader.serve_packets(dispatch)
        for chunk in chunks:
            reader.feed(chunk)
            while reader._held:  # noqa: SLF001 - what the task would take now
                packet = await reader.next_packet()
                assert packet is not None
                handled.append(packet)
        reader.feed_eof()
        assert await reader.next_packet() is None
        return handled

    assert asyncio.run(run()) == packets


def test_connect_is_read_with_read_n_and_what_follows_it_is_served() -> None:
    """amqtt reads CONNECT through read(n); bytes that came with it are the first packets served."""

    async def run() -> None:
        reader = GuardedReader()
        reader.feed(b"\x10\x03abc" + encode(PUBLISH, 2, b"x" * 10)[:5])
        assert await reader.read(1) == b"\x10"
        assert await reader.read(1) == b"\x03"
        assert await reader.read(3) == b"abc"
        served: list[tuple[int, int, bytes]] = []
        reader.serve_packets(lambda *packet: served.append(packet) or True)
        assert served == []
        reader.feed(encode(PUBLISH, 2, b"x" * 10)[5:])
        assert served == [(PUBLISH, 2, b"x" * 10)]

    asyncio.run(run())


def test_read_waits_for_bytes_and_returns_what_is_left_at_eof() -> None:
    async def run() -> None:
        reader = GuardedReader()
        pending = asyncio.ensure_future(reader.read(4))
        await asyncio.sleep(0)
        reader.feed(b"ab")
        await asyncio.sleep(0)
        assert not pending.done()
        reader.feed(b"cdef")
        assert await pending == b"abcd"
        reader.feed_eof()
        assert await reader.read(4) == b"ef"
        assert await reader.read(4) == b""

    asyncio.run(run())


def test_an_oversized_packet_ends_the_stream_before_its_body_is_buffered() -> None:
    async def run() -> None:
        sizes: list[int] = []
        reader = GuardedReader()
        reader.on_oversize = sizes.append
        reader.serve_packets(lambda *packet: True)
        reader.feed(bytes((PUBLISH << 4 | 2,)) + remaining_length(MAX_BODY_BYTES + 1) + b"x" * 100)
        assert sizes == [MAX_BODY_BYTES + 1]
        assert reader.tripped
        assert await reader.next_packet() is None
        reader.feed(encode(PUBACK, 0, b"\x00\x01"))  # the rest of the body is never parsed as packets
        assert await reader.next_packet() is None

    asyncio.run(run())


def test_a_malformed_packet_is_raised_to_the_task_after_the_packets_before_it() -> None:
    async def run() -> None:
        reader = GuardedReader()
        reader.serve_packets(lambda kind, flags, body: kind != SUBSCRIBE)
        reader.feed(encode(SUBSCRIBE, 2, b"s") + b"\x30\xff\xff\xff\xff\x01")  # remaining length in 5 bytes
        assert await reader.next_packet() == (SUBSCRIBE, 2, b"s")
        with pytest.raises(MQTTError):
            await reader.next_packet()

    asyncio.run(run())


def test_an_error_in_dispatch_reaches_the_task() -> None:
    async def run() -> None:
        def dispatch(kind: int, flags: int, body: bytes) -> bool:
            raise UnicodeDecodeError("utf-8", body, 0, 1, "bad topic")

        reader = GuardedReader()
        reader.serve_packets(dispatch)
        reader.feed(encode(PUBLISH, 0, b"\x00\x01\xff"))
        with pytest.raises(UnicodeDecodeError):
            await reader.next_packet()

    asyncio.run(run())


def test_reading_pauses_while_packets_wait_for_the_task_and_resumes_once_it_took_them() -> None:
    async def run() -> None:
        transport = Transport()
        reader = GuardedReader()
        reader.connection_made(transport)  # type: ignore[arg-type]
        reader.serve_packets(lambda *packet: False)
        reader.feed(encode(PUBACK, 0, b"\x00\x01") * (MAX_HELD - 1))
        assert not transport.paused
        reader.feed(encode(PUBACK, 0, b"\x00\x01"))
        assert transport.paused
        for _ in range(MAX_HELD):
            assert await reader.next_packet() == (PUBACK, 0, b"\x00\x01")
        assert not transport.paused

    asyncio.run(run())


def test_a_large_connect_buffered_unread_pauses_reading_until_read() -> None:
    async def run() -> None:
        transport = Transport()
        reader = GuardedReader()
        reader.connection_made(transport)  # type: ignore[arg-type]
        reader.feed(b"x" * (200 * 1024))
        assert transport.paused
        assert len(await reader.read(100 * 1024)) == 100 * 1024
        pending = asyncio.ensure_future(reader.read(150 * 1024))  # more than is here: reading resumes
        await asyncio.sleep(0)
        assert not transport.paused
        reader.feed(b"y" * (50 * 1024))
        assert len(await pending) == 150 * 1024

    asyncio.run(run())
