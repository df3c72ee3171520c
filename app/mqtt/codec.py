"""A strict, sans-I/O MQTT decoder: a client's bytes in, packets out (encoders: app.mqtt.packets, packets5).

In the style of h11 and wsproto: no sockets, so the same decoder serves a TCP
socket's recv and the byte stream carried by WebSocket binary messages (a packet
may span feeds, a feed may hold several). Everything is checked against the
OASIS standard as the bytes arrive, and the first violation raises `MqttError`;
the connection is then to be closed, so the decoder refuses further input.

Versions: the CONNECT's protocol level picks the rules for the rest of the
connection. Level 4 is MQTT 3.1.1 (this module's body decoders); level 5 is
MQTT 5.0 (app.mqtt.codec5's), from the packet after that CONNECT on, in the
same feed too. Any other level is decoded only as far as the level byte, for
the server to refuse it. The framing (first byte, remaining length, size limit)
is shared; MQTT 5 also requires remaining lengths in their fewest bytes. A
first CONNECT over the size limit is refused with the level its first body
bytes announce, so that a version 5 client can be told (CONNACK 0x95).

Speed: at 200,000 devices, PINGREQ and small PUBLISH/PUBACK dominate. A feed
that holds whole packets is parsed in place without being copied; only an
unfinished tail is kept, and bytes that cannot finish a packet are just queued
until enough have arrived. Payloads are sliced, never walked byte by byte. The
version costs the 3.1.1 hot loop one integer comparison per packet.
"""

from __future__ import annotations

from collections.abc import Callable

from app.mqtt import codec5
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
from app.mqtt.reader import (
    CONNECT_PREFIX,
    Reader,
    announced_level,
    connect_flags,
    malformed,
    protocol_error,
    topic_filter,
    topic_name,
)
from app.mqtt.reasons import MALFORMED, PACKET_TOO_LARGE, PROTOCOL_ERROR, TOPIC_ALIAS_INVALID

CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT, AUTH = (
    1, 3, 4, 5, 6, 7, 8, 10, 12, 14, 15)
PROTOCOL_NAME = "MQTT"
PROTOCOL_LEVEL = 4
# The Topic Alias Maximum the gateway offers in CONNACK (PROTOCOL.md section 9: at least 16); the decoder
# refuses aliases above the one it was built with (0x94), so the two must agree.
TOPIC_ALIAS_MAXIMUM = 16

_PINGREQ_BYTES = b"\xc0\x00"
_PING = PingReq()  # field-less and slotted, so one instance can be shared by every decoder
_DISCONNECT = Disconnect()

FirstByteErrors = tuple[tuple[str, int] | None, ...]


def _first_byte_rules(level: int) -> FirstByteErrors:
    """For each possible first byte, None if a client may send it, else why not and its MQTT 5 reason code
    (standard section 2.1: a packet type a client never sends is a Protocol Error, bad flags are Malformed)."""
    flags_required = {CONNECT: 0, PUBACK: 0, PUBREC: 0, PUBREL: 0b0010, PUBCOMP: 0, SUBSCRIBE: 0b0010,
                      UNSUBSCRIBE: 0b0010, PINGREQ: 0, DISCONNECT: 0}
    if level == codec5.PROTOCOL_LEVEL:
        flags_required[AUTH] = 0
    rules: list[tuple[str, int] | None] = []
    for byte in range(256):
        kind, flags = byte >> 4, byte & 0x0F
        if kind == PUBLISH:
            qos, dup = (flags >> 1) & 3, flags & 0b1000
            rules.append(("PUBLISH with QoS 3", MALFORMED) if qos == 3 else
                         ("DUP set on a QoS 0 PUBLISH", MALFORMED) if dup and not qos else None)
        elif kind not in flags_required:
            rules.append((f"packet type {kind} is not one a client sends", PROTOCOL_ERROR))
        elif flags != flags_required[kind]:
            rules.append((f"reserved flags {flags:#06b} on packet type {kind}", MALFORMED))
        else:
            rules.append(None)
    return tuple(rules)


_FIRST_BYTE_ERRORS = _first_byte_rules(PROTOCOL_LEVEL)
_FIRST_BYTE_ERRORS5 = _first_byte_rules(codec5.PROTOCOL_LEVEL)
# Remaining length of the packets whose size the standard fixes: a wrong one is refused from the header.
_FIXED_LENGTH = {PUBACK: 2, PUBREC: 2, PUBREL: 2, PUBCOMP: 2, PINGREQ: 0, DISCONNECT: 0}
_FIXED_LENGTH5 = {PINGREQ: 0}  # MQTT 5 acknowledgements and DISCONNECT may carry reason codes and properties


