"""collector.mqtt_link: the collector's own MQTT connection, on real brokers and against a misbehaving one."""

from __future__ import annotations

import queue
import socket
import threading

import pytest

from fleet.collector.mqtt_codec import Connack, Connect, Pingreq, Puback, Publish, decode, encode
from fleet.collector.mqtt_link import LinkCallbacks, MqttLink
from fleet.config.mqtt import BrokerAddress
from tests.helpers import descriptors_held, free_port, wait_for

TOPIC = "fleet/acme/web-1/report"


class Recorder:
    """Collects what a link reports through its callbacks."""

    def __init__(self) -> None:
        self.messages: queue.Queue = queue.Queue()
        self.connects: list[bool] = []
        self.disconnects: list[str] = []
        self.subacks: list[list[int]] = []

    def callbacks(self, link_ref: list) -> LinkCallbacks:
        def on_connect(session_present: bool) -> None:
            self.connects.append(session_present)
            link_ref[0].subscribe([(TOPIC, 1)])

        return LinkCallbacks(on_connect, self.disconnects.append,
                             lambda topic, payload, retained, token: self.messages.put((topic, payload, token)),
                             self.subacks.append, lambda: None)

    def take(self, n: int, timeout: float = 10.0) -> list[tuple[bytes, bytes, int]]:
        return [self.messages.get(timeout=timeout) for _ in range(n)]


def open_link(endpoint, client_id: str, recorder: Recorder, wait_suback: bool = True) -> MqttLink:
    username, key = endpoint.user("service")
    ref: list = [None]
    link = MqttLink(BrokerAddress.parse(endpoint.url), client_id, username, key, endpoint.ca, 30,
                    recorder.callbacks(ref), min_delay=0.05, max_delay=0.2)
    ref[0] = link
    link.start()
    if wait_suback:
        wait_for(lambda: recorder.subacks, 10, "SUBACK")
    return link


