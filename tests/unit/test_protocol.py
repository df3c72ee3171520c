"""Pure tests of the wire format (app/protocol.py) and the framing of both transports.

No gateway, no RabbitMQ: hypothesis throws arbitrary bytes and frames at the
validators, and random chunkings of random frame sequences at `JsonLinesConnection`
and `JsonWebSocketConnection` over a gevent socketpair, and checks that the only thing
that ever comes out is a frame or a `ProtocolError` with a code of PROTOCOL.md.
"""

from __future__ import annotations

import itertools
import json
import string

import gevent
import pytest
from gevent import socket as gsocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason

from app import auth, protocol
from app.protocol import ERROR_CODES, ProtocolError
from app.transports.json_lines import JsonLinesConnection
from app.transports.json_websocket import JsonWebSocketConnection
from app.transports.sender import Sender
from app.transports.websocket import HandshakeError, handshake, switching_protocols, upgrade_request

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IO = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
DEVICE_CHARS = string.ascii_letters + string.digits + "_:-"
device_ids = st.text(DEVICE_CHARS, min_size=1, max_size=128)
word = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)
event_names = st.lists(word, min_size=1, max_size=5).map(".".join).filter(lambda n: len(n) <= 120)
any_string = st.text(max_size=140)



def _dumps(value: object) -> bytes:
    return json.dumps(value).encode()  # unlike orjson, any integer


# Frames that are close to valid: every field either right or wrong in a random way.
maybe = lambda good: good | json_values
hello_like = st.fixed_dictionaries(
    {"type": maybe(st.just("hello"))},
    optional={"device": maybe(device_ids | any_string), "token": maybe(st.text("0123456789abcdef", max_size=64)),
              "v": maybe(st.just(1) | st.integers(-2, 3))})
event_like = st.fixed_dictionaries(
    {"type": maybe(st.just("event"))},
    optional={"id": maybe(st.text(min_size=1, max_size=70)), "name": maybe(event_names | any_string),
              "data": json_values})
reply_like = st.fixed_dictionaries(
    {"type": maybe(st.just("reply"))},
    optional={"id": maybe(st.text(min_size=1, max_size=300)), "ok": maybe(st.booleans()),
              "data": json_values, "error": maybe(st.none() | st.text(max_size=10))})
other_like = st.dictionaries(st.sampled_from(["type", "id", "name", "ok", "data", "error", "device"]) | st.text(),
                             json_values, max_size=6)
frames = hello_like | event_like | reply_like | other_like | st.fixed_dictionaries({"type": st.just("ping")})


# -- protocol.decode / validate / validate_hello ------------------------------------------------
@FAST
@given(st.binary(max_size=200) | json_values.map(_dumps) | frames.map(_dumps))
def test_decode_returns_an_object_or_bad_frame(payload: bytes) -> None:
    try:
        frame = protocol.decode(payload)
    except ProtocolError as exc:
        assert exc.code == "bad_frame"
        assert exc.message
        return
    assert isinstance(frame, dict)


@FAST
@given(frames)
def test_validate_raises_only_bad_frame(frame: dict) -> None:
    try:
        checked = protocol.validate(frame)
    except ProtocolError as exc:
        assert exc.code == "bad_frame"
        assert exc.code in ERROR_CODES
        assert exc.frame_id is None or isinstance(exc.frame_id, str)
        return
    assert checked is frame
    kind = frame["type"]
    assert kind in {"ping", "event", "reply"}
    if kind == "event":
        assert isinstance(frame["id"], str) and 1 <= len(frame["id"]) <= 64
        assert protocol.EVENT_NAME.fullmatch(frame["name"]) and len(frame["name"]) <= 120
        assert not (frame["name"] + ".").startswith("session.")
    if kind == "reply":
        assert isinstance(frame["id"], str) and isinstance(frame["ok"], bool)
        assert frame.get("error") is None or isinstance(frame["error"], str)


