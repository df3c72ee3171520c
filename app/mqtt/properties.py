"""MQTT 5 properties (standard section 2.2.2): the table of all 27, a strict decoder and an encoder.

A property is an identifier (one byte in practice: all are under 128) and a
value of the identifier's type. The table says, for each, its type, which
packet types may carry it (section 2.2.2.2's list; `WILL` for the will
properties of CONNECT's payload) and the values the standard forbids. The
decoder refuses, with the reason code the standard gives:

- 0x81 Malformed Packet: a property length running past the packet, a value
  running past the property length, an identifier unknown or not valid in
  that packet type, strings that are not well-formed UTF-8 or hold U+0000, and
  variable byte integers not in their fewest bytes;
- 0x82 Protocol Error: a property given twice that may appear once (only User
  Property repeats, and Subscription Identifier in a PUBLISH), a byte that must
  be 0 or 1 but is not, Receive Maximum, Maximum Packet Size or Subscription
  Identifier 0, a Response Topic that is no topic name, Authentication Data
  without an Authentication Method;
- 0x94 Topic Alias invalid: Topic Alias 0.
"""

from __future__ import annotations

import struct

from app.mqtt.packets import MqttError, Properties
from app.mqtt.reader import malformed, protocol_error, text, varint
from app.mqtt.reasons import TOPIC_ALIAS_INVALID

# Packet types (standard section 2.1.2), and WILL for the will properties inside CONNECT's payload.
WILL, CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = range(12)
DISCONNECT, AUTH = 14, 15
ALL = frozenset({CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, SUBACK, UNSUBSCRIBE,
                 UNSUBACK, DISCONNECT, AUTH, WILL})
_ACKS = frozenset({PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK})

# Value types (section 1.5).
BYTE, TWO, FOUR, VARINT, UTF8, PAIR, BINARY = range(7)

# identifier: (attribute of Properties, type, packet types that may carry it)
TABLE: dict[int, tuple[str, int, frozenset[int]]] = {
    0x01: ("payload_format_indicator", BYTE, frozenset({PUBLISH, WILL})),
    0x02: ("message_expiry_interval", FOUR, frozenset({PUBLISH, WILL})),
    0x03: ("content_type", UTF8, frozenset({PUBLISH, WILL})),
    0x08: ("response_topic", UTF8, frozenset({PUBLISH, WILL})),
    0x09: ("correlation_data", BINARY, frozenset({PUBLISH, WILL})),
    0x0B: ("subscription_identifiers", VARINT, frozenset({PUBLISH, SUBSCRIBE})),
    0x11: ("session_expiry_interval", FOUR, frozenset({CONNECT, CONNACK, DISCONNECT})),
    0x12: ("assigned_client_identifier", UTF8, frozenset({CONNACK})),
    0x13: ("server_keep_alive", TWO, frozenset({CONNACK})),
    0x15: ("authentication_method", UTF8, frozenset({CONNECT, CONNACK, AUTH})),
    0x16: ("authentication_data", BINARY, frozenset({CONNECT, CONNACK, AUTH})),
    0x17: ("request_problem_information", BYTE, frozenset({CONNECT})),
    0x18: ("will_delay_interval", FOUR, frozenset({WILL})),
    0x19: ("request_response_information", BYTE, frozenset({CONNECT})),
    0x1A: ("response_information", UTF8, frozenset({CONNACK})),
    0x1C: ("server_reference", UTF8, frozenset({CONNACK, DISCONNECT})),
    0x1F: ("reason_string", UTF8, _ACKS | {CONNACK, DISCONNECT, AUTH}),
    0x21: ("receive_maximum", TWO, frozenset({CONNECT, CONNACK})),
    0x22: ("topic_alias_maximum", TWO, frozenset({CONNECT, CONNACK})),
    0x23: ("topic_alias", TWO, frozenset({PUBLISH})),
    0x24: ("maximum_qos", BYTE, frozenset({CONNACK})),
    0x25: ("retain_available", BYTE, frozenset({CONNACK})),
    0x26: ("user_properties", PAIR, ALL),
    0x27: ("maximum_packet_size", FOUR, frozenset({CONNECT, CONNACK})),
    0x28: ("wildcard_subscription_available", BYTE, frozenset({CONNACK})),
    0x29: ("subscription_identifiers_available", BYTE, frozenset({CONNACK})),
    0x2A: ("shared_subscription_available", BYTE, frozenset({CONNACK})),
}
# Per packet type, the table's entries that type allows: the decoder's one lookup per property.
_ALLOWED = {kind: {ident: entry for ident, entry in TABLE.items() if kind in entry[2]} for kind in ALL}
_BOOLEAN = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})  # 0 or 1, anything else a Protocol Error
_NOT_ZERO = frozenset({0x0B, 0x21, 0x23, 0x27})  # Subscription Identifier, Receive Maximum, Topic Alias, Max. Packet Size
_U16 = struct.Struct(">H")
_new = object.__new__


