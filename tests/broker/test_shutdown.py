"""Stopping the broker: the listeners close first, then every connection, whatever state it is in; no client
is left connected to a broker that is gone."""

from __future__ import annotations

import ssl
import threading
import time

from fleet.broker.server import start_in_thread
from fleet.collector.mqtt_codec import Connect, encode
from fleet.config.settings import Settings
from fleet.store import credentials
from tests import stores
from tests.helpers import tls_socket, wait_for


def _closed_by_peer(sock: ssl.SSLSocket) -> bool:
    """True once the broker has closed ``sock`` (EOF or reset); False if it is still open and silent."""
    sock.settimeout(0.2)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


def test_clients_connecting_while_the_broker_stops_are_all_disconnected(fleet_dir, acme):
    """The collector reconnected while the embedded broker shut down and sat connected to a dead broker until
    its keepalive expired: handshakes in progress went on after the listener closed, and a CONNECT read as
    the stop cancelled the connection (3.11's wait_for swallows that cancellation) went on into a session
    that nothing closed; the stop itself then waited 30 s for it."""
    broker = start_in_thread(Settings(data_dir=fleet_dir, mqtt_port=0))
    service_key = stores.ensure_service_key(fleet_dir)
    opened: list[ssl.SSLSocket] = []
    lock = threading.Lock()
    done = threading.Event()

    def connect_in_a_loop(worker: int) -> None:
        for i in range(10_000):
            if done.is_set():
                return
            try:
                sock = tls_socket(broker)
                sock.sendall(encode(Connect(f"collector-{worker}-{i}", credentials.SERVICE_USERNAME, service_key)))
            except OSError:  # refused once the listener is closed, or dropped mid-handshake
                continue
            with lock:
                opened.append(sock)

    workers = [threading.Thread(target=connect_in_a_loop, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: broker.broker.connected_count() >= 50, timeout=10, message="clients connected")
        started = time.monotonic()
        broker.stop()
        stopped_in = time.monotonic() - started
    finally:
        done.set()
        for worker in workers:
            worker.join()
    still_open = [sock for sock in opened if not _closed_by_peer(sock)]
    for sock in opened:
        sock.close()
    assert not still_open, f"{len(still_open)} of {len(opened)} connections left open by the stop"
    assert stopped_in < 10, f"the stop took {stopped_in:.1f} s"
