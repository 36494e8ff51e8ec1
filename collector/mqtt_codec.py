"""MQTT 3.1.1 packets as values: frozen packet types, ``encode`` to bytes and ``decode`` from a buffer.

Pure functions, no sockets: the collector's link (collector.mqtt_link) owns the connection, the tests
and ``bench/`` build and read packets with the same code. Decoding is strict and canonical: whatever
``decode`` accepts, ``encode`` turns back into exactly the same bytes, and anything else (a length that
overruns its packet, reserved flags, a non-minimal length, invalid UTF-8 in a string, a packet type
this codec does not speak) raises ``MalformedPacket``, never an IndexError or ValueError.

Only the packets a QoS 0/1 client and its broker exchange are supported (no QoS 2 flow: PUBREC,
PUBREL and PUBCOMP are malformed here, as are MQTT 5 properties).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fleet.collector.errors import CollectorError
from fleet.config.mqtt import remaining_length

PROTOCOL_NAME = "MQTT"
PROTOCOL_LEVEL = 4  # MQTT 3.1.1
SUBACK_CODES = frozenset((0, 1, 2, 0x80))

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
PACKET_NAMES = {CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK",
                SUBSCRIBE: "SUBSCRIBE", SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE", UNSUBACK: "UNSUBACK",
                PINGREQ: "PINGREQ", PINGRESP: "PINGRESP", DISCONNECT: "DISCONNECT"}

_U16 = struct.Struct("!H")
_PUBACK = struct.Struct("!BBH")
_new = object.__new__
_setattr = object.__setattr__


class MalformedPacket(CollectorError):
    """Bytes that are not a valid MQTT 3.1.1 packet of a supported type."""


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _check_id(packet_id: int) -> None:
    _check(0 < packet_id <= 0xFFFF, f"packet id {packet_id} out of range 1-65535")


# --- packet types ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Will:
    """A CONNECT's last will."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False

    def __post_init__(self) -> None:
        _check(self.qos in (0, 1, 2), f"will QoS {self.qos} not 0-2")


@dataclass(frozen=True)
class Connect:
    """CONNECT (client to broker)."""

    client_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive: int = 60
    clean_session: bool = True
    will: Will | None = None

    def __post_init__(self) -> None:
        _check(0 <= self.keepalive <= 0xFFFF, f"keepalive {self.keepalive} out of range")
        _check(self.password is None or self.username is not None, "a password needs a user name in MQTT 3.1.1")


@dataclass(frozen=True)
class Connack:
    """CONNACK: ``return_code`` 0 accepts, anything else refuses (see config.connack)."""

    session_present: bool = False
    return_code: int = 0

    def __post_init__(self) -> None:
        _check(0 <= self.return_code <= 0xFF, f"return code {self.return_code} out of range")


@dataclass(frozen=True)
class Publish:
    """PUBLISH; ``topic`` stays bytes so the receiver decides what a topic that is not UTF-8 means.

    ``packet_id`` is 0 for QoS 0 (which has none) and 1-65535 otherwise.
    """

    topic: bytes
    payload: bytes
    qos: int = 0
    retain: bool = False
    packet_id: int = 0
    dup: bool = False

    def __post_init__(self) -> None:
        if self.qos:
            _check(self.qos in (1, 2), f"QoS {self.qos} not 0-2")
            _check_id(self.packet_id)
        else:
            _check(self.packet_id == 0 and not self.dup, "QoS 0 has no packet id and no DUP flag")


@dataclass(frozen=True)
class Puback:
    """PUBACK of a QoS 1 PUBLISH."""

    packet_id: int

    def __post_init__(self) -> None:
        _check_id(self.packet_id)


@dataclass(frozen=True)
class Subscribe:
    """SUBSCRIBE to ``(filter, qos)`` pairs."""

    packet_id: int
    filters: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        _check_id(self.packet_id)
        _check(bool(self.filters), "SUBSCRIBE needs at least one filter")
        _check(all(qos in (0, 1, 2) for _, qos in self.filters), "subscription QoS not 0-2")


@dataclass(frozen=True)
class Suback:
    """SUBACK: one return code per filter, the granted QoS or 0x80 for a refusal."""

    packet_id: int
    return_codes: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_id(self.packet_id)
        _check(bool(self.return_codes), "SUBACK needs at least one return code")
        _check(all(code in SUBACK_CODES for code in self.return_codes), "SUBACK return code not 0, 1, 2 or 0x80")