@FAST
@given(hello_like | other_like)
def test_validate_hello_raises_only_unauthorized_or_unsupported_version(frame: dict) -> None:
    try:
        device, token = protocol.validate_hello(frame)
    except ProtocolError as exc:
        assert exc.code in {"unauthorized", "unsupported_version"}
        return
    assert frame["type"] == "hello"
    assert frame.get("v", 1) == 1 and frame.get("v", 1) is not True
    assert protocol.DEVICE_ID.fullmatch(device) and "." not in device
    assert token is None or (isinstance(token, str) and token)  # absent: a TLS certificate may stand in


@FAST
@given(st.binary(max_size=300))
def test_the_whole_pipeline_never_raises_anything_else(payload: bytes) -> None:
    for check in (protocol.validate, protocol.validate_hello):
        try:
            check(protocol.decode(payload))
        except ProtocolError as exc:
            assert exc.code in ERROR_CODES


@pytest.mark.parametrize(("frame", "code"), [
    ({"type": "hello", "device": "lock-1", "token": "ab"}, None),
    ({"type": "hello", "device": "lock-1", "token": "ab", "v": 1}, None),
    ({"type": "hello", "device": "lock-1", "token": "ab", "v": 2}, "unsupported_version"),
    ({"type": "hello", "device": "lock-1", "token": "ab", "v": "1"}, "unsupported_version"),
    ({"type": "hello", "device": "lock-1", "token": "ab", "v": True}, "unsupported_version"),
    ({"type": "hello", "device": "lock-1", "token": "ab", "v": None}, "unsupported_version"),
    ({"type": "hello", "device": "lock.1", "token": "ab"}, "unauthorized"),
    ({"type": "hello", "device": "", "token": "ab"}, "unauthorized"),
    ({"type": "hello", "device": "x" * 129, "token": "ab"}, "unauthorized"),
    ({"type": "hello", "device": "x" * 128, "token": "ab"}, None),
    ({"type": "hello", "device": "lock 1", "token": "ab"}, "unauthorized"),
    ({"type": "hello", "device": "lock-1\n", "token": "ab"}, "unauthorized"),
    ({"type": "hello", "device": 5, "token": "ab"}, "unauthorized"),
    ({"type": "hello", "device": "lock-1"}, None),  # no token: the session asks for a certificate instead
    ({"type": "hello", "device": "lock-1", "token": ""}, "unauthorized"),
    ({"type": "ping"}, "unauthorized"),
    ({}, "unauthorized"),
])
def test_validate_hello_examples(frame: dict, code: str | None) -> None:
    if code is None:
        assert protocol.validate_hello(frame) == (frame["device"], frame.get("token"))
    else:
        with pytest.raises(ProtocolError) as raised:
            protocol.validate_hello(frame)
        assert raised.value.code == code


@pytest.mark.parametrize(("frame", "valid"), [
    ({"type": "ping"}, True),
    ({"type": "event", "id": "e-1", "name": "door.opened", "data": {"a": 1}}, True),
    ({"type": "event", "id": "e-1", "name": "door.opened"}, True),
    ({"type": "event", "id": "e" * 64, "name": "n" * 120}, True),
    ({"type": "event", "id": "e" * 65, "name": "door"}, False),
    ({"type": "event", "id": "e-1", "name": "n" * 121}, False),
    ({"type": "event", "id": "", "name": "door"}, False),
    ({"type": "event", "id": 1, "name": "door"}, False),
    ({"type": "event", "name": "door"}, False),
    ({"type": "event", "id": "e-1"}, False),
    ({"type": "event", "id": "e-1", "name": "door..opened"}, False),
    ({"type": "event", "id": "e-1", "name": ".door"}, False),
    ({"type": "event", "id": "e-1", "name": "door opened"}, False),
    ({"type": "event", "id": "e-1", "name": "session.connected"}, False),
    ({"type": "event", "id": "e-1", "name": "session"}, False),
    ({"type": "event", "id": "e-1", "name": "sessions.x"}, True),
    ({"type": "reply", "id": "c-9", "ok": True, "data": None}, True),
    ({"type": "reply", "id": "c-9", "ok": False, "error": "jammed"}, True),
    ({"type": "reply", "id": "c-9", "ok": "true"}, False),
    ({"type": "reply", "id": "c-9"}, False),
    ({"type": "reply", "ok": True}, False),
    ({"type": "reply", "id": "c-9", "ok": False, "error": 5}, False),
    ({"type": "hello", "device": "lock-1", "token": "ab"}, False),
    ({"type": "pong"}, False),
    ({"type": 7}, False),
    ({}, False),
])
def test_validate_examples(frame: dict, valid: bool) -> None:
    if valid:
        assert protocol.validate(frame) is frame
    else:
        with pytest.raises(ProtocolError) as raised:
            protocol.validate(frame)
        assert raised.value.code == "bad_frame"


