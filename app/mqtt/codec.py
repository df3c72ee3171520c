"""A strict, sans-I/O MQTT 3.1.1 decoder: a client's bytes in, packets out (the encoders are in app.mqtt.packets).

In the style of h11 and wsproto: no sockets, so the same decoder serves a TCP
socket's recv and the byte stream carried by WebSocket binary messages (a packet
may span feeds, a feed may hold several). Everything is checked against the
OASIS standard (sections 1.5, 2 and 3) as the bytes arrive, and the first
violation raises `MqttError`; the connection is then to be closed, so the
decoder refuses further input.

Speed: at 200,000 devices, PINGREQ and small PUBLISH/PUBACK dominate. A feed
that holds whole packets is parsed in place without being copied; only an
unfinished tail is kept, and bytes that cannot finish a packet are just queued
until enough have arrived. Payloads are sliced, never walked byte by byte.
"""

from __future__ import annotations

from collections.abc import Callable

from app.mqtt.packets import (
    Connect,
    Disconnect,
    MqttError,
    Packet,
    PingReq,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    Subscribe,
    Unsubscribe,
    Will,
)

CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT = (
    1, 3, 4, 5, 6, 7, 8, 10, 12, 14)
PROTOCOL_NAME = "MQTT"
PROTOCOL_LEVEL = 4

_PINGREQ_BYTES = b"\xc0\x00"
_PING = PingReq()  # field-less and slotted, so one instance can be shared by every decoder
_DISCONNECT = Disconnect()


def _first_byte_rules() -> tuple[str | None, ...]:
    """For each possible first byte, None if a client may send it, else why not (standard section 2.2)."""
    flags_required = {CONNECT: 0, PUBACK: 0, PUBREC: 0, PUBREL: 0b0010, PUBCOMP: 0, SUBSCRIBE: 0b0010,
                      UNSUBSCRIBE: 0b0010, PINGREQ: 0, DISCONNECT: 0}
    rules: list[str | None] = []
    for byte in range(256):
        kind, flags = byte >> 4, byte & 0x0F
        if kind == PUBLISH:
            qos, dup = (flags >> 1) & 3, flags & 0b1000
            rules.append("PUBLISH with QoS 3" if qos == 3 else "DUP set on a QoS 0 PUBLISH" if dup and not qos
                         else None)
        elif kind not in flags_required:
            rules.append(f"packet type {kind} is not one a client sends")
        elif flags != flags_required[kind]:
            rules.append(f"reserved flags {flags:#06b} on packet type {kind}")
        else:
            rules.append(None)
    return tuple(rules)


_FIRST_BYTE_ERRORS = _first_byte_rules()
# Remaining length of the packets whose size the standard fixes: a wrong one is refused from the header.
_FIXED_LENGTH = {PUBACK: 2, PUBREC: 2, PUBREL: 2, PUBCOMP: 2, PINGREQ: 0, DISCONNECT: 0}


def _malformed(message: str) -> MqttError:
    return MqttError("bad_frame", message)


class MqttDecoder:
    """Turns a client's byte stream into packets; dead after its first error.

    `max_packet_bytes` bounds a whole packet (fixed header included): a longer
    one is refused as soon as its remaining length is read, before any of its
    body is buffered.
    """

    __slots__ = ("_failure", "_held", "_max", "_need")

    def __init__(self, max_packet_bytes: int) -> None:
        if max_packet_bytes < 2:
            raise ValueError("max_packet_bytes must allow at least a two-byte packet")
        self._max = max_packet_bytes
        # An unfinished packet's bytes. One growing bytearray, not a list of chunks: a client trickling a
        # packet a byte per segment must not cost dozens of bytes of bookkeeping per byte. Empty, it is the
        # shared b"", so an idle connection's decoder holds no buffer at all.
        self._held: bytes | bytearray = b""
        self._need = 0  # how many bytes the unfinished packet needs before parsing can progress
        self._failure: MqttError | None = None

    def feed(self, data: bytes) -> list[Packet]:
        """The packets `data` completes, in order; raises `MqttError` at the first violation."""
        if self._failure is not None:
            raise MqttError(self._failure.code, f"decoder closed by an earlier error: {self._failure.message}")
        if type(data) is not bytes:
            data = bytes(data)  # a caller's bytearray or memoryview may be reused after this call
        if self._held:
            self._held += data
            if len(self._held) < self._need:
                return []
            data = bytes(self._held)
            self._held = b""
        elif data == _PINGREQ_BYTES:  # the commonest feed of all: every device, every keep-alive period
            return [_PING]
        packets: list[Packet] = []
        size = len(data)
        pos = 0
        try:  # the loop is inlined, not a method: a call is a tenth of a small packet's cost
            while pos < size:
                first = data[pos]
                rule = _RULES[first]
                if rule is None:
                    raise _malformed(_FIRST_BYTE_ERRORS[first])
                if pos + 1 == size:
                    self._hold(data, pos, 2)
                    break
                length = data[pos + 1]
                body = pos + 2
                if length & 0x80:
                    length, body = _remaining_length(data, pos + 1)
                    if body < 0:
                        self._hold(data, pos, size - pos + 1)
                        break
                end = body + length
                decode, fixed = rule
                if end - pos > self._max:
                    raise MqttError("frame_too_large", f"a {end - pos}-byte packet is over the {self._max}-byte limit")
                if fixed != length and fixed >= 0:
                    raise _malformed(f"packet type {first >> 4} has remaining length {length}, not {fixed}")
                if end > size:
                    self._hold(data, pos, end - pos)
                    break
                packets.append(decode(first, data, body, end))
                pos = end
        except MqttError as exc:
            exc.packets = packets
            self._failure = exc
            raise
        return packets

    def _hold(self, data: bytes, start: int, need: int) -> None:
        self._held = bytearray(memoryview(data)[start:])
        self._need = need


