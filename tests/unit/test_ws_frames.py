"""The server-side WebSocket frame codec (app.transports.ws_frames): one example per rule, byte-exact builders,
and the memory and speed figures next to wsproto's (printed, not asserted, except a generous memory ceiling).

Client frames are built here by hand from RFC 6455 section 5.2, not with the codec's helpers (apart from
`unmask`, itself checked against wsproto's masker), so a shared misreading cannot make a test pass;
test_ws_frames_fuzz.py compares the reader with wsproto on generated streams.
"""

from __future__ import annotations

import gc
import json
import os
import struct
import sys
import time
import tracemalloc

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage
from wsproto.frame_protocol import FrameProtocol, XorMaskerSimple

from app.transports.ws_frames import (
    CLOSED,
    Binary,
    Close,
    Ping,
    Pong,
    ProtocolError,
    Reader,
    Text,
    binary,
    close,
    pong,
    text,
    unmask,
)

KEY = b"\x37\xfa\x21\x3d"


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = True,
          length: int | None = None, form: int | None = None, key: bytes = KEY) -> bytes:
    """A client frame; `length` lies about the payload size, `form` forces 7/16/64-bit length encoding."""
    n = len(payload) if length is None else length
    form = form or (7 if n < 126 else 16 if n < 0x10000 else 64)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    mask_bit = 0x80 if masked else 0
    if form == 7:
        head += bytes([mask_bit | n])
    elif form == 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    return head + key + bytes(XorMaskerSimple(bytearray(key)).process(bytearray(payload)))


def feed_bytewise(reader: Reader, data: bytes) -> list:
    events: list = []
    for i in range(len(data)):
        events += reader.feed(data[i:i + 1])
    return events


def rejects(data: bytes, code: int, limit: int = 1 << 20) -> ProtocolError:
    """`data` is rejected with `code`, whether fed at once or byte by byte, and the reader is then CLOSED."""
    for feed in (lambda r: r.feed(data), lambda r: feed_bytewise(r, data)):
        reader = Reader(limit)
        with pytest.raises(ProtocolError) as caught:
            feed(reader)
        assert caught.value.code == code, caught.value.message
        assert reader.state == CLOSED
        assert reader.feed(frame(0x1, b"more")) == []
    return caught.value


# --- messages -------------------------------------------------------------------------------------------------

def test_text_message_in_one_frame() -> None:
    assert Reader(1000).feed(frame(0x1, b'{"ping":1}')) == [Text(b'{"ping":1}')]


def test_text_message_reassembled_from_fragments_with_controls_between() -> None:
    data = (frame(0x1, "h\u00e9".encode()[:2], fin=False) + frame(0x9, b"p") + frame(0x0, "h\u00e9".encode()[2:] + b"!",
            fin=False) + frame(0xA, b"q") + frame(0x0, b"", fin=True))
    expected = [Ping(b"p"), Pong(b"q"), Text("h\u00e9!".encode())]
    assert Reader(1000).feed(data) == expected
    assert feed_bytewise(Reader(1000), data) == expected


def test_binary_message_reassembled() -> None:
    data = frame(0x2, b"\x00\x01", fin=False) + frame(0x0, b"\x02", fin=False) + frame(0x0, b"\xff")
    assert Reader(1000).feed(data) == [Binary(b"\x00\x01\x02\xff")]
    assert feed_bytewise(Reader(1000), data) == [Binary(b"\x00\x01\x02\xff")]


def test_empty_messages() -> None:
    assert Reader(0).feed(frame(0x1) + frame(0x2)) == [Text(b""), Binary(b"")]


def test_large_frames_split_anywhere() -> None:
    payload = os.urandom(70000)
    data = frame(0x2, payload)
    reader = Reader(1 << 20)
    events = reader.feed(data[:3]) + reader.feed(data[3:11]) + reader.feed(data[11:40001]) + reader.feed(data[40001:])
    assert events == [Binary(payload)]


def test_streaming_mode_hands_up_binary_pieces_as_they_arrive() -> None:
    reader = Reader(1 << 20, stream_binary=True)
    data = frame(0x2, b"abcdef", fin=False) + frame(0x0, b"gh")
    assert reader.feed(data[:2 + 4 + 3]) == [Binary(b"abc")]
    assert reader.feed(data[9:]) == [Binary(b"def"), Binary(b"gh")]
    assert reader.feed(frame(0x1, b"{}", fin=False) + frame(0x0, b"[]")) == [Text(b"{}[]")]  # text stays whole


def test_streaming_mode_still_limits_each_binary_message() -> None:
    reader = Reader(4, stream_binary=True)
    assert reader.feed(frame(0x2, b"abcd")) == [Binary(b"abcd")]
    with pytest.raises(ProtocolError) as caught:
        reader.feed(frame(0x2, b"ab", fin=False) + frame(0x0, b"cde"))
    assert caught.value.code == 1009 and caught.value.events == [Binary(b"ab")]


