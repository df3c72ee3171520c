"""A device's half of MQTT 3.1.1, as small as the load tool needs: the packets a client sends, and a parser
for the five a server sends it here (CONNACK, SUBACK, PUBLISH, PUBACK, PINGRESP).

Why not the gateway's codec (app/mqtt)? Its decoder is the server's: it refuses,
rightly, every packet type a client may not send, which is every one a device
receives. And why not paho? One paho client is a thread, a socket pair and
dozens of objects; the load side holds 15,000 devices per process on one greenlet
each. Parsed packets are plain tuples, `(kind, ...)`, so a PINGRESP or a PUBACK
costs no object beyond the tuple.
"""

from __future__ import annotations

import struct

CONNACK, PUBLISH, PUBACK, SUBACK, UNSUBACK, PINGRESP = 2, 3, 4, 9, 11, 13
NAMES = {CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK", SUBACK: "SUBACK", UNSUBACK: "UNSUBACK",
         PINGRESP: "PINGRESP"}
PINGREQ = b"\xc0\x00"
_PINGRESP_BYTES = b"\xd0\x00"
_PINGRESP = (PINGRESP,)
_U16 = struct.Struct(">H")
_HEAD = struct.Struct(">BBH")  # first byte, a one-byte remaining length, a packet id (or a topic's length)
# CONNECT's variable header: protocol name "MQTT", level 4, then the flags byte (user name, password, clean).
_CONNECT_HEADER = b"\x00\x04MQTT\x04\xc2"
Packet = tuple


class ProtocolViolation(ValueError):
    """The server sent something this client cannot read: the connection is given up (a ValueError, as
    bad JSON is for the JSON dialect)."""


def _length_bytes(length: int) -> bytes:
    """An MQTT remaining length (section 2.2.3): 7 bits a byte, high bit for "more"."""
    out = bytearray()
    while True:
        length, digit = divmod(length, 128)
        out.append(digit | 0x80 if length else digit)
        if not length:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _length_bytes(len(body)) + body


def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return _U16.pack(len(raw)) + raw


def connect(client_id: str, password: str, keep_alive: int) -> bytes:
    """CONNECT, clean session, with a user name (ignored by Warren, but 3.1.1 wants one before a password)."""
    return _packet(0x10, b"".join((_CONNECT_HEADER, _U16.pack(keep_alive), _string(client_id),
                                   _string(client_id), _string(password))))


def subscribe(packet_id: int, topic_filter: str, qos: int) -> bytes:
    return _packet(0x82, _U16.pack(packet_id) + _string(topic_filter) + bytes((qos,)))


def publish(topic: str, payload: bytes, packet_id: int) -> bytes:
    """A QoS 1 PUBLISH, the only kind the load tool sends."""
    raw = topic.encode()
    length = 4 + len(raw) + len(payload)
    if length < 128:  # one-byte remaining length: every event and reply of the tool
        return b"".join((_HEAD.pack(0x32, length, len(raw)), raw, _U16.pack(packet_id), payload))
    return b"".join((b"\x32", _length_bytes(length), _string(raw), _U16.pack(packet_id), payload))


def puback(packet_id: int) -> bytes:
    return _HEAD.pack(0x40, 2, packet_id)


def parse(data: bytes) -> tuple[list[Packet], bytes]:
    """The whole packets at the start of `data`, and the bytes of an unfinished one (to prepend to the next read)."""
    if data == _PINGRESP_BYTES:  # the commonest read of all: every device, every keep-alive period
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
        except (IndexError, UnicodeDecodeError):
            raise ProtocolViolation(f"malformed packet of type {data[pos] >> 4}") from None
        pos = end
    return packets, data[pos:]


def _remaining_length(data: bytes, start: int) -> tuple[int, int]:
    """(value, index after it) of a multi-byte remaining length; index -1 when it is not all here yet."""
    value = shift = 0
    for index in range(start, min(start + 4, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    if len(data) >= start + 4:
        raise ProtocolViolation("remaining length longer than 4 bytes")
    return 0, -1


def _decode(first: int, data: bytes, start: int, end: int) -> Packet:
    kind = first >> 4
    if kind == PUBLISH:
        topic_end = start + 2 + (data[start] << 8 | data[start + 1])
        qos = first >> 1 & 3
        packet_id = data[topic_end] << 8 | data[topic_end + 1] if qos else None
        return (PUBLISH, data[start + 2:topic_end].decode(), data[topic_end + (2 if qos else 0):end], packet_id)
    if kind in (PUBACK, UNSUBACK):
        return (kind, data[start] << 8 | data[start + 1])
    if kind == PINGRESP:
        return _PINGRESP
    if kind == CONNACK:
        return (CONNACK, data[start + 1])
    if kind == SUBACK:
        return (SUBACK, data[start] << 8 | data[start + 1], data[start + 2:end])
    raise ProtocolViolation(f"packet type {kind} is not one a server sends to this client")
