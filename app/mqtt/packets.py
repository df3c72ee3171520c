"""The MQTT control packets: those a client sends, as the decoder reports them, and those a server sends.

A client's packets are plain slotted dataclasses: the hot path builds one per
PINGREQ, PUBLISH and PUBACK, so they carry no behaviour and no validation of
their own (the decoders, app.mqtt.codec and app.mqtt.codec5, have checked
everything the standard and PROTOCOL.md sections 8 and 9 ask for). The same
classes serve both versions: MQTT 5's additions (reason codes, `properties`)
have defaults, so a 3.1.1 packet compares equal to one built without them and
its `properties` is None. A server's packets are pure functions that return
the bytes to send: 3.1.1's here, MQTT 5's in app.mqtt.packets5.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from app.mqtt.reasons import MALFORMED


class MqttError(Exception):
    """A stream that breaks MQTT; the connection must be closed.

    `code` is the PROTOCOL.md section 4 error code the failure is counted under
    (`bad_frame` for a malformed packet, `frame_too_large` for an oversize one).
    `reason` is the MQTT 5 reason code for the CONNACK or DISCONNECT that says
    why on a version 5 connection (0x81 Malformed Packet, 0x82 Protocol Error,
    0x94 Topic Alias invalid, 0x95 Packet too large, 0x99 Payload format
    invalid); a 3.1.1 connection has no way to say it and just closes.
    `level` is the connection's protocol level once its CONNECT said it (5:
    answer with `reason`; for a first CONNECT too large to read, the level its
    first bytes announce), else None. `packets` holds what the same `feed` call
    decoded before the failure, so that
    a stream yields the same packets however it was split into feeds.
    """

    def __init__(self, code: str, message: str, reason: int = MALFORMED) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.level: int | None = None  # the connection's protocol level, when known (the decoder sets it)
        self.packets: list[Packet] = []


@dataclass(repr=False)
class Properties:
    """The properties of an MQTT 5 packet (standard section 2.2.2); None (or no pairs) where absent.

    One class for every packet type: app.mqtt.properties knows which property each
    type allows and refuses the others, so a decoded packet only ever has its
    own set. Names follow the standard's. `user_properties` keeps the pairs in
    order, repeats included (a tuple, so that equal packets compare equal);
    `subscription_identifiers` too (a server's PUBLISH may carry several).

    Not slotted, unlike the packets: each field's default is then a class
    attribute, so the decoder builds an instance by filling its `__dict__` with
    the properties present, instead of calling a 27-argument `__init__`.
    """

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifiers: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: int | None = None
    will_delay_interval: int | None = None
    request_response_information: int | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: int | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: int | None = None
    subscription_identifiers_available: int | None = None
    shared_subscription_available: int | None = None

    def __repr__(self) -> str:
        """Only the properties present: 27 fields, mostly None, would bury them in a log line or a failed assert."""
        present = (f"{name}={value!r}" for name in self.__dataclass_fields__
                   if (value := getattr(self, name)) is not None and value != ())
        return f"Properties({', '.join(present)})"


@dataclass(slots=True)
class Will:
    """The will message of a CONNECT: published by the server if the connection ends without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None = None  # MQTT 5: Will Delay Interval, Message Expiry Interval, ...


@dataclass(slots=True)
class Connect:
    """CONNECT. With a `protocol_level` other than 4 or 5 only the protocol name and level are decoded.

    The rest of such a packet follows another version's layout, and the server's
    only answer to it is CONNACK 0x01, so the other fields keep their defaults.
    `password` is binary data in MQTT; the device's token travels there. At level
    5, `clean_session` is the Clean Start flag and `properties` holds Session
    Expiry Interval, Receive Maximum, Maximum Packet Size, Topic Alias Maximum,
    Request Response/Problem Information, User Properties and Authentication
    Method/Data.
    """

    protocol_name: str
    protocol_level: int
    client_id: str = ""
    clean_session: bool = True
    keep_alive: int = 0
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None
    properties: Properties | None = None


@dataclass(slots=True)
class Publish:
    """PUBLISH; `packet_id` is None at QoS 0, which carries none.

    MQTT 5: `topic` is the topic the packet means, its Topic Alias resolved by
    the decoder (`properties.topic_alias` still says which alias it used or set).
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties | None = None


@dataclass(slots=True)
class PubAck:
    packet_id: int
    reason_code: int = 0  # MQTT 5; 3.1.1 has none (it means success)
    properties: Properties | None = None


@dataclass(slots=True)
class PubRec:
    packet_id: int
    reason_code: int = 0  # MQTT 5; 3.1.1 has none (it means success)
    properties: Properties | None = None


@dataclass(slots=True)
class PubRel:
    packet_id: int
    reason_code: int = 0  # MQTT 5; 3.1.1 has none (it means success)
    properties: Properties | None = None


@dataclass(slots=True)
class PubComp:
    packet_id: int
    reason_code: int = 0  # MQTT 5; 3.1.1 has none (it means success)
    properties: Properties | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """MQTT 5 subscription options (standard section 3.8.3.1), besides the requested QoS."""

    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(slots=True)
class Subscribe:
    """SUBSCRIBE: (topic filter, requested QoS) pairs, at least one.

    MQTT 5: `options[i]` holds the rest of filter i's options byte, and
    `properties` its Subscription Identifier and User Properties; 3.1.1 leaves
    `options` empty.
    """

    packet_id: int
    filters: list[tuple[str, int]] = field(default_factory=list)
    options: list[SubscriptionOptions] = field(default_factory=list)
    properties: Properties | None = None


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    filters: list[str] = field(default_factory=list)
    properties: Properties | None = None


@dataclass(slots=True)
class PingReq:
    pass


@dataclass(slots=True)
class Disconnect:
    """DISCONNECT; MQTT 5 adds a reason code (0x04: publish the will) and properties."""

    reason_code: int = 0
    properties: Properties | None = None


@dataclass(slots=True)
class Auth:
    """MQTT 5 AUTH (enhanced authentication), which the gateway does not offer: decoded so it can say so."""

    reason_code: int = 0
    properties: Properties | None = None


Packet = (Connect | Publish | PubAck | PubRec | PubRel | PubComp | Subscribe | Unsubscribe | PingReq | Disconnect
          | Auth)


# The packets a server sends. Their arguments come from the gateway, not the wire, so a bad one is a
# programming error (ValueError), not an MqttError.

MAX_REMAINING_LENGTH = 268_435_455  # four 7-bit groups: the most a remaining length can say
PINGRESP = b"\xd0\x00"
_CONNACKS = {(code, present): bytes((0x20, 2, int(present), code)) for code in range(6) for present in (False, True)}
_HEAD = struct.Struct(">BBH")  # first byte, a one-byte remaining length, then a packet id or a topic's length
_U16 = struct.Struct(">H")
SUBACK_FAILURE = 0x80


def _check_packet_id(packet_id: int | None) -> None:
    if packet_id is None or not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet identifier {packet_id} is not in 1-65535")


def _remaining_length_bytes(length: int) -> bytes:
    if length > MAX_REMAINING_LENGTH:
        raise ValueError(f"a {length}-byte body is more than MQTT can frame")
    out = bytearray()
    while True:
        length, digit = divmod(length, 128)
        out.append(digit | 0x80 if length else digit)
        if not length:
            return bytes(out)


def connack(return_code: int, session_present: bool = False) -> bytes:
    """CONNACK; a refusal (return code other than 0) cannot claim a session (MQTT-3.2.2-4)."""
    if return_code and session_present:
        raise ValueError("session present must be 0 with a non-zero return code")
    try:
        return _CONNACKS[return_code, bool(session_present)]
    except KeyError:
        raise ValueError(f"CONNACK return code {return_code} is not in 0-5") from None


def publish(topic: str, payload: bytes, qos: int = 0, packet_id: int | None = None, retain: bool = False,
            dup: bool = False) -> bytes:
    """PUBLISH: a packet identifier at QoS 1 and 2 only, DUP only with one."""
    raw = topic.encode()
    if not raw or "+" in topic or "#" in topic or "\x00" in topic or len(raw) > 0xFFFF:
        raise ValueError(f"{topic!r} is not a topic name")
    first = 0x30 | qos << 1 | retain
    if qos == 0:
        if packet_id is not None or dup:
            raise ValueError("a QoS 0 PUBLISH has no packet identifier and no DUP")
        length = 2 + len(raw) + len(payload)
        tail = b""
    elif qos in (1, 2):
        _check_packet_id(packet_id)
        length = 4 + len(raw) + len(payload)
        tail = _U16.pack(packet_id)
        first |= dup << 3
    else:
        raise ValueError(f"QoS {qos} is not 0, 1 or 2")
    if length < 128:
        return b"".join((_HEAD.pack(first, length, len(raw)), raw, tail, payload))
    return b"".join((bytes((first,)), _remaining_length_bytes(length), _U16.pack(len(raw)), raw, tail, payload))


def puback(packet_id: int) -> bytes:
    _check_packet_id(packet_id)
    return _HEAD.pack(0x40, 2, packet_id)


def suback(packet_id: int, return_codes: list[int]) -> bytes:
    """SUBACK: one return code per filter of the SUBSCRIBE, each a granted QoS or 0x80 (failure)."""
    _check_packet_id(packet_id)
    if not return_codes or any(code not in (0, 1, 2, SUBACK_FAILURE) for code in return_codes):
        raise ValueError(f"SUBACK return codes {return_codes!r}: need one or more of 0, 1, 2, 0x80")
    return b"".join((b"\x90", _remaining_length_bytes(2 + len(return_codes)), _U16.pack(packet_id),
                     bytes(return_codes)))


def unsuback(packet_id: int) -> bytes:
    _check_packet_id(packet_id)
    return _HEAD.pack(0xB0, 2, packet_id)


def pingresp() -> bytes:
    """PINGRESP, prebuilt: it never varies."""
    return PINGRESP
