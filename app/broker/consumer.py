"""This worker's own queue and its side of the routing: claims and releases out; commands, notices, answers in.

Each worker consumes from its own exclusive queue, which nothing is bound to: its
partitions' owners (partitions.py, often another worker) pass commands and
operators' questions to it by name, and tell it `routed` (a session's claim stands:
welcome it) and `replaced` (a newer session of the device started somewhere: end
this one); answers to this worker's HTTP API come back to it too. A session's start
and end are a claim and a release published to its device's partition: no write
to RabbitMQ's metadata store. Once this worker's ring check holds (ring.py: it hashes
device ids as the exchange does, RabbitMQ said so), those of one writer pass and one
partition go as one message, straight to the partition's queue.

A worker that dies takes its queue with it; the owners find out when something
sent there comes back, and drop its sessions. After a reconnect the queue is new
(and so is the name owners forward to): every live session is claimed again (not
`fresh`: a re-statement, which the directory weighs by hello time against a
session started meanwhile elsewhere).

The same connection carries the partitions this worker owns (`PartitionOwner`): one
reader and one writer serve both sides. Until this worker's replica of the ban stream
(`BanStream`, a link of its own) has read the bans after the process starts, claims
wait: no session is welcomed before this worker knows whether its device is banned.
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
from app.broker.directory import Starts
from app.broker.link import WRITE_BATCH, Link, Wire
from app.broker.messages import (
    AGAIN_HEADER,
    ASK_TYPE,
    CLAIM,
    CLAIMED,
    DEVICE_HEADER,
    EXCHANGES,
    FORWARD_TYPE,
    PARTITION_WEIGHT,
    RELEASE,
    RELEASED,
    REPLACED_TYPE,
    RING_PROBE,
    RING_TYPE,
    ROUTED_MANY_TYPE,
    ROUTED_TYPE,
    UPDATES,
    Refusal,
    claim_body,
    decode_ask,
    decode_notice,
    decode_ring,
    decode_routed_many,
    parse_command,
    partition_queue,
    release_body,
    ring_probe_body,
    updates_body,
)
from app.broker.partitions import PartitionOwner
from app.broker.ring import RingCheck, partition_of

if TYPE_CHECKING:
    from app.broker.bans import BanStream
    from app.sessions.ports import Inbound

log = logging.getLogger("warren.broker")

_CLAIM, _RELEASE = "claim", "release"
_WEIGHT = int(PARTITION_WEIGHT)
Update = tuple[str, str, str, float, bool]  # (_CLAIM or _RELEASE, device, session, started or will_until, fresh)


class CommandConsumer(Link):
    """The consuming link: this worker's queue, its claims and releases, and the partitions it owns."""

    role = "consumer"

    def __init__(self, url: str, *, max_command_bytes: int, refuse: Callable[[Refusal], None],
                 reply_received: Callable[[str | None, bytes], None],
                 asked: Callable[[str, str, str | None, str | None], None],
                 heartbeat: int = 20, node_offset: int = 0, slots: int = 1, queue_type: str = "quorum",
                 bans: BanStream | None = None, starts: Starts | None = None,
                 flapped: Callable[[str], None] | None = None) -> None:
        """`refuse`, `reply_received` and `asked` are the facade's own (they publish or resolve what the
        consumer read); the sessions side is reached through the `Inbound` given to `attach`. This
        worker prefers the partitions of its `node_offset` among `slots` (its instance's workers).
        `starts` and `flapped` are the flapping detection of the partitions it owns (None: off); claims
        wait until `bans` are read (None: no bans to wait for)."""
        super().__init__(url, heartbeat=heartbeat, node_offset=node_offset)
        self.queue_name = _command_queue_name()
        self.epoch = 0  # connections so far: claims say which one named our queue (directory.py)
        self.owner = PartitionOwner(node_offset, slots, self.wake, queue_type, here=self._take_here,
                                    told=self._told_here, starts=starts, flapped=flapped)
        self.bans = bans
        if bans is not None:
            bans.loaded_now = self.wake
        self._max_command_bytes = max_command_bytes
        self._inbound: Inbound | None = None
        self._refuse, self._reply_received, self._asked = refuse, reply_received, asked
        self._todo: deque[Update] = deque()  # claims and releases, in order
        self._refused: list[Update] = []  # to make again at the next tick
        self.ring = RingCheck()  # until it holds (again, at each connect), claims go one by one through the exchange
        self._probes: list[tuple[str, int]] = []  # the ring check's (key, partition expected), to publish
        self.methods = {frames.BASIC_ACK: self.owner.confirmed, frames.BASIC_NACK: self.owner.confirmed}
        self.contents = {frames.BASIC_RETURN: self.owner.returned}

    def attach(self, inbound: Inbound) -> None:
        """Who takes our deliveries and notices; before `run`, since a connect asks it for its sessions."""
        self._inbound = inbound

    @property
    def ready(self) -> bool:
        return self.connected and not self.blocked

    # -- any greenlet -------------------------------------------------------------------------
    def claim(self, device: str, started: float, session_id: str) -> None:
        """A new session of `device` here: its partition's owner answers `routed` (or `replaced`).
        While disconnected there is nothing to do: the reconnect claims every live session."""
        self._queue_write((_CLAIM, device, session_id, started, True))

    def release(self, device: str, session_id: str, will_until: float | None = None) -> None:
        """A session ended; `will_until` (wall clock, 0.0 for none) rides where a claim has its hello time."""
        self._queue_write((_RELEASE, device, session_id, will_until or 0.0, False))

    def _queue_write(self, item: Update) -> None:
        if self.connected:
            self._todo.append(item)
            self.wake()

    # -- the link's greenlets -------------------------------------------------------------------
    def setup(self, wire: Wire) -> None:
        if self._inbound is None:
            raise RuntimeError("the command consumer runs with no Inbound attached: nobody would take commands")
        self.epoch += 1
        for exchange in EXCHANGES:
            exchange(wire.channel).declare()
        Queue(self.queue_name, exclusive=True, auto_delete=True, durable=False)(wire.channel).declare()
        # Deliveries come on a channel of their own, apart from the partitions' (acked, in confirm mode).
        wire.consume(wire.channel_for(acks=False), self.queue_name, self._dispatch)
        self.owner.setup(wire, time.monotonic())
        self._probes = self.ring.probes(self.owner.partitions, _WEIGHT)
        self._todo = deque((_CLAIM, device, session_id, started, False)
                           for device, started, session_id in self._inbound.live_sessions())
        if self._todo:
            log.info("consumer: claiming %d live sessions again under queue %s", len(self._todo), self.queue_name)

    def write(self, wire: Wire) -> bool:
        todo, owner = self._todo, self.owner
        for key, expect in self._probes:
            owner.publish_confirmed(wire, RING_PROBE, key, ring_probe_body(self.queue_name, expect), None)
        self._probes.clear()
        if self.bans is not None and not self.bans.loaded:  # claims wait until we know who is banned (`tick`)
            return owner.write(wire, WRITE_BATCH)
        updates = [todo.popleft() for _ in range(min(len(todo), WRITE_BATCH))]
        # On the partitions' confirmed channel: what RabbitMQ refuses (a partition queue changing
        # leader as a node goes) is made again at the next tick (not at once: the queue may refuse
        # for seconds), a claim as a re-statement (not fresh).
        if self.ring.holds:
            self._write_together(wire, updates)
        else:
            self._write_one_by_one(wire, updates)
        return owner.write(wire, WRITE_BATCH) or bool(todo)

    def _write_one_by_one(self, wire: Wire, updates: list[Update]) -> None:
        """Each claim and release through the hash exchange, which finds its partition."""
        holder, epoch, owner = self.queue_name, self.epoch, self.owner
        for update in updates:
            operation, device, session_id, started, fresh = update
            if operation is _CLAIM:
                body = claim_body(device, session_id, started, holder, fresh, epoch)
                owner.publish_confirmed(wire, CLAIM, device, body, lambda one=[update]: self._make_again(one))
            else:
                owner.publish_confirmed(wire, RELEASE, device, release_body(device, session_id, started),
                                        lambda one=[update]: self._make_again(one))

    def _write_together(self, wire: Wire, updates: list[Update]) -> None:
        """The claims and releases of each partition as one message to its queue (ring.py found where):
        RabbitMQ stores, replicates and delivers one message where it did one per session start or end.
        A device twice in one message would have two of the owner's entries share one delivery's ack
        bookkeeping twice over (receipts.py): its second update starts the partition's next message."""
        groups: dict[int, tuple[list[Update], set[str]]] = {}
        for update in updates:
            partition = partition_of(update[1], self.owner.partitions, _WEIGHT, self.ring.order)
            group = groups.get(partition)
            if group is not None and update[1] in group[1]:
                self._publish_updates(wire, partition, group[0])
                group = None
            if group is None:
                group = groups[partition] = ([], set())
            group[0].append(update)
            group[1].add(update[1])
        for partition, (group_updates, _devices) in groups.items():
            self._publish_updates(wire, partition, group_updates)

    def _publish_updates(self, wire: Wire, partition: int, updates: list[Update]) -> None:
        body = updates_body(self.queue_name, self.epoch, [
            (CLAIMED if operation is _CLAIM else RELEASED, device, session_id, when, fresh)
            for operation, device, session_id, when, fresh in updates])
        self.owner.publish_confirmed(wire, UPDATES, partition_queue(partition), body,
                                     lambda: self._make_again(updates))

    def _make_again(self, updates: list[Update]) -> None:
        """Refused by RabbitMQ: made again at the next tick, a claim as a re-statement (not fresh)."""
        self._refused.extend((_CLAIM, device, session_id, when, False) if operation is _CLAIM else
                             (operation, device, session_id, when, fresh)
                             for operation, device, session_id, when, fresh in updates)

    def tick(self, now: float) -> None:
        self.owner.tick(now)
        if self.bans is not None:
            self.bans.wait_for_load(now)
        if self._refused:
            log.info("consumer: %d claims and releases refused by RabbitMQ: made again", len(self._refused))
            self._todo.extend(self._refused)
            self._refused.clear()
            self.wake()

    def on_lost(self) -> None:
        # Our exclusive queue died with the connection; a fresh name avoids racing its deletion.
        self.queue_name = _command_queue_name()
        self._todo.clear()
        self._refused.clear()
        self.owner.on_lost()

    def _dispatch(self, _tag: int, _redelivered: bool, exchange: str, routing_key: str,
                  properties: dict[str, Any], body: bytes) -> None:
        """One delivery from our queue: a command or question passed on by its owner, a notice, or an
        answer to our API."""
        kind, inbound = properties.get("type"), self._inbound  # attached: `setup` made sure of it
        if kind == FORWARD_TYPE or kind == ASK_TYPE:
            headers = properties.get("application_headers") or {}
            device = headers.get(DEVICE_HEADER)
            if isinstance(device, str):
                self._take(kind == ASK_TYPE, device, properties, body, headers.get(AGAIN_HEADER) is True)
        elif kind == ROUTED_TYPE or kind == REPLACED_TYPE:
            notice = decode_notice(body)
            if notice is None:
                log.warning("ignoring a routing notice that is not {device, session} JSON")
            elif kind == ROUTED_TYPE:
                inbound.routed(*notice)
            else:
                inbound.replaced(*notice)
        elif kind == ROUTED_MANY_TYPE:  # to a holder that sends updates (`_write_together`), so to us
            sessions = decode_routed_many(body)
            if sessions is None:
                log.warning("ignoring routing notices that are not a list of [device, session]")
            for device, session_id in sessions or ():
                inbound.routed(device, session_id)
        elif kind == RING_TYPE:
            answer = decode_ring(body, "expect", "landed")
            if answer is not None and isinstance(answer[0], int):
                self.ring.answered(answer[0], answer[1])
        elif not exchange and kind is None:
            self._reply_received(properties.get("correlation_id"), body)

    def _take(self, ask: bool, device: str, properties: dict[str, Any], body: bytes, again: bool) -> None:
        """A command (or an operator's question) for one of our devices, from its owner."""
        if ask:
            question = decode_ask(body)
            if question is not None:
                self._asked(device, question, properties.get("reply_to"), properties.get("correlation_id"))
            return
        command = parse_command(device, properties, body, self._max_command_bytes,
                                monotonic=time.monotonic(), wall=time.time())
        if isinstance(command, Refusal):
            self._refuse(command)
        else:
            self._inbound.deliver(command, again)

    def _take_here(self, holder: str, device: str, properties: dict[str, Any], body: bytes, again: bool) -> bool:
        """The owner's forward, taken in-process when the holder is this worker (no second trip
        through RabbitMQ); False when it is another's."""
        if holder != self.queue_name:
            return False
        self._take(properties.get("type") == ASK_TYPE, device, properties, body, again)
        return True

    def _told_here(self, holder: str, routed: bool, device: str, session_id: str) -> bool:
        """The owner's `routed` or `replaced` notice, taken in-process when the holder is this worker: a
        session of a device whose partition we own is welcomed without a trip through RabbitMQ."""
        if holder != self.queue_name:
            return False
        inbound = self._inbound  # attached: `setup` made sure of it before any partition was consumed
        (inbound.routed if routed else inbound.replaced)(device, session_id)
        return True


def _command_queue_name() -> str:
    """A name that says where the queue's consumer lives (host, worker pid) in RabbitMQ's tools."""
    return f"warren.commands.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