@pytest.mark.parametrize("payload", [b"", b"nope", b"[1]", b'"hello"', b"1", b"null", b"\xff\xfe", b"{"])
def test_decode_refuses_what_is_not_an_object(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as raised:
        protocol.decode(payload)
    assert raised.value.code == "bad_frame"


def test_error_frame_shape() -> None:
    assert protocol.error("overloaded", "busy", None, 12.345) == {
        "type": "error", "code": "overloaded", "message": "busy", "id": None, "retry_after": 12.3}
    assert protocol.error("bad_frame", frame_id="e-1") == {"type": "error", "code": "bad_frame", "id": "e-1"}
    assert protocol.CLOSING_ERRORS < ERROR_CODES
    assert {"bad_frame", "unknown_command", "rate_limited"}.isdisjoint(protocol.CLOSING_ERRORS)


def test_tokens_rotate() -> None:
    token = auth.mint(b"old", "lock-1")
    assert token == token.lower() and len(token) == 64
    assert auth.verify([b"new", b"old"], "lock-1", token)
    assert not auth.verify([b"new"], "lock-1", token)
    assert not auth.verify([b"new", b"old"], "lock-2", token)
    assert not auth.verify([b"old"], "lock-1", token.upper())
    assert not auth.verify([b"old"], "lock-1", "ü" + token[1:])


# -- TCP framing ------------------------------------------------------------------------------
MAX_FRAME = 100
lines = st.lists(st.binary(max_size=130).map(lambda b: b.replace(b"\n", b"")) | st.just(b"x" * MAX_FRAME)
                 | st.just(b"y" * MAX_FRAME + b"\r") | st.just(b"z" * (MAX_FRAME + 1)), max_size=12)


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def _feed(sock: gsocket.socket, chunks: list[bytes], close: bool = True) -> gevent.Greenlet:
    """Write each chunk separately (yielding between them) so that the reader sees each boundary."""
    def write() -> None:
        for chunk in chunks:
            sock.sendall(chunk)
            gevent.sleep(0)
        if close:
            sock.shutdown(gsocket.SHUT_WR)
    return gevent.spawn(write)


def _expected_tcp(frames: list[bytes], tail: bytes) -> list[bytes | str]:
    out: list[bytes | str] = []
    for line in frames:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > MAX_FRAME:
            return [*out, "frame_too_large"]
        out.append(line)
    if len(tail) > MAX_FRAME + 1:
        return [*out, "frame_too_large"]
    return [*out, None]


def _drain_tcp(conn: JsonLinesConnection) -> list[bytes | str]:
    got: list[bytes | str] = []
    while True:
        try:
            frame = conn.receive_payload()
        except ProtocolError as exc:
            assert exc.code in ERROR_CODES
            return [*got, exc.code]
        got.append(frame)
        if frame is None:
            return got


@IO
@given(lines, st.binary(max_size=150).map(lambda b: b.replace(b"\n", b"")), st.lists(st.integers(0, 10**6), max_size=30))
def test_tcp_frames_reassemble_exactly_whatever_the_chunking(frames: list[bytes], tail: bytes, cuts: list[int]) -> None:
    data = b"".join(line + b"\n" for line in frames) + tail
    server, client = gsocket.socketpair()
    try:
        conn = JsonLinesConnection(server, "test", MAX_FRAME, 1 << 20)
        server.settimeout(10)
        writer = _feed(client, _chunked(data, cuts))
        got = _drain_tcp(conn)
        writer.kill()
        assert got == _expected_tcp(frames, tail)
    finally:
        server.close()
        client.close()


def test_tcp_crlf_and_limit_boundaries() -> None:
    server, client = gsocket.socketpair()
    try:
        conn = JsonLinesConnection(server, "test", MAX_FRAME, 1 << 20)
        server.settimeout(10)
        writer = _feed(client, [b'{"type":"ping"}\r\n', b"a" * MAX_FRAME + b"\r\n", b"b" * MAX_FRAME + b"\n",
                                b"\r\n", b"c" * (MAX_FRAME + 1) + b"\r\n"], close=False)
        assert conn.receive_payload() == b'{"type":"ping"}'
        assert conn.receive_payload() == b"a" * MAX_FRAME
        assert conn.receive_payload() == b"b" * MAX_FRAME
        assert conn.receive_payload() == b""
        with pytest.raises(ProtocolError) as raised:
            conn.receive_payload()
        assert raised.value.code == "frame_too_large"
        writer.join(5)
    finally:
        server.close()
        client.close()


def test_tcp_oversized_frame_is_refused_before_its_line_end_arrives() -> None:
    """A device streaming an endless line must not grow the buffer: refused with no newline in sight."""
    server, client = gsocket.socketpair()
    try:
        conn = JsonLinesConnection(server, "test", MAX_FRAME, 1 << 20)
        server.settimeout(10)
        writer = _feed(client, [b"q" * 40] * 10, close=False)
        with pytest.raises(ProtocolError) as raised:
            conn.receive_payload()
        assert raised.value.code == "frame_too_large"
        writer.kill()
    finally:
        server.close()
        client.close()


def test_tcp_send_writes_one_line_per_frame_and_finish_cuts() -> None:
    server, client = gsocket.socketpair()
    try:
        conn = JsonLinesConnection(server, "test", MAX_FRAME, 1 << 20)
        conn.send({"type": "pong"})
        conn.send({"type": "ack", "id": "e"})
        conn.finish()
        client.settimeout(5)
        received = b""
        while chunk := client.recv(1000):
            received += chunk
        assert received == b'{"type":"pong"}\n{"type":"ack","id":"e"}\n'
    finally:
        server.close()
        client.close()


def test_sender_cuts_a_peer_that_does_not_read() -> None:
    server, client = gsocket.socketpair()
    try:
        server.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_SNDBUF, 4096)
        sender = Sender(server, 8192)
        for _ in range(2000):  # far beyond kernel buffers and the limit; nobody reads
            sender.send(b"x" * 1000)
            gevent.sleep(0)
            if sender.overflowed:
                break
        assert sender.overflowed
        client.settimeout(5)
        while client.recv(65536):  # the server side was shut down: the peer sees the end
            pass
    finally:
        server.close()
        client.close()


