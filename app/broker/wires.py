"""How a link's frames reach RabbitMQ: `AmqpWire` (a py-amqp socket) or `MemoryWire` (kombu's `memory://`).

A wire is what one writer pass writes through and what the reader reads from; the
link (link.py) owns it for the life of one connection. On AMQP each pass is encoded
into one buffer and sent with one syscall, and the reader takes every frame that has
arrived with one `recv` (the codec is frames.py). Sessions never touch a wire.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import amqp.exceptions
from amqp.method_framing import frame_writer
from gevent.lock import Semaphore
from kombu import Connection

from app.broker import frames
from app.broker.frames import PublishKind

MethodHandler = Callable[[bytes], None]
ContentHandler = Callable[[bytes, dict[str, Any], bytes], None]


class AmqpWire:
    """A py-amqp connection's socket, read through one buffer and written once per writer pass.

    py-amqp's own frames (heartbeats, close-ok, declares) come through `_write_frame`:
    inside a writer pass they join its buffer; outside one they are sent at once under
    the lock that every send of this socket takes.
    """

    acknowledges_binds = True  # queue.bind-ok / queue.unbind-ok come back through the reader

    def __init__(self, connection: Connection, channel: Any) -> None:
        self.amqp = connection.connection
        self.channel_id: int = channel.channel_id
        self.frame_max: int = self.amqp.frame_max
        self.collecting = False  # set by the writer for the length of a pass (which never yields)
        self.out = bytearray()
        self._sock = self.amqp.transport.sock
        self._lock = Semaphore()
        self._target = self.out
        self._encode_frame = frame_writer(self.amqp, self)  # py-amqp's encoder, writing to `write`
        self.amqp.frame_writer = self._write_frame
        # What py-amqp read past its last frame while connecting (normally nothing).
        self._reader = frames.FrameReader(self._sock, getattr(self.amqp.transport, "_read_buffer", b""))

    # -- writing (the writer greenlet, except `_write_frame`) ------------------------------
    # `channel` 0 (the connection's own, never ours) means the link's channel.
    def publish(self, kind: PublishKind, routing_key: str, body: bytes, values: tuple[Any, ...],
                channel: int = 0) -> None:
        frames.encode_publish(self.out, channel or self.channel_id, self.frame_max, kind, routing_key,
                              kind.properties.encode(values), body)

    def bind(self, queue: str, exchange: str, routing_key: str, channel: int = 0) -> None:
        frames.encode_bind(self.out, channel or self.channel_id, queue, exchange, routing_key)

    def unbind(self, queue: str, exchange: str, routing_key: str, channel: int = 0) -> None:
        frames.encode_unbind(self.out, channel or self.channel_id, queue, exchange, routing_key)

    def heartbeat(self) -> None:
        """Send a heartbeat when due; raises when RabbitMQ's have stopped coming."""
        self.amqp.heartbeat_tick()

    def flush(self) -> None:
        """Send what this pass wrote, in one syscall."""
        if self.out:
            self._send(self.out)
            self.out.clear()

    def write(self, data: Any) -> None:
        """Where py-amqp's frame encoder puts a frame (a view of its reused buffer: copied here)."""
        self._target += data

    def _write_frame(self, *frame: Any) -> None:
        if self.collecting:
            self._encode_frame(*frame)
            return
        self._target = own = bytearray()
        try:
            self._encode_frame(*frame)
        finally:
            self._target = self.out
        self._send(own)

    def _send(self, data: bytearray) -> None:
        # `send` in a loop rather than gevent's `sendall`, which asks the kernel for the socket's
        # buffer size on every call: one syscall per pass instead of two.
        self._lock.acquire()
        try:
            sent = self._sock.send(data)
            if sent < len(data):
                view = memoryview(data)
                while sent < len(view):
                    sent += self._sock.send(view[sent:])
        finally:
            self._lock.release()
        self.amqp.bytes_sent += 1  # py-amqp's heartbeat logic counts traffic, not bytes

    # -- reading (the reader greenlet) -------------------------------------------------------
    def read_forever(self, methods: dict[bytes, MethodHandler], contents: dict[bytes, ContentHandler]) -> NoReturn:
        """Dispatch every frame of our channels: to `methods` (by signature) and `contents` (a method
        with its content); the rest, and channel 0's, to py-amqp (connection.close, blocked, basic.cancel...)."""
        py_amqp, reader, connection = self.amqp.on_inbound_frame, self._reader, self.amqp
        handler: ContentHandler | None = None
        content_channel = 0  # the channel whose content is arriving, when `handler` is set
        method = b""
        properties: dict[str, Any] = {}
        size, chunks = 0, []
        while True:
            batch = reader.read()
            connection.bytes_recv += len(batch)
            for frame_type, channel, payload in batch:
                if channel == 0:
                    if frame_type != frames.HEARTBEAT:
                        py_amqp((frame_type, channel, payload))
                elif channel == content_channel:  # the header and body of a basic.deliver or basic.return
                    if frame_type == frames.HEADER:
                        size, properties = frames.decode_header(payload)
                    else:
                        chunks.append(payload)
                        size -= len(payload)
                    if size <= 0:
                        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                        current, handler, chunks, content_channel = handler, None, [], 0
                        current(method, properties, body)
                elif frame_type != frames.METHOD:
                    py_amqp((frame_type, channel, payload))
                else:
                    signature = payload[:4]
                    if signature in methods:
                        methods[signature](payload)
                    elif signature in contents:
                        handler, method, size, content_channel = contents[signature], payload, -1, channel
                    elif signature == frames.CHANNEL_CLOSE:
                        # Not py-amqp's: it would reopen the channel and wait, reading behind our back.
                        code, text = frames.decode_close(payload)
                        raise amqp.exceptions.ChannelError(text, reply_code=code)
                    else:
                        py_amqp((frame_type, channel, payload))


class MemoryWire:
    """kombu's in-process transport (`memory://`): no socket, no confirms, no returns."""

    acknowledges_binds = False
    collecting = False

    def __init__(self, connection: Connection, channel: Any) -> None:
        self.connection, self.channel = connection, channel

    # One channel in-process: `channel` is accepted for AmqpWire's sake and has no meaning here.
    def publish(self, kind: PublishKind, routing_key: str, body: bytes, values: tuple[Any, ...],
                channel: int = 0) -> None:
        properties = kind.properties.as_dict(values)
        message = self.channel.prepare_message(body, content_type=properties.pop("content_type", None),
                                               content_encoding=properties.pop("content_encoding", None),
                                               properties=properties)
        self.channel.basic_publish(message, exchange=kind.exchange, routing_key=routing_key)

    def routes(self, exchange: str, routing_key: str) -> bool:
        """Whether a message to `exchange` with `routing_key` reaches some queue now."""
        if not exchange:
            return True
        table = self.channel.get_table(exchange)
        return bool(self.channel.typeof(exchange).lookup(table, exchange, routing_key, None))

    def bind(self, queue: str, exchange: str, routing_key: str, channel: int = 0) -> None:
        self.channel.queue_bind(queue, exchange, routing_key=routing_key)

    def unbind(self, queue: str, exchange: str, routing_key: str, channel: int = 0) -> None:
        self.channel.queue_unbind(queue, exchange, routing_key=routing_key)

    def heartbeat(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def read_forever(self, methods: dict[bytes, MethodHandler], contents: dict[bytes, ContentHandler]) -> NoReturn:
        while True:  # deliveries reach the consumer's basic_consume callback
            self.connection.drain_events(timeout=None)


Wire = AmqpWire | MemoryWire