def publish(endpoint, payloads: list[bytes]) -> None:
    client = endpoint.client("fleet-acme-web-1", "agent")
    try:
        infos = [client.publish(TOPIC, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_receives_in_bulk_and_what_is_not_acknowledged_comes_back(endpoint):
    recorder = Recorder()
    link = open_link(endpoint, "fleet.collector-linktest", recorder)
    assert recorder.subacks == [[1]]
    sent = [f'{{"n":{i}}}'.encode() for i in range(2000)]
    publish(endpoint, sent)
    got = []
    while len(got) < 1990:  # acknowledged as they come, as the collector does: brokers stop at their window
        batch = recorder.take(min(10, 1990 - len(got)))
        link.ack(token for _, _, token in batch)
        got += batch
    got += recorder.take(10)  # these ten stay unacknowledged
    assert [payload for _, payload, _ in got] == sent  # in order, nothing lost
    assert {topic for topic, _, _ in got} == {TOPIC.encode()}
    link.stop()

    again = Recorder()
    # No waiting for the SUBACK here: the embedded broker answers it only once the messages it resends
    # on reconnecting are acknowledged.
    link = open_link(endpoint, "fleet.collector-linktest", again, wait_suback=False)
    try:
        redelivered = again.take(10)
        assert again.connects == [True]  # the persistent session was kept
        while redelivered[-1][1] != sent[-1]:
            # At least once: a broker may also resend acknowledged messages it had not processed the PUBACK
            # of when we disconnected (the embedded broker does); the collector's unique key dedupes them.
            redelivered += again.take(1)
        assert [payload for _, payload, _ in redelivered[-10:]] == sent[1990:]
        link.ack(token for _, _, token in redelivered)
    finally:
        link.stop()
    assert again.messages.empty()


def test_works_when_its_socket_is_numbered_past_1024(endpoint):
    recorder = Recorder()
    with descriptors_held():  # only while the link connects: its socket keeps its high number
        link = open_link(endpoint, "fleet.collector-manyfds", recorder)
    try:
        publish(endpoint, [b'{"n":1}'])  # paho's own loop uses select(), so the publisher connects after
        ((_, payload, token),) = recorder.take(1)
        assert payload == b'{"n":1}'
        link.ack([token])
        assert recorder.disconnects == []
    finally:
        link.stop()


def test_acks_of_an_older_connection_are_not_sent_on_a_new_one(endpoint):
    recorder = Recorder()
    link = open_link(endpoint, "fleet.collector-linkgen", recorder)
    try:
        publish(endpoint, [b'{"n":1}'])
        (_, _, old_token), = recorder.take(1)
        endpoint.stop()
        wait_for(lambda: recorder.disconnects, 10, "the link to notice")
        endpoint.restart()
        wait_for(lambda: len(recorder.connects) == 2, 15, "reconnect")
        link.ack([old_token])  # ignored: the id belongs to the previous connection
        assert old_token >> 16 != link._generation  # noqa: SLF001 - the link's own bookkeeping
        assert not link._out  # noqa: SLF001
    finally:
        link.stop()


def test_own_publish_waits_for_the_broker_and_is_delivered_after_a_reconnect(endpoint):
    got: queue.Queue = queue.Queue()
    reader = endpoint.client("reader-linktest", "reader",
                             on_message=lambda c, u, m: got.put((m.topic, m.payload, m.retain)))
    reader.subscribe("fleet/acme/+/ping", qos=1)
    recorder = Recorder()
    link = open_link(endpoint, "fleet.collector-linkpub", recorder)
    try:
        link.publish("fleet/acme/gone/ping", b"", retain=True)
        assert got.get(timeout=10) == ("fleet/acme/gone/ping", b"", False)
        wait_for(lambda: not link._inflight, 10, "PUBACK of our publish")  # noqa: SLF001
    finally:
        link.stop()
        reader.disconnect()
        reader.loop_stop()


class FakeBroker:
    """A TCP server that answers CONNECT with ``connack`` and then sends ``after`` (or nothing).

    ``packets`` holds what the link sent, decoded (CONNECT, PINGREQ, SUBSCRIBE, PUBACK...).
    """

    def __init__(self, connack: bytes = encode(Connack()), after: bytes = b"") -> None:
        self.sock = socket.create_server(("127.0.0.1", free_port()))
        self.port = self.sock.getsockname()[1]
        self.connack = connack
        self.after = after
        self.connections = 0
        self.packets: list = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            buf = bytearray()
            with conn:
                conn.settimeout(5)
                try:
                    while chunk := conn.recv(4096):
                        buf += chunk
                        while found := decode(buf):
                            packet, used = found
                            del buf[:used]
                            self.packets.append(packet)
                            if isinstance(packet, Connect):
                                conn.sendall(self.connack + self.after)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def fake_link(port: int, recorder: Recorder, keepalive: int = 30) -> MqttLink:
    ref: list = [None]
    link = MqttLink(BrokerAddress.parse(f"mqtt://127.0.0.1:{port}"), "fleet.collector-fake", "fleet-service", "k",
                    None, keepalive, recorder.callbacks(ref), min_delay=0.05, max_delay=0.1)
    ref[0] = link
    link.start()
    return link


GOOD = encode(Publish(TOPIC.encode(), b"{}", 1, False, 7))


@pytest.mark.parametrize(("after", "why"), [
    (encode(Publish(b"t", b"", 2, False, 1)), "QoS 2"),     # QoS 2 on a QoS 1 subscription
    (b"\x30\xff\xff\xff\xff\x01", "remaining length"),           # a fifth length byte
    (b"\x30\x03\x00\x09t", "malformed PUBLISH"),                 # topic longer than the packet
    (encode(Connack()), "unexpected packet"),                    # a second CONNACK
    # Each of these is malformed: the network thread must neither raise IndexError nor take it at face value
    (GOOD + b"\x40\x00", "malformed PUBACK"),                   # zero-length PUBACK at the end of a buffer
    (b"\x40\x01\x00", "malformed PUBACK"),                      # one-byte PUBACK
    (b"\x90\x02\x00\x01", "malformed SUBACK"),                  # SUBACK without a return code
    (b"\x90\x01\x00", "malformed SUBACK"),                      # SUBACK without a packet id
    (b"\xd0\x01\x00", "malformed PINGRESP"),                    # PINGRESP with a body
    (b"\x32\x01\x00", "malformed PUBLISH"),                      # PUBLISH too short for its topic length
    (b"\x32\x03\x00\x01t", "malformed PUBLISH"),                # QoS 1 PUBLISH without a packet id
    (b"\x42\x02\x00\x01", "malformed PUBACK"),                  # reserved flags set
    (b"\x50\x02\x00\x01", "unsupported packet type"),           # PUBREC: no QoS 2 here
])
def test_a_broker_breaking_the_protocol_is_one_link_error_and_a_reconnect(after, why):
    fake = FakeBroker(after=after)
    recorder = Recorder()
    link = fake_link(fake.port, recorder)
    try:
        wait_for(lambda: fake.connections >= 3, 10, "reconnects after the protocol error")
        assert recorder.disconnects, "the link never reported losing the connection"
        assert all(why in d for d in recorder.disconnects[:2]), recorder.disconnects
    finally:
        link.stop()
        fake.close()
    # What came before the bad packet is not acknowledged: the broker sends it again.
    assert Puback(7) not in fake.packets
    assert fake.connections < 60  # backoff up to 0.1 s between attempts, not a tight loop


def test_refused_credentials_are_retried_with_backoff_not_in_a_tight_loop(caplog):
    fake = FakeBroker(connack=b"\x20\x02\x00\x05")
    recorder = Recorder()
    link = fake_link(fake.port, recorder)
    try:
        wait_for(lambda: fake.connections >= 3, 10, "retries")
        assert recorder.connects == []
        assert "not authorized" in caplog.text
    finally:
        link.stop()
        fake.close()
    assert fake.connections < 60  # backoff up to 0.1 s between attempts, not thousands per second


def test_a_silent_broker_is_detected_by_keepalive():
    fake = FakeBroker()  # accepts, answers CONNACK, then never answers PINGREQ
    recorder = Recorder()
    link = fake_link(fake.port, recorder, keepalive=1)
    try:
        wait_for(lambda: any("PINGRESP" in d for d in recorder.disconnects), 10, "keepalive to expire")
        assert Pingreq() in fake.packets  # it did ask
    finally:
        link.stop()
        fake.close()

