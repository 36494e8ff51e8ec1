"""The broker's event loop lets events gather after each wake-up, but never delays work that is ready or a
timer (broker/pacing.py)."""

from __future__ import annotations

import asyncio
import selectors
import socket
import time
from collections.abc import Iterator

import pytest

from fleet.broker.pacing import RUSH_STREAK, CoalescingSelector, coalescing_loop


@pytest.fixture
def readable() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A socket pair whose first end has a byte to read."""
    a, b = socket.socketpair()
    b.send(b"x")
    yield a, b
    a.close()
    b.close()


def test_a_wait_starts_no_sooner_than_coalesce_after_the_last_wake_up(readable):
    selector = CoalescingSelector(0.2)
    selector.register(readable[0], selectors.EVENT_READ)
    assert selector.select(None), "the first poll does not wait"
    woke = time.monotonic()
    assert selector.select(5.0), "the byte is still there to read"
    assert time.monotonic() - woke >= 0.19
    selector.close()


def test_a_poll_that_must_not_block_does_not_wait(readable):
    selector = CoalescingSelector(60.0)
    selector.register(readable[0], selectors.EVENT_READ)
    assert selector.select(None)
    started = time.monotonic()
    assert selector.select(0), "ready callbacks: the loop polls without waiting"
    assert time.monotonic() - started < 30
    selector.close()


def test_the_wait_ends_at_the_loops_next_timer():
    """A coalescing window of a minute delays no timer: the loop's timeout bounds the wait."""
    loop = coalescing_loop(60_000)()

    async def timer_fires() -> float:
        started = time.monotonic()
        await asyncio.sleep(0)  # one wake-up first, so that the next poll would gather
        fired = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, fired.set_result, None)
        await asyncio.wait_for(fired, 20)
        return time.monotonic() - started

    try:
        assert loop.run_until_complete(timer_fires()) < 20
    finally:
        loop.close()


def test_bytes_from_another_thread_arrive_through_a_coalescing_loop():
    """A socket's bytes reach its reader while the loop coalesces (the wait is bounded by the window)."""
    loop = coalescing_loop(50)()
    a, b = socket.socketpair()

    async def echo() -> bytes:
        reader, writer = await asyncio.open_connection(sock=a)
        await asyncio.to_thread(b.sendall, b"ping\n")
        line = await asyncio.wait_for(reader.readline(), 20)
        writer.close()
        return line

    try:
        assert loop.run_until_complete(echo()) == b"ping\n"
    finally:
        loop.close()
        b.close()


def test_a_client_waiting_on_the_broker_stops_the_gathering(readable):
    """Three PUBLISHes in a row, each just after the broker's answer: the next poll does not wait."""
    selector = CoalescingSelector(60.0)
    selector.register(readable[0], selectors.EVENT_READ)
    assert selector.select(None)
    streak = 0
    for expected in range(1, RUSH_STREAK + 1):
        streak = selector.answered(time.monotonic(), streak)
        assert streak == expected
    started = time.monotonic()
    assert selector.select(None)
    assert time.monotonic() - started < 30
    assert selector.gathered == 0
    selector.close()


@pytest.mark.parametrize(("answered_ago", "streak"), [
    (10.0, RUSH_STREAK),  # an agent's next report, ten seconds after its last PUBACK, ends any streak
    (0.0, 0),  # one PUBLISH just after an answer (an agent's ping after its report's PUBACK) is no streak
])
def test_a_client_that_does_not_keep_answering_does_not(readable, answered_ago, streak):
    selector = CoalescingSelector(0.2)
    selector.register(readable[0], selectors.EVENT_READ)
    assert selector.select(None)
    woke = time.monotonic()
    assert selector.answered(woke - answered_ago, streak) == (0 if answered_ago else 1)
    assert selector.select(5.0)
    assert time.monotonic() - woke >= 0.19
    assert selector.gathered == 1
    selector.close()
