"""The MQTT 5.0 codec (app.mqtt with a level 5 CONNECT, app.mqtt.properties, app.mqtt.packets5).

Client packets and properties are built here by hand from the OASIS standard
(sections 2.2.2 and 3), not with the codec's own encoders, so a shared misreading
cannot make a test pass; test_mqtt5_real_clients.py checks both against paho-mqtt's
MQTT 5 client. Every refusal asserts the MQTT 5 reason code the standard gives it.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.mqtt import (
    Auth,
    Connect,
    Disconnect,
    MqttDecoder,
    MqttError,
    Packet,
    PingReq,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    Subscribe,
    SubscriptionOptions,
    Unsubscribe,
    Will,
    packets5,
    properties,
)

LIMIT = 65536

# --- client packets, by the book ----------------------------------------------------------------------

# Section 2.2.2.2: each property's identifier and type.
TYPES = {0x01: "byte", 0x02: "u32", 0x03: "utf8", 0x08: "utf8", 0x09: "bin", 0x0B: "varint", 0x11: "u32",
         0x12: "utf8", 0x13: "u16", 0x15: "utf8", 0x16: "bin", 0x17: "byte", 0x18: "u32", 0x19: "byte", 0x1A: "utf8",
         0x1C: "utf8", 0x1F: "utf8", 0x21: "u16", 0x22: "u16", 0x23: "u16", 0x24: "byte", 0x25: "byte",
         0x26: "pair", 0x27: "u32", 0x28: "byte", 0x29: "byte", 0x2A: "byte"}


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def frame(first: int, body: bytes = b"") -> bytes:
    return bytes([first]) + varint(len(body)) + body


def string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return len(raw).to_bytes(2, "big") + raw


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def prop(ident: int, value: object) -> bytes:
    """One property: identifier, then the value as its type says."""
    kind = TYPES[ident]
    if kind == "byte":
        raw = bytes([value])
    elif kind in ("u16", "u32"):
        raw = value.to_bytes(2 if kind == "u16" else 4, "big")
    elif kind == "varint":
        raw = varint(value)
    elif kind == "pair":
        raw = string(value[0]) + string(value[1])
    else:
        raw = string(value)
    return bytes([ident]) + raw


def props(*items: bytes) -> bytes:
    body = b"".join(items)
    return varint(len(body)) + body


NONE = b"\x00"  # a property length of 0


def connect5(client_id: str | bytes = "lock-0001", keep_alive: int = 60, clean: bool = True,
             properties: bytes = NONE, will: tuple[str, bytes, int, bool, bytes] | None = None,
             username: str | None = None, password: bytes | None = None, *, flags: int | None = None,
             tail: bytes = b"") -> bytes:
    bits = clean << 1
    payload = string(client_id)
    if will is not None:
        topic, message, qos, retain, will_properties = will
        bits |= 0x04 | qos << 3 | retain << 5
        payload += will_properties + string(topic) + string(message)
    if username is not None:
        bits |= 0x80
        payload += string(username)
    if password is not None:
        bits |= 0x40
        payload += string(password)
    return frame(0x10, string("MQTT") + bytes([5, bits if flags is None else flags]) + u16(keep_alive) + properties
                 + payload + tail)


def publish5(topic: str | bytes, payload: bytes = b"", qos: int = 0, packet_id: int | None = None,
             properties: bytes = NONE, retain: bool = False, dup: bool = False) -> bytes:
    head = string(topic) + (u16(packet_id) if qos else b"")
    return frame(0x30 | dup << 3 | qos << 1 | retain, head + properties + payload)


def ack(first: int, packet_id: int, reason: int | None = None, properties: bytes | None = None) -> bytes:
    return frame(first, u16(packet_id) + (b"" if reason is None else bytes([reason])) + (properties or b""))


def subscribe5(packet_id: int, filters: list[tuple[str, int]], properties: bytes = NONE) -> bytes:
    return frame(0x82, u16(packet_id) + properties + b"".join(string(f) + bytes([o]) for f, o in filters))


def unsubscribe5(packet_id: int, filters: list[str], properties: bytes = NONE) -> bytes:
    return frame(0xA2, u16(packet_id) + properties + b"".join(string(f) for f in filters))


def tail_packet(first: int, reason: int | None = None, properties: bytes | None = None) -> bytes:
    """DISCONNECT or AUTH: an optional reason code, then optional properties."""
    return frame(first, (b"" if reason is None else bytes([reason])) + (properties or b""))


HELLO = connect5()


def after_hello(data: bytes, limit: int = LIMIT) -> list[Packet]:
    """What `data` decodes to on a connection that a version 5 CONNECT opened."""
    decoded = MqttDecoder(limit).feed(HELLO + data)
    assert decoded[0] == Connect("MQTT", 5, "lock-0001", True, 60, properties=Properties())
    return decoded[1:]


def refusal(data: bytes, limit: int = LIMIT) -> tuple[str, int]:
    """(section 4 code, MQTT 5 reason code) of the error `data` raises after a version 5 CONNECT; `data` that is
    itself a CONNECT is fed alone."""
    stream = data if data[0] == 0x10 else HELLO + data
    with pytest.raises(MqttError) as caught:
        MqttDecoder(limit).feed(stream)
    assert caught.value.level == 5
    return caught.value.code, caught.value.reason


# --- round trips -------------------------------------------------------------------------------------------

CONNECT_PROPS = props(prop(0x11, 3600), prop(0x21, 20), prop(0x27, 65536), prop(0x22, 10), prop(0x19, 1),
                      prop(0x17, 0), prop(0x26, ("sdk", "esp-idf")), prop(0x26, ("sdk", "5.1")), prop(0x15, "SCRAM"),
                      prop(0x16, b"\x01\x02"))
WILL_PROPS = props(prop(0x18, 30), prop(0x01, 1), prop(0x02, 600), prop(0x03, "application/json"),
                   prop(0x08, "replies/x"), prop(0x09, b"\x00corr"), prop(0x26, ("k", "v")))
PUBLISH_PROPS = props(prop(0x01, 1), prop(0x02, 60), prop(0x23, 3), prop(0x08, "replies/c-1"), prop(0x09, b"c-1"),
                      prop(0x26, ("a", "1")), prop(0x26, ("a", "2")), prop(0x03, "text/plain"))

CLIENT_PACKETS = [
    (connect5("lock-0001", 45, False, CONNECT_PROPS, ("events/gone", b'"bye"', 1, True, WILL_PROPS), "sdk", b"t0k"),
     Connect("MQTT", 5, "lock-0001", False, 45,
             Will("events/gone", b'"bye"', 1, True, Properties(
                 will_delay_interval=30, payload_format_indicator=1, message_expiry_interval=600,
                 content_type="application/json", response_topic="replies/x", correlation_data=b"\x00corr",
                 user_properties=(("k", "v"),))),
             "sdk", b"t0k",
             Properties(session_expiry_interval=3600, receive_maximum=20, maximum_packet_size=65536,
                        topic_alias_maximum=10, request_response_information=1, request_problem_information=0,
                        user_properties=(("sdk", "esp-idf"), ("sdk", "5.1")), authentication_method="SCRAM",
                        authentication_data=b"\x01\x02"))),
    # MQTT 5 allows a password without a user name (3.1.2.9).
    (connect5("dev", password=b"tok"), Connect("MQTT", 5, "dev", True, 60, password=b"tok", properties=Properties())),
    (connect5("", 0, will=("events/w", b"\xff", 0, False, NONE)),
     Connect("MQTT", 5, "", True, 0, Will("events/w", b"\xff", 0, False, Properties()), properties=Properties())),
]

PACKETS = [
    (publish5("events/door", b"{}", 1, 7, PUBLISH_PROPS, retain=True, dup=True),
     Publish("events/door", b"{}", 1, True, True, 7, Properties(
         payload_format_indicator=1, message_expiry_interval=60, topic_alias=3, response_topic="replies/c-1",
         correlation_data=b"c-1", user_properties=(("a", "1"), ("a", "2")), content_type="text/plain"))),
    (publish5("events/x", b"\xff\x00"), Publish("events/x", b"\xff\x00", properties=Properties())),
    (ack(0x40, 1), PubAck(1)),
    (ack(0x40, 2, 0x83), PubAck(2, 0x83)),
    (ack(0x40, 3, 0x10, NONE), PubAck(3, 0x10, Properties())),
    (ack(0x40, 4, 0x80, props(prop(0x1F, "no"), prop(0x26, ("x", "y")))),
     PubAck(4, 0x80, Properties(reason_string="no", user_properties=(("x", "y"),)))),
    (ack(0x50, 5, 0x97), PubRec(5, 0x97)),
    (ack(0x62, 6, 0x92, props(prop(0x1F, "gone"))), PubRel(6, 0x92, Properties(reason_string="gone"))),
    (ack(0x70, 7), PubComp(7)),
    (subscribe5(9, [("commands/#", 0b00_10_1_1_01), ("commands/+", 0b00_01_0_0_00), ("a", 2)],
                props(prop(0x0B, 268_435_455), prop(0x26, ("s", "t")))),
     Subscribe(9, [("commands/#", 1), ("commands/+", 0), ("a", 2)],
               [SubscriptionOptions(True, True, 2), SubscriptionOptions(False, False, 1), SubscriptionOptions()],
               Properties(subscription_identifiers=(268_435_455,), user_properties=(("s", "t"),)))),
    (unsubscribe5(10, ["commands/#", "x/+"], props(prop(0x26, ("u", "v")))),
     Unsubscribe(10, ["commands/#", "x/+"], Properties(user_properties=(("u", "v"),)))),
    (b"\xc0\x00", PingReq()),
    (tail_packet(0xE0), Disconnect()),
    (tail_packet(0xE0, 0x04), Disconnect(0x04)),
    (tail_packet(0xE0, 0x00, props(prop(0x11, 0), prop(0x1F, "bye"), prop(0x26, ("k", "v")))),
     Disconnect(0, Properties(session_expiry_interval=0, reason_string="bye", user_properties=(("k", "v"),)))),
    (tail_packet(0xF0), Auth()),
    (tail_packet(0xF0, 0x19, props(prop(0x15, "SCRAM"), prop(0x16, b"x"), prop(0x1F, "r"))),
     Auth(0x19, Properties(authentication_method="SCRAM", authentication_data=b"x", reason_string="r"))),
]


@pytest.mark.parametrize(("data", "packet"), CLIENT_PACKETS)
def test_decodes_a_version_5_connect(data: bytes, packet: Connect) -> None:
    decoder = MqttDecoder(LIMIT)
    assert decoder.feed(data) == [packet]
    assert decoder.protocol_level == 5


@pytest.mark.parametrize(("data", "packet"), PACKETS)
def test_decodes_every_client_packet_after_a_version_5_connect(data: bytes, packet: Packet) -> None:
    assert after_hello(data) == [packet]


def test_the_connect_level_picks_the_rules_in_the_same_feed() -> None:
    """A PUBACK with a reason code is MQTT 5; under 3.1.1 its remaining length must be 2."""
    puback = ack(0x40, 1, 0x10)
    v4 = frame(0x10, string("MQTT") + b"\x04\x02" + u16(60) + string("d"))
    assert MqttDecoder(LIMIT).feed(HELLO + puback)[1:] == [PubAck(1, 0x10)]
    decoder = MqttDecoder(LIMIT)
    with pytest.raises(MqttError) as caught:
        decoder.feed(v4 + puback)
    assert "remaining length 3" in caught.value.message and caught.value.level == 4
    assert caught.value.packets == [Connect("MQTT", 4, "d", True, 60)]
    # Only a connection's first CONNECT sets its rules (a second is the server's to refuse).
    assert MqttDecoder(LIMIT).feed(v4 + HELLO)[1] == Connect("MQTT", 5, "lock-0001", True, 60,
                                                                           properties=Properties())
    with pytest.raises(MqttError):
        MqttDecoder(LIMIT).feed(v4 + HELLO + b"\xf0\x00")  # AUTH: no packet a 3.1.1 client sends
    # Another level: decoded only that far, for the server to answer CONNACK 0x01 (section 8).
    other = frame(0x10, string("MQTT") + b"\x06\x02" + u16(60) + b"\xff\xff")
    assert MqttDecoder(LIMIT).feed(other) == [Connect("MQTT", 6)]


@pytest.mark.parametrize("at", range(1, len(PACKETS[0][0])))
def test_a_packet_split_anywhere_decodes_the_same(at: int) -> None:
    decoder = MqttDecoder(LIMIT)
    data = PACKETS[0][0]
    assert decoder.feed(HELLO + data[:at])[1:] + decoder.feed(data[at:]) == [PACKETS[0][1]]


# --- properties: every one, both ways ----------------------------------------------------------------------

SAMPLES = {"byte": 1, "u16": 300, "u32": 70_000, "varint": (321,), "utf8": "text/ü", "pair": (("k", "v"), ("k", "w")),
           "bin": b"\x00\xff"}
EVERY = [(ident, kind) for ident, (_, _, kinds) in sorted(properties.TABLE.items()) for kind in sorted(kinds)]


@pytest.mark.parametrize(("ident", "kind"), EVERY)
def test_every_property_in_every_packet_type_that_allows_it(ident: int, kind: int) -> None:
    name = properties.TABLE[ident][0]
    value = "replies/ü" if name == "response_topic" else SAMPLES[TYPES[ident]]
    if ident == 0x0B and kind == properties.PUBLISH:
        value = (321, 5)  # a server's PUBLISH may carry several
    items = value if TYPES[ident] in ("pair", "varint") else (value,)
    by_hand = props(*(prop(ident, item) for item in items))
    built = Properties(**{name: value})
    if ident == 0x16:  # Authentication Data needs its Authentication Method
        built.authentication_method = "M"
        by_hand = props(prop(0x15, "M"), prop(0x16, value))
    assert properties.encode(built, kind) == by_hand
    assert properties.decode(by_hand + b"tail", 0, len(by_hand) + 4, kind) == (built, len(by_hand))


@pytest.mark.parametrize(("ident", "kind"), [(i, k) for i, (_, _, kinds) in properties.TABLE.items()
                                             for k in sorted(set(range(16)) - kinds - {12, 13})][::7])
def test_a_property_outside_its_packet_types_is_malformed(ident: int, kind: int) -> None:
    value = "replies/x" if ident == 0x08 else SAMPLES[TYPES[ident]]
    raw = props(prop(ident, value[0] if TYPES[ident] in ("pair", "varint") else value))
    with pytest.raises(MqttError) as caught:
        properties.decode(raw, 0, len(raw), kind)
    assert caught.value.reason == 0x81 and "not allowed" in caught.value.message
    with pytest.raises(ValueError, match="not allowed"):
        properties.encode(Properties(**{properties.TABLE[ident][0]: value}), kind)


# --- refusals, each with its reason code ----------------------------------------------------------------

MALFORMED, PROTOCOL_ERROR = ("bad_frame", 0x81), ("bad_frame", 0x82)

REFUSALS = {
    # properties
    "a property given twice": (connect5(properties=props(prop(0x11, 1), prop(0x11, 2))), PROTOCOL_ERROR),
    "two subscription identifiers": (subscribe5(1, [("a", 0)], props(prop(0x0B, 1), prop(0x0B, 2))),
                                     PROTOCOL_ERROR),
    "topic alias in a CONNECT": (connect5(properties=props(prop(0x23, 1))), MALFORMED),
    "will delay in the CONNECT's properties": (connect5(properties=props(prop(0x18, 1))), MALFORMED),
    "session expiry in the will's": (connect5(will=("events/w", b"", 0, False, props(prop(0x11, 1)))), MALFORMED),
    "reason string in a PUBLISH": (publish5("t", properties=props(prop(0x1F, "x"))), MALFORMED),
    "a server's property in a PUBACK": (ack(0x40, 1, 0, props(prop(0x24, 1))), MALFORMED),
    "an unknown identifier": (publish5("t", properties=props(b"\x05\x00")), MALFORMED),
    "a two-byte identifier": (publish5("t", properties=props(b"\x81\x00")), MALFORMED),
    "property length past the packet": (publish5("t", properties=b"\x05" + prop(0x01, 0)), MALFORMED),
    "property length past a PUBACK": (ack(0x40, 1, 0, b"\x03\x1f"), MALFORMED),
    "a string past the property length": (publish5("t", properties=b"\x03\x03\x00\x05" + b"abcde"), MALFORMED),
    "a four-byte value past it": (publish5("t", properties=b"\x03\x02\x00\x00" + b"\x00\x00"), MALFORMED),
    "a user property value past it": (publish5("t", properties=b"\x05\x26\x00\x01k\x00" + b"\x01v"), MALFORMED),
    "property length not in its fewest bytes": (publish5("t", properties=b"\x80\x00"), MALFORMED),
    "a varint past the property length": (subscribe5(1, [("a", 0)], b"\x02\x0b\x81" + b"\x01"), MALFORMED),
    "a five-byte subscription identifier": (subscribe5(1, [("a", 0)], b"\x06\x0b\xff\xff\xff\xff\x01"), MALFORMED),
    "content type not UTF-8": (publish5("t", properties=props(prop(0x03, b"\xc3\x28"))), MALFORMED),
    "user property name not UTF-8": (publish5("t", properties=props(prop(0x26, (b"\xed\xa0\x80", "v")))),
                                     MALFORMED),
    "reason string holding U+0000": (ack(0x40, 1, 0, props(prop(0x1F, "a\x00"))), MALFORMED),
    "receive maximum 0": (connect5(properties=props(prop(0x21, 0))), PROTOCOL_ERROR),
    "maximum packet size 0": (connect5(properties=props(prop(0x27, 0))), PROTOCOL_ERROR),
    "subscription identifier 0": (subscribe5(1, [("a", 0)], props(prop(0x0B, 0))), PROTOCOL_ERROR),
    "topic alias 0": (publish5("t", properties=props(prop(0x23, 0))), ("bad_frame", 0x94)),
    "request problem information 2": (connect5(properties=props(prop(0x17, 2))), PROTOCOL_ERROR),
    "payload format indicator 2": (publish5("t", properties=props(prop(0x01, 2))), PROTOCOL_ERROR),
    "authentication data without a method": (connect5(properties=props(prop(0x16, b"x"))), PROTOCOL_ERROR),
    "a response topic with a wildcard": (publish5("t", properties=props(prop(0x08, "replies/#"))), PROTOCOL_ERROR),
    "an empty response topic": (connect5(will=("events/w", b"", 0, False, props(prop(0x08, "")))), PROTOCOL_ERROR),
    # CONNECT
    "reserved connect flag": (connect5(flags=0x03), MALFORMED),
    "will QoS 3": (connect5(flags=0x1E), MALFORMED),
    "will retain without a will": (connect5(flags=0x22), MALFORMED),
    "bytes after the CONNECT payload": (connect5(tail=b"\x00"), MALFORMED),
    "client identifier not UTF-8": (connect5(b"\xff"), MALFORMED),
    "will marked UTF-8 but not": (connect5(will=("events/w", b"\xff", 0, False, props(prop(0x01, 1)))),
                                  ("bad_frame", 0x99)),
    "CONNECT ends in its properties": (frame(0x10, string("MQTT") + b"\x05\x02" + u16(60) + b"\x05\x11"), MALFORMED),
    # PUBLISH
    "an empty topic without an alias": (publish5(""), PROTOCOL_ERROR),
    "a topic with a wildcard": (publish5("events/+"), MALFORMED),
    "a client's subscription identifier": (publish5("t", properties=props(prop(0x0B, 1))), PROTOCOL_ERROR),
    "payload marked UTF-8 but not": (publish5("t", b"\xc3", properties=props(prop(0x01, 1))), ("bad_frame", 0x99)),
    "alias over the maximum": (publish5("t", properties=props(prop(0x23, 17))), ("bad_frame", 0x94)),
    "alias used before it was set": (publish5("", properties=props(prop(0x23, 2))), PROTOCOL_ERROR),
    "packet identifier 0": (publish5("t", b"", 1, 0), MALFORMED),
    "QoS 3": (frame(0x36, string("t") + u16(1) + NONE), MALFORMED),
    # acknowledgements, DISCONNECT, AUTH
    "PUBACK reason a client never sends": (ack(0x40, 1, 0x01), PROTOCOL_ERROR),
    "PUBREL reason of a PUBACK": (ack(0x62, 1, 0x10), PROTOCOL_ERROR),
    "PUBACK shorter than its packet id": (frame(0x40, b"\x01"), MALFORMED),
    "bytes after the PUBACK properties": (ack(0x40, 1, 0, NONE + b"\x00"), MALFORMED),
    "DISCONNECT with a server's reason": (tail_packet(0xE0, 0x8E), PROTOCOL_ERROR),
    "DISCONNECT ends in its properties": (tail_packet(0xE0, 0, b"\x02\x11"), MALFORMED),
    "bytes after the DISCONNECT properties": (tail_packet(0xE0, 0, NONE + b"\x00"), MALFORMED),
    "AUTH with a reason code alone": (tail_packet(0xF0, 0x18), MALFORMED),
    "AUTH reason 0x04": (tail_packet(0xF0, 0x04, NONE), PROTOCOL_ERROR),
    # SUBSCRIBE, UNSUBSCRIBE
    "reserved subscription option bits": (subscribe5(1, [("a", 0x40)]), MALFORMED),
    "subscription option QoS 3": (subscribe5(1, [("a", 3)]), PROTOCOL_ERROR),
    "retain handling 3": (subscribe5(1, [("a", 0x30)]), PROTOCOL_ERROR),
    "no local on a shared subscription": (subscribe5(1, [("$share/g/commands/#", 4)]), PROTOCOL_ERROR),
    "SUBSCRIBE without a filter": (subscribe5(1, []), PROTOCOL_ERROR),
    "SUBSCRIBE ends before a filter's options": (frame(0x82, u16(1) + NONE + string("a")), MALFORMED),
    "UNSUBSCRIBE without a filter": (unsubscribe5(1, []), PROTOCOL_ERROR),
    "misplaced wildcard": (unsubscribe5(1, ["a/#/b"]), MALFORMED),
    # the fixed header
    "a packet type only servers send": (frame(0x20, b"\x00\x00"), PROTOCOL_ERROR),
    "reserved flags on PUBACK": (frame(0x42, u16(1)), MALFORMED),
    "reserved flags on AUTH": (frame(0xF1), MALFORMED),
    "remaining length not in its fewest bytes": (b"\xe0\x80\x00", MALFORMED),
    "PINGREQ with a body": (frame(0xC0, b"\x00"), MALFORMED),
}


@pytest.mark.parametrize(("data", "expected"), REFUSALS.values(), ids=REFUSALS.keys())
def test_refusals_carry_the_standards_reason_code(data: bytes, expected: tuple[str, int]) -> None:
    assert refusal(data) == expected


def test_user_properties_repeat_and_keep_their_order() -> None:
    data = publish5("t", properties=props(prop(0x26, ("a", "1")), prop(0x26, ("b", "2")), prop(0x26, ("a", "3"))))
    assert after_hello(data)[0].properties.user_properties == (("a", "1"), ("b", "2"), ("a", "3"))


def test_oversize_is_packet_too_large() -> None:
    assert refusal(publish5("t", b"x" * 100), limit=len(HELLO) + 50) == ("frame_too_large", 0x95)


def test_a_broken_version_5_connect_says_so_and_other_errors_before_connect_do_not() -> None:
    """The server answers the first with a CONNACK reason code; before any CONNECT it knows no version."""
    with pytest.raises(MqttError) as caught:
        MqttDecoder(LIMIT).feed(connect5(properties=props(prop(0x21, 0))))
    assert (caught.value.level, caught.value.reason) == (5, 0x82)
    with pytest.raises(MqttError) as caught:
        MqttDecoder(LIMIT).feed(b"\x20\x02\x00\x00")
    assert caught.value.level is None


def test_topic_aliases_are_resolved_per_connection() -> None:
    alias = props(prop(0x23, 4))
    decoder = MqttDecoder(LIMIT, topic_alias_maximum=4)
    first, second = decoder.feed(HELLO + publish5("events/a", b"1", properties=alias)
                                 + publish5("", b"2", properties=alias))[1:]
    assert (first.topic, second.topic, second.properties.topic_alias) == ("events/a", "events/a", 4)
    assert decoder.feed(publish5("events/b", b"3", properties=alias))[0].topic == "events/b"  # set again
    assert decoder.feed(publish5("", b"4", properties=alias))[0].topic == "events/b"
    with pytest.raises(MqttError) as caught:  # a new connection has no aliases
        MqttDecoder(LIMIT).feed(HELLO + publish5("events/a", properties=props(prop(0x23, 1)))
                                + b"\xc0\x00" + publish5("", properties=alias) + b"\xc0\x00")
    assert caught.value.reason == 0x82 and [type(p) for p in caught.value.packets] == [Connect, Publish, PingReq]


# --- the server's packets ------------------------------------------------------------------------------------

def test_server_packets_are_the_standards_bytes() -> None:
    assert packets5.connack(0) == b"\x20\x03\x00\x00\x00"
    assert packets5.connack(0, True, Properties(receive_maximum=16, maximum_qos=1, retain_available=0,
                                                 maximum_packet_size=65536, topic_alias_maximum=16,
                                                 wildcard_subscription_available=1,
                                                 subscription_identifiers_available=0,
                                                 shared_subscription_available=0, session_expiry_interval=0,
                                                 server_keep_alive=300, assigned_client_identifier="lock-1")) == (
        frame(0x20, b"\x01\x00" + props(prop(0x11, 0), prop(0x12, "lock-1"), prop(0x13, 300), prop(0x21, 16),
                                        prop(0x22, 16), prop(0x24, 1), prop(0x25, 0), prop(0x27, 65536),
                                        prop(0x28, 1), prop(0x29, 0), prop(0x2A, 0))))
    assert packets5.connack(0x89, props=Properties(reason_string="overloaded", user_properties=(
        ("retry_after", "5"),))) == frame(0x20, b"\x00\x89" + props(prop(0x1F, "overloaded"),
                                                                      prop(0x26, ("retry_after", "5"))))
    assert packets5.puback(7) == b"\x40\x02\x00\x07"
    assert packets5.puback(7, 0x83) == b"\x40\x03\x00\x07\x83"
    assert packets5.puback(7, 0x83, Properties(reason_string="unroutable")) == ack(0x40, 7, 0x83, props(
        prop(0x1F, "unroutable")))
    assert packets5.suback(9, [0, 1, 0x87]) == frame(0x90, u16(9) + NONE + b"\x00\x01\x87")
    assert packets5.unsuback(9, [0, 0x11]) == frame(0xB0, u16(9) + NONE + b"\x00\x11")
    assert packets5.disconnect() == b"\xe0\x00"
    assert packets5.disconnect(0x8E) == b"\xe0\x01\x8e"
    assert packets5.disconnect(0x8B, Properties(reason_string="shutting_down")) == tail_packet(
        0xE0, 0x8B, props(prop(0x1F, "shutting_down")))
    assert packets5.pingresp() == b"\xd0\x00"
    command = Properties(response_topic="replies/c-1", correlation_data=b"c-1", message_expiry_interval=60,
                         content_type="application/json", payload_format_indicator=1)
    assert packets5.publish("commands/x", b"{}", 1, 5, props=command) == publish5(
        "commands/x", b"{}", 1, 5, props(prop(0x01, 1), prop(0x02, 60), prop(0x03, "application/json"),
                                         prop(0x08, "replies/c-1"), prop(0x09, b"c-1")))


@pytest.mark.parametrize("data", [packets5.publish("commands/x", b"{}", 1, 5, props=Properties(
    response_topic="replies/c-1", correlation_data=b"c-1", user_properties=(("a", "b"),), message_expiry_interval=1,
    content_type="application/json", payload_format_indicator=1)), packets5.publish("e/x", b"", 2, 1, True, True),
    packets5.publish("", b"x" * 200, props=Properties(topic_alias=1)), packets5.puback(1), packets5.puback(
        2, 0x83), packets5.puback(3, 0x83, Properties(reason_string="r", user_properties=(("k", "v"),))),
    packets5.disconnect(), packets5.disconnect(0x83), packets5.disconnect(0x80, Properties(reason_string="x"))])
def test_the_encoders_and_the_decoder_agree_where_a_packet_goes_both_ways(data: bytes) -> None:
    """PUBLISH, PUBACK and DISCONNECT have one layout both ways: ours decode to what was encoded."""
    stream = HELLO + (packets5.publish("e/x", b"", props=Properties(topic_alias=1)) if data[0] >> 4 == 3 else b"")
    decoded = MqttDecoder(LIMIT).feed(stream + data)[-1]
    if isinstance(decoded, Publish):
        again = packets5.publish("" if decoded.topic == "e/x" and decoded.properties.topic_alias else decoded.topic,
                                 decoded.payload, decoded.qos, decoded.packet_id, decoded.retain, decoded.dup,
                                 decoded.properties)
    elif isinstance(decoded, PubAck):
        again = packets5.puback(decoded.packet_id, decoded.reason_code, decoded.properties)
    else:
        again = packets5.disconnect(decoded.reason_code, decoded.properties)
    assert again == data


@pytest.mark.parametrize("call", [
    lambda: packets5.connack(0x01), lambda: packets5.connack(0x80, session_present=True),
    lambda: packets5.connack(0, props=Properties(topic_alias=1)),
    lambda: packets5.connack(0, props=Properties(receive_maximum=70_000)),
    lambda: packets5.connack(0, props=Properties(maximum_qos=2)),
    lambda: packets5.puback(0), lambda: packets5.puback(1, 0x04), lambda: packets5.puback(1, 0, Properties(
        topic_alias=1)),
    lambda: packets5.publish("", b""), lambda: packets5.publish("a/#", b""), lambda: packets5.publish("a", b"", 3),
    lambda: packets5.publish("a", b"", 0, 1), lambda: packets5.publish("a", b"", props=Properties(
        subscription_identifiers=(0,))),
    lambda: packets5.suback(1, []), lambda: packets5.suback(1, [0x80, 0x04]), lambda: packets5.unsuback(1, [1]),
    lambda: packets5.disconnect(0x04), lambda: packets5.disconnect(0, Properties(topic_alias=1)),
])
def test_encoders_refuse_what_the_standard_forbids(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_fitting_a_packet_to_the_clients_maximum_packet_size() -> None:
    """Reason String and User Properties give way (User Properties first); a PUBLISH's properties never do."""
    explained = Properties(reason_string="unroutable", user_properties=(("retry_after", "5"),))
    full = packets5.puback(1, 0x83, explained)
    without_user = packets5.puback(1, 0x83, Properties(reason_string="unroutable"))
    assert packets5.fitted(packets5.puback, 1, 0x83, props=explained, maximum_packet_size=None) == full
    assert packets5.fitted(packets5.puback, 1, 0x83, props=explained, maximum_packet_size=len(full)) == full
    assert packets5.fitted(packets5.puback, 1, 0x83, props=explained,
                           maximum_packet_size=len(full) - 1) == without_user
    assert packets5.fitted(packets5.puback, 1, 0x83, props=explained, maximum_packet_size=len(without_user) - 1) == (
        b"\x40\x03\x00\x01\x83")
    assert packets5.fitted(packets5.puback, 1, 0x83, props=explained, maximum_packet_size=4) is None
    assert packets5.fitted(packets5.puback, 1, 0x83, props=explained, problem_information=False) == (
        b"\x40\x03\x00\x01\x83")
    shutdown = Properties(reason_string="shutting_down", user_properties=(("retry_after", "5"),),
                          server_reference="other")
    assert packets5.fitted(packets5.disconnect, 0x8B, props=shutdown, maximum_packet_size=12) == (
        packets5.disconnect(0x8B, Properties(server_reference="other")))
    command = packets5.publish("commands/x", b"{}", 1, 5, props=Properties(user_properties=(("k", "v"),)))
    assert packets5.fitted(packets5.publish, "commands/x", b"{}", 1, 5, props=Properties(
        user_properties=(("k", "v"),)), maximum_packet_size=len(command)) == command
    assert packets5.fitted(packets5.publish, "commands/x", b"{}", 1, 5, props=Properties(
        user_properties=(("k", "v"),)), maximum_packet_size=len(command) - 1) is None
    assert packets5.fits(command, len(command)) and not packets5.fits(command, len(command) - 1)


