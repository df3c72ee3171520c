"""One simulated device's life: connect, open a session, serve it, and reconnect like firmware would.

Each device is one greenlet (`live`). Heartbeats and events are sent by the
worker's schedulers instead, so a device costs a socket and a greenlet, not three.
What a device says is its dialect's: `json_device.JsonDevice` (PROTOCOL.md
sections 2-4) or `mqtt_device.MqttDevice` (section 8), subclasses of `Device`.
"""

from __future__ import annotations

import errno
import itertools
import random
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import gevent
from gevent.lock import BoundedSemaphore, Semaphore

from app.auth import mint
from bench.stampede.links import HandshakeFailed, Link, LinkClosed, Target

MAX_BACKOFF = 5.0


@dataclass
class Stats:
    """Counters a worker reports every second: cumulative totals plus samples since the last report."""

    up: int = 0
    connecting: int = 0
    backing_off: int = 0
    established: int = 0
    # TLS handshakes completed in full or resumed (the server accepted the device's ticket), and failed.
    tls_full: int = 0
    tls_resumed: int = 0
    tls_failed: int = 0
    failures: Counter = field(default_factory=Counter)
    lost: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    commands: int = 0
    pongs: int = 0
    events_sent: int = 0
    acked: int = 0
    nacked: Counter = field(default_factory=Counter)
    unanswered_events: int = 0
    last_welcome: float = 0.0
    acked_ids: list[str] = field(default_factory=list)
    ack_ms: list[float] = field(default_factory=list)
    welcome_ms: list[float] = field(default_factory=list)
    # Commands stamped with their send time (mqtt_device): sent -> received by the device, ms.
    command_ms: list[float] = field(default_factory=list)
    # [device, wall-clock time] of each session ended with `banned` (bench/bans.py: a ban's reach).
    banned_at: list[list[Any]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """The totals, and the samples gathered since the previous report (which are then forgotten)."""
        report = dict(vars(self))
        self.acked_ids, self.ack_ms, self.welcome_ms, self.command_ms, self.banned_at = [], [], [], [], []
        return report


class Failure(Exception):
    """A connection attempt that did not end in a session; `reason` is what gets counted."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass
class World:
    """What every device of one worker shares."""

    targets: list[Target]
    sources: list[str]
    floor: bool
    gate: BoundedSemaphore
    connect_timeout: float
    welcome_timeout: float
    heartbeat: float | None
    stats: Stats = field(default_factory=Stats)
    # After a session lost (not dropped by us), a device waits its backoff plus up to this long (the
    # controller's `reconnect_spread`): firmware spreading its comeback.
    reconnect_spread: float = 0.0
    # [device, "lost" | "back", wall-clock time] of each session lost and of the welcome that follows it,
    # sent to the controller within a tick (worker.py): the worker-kill scenario times each comeback.
    changes: list[list[Any]] = field(default_factory=list)
    next_source: int = 0
    # MQTT packet identifiers, shared by the worker's devices: unique among one connection's packets in
    # flight as long as no device keeps one unanswered for 65,535 others, and no counter per device.
    packet_ids: Iterator[int] = field(default_factory=lambda: itertools.cycle(range(1, 65536)))

    def source(self) -> str:
        """Rotate over the source addresses so no single one runs out of ports."""
        self.next_source = (self.next_source + 1) % len(self.sources)
        return self.sources[self.next_source]

    def packet_id(self) -> int:
        return next(self.packet_ids)


class Device:
    """What every simulated device holds; a subclass speaks its dialect in `greet`, `handle`, `ping` and `send_event`.

    `pending` holds the events sent and not yet answered, keyed as the dialect's
    answers name them (event id for JSON, packet identifier for MQTT). `tls_session`
    is the last TLS session the server gave (over TLS only), offered on the next
    connect as firmware keeps its ticket across reconnects.
    """

    __slots__ = ("heartbeat", "link", "lock", "name", "next_ping", "pending", "target", "tls_session", "token")

    def __init__(self, name: str, secret: bytes, target: Target) -> None:
        self.name = name
        self.token = mint(secret, name)
        self.target = target
        self.link: Link | None = None
        self.lock = Semaphore()
        self.pending: dict[Any, Any] = {}
        self.heartbeat = 30.0
        self.next_ping = 0.0
        self.tls_session: Any = None

    def send(self, data: bytes) -> bool:
        """Write one message if the device is connected; False if it is not (or the write failed)."""
        link = self.link
        if link is None:
            return False
        try:
            with self.lock:
                link.send(data)
        except OSError:
            return False
        return True

    def greet(self, inbox: Inbox, world: World) -> float:
        """Open the session on a fresh link (hello, or CONNECT); return its heartbeat, or raise a Failure."""
        raise NotImplementedError

    def handle(self, message: Any, world: World) -> tuple[str, float | None] | None:
        """React to one message from the server; return (reason, retry_after) when it ends the session."""
        raise NotImplementedError

    def ping(self) -> bool:
        """Send one heartbeat; False if the device is not connected."""
        raise NotImplementedError

    def send_event(self, event_id: str, seq: int, world: World) -> bool:
        """Send one event (remembered in `pending` until answered); False if the device is not connected."""
        raise NotImplementedError


class Inbox:
    """The messages of a link, one at a time, while a session opens; what arrived after the greeting is kept."""

    __slots__ = ("link", "ready")

    def __init__(self, link: Link) -> None:
        self.link = link
        self.ready: list[Any] = []

    def send(self, data: bytes) -> None:
        self.link.send(data)

    def next(self) -> Any:
        while not self.ready:
            self.ready = self.link.receive()
        return self.ready.pop(0)


def live(device: Device, world: World) -> None:
    """Keep `device` connected until this greenlet is killed, counting every failure and lost session."""
    attempt = 0
    coming_back = False
    while True:
        try:
            link, early = connect_when_allowed(device, world)
        except Failure as failure:
            world.stats.failures[failure.reason] += 1
            pause(world, backoff(attempt, failure.retry_after))
            attempt += 1
            continue
        attempt = 0
        if coming_back:
            world.changes.append([device.name, "back", time.time()])
        reason, retry_after = serve(device, link, early, world)
        world.stats.lost[reason] += 1
        world.changes.append([device.name, "lost", time.time()])
        coming_back = True
        pause(world, backoff(0, retry_after) + random.uniform(0, world.reconnect_spread))


def flap(device: Device, world: World, interval: float) -> None:
    """Start a session every `interval` seconds and drop it at the next, like firmware in a reconnect loop.

    Unlike `live`, it ignores the server's retry_after: a refused hello (`banned`) is tried
    again at the next tick, so a flapping ban is measured at what a broken device costs,
    a refused hello a second, not at the quiet of a polite one.
    """
    while True:
        tick = time.monotonic()
        try:
            link, early = connect_when_allowed(device, world)
        except Failure as failure:
            world.stats.failures[failure.reason] += 1
        else:
            session = gevent.spawn(serve, device, link, early, world)
            gevent.sleep(max(0.0, tick + interval - time.monotonic()))
            if session.ready():
                world.stats.lost[session.value[0]] += 1
            session.kill()  # serve's cleanup closes the link: the device's own doing, not counted as lost
        gevent.sleep(max(0.0, tick + interval - time.monotonic()))


def connect_when_allowed(device: Device, world: World) -> tuple[Link, list[Any]]:
    """Connect once a slot among the in-flight connects is free; counted while waiting or connecting."""
    world.stats.connecting += 1
    try:
        with world.gate:
            return connect(device, world)
    finally:
        world.stats.connecting -= 1


def pause(world: World, seconds: float) -> None:
    """Sleep between attempts, counted so that the progress line shows where devices are."""
    world.stats.backing_off += 1
    try:
        gevent.sleep(seconds)
    finally:
        world.stats.backing_off -= 1


def backoff(attempt: int, retry_after: float | None) -> float:
    """Jittered exponential backoff, or the server's retry_after when it gave one."""
    base = retry_after if retry_after is not None else min(0.25 * 2 ** attempt, MAX_BACKOFF)
    return base * random.uniform(0.5, 1.5)


def connect(device: Device, world: World) -> tuple[Link, list[Any]]:
    """Open a link and a session on it; return the link and what the server sent right after the greeting."""
    started = time.monotonic()
    try:
        link = device.target.open(world.source(), world.connect_timeout, device.tls_session)
    except HandshakeFailed as exc:
        world.stats.tls_failed += 1
        raise Failure(exc.reason) from None
    except OSError as exc:
        raise Failure(os_reason(exc)) from None
    count_handshake(link, world.stats)
    inbox = Inbox(link)
    try:
        with gevent.Timeout(world.welcome_timeout, Failure("welcome_timeout")):
            link.handshake()
            heartbeat = device.greet(inbox, world)
    except (Failure, LinkClosed, OSError, ValueError) as exc:  # ValueError: a payload that is not JSON
        link.sock.close()
        raise as_failure(exc) from None
    device.link = link
    remember_session(device, link)
    device.heartbeat = heartbeat
    # A random phase: pings are spread evenly from the start, so a quiet window sees their steady rate.
    device.next_ping = time.monotonic() + device.heartbeat * random.random()
    world.stats.up += 1
    world.stats.established += 1
    world.stats.last_welcome = time.time()
    world.stats.welcome_ms.append(round((time.monotonic() - started) * 1000, 2))
    return link, inbox.ready


def count_handshake(link: Link, stats: Stats) -> None:
    """Count a TLS link's handshake as resumed or full (nothing for plain links)."""
    session_reused = getattr(link.sock, "session_reused", None)
    if session_reused is not None:
        if session_reused:
            stats.tls_resumed += 1
        else:
            stats.tls_full += 1


def remember_session(device: Device, link: Link) -> None:
    """Keep the link's TLS session for the next connect.

    Read after the welcome, not after the handshake: a TLS 1.3 server sends its
    ticket after the handshake, and the client only holds it once it has read past it.
    """
    session = getattr(link.sock, "session", None)
    if session is not None:
        device.tls_session = session


def as_failure(exc: BaseException) -> Failure:
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, LinkClosed):
        return Failure("closed_before_welcome")
    if isinstance(exc, ValueError):
        return Failure("unreadable_greeting")
    return Failure(os_reason(exc))


def os_reason(exc: BaseException) -> str:
    """A short, countable name for a socket error."""
    if isinstance(exc, socket.timeout):
        return "connect_timeout"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno)).lower()
    return type(exc).__name__


def serve(device: Device, link: Link, early: list[Any], world: World) -> tuple[str, float | None]:
    """Handle server messages (those that came with the greeting first) until the session ends; return why,
    and the server's retry_after."""
    try:
        messages = early
        while True:
            for message in messages:
                ended = device.handle(message, world)
                if ended:
                    if ended[0] == "banned":
                        world.stats.banned_at.append([device.name, time.time()])
                    return ended
            messages = link.receive()
    except LinkClosed:
        return "eof", None
    except OSError as exc:
        return os_reason(exc), None
    except ValueError:  # a message the dialect cannot read (not JSON, a packet a server may not send)
        return "unreadable", None
    finally:
        device.link = None
        link.sock.close()
        world.stats.up -= 1
        world.stats.unanswered_events += len(device.pending)
        device.pending.clear()