@dataclass(frozen=True)
class Unsubscribe:
    """UNSUBSCRIBE from filters."""

    packet_id: int
    filters: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_id(self.packet_id)
        _check(bool(self.filters), "UNSUBSCRIBE needs at least one filter")


@dataclass(frozen=True)
class Unsuback:
    """UNSUBACK."""

    packet_id: int

    def __post_init__(self) -> None:
        _check_id(self.packet_id)


@dataclass(frozen=True)
class Pingreq:
    """PINGREQ (keepalive)."""


@dataclass(frozen=True)
class Pingresp:
    """PINGRESP."""


@dataclass(frozen=True)
class Disconnect:
    """DISCONNECT: the client leaves cleanly (no last will)."""


def _decoded_publish(topic: bytes, payload: bytes, qos: int, retain: bool, packet_id: int, dup: bool) -> Publish:
    """A PUBLISH the decoder has checked, built without re-checking it.

    A frozen dataclass pays an ``object.__setattr__`` per field and ``__post_init__``; filling the
    instance dict at once spares PUBLISH, the collector's one hot packet, all of that.
    """
    packet = _new(Publish)
    _setattr(packet, "__dict__", {"topic": topic, "payload": payload, "qos": qos, "retain": retain,
                                  "packet_id": packet_id, "dup": dup})
    return packet


Packet = (Connect | Connack | Publish | Puback | Subscribe | Suback | Unsubscribe | Unsuback | Pingreq | Pingresp
          | Disconnect)


# --- encoding ----------------------------------------------------------------------------------
def _frame(header: int, body: bytes) -> bytes:
    return bytes([header]) + remaining_length(len(body)) + body


def _binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("an MQTT string or binary field holds at most 65535 bytes")
    return _U16.pack(len(data)) + data


def _string(text: str) -> bytes:
    return _binary(text.encode("utf-8"))


def _encode_connect(p: Connect) -> bytes:
    flags = (0x02 if p.clean_session else 0) | (0x80 if p.username is not None else 0) | \
        (0x40 if p.password is not None else 0)
    if p.will is not None:
        flags |= 0x04 | (p.will.qos << 3) | (0x20 if p.will.retain else 0)
    body = _string(PROTOCOL_NAME) + bytes([PROTOCOL_LEVEL, flags]) + _U16.pack(p.keepalive) + _string(p.client_id)
    if p.will is not None:
        body += _string(p.will.topic) + _binary(p.will.payload)
    if p.username is not None:
        body += _string(p.username)
    if p.password is not None:
        body += _string(p.password)
    return _frame(CONNECT << 4, body)


def _encode_publish(p: Publish) -> bytes:
    header = (PUBLISH << 4) | (p.qos << 1) | (0x01 if p.retain else 0) | (0x08 if p.dup else 0)
    return _frame(header, _binary(p.topic) + (_U16.pack(p.packet_id) if p.qos else b"") + p.payload)


_ENCODERS: dict[type, Callable[..., bytes]] = {
    Connect: _encode_connect,
    Connack: lambda p: bytes([CONNACK << 4, 2, 1 if p.session_present else 0, p.return_code]),
    Publish: _encode_publish,
    Puback: lambda p: _PUBACK.pack(PUBACK << 4, 2, p.packet_id),
    Subscribe: lambda p: _frame((SUBSCRIBE << 4) | 2, _U16.pack(p.packet_id) + b"".join(
        _string(f) + bytes([qos]) for f, qos in p.filters)),
    Suback: lambda p: _frame(SUBACK << 4, _U16.pack(p.packet_id) + bytes(p.return_codes)),
    Unsubscribe: lambda p: _frame((UNSUBSCRIBE << 4) | 2, _U16.pack(p.packet_id) + b"".join(
        _string(f) for f in p.filters)),
    Unsuback: lambda p: _PUBACK.pack(UNSUBACK << 4, 2, p.packet_id),
    Pingreq: lambda p: bytes([PINGREQ << 4, 0]),
    Pingresp: lambda p: bytes([PINGRESP << 4, 0]),
    Disconnect: lambda p: bytes([DISCONNECT << 4, 0]),
}


def encode(packet: Packet) -> bytes:
    """The packet's bytes on the wire."""
    return _ENCODERS[type(packet)](packet)


