"""This worker's command queue: commands for its devices, takeover notices, answers to its API.

Each worker consumes from its own exclusive queue, bound with one routing key per
device connected to it (refcounted: two sessions of one device in this worker share
a binding). A worker that dies takes its queue and bindings with it, so no stale
route survives (PROTOCOL.md section 5). After a reconnect the queue is new: every
live device is bound again and every live session announced again.

Writes are paced. RabbitMQ's channel handles our methods and its deliveries to us in
one mailbox, and our own takeover notices come back through our own queue, ahead of
the commands behind them: a worker re-binding and re-announcing 20,000 devices after
a failover would hold up the commands of the devices already bound for seconds. So
every write waits for its answer (a bind for its bind-ok, an unbind for its
unbind-ok, a notice for its own echo; binds are not no-wait) and at most WINDOW are
ever unanswered: that many at most stand between a command and its device.

Takeover notices are published on this connection, on the same channel, after the
device's bind: RabbitMQ handles a channel's methods in order, so by the time our own
notice comes back the bind before it is in effect, and the session's welcome waits
for exactly that. The price: this connection publishes, so under a memory or disk
alarm RabbitMQ blocks it as soon as it sends a notice. While it is blocked RabbitMQ
reads nothing from it (binds, unbinds and notices wait, in order, for the alarm to
clear) but still writes to it: commands for devices already bound keep arriving.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from kombu import Queue

from app.broker import frames
from app.broker.link import WRITE_BATCH, Link, Wire
from app.broker.messages import (
    ASK_TYPE,
    COMMANDS_EXCHANGE,
    EXCHANGES,
    TAKEOVER,
    TAKEOVER_TYPE,
    Command,
    Refusal,
    decode_ask,
    decode_takeover,
    encode_takeover,
    parse_command,
)

log = logging.getLogger("warren.broker")

WINDOW = 256  # binds, unbinds and notices written whose answer has not come back, at most
ECHO_TIMEOUT = 10.0  # a notice not back by then was not routed to us (its device unbound meanwhile)

_BIND, _UNBIND, _NOTICE = "bind", "unbind", "notice"


class CommandConsumer(Link):
    """The consuming link: the command queue's bindings, takeover notices, and every delivery."""

    role = "consumer"

    def __init__(self, url: str, *, max_command_bytes: int, deliver: Callable[[Command], None],
                 refuse: Callable[[Refusal], None], takeover: Callable[[str, float, str], None],
                 reply_received: Callable[[str | None, bytes], None],
                 asked: Callable[[str, str, str | None, str | None], None],
                 live_sessions: Callable[[], Iterable[tuple[str, float, str]]],
                 heartbeat: int = 20, node_offset: int = 0) -> None:
        super().__init__(url, heartbeat=heartbeat, node_offset=node_offset)
        self.queue_name = _command_queue_name()
        self.bound: dict[str, int] = {}  # device -> sessions of it in this worker
        self._max_command_bytes = max_command_bytes
        self._deliver, self._refuse, self._takeover = deliver, refuse, takeover
        self._reply_received, self._asked = reply_received, asked
        self._live_sessions = live_sessions
        self._todo: deque[tuple[Any, ...]] = deque()  # binds, unbinds and notices, in write order
        self._awaiting = 0  # binds and unbinds written, their -ok still to come
        self._echoes: dict[tuple[str, str], float] = {}  # (device, session) of notices written -> expiry
        self.methods = {frames.QUEUE_BIND_OK: self._on_bind_ok, frames.QUEUE_UNBIND_OK: self._on_bind_ok}
        self.contents = {frames.BASIC_DELIVER: self._on_deliver}

    @property
    def ready(self) -> bool:
        return self.connected and not self.blocked

    # -- any greenlet -------------------------------------------------------------------------
    def bind(self, device: str) -> None:
        count = self.bound.get(device, 0) + 1
        self.bound[device] = count
        if count == 1:
            self._queue_write(_BIND, device)

    def unbind(self, device: str) -> None:
        count = self.bound.pop(device, 0) - 1
        if count > 0:
            self.bound[device] = count
        else:
            self._queue_write(_UNBIND, device)

    def announce(self, device: str, started: float, session_id: str) -> None:
        """Tell every worker whose queue binds `device` (this one too) that this session exists.

        Written after this device's bind, in order. While disconnected there is nothing to do:
        the reconnect announces every live session.
        """
        self._queue_write(_NOTICE, device, started, session_id)

    def _queue_write(self, *item: Any) -> None:
        if self.connected:  # else the next connect's setup re-derives everything
            self._todo.append(item)
            self.wake()

    # -- the link's greenlets -------------------------------------------------------------------
    def setup(self, channel: Any) -> None:
        for exchange in EXCHANGES:
            exchange(channel).declare()
        Queue(self.queue_name, exclusive=True, auto_delete=True, durable=False)(channel).declare()
        # On AMQP the reader takes deliveries off the wire itself; the callback serves `memory://`.
        channel.basic_consume(self.queue_name, no_ack=True, callback=self._on_in_process_message,
                              consumer_tag=self.queue_name)
        # Announcing every session, not only those begun during the outage: another worker may hold
        # an older session of one of our devices and have re-bound after our notice went out, or
        # before; whichever order the workers come back in, the later notice reaches the other.
        self._awaiting = 0
        self._todo = deque([(_BIND, device) for device in self.bound])
        self._todo.extend((_NOTICE, device, started, session_id)
                          for device, started, session_id in self._live_sessions())

    def write(self, wire: Wire) -> bool:
        todo, queue, paced = self._todo, self.queue_name, wire.acknowledges_binds
        expiry = time.monotonic() + ECHO_TIMEOUT
        for _ in range(WRITE_BATCH):
            if not todo:
                return False
            if paced and self._awaiting + len(self._echoes) >= WINDOW:
                return False  # the reader wakes us as answers come back
            operation, device, *session = todo.popleft()
            if operation is _UNBIND:
                if device not in self.bound:  # else bound again since: a stale unbind writes nothing
                    wire.unbind(queue, COMMANDS_EXCHANGE, device)
                    self._awaiting += paced
            elif device not in self.bound:
                continue  # unbound since: a stale bind, or the notice of an ended session, writes nothing
            elif operation is _BIND:
                wire.bind(queue, COMMANDS_EXCHANGE, device)
                self._awaiting += paced
            else:
                wire.publish(TAKEOVER, device, encode_takeover(device, session[1], session[0]), ())
                if paced:
                    self._echoes[(device, session[1])] = expiry
        return bool(todo)

    def tick(self, now: float) -> None:
        expired = [key for key, expiry in self._echoes.items() if expiry <= now]
        for key in expired:
            del self._echoes[key]
        if expired:
            self._answered()

    def on_lost(self) -> None:
        # Our exclusive queue died with the connection; a fresh name avoids racing its deletion.
        self.queue_name = _command_queue_name()
        self._todo.clear()
        self._awaiting = 0
        self._echoes.clear()

    def _on_bind_ok(self, _payload: bytes) -> None:
        self._awaiting -= 1
        self._answered()

    def _answered(self) -> None:
        if self._todo and self._awaiting + len(self._echoes) <= WINDOW // 2:
            self.wake()

    def _on_deliver(self, method: bytes, properties: dict[str, Any], body: bytes) -> None:
        exchange, routing_key = frames.decode_deliver(method)
        self._dispatch(exchange, routing_key, properties, body)

    def _on_in_process_message(self, message: Any) -> None:
        info = message.delivery_info
        self._dispatch(info.get("exchange", ""), info.get("routing_key", ""), message.properties, message.body)

    def _dispatch(self, exchange: str, routing_key: str, properties: dict[str, Any], body: bytes) -> None:
        """One delivery from our queue: an answer to our API, a takeover notice, an operator's question
        about one of our devices, or a command."""
        kind = properties.get("type")
        if not exchange:
            self._reply_received(properties.get("correlation_id"), body)
        elif kind == TAKEOVER_TYPE:
            notice = decode_takeover(body)
            if notice is None:
                log.warning("ignoring a takeover notice that is not {device, started, session} JSON")
                return
            if self._echoes.pop((notice[0], notice[2]), None) is not None:  # one of ours, back
                self._answered()
            self._takeover(*notice)
        elif kind == ASK_TYPE:
            question = decode_ask(body)
            if question is not None:
                self._asked(routing_key, question, properties.get("reply_to"), properties.get("correlation_id"))
        else:
            command = parse_command(routing_key, properties, body, self._max_command_bytes,
                                    monotonic=time.monotonic(), wall=time.time())
            if isinstance(command, Refusal):
                self._refuse(command)
            else:
                self._deliver(command)


def _command_queue_name() -> str:
    """A name that says where the queue's consumer lives (host, worker pid) in RabbitMQ's tools."""
    return f"warren.commands.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
