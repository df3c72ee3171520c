"""The MQTT 3.1.1 codec (app.mqtt): round trips, every malformed case, and fuzzing across feed splits.

Client packets are built here by hand from the standard (section 3), not with
the codec's own helpers, so a shared misreading cannot make a test pass;
test_mqtt_real_clients.py then checks both against paho-mqtt and mosquitto.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.mqtt import (
    PINGRESP,
    Connect,
    Disconnect,
    MqttDecoder,
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
    connack,
    pingresp,
    puback,
    publish,
    suback,
    unsuback,
)

LIMIT = 65536


# --- client packets, by the book -------------------------------------------------------------------

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


def connect(client_id: str | bytes = "lock-0001", keep_alive: int = 60, clean: bool = True,
            will: tuple[str | bytes, bytes, int, bool] | None = None, username: str | bytes | None = None,
            password: bytes | None = None, *, name: str | bytes = "MQTT", level: int = 4, flags: int | None = None,
            tail: bytes = b"") -> bytes:
    bits = clean << 1
    payload = string(client_id)
    if will is not None:
        topic, message, qos, retain = will
        bits |= 0x04 | qos << 3 | retain << 5
        payload += string(topic) + string(message)
    if username is not None:
        bits |= 0x80
        payload += string(username)
    if password is not None:
        bits |= 0x40
        payload += string(password)
    return frame(0x10, string(name) + bytes([level, bits if flags is None else flags]) + u16(keep_alive) + payload
                 + tail)


def subscribe(packet_id: int, filters: list[tuple[str | bytes, int]], first: int = 0x82) -> bytes:
    return frame(first, u16(packet_id) + b"".join(string(f) + bytes([q]) for f, q in filters))


def unsubscribe(packet_id: int, filters: list[str | bytes], first: int = 0xA2) -> bytes:
    return frame(first, u16(packet_id) + b"".join(string(f) for f in filters))


def decode_all(data: bytes, limit: int = LIMIT) -> list[Packet]:
    return MqttDecoder(limit).feed(data)


def outcome(chunks: Iterator[bytes] | list[bytes], limit: int = LIMIT) -> tuple[list[Packet], str | None]:
    """Every packet a stream yields, however it is cut, and the code of the error that ended it (or None)."""
    decoder = MqttDecoder(limit)
    packets: list[Packet] = []
    for chunk in chunks:
        try:
            packets += decoder.feed(chunk)
        except MqttError as exc:
            return packets + exc.packets, exc.code
    return packets, None


# --- round trips -------------------------------------------------------------------------------------

ROUND_TRIPS = [
    (connect("lock-0001", 45, True, ("events/gone", b"\x00bye", 1, True), "sdk", b"t0k"),
     Connect("MQTT", 4, "lock-0001", True, 45, Will("events/gone", b"\x00bye", 1, True), "sdk", b"t0k")),
    (connect("", 0, False), Connect("MQTT", 4, "", False, 0)),
    (connect("dev", 65535, username=""), Connect("MQTT", 4, "dev", True, 65535, username="")),
    # Deliberate leniency: a password without a user name (3.1.1 forbids it; PROTOCOL.md makes it the token).
    (connect("dev", password=b"tok"), Connect("MQTT", 4, "dev", True, 60, password=b"tok")),
    # A level other than 4 and 5 is decoded only that far: its layout is not known (5: test_mqtt5_codec.py).
    (connect("dev", level=6, tail=b"\x00\xff\xff"), Connect("MQTT", 6)),
    (connect("dev", level=3), Connect("MQTT", 3)),
    (publish("events/door.opened", b'{"a":1}'), Publish("events/door.opened", b'{"a":1}')),
    (publish("events/x", b"", 1, 65535, retain=True, dup=True), Publish("events/x", b"", 1, True, True, 65535)),
    (publish("répliques/ü", b"\xff" * 300, 2, 7), Publish("répliques/ü", b"\xff" * 300, 2, False, False, 7)),
    (frame(0x40, u16(1)), PubAck(1)),
    (frame(0x50, u16(2)), PubRec(2)),
    (frame(0x62, u16(3)), PubRel(3)),
    (frame(0x70, u16(4)), PubComp(4)),
    (subscribe(10, [("commands/#", 1), ("commands/+", 0), ("+/a/+/#", 2), ("#", 0), ("/", 1)]),
     Subscribe(10, [("commands/#", 1), ("commands/+", 0), ("+/a/+/#", 2), ("#", 0), ("/", 1)])),
    (unsubscribe(11, ["commands/#", "a/b"]), Unsubscribe(11, ["commands/#", "a/b"])),
    (b"\xc0\x00", PingReq()),
    (b"\xe0\x00", Disconnect()),
]


@pytest.mark.parametrize(("data", "packet"), ROUND_TRIPS)
def test_decodes_every_client_packet(data: bytes, packet: Packet) -> None:
    assert decode_all(data) == [packet]
    assert outcome([bytes([b]) for b in data]) == ([packet], None)


def test_a_feed_may_hold_many_packets_and_end_inside_one() -> None:
    decoder = MqttDecoder(LIMIT)
    stream = b"".join(data for data, _ in ROUND_TRIPS[6:])
    assert decoder.feed(stream + stream[:5]) == [packet for _, packet in ROUND_TRIPS[6:]]
    assert decoder.feed(stream[5:]) == [packet for _, packet in ROUND_TRIPS[6:]]
    assert decoder.feed(puback(9)) == [PubAck(9)]


def test_a_big_packet_fed_a_byte_at_a_time() -> None:
    """The remaining length's 1-3 byte boundaries, and no re-parsing of what is held (65,000 one-byte feeds)."""
    for length in (127, 128, 16383, 16384, 65000):
        data = publish("t", b"x" * (length - 3))
        assert data[1:].startswith(varint(length)) and len(data) == 1 + len(varint(length)) + length
        assert outcome([data[i:i + 1] for i in range(len(data))]) == ([Publish("t", b"x" * (length - 3))], None)
    big = publish("t", b"y" * 2_100_000, 1, 5)
    assert big[1:5] == varint(len(big) - 5)
    assert decode_all(big, limit=len(big)) == [Publish("t", b"y" * 2_100_000, 1, False, False, 5)]


