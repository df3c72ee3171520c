"""A model of the routing, checked with hypothesis: interleaved hellos, closes, commands, owner failovers,
holder deaths and holder reconnects, against the section 2.4 promises.

The model plays RabbitMQ (one partition queue, redelivering what its dead owner held unacked, in order,
ahead of anything newer), the owner the way app/broker/partitions.py carries out the directory's actions
(forwards acked once confirmed; an `offline` answer and its ack together; a returned forward decided
again unless it came from a redelivery: to a newer session, parked while its device's holder may come
back, or answered `offline`; parked commands passed on to a claim or answered once the grace is over), and the holders the way app/sessions/registry.py takes
notices and forwarded commands (dropping a second copy of a command id taken from a redelivery).

Checked after every step: no command is answered twice or delivered twice (a delivery is the device's
answer to come), and none reaches a session older than one welcomed before the command was published.
Checked once everything has drained: each device has at most one live session and the directory points
at it, and every command was answered or delivered, except those lost with a dead holder's queue or
left unanswered on purpose (a redelivered forward whose holder died: it may have been answered before).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from app.broker.directory import ACK, FORWARD, OFFLINE, PARK, REPLACED, ROUTED, UNPARKED, Directory

DEVICES = ("d1", "d2")
HOLDERS = ("A", "B", "C")


@dataclass
class Message:
    kind: str  # claim, release, command
    device: str
    seq: int  # its place in the queue, kept through redeliveries
    session: str = ""
    started: int = 0
    holder: str = ""
    fresh: bool = True
    epoch: int = 0
    command: int = 0
    redelivered: bool = False


@dataclass
class Session:
    id: str
    device: str
    started: int
    welcomed_at: int | None = None
    alive: bool = True


@dataclass
class Holder:
    queue: str
    alive: bool = True
    sessions: dict[str, Session] = field(default_factory=dict)
    inbox: list[tuple] = field(default_factory=list)
    taken: set[tuple[str, int]] = field(default_factory=set)


class RoutingModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = Directory()
        self.ready: list[Message] = []
        self.unacked: dict[int, Message] = {}
        self.confirms: list[int] = []  # delivery tags of forwards awaiting their confirm
        self.tags = itertools.count(1)
        self.seqs = itertools.count(1)
        self.clock = itertools.count(1)
        self.ids = itertools.count(1)
        self.holders = {name: Holder(f"{name}.0") for name in HOLDERS}
        self.queues = {holder.queue: holder for holder in self.holders.values()}
        self.sessions: list[Session] = []
        self.outcomes: dict[int, list[str]] = {}  # command id -> answers and deliveries
        self.published_at: dict[int, int] = {}
        self.may_go_unanswered: set[int] = set()

    # -- the world's moves ------------------------------------------------------------------
    @rule(device=st.sampled_from(DEVICES), name=st.sampled_from(HOLDERS))
    def hello(self, device: str, name: str) -> None:
        holder = self.holders[name]
        if not holder.alive:
            return
        session = Session(f"s{next(self.ids)}", device, next(self.clock))
        self.sessions.append(session)
        older = holder.sessions.get(device)
        holder.sessions[device] = session
        self._enqueue(Message("claim", device, 0, session.id, session.started, holder.queue,
                              epoch=_generation(holder.queue)))
        if older is not None:  # the registry ends an older session of its own; its release follows
            self._end(holder, older)

    @rule(device=st.sampled_from(DEVICES), name=st.sampled_from(HOLDERS))
    def close(self, device: str, name: str) -> None:
        holder = self.holders[name]
        session = holder.sessions.pop(device, None)
        if session is not None:
            self._end(holder, session)

    @rule(device=st.sampled_from(DEVICES))
    def command(self, device: str) -> None:
        command = next(self.ids)
        self.outcomes[command] = []
        self.published_at[command] = next(self.clock)
        self._enqueue(Message("command", device, 0, command=command))

    @precondition(lambda self: self.ready)
    @rule()
    def owner_takes_one(self) -> None:
        self._deliver(self.ready.pop(0))

    @precondition(lambda self: self.confirms)
    @rule()
    def confirm(self) -> None:
        tag = self.confirms.pop(0)
        self.unacked.pop(tag, None)

    @rule(behind=st.integers(min_value=0, max_value=3))
    def owner_dies(self, behind: int) -> None:
        """Its unacked messages go back; confirms it awaited are lost. RabbitMQ keeps every message it
        hands out again in the order it was published (with those a dead owner before had left unread)
        and puts them ahead of the rest; the model lets up to `behind` newer messages, never handed out
        yet, slip ahead of them, so that the rules are checked not to depend on that."""
        back = list(self.unacked.values())
        for message in back:
            message.redelivered = True
        again = sorted(back + [m for m in self.ready if m.redelivered], key=lambda message: message.seq)
        newer = [message for message in self.ready if not message.redelivered]
        self.ready = newer[:behind] + again + newer[behind:]
        self.unacked.clear()
        self.confirms.clear()
        self.directory.reset()

    @rule()
    def holders_grace_ends(self) -> None:
        """Time passes: devices of gone holders that nobody claimed meanwhile are no longer waited for."""
        self._carry_out(self.directory.expire_orphans(float("inf")), None)

    @rule(name=st.sampled_from(HOLDERS))
    def holder_takes_one(self, name: str) -> None:
        holder = self.holders[name]
        if holder.alive and holder.inbox:
            self._holder_handles(holder, holder.inbox.pop(0))

    @rule(name=st.sampled_from(HOLDERS))
    def holder_dies(self, name: str) -> None:
        holder = self.holders[name]
        if not holder.alive:
            return
        holder.alive = False
        for item in holder.inbox:
            if item[0] == "command":
                self.may_go_unanswered.add(item[2])  # lost with the worker's queue
        holder.inbox.clear()
        for session in holder.sessions.values():
            session.alive = False
        holder.sessions.clear()

    @rule(name=st.sampled_from(HOLDERS))
    def holder_reconnects(self, name: str) -> None:
        """Its link to RabbitMQ came back: a new queue (what was in the old one is lost), every live
        session claimed again, not fresh."""
        holder = self.holders[name]
        if not holder.alive:
            return
        for item in holder.inbox:
            if item[0] == "command":
                self.may_go_unanswered.add(item[2])
        holder.inbox.clear()
        generation = _generation(holder.queue) + 1
        holder.queue = f"{name}.{generation}"
        self.queues[holder.queue] = holder
        for session in holder.sessions.values():
            self._enqueue(Message("claim", session.device, 0, session.id, session.started, holder.queue,
                                  fresh=False, epoch=generation))

    # -- the owner, as partitions.py carries the directory out --------------------------------
    def _deliver(self, message: Message) -> None:
        tag = next(self.tags)
        self.unacked[tag] = message
        if message.kind == "claim":
            # As partitions.py does: a redelivered claim is weighed by hello time, not by its arrival.
            actions = self.directory.claim(tag, message.device, message.session, message.started, message.holder,
                                           fresh=message.fresh and not message.redelivered, partition=0, now=0.0,
                                           epoch=message.epoch, redelivered=message.redelivered)
        elif message.kind == "release":
            actions = self.directory.release(tag, message.device, message.session)
        else:
            actions = [self.directory.command(tag, message.device, message.redelivered, now=0.0)]
            if actions[0] == (ACK, tag):  # redelivered, with no holder or one whose claim overtook it: dropped
                self.may_go_unanswered.add(message.command)
        self._carry_out(actions, message)

    def _carry_out(self, actions: list[tuple], message: Message | None) -> None:
        for action in actions:
            if action[0] == ACK:
                self.unacked.pop(action[1], None)
            elif action[0] in (ROUTED, REPLACED):
                _, queue, device, session = action
                self._send(queue, (action[0], device, session))
            elif action[0] == OFFLINE:
                self._answer_offline(action[1], message)
            elif action[0] == FORWARD:
                self._forward(action[1], action[2], message)
            elif action[0] == PARK:
                self.directory.park(message.device, (action[1], message))  # stays unacked meanwhile
            elif action[0] == UNPARKED:
                (tag, parked), queue = action[1], action[2]
                if queue is None:
                    self._answer_offline(tag, parked)
                else:
                    self._forward(tag, queue, parked)

    def _answer_offline(self, tag: int, message: Message) -> None:
        self.outcomes[message.command].append("offline")
        self.unacked.pop(tag, None)

    def _forward(self, tag: int, queue: str, message: Message) -> None:
        if self._send(queue, ("command", message.device, message.command, message.redelivered)):
            self.confirms.append(tag)
        elif message.redelivered:
            self.may_go_unanswered.add(message.command)
            self.confirms.append(tag)
        else:  # returned: its holder is gone; decided again, as a command just taken
            self._carry_out([self.directory.command(tag, message.device, False, now=0.0)], message)

    def _send(self, queue: str, item: tuple) -> bool:
        """To a holder's queue by name; a queue gone returns it, and the owner drops that holder."""
        holder = self.queues[queue]
        if holder.alive and holder.queue == queue:
            holder.inbox.append(item)
            return True
        for action in self.directory.holder_gone(queue, now=0.0):
            self.unacked.pop(action[1], None)
        return False

    # -- a holder, as the registry takes what comes --------------------------------------------
    def _holder_handles(self, holder: Holder, item: tuple) -> None:
        if item[0] == ROUTED:
            session = holder.sessions.get(item[1])
            if session is not None and session.id == item[2] and session.welcomed_at is None:
                session.welcomed_at = next(self.clock)
        elif item[0] == REPLACED:
            session = holder.sessions.get(item[1])
            if session is not None and session.id == item[2]:
                del holder.sessions[item[1]]
                self._end(holder, session)
        else:
            _, device, command, again = item
            if again and (device, command) in holder.taken:
                return
            holder.taken.add((device, command))
            session = holder.sessions.get(device)
            if session is None:
                self.outcomes[command].append("offline")
                return
            self._check_not_older_than_a_welcomed_one(session, command)
            self.outcomes[command].append(f"delivered to {session.id}")

    def _end(self, holder: Holder, session: Session) -> None:
        session.alive = False
        self._enqueue(Message("release", session.device, 0, session.id, holder=holder.queue))

    def _enqueue(self, message: Message) -> None:
        message.seq = next(self.seqs)
        self.ready.append(message)

    # -- the promises ------------------------------------------------------------------------------
    def _check_not_older_than_a_welcomed_one(self, session: Session, command: int) -> None:
        published = self.published_at[command]
        for other in self.sessions:
            if other.device == session.device and other.started > session.started \
                    and other.welcomed_at is not None and other.welcomed_at < published:
                raise AssertionError(f"command {command} reached {session.id} after the newer {other.id} "
                                     "was welcomed")

    @invariant()
    def at_most_one_outcome_per_command(self) -> None:
        for command, outcomes in self.outcomes.items():
            assert len(outcomes) <= 1, f"command {command}: {outcomes}"

    def teardown(self) -> None:
        self._drain()
        live = [s for holder in self.holders.values() if holder.alive for s in holder.sessions.values()]
        devices = [session.device for session in live]
        assert len(devices) == len(set(devices)), "two live sessions of one device after everything settled"
        for session in live:
            entry = self.directory.entries.get(session.device)
            assert entry is not None and entry.session == session.id, f"{session.id} not in the directory"
            assert session.welcomed_at is not None
        for command, outcomes in self.outcomes.items():
            if command not in self.may_go_unanswered:
                assert len(outcomes) == 1, f"command {command} got {outcomes}"

    def _drain(self) -> None:
        for _ in range(10000):
            if self.ready:
                self.owner_takes_one()
            elif self.confirms:
                self.confirm()
            elif any(holder.alive and holder.inbox for holder in self.holders.values()):
                for holder in self.holders.values():
                    if holder.alive and holder.inbox:
                        self._holder_handles(holder, holder.inbox.pop(0))
            elif self.directory.orphans:
                self.holders_grace_ends()
            else:
                return
        raise AssertionError("the model did not settle")


def test_the_routing_keeps_section_2_4_through_failovers() -> None:
    run_state_machine_as_test(RoutingModel, settings=settings(max_examples=1000, stateful_step_count=30,
                                                              deadline=None))


def _generation(queue: str) -> int:
    """A holder's queue is named `<holder>.<connection count>`: the epoch its claims carry."""
    return int(queue.split(".")[1])
