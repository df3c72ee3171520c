"""A lean, strict, sans-I/O RFC 6455 frame codec for the SERVER side of a WebSocket.

Why not wsproto: one gateway worker holds up to 200,000 device connections, and wsproto's
per-connection object graph (Connection, deque, FrameProtocol, FrameDecoder, Buffer,
bytearray, MessageDecoder, a suspended generator, their dicts) made a WebSocket session
cost about twice a TCP one. Here one `Reader` per connection, with `__slots__`, holds only
shared singletons while idle (b"", None, small ints), and the frame builders are plain
functions: a server sends unmasked frames and needs no state for that.

Sans-I/O like h11/wsproto: `Reader.feed(bytes)` returns the events those bytes complete;
no socket, no gevent. The handshake stays in app/transports/websocket.py.

Rules enforced (RFC 6455 section 5 and 7.4), each raising `ProtocolError` with the close
code to send:
  1002: unmasked client frame, RSV bit set (no extension is negotiated), unknown opcode,
        control frame fragmented or over 125 bytes, length not in its minimal form or with
        the 64-bit MSB set, continuation without a start, a new data frame while a
        fragmented message is open, close payload of 1 byte, invalid close code.
  1007: invalid UTF-8 in a text message (validated incrementally, so as early as it is
        decidable) or in a close reason.
  1009: a message whose reassembled payload would exceed `max_message_bytes`, raised at the
        header that announces it, before any of it is buffered.

A violation is checked at the same point of the byte stream as wsproto checks it (the
fuzz tests compare both), except that wsproto has no size limit (1009) and rejects close
code 1014, which IANA registered ("bad gateway") and RFC 6455 7.4.2 leaves to protocol use.
"""

from __future__ import annotations

import struct
from codecs import getincrementaldecoder

__all__ = ["Binary", "Close", "Ping", "Pong", "ProtocolError", "Reader", "Text",
           "binary", "close", "pong", "text", "unmask"]

OPEN, CLOSED = 0, 1
_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_KNOWN = frozenset((_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG))
_H16 = struct.Struct("!H")
_H64 = struct.Struct("!Q")
_Utf8 = getincrementaldecoder("utf-8")

# Unmasking: measured on 20 B / 200 B / 64 KiB payloads (see the report of the branch), the
# big-integer XOR wins up to about 512 bytes (one C call per step, ~1.1 us for 20 or 200 B),
# the per-key-byte translate tables win above (~100 us vs ~210 us for 64 KiB). The tables are
# built once per process (64 KiB), not per connection.
_SMALL = 512
_XOR = [bytes(a ^ b for a in range(256)) for b in range(256)]


