"""Where each device of a partition lives, and who wins when two hellos race: the partition owner's rules.

Sans-I/O: messages in (claims, releases, commands, a holder's queue gone), actions
out (acks, notices, forwards). app/broker/partitions.py reads a partition queue into
it and carries its actions out; nothing here does I/O, so the unit tier drives it
directly and a hypothesis model checks it (tests/unit/test_routing_model.py).

A partition is a quorum queue consumed by one worker at a time (single active
consumer). Every message for the partition's devices passes through it in one
order: the claims and releases that holders publish as sessions start and end,
and the commands backends publish (through `devices.commands`' alternate
exchange). The entry of a device is the claim that made it, held unacknowledged:
the directory is the set of unacked claims, so when the owner dies RabbitMQ hands
all of them, in their order and ahead of anything newer, to the next owner, which
rebuilds the same directory before it reads a single later command. Nothing is
written to RabbitMQ's metadata store for it.

Which claim wins. A `fresh` claim (a new session's) always wins: the last to reach
the owner is the session whose hello arrived last, and the older holder is told
`Replaced`. A claim that is not fresh is a holder re-stating a live session after
its own connection to RabbitMQ came back (its queue, and the name we forward to,
changed), or one the owner took from a redelivery (its place in the order is
no longer news): it takes an empty or its own entry; against another session the
newer hello time wins, so two sessions started during an outage resolve to one.
Of two claims of one session, the one from the holder's later connection
(`epoch`) stands, whichever reaches the owner first.

Flapping (PROTOCOL.md section 6) is counted here too, since every session start of a
device, on whatever worker or host, passes through its owner: a fresh claim that would
be the device's FLAP_MAX + 1st start within FLAP_WINDOW is refused (`Flapping`: the
owner bans the device, and the ban, read by every worker, ends its sessions). It costs
no round trip a hello did not already make.

A holder's queue gone (RabbitMQ returned something sent to it) takes every session it
held out of the directory, but most often the holder lives: its link lost its node and
comes back with a new queue, claiming its live sessions again within seconds. Meanwhile
its devices' commands wait (`Park`), unacked, for up to HOLDER_GRACE: a claim of the
device passes them on to its session, the release of the orphaned session or the end of
the grace answers them `offline`. Without it a node's loss answered `offline` for
thousands of connected devices (PROTOCOL.md section 5: offline means no live session).
A claim naming a holder known gone (redelivered after an owner's death) is stale: its
device joins that holder's orphans, with the same grace, not a fresh one.

Delayed wills (MQTT 5's Will Delay Interval, PROTOCOL.md section 9) hang on the same
order: a release may say its session's will is held until `will_until` (wall clock).
The owner then remembers the ended session and its holder until then, and a fresh
claim of the device made before it (its hello time says) also tells that holder
`Replaced` for the ended session, which drops the will there. Not replicated: an
owner that fails over forgets them, and such a will goes out (late, never lost).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from app.broker.claim_ages import ClaimAges
from app.broker.messages import CLAIMED


@dataclass(frozen=True, slots=True)
class HeldWill:
    """An ended session whose will its holder holds until `until` (wall clock, seconds)."""

    session: str
    holder: str
    until: float


@dataclass(slots=True)
class Entry:
    """A device's live session, as its current claim says."""

    session: str
    started: float  # the hello's wall-clock time, seconds
    holder: str  # the holder's queue: forwards go there by name
    epoch: int  # the holder's connection count when it claimed: a later one names its queue of now
    tag: int  # the claim's delivery tag, unacked while the entry stands
    partition: int
    since: float  # when that claim was delivered (monotonic), for `due_refresh`
    # The session was claimed before the last owner died (its claim, or an earlier one of the same
    # session, came back redelivered): a command redelivered with it may go to it (`command`).
    restored: bool = False
    copied: bool = False  # held by this owner's copy of its claim (`refreshed`), not by the claim's own delivery
    # The delivery (`tag`) whose copy is on its way: that copy's confirm acks it (or, refused, `copy_again`),
    # not the session's end, which may come first; and only a copy of the delivery that holds it takes over.
    copying: int = 0


# Seconds a device whose holder's queue vanished waits for a claim (its holder's, reconnected, or a new
# session's) before its commands are answered `offline`: a link's reconnect after a node's loss, RabbitMQ
# electing the partitions' new leaders meanwhile, took up to 4 s at 20,000 devices (BENCHMARKS.md).
HOLDER_GRACE = 5.0
GONE_MEMORY = 60.0  # seconds after its grace a gone holder is remembered: its claims redelivered later are stale


@dataclass(slots=True)
class Orphan:
    """A device whose holder's queue is gone: the session it had, until when it waits, what waits for it."""

    session: str
    until: float  # monotonic
    parked: list


