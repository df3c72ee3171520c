"""A client's half of MQTT 5.0, as the load tool's version 5 devices use it: the packets they send
(CONNECT, SUBSCRIBE, PUBLISH; PUBACK and PINGREQ are the 3.1.1 bytes, the short forms) and a parser for
those a server sends (CONNACK, SUBACK, PUBLISH, PUBACK, PINGRESP, DISCONNECT).

Built on bench.stampede.mqtt_codec (framing, strings, the remaining length), not on
the gateway's codec: app.mqtt decodes what a client sends, and builds a Properties
object per packet, where a device only needs the Response Topic of a command and
the reason codes (and `retry_after`) of a refusal. Parsed packets are tuples,
as in mqtt_codec:

    (CONNACK, reason code, reason string, retry_after)
    (SUBACK, packet id, reason codes)
    (PUBLISH, topic, payload, packet id, response topic)
    (PUBACK, packet id, reason code, reason string)
    (PINGRESP,)
    (DISCONNECT, reason code, reason string, retry_after)
"""

from __future__ import annotations

import struct

from bench.stampede.mqtt_codec import (
    _HEAD,
    _PINGRESP,
    _PINGRESP_BYTES,
    _U16,
    CONNACK,
    NAMES,
    PINGRESP,
    PUBACK,
    PUBLISH,
    SUBACK,
    Packet,
    ProtocolViolation,
    _length_bytes,
    _remaining_length,
    _string,
    packet,
)
from bench.stampede.mqtt_codec import (
    connect as connect_any,
)

DISCONNECT = 14
NAMES5 = {**NAMES, DISCONNECT: "DISCONNECT"}
RESPONSE_TOPIC, REASON_STRING, USER_PROPERTY = 0x08, 0x1F, 0x26
_U32 = struct.Struct(">I")
# Property identifier -> the size of its value, or a kind: "s" UTF-8 string or binary data (2-byte length),
# "p" string pair (User Property), "v" variable byte integer (standard section 2.2.2.2).
_SIZES: dict[int, int | str] = {
    0x01: 1, 0x02: 4, 0x03: "s", 0x08: "s", 0x09: "s", 0x0B: "v", 0x11: 4, 0x12: "s", 0x13: 2, 0x15: "s",
    0x16: "s", 0x17: 1, 0x18: 4, 0x19: 1, 0x1A: "s", 0x1C: "s", 0x1F: "s", 0x21: 2, 0x22: 2, 0x23: 2,
    0x24: 1, 0x25: 1, 0x26: "p", 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1,
}


def connect(client_id: str, password: str | None = None, keep_alive: int = 60,
            username: str | None = None) -> bytes:
    """CONNECT at protocol level 5, clean start, no properties (a stock client's defaults: Paho's
    MQTTv5 mode sends none unless told)."""
    return connect_any(client_id, password, keep_alive, level=5, username=username)


def subscribe(packet_id: int, topic: str, qos: int = 1) -> bytes:
    """SUBSCRIBE to one filter: an empty property list, and the subscription options byte (QoS; No Local,
    Retain As Published and Retain Handling all 0, as a stock client sends them)."""
    return packet(0x82, _U16.pack(packet_id) + b"\x00" + _string(topic) + bytes((qos,)))


def publish(topic: str, payload: bytes, packet_id: int) -> bytes:
    """A QoS 1 PUBLISH with an empty property list."""
    raw = topic.encode()
    length = 5 + len(raw) + len(payload)
    if length < 128:  # one-byte remaining length: every event and reply of the load tool
        return b"".join((_HEAD.pack(0x32, length, len(raw)), raw, _U16.pack(packet_id), b"\x00", payload))
    return b"".join((b"\x32", _length_bytes(length), _string(raw), _U16.pack(packet_id), b"\x00", payload))


