"""The AMQP 0-9-1 frames of the hot path, encoded and decoded without py-amqp's generic machinery.

py-amqp builds each frame through a generic argument serializer, a Message object
and a lock, writes each with its own `sendall`, and reads each with three `recv`s
(header, payload, frame end). At thousands of publishes and deliveries a second
that was most of a worker's broker time. Here the few frames the hot path uses
(basic.publish with its content, basic.ack of a delivery; basic.deliver, basic.return,
basic.ack/nack, channel.close) are packed and unpacked
directly, and message properties that repeat are serialized once (`Properties`). The
publisher never decodes a basic.return's method (the message id in its header says which
publish it was); a partition owner reads its routing key (the holder's queue that is gone).
Everything else (the handshake, declares, heartbeats, connection.close)
stays py-amqp's; tests/unit/test_broker_wire.py checks the encodings here against py-amqp's.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from amqp.basic_message import Message
from amqp.exceptions import UnexpectedFrame
from amqp.serialization import decode_properties_basic

FRAME_END = 0xCE
METHOD, HEADER, BODY, HEARTBEAT = 1, 2, 3, 8
FRAME_OVERHEAD = 8  # type, channel, size (7 bytes) and the frame-end octet

_FRAME_HEAD = struct.Struct(">BHI")
_CONTENT_HEAD = struct.Struct(">BHIHHQ")  # frame head, then class id, weight, body size
_END = bytes((FRAME_END,))
_EMPTY_TABLE = b"\x00\x00\x00\x00"
_TAG_AND_BITS = struct.Struct(">QB")
_RECV_CHUNK = 1 << 16


def _sig(class_id: int, method_id: int) -> bytes:
    return struct.pack(">HH", class_id, method_id)


# Method signatures as the first four bytes of a method frame's payload.
BASIC_PUBLISH = _sig(60, 40)
BASIC_RETURN = _sig(60, 50)
BASIC_DELIVER = _sig(60, 60)
BASIC_ACK = _sig(60, 80)
BASIC_NACK = _sig(60, 120)
BASIC_REJECT = _sig(60, 90)
CHANNEL_CLOSE = _sig(20, 40)


def shortstr(text: str) -> bytes:
    """An AMQP short string: one length octet, then at most 255 bytes of UTF-8."""
    data = text.encode()
    if len(data) > 255:
        raise ValueError(f"an AMQP short string holds at most 255 bytes, not {len(data)}")
    return bytes((len(data),)) + data


def _read_shortstr(payload: bytes, offset: int) -> tuple[str, int]:
    end = offset + 1 + payload[offset]
    return payload[offset + 1:end].decode(), end


class Properties:
    """Basic properties whose fixed part is serialized once (by py-amqp), the rest per message.

    `variable` names the properties that change with each message; they must follow
    every fixed one in AMQP's property order and be strings, except `timestamp`.
    """

    _ORDER: ClassVar[list[str]] = [name for name, _ in Message.PROPERTIES]
    _TYPES: ClassVar[dict[str, str]] = dict(Message.PROPERTIES)

    def __init__(self, fixed: Mapping[str, Any], variable: Sequence[str] = ()) -> None:
        positions = [self._ORDER.index(name) for name in variable]
        if positions != sorted(positions) or (fixed and positions and
                                              min(positions) < max(map(self._ORDER.index, fixed))):
            raise ValueError("variable properties must follow the fixed ones, in AMQP order")
        if any(self._TYPES[name] not in ("s", "L") for name in variable):
            raise ValueError("variable properties must be strings or the timestamp")
        self.fixed = dict(fixed)
        self.variable = tuple(variable)
        self._longs = tuple(self._TYPES[name] == "L" for name in variable)
        sample = {name: 0 if self._TYPES[name] == "L" else "-" for name in variable}
        flags = Message(**self.fixed, **sample)._serialize_properties()[:2]
        self._prefix = flags + Message(**self.fixed)._serialize_properties()[2:]

    def encode(self, values: Sequence[Any]) -> bytes:
        """The property flags and list, for these values of the variable properties."""
        if not values:
            return self._prefix
        parts = [self._prefix]
        for value, long in zip(values, self._longs, strict=True):
            parts.append(struct.pack(">Q", value) if long else shortstr(value))
        return b"".join(parts)

    def as_dict(self, values: Sequence[Any]) -> dict[str, Any]:
        return {**self.fixed, **dict(zip(self.variable, values, strict=True))}


class WholeProperties(Properties):
    """Properties serialized whole for each message, by py-amqp: for the rare kind whose per-message
    properties include a table (AMQP headers, which come before the fixed delivery mode), such as an
    MQTT 5 event with User Properties. A value of None leaves its property out."""

    def __init__(self, fixed: Mapping[str, Any], variable: Sequence[str] = ()) -> None:
        self.fixed = dict(fixed)
        self.variable = tuple(variable)

    def encode(self, values: Sequence[Any]) -> bytes:
        return Message(**self.as_dict(values))._serialize_properties()

    def as_dict(self, values: Sequence[Any]) -> dict[str, Any]:
        present = {name: value for name, value in zip(self.variable, values, strict=True) if value is not None}
        return {**self.fixed, **present}


class PublishKind:
    """One kind of message this worker publishes: where it goes, how, with which properties.

    `message_id_at` says which variable property is the message id, by which a
    basic.return is matched to its publish (mandatory kinds only).
    """

    __slots__ = ("exchange", "mandatory", "message_id_at", "method_bits", "method_head", "properties")

    def __init__(self, exchange: str, mandatory: bool, properties: Properties,
                 message_id_at: int | None = None) -> None:
        if mandatory and message_id_at is None:
            raise ValueError("a mandatory kind needs a message id to match its returns")
        self.exchange, self.mandatory, self.properties = exchange, mandatory, properties
        self.message_id_at = message_id_at
        self.method_head = BASIC_PUBLISH + b"\x00\x00" + shortstr(exchange)  # reserved short, exchange
        self.method_bits = b"\x01" if mandatory else b"\x00"  # mandatory, not immediate

    def message_id(self, values: Sequence[Any]) -> str | None:
        return None if self.message_id_at is None else values[self.message_id_at]


def encode_publish(out: bytearray, channel: int, frame_max: int, kind: PublishKind, routing_key: str,
                   properties: bytes, body: bytes) -> None:
    """Append a basic.publish and its content (header, body split at frame_max) to `out`."""
    method = kind.method_head + shortstr(routing_key) + kind.method_bits
    out += _FRAME_HEAD.pack(METHOD, channel, len(method))
    out += method
    out += _END
    out += _CONTENT_HEAD.pack(HEADER, channel, 12 + len(properties), 60, 0, len(body))
    out += properties
    out += _END
    chunk = frame_max - FRAME_OVERHEAD
    for start in range(0, len(body), chunk):
        piece = body[start:start + chunk]
        out += _FRAME_HEAD.pack(BODY, channel, len(piece))
        out += piece
        out += _END


def _encode_method(out: bytearray, channel: int, payload: bytes) -> None:
    out += _FRAME_HEAD.pack(METHOD, channel, len(payload))
    out += payload
    out += _END


def encode_ack(tag: int, multiple: bool) -> bytes:
    """A basic.ack's payload as RabbitMQ sends it: what MemoryWire answers its publishes with."""
    return BASIC_ACK + _TAG_AND_BITS.pack(tag, multiple)