def test_ping_pong_and_close_events() -> None:
    assert Reader(10).feed(frame(0x9, b"x" * 125) + frame(0xA)) == [Ping(b"x" * 125), Pong(b"")]
    assert Reader(10).feed(frame(0x8)) == [Close(None, "")]
    assert Reader(10).feed(frame(0x8, struct.pack("!H", 4000) + "d\u00e9j\u00e0".encode())) == [Close(4000, "d\u00e9j\u00e0")]


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999])
def test_valid_close_codes_are_accepted(code: int) -> None:
    assert Reader(10).feed(frame(0x8, struct.pack("!H", code))) == [Close(code, "")]


# --- the close handshake and the CLOSED state -----------------------------------------------------------------

def test_close_reply_echoes_the_code_or_1000() -> None:
    assert Close(None).reply() == b"\x88\x02\x03\xe8"
    assert Close(4001, "bye").reply() == b"\x88\x02\x0f\xa1"


def test_nothing_is_read_after_close() -> None:
    reader = Reader(10)
    assert reader.feed(frame(0x8) + frame(0x1, b"late") + b"\x00garbage") == [Close(None, "")]
    assert reader.state == CLOSED
    assert reader.feed(frame(0x1, b"later")) == []


def test_a_violation_carries_the_events_before_it() -> None:
    reader = Reader(10)
    with pytest.raises(ProtocolError) as caught:
        reader.feed(frame(0x1, b"ok") + frame(0x9, b"p") + frame(0x3))
    assert caught.value.events == [Text(b"ok"), Ping(b"p")]
    assert caught.value.close_frame() == b"\x88\x14\x03\xea" + b"unknown opcode 0x3"  # 1002, the message as reason


# --- 1002 protocol errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    pytest.param(frame(0x1, b"hi", masked=False), id="unmasked"),
    pytest.param(frame(0x1, b"hi", rsv=4), id="rsv1"),
    pytest.param(frame(0x1, b"hi", rsv=2), id="rsv2"),
    pytest.param(frame(0x9, b"hi", rsv=1), id="rsv3"),
    *[pytest.param(frame(op, b"hi"), id=f"opcode-{op:#x}") for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)],
    pytest.param(frame(0x9, b"x" * 126), id="control-over-125"),
    pytest.param(frame(0x8, b"\x03\xe8" + b"x" * 124), id="close-over-125"),
    pytest.param(frame(0x9, b"hi", fin=False), id="fragmented-control"),
    pytest.param(frame(0x0, b"hi"), id="continuation-without-start"),
    pytest.param(frame(0x1, b"a", fin=False) + frame(0x1, b"b"), id="text-while-fragmented"),
    pytest.param(frame(0x2, b"a", fin=False) + frame(0x2, b"b"), id="binary-while-fragmented"),
    pytest.param(frame(0x8, b"\x03"), id="close-1-byte"),
    pytest.param(frame(0x1, b"x" * 5, form=16), id="16-bit-length-under-126"),
    pytest.param(frame(0x1, b"x" * 125, form=16), id="16-bit-length-of-125"),
    pytest.param(frame(0x2, b"x" * 200, form=64), id="64-bit-length-under-65536"),
    pytest.param(frame(0x2, b"x" * 65535, form=64), id="64-bit-length-of-65535"),
    pytest.param(frame(0x2, b"", length=1 << 63, form=64), id="64-bit-length-msb"),
])
def test_protocol_errors(data: bytes) -> None:
    rejects(data, 1002)


