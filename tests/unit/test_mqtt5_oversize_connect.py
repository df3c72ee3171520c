"""A first CONNECT over MAX_FRAME_BYTES (PROTOCOL.md sections 8 and 9): its level decides how it is refused.

The decoder refuses it from its header without buffering its body, but first reads
the 7 bytes after the fixed header (protocol name and level): a version 5 client then
hears CONNACK 0x95 with Reason String `frame_too_large`, a 3.1.1 client (or bytes that
do not name MQTT) the silent close of section 8. Both are counted as `frame_too_large`.
Packets are built by hand from the standard, as in test_mqtt5_codec.py.
"""

from __future__ import annotations

import gevent
import pytest
from fakes import make_registry
from prometheus_client import REGISTRY
from test_mqtt_transport import FakeStream

from app.mqtt import MqttDecoder, MqttError, packets5
from app.sessions.session import Session
from app.transports.mqtt import MqttConnection

LIMIT = 100
PREFIX5 = b"\x00\x04MQTT\x05"  # protocol name and level: the 7 bytes after the fixed header
PREFIX4 = b"\x00\x04MQTT\x04"
# What a version 5 client is told: CONNACK, session present 0, 0x95, properties: Reason String.
CONNACK_0x95 = b"\x20\x15\x00\x95\x12\x1f\x00\x0fframe_too_large"


def connect(prefix: bytes, body_length: int = 200) -> bytes:
    """A CONNECT whose remaining length says `body_length` (two bytes: 128-16383) and whose body begins
    with `prefix`, padded to that length (what follows the level is never read)."""
    assert 128 <= body_length < 16384
    return bytes((0x10, body_length & 0x7F | 0x80, body_length >> 7)) + prefix.ljust(body_length, b"\x00")


def refused(chunks: list[bytes], limit: int = LIMIT) -> tuple[MqttError, int]:
    """The error the stream ends with, and how many chunks the decoder took before raising it."""
    decoder = MqttDecoder(limit)
    for index, chunk in enumerate(chunks):
        try:
            assert decoder.feed(chunk) == []
        except MqttError as exc:
            return exc, index + 1
    pytest.fail("the stream was not refused")


def test_an_oversized_version_5_connect_is_refused_with_level_5_and_packet_too_large() -> None:
    error, _ = refused([connect(PREFIX5)])
    assert (error.code, error.reason, error.level) == ("frame_too_large", 0x95, 5)
    assert packets5.refusal(error, connack_sent=False) == CONNACK_0x95


def test_its_header_and_level_are_enough_the_body_is_never_waited_for() -> None:
    """A byte at a time: nothing is decoded until the level byte, which raises at once (3 + 7 bytes of 203)."""
    head = connect(PREFIX5)[:10]
    error, fed = refused([head[i:i + 1] for i in range(len(head))])
    assert fed == 10 and (error.code, error.reason, error.level) == ("frame_too_large", 0x95, 5)


def test_it_is_refused_the_same_however_the_stream_is_cut() -> None:
    data = connect(PREFIX5)
    for at in range(1, 11):
        error, fed = refused([data[:at], data[at:]])
        assert (error.code, error.reason, error.level, fed) == ("frame_too_large", 0x95, 5, 1 if at >= 10 else 2)


def test_an_oversized_3_1_1_connect_is_closed_without_a_word() -> None:
    error, _ = refused([connect(PREFIX4)])
    assert (error.code, error.level) == ("frame_too_large", 4)
    assert packets5.refusal(error, connack_sent=False) is None


@pytest.mark.parametrize("data", [
    b"\x10\xff\xff\xff\x7f" + b"GARBAGE",  # 256 MiB announced, then bytes that name no protocol
    b"\x10\xff\xff\xff\x7f" + b"\x00\x04MQTX\x05",  # another protocol name
    b"\x10\xff\xff\xff\x7f" + b"\x00\x06MQIsdp",  # MQTT 3.1's name: longer, not MQTT
    connect(b"\x00\x05MQTT\x05"),  # the name's length is not 4
])
def test_a_lying_or_garbage_header_gets_the_silent_close(data: bytes) -> None:
    error, _ = refused([data])
    assert (error.code, error.reason, error.level) == ("frame_too_large", 0x95, None)
    assert packets5.refusal(error, connack_sent=False) is None


def test_a_connect_too_short_to_name_its_level_is_refused_from_its_header() -> None:
    """Remaining length 5 over a 6-byte limit: the level byte would be past the packet, so nothing is held."""
    error, fed = refused([b"\x10\x05\x00\x04MQ"], limit=6)
    assert (error.code, error.level, fed) == ("frame_too_large", None, 1)


def test_only_the_first_connect_is_read_for_its_level() -> None:
    """After a version 5 CONNECT the connection's level is known: an oversized packet is refused from its header."""
    hello = b"\x10\x11" + PREFIX5 + b"\x02\x00\x3c\x00\x00\x04lock"
    decoder = MqttDecoder(LIMIT)
    with pytest.raises(MqttError) as caught:
        decoder.feed(hello + connect(PREFIX4)[:3])
    assert (caught.value.code, caught.value.reason, caught.value.level) == ("frame_too_large", 0x95, 5)
    assert caught.value.packets[0].protocol_level == 5


# -- the transport ---------------------------------------------------------------------------------------
def errors_counted() -> float:
    return REGISTRY.get_sample_value("warren_errors_sent_total", {"code": "frame_too_large"}) or 0.0


def run(first_bytes: bytes) -> FakeStream:
    registry, stream = make_registry(), FakeStream()
    conn = MqttConnection(stream, "127.0.0.1:9", max_frame_bytes=LIMIT, max_keepalive=1200)
    runner = gevent.spawn(Session(conn, registry, registry.broker).run)
    for index in range(len(first_bytes)):
        stream.inbox.put(first_bytes[index:index + 1])
    runner.join(2)
    assert runner.dead and stream.finished and stream.closed
    assert registry.broker.presence == []  # no session began
    return stream


def test_a_version_5_client_hears_connack_0x95_and_is_closed_and_counted() -> None:
    before = errors_counted()
    stream = run(connect(PREFIX5)[:10])
    assert stream.out == CONNACK_0x95 and errors_counted() == before + 1


def test_a_3_1_1_client_is_closed_without_a_connack_and_counted_the_same() -> None:
    before = errors_counted()
    stream = run(connect(PREFIX4)[:10])
    assert stream.out == b"" and errors_counted() == before + 1
