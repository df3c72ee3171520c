"""Everything this worker publishes but takeover notices: events, presence, replies, commands.

Publisher confirms are pipelined: each publish takes the channel's next delivery
tag, and RabbitMQ's `basic.ack`/`basic.nack` (possibly `multiple`, covering every
tag up to its own) settle them. A publish succeeds (`done(None)`) only once
RabbitMQ confirmed it and did not return it: for a mandatory message that no queue
takes, RabbitMQ sends `basic.return` before the ack, and the ack then settles it as
`unroutable`. A confirm overdue by `confirm_timeout` settles as
`broker_unavailable`, and on a connection RabbitMQ has not blocked it also means
the connection is dead without a word (a partition drops packets, nothing closes):
heartbeats would notice only after two missed, with /readyz saying ready all along,
so the link reconnects at once.

A channel whose publishes are nacked for NACK_STREAK seconds with not one ack among
them is dropped too, for a fresh one: RabbitMQ 3.10 nacks every later publish of a
channel whose first publish to a quorum queue came while the queue had no leader,
even once it has one again, until the channel closes.

Why its own connection: RabbitMQ blocks a connection that publishes during a
memory or disk alarm (`connection.blocked`). Publishes are then refused at once
(`broker_unavailable`) rather than queued behind the alarm, while the consumer's
connection keeps delivering commands.

kombu's `memory://` transport has neither confirms nor returns: its wire
(wires.py) emulates them, so that this module is the same for both.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from app import metrics
from app.broker import frames
from app.broker.frames import PublishKind
from app.broker.link import WRITE_BATCH, Link, NackStreak, Wire
from app.broker.messages import EXCHANGES

log = logging.getLogger("warren.broker")

CONFIRM_TIMEOUT = 10.0

Done = Callable[[str | None], None]
"""A publish's outcome: None once RabbitMQ confirmed it (and did not return it), else why not."""

_Queued = tuple[PublishKind, str, bytes, tuple[Any, ...], Done | None]
_Pending = tuple[Done | None, str | None, float]  # outcome callback, message id if mandatory, confirm deadline