def unmask(data: bytes | memoryview, key: bytes) -> bytes:
    """XOR `data` with the 4-byte `key` repeated, starting at key[0]; returns new bytes."""
    n = len(data)
    if n <= _SMALL:
        if not n:
            return b""
        keys = (key * ((n + 3) >> 2))[:n]
        return (int.from_bytes(data, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")
    out = bytearray(data)
    for i in range(4):
        out[i::4] = out[i::4].translate(_XOR[key[i]])
    return bytes(out)


def valid_close_code(code: int) -> bool:
    """RFC 6455 7.4: 1000-1003 and 1007-1014 are defined (1012-1014 registered at IANA), 3000-4999
    are for libraries and applications; 0-999, 1004-1006 (reserved or local-only), 1015 (local-only),
    1016-2999 (reserved for future protocol use) and anything from 5000 must not be on the wire."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class ProtocolError(Exception):
    """The client broke RFC 6455 (or our size limit): send a close frame with `code`, then hang up.

    `events` holds what the same `feed` call decoded before the violation, in order, so
    nothing the client validly sent is lost."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.events: list[Event] = []

    def close_frame(self) -> bytes:
        """The close frame to answer the violation with (the reason is our message, cut to fit)."""
        return close(self.code, self.message)


class Text:
    """A whole text message, its payload already checked to be UTF-8 (json.loads takes bytes)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.payload == self.payload  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.payload!r})"


class Binary(Text):
    """A whole binary message; in streaming mode, the next piece of the binary byte stream."""

    __slots__ = ()


class Ping(Text):
    """A ping: answer it with `pong(payload)`."""

    __slots__ = ()


class Pong(Text):
    """A pong (unsolicited ones are allowed by RFC 6455 5.5.3 and mean nothing)."""

    __slots__ = ()


class Close:
    """The client's close frame: `code` is None when it carried no payload. Answer with `reply()`."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int | None, reason: str = "") -> None:
        self.code = code
        self.reason = reason

    def reply(self) -> bytes:
        """RFC 6455 5.5.1: echo the code (1000 when the client sent none); after this nothing more is read."""
        return close(1000 if self.code is None else self.code)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Close) and (other.code, other.reason) == (self.code, self.reason)

    def __repr__(self) -> str:
        return f"Close({self.code!r}, {self.reason!r})"


Event = Text | Binary | Ping | Pong | Close


class Reader:
    """Decodes the frames a client sends after the handshake; one per connection.

    `feed(data)` returns the events completed by `data` (possibly none) and raises
    `ProtocolError` on a violation. States: OPEN, then CLOSED once a Close was returned or
    a violation raised; feeding a CLOSED reader returns [] (RFC 6455 5.5.1: after a close
    frame nothing more is read; after a violation the connection is being failed), so a
    read loop may drain without special cases.

    With `stream_binary=True` (MQTT over WebSocket, where binary messages are one byte
    stream), each binary payload piece is returned as a `Binary` as soon as it arrives,
    never buffered; the size limit still applies to each binary message.

    Between feeds the reader keeps only an incomplete header or control frame (at most
    14 + 125 bytes); data frame payloads are unmasked and handed on as they arrive.
    """

    __slots__ = ("_buf", "_fin", "_key", "_left", "_max", "_msg", "_parts", "_size", "_stream", "_utf8", "state")

    def __init__(self, max_message_bytes: int, stream_binary: bool = False) -> None:
        self._buf = b""           # unparsed input: a partial header or partial control frame
        self._key = b""           # mask of the current data frame, rotated to the next payload byte
        self._left = 0            # payload bytes of the current data frame still to come
        self._fin = False         # the current data frame ends its message
        self._msg = 0             # opcode of the open message (_TEXT/_BINARY), 0 when none
        self._parts: list[bytes] | None = None  # payload pieces of the open message
        self._size = 0            # bytes of the open message so far (announced by headers)
        self._utf8 = None         # incremental UTF-8 decoder, created at the first non-ASCII byte
        self._max = max_message_bytes
        self._stream = stream_binary
        self.state = OPEN

    def feed(self, data: bytes) -> list[Event]:
        """Parse `data` (appended to what earlier feeds left); return the events it completes."""
        if self.state is CLOSED:
            return []
        events: list[Event] = []
        buf = self._buf + data if self._buf else data
        try:
            pos = self._parse(buf, events)
        except ProtocolError as exc:
            self._fail()
            exc.events = events
            raise
        self._buf = buf[pos:] if pos < len(buf) else b""
        return events

    def _fail(self) -> None:
        self.state = CLOSED
        self._buf = self._key = b""
        self._parts = self._utf8 = None

    def _parse(self, buf: bytes, events: list[Event]) -> int:
        """The one loop of the state machine: in a data frame's payload, or at a frame header."""
        view = memoryview(buf)
        end = len(buf)
        pos = 0
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                self._payload(view[pos:pos + take], events)
                pos += take
                continue
            if end - pos < 2:
                break
            b0, b1 = buf[pos], buf[pos + 1]
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if opcode not in _KNOWN:
                raise ProtocolError(1002, f"unknown opcode {opcode:#x}")
            control = opcode >= _CLOSE
            if control and not b0 & 0x80:
                raise ProtocolError(1002, "fragmented control frame")
            if control and n > 125:
                raise ProtocolError(1002, "control frame over 125 bytes")
            head = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = _H16.unpack_from(buf, pos + 2)[0]
                head = 4
                if n < 126:
                    raise ProtocolError(1002, "16-bit length for a payload under 126 bytes")
            elif n == 127:
                if end - pos < 10:
                    break
                n = _H64.unpack_from(buf, pos + 2)[0]
                head = 10
                if n < 0x10000:
                    raise ProtocolError(1002, "64-bit length for a payload under 65536 bytes")
                if n >> 63:
                    raise ProtocolError(1002, "64-bit length with its most significant bit set")
            if b0 & 0x70:
                raise ProtocolError(1002, "RSV bit set without a negotiated extension")
            if not b1 & 0x80:
                raise ProtocolError(1002, "unmasked client frame")
            start = pos + head + 4
            if control:
                if end < start + n:
                    break  # control frames are taken whole (at most 125 bytes)
                payload = unmask(view[start:start + n], buf[start - 4:start])
                pos = start + n
                if self._control(opcode, payload, events):
                    return end
                continue
            if end < start + (1 if n else 0):
                break  # like wsproto, a data frame starts once its first payload byte is here
            self._start(opcode, bool(b0 & 0x80), n, buf[start - 4:start], events)
            pos = start
        return pos

    def _start(self, opcode: int, fin: bool, n: int, key: bytes, events: list[Event]) -> None:
        """A data frame's header: check its place in the message and the size limit."""
        if opcode == _CONT:
            if not self._msg:
                raise ProtocolError(1002, "continuation frame without a message to continue")
        elif self._msg:
            raise ProtocolError(1002, "new data frame while a fragmented message is open")
        else:
            self._msg = opcode
            self._size = 0
        self._size += n
        if self._size > self._max:
            raise ProtocolError(1009, f"message over {self._max} bytes")
        self._key, self._left, self._fin = key, n, fin
        if not n:
            self._payload(memoryview(b""), events)

    def _payload(self, piece: memoryview, events: list[Event]) -> None:
        """Unmask a piece of data frame payload; hand it on (streaming) or keep it; end the message."""
        n = len(piece)
        data = unmask(piece, self._key)
        self._left -= n
        if self._left and n & 3:
            r = n & 3
            self._key = self._key[r:] + self._key[:r]
        done = self._fin and not self._left
        if self._msg == _TEXT:
            if self._utf8 is not None or not data.isascii():
                if self._utf8 is None:
                    self._utf8 = _Utf8()
                try:
                    self._utf8.decode(data, done)
                except UnicodeDecodeError as exc:
                    raise ProtocolError(1007, f"invalid UTF-8 in a text message: {exc.reason}") from None
        elif self._stream:
            if data:
                events.append(Binary(data))
            if done:
                self._msg = 0
            if not self._left:
                self._key = b""
            return
        if done:
            if self._parts:
                self._parts.append(data)
                data = b"".join(self._parts)
            events.append(Text(data) if self._msg == _TEXT else Binary(data))
            self._msg, self._parts, self._utf8 = 0, None, None
        elif data:
            if self._parts is None:
                self._parts = [data]
            else:
                self._parts.append(data)
        if not self._left:
            self._key = b""

    def _control(self, opcode: int, payload: bytes, events: list[Event]) -> bool:
        """A whole control frame; returns True when it was the Close (the reader is then CLOSED)."""
        if opcode == _PING:
            events.append(Ping(payload))
            return False
        if opcode == _PONG:
            events.append(Pong(payload))
            return False
        if not payload:
            event = Close(None)
        elif len(payload) == 1:
            raise ProtocolError(1002, "close payload of 1 byte")
        else:
            code = _H16.unpack_from(payload)[0]
            if not valid_close_code(code):
                raise ProtocolError(1002, f"invalid close code {code}")
            try:
                event = Close(code, payload[2:].decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise ProtocolError(1007, f"invalid UTF-8 in a close reason: {exc.reason}") from None
        events.append(event)
        self._fail()
        return True


def _frame(b0: int, payload: bytes) -> bytes:
    """An unmasked frame (servers never mask, RFC 6455 5.1), the length in its minimal form."""
    n = len(payload)
    if n < 126:
        return bytes((b0, n)) + payload
    if n < 0x10000:
        return bytes((b0, 126)) + _H16.pack(n) + payload
    return bytes((b0, 127)) + _H64.pack(n) + payload


def text(payload: bytes) -> bytes:
    """A whole text message in one frame; `payload` must be UTF-8 (not checked: we encoded it)."""
    return _frame(0x80 | _TEXT, payload)


def binary(payload: bytes) -> bytes:
    """A whole binary message in one frame."""
    return _frame(0x80 | _BINARY, payload)


def pong(payload: bytes = b"") -> bytes:
    """The answer to a ping, echoing its payload (RFC 6455 5.5.3)."""
    if len(payload) > 125:
        raise ValueError("a control frame payload is at most 125 bytes")
    return _frame(0x80 | _PONG, payload)


def close(code: int = 1000, reason: str = "") -> bytes:
    """A close frame; the reason is cut, on a character boundary, to the 123 bytes that fit."""
    if not valid_close_code(code):
        raise ValueError(f"close code {code} may not be sent")
    raw = reason.encode("utf-8")
    if len(raw) > 123:
        raw = raw[:123].decode("utf-8", "ignore").encode("utf-8")
    return _frame(0x80 | _CLOSE, _H16.pack(code) + raw)
