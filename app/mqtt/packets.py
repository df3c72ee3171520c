"""The MQTT 3.1.1 control packets: those a client sends, as the decoder reports them, and those a server sends.

A client's packets are plain slotted dataclasses: the hot path builds one per
PINGREQ, PUBLISH and PUBACK, so they carry no behaviour and no validation of
their own (the decoder, app.mqtt.codec, has checked everything the standard and
PROTOCOL.md section 8 ask for). A server's packets are pure functions that
return the bytes to send.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field


class MqttError(Exception):
    """A stream that breaks MQTT 3.1.1; the connection must be closed.

    `code` is the PROTOCOL.md section 4 error code the failure is counted under
    (`bad_frame` for a malformed packet, `frame_too_large` for an oversize one).
    `packets` holds what the same `feed` call decoded before the failure, so that
    a stream yields the same packets however it was split into feeds.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.packets: list[Packet] = []


@dataclass(slots=True)
class Will:
    """The will message of a CONNECT: published by the server if the connection ends without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(slots=True)
class Connect:
    """CONNECT. With a `protocol_level` other than 4 only the protocol name and level are decoded.

    The rest of such a packet follows another version's layout (MQTT 5 adds
    properties), and the server's only answer to it is CONNACK 0x01, so the other
    fields keep their defaults. `password` is binary data in MQTT; the device's
    token travels there.
    """

    protocol_name: str
    protocol_level: int
    client_id: str = ""
    clean_session: bool = True
    keep_alive: int = 0
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None


@dataclass(slots=True)
class Publish:
    """PUBLISH; `packet_id` is None at QoS 0, which carries none."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None


@dataclass(slots=True)
class PubAck:
    packet_id: int


@dataclass(slots=True)
class PubRec:
    packet_id: int


@dataclass(slots=True)
class PubRel:
    packet_id: int


@dataclass(slots=True)
class PubComp:
    packet_id: int


@dataclass(slots=True)
class Subscribe:
    """SUBSCRIBE: (topic filter, requested QoS) pairs, at least one."""

    packet_id: int
    filters: list[tuple[str, int]] = field(default_factory=list)


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    filters: list[str] = field(default_factory=list)


@dataclass(slots=True)
class PingReq:
    pass


@dataclass(slots=True)
class Disconnect:
    pass


Packet = Connect | Publish | PubAck | PubRec | PubRel | PubComp | Subscribe | Unsubscribe | PingReq | Disconnect


# The packets a server sends. Their arguments come from the gateway, not the wire, so a bad one is a
# programming error (ValueError), not an MqttError.

MAX_REMAINING_LENGTH = 268_435_455  # four 7-bit groups: the most a remaining length can say
PINGRESP = b"\xd0\x00"
_CONNACKS = {(code, present): bytes((0x20, 2, int(present), code)) for code in range(6) for present in (False, True)}
_HEAD = struct.Struct(">BBH")  # first byte, a one-byte remaining length, then a packet id or a topic's length
_U16 = struct.Struct(">H")
SUBACK_FAILURE = 0x80


def _check_packet_id(packet_id: int | None) -> None:
    if packet_id is None or not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet identifier {packet_id} is not in 1-65535")


def _remaining_length_bytes(length: int) -> bytes:
    if length > MAX_REMAINING_LENGTH:
        raise ValueError(f"a {length}-byte body is more than MQTT can frame")
    out = bytearray()
    while True:
        length, digit = divmod(length, 128)
        out.append(digit | 0x80 if length else digit)
        if not length:
            return bytes(out)


def connack(return_code: int, session_present: bool = False) -> bytes:
    """CONNACK; a refusal (return code other than 0) cannot claim a session (MQTT-3.2.2-4)."""
    if return_code and session_present:
        raise ValueError("session present must be 0 with a non-zero return code")
    try:
        return _CONNACKS[return_code, bool(session_present)]
    except KeyError:
        raise ValueError(f"CONNACK return code {return_code} is not in 0-5") from None


def publish(topic: str, payload: bytes, qos: int = 0, packet_id: int | None = None, retain: bool = False,
            dup: bool = False) -> bytes:
    """PUBLISH: a packet identifier at QoS 1 and 2 only, DUP only with one."""
    raw = topic.encode()
    if not raw or "+" in topic or "#" in topic or "\x00" in topic or len(raw) > 0xFFFF:
        raise ValueError(f"{topic!r} is not a topic name")
    first = 0x30 | qos << 1 | retain
    if qos == 0:
        if packet_id is not None or dup:
            raise ValueError("a QoS 0 PUBLISH has no packet identifier and no DUP")
        length = 2 + len(raw) + len(payload)
        tail = b""
    elif qos in (1, 2):
        _check_packet_id(packet_id)
        length = 4 + len(raw) + len(payload)
        tail = _U16.pack(packet_id)
        first |= dup << 3
    else:
        raise ValueError(f"QoS {qos} is not 0, 1 or 2")
    if length < 128:
        return b"".join((_HEAD.pack(first, length, len(raw)), raw, tail, payload))
    return b"".join((bytes((first,)), _remaining_length_bytes(length), _U16.pack(len(raw)), raw, tail, payload))


def puback(packet_id: int) -> bytes:
    _check_packet_id(packet_id)
    return _HEAD.pack(0x40, 2, packet_id)


def suback(packet_id: int, return_codes: list[int]) -> bytes:
    """SUBACK: one return code per filter of the SUBSCRIBE, each a granted QoS or 0x80 (failure)."""
    _check_packet_id(packet_id)
    if not return_codes or any(code not in (0, 1, 2, SUBACK_FAILURE) for code in return_codes):
        raise ValueError(f"SUBACK return codes {return_codes!r}: need one or more of 0, 1, 2, 0x80")
    return b"".join((b"\x90", _remaining_length_bytes(2 + len(return_codes)), _U16.pack(packet_id),
                     bytes(return_codes)))


def unsuback(packet_id: int) -> bytes:
    _check_packet_id(packet_id)
    return _HEAD.pack(0xB0, 2, packet_id)


def pingresp() -> bytes:
    """PINGRESP, prebuilt: it never varies."""
    return PINGRESP
