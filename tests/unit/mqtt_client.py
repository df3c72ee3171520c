"""Client-side MQTT 3.1.1 packets for tests, built by hand from the standard (section 3)."""

from __future__ import annotations

import struct


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _length(len(body)) + body


def connect(client_id: str, password: str | None = None, keep_alive: int = 60, level: int = 4,
            will: tuple[str, bytes] | None = None, username: str | None = None) -> bytes:
    flags = 0x02  # clean session
    payload = _string(client_id)
    if will is not None:
        flags |= 0x04
        payload += _string(will[0]) + _string(will[1])
    if username is not None:
        flags |= 0x80
        payload += _string(username)
    if password is not None:
        flags |= 0x40
        payload += _string(password)
    return packet(0x10, _string("MQTT") + bytes([level, flags]) + struct.pack("!H", keep_alive) + payload)


def publish(topic: str, payload: bytes, qos: int = 0, packet_id: int = 1, retain: bool = False) -> bytes:
    body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return packet(0x30 | (qos << 1) | int(retain), body)


def subscribe(packet_id: int, *filters: tuple[str, int]) -> bytes:
    return packet(0x82, struct.pack("!H", packet_id) + b"".join(_string(t) + bytes([q]) for t, q in filters))


def unsubscribe(packet_id: int, *topics: str) -> bytes:
    return packet(0xA2, struct.pack("!H", packet_id) + b"".join(_string(t) for t in topics))


def puback(packet_id: int) -> bytes:
    return packet(0x40, struct.pack("!H", packet_id))


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