class MqttDecoder:
    """Turns a client's byte stream into packets; dead after its first error.

    `max_packet_bytes` bounds a whole packet (fixed header included): a longer
    one is refused as soon as its remaining length is read, before any of its
    body is buffered; the connection's first CONNECT once the 7 bytes after its
    fixed header are read too (held, no more), as they say its protocol level.
    `topic_alias_maximum` is the Topic Alias Maximum the server sends in a
    version 5 CONNACK: the decoder resolves the client's aliases (a PUBLISH with
    a topic and an alias sets it, one with an empty topic uses it) and refuses
    an alias above it or not yet set.
    `protocol_level` is None until the connection's first CONNECT is decoded, then its level (a broken
    or oversized version 5 CONNECT leaves it None, but its error says `level` 5).
    """

    __slots__ = ("_alias_maximum", "_aliases", "_failure", "_held", "_max", "_need", "_rules", "protocol_level")

    def __init__(self, max_packet_bytes: int, topic_alias_maximum: int = TOPIC_ALIAS_MAXIMUM) -> None:
        if max_packet_bytes < 2:
            raise ValueError("max_packet_bytes must allow at least a two-byte packet")
        self._max = max_packet_bytes
        # An unfinished packet's bytes. One growing bytearray, not a list of chunks: a client trickling a
        # packet a byte per segment must not cost dozens of bytes of bookkeeping per byte. Empty, it is the
        # shared b"", so an idle connection's decoder holds no buffer at all.
        self._held: bytes | bytearray = b""
        self._need = 0  # how many bytes the unfinished packet needs before parsing can progress
        self._failure: MqttError | None = None
        self._rules = _RULES
        self._alias_maximum = topic_alias_maximum
        self._aliases: dict[int, str] | None = None  # MQTT 5 only, made at the first alias
        self.protocol_level: int | None = None

    def feed(self, data: bytes) -> list[Packet]:
        """The packets `data` completes, in order; raises `MqttError` at the first violation.

        The error's `level` is the connection's protocol level when known (5: the
        server may answer with its `reason`, in a CONNACK if it came before one).
        """
        if self._failure is not None:
            error = MqttError(self._failure.code, f"decoder closed by an earlier error: {self._failure.message}",
                              self._failure.reason)
            error.level = self.protocol_level
            raise error
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
        rules = self._rules
        try:  # the loop is inlined, not a method: a call is a tenth of a small packet's cost
            while pos < size:
                first = data[pos]
                rule = rules[first]
                if rule is None:
                    raise self._refusal(first)
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
                    if not data[body - 1] and rules is _RULES5:
                        raise malformed("remaining length not encoded in the fewest bytes")
                end = body + length
                decode, fixed = rule
                if end - pos > self._max:
                    if first == 0x10 and self.protocol_level is None and size < body + CONNECT_PREFIX <= end:
                        self._hold(data, pos, body + CONNECT_PREFIX - pos)  # its level says how it is refused
                        break
                    raise self._too_large(first, data, pos, body, end)
                if fixed != length and fixed >= 0:
                    raise malformed(f"packet type {first >> 4} has remaining length {length}, not {fixed}")
                if end > size:
                    self._hold(data, pos, end - pos)
                    break
                packet = decode(first, data, body, end)
                packets.append(packet)
                pos = end
                if first == 0x10 and self.protocol_level is None:  # the connection's first CONNECT sets its rules
                    self.protocol_level = packet.protocol_level  # type: ignore[union-attr]
                    if self.protocol_level == codec5.PROTOCOL_LEVEL:
                        rules = self._rules = _RULES5
        except MqttError as exc:
            error: MqttError | None = exc
        else:
            error = None
        if rules is _RULES5 and packets:
            try:
                self._resolve_aliases(packets)
            except MqttError as exc:  # a bad alias comes before a later error in the stream
                error = exc
        if error is not None:
            if error.level is None:
                error.level = self.protocol_level
            error.packets = packets
            self._failure = error
            raise error
        return packets

    def _too_large(self, first: int, data: bytes, pos: int, body: int, end: int) -> MqttError:
        """A packet over the limit. The connection's first CONNECT: with the level its body's first bytes
        announce, so that a version 5 client hears CONNACK 0x95 (PROTOCOL.md section 9) and a 3.1.1 one the
        silent close of section 8."""
        error = MqttError("frame_too_large", f"a {end - pos}-byte packet is over the {self._max}-byte limit",
                          PACKET_TOO_LARGE)
        if first == 0x10 and self.protocol_level is None:
            error.level = announced_level(data, body, end)
        return error

    def _refusal(self, first: int) -> MqttError:
        message, reason = (_FIRST_BYTE_ERRORS5 if self._rules is _RULES5 else _FIRST_BYTE_ERRORS)[first]  # type: ignore[misc]
        return MqttError("bad_frame", message, reason)

    def _resolve_aliases(self, packets: list[Packet]) -> None:
        """Topic Aliases (MQTT 5 section 3.3.2.3.4), in stream order; a bad one cuts `packets` short before it."""
        for index, packet in enumerate(packets):
            if type(packet) is not Publish or packet.properties.topic_alias is None:  # type: ignore[union-attr]
                continue
            alias = packet.properties.topic_alias  # type: ignore[union-attr]
            if alias > self._alias_maximum:
                error = MqttError("bad_frame", f"topic alias {alias} is over the maximum {self._alias_maximum}",
                                  TOPIC_ALIAS_INVALID)
            elif packet.topic:
                if self._aliases is None:
                    self._aliases = {}
                self._aliases[alias] = packet.topic
                continue
            elif self._aliases is not None and alias in self._aliases:
                packet.topic = self._aliases[alias]
                continue
            else:
                error = protocol_error(f"topic alias {alias} used before it was set")
            del packets[index:]
            raise error

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
    raise malformed("remaining length longer than 4 bytes")