# -- WebSocket framing ------------------------------------------------------------------------
UPGRADE = {"REQUEST_METHOD": "GET", "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade",
           "HTTP_SEC_WEBSOCKET_VERSION": "13", "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ=="}


@pytest.mark.parametrize(("change", "ok"), [
    ({}, True),
    ({"REQUEST_METHOD": "POST"}, False),
    ({"HTTP_UPGRADE": "h2c"}, False),
    ({"HTTP_SEC_WEBSOCKET_VERSION": "8"}, False),
    ({"HTTP_SEC_WEBSOCKET_KEY": ""}, False),
])
def test_ws_handshake_checks(change: dict, ok: bool) -> None:
    environ = {**UPGRADE, **change}
    if ok:
        assert handshake(environ).accept == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 section 1.3
    else:
        with pytest.raises(HandshakeError):
            handshake(environ)


def test_ws_handshake_with_a_subprotocol_must_be_offered_it_and_names_it() -> None:
    with pytest.raises(HandshakeError, match="subprotocol 'mqtt'"):
        handshake(UPGRADE, "mqtt")
    accepted = handshake({**UPGRADE, "HTTP_SEC_WEBSOCKET_PROTOCOL": "foo, mqtt"}, "mqtt")
    assert b"\r\nSec-WebSocket-Protocol: mqtt\r\n" in switching_protocols(accepted)
    assert b"Sec-WebSocket-Protocol" not in switching_protocols(handshake(UPGRADE))


