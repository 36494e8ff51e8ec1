"""Connections that end before CONNECT (health checks, port probes, ``openssl s_client``, a stop while a
client is half-way in) are routine: they leave at most one DEBUG line each, never a warning or a traceback."""

from __future__ import annotations

import gc
import logging
import socket
import struct

import pytest

from fleet.broker.server import start_in_thread
from fleet.config.settings import Settings
from tests.helpers import close, connect_client, free_port, tls_socket, wait_for

BROKER_LOGGERS = ("fleet.broker", "amqtt", "asyncio", "transitions")


@pytest.fixture
def quiet_broker(fleet_dir, acme, caplog):
    caplog.set_level(logging.DEBUG)
    running = start_in_thread(Settings(data_dir=fleet_dir, mqtt_port=0, mqtt_plain_port=free_port(),
                                       reload_interval_s=0.5))
    close(connect_client(running, "acme/reader", acme.reader_key, "warm-up"))  # start-up lines are logged by now
    wait_for(lambda: running.broker.connected_count() == 0, timeout=5, message="warm-up client gone")
    yield running
    running.stop()


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN, as a killed process or a load balancer probe does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _broker_records(caplog) -> list[logging.LogRecord]:
    """The broker's records about connections without a session (the warm-up client's are its own)."""
    return [r for r in caplog.records if r.name.split(".")[0] in {n.split(".")[0] for n in BROKER_LOGGERS}
            and not hasattr(r, "client_id") and "warm-up" not in r.getMessage()
            and not r.getMessage().startswith(("connected client_id=", "broker listening", "broker stopped"))]


def _assert_quiet(caplog, connections: int) -> None:
    records = _broker_records(caplog)
    loud = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in records if r.levelno > logging.DEBUG]
    assert not loud, loud
    assert not [r for r in records if r.exc_info], "a traceback was logged"
    assert len(records) <= connections, [r.getMessage() for r in records]


def _handled(broker, invalid: int) -> None:
    wait_for(lambda: broker.stats().get("connect_invalid", 0) >= invalid, timeout=5,
             message=f"{invalid} connections counted as closed before CONNECT")


def test_tcp_connect_and_close_leaves_at_most_one_debug_line(quiet_broker, caplog):
    caplog.clear()
    # To the TLS port without a handshake first: asyncio ends it before the broker sees a connection, and
    # the two counted probes after it bound the wait.
    socket.create_connection(("127.0.0.1", quiet_broker.port), timeout=5).close()
    socket.create_connection(("127.0.0.1", quiet_broker.plain_port), timeout=5).close()
    _reset(socket.create_connection(("127.0.0.1", quiet_broker.plain_port), timeout=5))
    _handled(quiet_broker, invalid=2)
    _assert_quiet(caplog, connections=3)


def test_tls_handshake_and_close_leaves_at_most_one_debug_line(quiet_broker, caplog):
    caplog.clear()
    tls_socket(quiet_broker).close()
    _reset(tls_socket(quiet_broker))
    _handled(quiet_broker, invalid=2)
    _assert_quiet(caplog, connections=2)


def test_plain_listener_speaks_plain_mqtt(quiet_broker, acme):
    """It used to inherit TLS from amqtt's ``default`` listener (the probes above would not count)."""
    url = f"mqtt://127.0.0.1:{quiet_broker.plain_port}"
    close(connect_client(quiet_broker, "acme/reader", acme.reader_key, "plain-reader", url=url))
    assert connect_client(quiet_broker, "acme/reader", "wrong", "plain-reader", url=url, expect_rc=1) == 5


def test_stopping_with_half_open_connections_is_quiet(fleet_dir, acme, caplog):
    """Ctrl-C of ``fleet up``: one client is past TLS but has not sent CONNECT, another is mid-handshake."""
    caplog.set_level(logging.DEBUG)
    broker = start_in_thread(Settings(data_dir=fleet_dir, mqtt_port=0, reload_interval_s=0.5))
    half_open = tls_socket(broker)
    mid_handshake = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
    client = connect_client(broker, "acme/reader", acme.reader_key, "live")
    wait_for(lambda: broker.stats().get("connections", 0) >= 2, timeout=5, message="both TLS connections accepted")
    caplog.clear()
    broker.stop()
    gc.collect()  # asyncio reports a task destroyed while pending when it is collected
    client.loop_stop()
    half_open.close()
    mid_handshake.close()
    records = _broker_records(caplog)
    loud = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in records if r.levelno >= logging.WARNING]
    assert not loud, loud
    assert not [r for r in records if r.exc_info], "a traceback was logged"