# Actions, as tuples headed by their kind (the owner's hot path builds thousands a second).
ACK = "ack"  # (ACK, tag): the message is done with
ROUTED = "routed"  # (ROUTED, holder, device, session): the claim stands; the session may be welcomed
REPLACED = "replaced"  # (REPLACED, holder, device, session): that session lost its device; end it
FORWARD = "forward"  # (FORWARD, tag, holder): send the command to the holder; ack it once confirmed
OFFLINE = "offline"  # (OFFLINE, tag): answer the command `offline`; ack it once that is sent
REFRESH = "refresh"  # (REFRESH, tag, partition, device, entry): publish the claim again, ack `tag` once confirmed
FLAPPING = "flapping"  # (FLAPPING, device): a start too many within the window: ban the device
PARK = "park"  # (PARK, tag): the device's holder is gone and may be back: `park` the command, unacked
UNPARKED = "unparked"  # (UNPARKED, item, holder or None): a parked command: to `holder`, or answer it offline

Action = tuple


class Starts:
    """Each device's session starts within the last `window` seconds (a sliding window), to find one
    that starts more than `limit` sessions in it. A device's count starts again once it is refused."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._times: dict[str, list[float]] = {}
        self._order: deque[tuple[float, str]] = deque()  # (start, device) in time order, to forget old ones

    def __len__(self) -> int:
        return len(self._times)

    def one_too_many(self, device: str, now: float) -> bool:
        """Count a start of `device` now; True (and nothing counted) when it would be one too many."""
        self.forget_before(now - self.window)
        times = self._times.get(device)
        if times is None:
            times = self._times[device] = []
        else:
            cut = now - self.window
            while times and times[0] < cut:
                del times[0]
        if len(times) >= self.limit:
            del self._times[device]  # refused: counting starts again (the ban ends it anyway)
            return True
        times.append(now)
        self._order.append((now, device))
        return False

    def forget_before(self, cut: float) -> None:
        """Drop the devices with no start since `cut` (the memory follows the devices that flap)."""
        order, times = self._order, self._times
        while order and order[0][0] < cut:
            _, device = order.popleft()
            mine = times.get(device)
            if mine is not None and (not mine or mine[-1] < cut):
                del times[device]


class Directory:
    """The devices of the partitions this worker owns: device -> Entry, and holder -> devices."""

    def __init__(self, starts: Starts | None = None) -> None:
        self.starts = starts  # None: flapping detection is off (FLAP_MAX=0)
        self.entries: dict[str, Entry] = {}
        self._by_holder: dict[str, set[str]] = {}
        self._ages = ClaimAges()  # when each entry's claim is due to be published again (claim_ages.py)
        self.wills: dict[str, HeldWill] = {}  # device -> the ended session whose will is held, while it is
        self.orphans: dict[str, Orphan] = {}  # device -> its session whose holder is gone, for HOLDER_GRACE
        self._orphan_order: deque[tuple[float, str]] = deque()  # (until, device), to let them go in time
        self._gone: dict[str, float] = {}  # holder queues known gone -> the end of their devices' grace
        self._will_order: deque[tuple[float, str]] = deque()  # (until, device) in release order, to forget

    def __len__(self) -> int:
        return len(self.entries)

    def holder_of(self, device: str) -> str | None:
        entry = self.entries.get(device)
        return None if entry is None else entry.holder

    # -- messages in -----------------------------------------------------------------------
    def claim(self, tag: int, device: str, session: str, started: float, holder: str, *, fresh: bool,
              partition: int, now: float, epoch: int = 0, redelivered: bool = False) -> list[Action]:
        """A holder says `session` of `device` lives in its queue `holder` (as of its connection `epoch`);
        `redelivered`: the owner before us had read this claim (it died before acking it)."""
        gone_until = self._gone.get(holder)
        if gone_until is not None:  # a claim from before its holder's queue went (a redelivery): stale
            if device not in self.entries and device not in self.orphans and now < gone_until:
                self._orphan(device, session, gone_until)  # its commands wait with the holder's others
            return [(ACK, tag)]
        current = self.entries.get(device)
        if current is not None and current.session == session and epoch < current.epoch:
            return [(ACK, tag)]  # an older statement of the entry's own session (a redelivery): stale
        if current is not None and current.session != session and not fresh \
                and (current.started, current.session) > (started, session):
            return [(ACK, tag), (REPLACED, holder, device, session)]  # a re-stated older session lost
        if fresh and self.starts is not None and (current is None or current.session != session) \
                and self.starts.one_too_many(device, now):
            return [(ACK, tag), (FLAPPING, device)]  # not routed: the ban ends this session and the holder's
        actions: list[Action] = self._will_dropped(device, started) if fresh else []
        if current is not None:
            self._remove(device, current)
            actions += self._let_go(current)
            if current.session != session:
                actions.append((REPLACED, current.holder, device, current.session))
        restored = redelivered or (current is not None and current.session == session and current.restored)
        self._put(device, Entry(session, started, holder, epoch, tag, partition, now, restored))
        actions.append((ROUTED, holder, device, session))
        orphan = self.orphans.pop(device, None)
        if orphan is not None:  # commands waited for this claim: to its session (their sender's only answer)
            actions.extend((UNPARKED, item, holder) for item in orphan.parked)
        return actions

    def updated(self, tag: int, holder: str, epoch: int, updates: list[tuple[str, str, str, float, bool]], *,
                partition: int, now: float, redelivered: bool = False) -> list[Action]:
        """A holder's claims and releases of one partition, in its order (messages.py's `updates_body`), in
        one delivery: each weighed as the message of its own it stands for, and `tag` acked once for each."""
        actions: list[Action] = []
        for kind, device, session, when, fresh in updates:
            if kind == CLAIMED:
                actions += self.claim(tag, device, session, when, holder, fresh=fresh and not redelivered,
                                      partition=partition, now=now, epoch=epoch, redelivered=redelivered)
            else:
                actions += self.release(tag, device, session, will_until=when or None)
        return actions

    def copied(self, tag: int, copies: list[tuple[str, str, float, str, int]], *, partition: int, now: float,
               redelivered: bool = False) -> list[Action]:
        """Copies of claims this owner published again (`due_refresh`), `(device, session, started, holder,
        epoch)` each, in one delivery: from now on each entry is held by it (`refreshed`). Redelivered, they
        were the last record of their sessions that a dead owner held (it acked the claims they copy), so
        each is the claim it copies, not fresh. `tag` is acked once for each."""
        actions: list[Action] = []
        for device, session, started, holder, epoch in copies:
            if redelivered:
                actions += self.claim(tag, device, session, started, holder, fresh=False, partition=partition,
                                      now=now, epoch=epoch, redelivered=True)
            else:
                actions += self.refreshed(tag, device, session, now=now)
        return actions

    def release(self, tag: int, device: str, session: str, will_until: float | None = None) -> list[Action]:
        """A holder says `session` of `device` ended; a release of any other session changes nothing.
        `will_until`: the holder holds the session's will until then (wall clock), remembered till then."""
        current = self.entries.get(device)
        if current is None or current.session != session:
            orphan = self.orphans.get(device)
            if orphan is None or orphan.session != session:
                return [(ACK, tag)]
            del self.orphans[device]  # the session its holder was gone with ended: nobody to wait for
            return [(ACK, tag), *((UNPARKED, item, None) for item in orphan.parked)]
        self._remove(device, current)
        if will_until is not None:
            self.wills[device] = HeldWill(session, current.holder, will_until)
            self._will_order.append((will_until, device))
        return [*self._let_go(current), (ACK, tag)]

    def _will_dropped(self, device: str, started: float) -> list[Action]:
        """A fresh claim of `device`: the will held for its ended session goes, if the hello came before
        it was due (its holder hears `Replaced` for the ended session)."""
        held = self.wills.pop(device, None)
        if held is None or started >= held.until:
            return []
        return [(REPLACED, held.holder, device, held.session)]

    def forget_old(self, now: float, wall: float) -> None:
        """Once a tick: starts that left the flapping window (`now`, monotonic), wills whose delay is
        over (`wall`, the clock `will_until` is read on)."""
        if self.starts is not None:
            self.starts.forget_before(now - self.starts.window)
        self.forget_wills(wall)

    def forget_wills(self, wall: float) -> None:
        """Forget the held wills due before `wall`: they have gone out by now."""
        order, wills = self._will_order, self.wills
        while order and order[0][0] <= wall:
            _until, device = order.popleft()
            held = wills.get(device)
            if held is not None and held.until <= wall:
                del wills[device]

    def command(self, tag: int, device: str, redelivered: bool = False, now: float = 0.0) -> Action:
        """A command (or an operator's question) for `device`: to its holder, parked while its holder
        may be coming back (`holder_gone`), or answered offline.

        A `redelivered` one is dropped unanswered unless its device's session was claimed before the
        owner before us died: that owner may have passed it on (to a session that has ended since, or
        been replaced by one whose claim overtook the redelivery) or answered it, and a second answer
        or a second delivery to the device is worse than none (section 2.4: at most one; none means it
        expires unanswered). A restored session may get it again: its holder drops a second copy."""
        current = self.entries.get(device)
        if current is None:
            if redelivered:
                return (ACK, tag)
            orphan = self.orphans.get(device)
            return (PARK, tag) if orphan is not None and now < orphan.until else (OFFLINE, tag)
        if redelivered and not current.restored:
            return (ACK, tag)
        return (FORWARD, tag, current.holder)

    def holder_gone(self, holder: str, now: float = 0.0) -> list[Action]:
        """RabbitMQ returned something sent to `holder`: its queue is gone, and with it every session
        it held (a holder that reconnects re-claims its live ones under its new queue's name). Their
        devices are orphans until `now` + HOLDER_GRACE: their commands are parked meanwhile."""
        devices = self._by_holder.pop(holder, set())
        actions: list[Action] = []
        until = self._gone.setdefault(holder, now + HOLDER_GRACE)  # found gone again: the same grace
        for device in devices:
            entry = self.entries.pop(device)
            actions += self._let_go(entry)
            self._orphan(device, entry.session, until)
        return actions

    def _orphan(self, device: str, session: str, until: float) -> None:
        self.orphans[device] = Orphan(session, until, [])
        self._orphan_order.append((until, device))

    def park(self, device: str, item: object) -> None:
        """Keep `item` (the owner's, for a command `command` answered PARK) for the orphan's claim or end."""
        self.orphans[device].parked.append(item)

    def expire_orphans(self, now: float) -> list[Action]:
        """Orphans whose grace is over: nobody claimed them, their parked commands are answered offline."""
        for holder in [holder for holder, until in self._gone.items() if until + GONE_MEMORY <= now]:
            del self._gone[holder]
        order, orphans, actions = self._orphan_order, self.orphans, []
        while order and order[0][0] <= now:
            until, device = order.popleft()
            orphan = orphans.get(device)
            if orphan is not None and orphan.until == until:
                del orphans[device]
                actions.extend((UNPARKED, item, None) for item in orphan.parked)
        return actions

    def refreshed(self, tag: int, device: str, session: str, *, now: float) -> list[Action]:
        """A claim this owner published again (`due_refresh`) came back: it keeps the entry from now on;
        the earlier claim is acked by whoever confirmed the copy. A stale copy is just acked."""
        current = self.entries.get(device)
        if current is None or current.session != session or current.copying != current.tag:
            return [(ACK, tag)]  # ended, or held by a later claim of the session than the one copied
        current.tag, current.since, current.copied = tag, now, True
        self._ages.held(self.entries, now, device, tag, copied=True)
        return []

    # -- time -------------------------------------------------------------------------------
    def due_compaction(self, older_than: float, limit: int) -> list[Action]:
        """Entries still held by their own claim's delivery, delivered before `older_than`: publish them
        again, many to a message, so that their partition's channel holds few deliveries (claim_ages.py)."""
        return self._refresh(self._ages.due(self.entries, copied=False, older_than=older_than, limit=limit))

    def due_refresh(self, older_than: float, limit: int) -> list[Action]:
        """Entries held by a copy delivered before `older_than`: publish each again, so that no delivery
        stays unacked past RabbitMQ's consumer timeout (which would close our channel)."""
        return self._refresh(self._ages.due(self.entries, copied=True, older_than=older_than, limit=limit))

    def copy_again(self, held: list[tuple[str, int]]) -> list[Action]:
        """RabbitMQ refused the copies of these (device, tag) entries: those that stand are due again at
        once; the deliveries of those that ended meanwhile are acked here, since their end left them to us."""
        return [(ACK, tag) for tag in self._ages.again(self.entries, held)]

    def _refresh(self, ages: list[tuple[float, str, int]]) -> list[Action]:
        actions: list[Action] = []
        for _, device, tag in ages:
            entry = self.entries[device]
            entry.copying = tag
            actions.append((REFRESH, tag, entry.partition, device, entry))
        return actions

    @staticmethod
    def _let_go(entry: Entry) -> list[Action]:
        """The ack an entry's end owes its delivery: none while a copy of it is on its way (the copy's)."""
        return [] if entry.copying == entry.tag else [(ACK, entry.tag)]

    def reset(self) -> None:
        """Our connection is gone and every unacked claim with it: the next owner has them now."""
        self.entries.clear()
        self._by_holder.clear()
        self._ages.clear()
        self.wills.clear()
        self._will_order.clear()
        self.orphans.clear()  # their parked commands were unacked: redelivered to the next owner
        self._orphan_order.clear()
        self._gone.clear()

    # -- the two indexes ------------------------------------------------------------------------
    def _put(self, device: str, entry: Entry) -> None:
        self.entries[device] = entry
        self._by_holder.setdefault(entry.holder, set()).add(device)
        self._ages.held(self.entries, entry.since, device, entry.tag, copied=False)

    def _remove(self, device: str, entry: Entry) -> None:
        del self.entries[device]
        devices = self._by_holder.get(entry.holder)
        if devices is not None:
            devices.discard(device)
            if not devices:
                del self._by_holder[entry.holder]