# --- fuzzing ----------------------------------------------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
TOPIC = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"), min_size=1, max_size=20)
FILTER = st.lists(st.sampled_from(["a", "+", "ü", "commands", ""]), min_size=1, max_size=4).map("/".join).filter(bool) | st.just(
    "commands/#")
PACKET_ID = st.integers(1, 65535)
PAIRS = st.lists(st.tuples(TEXT, TEXT), max_size=3).map(tuple)


@st.composite
def publish_properties(draw: st.DrawFn, utf8: bool) -> tuple[bytes, Properties]:
    """Some of a client PUBLISH's properties, in a random order: their bytes and what they decode to."""
    chosen: dict[str, object] = {}
    items: list[bytes] = []
    for ident, name, value in [
        (0x01, "payload_format_indicator", st.integers(0, 1 if utf8 else 0)), (0x02, "message_expiry_interval",
                                                                                 st.integers(0, 2**32 - 1)),
        (0x03, "content_type", TEXT), (0x08, "response_topic", TOPIC), (0x09, "correlation_data", st.binary(max_size=8)),
        (0x23, "topic_alias", st.integers(1, 16)),  # with a topic: sets the alias (using one: a test of its own)
    ]:
        if draw(st.booleans()):
            chosen[name] = draw(value)
            items.append(prop(ident, chosen[name]))
    pairs = draw(PAIRS)
    others, users = list(draw(st.permutations(items))), [prop(0x26, pair) for pair in pairs]
    order = []  # user properties among the others anywhere, but in their own order
    while others or users:
        order.append(users.pop(0) if users and (not others or draw(st.booleans())) else others.pop(0))
    return props(*order), Properties(**chosen, user_properties=pairs)  # type: ignore[arg-type]