def parse(data: bytes) -> tuple[list[Packet], bytes]:
    """The whole packets at the start of `data`, and the bytes of an unfinished one (to prepend to the next read)."""
    if data == _PINGRESP_BYTES:
        return [_PINGRESP], b""
    packets = []
    size = len(data)
    pos = 0
    while pos + 2 <= size:
        length, body = data[pos + 1], pos + 2
        if length & 0x80:
            length, body = _remaining_length(data, pos + 1)
            if body < 0:
                break
        end = body + length
        if end > size:
            break
        try:
            packets.append(_decode(data[pos], data, body, end))
        except (IndexError, KeyError, UnicodeDecodeError, struct.error):
            raise ProtocolViolation(f"malformed packet of type {data[pos] >> 4}") from None
        pos = end
    return packets, data[pos:]


def properties(data: bytes, pos: int) -> tuple[dict[int, object], int]:
    """The property block at `pos` as {identifier: value} (a User Property's value: a list of pairs), and the
    index after it. Strings and binary data stay bytes."""
    length, start = _varint(data, pos)
    end = start + length
    found: dict[int, object] = {}
    pos = start
    while pos < end:
        ident = data[pos]
        size = _SIZES[ident]
        pos += 1
        if size == "s":
            stop = pos + 2 + _U16.unpack_from(data, pos)[0]
            value: object = data[pos + 2:stop]
        elif size == "p":
            key_end = pos + 2 + _U16.unpack_from(data, pos)[0]
            stop = key_end + 2 + _U16.unpack_from(data, key_end)[0]
            found.setdefault(ident, []).append((data[pos + 2:key_end], data[key_end + 2:stop]))  # type: ignore[union-attr]
            pos = stop
            continue
        elif size == "v":
            value, stop = _varint(data, pos)
        else:
            stop = pos + size  # type: ignore[operator]
            value = int.from_bytes(data[pos:stop])
        found[ident] = value
        pos = stop
    if pos != end:
        raise IndexError("property block overran")
    return found, end


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    if data[pos] < 0x80:  # the usual case: a one-byte length
        return data[pos], pos + 1
    value, after = _remaining_length(data, pos)
    if after < 0:
        raise IndexError("truncated variable byte integer")
    return value, after


def _explained(data: bytes, start: int, end: int) -> tuple[str | None, float | None]:
    """A reason packet's Reason String and User Property `retry_after`, when it has properties."""
    if start >= end:
        return None, None
    props, _ = properties(data, start)
    reason = props.get(REASON_STRING)
    retry_after = next((float(value) for key, value in props.get(USER_PROPERTY, ())  # type: ignore[attr-defined]
                        if key == b"retry_after"), None)
    return (reason.decode() if isinstance(reason, bytes) else None), retry_after


def _decode(first: int, data: bytes, start: int, end: int) -> Packet:
    kind = first >> 4
    if kind == PUBLISH:
        topic_end = start + 2 + (data[start] << 8 | data[start + 1])
        qos = first >> 1 & 3
        packet_id = data[topic_end] << 8 | data[topic_end + 1] if qos else None
        props, payload_at = properties(data, topic_end + (2 if qos else 0))
        response = props.get(RESPONSE_TOPIC)
        return (PUBLISH, data[start + 2:topic_end].decode(), data[payload_at:end], packet_id,
                response.decode() if isinstance(response, bytes) else None)
    if kind == PUBACK:  # the short form (2 bytes: reason 0x00) is the common case
        packet_id = data[start] << 8 | data[start + 1]
        if end - start == 2:
            return (PUBACK, packet_id, 0, None)
        reason, _ = _explained(data, start + 3, end)
        return (PUBACK, packet_id, data[start + 2], reason)
    if kind == PINGRESP:
        return _PINGRESP
    if kind == CONNACK:
        return (CONNACK, data[start + 1], *_explained(data, start + 2, end))
    if kind == SUBACK:
        _, codes_at = properties(data, start + 2)
        return (SUBACK, data[start] << 8 | data[start + 1], data[codes_at:end])
    if kind == DISCONNECT:
        if end == start:
            return (DISCONNECT, 0, None, None)
        return (DISCONNECT, data[start], *_explained(data, start + 1, end))
    raise ProtocolViolation(f"packet type {kind} is not one a server sends to this client")