def test_an_upgrade_request_head_is_read_without_pywsgi_when_it_is_plain() -> None:
    head = (b"GET /mqtt?client=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Protocol: foo\r\nsec-websocket-protocol: mqtt")
    path, headers = upgrade_request(head)
    assert path == "/mqtt" and headers["HTTP_SEC_WEBSOCKET_PROTOCOL"] == "foo,mqtt"
    assert handshake(headers, "mqtt").accept == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("head", [
    b"POST /ws HTTP/1.1\r\nUpgrade: websocket",  # not a GET
    b"GET /ws HTTP/1.1\r\nHost: x",  # no Upgrade header: pywsgi answers it
    b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n folded: value",  # obsolete folding
    b"GET /ws HTTP/1.1\r\nUpgrade : websocket",  # whitespace before the colon (RFC 9112 5.1)
    b"GET /ws HTTP/1.1\r\nno colon here",
    b"GET /ws\r\nUpgrade: websocket",  # HTTP/0.9 style
])
def test_anything_else_is_left_to_pywsgi(head: bytes) -> None:
    assert upgrade_request(head) is None


def _ws_pair(max_frame: int = MAX_FRAME) -> tuple[JsonWebSocketConnection, gsocket.socket, Connection]:
    server, client = gsocket.socketpair()
    conn = JsonWebSocketConnection(server, "test", handshake(UPGRADE), max_frame, 1 << 20)
    server.settimeout(10)
    client.settimeout(10)
    head = b""
    while b"\r\n\r\n" not in head:
        head += client.recv(1)
    assert head.startswith(b"HTTP/1.1 101 ") and b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    return conn, client, Connection(ConnectionType.CLIENT)


