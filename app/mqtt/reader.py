"""What both MQTT decoders (3.1.1 in app.mqtt.codec, 5.0 in app.mqtt.codec5) read the same way.

UTF-8 string fields, topic names and filters, and `Reader`, which walks one
packet's body with every read checked against the body's end. Errors are
`MqttError`s carrying the MQTT 5 reason code the standard gives them: 0x81
(Malformed Packet) for bytes that cannot be parsed, 0x82 (Protocol Error) for
well-formed bytes that break a rule; a 3.1.1 connection just closes on either.
"""

from __future__ import annotations

from app.mqtt.packets import MqttError
from app.mqtt.reasons import MALFORMED, PROTOCOL_ERROR


def malformed(message: str) -> MqttError:
    return MqttError("bad_frame", message, MALFORMED)


def protocol_error(message: str) -> MqttError:
    return MqttError("bad_frame", message, PROTOCOL_ERROR)


# A CONNECT's body begins with the protocol name "MQTT" (a two-byte length, then 4 bytes) and the level byte.
CONNECT_PREFIX = 7
_PROTOCOL_NAME = b"\x00\x04MQTT"


def announced_level(data: bytes, start: int, end: int) -> int | None:
    """The protocol level a CONNECT whose body is data[start:end] announces, from its first 7 bytes alone;
    None when they are not all in `data` or do not name MQTT (a client that speaks neither 3.1.1 nor 5).

    For a CONNECT too large to be buffered (section 4.13.1 lets a version 5 client be told why):
    everything else about it is unknown, and stays so.
    """
    prefix = data[start:min(end, start + CONNECT_PREFIX)]
    if len(prefix) < CONNECT_PREFIX or prefix[:-1] != _PROTOCOL_NAME:
        return None
    return prefix[-1]


def connect_flags(reader: Reader) -> tuple[int, int]:
    """A CONNECT's flags byte, checked as both levels check it (section 3.1.2.3): (flags, will QoS)."""
    flags = reader.byte("connect flags")
    if flags & 0x01:
        raise malformed("reserved connect flag set")
    will_qos = flags >> 3 & 3
    if not flags & 0x04 and flags & 0x38:
        raise malformed("will QoS or retain set without the will flag")
    if will_qos == 3:
        raise malformed("will QoS 3")
    return flags, will_qos


def text(raw: bytes, what: str) -> str:
    """A UTF-8 string field: well-formed (no surrogates, no overlong forms) and free of U+0000 (section 1.5.3)."""
    try:
        decoded = raw.decode()
    except UnicodeDecodeError:
        raise malformed(f"{what} is not well-formed UTF-8") from None
    if "\x00" in decoded:  # str membership: several times faster than bytes membership
        raise malformed(f"{what} holds U+0000")
    return decoded


def topic_name(raw: bytes, what: str) -> str:
    """A topic name (section 4.7): at least one character, no wildcard."""
    decoded = text(raw, what)
    if not decoded:
        raise malformed(f"{what} is empty")
    if "+" in decoded or "#" in decoded:
        raise malformed(f"{what} holds a wildcard")
    return decoded


def topic_filter(raw: bytes) -> str:
    """A topic filter (section 4.7.1): `+` fills a whole level, `#` only a whole last level."""
    decoded = text(raw, "topic filter")
    if not decoded:
        raise malformed("empty topic filter")
    if "+" in decoded or "#" in decoded:
        levels = decoded.split("/")
        for index, level in enumerate(levels):
            if level == "#" and index < len(levels) - 1 or level not in ("+", "#") and ("+" in level or "#" in level):
                raise malformed(f"misplaced wildcard in topic filter {decoded!r}")
    return decoded


def varint(data: bytes, pos: int, end: int, what: str, minimal: bool = True) -> tuple[int, int]:
    """(value, index after it) of a variable byte integer inside data[pos:end] (MQTT 5 section 1.5.5).

    MQTT 5 requires the fewest bytes (MQTT-1.5.5-1), so `minimal` refuses 0x80 0x00
    for 0; the 3.1.1 remaining length is read leniently elsewhere.
    """
    value = 0
    for index in range(pos, min(pos + 4, end)):
        byte = data[index]
        value |= (byte & 0x7F) << 7 * (index - pos)
        if not byte & 0x80:
            if minimal and index > pos and not byte:
                raise malformed(f"{what} is not encoded in the fewest bytes")
            return value, index + 1
    if end - pos >= 4:
        raise malformed(f"{what} is longer than 4 bytes")
    raise malformed(f"packet ends inside its {what}")


class Reader:
    """Sequential reads inside one packet's body, each checked against the body's end."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, start: int, end: int) -> None:
        self.data, self.pos, self.end = data, start, end

    def more(self) -> bool:
        return self.pos < self.end

    def byte(self, what: str) -> int:
        if self.pos >= self.end:
            raise malformed(f"packet ends before its {what}")
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self, what: str) -> int:
        return self.byte(what) << 8 | self.byte(what)

    def binary(self, what: str) -> bytes:
        """A two-byte length followed by that many bytes (sections 1.5.3 and 3.1.3)."""
        start = self.pos + 2
        stop = start + self.u16(what)
        if stop > self.end:
            raise malformed(f"{what} runs past the end of its packet")
        self.pos = stop
        return self.data[start:stop]

    def text(self, what: str) -> str:
        return text(self.binary(what), what)

    def packet_id(self) -> int:
        packet_id = self.u16("packet identifier")
        if not packet_id:
            raise malformed("packet identifier 0")
        return packet_id

    def finish(self, what: str) -> None:
        if self.pos != self.end:
            raise malformed(f"bytes left over after the {what}")