@st.composite
def packets(draw: st.DrawFn) -> tuple[bytes, Packet]:
    """One valid client packet after a version 5 CONNECT: its bytes and what it decodes to."""
    kind = draw(st.sampled_from(["publish", "ack", "subscribe", "unsubscribe", "ping", "disconnect"]))
    if kind == "publish":
        topic, qos, retain = draw(TOPIC), draw(st.integers(0, 2)), draw(st.booleans())
        payload = draw(st.binary(max_size=300) | TEXT.map(str.encode))
        try:
            payload.decode()
            utf8 = True
        except UnicodeDecodeError:
            utf8 = False
        raw_props, built = draw(publish_properties(utf8))
        packet_id, dup = (draw(PACKET_ID), draw(st.booleans())) if qos else (None, False)
        return (publish5(topic, payload, qos, packet_id, raw_props, retain, dup),
                Publish(topic, payload, qos, retain, dup, packet_id, built))
    if kind == "ack":
        first, cls, reasons = draw(st.sampled_from([(0x40, PubAck, [0, 0x10, 0x80, 0x83, 0x99]),
                                                    (0x50, PubRec, [0, 0x97]), (0x62, PubRel, [0, 0x92]),
                                                    (0x70, PubComp, [0, 0x92])]))
        packet_id, form = draw(PACKET_ID), draw(st.integers(0, 2))
        if form == 0:
            return ack(first, packet_id), cls(packet_id)
        reason = draw(st.sampled_from(reasons))
        if form == 1:
            return ack(first, packet_id, reason), cls(packet_id, reason)
        reason_string, pairs = draw(st.none() | TEXT), draw(PAIRS)
        items = ([prop(0x1F, reason_string)] if reason_string is not None else []) + [prop(0x26, p) for p in pairs]
        return (ack(first, packet_id, reason, props(*items)),
                cls(packet_id, reason, Properties(reason_string=reason_string, user_properties=pairs)))
    if kind == "subscribe":
        packet_id = draw(PACKET_ID)
        filters = draw(st.lists(st.tuples(FILTER, st.integers(0, 2), st.booleans(), st.booleans(), st.integers(0, 2)),
                                min_size=1, max_size=4))
        identifier = draw(st.none() | st.integers(1, 268_435_455))
        raw = props(prop(0x0B, identifier)) if identifier else NONE
        return (subscribe5(packet_id, [(f, q | nl << 2 | rap << 3 | rh << 4) for f, q, nl, rap, rh in filters], raw),
                Subscribe(packet_id, [(f, q) for f, q, *_ in filters],
                          [SubscriptionOptions(nl, rap, rh) for _, _, nl, rap, rh in filters],
                          Properties(subscription_identifiers=(identifier,) if identifier else ())))
    if kind == "unsubscribe":
        packet_id, filters, pairs = draw(PACKET_ID), draw(st.lists(FILTER, min_size=1, max_size=4)), draw(PAIRS)
        return (unsubscribe5(packet_id, filters, props(*(prop(0x26, p) for p in pairs))),
                Unsubscribe(packet_id, filters, Properties(user_properties=pairs)))
    if kind == "ping":
        return b"\xc0\x00", PingReq()
    reason = draw(st.sampled_from([None, 0, 4, 0x80]))
    if reason is None:
        return tail_packet(0xE0), Disconnect()
    expiry = draw(st.none() | st.integers(0, 2**32 - 1))
    return (tail_packet(0xE0, reason, props(prop(0x11, expiry)) if expiry is not None else NONE),
            Disconnect(reason, Properties(session_expiry_interval=expiry)))