def encode_pubacks(packet_ids: Iterable[int]) -> bytes:
    """The PUBACKs of ``packet_ids`` back to back, for one write (the collector acknowledges in batches)."""
    pack = _PUBACK.pack
    return b"".join([pack(PUBACK << 4, 2, packet_id) for packet_id in packet_ids])


# --- decoding ----------------------------------------------------------------------------------
class _Reader:
    """Reads the fields of one packet body ``buf[pos:stop]``; every overrun is a MalformedPacket."""

    __slots__ = ("buf", "pos", "stop", "name")

    def __init__(self, buf: bytes | bytearray, pos: int, stop: int, name: str) -> None:
        self.buf, self.pos, self.stop, self.name = buf, pos, stop, name

    def fail(self, why: str) -> MalformedPacket:
        return MalformedPacket(f"malformed {self.name}: {why}")

    def left(self) -> int:
        return self.stop - self.pos

    def u8(self) -> int:
        if self.pos >= self.stop:
            raise self.fail("too short")
        self.pos += 1
        return self.buf[self.pos - 1]

    def u16(self) -> int:
        if self.stop - self.pos < 2:
            raise self.fail("too short")
        self.pos += 2
        return (self.buf[self.pos - 2] << 8) | self.buf[self.pos - 1]

    def packet_id(self) -> int:
        packet_id = self.u16()
        if not packet_id:
            raise self.fail("packet id 0")
        return packet_id

    def binary(self) -> bytes:
        size = self.u16()
        if self.stop - self.pos < size:
            raise self.fail("field longer than the packet")
        self.pos += size
        return bytes(self.buf[self.pos - size:self.pos])

    def string(self) -> str:
        try:
            return self.binary().decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("string is not UTF-8") from None

    def rest(self) -> bytes:
        data = bytes(self.buf[self.pos:self.stop])
        self.pos = self.stop
        return data

    def done(self) -> None:
        if self.pos != self.stop:
            raise self.fail(f"{self.stop - self.pos} unexpected trailing bytes")


def _decode_connect(r: _Reader) -> Connect:
    if r.string() != PROTOCOL_NAME or r.u8() != PROTOCOL_LEVEL:
        raise r.fail("not MQTT 3.1.1")
    flags = r.u8()
    keepalive = r.u16()
    if flags & 0x01:
        raise r.fail("reserved flag set")
    will_qos = (flags >> 3) & 3
    if will_qos == 3 or (not flags & 0x04 and flags & 0x38):
        raise r.fail("bad will flags")
    if flags & 0x40 and not flags & 0x80:
        raise r.fail("password without user name")
    client_id = r.string()
    will = Will(r.string(), r.binary(), will_qos, bool(flags & 0x20)) if flags & 0x04 else None
    username = r.string() if flags & 0x80 else None
    password = r.string() if flags & 0x40 else None
    r.done()
    return Connect(client_id, username, password, keepalive, bool(flags & 0x02), will)


def _decode_connack(r: _Reader) -> Connack:
    ack_flags = r.u8()
    if ack_flags & 0xFE:
        raise r.fail("reserved flag set")
    code = r.u8()
    r.done()
    return Connack(bool(ack_flags), code)


def _decode_subscribe(r: _Reader) -> Subscribe:
    packet_id = r.packet_id()
    filters = []
    while r.left():
        topic_filter = r.string()
        qos = r.u8()
        if qos > 2:
            raise r.fail(f"requested QoS byte 0x{qos:02x}")
        filters.append((topic_filter, qos))
    if not filters:
        raise r.fail("no filter")
    return Subscribe(packet_id, tuple(filters))


def _decode_suback(r: _Reader) -> Suback:
    packet_id = r.packet_id()
    codes = tuple(r.rest())
    if not codes or not SUBACK_CODES.issuperset(codes):
        raise r.fail("missing or invalid return codes")
    return Suback(packet_id, codes)


def _decode_unsubscribe(r: _Reader) -> Unsubscribe:
    packet_id = r.packet_id()
    filters = []
    while r.left():
        filters.append(r.string())
    if not filters:
        raise r.fail("no filter")
    return Unsubscribe(packet_id, tuple(filters))


