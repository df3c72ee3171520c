"""The deployment's bans on RabbitMQ (PROTOCOL.md section 6): a stream every worker replays and follows.

Why a stream: a ban must reach every worker of every instance (a quorum queue hands each
message to one consumer), survive a restart of all of them and a node's loss (a stream is
replicated like a quorum queue), and be readable again from the start by a worker that
starts later. Each worker reads the stream from its first record at every connect, into
its `BanList` (app/sessions/bans.py: the latest decision per device wins, so a replay
changes nothing that is already known), and tells the sessions side about every ban it
reads (`changed`): each worker ends its own sessions of a banned device as the ban reaches
it, so a session started while the ban spread ends too.

Retention: the stream keeps records for MAX_AGE. A ban that lasts longer is published
again (a copy with the same `issued`) by whichever worker first finds its latest record
older than COPY_AGE (each worker waits a jitter of its own beyond it, so one copy is the
rule); a lift is a record too, and beats any copy of the ban it lifted.

Loaded: a worker that has just started knows no bans until it has replayed the stream.
It publishes a marker and counts the stream as replayed once the marker comes back
(or after LOAD_WAIT, loudly, when the stream cannot take it: a node down on two, or no
stream to be had). Until then the consumer holds its sessions' claims (consumer.py), so
no session is welcomed before the bans are known.

A link of its own: a stream RabbitMQ cannot serve (3.10 refuses to create one through
a node that just joined, closing the whole connection) must not take the routing down
with it. The bans wait and retry; commands flow.

On the in-process broker (`make run`, one worker), a plain queue stands in for the
stream: bans live as long as the process, and start-up says so.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from app import metrics
from app.broker.link import Link, Wire
from app.broker.messages import BAN_COPY, BAN_TYPE, MARK, MARK_TYPE, ban_body, decode_ban
from app.sessions.bans import Ban, BanList, now_ms

log = logging.getLogger("warren.bans")

MAX_AGE = "1D"  # the stream's retention; bans lasting longer are copied forward (COPY_AGE)
SEGMENT_BYTES = 4_000_000  # retention drops whole segments: small ones keep the replay short
STREAM_ARGUMENTS = {"x-queue-type": "stream", "x-max-age": MAX_AGE, "x-stream-max-segment-size-bytes": SEGMENT_BYTES}
COPY_AGE = 6 * 3600.0  # seconds after which a ban still in force is published again
COPY_JITTER = 3600.0  # each worker's own wait beyond COPY_AGE: the first copy read stops the others
COPY_CHECK = 60.0  # seconds between looks for bans due a copy
LOAD_WAIT = 5.0  # seconds to wait for our marker before counting the stream as replayed anyway
ACK_EVERY = 200  # stream deliveries acked together (a stream consumer's credit comes back with acks)


class BanStream(Link):
    """This worker's replica of the ban stream, read and copied forward on a connection of its own.

    `changed(ban)` is called in the link's reader for every record that is now its device's
    latest; `loaded_now()` once, when the bans are known (or waited for long enough)."""

    role = "bans"

    def __init__(self, url: str, name: str, *, heartbeat: int = 20, node_offset: int = 0) -> None:
        super().__init__(url, heartbeat=heartbeat, node_offset=node_offset)
        self.name = name
        self.bans = BanList()
        self.loaded = False  # the stream was replayed once (at this process's first connect)
        self.changed: Callable[[Ban], None] = lambda _ban: None
        self.loaded_now: Callable[[], None] = lambda: None
        self._jitter = random.uniform(0.0, COPY_JITTER)
        self._channel = 0  # the stream's channel, to ack on (0: nothing to ack, in-process)
        self._unacked = 0  # the last delivery tag read and not yet acked
        self._acked = 0
        self._mark: str | None = None  # our marker, until it comes back
        self._load_by = 0.0
        self._copy_at = 0.0
        self._recount = False  # a record changed what is in force: the gauge is set at the next tick
        self._todo: list[tuple[Any, ...]] = []  # publishes for the writer: (kind, body)

    def setup(self, wire: Wire) -> None:
        """Follow the stream from its first record; a marker tells us when the replay has caught up."""
        self._channel = wire.follow_stream(self.name, STREAM_ARGUMENTS, self.delivered)
        self._unacked = self._acked = 0
        if not self._channel:  # in-process: no stream, nothing to replay, nothing to copy forward
            self._set_loaded()
        elif not self.loaded:
            self._mark = uuid.uuid4().hex
            self._todo.append((MARK, mark_body(self._mark)))
        self._copy_at = time.monotonic() + COPY_CHECK

    def wait_for_load(self, now: float) -> None:
        """The consumer's tick, while it holds claims back: after LOAD_WAIT it stops waiting, loudly
        (here, not in this link's tick: a link that cannot connect has no tick)."""
        if self.loaded:
            return
        if not self._load_by:
            self._load_by = now + LOAD_WAIT
        elif now >= self._load_by:
            log.error("bans: the stream %s was not read within %.0fs (is a majority of its nodes up?): "
                      "sessions are welcomed without the bans until it is", self.name, LOAD_WAIT)
            self._set_loaded()

    def on_lost(self) -> None:
        self._todo.clear()
        self._channel = 0

    # -- the writer -------------------------------------------------------------------------------
    def write(self, wire: Wire) -> bool:
        for kind, body in self._todo:
            wire.publish(kind, self.name, body, ())
        self._todo.clear()
        if self._channel and self._unacked > self._acked:
            wire.ack(self._unacked, self._channel, multiple=True)
            self._acked = self._unacked
        return False

    def tick(self, now: float) -> None:
        if self._channel and now >= self._copy_at:
            self._copy_at = now + COPY_CHECK
            due = self.bans.due_copy(read_before=now - COPY_AGE - self._jitter,
                                     lasting_past=now_ms() + int(COPY_CHECK * 1000))
            self._todo.extend((BAN_COPY, ban_body(ban)) for ban in due)
            self.bans.forget_old()
            self._recount = True  # and bans that ended meanwhile leave the count
        if self._recount and self.loaded:  # once a tick, not per record: a replay reads thousands
            self._recount = False
            metrics.BANS_IN_FORCE.set(len(self.bans.in_force()))
        if self._todo or self._unacked > self._acked:
            self.wake()

    # -- the reader ---------------------------------------------------------------------------------
    def delivered(self, tag: int, _redelivered: bool, _exchange: str, _routing_key: str,
                  properties: dict[str, Any], body: bytes) -> None:
        if self._channel:
            self._unacked = tag
            if tag - self._acked >= ACK_EVERY:
                self.wake()
        kind = properties.get("type")
        if kind == MARK_TYPE:
            if self._mark is not None and body == mark_body(self._mark):
                self._set_loaded()
        elif kind == BAN_TYPE:
            ban = decode_ban(body)
            if ban is None:
                log.warning("bans: skipping a record of %s that is not a ban", self.name)
            elif self.bans.apply(ban):
                self._recount = True
                self.changed(ban)

    def _set_loaded(self) -> None:
        if not self.loaded:
            self.loaded = True
            self._mark = None
            metrics.BANS_IN_FORCE.set(len(self.bans.in_force()))
            log.info("bans: %d in force, read from the stream %s", len(self.bans.in_force()), self.name)
            self.loaded_now()


def mark_body(mark: str) -> bytes:
    """A marker's body: the marker alone, so that comparing bodies finds ours."""
    return f'{{"mark":"{mark}"}}'.encode()


def ban_now(device: str, seconds: float | None, reason: str, by: str, after: Ban | None = None) -> Ban:
    """A ban decided now, for `seconds` (None: no end), replacing `after` (the device's latest record
    here): issued after it even when this host's clock is behind the one that issued it."""
    issued = _issued_after(after)
    return Ban(device, issued, None if seconds is None else now_ms() + int(seconds * 1000), reason, by)


def lift_now(device: str, after: Ban | None) -> Ban:
    """The end of `after`, the device's ban: issued after it, whatever this host's clock says."""
    return Ban(device, _issued_after(after), lifted=True)


def _issued_after(previous: Ban | None) -> int:
    return now_ms() if previous is None else max(now_ms(), previous.issued + 1)