def _remaining_length(data: bytes, start: int) -> tuple[int, int]:
    """(value, index after it) of a multi-byte remaining length; index -1 when it is not all here yet.

    Non-minimal encodings (0x80 0x00 for 0) are accepted: MQTT 3.1.1, unlike 5,
    does not forbid them, and clients that reserve a fixed-width length exist.
    """
    value = 0
    shift = 0
    for index in range(start, start + 4):
        if index >= len(data):
            return 0, -1
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    raise _malformed("remaining length longer than 4 bytes")


def _text(raw: bytes, what: str) -> str:
    """A UTF-8 string field: well-formed (no surrogates, no overlong forms) and free of U+0000 (section 1.5.3)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise _malformed(f"{what} is not well-formed UTF-8") from None
    if "\x00" in text:  # str membership: several times faster than bytes membership
        raise _malformed(f"{what} holds U+0000")
    return text


def _topic_name(raw: bytes, what: str) -> str:
    """A topic name (section 4.7): at least one character, no wildcard."""
    text = _text(raw, what)
    if not text:
        raise _malformed(f"{what} is empty")
    if "+" in text or "#" in text:
        raise _malformed(f"{what} holds a wildcard")
    return text


def _topic_filter(raw: bytes) -> str:
    """A topic filter (section 4.7.1): `+` fills a whole level, `#` only a whole last level."""
    text = _text(raw, "topic filter")
    if not text:
        raise _malformed("empty topic filter")
    if "+" in text or "#" in text:
        levels = text.split("/")
        for index, level in enumerate(levels):
            if level == "#" and index < len(levels) - 1 or level not in ("+", "#") and ("+" in level or "#" in level):
                raise _malformed(f"misplaced wildcard in topic filter {text!r}")
    return text


class _Reader:
    """Sequential reads inside one packet's body, each checked against the body's end."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, start: int, end: int) -> None:
        self.data, self.pos, self.end = data, start, end

    def more(self) -> bool:
        return self.pos < self.end

    def byte(self, what: str) -> int:
        if self.pos >= self.end:
            raise _malformed(f"packet ends before its {what}")
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self, what: str) -> int:
        return self.byte(what) << 8 | self.byte(what)

    def binary(self, what: str) -> bytes:
        """A two-byte length followed by that many bytes (sections 1.5.3 and 3.1.3)."""
        start = self.pos + 2
        stop = start + self.u16(what)
        if stop > self.end:
            raise _malformed(f"{what} runs past the end of its packet")
        self.pos = stop
        return self.data[start:stop]

    def text(self, what: str) -> str:
        return _text(self.binary(what), what)

    def packet_id(self) -> int:
        packet_id = self.u16("packet identifier")
        if not packet_id:
            raise _malformed("packet identifier 0")
        return packet_id

    def finish(self, what: str) -> None:
        if self.pos != self.end:
            raise _malformed(f"bytes left over after the {what}")