def decode(data: bytes, pos: int, end: int, kind: int) -> tuple[Properties, int]:
    """The properties at data[pos:end] for a packet of type `kind`, and the index after them.

    Every PUBLISH of a version 5 connection comes through here, so the common
    reads (a one-byte length, two- and four-byte integers, strings, User
    Properties) are inlined rather than calls: a call costs about as much as a
    property.
    """
    if pos >= end:
        raise malformed("packet ends before its property length")
    length = data[pos]
    if length & 0x80:
        length, pos = varint(data, pos, end, "property length")
    else:
        pos += 1
    stop = pos + length
    if stop > end:
        raise malformed("property length runs past the end of the packet")
    props = _new(Properties)  # absent properties read as their class-level defaults (see Properties)
    if not length:
        return props, pos
    allowed = _ALLOWED[kind]
    found: dict[str, object] = {}
    pairs: list[tuple[str, str]] = []
    while pos < stop:
        ident = data[pos]
        entry = allowed.get(ident)
        if entry is None:
            if ident in TABLE:
                raise malformed(f"property {ident:#04x} ({TABLE[ident][0]}) is not allowed in this packet")
            raise malformed(f"unknown property identifier {ident:#04x}")
        name, kind_of_value, _ = entry
        pos += 1
        value: object
        if kind_of_value == PAIR:  # the commonest in events: inlined
            if pos + 2 > stop or (after := pos + 2 + (data[pos] << 8 | data[pos + 1])) + 2 > stop or (
                    end_value := after + 2 + (data[after] << 8 | data[after + 1])) > stop:
                raise malformed("user property runs past the property length")
            try:
                key, item = data[pos + 2:after].decode(), data[after + 2:end_value].decode()
            except UnicodeDecodeError:
                raise malformed("user property is not well-formed UTF-8") from None
            if "\x00" in key or "\x00" in item:
                raise malformed("user property holds U+0000")
            pairs.append((key, item))
            pos = end_value
            continue
        if kind_of_value == FOUR:
            if pos + 4 > stop:
                raise malformed(f"{name} runs past the property length")
            value = int.from_bytes(data[pos:pos + 4], "big")
            pos += 4
        elif kind_of_value == TWO:
            if pos + 2 > stop:
                raise malformed(f"{name} runs past the property length")
            value = data[pos] << 8 | data[pos + 1]
            pos += 2
        elif kind_of_value == BYTE:
            if pos >= stop:
                raise malformed(f"{name} runs past the property length")
            value = data[pos]
            pos += 1
            if value > 1 and ident in _BOOLEAN:
                raise protocol_error(f"{name} is {value}, not 0 or 1")
        elif kind_of_value == VARINT:
            value, pos = varint(data, pos, stop, name)
            if ident == 0x0B:  # Subscription Identifier: a tuple of them
                if not value:
                    raise protocol_error(f"{name} is 0")
                if name in found and kind != PUBLISH:
                    raise protocol_error(f"{name} given more than once")
                found[name] = (*found.get(name, ()), value)  # type: ignore[misc]
                continue
        else:
            if pos + 2 > stop or (after := pos + 2 + (data[pos] << 8 | data[pos + 1])) > stop:
                raise malformed(f"{name} runs past the property length")
            value = data[pos + 2:after] if kind_of_value == BINARY else text(data[pos + 2:after], name)
            pos = after
        if not value and ident in _NOT_ZERO:
            if ident == 0x23:
                raise MqttError("bad_frame", "topic alias 0", TOPIC_ALIAS_INVALID)
            raise protocol_error(f"{name} is 0")
        if name in found:
            raise protocol_error(f"{name} given more than once")
        found[name] = value
    if "response_topic" in found:
        topic = found["response_topic"]
        if not topic or "+" in topic or "#" in topic:  # type: ignore[operator]
            raise protocol_error(f"response topic {topic!r} is not a topic name")
    if "authentication_data" in found and "authentication_method" not in found:
        raise protocol_error("authentication data without an authentication method")
    if pairs:
        found["user_properties"] = tuple(pairs)
    props.__dict__ = found
    return props, pos


