"""A worker as the owner of routing partitions: the directory of their devices, carried out on RabbitMQ.

How a command finds its device (PROTOCOL.md section 5), with nothing per device in
RabbitMQ's metadata store:

    backend --devices.commands--> (no binding: its alternate exchange, a policy)
        --warren.routes (x-consistent-hash on the device id)--> warren.routes.<p>, one of PARTITIONS
        quorum queues, each consumed by one worker at a time (single active consumer): its owner
        --by name, default exchange--> the holder's own queue --> the session --> the device

A holder publishes a claim to the device's partition when a session starts and a
release when it ends (consumer.py: those of one partition travel together, updates.py
reads them); the owner decides (directory.py), tells the
holder `routed` (the session may be welcomed) and an older holder `replaced`, and
passes each command on to the holder, or answers `offline` itself. A claim stays
unacked while its session lives, so the partition queue holds the directory: when
an owner dies RabbitMQ redelivers every live claim, in order and ahead of anything
newer, to the next subscriber, which rebuilds the directory before it reads a
later command. Every worker subscribes to every partition: at once to its share, to the
rest once its instance's workers took theirs (app/standby.py), so that owners spread.

What the owner publishes goes on a channel in confirm mode, and what it took from
a partition is acked only once that is confirmed: an owner that dies in between
leaves the message to the next one (a forward may then reach its holder twice: the
holder drops a command id it has already taken). A forward or a notice RabbitMQ
returns means the holder's queue is gone, and every session it held with it: the
owner drops them all, and their commands wait for a claim (directory.py, `Orphan`).

Each partition is consumed on a channel of its own, what the owner holds of a delivery
is a receipt (receipts.py says why), and claims are published again (claim_ages.py).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from app import metrics
from app.broker import frames, routes, updates
from app.broker.directory import (
    ACK,
    FLAPPING,
    FORWARD,
    OFFLINE,
    PARK,
    REPLACED,
    ROUTED,
    UNPARKED,
    Action,
    Directory,
    Starts,
)
from app.broker.frames import PublishKind
from app.broker.link import NackStreak, Wire
from app.broker.messages import (
    AGAIN_HEADER,
    ASK_TYPE,
    CLAIM_COPIES,
    DEVICE_HEADER,
    FORWARD_TYPE,
    PARTITION_ARGUMENTS,
    PARTITIONS,
    PING,
    PROBE_TYPE,
    REPLACED_NOTICE,
    REPLY,
    RING_ANSWER,
    RING_TYPE,
    ROUTED_MANY,
    ROUTED_NOTICE,
    TAG_HEADER,
    copies_body,
    decode_ring,
    notice_body,
    partition_queue,
    reply_body,
    ring_answer_body,
    routed_many_body,
)
from app.broker.receipts import Shares, receipt, split_receipt
from app.standby import BOARD, StandbyBoard

log = logging.getLogger("warren.routing")

CLAIM_REFRESH = 600.0  # a copy older than this is published again: RabbitMQ's consumer timeout is 30 min by default
ROUTING_NACK_STREAK = 1.0  # shorter than the publisher's: a session whose claim is nacked waits for its route
ROUTING_NACKS_DESPITE_ACKS = 2.0  # nacks for this long, some partitions acking meanwhile: a fresh channel too
COMPACT_AFTER = 1.0  # a claim held by its own delivery longer than this is copied with others (`due_compaction`)
COPY_BATCH = 5000  # claims published again per tick, at most: compacted first, then refreshed
REJECT = "reject"  # (REJECT, tag): back to its partition queue, to be taken again
COPIES = "copies"  # (COPIES, partition queue, body, tags, refused): claims published again (`tick`)
Here = Callable[[str, str, dict[str, Any], bytes, bool], bool]
Told = Callable[[str, bool, str, str], bool]


class PartitionOwner:
    """The partitions this worker consumes, their directory, and what it publishes and acks for them.

    Its handlers run in the link's reader (deliveries, confirms, returns) and queue what is to
    be written; `write` runs in the link's writer. `wake` asks the link for a writer pass.
    """

    def __init__(self, slot: int, slots: int, wake: Callable[[], None], queue_type: str = "quorum",
                 here: Here | None = None, told: Told | None = None, starts: Starts | None = None,
                 flapped: Callable[[str], None] | None = None, board: StandbyBoard = BOARD) -> None:
        """`here(holder, device, properties, body, again)` takes a forward in-process when `holder` is this
        worker's own queue (True): a device held by its partition's owner costs no second trip through
        RabbitMQ; `told(holder, routed, device, session)` does so for a `routed` or `replaced` notice.
        `starts` counts starts, `flapped(device)` bans a device starting too often (None: off); `board`: standby.py."""
        self.directory = Directory(starts)
        self.partitions = PARTITIONS  # as many as `setup` declared (one on the in-process broker)
        self._shares = Shares()  # deliveries of many updates, acked once each of them is done
        self._here, self._told, self._flapped, self._wake = here, told, flapped, wake
        self._queue_arguments: dict[str, Any] = PARTITION_ARGUMENTS[queue_type]
        self._slot, self._slots, self._board = slot % max(1, slots), max(1, slots), board
        self._preferred = [p for p in range(PARTITIONS) if p % self._slots == self._slot]
        self._wire: Wire | None = None  # this connection's, from `setup` until `on_lost`
        self._channel_id = 0  # where we publish, in confirm mode
        self._consuming: list[Any] = []  # by partition: the channel it is consumed on (see the module's docstring)
        self._acking = [0] * PARTITIONS  # by partition: that channel's id, for acks and rejects
        self._todo: deque[tuple[Any, ...]] = deque()
        self._seq = 0  # publishes on our channel since confirm_select, numbered as RabbitMQ numbers them
        # publish seq -> (the receipt to ack once it is confirmed, or 0; what to do if it is refused)
        self._after: dict[int, tuple[int | tuple[int, ...], Callable[[], None] | None]] = {}
        self._nacks = NackStreak(ROUTING_NACK_STREAK, ROUTING_NACKS_DESPITE_ACKS)
        self._refused = 0  # publishes RabbitMQ nacked since the last tick
        self._answering: set[int] = set()  # receipts whose forward came back: acked by what became of it
        self._rejects: list[int] = []  # receipts of refused forwards, requeued at the next tick
        self._unsubscribed, self._connected_at = [], 0.0  # partitions we do not prefer, until we stand by

    # -- the link's setup ------------------------------------------------------------------------
    def setup(self, wire: Wire, now: float) -> None:
        """Declare the routes (idempotent: a fixed handful, whatever the number of devices), check the
        alternate exchange, open our channels; the subscriptions follow in the writer."""
        partitions = routes.declare(wire, self._queue_arguments)
        self._wire, self.partitions = wire, partitions
        self._channel_id = wire.confirmed_channel().channel_id
        self._consuming = [wire.channel_for(acks=True) for _ in range(partitions)]
        self._acking = [channel.channel_id for channel in self._consuming]
        self._seq = 0
        preferred = [p for p in self._preferred if p < partitions] or list(range(partitions))
        self._unsubscribed = preferred + [p for p in range(partitions) if p not in preferred]
        self._connected_at = now
        self._subscribe(len(preferred))
        self._board.took_own(self._slot, now)

    def on_lost(self) -> None:
        """Our connection is gone, and every delivery we held unacked went back to its partition."""
        self.directory.reset()
        self._board.left(self._slot)  # a worker reconnecting first must not stand by for our partitions
        for held in (self._shares, self._todo, self._after, self._answering, self._rejects):
            held.clear()
        self._nacks = NackStreak(ROUTING_NACK_STREAK, ROUTING_NACKS_DESPITE_ACKS)  # a new channel: no streak
        self._wire, self._consuming = None, []

    # -- the writer ----------------------------------------------------------------------------------
    def write(self, wire: Wire, budget: int) -> bool:
        """Carry out up to `budget` queued actions; True when more wait."""
        todo, channel, shares = self._todo, self._channel_id, self._shares
        for _ in range(budget):
            if not todo:
                return False
            item = todo.popleft()
            what = item[0]
            if what is ACK:
                if shares.done(item[1]):
                    partition, tag = split_receipt(item[1])
                    wire.ack(tag, self._acking[partition])
            elif what is REJECT:
                partition, tag = split_receipt(item[1])
                wire.reject(tag, self._acking[partition])
            elif what is COPIES:
                _, routing_key, body, tags, refused = item
                self._published(tags, refused)
                wire.publish(CLAIM_COPIES, routing_key, body, (), channel)
            elif what is FORWARD:
                _, holder, properties, body, tag = item
                # Refused (its queue's node going down with it): back to the partition at the next tick.
                self._published(tag, lambda tag=tag: self._rejects.append(tag))
                wire.forward(holder, properties, body, channel)
            else:  # a publish: (kind, routing key, body, values, tag to ack once confirmed)
                _, kind, routing_key, body, values, tag = item
                self._published(tag)
                wire.publish(kind, routing_key, body, values, channel)
        return bool(todo)

    def tick(self, now: float) -> None:
        """In the writer, about once a second: standby subscriptions, old claims, a channel nacked too long."""
        self._nacks.check(now)
        if self._refused:
            log.warning("RabbitMQ refused %d routing publishes (a queue between leaders): made again", self._refused)
            self._refused = 0
        if self._unsubscribed and self._board.may_stand_by(self._slots, self._connected_at, now):
            self._subscribe(len(self._unsubscribed))
        self.directory.forget_old(now, time.time())
        expired = self.directory.expire_orphans(now)
        if expired:
            self._carry_out(expired, {}, "")
        if self._rejects:
            self._todo.extend((REJECT, tag) for tag in self._rejects)
            self._rejects.clear()
            self._wake()
        compacted = self.directory.due_compaction(now - COMPACT_AFTER, COPY_BATCH)  # claim_ages.py says why
        due = self.directory.due_refresh(now - CLAIM_REFRESH, COPY_BATCH - len(compacted))
        by_partition: dict[int, list[tuple[int, str, Any]]] = {}
        for _, tag, partition, device, entry in compacted + due:
            by_partition.setdefault(partition, []).append((tag, device, entry))
        for partition, claims in by_partition.items():  # one message a partition; the claims it copies acked once
            body = copies_body([(device, e.session, e.started, e.holder, e.epoch) for _, device, e in claims])
            tags = tuple(tag for tag, _, _ in claims)  # it is confirmed (`confirmed`); refused, copied again
            again = [(device, tag) for tag, device, _ in claims]
            self._todo.append((COPIES, partition_queue(partition), body, tags,
                               lambda again=again: self._carry_out(self.directory.copy_again(again), {}, "")))
        for holder in {entry.holder for *_, entry in due}:  # a holder that died idle is found out: pings come back
            self._todo.append(("publish", PING, holder, b"", (holder,), 0))
        if by_partition:
            self._wake()

    def _subscribe(self, count: int) -> None:
        wire = self._wire
        if wire is None:
            return
        for partition in self._unsubscribed[:count]:
            wire.consume(self._consuming[partition], partition_queue(partition),
                         lambda *delivery, p=partition: self.delivered(p, *delivery), acks=True, nowait=True)
        del self._unsubscribed[:count]

    def publish_confirmed(self, wire: Wire, kind: PublishKind, routing_key: str, body: bytes,
                          refused: Callable[[], None] | None) -> None:
        """Publish on our channel (the writer's, in the link's pass): for the holder's claims and releases,
        which RabbitMQ may refuse while their partition queue changes leader; `refused` then makes it again."""
        self._published(0, refused)
        wire.publish(kind, routing_key, body, (), self._channel_id)

    def _published(self, tag: int | tuple[int, ...], refused: Callable[[], None] | None = None) -> None:
        self._seq += 1
        self._after[self._seq] = (tag, refused)

    # -- the reader ---------------------------------------------------------------------------------
    def delivered(self, partition: int, tag: int, redelivered: bool, exchange: str, routing_key: str,
                  properties: dict[str, Any], body: bytes) -> None:
        """One message of a partition we own: a claim, a release, a command, or our own probe or copy."""
        tag = receipt(partition, tag)
        kind = properties.get("type")
        now = time.monotonic()
        if kind in updates.KINDS:  # a holder's claims and releases, or our own copies of old claims
            actions, updater = updates.read(self.directory, self._shares, kind, tag, body, by_name=not exchange,
                                            partition=partition, now=now, redelivered=redelivered)
            self._carry_out(actions, properties, routing_key, updater)
            return
        elif kind == RING_TYPE:  # ring.py's `RingCheck`: where did a holder's key land?
            if probe := decode_ring(body, "holder", "expect"):
                self._todo.append(("publish", RING_ANSWER, str(probe[0]), ring_answer_body(probe[1], partition), (), 0))
            actions = [(ACK, tag)]
        elif kind != PROBE_TYPE and exchange:  # a command or an operator's question (through the alternate)
            action = self.directory.command(tag, routing_key, redelivered, now)
            if self._passed_on(action, tag, routing_key, properties, body, redelivered):
                return
            actions = [action]
        else:
            actions = [(ACK, tag)]  # a probe, or nothing of ours
        self._carry_out(actions, properties, routing_key)

    def _carry_out(self, actions: list[Action], properties: dict[str, Any], device: str,
                   updater: str | None = None) -> None:
        """`updater`: the holder whose updates these actions answer; its `routed` notices go as one message,
        after everything else queued for it here (a holder that sends updates reads them, an older one not)."""
        todo, routed = self._todo, []
        for action in actions:
            what = action[0]
            if what is ACK:
                todo.append(action)
            elif what is ROUTED or what is REPLACED:
                _, holder, device_id, session = action
                if self._told is not None and self._told(holder, what is ROUTED, device_id, session):
                    continue
                if what is ROUTED and holder == updater:
                    routed.append((device_id, session))
                    continue
                notice = ROUTED_NOTICE if what is ROUTED else REPLACED_NOTICE
                todo.append(("publish", notice, holder, notice_body(device_id, session), (device_id,), 0))
            elif what is OFFLINE:
                self._answer_offline(action[1], device, properties)
            elif what is UNPARKED:
                (tag, device_id, parked, body), holder = action[1], action[2]
                if holder is None:
                    self._answer_offline(tag, device_id, parked)
                else:
                    self._forward(tag, holder, device_id, parked, body, False)
            elif what is FLAPPING and self._flapped is not None:
                self._flapped(action[1])
        if routed:  # after any command passed on to those sessions: it waits for them there (registry.py)
            todo.append(("publish", ROUTED_MANY, updater, routed_many_body(routed), (updater,), 0))
        self._wake()

    def _passed_on(self, action: Action, tag: int, device: str, properties: dict[str, Any], body: bytes,
                   redelivered: bool) -> bool:
        """A command the directory sends to its holder or parks; False for an answer or an ack."""
        if action[0] is FORWARD:
            self._forward(tag, action[2], device, properties, body, redelivered)
        elif action[0] is PARK:
            self.directory.park(device, (tag, device, properties, body))
        else:
            return False
        return True

    def _forward(self, tag: int, holder: str, device: str, properties: dict[str, Any], body: bytes,
                 redelivered: bool) -> None:
        if self._here is not None and self._here(holder, device, properties, body, redelivered):
            # Taken here: if this process dies before the ack, the next owner's forward to our queue
            # comes back (again, so unanswered) rather than reaching the device twice.
            self._todo.append((ACK, tag))
            self._wake()
            return
        properties = dict(properties)
        headers = {**(properties.get("application_headers") or {}), DEVICE_HEADER: device, TAG_HEADER: tag}
        if redelivered:
            headers[AGAIN_HEADER] = True
        properties["application_headers"] = headers
        if properties.get("type") != ASK_TYPE:
            properties["type"] = FORWARD_TYPE
        if not properties.get("message_id"):  # the command id the device sees, fixed before it travels on
            properties["message_id"] = uuid.uuid4().hex
        self._todo.append((FORWARD, holder, properties, body, tag))
        self._wake()

    def _answer_offline(self, tag: int, device: str, properties: dict[str, Any]) -> None:
        """No session of `device` anywhere: its sender hears so now. The command is acked right behind
        the answer, in the same write on the same connection, so RabbitMQ takes both or (the connection
        cut between two frames) leaves the command to the next owner with its answer sent: no window of seconds
        between an answer and its ack in which a failover could answer twice."""
        reply_to = properties.get("reply_to")
        if reply_to:
            command_id = str(properties.get("message_id") or "")
            correlation_id = str(properties.get("correlation_id") or command_id)
            if properties.get("type") == ASK_TYPE:
                body = orjson.dumps({"device": device, "online": False})
            else:
                metrics.COMMANDS_OFFLINE.inc()
                body = reply_body(device, command_id, False, None, "offline")
            self._todo.append(("publish", REPLY, reply_to, body, (correlation_id,), 0))
        self._todo.append((ACK, tag))

    def confirmed(self, payload: bytes) -> None:
        """basic.ack (or nack) of our publishes: ack what each of them was carrying out."""
        seq, multiple = frames.decode_ack(payload)
        after, answering, todo = self._after, self._answering, self._todo
        if multiple:
            done = []
            for s in after:  # in publish order: stop at the first one not covered
                if s > seq:
                    break
                done.append(s)
        else:
            done = [seq] if seq in after else []
        if payload[:4] == frames.BASIC_NACK:
            self._nacks.nacked()
            self._nacks.check()  # from the reader too: each second counts after a node's loss
            self._refused += len(done)  # logged once a tick: a node's loss nacks thousands, one by one
            for s in done:
                _tag, refused = after.pop(s)
                if refused is not None:
                    refused()
            self._wake()
            return
        self._nacks.acked()
        for s in done:
            tag, _refused = after.pop(s)
            if tag in answering:
                answering.discard(tag)  # came back, and acked behind its `offline` answer
            elif type(tag) is tuple:  # copies of claims (`tick`): the claims they copy are done with
                todo.extend((ACK, held) for held in tag)
            elif tag:
                todo.append((ACK, tag))
        if todo:
            self._wake()

    def returned(self, method: bytes, properties: dict[str, Any], body: bytes) -> None:
        """RabbitMQ returned a forward or a notice: its holder's queue is gone, and every session in it."""
        _code, _exchange, holder = frames.decode_return(method)
        now = time.monotonic()
        actions = self.directory.holder_gone(holder, now)
        if actions:
            log.info("holder %s is gone: %d sessions out of the directory for now", holder, len(actions))
        headers = properties.get("application_headers") or {}
        tag, device = headers.get(TAG_HEADER), headers.get(DEVICE_HEADER)
        # A forward taken from a redelivery may have reached the device through the owner before us (whose holder
        # died since): any answer could be a second one. It stays unanswered, acked when confirmed.
        if isinstance(tag, int) and isinstance(device, str) and headers.get(AGAIN_HEADER) is not True:
            self._answering.add(tag)  # its own confirm acks nothing: what becomes of it now does
            action = self.directory.command(tag, device, False, now)  # to a newer session, parked, or offline
            if not self._passed_on(action, tag, device, properties, body, False):
                self._answer_offline(tag, device, properties)
        self._carry_out(actions, properties, "")