def _id_only(kind: type[Puback] | type[Unsuback]) -> Callable[[_Reader], Puback | Unsuback]:
    def decode_id(r: _Reader) -> Puback | Unsuback:
        packet_id = r.packet_id()
        r.done()
        return kind(packet_id)
    return decode_id


def _empty(kind: type[Pingreq] | type[Pingresp] | type[Disconnect]) -> Callable[[_Reader], Packet]:
    packet = kind()

    def decode_empty(r: _Reader) -> Packet:
        r.done()
        return packet
    return decode_empty


# type -> (fixed-header flags it must carry, body decoder); PUBLISH is decoded inline (the hot path)
_DECODERS: dict[int, tuple[int, Callable[[_Reader], Packet]]] = {
    CONNECT: (0, _decode_connect),
    CONNACK: (0, _decode_connack),
    PUBACK: (0, _id_only(Puback)),
    SUBSCRIBE: (2, _decode_subscribe),
    SUBACK: (0, _decode_suback),
    UNSUBSCRIBE: (2, _decode_unsubscribe),
    UNSUBACK: (0, _id_only(Unsuback)),
    PINGREQ: (0, _empty(Pingreq)),
    PINGRESP: (0, _empty(Pingresp)),
    DISCONNECT: (0, _empty(Disconnect)),
}


def _long_length(buf: bytes | bytearray, i: int, end: int) -> tuple[int, int] | None:
    """Decode a remaining length of two to four bytes at ``buf[i]``: (length, body start), None if cut off."""
    length = 0
    for shift in (0, 7, 14, 21):
        if i >= end:
            return None
        byte = buf[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if not byte:
                raise MalformedPacket("malformed remaining length: not in its shortest form")
            return length, i
    raise MalformedPacket("malformed remaining length: more than four bytes")


def decode(buf: bytes | bytearray, pos: int = 0) -> tuple[Packet, int] | None:
    """The packet starting at ``buf[pos]`` and the offset after it; None while it is incomplete.

    Raises MalformedPacket for anything that is not a supported packet, as soon as the bytes show it.
    """
    end = len(buf)
    if end - pos < 2:
        return None
    header = buf[pos]
    byte = buf[pos + 1]
    if byte < 0x80:
        length, i = byte, pos + 2
    else:
        found = _long_length(buf, pos + 1, end)
        if found is None:
            return None
        length, i = found
    stop = i + length
    kind = header >> 4
    if kind == PUBLISH:
        if stop > end:
            return None
        qos = (header >> 1) & 3
        if length < 2:
            raise MalformedPacket("malformed PUBLISH: no topic")
        topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
        if qos == 0:
            if topic_end > stop or header & 0x08:
                raise MalformedPacket("malformed PUBLISH: topic longer than the packet" if topic_end > stop
                                      else "malformed PUBLISH: DUP set on QoS 0")
            return _decoded_publish(bytes(buf[i + 2:topic_end]), bytes(buf[topic_end:stop]), 0, bool(header & 1), 0,
                                False), stop
        if qos == 3 or topic_end + 2 > stop:
            raise MalformedPacket("malformed PUBLISH: QoS 3" if qos == 3 else
                                  "malformed PUBLISH: topic and packet id longer than the packet")
        packet_id = (buf[topic_end] << 8) | buf[topic_end + 1]
        if not packet_id:
            raise MalformedPacket("malformed PUBLISH: packet id 0")
        return _decoded_publish(bytes(buf[i + 2:topic_end]), bytes(buf[topic_end + 2:stop]), qos, bool(header & 1),
                            packet_id, bool(header & 0x08)), stop
    known = _DECODERS.get(kind)
    if known is None:
        raise MalformedPacket(f"unsupported packet type {kind} (header 0x{header:02x})")
    flags, body = known
    if header & 0x0F != flags:
        raise MalformedPacket(f"malformed {PACKET_NAMES[kind]}: reserved flags 0x{header & 0x0F:x}")
    if stop > end:
        return None
    return body(_Reader(buf, i, stop, PACKET_NAMES[kind])), stop


def decode_all(data: bytes | bytearray) -> list[Packet]:
    """Every packet in ``data``, which must end on a packet boundary (tests and benchmarks)."""
    packets = []
    pos = 0
    while pos < len(data):
        found = decode(data, pos)
        if found is None:
            raise MalformedPacket(f"incomplete packet at byte {pos} of {len(data)}")
        packet, pos = found
        packets.append(packet)
    return packets