def cuts(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted({p % (len(data) + 1) for p in points}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def outcome(chunks: list[bytes], limit: int = LIMIT) -> tuple[list[Packet], tuple[str, int] | None]:
    """Every packet a stream yields, however it is cut, and the (code, reason) of the error that ended it."""
    decoder = MqttDecoder(limit)
    found: list[Packet] = []
    for chunk in chunks:
        try:
            found += decoder.feed(chunk)
        except MqttError as exc:
            return found + exc.packets, (exc.code, exc.reason)
    return found, None


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HELLO_PACKET = Connect("MQTT", 5, "lock-0001", True, 60, properties=Properties())


@FUZZ
@given(st.lists(packets(), max_size=6), st.lists(st.integers(0, 10_000), max_size=8))
def test_valid_streams_decode_to_their_packets_however_split(stream: list[tuple[bytes, Packet]],
                                                             points: list[int]) -> None:
    data = HELLO + b"".join(raw for raw, _ in stream)
    expected = ([HELLO_PACKET, *(packet for _, packet in stream)], None)
    assert outcome([data]) == expected
    assert outcome(cuts(data, points)) == expected
    assert outcome([data[i:i + 1] for i in range(len(data))]) == expected


@FUZZ
@given(st.lists(packets(), min_size=1, max_size=4), st.data())
def test_corrupted_streams_give_packets_or_mqtt_errors_the_same_however_split(
        stream: list[tuple[bytes, Packet]], data: st.DataObject) -> None:
    raw = bytearray(b"".join(chunk for chunk, _ in stream))
    for _ in range(data.draw(st.integers(1, 3))):
        index = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["set", "insert", "delete"]))
        if action == "set":
            raw[index] = data.draw(st.integers(0, 255))
        elif action == "insert":
            raw.insert(index, data.draw(st.integers(0, 255)))
        elif len(raw) > 1:
            del raw[index]
    corrupted = HELLO + bytes(raw)
    limit = data.draw(st.sampled_from([LIMIT, 64]))
    whole = outcome([corrupted], limit)  # raises nothing but MqttError, which outcome() catches
    assert outcome(cuts(corrupted, data.draw(st.lists(st.integers(0, 10_000), max_size=8))), limit) == whole
    assert outcome([corrupted[i:i + 1] for i in range(len(corrupted))], limit) == whole