def encode_basic_ack(out: bytearray, channel: int, tag: int, multiple: bool = False) -> None:
    """Append our basic.ack of one delivery (a partition's message, done with), or with `multiple` of
    every delivery up to it (a stream's records, read)."""
    _encode_method(out, channel, encode_ack(tag, multiple=multiple))


def encode_basic_reject(out: bytearray, channel: int, tag: int) -> None:
    """Append our basic.reject of one delivery, requeued: its queue hands it out again."""
    _encode_method(out, channel, BASIC_REJECT + _TAG_AND_BITS.pack(tag, True))


def encode_properties(properties: Mapping[str, Any]) -> bytes:
    """Any basic properties (py-amqp's names), serialized by py-amqp: for a message passed on as it came."""
    return Message(**properties)._serialize_properties()


# -- inbound -------------------------------------------------------------------------------
def decode_ack(payload: bytes) -> tuple[int, bool]:
    """basic.ack or basic.nack: (delivery tag, multiple)."""
    tag, bits = _TAG_AND_BITS.unpack_from(payload, 4)
    return tag, bool(bits & 1)


def decode_deliver(payload: bytes) -> tuple[str, int, bool, str, str]:
    """basic.deliver: (consumer tag, delivery tag, redelivered, exchange, routing key)."""
    consumer_tag, offset = _read_shortstr(payload, 4)
    tag, bits = _TAG_AND_BITS.unpack_from(payload, offset)
    exchange, offset = _read_shortstr(payload, offset + 9)
    routing_key, _ = _read_shortstr(payload, offset)
    return consumer_tag, tag, bool(bits & 1), exchange, routing_key


def decode_return(payload: bytes) -> tuple[int, str, str]:
    """basic.return: (reply code, exchange, routing key)."""
    code = struct.unpack_from(">H", payload, 4)[0]
    _text, offset = _read_shortstr(payload, 6)
    exchange, offset = _read_shortstr(payload, offset)
    routing_key, _ = _read_shortstr(payload, offset)
    return code, exchange, routing_key


def decode_close(payload: bytes) -> tuple[int, str]:
    """channel.close or connection.close: (reply code, reply text)."""
    code = struct.unpack_from(">H", payload, 4)[0]
    text, _ = _read_shortstr(payload, 6)
    return code, text


def decode_header(payload: bytes) -> tuple[int, dict[str, Any]]:
    """A content header: (body size, properties as py-amqp names them)."""
    body_size = struct.unpack_from(">Q", payload, 4)[0]
    properties, _ = decode_properties_basic(payload, 12)
    return body_size, properties


class FrameReader:
    """Frames from a socket, read in large chunks: one `recv` for every frame that has arrived."""

    def __init__(self, sock: Any, pending: bytes = b"") -> None:
        self._sock = sock
        self._buffer = bytes(pending)
        self._position = 0

    def read(self) -> list[tuple[int, int, bytes]]:
        """Every complete frame buffered, as (type, channel, payload); waits for the socket when none is."""
        frames: list[tuple[int, int, bytes]] = []
        buffer, position, head = self._buffer, self._position, _FRAME_HEAD
        while True:
            end = len(buffer)
            needed = FRAME_OVERHEAD
            while end - position >= FRAME_OVERHEAD:
                frame_type, channel, size = head.unpack_from(buffer, position)
                stop = position + 7 + size
                if stop >= end:
                    needed = size + FRAME_OVERHEAD
                    break
                if buffer[stop] != FRAME_END:
                    raise UnexpectedFrame(f"frame end {buffer[stop]:#x}, not {FRAME_END:#x}")
                frames.append((frame_type, channel, buffer[position + 7:stop]))
                position = stop + 1
            if frames:
                self._buffer, self._position = buffer, position
                return frames
            data = self._sock.recv(max(_RECV_CHUNK, needed - (end - position)))
            if not data:
                raise ConnectionResetError("RabbitMQ closed the connection")
            buffer, position = buffer[position:] + data, 0