class Publisher(Link):
    """The publishing link: queue publishes from any greenlet, learn each one's outcome."""

    role = "publisher"

    def __init__(self, url: str, *, heartbeat: int = 20, node_offset: int = 0,
                 confirm_timeout: float = CONFIRM_TIMEOUT) -> None:
        super().__init__(url, heartbeat=heartbeat, node_offset=node_offset)
        self.confirm_timeout = confirm_timeout
        self._queue: deque[_Queued] = deque()
        self._pending: dict[int, _Pending] = {}  # by delivery tag
        self._oldest = 1  # no pending tag is below it
        self._next_tag = 1
        self._returned: set[str] = set()  # message ids RabbitMQ returned, their ack still to come
        self._nacks = NackStreak()
        self.methods = {frames.BASIC_ACK: self._on_ack, frames.BASIC_NACK: self._on_nack}
        self.contents = {frames.BASIC_RETURN: self._on_return}

    @property
    def accepting(self) -> bool:
        return self.connected and not self.blocked

    @property
    def backlog(self) -> int:
        """Publishes queued or awaiting their confirm."""
        return len(self._queue) + len(self._pending)

    def publish(self, kind: PublishKind, routing_key: str, body: bytes, values: tuple[Any, ...],
                done: Done | None = None) -> None:
        """Queue a publish; `done` learns its outcome. Never blocks: when RabbitMQ does not
        take publishes now, `done("broker_unavailable")` at once."""
        if not self.connected or self.blocked:
            if done is not None:
                done("broker_unavailable")
            return
        self._queue.append((kind, routing_key, body, values, done))
        self.wake()

    def give_up(self, reason: str) -> int:
        """Answer every publish awaiting its confirm with `reason` now (shutting down with no time
        left to wait); a confirm that comes later finds nothing. Returns how many."""
        pending, self._pending = self._pending, {}
        for done, _message_id, _deadline in pending.values():
            if done is not None:
                done(reason)
        return len(pending)

    # -- the writer greenlet ------------------------------------------------------------------
    def setup(self, wire: Wire) -> None:
        self._next_tag = self._oldest = 1
        metrics.BROKER_BLOCKED.set(0)
        for exchange in EXCHANGES:
            exchange(wire.channel).declare()
        wire.confirm_select()

    def write(self, wire: Wire) -> bool:
        queue = self._queue
        if not queue:
            return False
        if self.blocked:  # queued before RabbitMQ said so: refuse them as the caller would have been
            self._fail_queued()
            return False
        deadline = time.monotonic() + self.confirm_timeout
        pending, tag, publish = self._pending, self._next_tag, wire.publish
        for _ in range(min(len(queue), WRITE_BATCH)):
            kind, routing_key, body, values, done = queue.popleft()
            publish(kind, routing_key, body, values)
            pending[tag] = (done, kind.message_id(values), deadline)
            tag += 1
        self._next_tag = tag
        return bool(queue)

    def tick(self, now: float) -> None:
        """Give up on confirms that take too long; the device will resend (at-least-once). Drop a
        channel whose publishes have been nacked for NACK_STREAK seconds with no ack."""
        self._nacks.check(now)
        pending = self._pending
        overdue = 0
        while pending and self._oldest < self._next_tag:
            entry = pending.get(self._oldest)
            if entry is not None:
                if entry[2] > now:
                    break
                del pending[self._oldest]
                overdue += 1
                if entry[0] is not None:
                    entry[0]("broker_unavailable")
            self._oldest += 1
        if overdue and not self.blocked:
            raise ConnectionError(f"{overdue} publisher confirm(s) overdue after {self.confirm_timeout:g}s "
                                  f"on a connection RabbitMQ did not block")

    def on_lost(self) -> None:
        self.give_up("broker_unavailable")
        self._returned.clear()
        self._nacks = NackStreak()  # the next channel starts with no streak
        self._fail_queued()

    def _fail_queued(self) -> None:
        """Publishes that never reached RabbitMQ fail as unavailable."""
        queue = self._queue
        while queue:
            done = queue.popleft()[4]
            if done is not None:
                done("broker_unavailable")

    # -- the reader greenlet -------------------------------------------------------------------
    def _on_ack(self, payload: bytes) -> None:
        tag, multiple = frames.decode_ack(payload)
        self._nacks.acked()
        self._settle(tag, multiple, None)

    def _on_nack(self, payload: bytes) -> None:
        tag, multiple = frames.decode_ack(payload)
        self._nacks.nacked()
        self._settle(tag, multiple, "broker_unavailable")

    def _on_return(self, method: bytes, properties: dict[str, Any], _body: bytes) -> None:
        message_id = properties.get("message_id")
        if message_id:
            self._returned.add(message_id)

    def _settle(self, tag: int, multiple: bool, outcome: str | None) -> None:
        """Resolve one publish or, with `multiple`, every one up to `tag`; unknown tags are ignored."""
        pending = self._pending
        if not multiple:
            entry = pending.pop(tag, None)
            if entry is not None:
                self._resolve(entry, outcome)
            return
        last = min(tag, self._next_tag - 1)
        for settled in range(self._oldest, last + 1):
            entry = pending.pop(settled, None)
            if entry is not None:
                self._resolve(entry, outcome)
        self._oldest = max(self._oldest, last + 1)

    def _resolve(self, entry: _Pending, outcome: str | None) -> None:
        done, message_id, _deadline = entry
        if self._returned and message_id in self._returned:  # basic.return came first: no queue took it
            self._returned.discard(message_id)
            outcome = "unroutable"
        if done is not None:
            done(outcome)

    def on_blocked(self, reason: str) -> None:
        super().on_blocked(reason)
        metrics.BROKER_BLOCKED.set(1)

    def on_unblocked(self) -> None:
        super().on_unblocked()
        metrics.BROKER_BLOCKED.set(0)