# --- encoding: the server's packets ------------------------------------------------------------------

_BY_NAME = {name: (ident, kind_of_value, kinds) for ident, (name, kind_of_value, kinds) in TABLE.items()}
_INTEGER = {BYTE: struct.Struct(">BB"), TWO: struct.Struct(">BH"), FOUR: struct.Struct(">BI")}  # identifier, value
_STRING_HEAD = struct.Struct(">BH")  # identifier, length
_U16 = struct.Struct(">H")
_MAX_VARINT = 268_435_455


def varint_bytes(value: int) -> bytes:
    """A variable byte integer in its fewest bytes (section 1.5.5)."""
    if not 0 <= value <= _MAX_VARINT:
        raise ValueError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | 0x80 if value else digit)
        if not value:
            return bytes(out)


def _string(value: str | bytes, what: str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    if len(raw) > 0xFFFF:
        raise ValueError(f"{what} is over 65535 bytes")
    return _U16.pack(len(raw)) + raw


def encode(props: Properties | None, kind: int) -> bytes:
    """The property length and properties of `props` for a packet of type `kind`.

    A property the type does not allow, or a value out of its type's range, is
    a programming error (ValueError): the gateway, not the wire, chose them.
    Each command the gateway sends goes through here (PROTOCOL.md section 9
    gives it five properties), so values are packed with their identifier in
    one struct call.
    """
    if props is None:
        return b"\x00"
    out: list[bytes] = []
    for name, value in vars(props).items():  # only those present when the decoder built it; all 27 otherwise
        if value is None:
            continue
        ident, kind_of_value, kinds = _BY_NAME[name]
        if kind not in kinds:
            if value == ():
                continue
            raise ValueError(f"{name} is not allowed in packet type {kind}")
        if kind_of_value == UTF8 or kind_of_value == BINARY:
            raw = value.encode() if kind_of_value == UTF8 else value
            if len(raw) > 0xFFFF:
                raise ValueError(f"{name} is over 65535 bytes")
            out += (_STRING_HEAD.pack(ident, len(raw)), raw)
        elif kind_of_value == PAIR:
            out += [b"\x26" + _string(key, name) + _string(item, name) for key, item in value]
        elif kind_of_value == VARINT:
            if not all(0 < item <= _MAX_VARINT for item in value):
                raise ValueError(f"{name} {value!r}: each must be in 1-268435455")
            out += [bytes((ident,)) + varint_bytes(item) for item in value]
        else:
            if kind_of_value == BYTE and not 0 <= value <= 1:  # every byte property is a 0-or-1 flag
                raise ValueError(f"{name} {value} is not 0 or 1")
            try:
                out.append(_INTEGER[kind_of_value].pack(ident, value))
            except struct.error:
                raise ValueError(f"{name} {value} is out of range") from None
    body = b"".join(out)
    return (bytes((len(body),)) if len(body) < 128 else varint_bytes(len(body))) + body