@pytest.mark.parametrize("code", [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_invalid_close_codes(code: int) -> None:
    rejects(frame(0x8, struct.pack("!H", code)), 1002)


# --- 1007 invalid UTF-8 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [b"\xff", b"ab\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"])
def test_invalid_utf8_text(payload: bytes) -> None:
    rejects(frame(0x1, payload), 1007)


def test_invalid_utf8_is_caught_at_the_first_bad_fragment() -> None:
    reader = Reader(100)
    with pytest.raises(ProtocolError) as caught:
        reader.feed(frame(0x1, b"ok\xff", fin=False))  # the message is not over, but no ending can mend it
    assert caught.value.code == 1007


def test_a_character_split_across_fragments_is_valid() -> None:
    euro = "\u20ac".encode()
    data = frame(0x1, euro[:1], fin=False) + frame(0x0, euro[1:2], fin=False) + frame(0x0, euro[2:])
    assert Reader(100).feed(data) == [Text(euro)]


def test_a_message_ending_in_a_cut_character_is_invalid() -> None:
    rejects(frame(0x1, b"a\xe2\x82", fin=False) + frame(0x0, b""), 1007)


def test_invalid_utf8_close_reason() -> None:
    rejects(frame(0x8, b"\x03\xe8\xff"), 1007)


# --- 1009 message too big -------------------------------------------------------------------------------------

def test_a_frame_over_the_limit_is_rejected_at_its_header() -> None:
    reader = Reader(65536)
    head = frame(0x2, b"", length=65537, form=64)  # the header and key only, none of the payload
    with pytest.raises(ProtocolError) as caught:
        reader.feed(head + b"\x00")  # like wsproto, a data frame starts with its first payload byte
    assert caught.value.code == 1009


def test_fragments_over_the_limit_are_rejected() -> None:
    assert Reader(4).feed(frame(0x1, b"ab", fin=False) + frame(0x0, b"cd")) == [Text(b"abcd")]
    rejects(frame(0x1, b"ab", fin=False) + frame(0x0, b"cd", fin=False) + frame(0x0, b"e"), 1009, limit=4)


def test_controls_do_not_count_towards_the_limit() -> None:
    assert Reader(2).feed(frame(0x1, b"a", fin=False) + frame(0x9, b"x" * 100) + frame(0x0, b"b")) == [
        Ping(b"x" * 100), Text(b"ab")]


# --- builders ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "header"), [
    (0, b"\x82\x00"),
    (125, b"\x82\x7d"),
    (126, b"\x82\x7e\x00\x7e"),
    (65535, b"\x82\x7e\xff\xff"),
    (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
])
def test_binary_builder_is_byte_exact(size: int, header: bytes) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    assert binary(payload) == header + payload
    assert text(b"a" * size) == bytes([0x81]) + header[1:] + b"a" * size


def test_builders_are_read_back_by_wsproto_client() -> None:
    proto = FrameProtocol(client=True, extensions=[])
    proto.receive_bytes(text("h\u00e9".encode()) + binary(b"\x00" * 70000) + pong(b"p") + close(1001, "bye"))
    frames = [(f.opcode, f.payload) for f in proto.received_frames()]
    assert frames == [(0x1, "h\u00e9"), (0x2, b"\x00" * 70000), (0xA, b"p"), (0x8, (1001, "bye"))]


def test_control_builders() -> None:
    assert pong(b"abc") == b"\x8a\x03abc"
    assert close() == b"\x88\x02\x03\xe8"
    assert close(1011, "oops") == b"\x88\x06\x03\xf3oops"
    cut = close(1000, "\u00e9" * 100)  # 200 bytes of reason, cut to 122 (a whole number of characters)
    assert cut[1] == 2 + 122 and cut[4:].decode() == "\u00e9" * 61
    with pytest.raises(ValueError):
        pong(b"x" * 126)
    with pytest.raises(ValueError):
        close(1005)


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 20, 200, 511, 512, 513, 4099, 65536])
def test_unmask_matches_wsproto(size: int) -> None:
    data, key = os.urandom(size), os.urandom(4)
    assert unmask(data, key) == bytes(XorMaskerSimple(bytearray(key)).process(bytearray(data)))
    assert unmask(memoryview(b"x" + data)[1:], key) == unmask(data, key)


# --- figures (printed; run with -s) ---------------------------------------------------------------------------

def bytes_per_object(make: object, count: int = 2000) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    held = [make() for _ in range(count)]  # type: ignore[operator]
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    total = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    del held
    return (total - sys.getsizeof([None] * count)) / count


def test_idle_footprint_against_wsproto() -> None:
    ours = bytes_per_object(lambda: Reader(65536))
    theirs = bytes_per_object(lambda: Connection(ConnectionType.SERVER))
    print(f"\nidle reader: getsizeof {sys.getsizeof(Reader(65536))} B, tracemalloc {ours:.0f} B; "
          f"wsproto Connection(SERVER): getsizeof {sys.getsizeof(Connection(ConnectionType.SERVER))} B, "
          f"tracemalloc {theirs:.0f} B")
    assert ours < 200


def test_timing_small_text_frames_against_wsproto() -> None:
    body = json.dumps({"type": "ping", "id": 123456, "ts": 1700000000}).encode()[:40].ljust(40)
    frames = [frame(0x1, body, key=os.urandom(4)) for _ in range(10_000)]
    reader = Reader(65536)
    start = time.perf_counter()
    for data in frames:
        for _ in reader.feed(data):
            pass
    ours = (time.perf_counter() - start) / len(frames) * 1e6
    conn = Connection(ConnectionType.SERVER)
    start = time.perf_counter()
    for data in frames:
        conn.receive_data(data)
        for event in conn.events():
            assert isinstance(event, TextMessage)
    theirs = (time.perf_counter() - start) / len(frames) * 1e6
    print(f"\n10,000 masked 40-byte text frames, one feed each: ours {ours:.2f} us/frame, wsproto {theirs:.2f} us/frame")