def _connect(first: int, data: bytes, start: int, end: int) -> Connect:
    reader = _Reader(data, start, end)
    name = reader.text("protocol name")
    if name != PROTOCOL_NAME:
        raise _malformed(f"protocol name {name!r}, not {PROTOCOL_NAME!r}")
    level = reader.byte("protocol level")
    if level != PROTOCOL_LEVEL:
        return Connect(name, level)
    flags = reader.byte("connect flags")
    if flags & 0x01:
        raise _malformed("reserved connect flag set")
    will_qos = flags >> 3 & 3
    if not flags & 0x04 and flags & 0x38:
        raise _malformed("will QoS or retain set without the will flag")
    if will_qos == 3:
        raise _malformed("will QoS 3")
    keep_alive = reader.u16("keep alive")
    client_id = reader.text("client identifier")  # may be empty: the server answers it, not the codec
    will = None
    if flags & 0x04:
        topic = _topic_name(reader.binary("will topic"), "will topic")
        will = Will(topic, reader.binary("will message"), will_qos, bool(flags & 0x20))
    username = reader.text("user name") if flags & 0x80 else None
    # Deliberately lenient: 3.1.1 forbids a password without a user name (MQTT-3.1.2-22), but PROTOCOL.md
    # section 8 makes the password the device's token and ignores the user name, and some device SDKs send it so.
    password = reader.binary("password") if flags & 0x40 else None
    reader.finish("CONNECT payload")
    return Connect(name, level, client_id, bool(flags & 0x02), keep_alive, will, username, password)


def _publish(first: int, data: bytes, start: int, end: int) -> Publish:
    """The hot path: `_topic_name`'s checks are inlined, and flags are compared rather than passed to bool()."""
    if end - start < 2:
        raise _malformed("PUBLISH ends before its topic name")
    topic_end = start + 2 + (data[start] << 8 | data[start + 1])
    qos = first >> 1 & 3
    payload_start = topic_end + 2 if qos else topic_end
    if payload_start > end:
        raise _malformed("PUBLISH ends inside its topic name or packet identifier")
    try:
        topic = data[start + 2:topic_end].decode()
    except UnicodeDecodeError:
        raise _malformed("topic name is not well-formed UTF-8") from None
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        _topic_name(data[start + 2:topic_end], "topic name")  # raises, saying why
    packet_id = None
    if qos:
        packet_id = data[topic_end] << 8 | data[topic_end + 1]
        if not packet_id:
            raise _malformed("packet identifier 0")
    return Publish(topic, data[payload_start:end], qos, first & 1 == 1, first & 8 == 8, packet_id)


def _acknowledgement(kind: type[PubAck | PubRec | PubRel | PubComp]) -> Callable[[int, bytes, int, int], Packet]:
    """The decoder of a packet that is just a packet identifier (the header check fixed its length at 2)."""
    def decode(first: int, data: bytes, start: int, end: int) -> Packet:
        packet_id = data[start] << 8 | data[start + 1]
        if not packet_id:
            raise _malformed("packet identifier 0")
        return kind(packet_id)
    return decode


def _subscribe(first: int, data: bytes, start: int, end: int) -> Subscribe:
    reader = _Reader(data, start, end)
    packet = Subscribe(reader.packet_id())
    while reader.more():
        topic_filter = _topic_filter(reader.binary("topic filter"))
        qos = reader.byte("requested QoS")
        if qos > 2:
            raise _malformed(f"requested QoS byte {qos:#04x}: QoS above 2 or reserved bits set")
        packet.filters.append((topic_filter, qos))
    if not packet.filters:
        raise _malformed("SUBSCRIBE without a topic filter")
    return packet


def _unsubscribe(first: int, data: bytes, start: int, end: int) -> Unsubscribe:
    reader = _Reader(data, start, end)
    packet = Unsubscribe(reader.packet_id())
    while reader.more():
        packet.filters.append(_topic_filter(reader.binary("topic filter")))
    if not packet.filters:
        raise _malformed("UNSUBSCRIBE without a topic filter")
    return packet


_DECODERS: dict[int, Callable[[int, bytes, int, int], Packet]] = {
    CONNECT: _connect,
    PUBLISH: _publish,
    PUBACK: _acknowledgement(PubAck),
    PUBREC: _acknowledgement(PubRec),
    PUBREL: _acknowledgement(PubRel),
    PUBCOMP: _acknowledgement(PubComp),
    SUBSCRIBE: _subscribe,
    UNSUBSCRIBE: _unsubscribe,
    PINGREQ: lambda first, data, start, end: _PING,
    DISCONNECT: lambda first, data, start, end: _DISCONNECT,
}

# Per first byte: None if a client may not send it, else (body decoder, fixed remaining length or -1).
_RULES = tuple(None if _FIRST_BYTE_ERRORS[byte] else (_DECODERS[byte >> 4], _FIXED_LENGTH.get(byte >> 4, -1))
               for byte in range(256))
