"""A client's half of MQTT 3.1.1: every packet a client sends (CONNECT, PUBLISH, PUBACK, SUBSCRIBE,
UNSUBSCRIBE, PINGREQ, DISCONNECT), built from the standard (section 3), and a parser for the five a
server sends it (CONNACK, SUBACK, PUBLISH, PUBACK, PINGRESP).

The load tool's devices speak it, and so do the tests (tests/unit/test_mqtt_transport.py,
tests/mqtt_devices.py, the TLS gateway tests): they need the packets a stock client would not send
(a CONNECT of protocol level 3, with a will, without a password; a QoS 2 or retained PUBLISH), so
every option of the standard is here, while the load tool's hot path (a QoS 1 PUBLISH of a short
topic and payload, a PUBACK) stays one struct.pack and a join.

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
DISCONNECT = b"\xe0\x00"
_PINGRESP_BYTES = b"\xd0\x00"
_PINGRESP = (PINGRESP,)
_U16 = struct.Struct(">H")
_HEAD = struct.Struct(">BBH")  # first byte, a one-byte remaining length, a packet id (or a topic's length)
_PROTOCOL = b"\x00\x04MQTT"
# CONNECT's flags (section 3.1.2.3).
_CLEAN, _WILL, _PASSWORD, _USERNAME = 0x02, 0x04, 0x40, 0x80
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


def packet(first: int, body: bytes) -> bytes:
    """Any packet: its first byte (type and flags), the remaining length, the body."""
    return bytes((first,)) + _length_bytes(len(body)) + body


def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return _U16.pack(len(raw)) + raw


def connect(client_id: str, password: str | None = None, keep_alive: int = 60, level: int = 4,
            will: tuple[str, bytes] | None = None, username: str | None = None) -> bytes:
    """CONNECT, clean session. Warren ignores the user name and reads the password as the device's token;
    3.1.1 wants a user name before a password, which stock clients send and the load tool does (its
    own client id), and which the tests leave out unless they say otherwise. At level 5 (MQTT 5) the
    CONNECT and its will carry an empty property list, as the layout wants."""
    flags = _CLEAN
    no_properties = b"\x00" if level == 5 else b""
    payload = [no_properties, _string(client_id)]
    if will is not None:
        flags |= _WILL
        payload += (no_properties, _string(will[0]), _string(will[1]))
    if username is not None:
        flags |= _USERNAME
        payload.append(_string(username))
    if password is not None:
        flags |= _PASSWORD
        payload.append(_string(password))
    return packet(0x10, b"".join((_PROTOCOL, bytes((level, flags)), _U16.pack(keep_alive), *payload)))


def subscribe(packet_id: int, *filters: tuple[str, int] | str | int) -> bytes:
    """SUBSCRIBE to `(topic filter, QoS)` pairs; one filter may also be given flat, `subscribe(id, "a/#", 1)`."""
    if len(filters) == 2 and isinstance(filters[0], str):
        filters = (filters,)
    return packet(0x82, _U16.pack(packet_id) + b"".join(_string(topic) + bytes((qos,)) for topic, qos in filters))


def unsubscribe(packet_id: int, *topics: str) -> bytes:
    return packet(0xA2, _U16.pack(packet_id) + b"".join(_string(topic) for topic in topics))


def publish(topic: str, payload: bytes, packet_id: int | None = None, *, qos: int | None = None,
            retain: bool = False) -> bytes:
    """A PUBLISH: QoS 1 when it has a packet id (the load tool's only kind), else QoS 0; `qos` says
    otherwise (a QoS above 0 without a packet id gets id 1)."""
    if qos is None:
        qos = 0 if packet_id is None else 1
    raw = topic.encode()
    first = 0x30 | qos << 1 | retain
    if not qos:
        return packet(first, _string(raw) + payload)
    packet_id = 1 if packet_id is None else packet_id
    length = 4 + len(raw) + len(payload)
    if length < 128:  # one-byte remaining length: every event and reply of the load tool
        return b"".join((_HEAD.pack(first, length, len(raw)), raw, _U16.pack(packet_id), payload))
    return b"".join((bytes((first,)), _length_bytes(length), _string(raw), _U16.pack(packet_id), payload))


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