def _text_fragments(text: str, pieces: int) -> list[TextMessage]:
    size = max(1, -(-len(text) // pieces))
    parts = [text[i:i + size] for i in range(0, len(text), size)] or [""]
    return [TextMessage(data=part, message_finished=i == len(parts) - 1) for i, part in enumerate(parts)]


ws_messages = st.lists(st.tuples(
    st.sampled_from(["text", "text", "text", "binary", "ping"]),
    st.text(max_size=60) | st.just("é" * 60) | st.just("t" * MAX_FRAME) | st.just("u" * (MAX_FRAME + 1)),
    st.integers(1, 4)), max_size=8)


@IO
@given(ws_messages, st.lists(st.integers(0, 10**6), max_size=30))
def test_ws_messages_reassemble_whatever_the_fragmentation_and_chunking(messages: list, cuts: list[int]) -> None:
    conn, client, ws = _ws_pair()
    try:
        data, expected, pings = b"", [], 0
        for kind, text, pieces in messages:
            if kind == "ping":
                data += ws.send(Ping(payload=b"hi"))
                pings += 1
                continue
            if kind == "binary":
                data += ws.send(BytesMessage(data=text.encode(), message_finished=True))
                if len(text.encode()) > MAX_FRAME:  # refused at its header, before it is buffered
                    expected.append("frame_too_large")
                    break
                expected.append("bad_frame")
                continue
            for fragment in _text_fragments(text, pieces):
                data += ws.send(fragment)
            if len(text.encode()) > MAX_FRAME:
                expected.append("frame_too_large")
                break
            expected.append(text.encode())
        else:
            data += ws.send(CloseConnection(code=1000))
            expected.append(None)
        writer = _feed(client, _chunked(data, cuts), close=False)
        got: list = []
        while True:
            try:
                frame = conn.receive_payload()
            except ProtocolError as exc:
                got.append(exc.code)
                if exc.code == "frame_too_large":
                    break
                continue
            got.append(frame)
            if frame is None:
                break
        writer.kill()
        assert got == expected
        # Every ping before the end was answered with a pong carrying its payload.
        conn._ws.sender.flush(5)
        conn._ws._sock.shutdown(gsocket.SHUT_WR)
        answers = b""
        while chunk := client.recv(65536):
            answers += chunk
        ws.receive_data(answers)
        pongs = [e for e in ws.events() if isinstance(e, Pong)]
        assert [p.payload for p in pongs] == [b"hi"] * pings
    finally:
        conn.close()
        client.close()


def test_ws_text_is_counted_in_utf8_bytes() -> None:
    """`MAX_FRAME_BYTES` counts bytes: 60 characters of two bytes each exceed a 100-byte limit."""
    conn, client, ws = _ws_pair()
    try:
        client.sendall(ws.send(TextMessage(data="é" * 50)) + ws.send(TextMessage(data="é" * 51)))
        assert conn.receive_payload() == ("é" * 50).encode()
        with pytest.raises(ProtocolError) as raised:
            conn.receive_payload()
        assert raised.value.code == "frame_too_large"
    finally:
        conn.close()
        client.close()


def test_ws_garbage_and_close_end_the_stream_quietly() -> None:
    """Bytes that are no WebSocket frame end the stream with a close frame saying why (1002,
    protocol error; RFC 6455 7.4.1), and no frame of ours; a peer that just goes away ends it too."""
    conn, client, _ws = _ws_pair()
    try:
        client.sendall(b"\xff\x00garbage that is no websocket frame")
        assert conn.receive_payload() is None
        conn.close()
        closing = client.recv(4)
        assert closing[0] == 0x88 and closing[2:4] == (1002).to_bytes(2, "big"), closing
    finally:
        conn.close()
        client.close()
    conn, client, _ws = _ws_pair()
    try:
        client.close()
        assert conn.receive_payload() is None
    finally:
        conn.close()


def test_ws_send_and_finish_close_politely() -> None:
    conn, client, ws = _ws_pair()
    try:
        conn.send({"type": "pong"})
        conn.finish()
        data = b""
        while chunk := client.recv(65536):
            data += chunk
        ws.receive_data(data)
        events = list(ws.events())
        assert isinstance(events[0], TextMessage) and events[0].data == '{"type":"pong"}'
        assert isinstance(events[1], CloseConnection) and events[1].code == CloseReason.NORMAL_CLOSURE
    finally:
        conn.close()
        client.close()


def test_small_frames_go_out_in_the_caller_without_a_writer_greenlet() -> None:
    server, client = gsocket.socketpair()
    try:
        sender = Sender(server, 1 << 20)
        sender.send(b"x" * 100)
        client.setblocking(False)
        assert client.recv(1000) == b"x" * 100  # already in the kernel: no switch happened
    finally:
        server.close()
        client.close()


def test_a_frame_the_kernel_cannot_take_whole_is_finished_by_a_writer_in_order() -> None:
    server, client = gsocket.socketpair()
    try:
        server.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_SNDBUF, 4096)
        sender = Sender(server, 1 << 22)
        payload = bytes(range(256)) * 4096  # 1 MiB: far more than the kernel buffers
        sender.send(payload)
        sender.send(b"tail")
        client.settimeout(5)
        received = b""
        while len(received) < len(payload) + 4:
            received += client.recv(65536)
        assert received == payload + b"tail" and not sender.overflowed
    finally:
        server.close()
        client.close()