@FUZZ
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=6))
def test_any_bytes_after_a_version_5_connect_give_packets_or_mqtt_errors(data: bytes, points: list[int]) -> None:
    whole = outcome([HELLO + data])
    assert whole[0][:1] == [HELLO_PACKET]
    assert outcome(cuts(HELLO + data, points)) == whole


@FUZZ
@given(st.binary(max_size=120))
def test_any_bytes_as_a_version_5_connects_body_give_a_connect_or_an_mqtt_error(body: bytes) -> None:
    data = frame(0x10, string("MQTT") + b"\x05" + body)
    found, error = outcome([data])
    assert (found and isinstance(found[0], Connect) and error is None) or (not found and error is not None)


def test_what_a_version_5_client_is_told_when_its_bytes_are_refused() -> None:
    def error(data: bytes) -> MqttError:
        with pytest.raises(MqttError) as caught:
            MqttDecoder(LIMIT).feed(data)
        return caught.value

    broken_connect = error(connect5(properties=props(prop(0x21, 0))))
    assert packets5.refusal(broken_connect, connack_sent=False) == frame(0x20, b"\x00\x82" + props(
        prop(0x1F, "bad_frame")))
    alias = error(HELLO + publish5("t", properties=props(prop(0x23, 0))))
    assert packets5.refusal(alias, connack_sent=True) == tail_packet(0xE0, 0x94, props(prop(0x1F, "bad_frame")))
    assert packets5.refusal(alias, connack_sent=True, problem_information=False) == b"\xe0\x01\x94"
    assert packets5.refusal(alias, connack_sent=False) == packets5.refusal(broken_connect, False)  # no 0x94 there
    too_large = error(HELLO + publish5("t", b"x" * LIMIT))
    assert packets5.refusal(too_large, connack_sent=True) == tail_packet(0xE0, 0x95, props(
        prop(0x1F, "frame_too_large")))
    assert packets5.refusal(error(frame(0x10, string("MQTT") + b"\x04\x02" + u16(60) + string("d")) + b"\x20\x00"),
                            connack_sent=True) is None  # 3.1.1 just closes