def test_non_minimal_remaining_lengths_are_accepted() -> None:
    """3.1.1 (unlike MQTT 5) does not forbid them, and clients that reserve a fixed-width length exist."""
    assert decode_all(b"\xe0\x80\x00" + b"\x30\x83\x80\x80\x00\x00\x01t") == [Disconnect(), Publish("t", b"")]


def test_a_limit_below_the_smallest_packet_is_a_mistake() -> None:
    with pytest.raises(ValueError):
        MqttDecoder(1)


def test_bytes_like_feeds_are_copied() -> None:
    decoder = MqttDecoder(LIMIT)
    buffer = bytearray(publish("events/a", b"hello"))
    assert decoder.feed(memoryview(buffer)[:6]) == []
    rest = bytearray(buffer[6:])
    buffer[:] = b"\x00" * len(buffer)  # a recv_into buffer reused
    assert decoder.feed(rest) == [Publish("events/a", b"hello")]


def test_server_packets_are_the_standards_bytes() -> None:
    assert connack(0) == b"\x20\x02\x00\x00"
    assert connack(0, session_present=True) == b"\x20\x02\x01\x00"
    assert [connack(code)[3] for code in range(6)] == [0, 1, 2, 3, 4, 5]
    assert publish("a/b", b"hi") == b"\x30\x07\x00\x03a/bhi"
    assert publish("a/b", b"hi", qos=1, packet_id=258, retain=True, dup=True) == b"\x3b\x09\x00\x03a/b\x01\x02hi"
    assert publish("t", b"z" * 200)[:3] == b"\x30\xcb\x01"
    assert puback(258) == b"\x40\x02\x01\x02"
    assert suback(7, [0, 1, 2, 0x80]) == b"\x90\x06\x00\x07\x00\x01\x02\x80"
    assert unsuback(65535) == b"\xb0\x02\xff\xff"
    assert pingresp() == PINGRESP == b"\xd0\x00"


@pytest.mark.parametrize("call", [
    lambda: connack(6), lambda: connack(2, session_present=True),
    lambda: publish("a/+", b""), lambda: publish("#", b""), lambda: publish("", b""), lambda: publish("a\0", b""),
    lambda: publish("a", b"", qos=3, packet_id=1), lambda: publish("a", b"", qos=1),
    lambda: publish("a", b"", qos=1, packet_id=0), lambda: publish("a", b"", qos=0, packet_id=1),
    lambda: publish("a", b"", dup=True), lambda: publish("a" * 65536, b""),
    lambda: puback(0), lambda: puback(65536), lambda: suback(1, []), lambda: suback(1, [3]), lambda: unsuback(0),
])
def test_encoders_refuse_what_the_standard_forbids(call) -> None:
    with pytest.raises(ValueError):
        call()


