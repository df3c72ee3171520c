"""`MemoryWire`: the wire of kombu's in-process `memory://` broker (`make run` with no AMQP_URL).

What it emulates of RabbitMQ, and why, is in wires.py's table; the two wires answer the
same calls, so the links hold no transport branches.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, ClassVar, NoReturn

from kombu import Connection, Queue

from app.broker import frames
from app.broker.frames import PublishKind
from app.broker.wires import Endpoint, OnMessage, message_callback


class MemoryWire:
    """kombu's in-process transport (`memory://`): no socket, and RabbitMQ's answers emulated.

    kombu has neither confirms nor returns, and would park what no queue takes in a queue
    nobody reads. So a publish goes out only when some queue takes it, and `flush` answers
    the pass as RabbitMQ would: a basic.return for each mandatory publish no queue took,
    then one basic.ack covering them all, to the link's own handlers (in the writer greenlet,
    where `done` used to be called directly).
    """

    hash_exchange_type: ClassVar[str] = "fanout"  # kombu has no x-consistent-hash: one partition takes all
    alternates: ClassVar[dict[str, str]] = {}
    """exchange -> its alternate, for every wire of the process: RabbitMQ's is a policy, the broker's own."""
    collecting = False  # a pass buffers nothing here
    peer = "the in-process broker"

    def __init__(self, connection: Connection, channel: Any, link: Endpoint) -> None:
        self.connection, self.channel = connection, channel
        self._link = link
        self._confirming = False
        self._tag = 0  # publishes since confirm_select, numbered as RabbitMQ numbers them
        self._acked = 0  # the last tag answered
        self._returned: list[tuple[bytes, dict[str, Any], bytes]] = []  # this pass's unrouted mandatory publishes
        self._acking: dict[int, tuple[Any, dict[int, Any], Iterator[int]]] = {}  # id -> (channel, tag -> kombu's, tags)

    # -- the link's setup ------------------------------------------------------------------------
    def confirm_select(self) -> None:
        self._confirming = True

    def channel_for(self, *, acks: bool) -> Any:
        channel = self.connection.channel()
        if acks:
            self._acking[channel.channel_id] = (channel, {}, itertools.count(1))
        return channel

    def confirmed_channel(self) -> Any:
        self._confirming = True  # this wire's publishes are then the confirmed channel's (the link has no other)
        return self.connection.channel()

    def consume(self, channel: Any, queue: str, on_message: OnMessage, *, acks: bool = False,
                nowait: bool = False) -> None:
        """`queue`'s messages to `on_message` (from `drain_events`, in the reader); kombu's delivery tags are
        strings, so acked ones are numbered per channel as RabbitMQ numbers them."""
        if acks:
            on_message = _numbered(on_message, *self._acking[channel.channel_id][1:])
        channel.basic_consume(queue, no_ack=not acks, callback=message_callback(on_message), consumer_tag=queue)

    def follow_stream(self, name: str, arguments: dict[str, Any], on_message: OnMessage) -> int:
        """In-process a plain queue stands in for the stream (one worker, nothing to replay, nothing kept
        past the process); read without acks: returns 0, no channel to ack on."""
        channel = self.connection.channel()
        Queue(name)(channel).declare()
        channel.basic_consume(name, no_ack=True, callback=message_callback(on_message), consumer_tag=name)
        return 0

    def check_alternate(self, exchange: str, alternate: str, probe: Any) -> None:
        """In-process there is no policy to check: the alternate is emulated from now on."""
        MemoryWire.alternates[exchange] = alternate

    # -- writing (the writer greenlet) -------------------------------------------------------------
    # `channel` says which channel acks and rejects go to; publishes ignore it (there is one broker, no socket).
    def publish(self, kind: PublishKind, routing_key: str, body: bytes, values: tuple[Any, ...],
                channel: int = 0) -> None:
        self._publish(kind.exchange, kind.mandatory, routing_key, kind.properties.as_dict(values), body)

    def forward(self, routing_key: str, properties: dict[str, Any], body: bytes, channel: int) -> None:
        self._publish("", True, routing_key, dict(properties), body)

    def ack(self, tag: int, channel: int, multiple: bool = False) -> None:
        acking, tags, _ = self._acking[channel]
        acking.basic_ack(tags.pop(tag))

    def reject(self, tag: int, channel: int) -> None:
        acking, tags, _ = self._acking[channel]
        acking.basic_reject(tags.pop(tag), requeue=True)

    def _publish(self, exchange: str, mandatory: bool, routing_key: str, properties: dict[str, Any],
                 body: bytes) -> None:
        if not self._routes(exchange, routing_key) and exchange in self.alternates:
            exchange = self.alternates[exchange]
        if self._routes(exchange, routing_key):
            message = self.channel.prepare_message(body, content_type=properties.pop("content_type", None),
                                                   content_encoding=properties.pop("content_encoding", None),
                                                   properties=properties)
            self.channel.basic_publish(message, exchange=exchange, routing_key=routing_key)
        elif mandatory:
            self._returned.append((_return_method(exchange, routing_key), properties, body))
        if self._confirming:
            self._tag += 1

    def heartbeat(self) -> None:
        """Nothing to keep alive in-process."""

    def flush(self) -> None:
        """Answer this pass's publishes: returns first (their acks settle them as unroutable), then the ack."""
        returned, self._returned = self._returned, []
        on_return = self._link.contents.get(frames.BASIC_RETURN)
        if on_return is not None:
            for method, properties, body in returned:
                on_return(method, properties, body)
        if self._tag > self._acked:
            self._acked = self._tag
            self._link.methods[frames.BASIC_ACK](frames.encode_ack(self._tag, multiple=True))

    def _routes(self, exchange: str, routing_key: str) -> bool:
        """Whether a message to `exchange` with `routing_key` reaches some queue now."""
        if not exchange:
            return self.channel._has_queue(routing_key)  # the default exchange: to the queue of that name
        table = self.channel.get_table(exchange)
        return bool(self.channel.typeof(exchange).lookup(table, exchange, routing_key, None))

    # -- reading (the reader greenlet) -------------------------------------------------------------
    def read_forever(self) -> NoReturn:
        while True:  # deliveries reach `consume`'s callback
            self.connection.drain_events(timeout=None)


def _numbered(on_message: OnMessage, tags: dict[int, Any], numbers: Iterator[int]) -> OnMessage:
    """`on_message` with a channel's deliveries numbered by `numbers`; `tags` maps each number to kombu's tag."""
    def delivered(tag: Any, *delivery: Any) -> None:
        tags[number := next(numbers)] = tag
        on_message(number, *delivery)
    return delivered


def _return_method(exchange: str, routing_key: str) -> bytes:
    """A basic.return's method payload as RabbitMQ writes it (NO_ROUTE), for frames.decode_return."""
    return (frames.BASIC_RETURN + b"\x01\x38" + frames.shortstr("NO_ROUTE") + frames.shortstr(exchange)
            + frames.shortstr(routing_key))