def _connect(first: int, data: bytes, start: int, end: int) -> Connect:
    reader = Reader(data, start, end)
    name = reader.text("protocol name")
    if name != PROTOCOL_NAME:
        raise malformed(f"protocol name {name!r}, not {PROTOCOL_NAME!r}")
    level = reader.byte("protocol level")
    if level == codec5.PROTOCOL_LEVEL:
        try:
            return codec5.connect(reader, name)
        except MqttError as exc:
            exc.level = level  # so that the server answers a broken version 5 CONNECT with a CONNACK reason code
            raise
    if level != PROTOCOL_LEVEL:
        return Connect(name, level)
    flags, will_qos = connect_flags(reader)
    keep_alive = reader.u16("keep alive")
    client_id = reader.text("client identifier")  # may be empty: the server answers it, not the codec
    will = None
    if flags & 0x04:
        topic = topic_name(reader.binary("will topic"), "will topic")
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
        raise malformed("PUBLISH ends before its topic name")
    topic_end = start + 2 + (data[start] << 8 | data[start + 1])
    qos = first >> 1 & 3
    payload_start = topic_end + 2 if qos else topic_end
    if payload_start > end:
        raise malformed("PUBLISH ends inside its topic name or packet identifier")
    try:
        topic = data[start + 2:topic_end].decode()
    except UnicodeDecodeError:
        raise malformed("topic name is not well-formed UTF-8") from None
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        topic_name(data[start + 2:topic_end], "topic name")  # raises, saying why
    packet_id = None
    if qos:
        packet_id = data[topic_end] << 8 | data[topic_end + 1]
        if not packet_id:
            raise malformed("packet identifier 0")
    return Publish(topic, data[payload_start:end], qos, first & 1 == 1, first & 8 == 8, packet_id)


def _acknowledgement(kind: type[PubAck | PubRec | PubRel | PubComp]) -> Callable[[int, bytes, int, int], Packet]:
    """The decoder of a packet that is just a packet identifier (the header check fixed its length at 2)."""
    def decode(first: int, data: bytes, start: int, end: int) -> Packet:
        packet_id = data[start] << 8 | data[start + 1]
        if not packet_id:
            raise malformed("packet identifier 0")
        return kind(packet_id)
    return decode


def _subscribe(first: int, data: bytes, start: int, end: int) -> Subscribe:
    reader = Reader(data, start, end)
    packet = Subscribe(reader.packet_id())
    while reader.more():
        subscription = topic_filter(reader.binary("topic filter"))
        qos = reader.byte("requested QoS")
        if qos > 2:
            raise malformed(f"requested QoS byte {qos:#04x}: QoS above 2 or reserved bits set")
        packet.filters.append((subscription, qos))
    if not packet.filters:
        raise malformed("SUBSCRIBE without a topic filter")
    return packet


def _unsubscribe(first: int, data: bytes, start: int, end: int) -> Unsubscribe:
    reader = Reader(data, start, end)
    packet = Unsubscribe(reader.packet_id())
    while reader.more():
        packet.filters.append(topic_filter(reader.binary("topic filter")))
    if not packet.filters:
        raise malformed("UNSUBSCRIBE without a topic filter")
    return packet


Decoder = Callable[[int, bytes, int, int], Packet]
_DECODERS: dict[int, Decoder] = {
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


def _rules(errors: FirstByteErrors, decoders: dict[int, Decoder], fixed: dict[int, int]
           ) -> tuple[tuple[Decoder, int] | None, ...]:
    """Per first byte: None if a client may not send it, else (body decoder, fixed remaining length or -1)."""
    return tuple(None if errors[byte] else (decoders[byte >> 4], fixed.get(byte >> 4, -1)) for byte in range(256))


_RULES = _rules(_FIRST_BYTE_ERRORS, _DECODERS, _FIXED_LENGTH)
_RULES5 = _rules(_FIRST_BYTE_ERRORS5, {**_DECODERS, **codec5.DECODERS}, _FIXED_LENGTH5)