# --- malformed input ---------------------------------------------------------------------------------

MALFORMED = {  # what is wrong: (the bytes, what the error says)
    "remaining length of 5 bytes": (b"\x30\xff\xff\xff\xff\x01", "remaining length longer than 4 bytes"),
    "CONNACK": (b"\x20", "packet type 2 is not one a client sends"),
    "SUBACK": (b"\x90", "packet type 9 is not one a client sends"),
    "UNSUBACK": (b"\xb0", "packet type 11 is not one a client sends"),
    "PINGRESP": (b"\xd0", "packet type 13 is not one a client sends"),
    "type 0": (b"\x00", "packet type 0 is not one a client sends"),
    "type 15": (b"\xf0", "packet type 15 is not one a client sends"),
    "CONNECT flags": (b"\x11", "reserved flags 0b0001 on packet type 1"),
    "PUBACK flags": (b"\x41", "reserved flags 0b0001 on packet type 4"),
    "PUBREC flags": (b"\x52", "reserved flags 0b0010 on packet type 5"),
    "PUBREL flags 0": (b"\x60", "reserved flags 0b0000 on packet type 6"),
    "PUBCOMP flags": (b"\x78", "reserved flags 0b1000 on packet type 7"),
    "SUBSCRIBE flags 0": (b"\x80", "reserved flags 0b0000 on packet type 8"),
    "SUBSCRIBE flags 3": (b"\x83", "reserved flags 0b0011 on packet type 8"),
    "UNSUBSCRIBE flags": (b"\xa0", "reserved flags 0b0000 on packet type 10"),
    "PINGREQ flags": (b"\xc1", "reserved flags 0b0001 on packet type 12"),
    "DISCONNECT flags": (b"\xe8", "reserved flags 0b1000 on packet type 14"),
    "PUBLISH QoS 3": (b"\x36", "PUBLISH with QoS 3"),
    "PUBLISH QoS 3 retained": (b"\x3f", "PUBLISH with QoS 3"),
    "DUP on QoS 0": (b"\x38", "DUP set on a QoS 0 PUBLISH"),
    "PINGREQ with a body": (b"\xc0\x01", "packet type 12 has remaining length 1, not 0"),
    "DISCONNECT with a body": (b"\xe0\x02", "packet type 14 has remaining length 2, not 0"),
    "PUBACK of 3 bytes": (b"\x40\x03", "packet type 4 has remaining length 3, not 2"),
    "PUBREL of 1 byte": (b"\x62\x01", "packet type 6 has remaining length 1, not 2"),
    "PUBACK id 0": (frame(0x40, u16(0)), "packet identifier 0"),
    "PUBCOMP id 0": (frame(0x70, u16(0)), "packet identifier 0"),
    "PUBLISH without topic": (frame(0x30, b"\x00"), "PUBLISH ends before its topic name"),
    "PUBLISH empty topic": (frame(0x30, string("") + b"x"), "topic name is empty"),
    "PUBLISH topic past end": (frame(0x30, b"\x00\x09abc"), "PUBLISH ends inside its topic"),
    "PUBLISH QoS 1 without id": (frame(0x32, string("a") + b"\x01"), "PUBLISH ends inside its topic"),
    "PUBLISH id 0": (frame(0x32, string("a") + u16(0)), "packet identifier 0"),
    "topic +": (frame(0x30, string("a/+")), "topic name holds a wildcard"),
    "topic #": (frame(0x30, string("a/#")), "topic name holds a wildcard"),
    "topic U+0000": (frame(0x30, string("a\0b")), "topic name holds U+0000"),
    "topic bad UTF-8": (frame(0x30, string(b"\xff")), "topic name is not well-formed UTF-8"),
    "topic overlong NUL": (frame(0x30, string(b"\xc0\x80")), "topic name is not well-formed UTF-8"),
    "topic surrogate": (frame(0x30, string(b"\xed\xa0\x80")), "topic name is not well-formed UTF-8"),
    "topic truncated UTF-8": (frame(0x30, string(b"\xe2\x82")), "topic name is not well-formed UTF-8"),
    "protocol MQIsdp": (connect(name="MQIsdp", level=3), "protocol name"),
    "protocol mqtt": (connect(name="mqtt"), "protocol name"),
    "protocol name bad UTF-8": (connect(name=b"MQ\xff"), "protocol name is not well-formed UTF-8"),
    "CONNECT empty": (frame(0x10), "packet ends before its protocol name"),
    "CONNECT ends at level": (frame(0x10, string("MQTT") + b"\x04"), "packet ends before its connect flags"),
    "reserved connect flag": (connect(flags=0x03), "reserved connect flag set"),
    "will QoS without will": (connect(flags=0x0A), "will QoS or retain set without the will flag"),
    "will retain without will": (connect(flags=0x22), "will QoS or retain set without the will flag"),
    "will QoS 3": (connect(will=("a", b"", 3, False)), "will QoS 3"),
    "will topic #": (connect(will=("events/#", b"", 0, False)), "will topic holds a wildcard"),
    "will topic empty": (connect(will=("", b"", 0, False)), "will topic is empty"),
    "will without message": (connect(flags=0x06, tail=string("a")), "packet ends before its will message"),
    "username flag without username": (connect(flags=0x82), "packet ends before its user name"),
    "password flag without password": (connect(username="u", flags=0xC2), "packet ends before its password"),
    "bytes after CONNECT": (connect(tail=b"\x00"), "bytes left over after the CONNECT payload"),
    "client id U+0000": (connect("a\0"), "client identifier holds U+0000"),
    "client id bad UTF-8": (connect(b"\xfe"), "client identifier is not well-formed UTF-8"),
    "username bad UTF-8": (connect(username=b"\x80"), "user name is not well-formed UTF-8"),
    "SUBSCRIBE no filter": (frame(0x82, u16(1)), "SUBSCRIBE without a topic filter"),
    "SUBSCRIBE id 0": (subscribe(0, [("a", 0)]), "packet identifier 0"),
    "SUBSCRIBE QoS 3": (subscribe(1, [("a", 3)]), "requested QoS byte 0x03"),
    "SUBSCRIBE reserved QoS bits": (subscribe(1, [("a", 0x04)]), "requested QoS byte 0x04"),
    "SUBSCRIBE without QoS": (frame(0x82, u16(1) + string("a")), "packet ends before its requested QoS"),
    "SUBSCRIBE empty filter": (subscribe(1, [("", 0)]), "empty topic filter"),
    "SUBSCRIBE a/#/b": (subscribe(1, [("a/#/b", 0)]), "misplaced wildcard in topic filter"),
    "SUBSCRIBE a#": (subscribe(1, [("a#", 0)]), "misplaced wildcard in topic filter"),
    "SUBSCRIBE a+/b": (subscribe(1, [("a+/b", 0)]), "misplaced wildcard in topic filter"),
    "SUBSCRIBE filter U+0000": (subscribe(1, [("a\0", 0)]), "topic filter holds U+0000"),
    "SUBSCRIBE one good one bad": (subscribe(1, [("a", 1), ("b", 0x81)]), "requested QoS byte 0x81"),
    "UNSUBSCRIBE no filter": (frame(0xA2, u16(1)), "UNSUBSCRIBE without a topic filter"),
    "UNSUBSCRIBE id 0": (unsubscribe(0, ["a"]), "packet identifier 0"),
    "UNSUBSCRIBE +a": (unsubscribe(1, ["+a"]), "misplaced wildcard in topic filter"),
    "UNSUBSCRIBE past end": (frame(0xA2, u16(1) + b"\x00\x05ab"), "topic filter runs past the end of its packet"),
}


