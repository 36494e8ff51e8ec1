"""collector.mqtt_codec: MQTT 3.1.1 packets to bytes and back, fuzzed with hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fleet.collector.mqtt_codec import (
    Connack,
    Connect,
    Disconnect,
    MalformedPacket,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    Will,
    decode,
    decode_all,
    encode,
    encode_pubacks,
)

text = st.text(max_size=40)
ids = st.integers(1, 0xFFFF)
qos = st.integers(0, 2)


@st.composite
def publishes(draw) -> Publish:
    level = draw(qos)
    return Publish(draw(st.binary(max_size=40)), draw(st.binary(max_size=300)), level, draw(st.booleans()),
                   draw(ids) if level else 0, draw(st.booleans()) if level else False)


@st.composite
def connects(draw) -> Connect:
    username = draw(st.none() | text)
    password = draw(st.none() | text) if username is not None else None
    will = draw(st.none() | st.builds(Will, text, st.binary(max_size=40), qos, st.booleans()))
    return Connect(draw(text), username, password, draw(st.integers(0, 0xFFFF)), draw(st.booleans()), will)


packets = st.one_of(
    publishes(),
    connects(),
    st.builds(Connack, st.booleans(), st.integers(0, 255)),
    st.builds(Puback, ids),
    st.builds(Subscribe, ids, st.lists(st.tuples(text, qos), min_size=1, max_size=5).map(tuple)),
    st.builds(Suback, ids, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=5).map(tuple)),
    st.builds(Unsubscribe, ids, st.lists(text, min_size=1, max_size=5).map(tuple)),
    st.builds(Unsuback, ids),
    st.just(Pingreq()), st.just(Pingresp()), st.just(Disconnect()),
)


@given(packets)
def test_every_packet_survives_a_round_trip_and_is_incomplete_until_its_last_byte(packet):
    data = encode(packet)
    assert decode(data) == (packet, len(data))
    for cut in range(len(data)):
        assert decode(data[:cut]) is None


@given(st.lists(packets, max_size=8), st.binary(max_size=3))
def test_packets_back_to_back_decode_in_order_from_any_offset(items, prefix):
    stream = prefix + b"".join(encode(p) for p in items)
    got, pos = [], len(prefix)
    while found := decode(bytearray(stream), pos):
        packet, pos = found
        got.append(packet)
    assert got == items
    assert pos == len(stream)


@settings(max_examples=1000)
@given(st.binary(max_size=64))
@example(b"\x40\x00")                      # zero-length PUBACK: malformed, never an IndexError
@example(b"\x90\x02\x00\x01")              # SUBACK without return codes
@example(b"\x30\x80\x00")                  # remaining length not in its shortest form
@example(b"\x30\xff\xff\xff\xff\x01")      # five length bytes
@example(b"\x32\x04\x00\x00\x00\x00")      # QoS 1 with packet id 0
@example(b"\x10\x0c\x00\x04MQTT\x04\x01\x00\x3c\x00\x00")  # CONNECT with the reserved flag
def test_arbitrary_bytes_decode_canonically_or_raise_malformed_packet(data):
    """The fuzz property: no other exception, and whatever is accepted re-encodes to the same bytes."""
    try:
        found = decode(data)
    except MalformedPacket:
        return
    if found is not None:
        packet, end = found
        assert encode(packet) == data[:end]


@settings(max_examples=300)
@given(packets, st.data())
def test_a_corrupted_byte_never_raises_anything_but_malformed_packet(packet, data):
    raw = bytearray(encode(packet))
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] = data.draw(st.integers(0, 255))
    try:
        found = decode(raw)
    except MalformedPacket:
        return
    if found is not None:
        assert encode(found[0]) == bytes(raw[:found[1]])


@pytest.mark.parametrize(("data", "why"), [
    (b"\x40\x00", "malformed PUBACK"),
    (b"\x40\x03\x00\x01\x00", "malformed PUBACK"),
    (b"\x90\x03\x00\x01\x03", "malformed SUBACK"),
    (b"\x32\x03\x00\x01t", "malformed PUBLISH"),
    (b"\x36\x05\x00\x01t\x00\x01", "malformed PUBLISH: QoS 3"),
    (b"\x38\x03\x00\x01t", "malformed PUBLISH: DUP set on QoS 0"),
    (b"\x82\x03\x00\x01\x00", "malformed SUBSCRIBE"),
    (b"\x60\x02\x00\x01", "unsupported packet type 6"),
    (b"\x00\x00", "unsupported packet type 0"),
    (b"\xc1\x00", "reserved flags"),
    (b"\x20\x02\x02\x00", "malformed CONNACK: reserved flag"),
    (b"\xb0\x02\x00\x00", "packet id 0"),
])
def test_malformed_packets_are_named(data, why):
    with pytest.raises(MalformedPacket, match=why):
        decode(data)


def test_variable_length_and_batched_pubacks():
    assert encode(Publish(b"t", b"x" * 197))[:3] == bytes([0x30, 0xC8, 0x01])
    assert encode(Pingreq()) == b"\xc0\x00"
    assert encode_pubacks([1, 0x1234]) == b"\x40\x02\x00\x01\x40\x02\x12\x34"
    assert decode_all(encode_pubacks([1, 2])) == [Puback(1), Puback(2)]
    with pytest.raises(MalformedPacket, match="incomplete"):
        decode_all(b"\x40\x02\x00")


def test_a_packet_is_decoded_from_a_bytearray_as_the_link_buffers_it():
    buf = bytearray(encode(Publish(b"fleet/acme/web-1/report", b"{}", 1, True, 9)) + b"\x40")
    packet, end = decode(buf)
    assert packet == Publish(b"fleet/acme/web-1/report", b"{}", 1, True, 9)
    assert isinstance(packet.topic, bytes)
    assert isinstance(packet.payload, bytes)
    assert decode(buf, end) is None  # a PUBACK's first byte only


def test_invalid_packets_cannot_be_built_and_secrets_stay_out_of_repr():
    with pytest.raises(ValueError, match="packet id"):
        Puback(0)
    with pytest.raises(ValueError, match="QoS 0"):
        Publish(b"t", b"", 0, False, 5)
    with pytest.raises(ValueError, match="password needs a user name"):
        Connect("c", None, "secret")
    assert "hunter2" not in repr(Connect("c", "acme/agent", "hunter2"))
