"""How a link's frames reach a broker: `AmqpWire` (RabbitMQ, a py-amqp socket) or `MemoryWire` (kombu's
`memory://`, in memory_wire.py).

The wire is the seam between the two. A link picks the class for its URL (`wire_for`, link.py)
each time it connects, and from then on only calls the wire: publisher.py, consumer.py
and link.py hold no transport branches. What differs lives here:

    what                 AmqpWire (RabbitMQ)                     MemoryWire (`make run` with no AMQP_URL)
    publishes, acks      encoded by frames.py, one send a pass   kombu's channel methods, one call each
    confirms, returns    RabbitMQ's, read by the reader          emulated at `flush`, routing decided as
                                                                 RabbitMQ would (unrouted: not stored)
    partitions           quorum queues behind x-consistent-hash  one queue behind a fanout exchange
    alternate exchange   a policy, checked by a probe            emulated (`alternate`)
    deliveries           taken off the socket by the reader      kombu's consumer callback
    heartbeats, alarms   py-amqp's, connection.blocked           none

A wire lives for one connection and is built before the link's `setup`, which
declares and subscribes through it. On AMQP each writer pass is encoded into one
buffer and sent with one syscall, and the reader takes every frame that has
arrived with one `recv` (the codec is frames.py). Sessions never touch a wire.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NoReturn, Protocol

import amqp.exceptions
from amqp.basic_message import Message
from amqp.method_framing import frame_writer
from gevent.lock import Semaphore
from kombu import Connection, Queue

from app.broker import frames
from app.broker.frames import Properties, PublishKind
from app.broker.messages import PARTITION_PREFETCH

_FORWARD = PublishKind("", mandatory=True, message_id_at=0, properties=Properties({}, ("message_id",)))
"""Only its method matters: a forward's properties are the message's own (`forward`)."""

MethodHandler = Callable[[bytes], None]
ContentHandler = Callable[[bytes, dict[str, Any], bytes], None]
OnMessage = Callable[[int, bool, str, str, dict[str, Any], bytes], None]
"""A delivery from a queue we consume: (delivery tag, redelivered, exchange, routing key, properties, body)."""
HASH_EXCHANGE_PLUGIN = "rabbitmq_consistent_hash_exchange"
PROBE_WAIT = 2.0  # seconds for the alternate exchange's probe to come back (`check_alternate`)
STREAM_PREFETCH = 1000  # stream records in flight to a follower (`follow_stream`): acks give credit back


class MissingFeature(ConnectionError):
    """RabbitMQ lacks a plugin or a policy the routing needs; the message says what to enable. A connection
    error to the link: it logs the message and tries again with backoff until the operator enables it."""


class Endpoint(Protocol):
    """What a wire needs of its link: handlers for the inbound methods of its channels, by signature
    (`contents`: a method followed by content), and what to do when RabbitMQ blocks the connection."""

    methods: dict[bytes, MethodHandler]
    contents: dict[bytes, ContentHandler]

    def on_blocked(self, reason: str) -> None: ...

    def on_unblocked(self) -> None: ...


class AmqpWire:
    """A py-amqp connection's socket, read through one buffer and written once per writer pass.

    py-amqp's own frames (heartbeats, close-ok, declares) come through `_write_frame`:
    inside a writer pass they join its buffer; outside one they are sent at once under
    the lock that every send of this socket takes.
    """

    hash_exchange_type: ClassVar[str] = "x-consistent-hash"

    def __init__(self, connection: Connection, channel: Any, link: Endpoint) -> None:
        self.connection, self.channel = connection, channel
        self.amqp = connection.connection
        self.channel_id: int = channel.channel_id
        self.frame_max: int = self.amqp.frame_max
        self.collecting = False  # set by the writer for the length of a pass (which never yields)
        self.out = bytearray()
        self._methods = link.methods
        self._contents = dict(link.contents)
        self._contents[frames.BASIC_DELIVER] = self._delivered
        self._consumers: dict[str, OnMessage] = {}  # consumer tag (the queue's name) -> its callback
        self._sock = self.amqp.transport.sock
        self._lock = Semaphore()
        self._target = self.out
        self._encode_frame = frame_writer(self.amqp, self)  # py-amqp's encoder, writing to `write`
        self.amqp.frame_writer = self._write_frame
        self.amqp.on_blocked = link.on_blocked
        self.amqp.on_unblocked = link.on_unblocked

    @property
    def peer(self) -> str:
        """Where this wire goes, for the log."""
        return str(self.connection.as_uri())

    # -- the link's setup (before the reader and writer start) ---------------------------------
    def confirm_select(self) -> None:
        """Have RabbitMQ confirm every publish of the link's channel (basic.ack / basic.nack)."""
        self.channel.confirm_select()

    def channel_for(self, *, acks: bool) -> Any:
        """A new channel for consuming: with `acks`, with AMQP's largest prefetch (a partition owner holds
        every claim of its partition's devices unacked, and a queue delivers nothing past the prefetch)."""
        channel = self.connection.channel()
        if acks:
            channel.basic_qos(0, PARTITION_PREFETCH, False)
        return channel

    def confirmed_channel(self) -> Any:
        """A new channel for publishing in confirm mode (a partition owner's forwards and notices)."""
        channel = self.connection.channel()
        channel.confirm_select()
        return channel

    def consume(self, channel: Any, queue: str, on_message: OnMessage, *, acks: bool = False,
                nowait: bool = False) -> None:
        """Deliver `queue`'s messages to `on_message`; the reader takes each basic.deliver off the socket
        itself. py-amqp gets `on_message` too, for a delivery that comes while the setup still reads
        through it. `nowait` (from the writer, once the reader runs): no consume-ok to wait for."""
        self._consumers[queue] = on_message
        channel.basic_consume(queue, no_ack=not acks, callback=message_callback(on_message), consumer_tag=queue,
                              nowait=nowait)

    def follow_stream(self, name: str, arguments: dict[str, Any], on_message: OnMessage) -> int:
        """Declare the stream `name` and read it from its first record on a channel of its own (a stream
        consumer needs a prefetch, and its acks give credit back); returns that channel, to ack on."""
        channel = self.connection.channel()
        Queue(name, durable=True, auto_delete=False, queue_arguments=arguments)(channel).declare()
        channel.basic_qos(0, STREAM_PREFETCH, False)
        self._consumers[name] = on_message
        channel.basic_consume(name, callback=message_callback(on_message), consumer_tag=name,
                              arguments={"x-stream-offset": "first"})
        return int(channel.channel_id)

    def check_alternate(self, exchange: str, alternate: str, probe: Any) -> None:
        """Raise MissingFeature unless a mandatory publish to `exchange` that no binding takes reaches
        `alternate` (RabbitMQ's alternate exchange, set by a policy). `probe` is (routing key, properties)."""
        routing_key, properties = probe
        returned: list[Any] = []
        channel = self.connection.channel()
        try:
            channel.events["basic_return"].add(lambda *args: returned.append(args))
            # RabbitMQ returns an unroutable message as it routes it, before its ack; a routed one is
            # acked once its partition queue has it, which a queue without its majority (a cluster
            # missing nodes) never does, or nacked: no return within PROBE_WAIT is as good as an ack.
            try:
                channel.basic_publish_confirm(Message(b"", **properties), exchange=exchange,
                                              routing_key=routing_key, mandatory=True, confirm_timeout=PROBE_WAIT)
            except (TimeoutError, amqp.exceptions.MessageNacked):
                pass
        finally:
            channel.close()
        if returned:
            raise MissingFeature(
                f"RabbitMQ does not pass {exchange}'s unbound commands on to {alternate}: set the policy "
                f"(README, 'RabbitMQ'): rabbitmqctl set_policy warren-routes '^{exchange.replace('.', chr(92) + '.')}$' "
                f"'{{\"alternate-exchange\":\"{alternate}\"}}' --apply-to exchanges")

    # -- writing (the writer greenlet, except `_write_frame`) ------------------------------
    # `channel` 0 (the connection's own, never ours) means the link's channel.
    def publish(self, kind: PublishKind, routing_key: str, body: bytes, values: tuple[Any, ...],
                channel: int = 0) -> None:
        frames.encode_publish(self.out, channel or self.channel_id, self.frame_max, kind, routing_key,
                              kind.properties.encode(values), body)

    def forward(self, routing_key: str, properties: dict[str, Any], body: bytes, channel: int) -> None:
        """Pass a message on as it came (its properties encoded anew), mandatory, to the queue `routing_key`."""
        frames.encode_publish(self.out, channel, self.frame_max, _FORWARD, routing_key,
                              frames.encode_properties(properties), body)

    def ack(self, tag: int, channel: int, multiple: bool = False) -> None:
        frames.encode_basic_ack(self.out, channel, tag, multiple)

    def reject(self, tag: int, channel: int) -> None:
        frames.encode_basic_reject(self.out, channel, tag)

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
    def _delivered(self, method: bytes, properties: dict[str, Any], body: bytes) -> None:
        consumer_tag, tag, redelivered, exchange, routing_key = frames.decode_deliver(method)
        on_message = self._consumers.get(consumer_tag)
        if on_message is not None:  # else a consumer of an earlier connection
            on_message(tag, redelivered, exchange, routing_key, properties, body)

    def read_forever(self) -> NoReturn:
        """Dispatch every frame of our channels: to the link's `methods` (by signature) and `contents` (a
        method with its content); the rest, and channel 0's, to py-amqp (connection.close, blocked, basic.cancel...)."""
        methods, contents, connection = self._methods, self._contents, self.amqp
        py_amqp = connection.on_inbound_frame
        # Made now, not with the wire: the link's setup read its declares' answers through py-amqp
        # since. What py-amqp read past its last frame (normally nothing) is the reader's to start with.
        reader = frames.FrameReader(self._sock, getattr(connection.transport, "_read_buffer", b""))
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


def message_callback(on_message: OnMessage) -> Callable[[Any], None]:
    """A basic_consume callback (a kombu or py-amqp message, alike in what is read here) for `on_message`."""
    def delivered(message: Any) -> None:
        info = message.delivery_info
        on_message(message.delivery_tag, bool(info.get("redelivered")), info.get("exchange", ""),
                   info.get("routing_key", ""), message.properties, message.body)

    return delivered