@pytest.mark.parametrize(("data", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_packets_are_bad_frames(data: bytes, reason: str) -> None:
    decoder = MqttDecoder(LIMIT)
    with pytest.raises(MqttError) as caught:
        decoder.feed(data)
    assert caught.value.code == "bad_frame" and reason in caught.value.message
    with pytest.raises(MqttError) as again:  # dead: the connection is to be closed
        decoder.feed(b"\xc0\x00")
    assert again.value.code == "bad_frame"


def test_refused_from_the_header_without_waiting_for_the_body() -> None:
    """A fault in the fixed header is refused from the header alone, with no body yet."""
    for data in (b"\x20", b"\x36", b"\xc0\x01", b"\x40\x03", b"\x30\xff\xff\xff\xff"):
        with pytest.raises(MqttError):
            MqttDecoder(LIMIT).feed(data)


def test_oversize_is_refused_from_the_header() -> None:
    exact = publish("t", b"x" * 95)
    assert len(exact) == 100 and decode_all(exact, limit=100) == [Publish("t", b"x" * 95)]
    with pytest.raises(MqttError) as caught:
        MqttDecoder(100).feed(publish("t", b"x" * 96)[:2])  # the header alone says 101 bytes
    assert caught.value.code == "frame_too_large"
    with pytest.raises(MqttError) as caught:
        MqttDecoder(LIMIT).feed(b"\x30\xff\xff\xff\x7f")  # 256 MiB announced, nothing buffered
    assert caught.value.code == "frame_too_large"


def test_an_error_carries_the_packets_decoded_before_it() -> None:
    with pytest.raises(MqttError) as caught:
        MqttDecoder(LIMIT).feed(b"\xc0\x00" + puback(3) + b"\x20\x02\x00\x00")
    assert caught.value.packets == [PingReq(), PubAck(3)]


# --- fuzzing -----------------------------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=12)
TOPIC = st.text(st.characters(codec="utf-8", exclude_characters="\0+#"), min_size=1, max_size=12)
FILTER = st.one_of(TOPIC, st.sampled_from(["#", "+", "commands/#", "commands/+", "+/+", "a/+/b/#"]))
PACKET_ID = st.integers(1, 65535)


@st.composite
def packets(draw: st.DrawFn) -> tuple[bytes, Packet]:
    """One valid client packet: its bytes and what it decodes to."""
    kind = draw(st.sampled_from(["publish", "ack", "subscribe", "unsubscribe", "connect", "ping", "disconnect"]))
    if kind == "publish":
        topic, payload, qos, retain = draw(TOPIC), draw(st.binary(max_size=300)), draw(st.integers(0, 2)), draw(
            st.booleans())
        packet_id, dup = (draw(PACKET_ID), draw(st.booleans())) if qos else (None, False)
        return publish(topic, payload, qos, packet_id, retain, dup), Publish(topic, payload, qos, retain, dup,
                                                                              packet_id)
    if kind == "ack":
        first, cls = draw(st.sampled_from([(0x40, PubAck), (0x50, PubRec), (0x62, PubRel), (0x70, PubComp)]))
        packet_id = draw(PACKET_ID)
        return frame(first, u16(packet_id)), cls(packet_id)
    if kind == "subscribe":
        packet_id, filters = draw(PACKET_ID), draw(st.lists(st.tuples(FILTER, st.integers(0, 2)), min_size=1,
                                                            max_size=4))
        return subscribe(packet_id, filters), Subscribe(packet_id, filters)
    if kind == "unsubscribe":
        packet_id, filters = draw(PACKET_ID), draw(st.lists(FILTER, min_size=1, max_size=4))
        return unsubscribe(packet_id, filters), Unsubscribe(packet_id, filters)
    if kind == "connect":
        will = draw(st.none() | st.tuples(TOPIC, st.binary(max_size=20), st.integers(0, 2), st.booleans()))
        client_id, keep_alive, clean = draw(TEXT), draw(st.integers(0, 65535)), draw(st.booleans())
        username, password = draw(st.none() | TEXT), draw(st.none() | st.binary(max_size=20))
        return (connect(client_id, keep_alive, clean, will, username, password),
                Connect("MQTT", 4, client_id, clean, keep_alive, will and Will(*will), username, password))
    return (b"\xc0\x00", PingReq()) if kind == "ping" else (b"\xe0\x00", Disconnect())


def cuts(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted({p % (len(data) + 1) for p in points}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(packets(), max_size=6), st.lists(st.integers(0, 10_000), max_size=8))
def test_valid_streams_decode_to_their_packets_however_split(stream: list[tuple[bytes, Packet]],
                                                             points: list[int]) -> None:
    data = b"".join(raw for raw, _ in stream)
    expected = ([packet for _, packet in stream], None)
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
    corrupted = bytes(raw)
    limit = data.draw(st.sampled_from([LIMIT, 64]))
    whole = outcome([corrupted], limit)  # raises nothing but MqttError, which outcome() catches
    assert outcome(cuts(corrupted, data.draw(st.lists(st.integers(0, 10_000), max_size=8))), limit) == whole
    assert outcome([corrupted[i:i + 1] for i in range(len(corrupted))], limit) == whole


@FUZZ
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=6))
def test_any_bytes_give_packets_or_mqtt_errors(data: bytes, points: list[int]) -> None:
    whole = outcome([data])
    assert outcome(cuts(data, points)) == whole
    assert outcome([data[i:i + 1] for i in range(len(data))]) == whole
