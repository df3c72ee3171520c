"""This worker's command queue: commands for its devices, takeover notices, answers to its API.

Each worker consumes from its own exclusive queue, bound with one routing key per
device connected to it (refcounted: two sessions of one device in this worker share
a binding). A worker that dies takes its queue and bindings with it, so no stale
route survives (PROTOCOL.md section 5). After a reconnect the queue is new: every
live device is bound again and every live session announced again.

Writes are paced, so that commands keep flowing for the devices already bound while
thousands of others are bound again (after a failover). Deliveries come on a channel
of their own: RabbitMQ runs a channel's methods one at a time, and a bind can wait.
Our own takeover notices come back through our own queue, ahead of the commands
behind them. And binds written in bulk right after a reconnect race RabbitMQ's
deletion of our previous queue's bindings of the same keys (measured with 20,000:
binds take 50 ms each, the deletion drags on for seconds, and RabbitMQ holds commands
to those keys meanwhile). So every write waits for its answer (a bind for its
bind-ok, an unbind for its unbind-ok, a notice for its own echo; binds are not
no-wait), and a `Window` says how many may be unanswered at once.

Binds go over several channels ("lanes"), a device always on the same one: RabbitMQ
runs one channel's binds one after another, and on a cluster each is a transaction
the other nodes take part in, so one channel caps a worker however wide the window
(two nodes here: 1,168 sessions set up a second with one channel per worker, 1,341
with four; BENCHMARKS.md). A device's bind, unbind and notice share its lane, so
their order, which the welcome relies on, holds.

Takeover notices are published on this connection, on the device's lane, after its
bind: RabbitMQ handles a channel's methods in order, so by the time our own
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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kombu import Queue

from app.broker import frames
from app.broker.link import WRITE_BATCH, Link
from app.broker.messages import (
    ASK_TYPE,
    COMMANDS_EXCHANGE,
    EXCHANGES,
    TAKEOVER,
    TAKEOVER_TYPE,
    Refusal,
    decode_ask,
    decode_takeover,
    encode_takeover,
    parse_command,
)
from app.broker.wires import Wire

if TYPE_CHECKING:
    from app.sessions.ports import Inbound

log = logging.getLogger("warren.broker")

QUEUE_DELAY = 0.05  # seconds of our writes that may stand at RabbitMQ between a command and us
MIN_WINDOW, START_WINDOW, MAX_WINDOW = 1, 8, 256
BIND_LANES = 4  # channels for binds, unbinds and notices (on a cluster, eight measured no better than four)
ECHO_TIMEOUT = 10.0  # a notice not back by then was not routed to us (its device unbound meanwhile)

_BIND, _UNBIND, _NOTICE = "bind", "unbind", "notice"


class Window:
    """How many writes may await their answer: as many as RabbitMQ answers in QUEUE_DELAY.

    A write's cost is the time between answers while writes are outstanding (or since
    the write, for the first): 0.1 ms for a bind normally, 5 to 80 ms while RabbitMQ is
    deleting our previous queue's bindings. When a write costs more than QUEUE_DELAY the
    window closes (`size` 0) and one write each TICK tries again, so that a RabbitMQ
    that cannot keep up is not handed more; it opens again as prompt answers come back.
    """

    def __init__(self) -> None:
        self.size = START_WINDOW
        self._per_write: float | None = None  # a moving average of what a write costs RabbitMQ
        self._busy_since: float | None = None  # when the oldest write still unanswered began to count

    def wrote(self, now: float, outstanding: int) -> None:
        if not outstanding:
            self._busy_since = now

    def answered(self, now: float, outstanding: int) -> None:
        if self._busy_since is not None:
            cost = now - self._busy_since
            self._per_write = cost if self._per_write is None else 0.7 * self._per_write + 0.3 * cost
            self.size = 0 if self._per_write > QUEUE_DELAY else \
                max(MIN_WINDOW, min(MAX_WINDOW, int(QUEUE_DELAY / max(self._per_write, 1e-6))))
        self._busy_since = now if outstanding else None

    def tick(self) -> None:
        if self.size == 0:
            self.size = 1  # one write to see whether RabbitMQ answers promptly again

    def idle(self) -> None:
        """Nothing is outstanding any more (given up on, or a new connection)."""
        self._busy_since = None


class CommandConsumer(Link):
    """The consuming link: the command queue's bindings, takeover notices, and every delivery."""

    role = "consumer"

    def __init__(self, url: str, *, max_command_bytes: int, refuse: Callable[[Refusal], None],
                 reply_received: Callable[[str | None, bytes], None],
                 asked: Callable[[str, str, str | None, str | None], None],
                 heartbeat: int = 20, node_offset: int = 0) -> None:
        """`refuse`, `reply_received` and `asked` are the facade's own (they publish or resolve what the
        consumer read); the sessions side is reached through the `Inbound` given to `attach`."""
        super().__init__(url, heartbeat=heartbeat, node_offset=node_offset)
        self.queue_name = _command_queue_name()
        self.bound: dict[str, int] = {}  # device -> sessions of it in this worker
        self._max_command_bytes = max_command_bytes
        self._inbound: Inbound | None = None
        self._refuse, self._reply_received, self._asked = refuse, reply_received, asked
        self._todo: deque[tuple[Any, ...]] = deque()  # binds, unbinds and notices, in write order
        self._awaiting = 0  # binds and unbinds written, their -ok still to come
        self._echoes: dict[tuple[str, str], float] = {}  # (device, session) of notices written -> expiry
        self._lanes: tuple[int, ...] = (0,)  # channel ids for binds (0: the link's own)
        self._rebinding: tuple[int, float] | None = None  # after a connect: (devices, when) until all are bound
        self.window = Window()
        self.methods = {frames.QUEUE_BIND_OK: self._on_bind_ok, frames.QUEUE_UNBIND_OK: self._on_bind_ok}

    def attach(self, inbound: Inbound) -> None:
        """Who takes our deliveries and notices; before `run`, since a connect asks it for its sessions."""
        self._inbound = inbound

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
    def setup(self, wire: Wire) -> None:
        if self._inbound is None:
            raise RuntimeError("the command consumer runs with no Inbound attached: nobody would take commands")
        for exchange in EXCHANGES:
            exchange(wire.channel).declare()
        Queue(self.queue_name, exclusive=True, auto_delete=True, durable=False)(wire.channel).declare()
        # Deliveries come on a channel of their own: RabbitMQ runs a channel's methods one at a time,
        # so a bind that waits (for the deletion of our previous queue's bindings of the same keys,
        # seconds at 20,000) would hold up every delivery behind it on a shared one.
        wire.consume(self.queue_name, self._dispatch)
        self._lanes = wire.lanes(BIND_LANES)
        # Announcing every session, not only those begun during the outage: another worker may hold
        # an older session of one of our devices and have re-bound after our notice went out, or
        # before; whichever order the workers come back in, the later notice reaches the other.
        self._awaiting = 0
        self._echoes.clear()
        self.window = Window()  # a new connection: RabbitMQ is likely deleting our previous queue now
        self._todo = deque([(_BIND, device) for device in self.bound])
        self._todo.extend((_NOTICE, device, started, session_id)
                          for device, started, session_id in self._inbound.live_sessions())
        self._rebinding = (len(self.bound), time.monotonic()) if self.bound else None

    def write(self, wire: Wire) -> bool:
        todo, queue, paced, lanes = self._todo, self.queue_name, wire.acknowledges_binds, self._lanes
        now = time.monotonic()
        for _ in range(WRITE_BATCH):
            if not todo:
                return False
            if paced and self._outstanding() >= self.window.size:
                return False  # the reader wakes us as answers come back
            operation, device, *session = todo.popleft()
            lane = lanes[hash(device) % len(lanes)]  # str hashes are cached: cheap, and fixed per process
            if operation is _UNBIND:
                if device not in self.bound:  # else bound again since: a stale unbind writes nothing
                    self.window.wrote(now, self._outstanding())
                    wire.unbind(queue, COMMANDS_EXCHANGE, device, lane)
                    self._awaiting += paced
            elif device not in self.bound:
                continue  # unbound since: a stale bind, or the notice of an ended session, writes nothing
            elif operation is _BIND:
                self.window.wrote(now, self._outstanding())
                wire.bind(queue, COMMANDS_EXCHANGE, device, lane)
                self._awaiting += paced
            else:
                self.window.wrote(now, self._outstanding())
                wire.publish(TAKEOVER, device, encode_takeover(device, session[1], session[0]), (), lane)
                if paced:
                    self._echoes[(device, session[1])] = now + ECHO_TIMEOUT
        return bool(todo)

    def tick(self, now: float) -> None:
        expired = [key for key, expiry in self._echoes.items() if expiry <= now]
        for key in expired:
            del self._echoes[key]
        if expired and not self._outstanding():
            self.window.idle()
        self.window.tick()
        self._wake_if_room()
        self._rebound(now)

    def on_lost(self) -> None:
        # Our exclusive queue died with the connection; a fresh name avoids racing its deletion.
        self.queue_name = _command_queue_name()
        self._todo.clear()
        self._awaiting = 0
        self._echoes.clear()
        self._rebinding = None
        self.window.idle()

    def _on_bind_ok(self, _payload: bytes) -> None:
        self._awaiting -= 1
        self._answered()

    def _outstanding(self) -> int:
        return self._awaiting + len(self._echoes)

    def _answered(self) -> None:
        now = time.monotonic()
        self.window.answered(now, self._outstanding())
        self._wake_if_room()
        if self._rebinding is not None:
            self._rebound(now)

    def _rebound(self, now: float) -> None:
        """Once everything a connect queued is answered, say so: from then on commands route here for
        every device this worker holds (what an operator watching a failover wants to know)."""
        if self._todo or self._outstanding() or self._rebinding is None:
            return
        devices, since = self._rebinding
        self._rebinding = None
        log.info("consumer: %d devices bound again and their sessions announced, %.2fs after connecting",
                 devices, now - since)

    def _wake_if_room(self) -> None:
        if self._todo and self._outstanding() <= self.window.size // 2:
            self.wake()

    def _dispatch(self, exchange: str, routing_key: str, properties: dict[str, Any], body: bytes) -> None:
        """One delivery from our queue: an answer to our API, a takeover notice, an operator's question
        about one of our devices, or a command."""
        kind, inbound = properties.get("type"), self._inbound  # attached: `setup` made sure of it
        if not exchange:
            self._reply_received(properties.get("correlation_id"), body)
        elif kind == TAKEOVER_TYPE:
            notice = decode_takeover(body)
            if notice is None:
                log.warning("ignoring a takeover notice that is not {device, started, session} JSON")
                return
            if self._echoes.pop((notice[0], notice[2]), None) is not None:  # one of ours, back
                self._answered()
            inbound.announced(*notice)
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
                inbound.deliver(command)


def _command_queue_name() -> str:
    """A name that says where the queue's consumer lives (host, worker pid) in RabbitMQ's tools."""
    return f"warren.commands.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
