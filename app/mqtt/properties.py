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
_EMPTY = Properties()


def decode(data: bytes, pos: int, end: int, kind: int) -> tuple[Properties, int]:
    """The properties at data[pos:end] for a packet of type `kind`, and the index after them."""
    length, pos = varint(data, pos, end, "property length")
    stop = pos + length
    if stop > end:
        raise malformed("property length runs past the end of the packet")
    if not length:
        return Properties(), pos
    allowed = _ALLOWED[kind]
    found: dict[str, object] = {}
    pairs: list[tuple[str, str]] = []
    identifiers: list[int] = []
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
        if kind_of_value == BYTE:
            if pos >= stop:
                raise malformed(f"{name} runs past the property length")
            value = data[pos]
            pos += 1
            if value > 1 and ident in _BOOLEAN:
                raise protocol_error(f"{name} is {value}, not 0 or 1")
        elif kind_of_value == TWO or kind_of_value == FOUR:
            size = 2 if kind_of_value == TWO else 4
            if pos + size > stop:
                raise malformed(f"{name} runs past the property length")
            value = int.from_bytes(data[pos:pos + size], "big")
            pos += size
        elif kind_of_value == VARINT:
            value, pos = varint(data, pos, stop, name)
        elif kind_of_value == PAIR:
            key, pos = _binary(data, pos, stop, "user property name")
            raw, pos = _binary(data, pos, stop, "user property value")
            pairs.append((text(key, "user property name"), text(raw, "user property value")))
            continue
        else:
            raw, pos = _binary(data, pos, stop, name)
            value = raw if kind_of_value == BINARY else text(raw, name)
        if not value and ident in _NOT_ZERO:
            if ident == 0x23:
                raise MqttError("bad_frame", "topic alias 0", TOPIC_ALIAS_INVALID)
            raise protocol_error(f"{name} is 0")
        if ident == 0x0B:
            if identifiers and kind != PUBLISH:
                raise protocol_error(f"{name} given more than once")
            identifiers.append(value)  # type: ignore[arg-type]
            continue
        if name in found:
            raise protocol_error(f"{name} given more than once")
        found[name] = value
    if pos != stop:  # a value's last byte ended past the property length
        raise malformed("a property runs past the property length")
    response_topic = found.get("response_topic")
    if response_topic is not None and (not response_topic or "+" in response_topic or "#" in response_topic):
        raise protocol_error(f"response topic {response_topic!r} is not a topic name")
    if "authentication_data" in found and "authentication_method" not in found:
        raise protocol_error("authentication data without an authentication method")
    props = Properties(**found)  # type: ignore[arg-type]
    if pairs:
        props.user_properties = tuple(pairs)
    if identifiers:
        props.subscription_identifiers = tuple(identifiers)
    return props, pos


def _binary(data: bytes, pos: int, stop: int, what: str) -> tuple[bytes, int]:
    if pos + 2 > stop:
        raise malformed(f"{what} runs past the property length")
    start = pos + 2
    after = start + (data[pos] << 8 | data[pos + 1])
    if after > stop:
        raise malformed(f"{what} runs past the property length")
    return data[start:after], after


# --- encoding: the server's packets ------------------------------------------------------------------

_ORDER = tuple((ident, *entry) for ident, entry in sorted(TABLE.items()))
_LIMITS = {BYTE: 0xFF, TWO: 0xFFFF, FOUR: 0xFFFF_FFFF, VARINT: 268_435_455}


def varint_bytes(value: int) -> bytes:
    """A variable byte integer in its fewest bytes (section 1.5.5)."""
    if not 0 <= value <= 268_435_455:
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
    """
    if props is None or props == _EMPTY:
        return b"\x00"
    out: list[bytes] = []
    for ident, name, kind_of_value, kinds in _ORDER:
        value = getattr(props, name)
        if value is None or value == ():
            continue
        if kind not in kinds:
            raise ValueError(f"{name} is not allowed in packet type {kind}")
        if kind_of_value == PAIR:
            out += [b"\x26" + _string(key, name) + _string(item, name) for key, item in value]
            continue
        if kind_of_value == VARINT:
            if not all(0 < item <= _LIMITS[VARINT] for item in value):
                raise ValueError(f"{name} {value!r}: each must be in 1-268435455")
            out += [bytes((ident,)) + varint_bytes(item) for item in value]
            continue
        if kind_of_value in (UTF8, BINARY):
            out.append(bytes((ident,)) + _string(value, name))
            continue
        if not 0 <= value <= _LIMITS[kind_of_value] or ident in _BOOLEAN and value > 1:
            raise ValueError(f"{name} {value} is out of range")
        size = {BYTE: 1, TWO: 2, FOUR: 4}[kind_of_value]
        out.append(bytes((ident,)) + value.to_bytes(size, "big"))
    body = b"".join(out)
    return varint_bytes(len(body)) + body
