"""One simulated device: connect, hello, answer commands and acks, and reconnect like firmware would.

Each device is one greenlet (`live`). Heartbeats and events are sent by the
worker's schedulers instead, so a device costs a socket and a greenlet, not three.
"""

from __future__ import annotations

import errno
import random
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import gevent
import orjson
from gevent.lock import BoundedSemaphore, Semaphore

from app.auth import mint
from app.protocol import CLOSING_ERRORS
from bench.stampede.links import Link, LinkClosed, Target

MAX_BACKOFF = 5.0


@dataclass
class Stats:
    """Counters a worker reports every second: cumulative totals plus samples since the last report."""

    up: int = 0
    connecting: int = 0
    backing_off: int = 0
    established: int = 0
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

    def report(self) -> dict[str, Any]:
        """The totals, and the samples gathered since the previous report (which are then forgotten)."""
        report = dict(vars(self))
        self.acked_ids, self.ack_ms, self.welcome_ms = [], [], []
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
    next_source: int = 0

    def source(self) -> str:
        """Rotate over the source addresses so no single one runs out of ports."""
        self.next_source = (self.next_source + 1) % len(self.sources)
        return self.sources[self.next_source]


class Device:
    __slots__ = ("heartbeat", "link", "lock", "name", "next_ping", "pending", "target", "token")

    def __init__(self, name: str, secret: bytes, target: Target) -> None:
        self.name = name
        self.token = mint(secret, name)
        self.target = target
        self.link: Link | None = None
        self.lock = Semaphore()
        self.pending: dict[str, float] = {}
        self.heartbeat = 30.0
        self.next_ping = 0.0

    def send(self, frame: dict[str, Any]) -> bool:
        """Write one frame if the device is connected; False if it is not (or the write failed)."""
        link = self.link
        if link is None:
            return False
        try:
            with self.lock:
                link.send(orjson.dumps(frame))
        except OSError:
            return False
        return True


def live(device: Device, world: World) -> None:
    """Keep `device` connected until this greenlet is killed, counting every failure and lost session."""
    attempt = 0
    while True:
        try:
            link = connect_when_allowed(device, world)
        except Failure as failure:
            world.stats.failures[failure.reason] += 1
            pause(world, backoff(attempt, failure.retry_after))
            attempt += 1
            continue
        attempt = 0
        reason, retry_after = serve(device, link, world)
        world.stats.lost[reason] += 1
        pause(world, backoff(0, retry_after))


def connect_when_allowed(device: Device, world: World) -> Link:
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


def connect(device: Device, world: World) -> Link:
    """Open a link, say hello and wait for the welcome (or, against the floor, the echoed hello)."""
    started = time.monotonic()
    try:
        link = device.target.open(world.source(), world.connect_timeout)
    except OSError as exc:
        raise Failure(os_reason(exc)) from None
    try:
        with gevent.Timeout(world.welcome_timeout, Failure("welcome_timeout")):
            link.handshake()
            link.send(orjson.dumps({"type": "hello", "device": device.name,
                                    "token": device.token, "v": 1}))
            frame = first_frame(link)
    except (Failure, LinkClosed, OSError) as exc:
        link.sock.close()
        raise as_failure(exc) from None
    check_welcome(frame, world.floor, link)
    device.link = link
    device.heartbeat = world.heartbeat or float(frame.get("heartbeat") or 30)
    # A random phase: pings are spread evenly from the start, so a quiet window sees their steady rate.
    device.next_ping = time.monotonic() + device.heartbeat * random.random()
    world.stats.up += 1
    world.stats.established += 1
    world.stats.last_welcome = time.time()
    world.stats.welcome_ms.append(round((time.monotonic() - started) * 1000, 2))
    return link


def first_frame(link: Link) -> dict[str, Any]:
    while True:
        for payload in link.receive():
            return orjson.loads(payload)


def check_welcome(frame: dict[str, Any], floor: bool, link: Link) -> None:
    """Raise a Failure (and close) unless `frame` opens a session."""
    kind = frame.get("type")
    if kind == "welcome" or (floor and kind == "hello"):
        return
    link.sock.close()
    if kind == "error":
        raise Failure(f"error:{frame.get('code')}", frame.get("retry_after"))
    raise Failure(f"unexpected:{kind}")


def as_failure(exc: BaseException) -> Failure:
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, LinkClosed):
        return Failure("closed_before_welcome")
    return Failure(os_reason(exc))


def os_reason(exc: BaseException) -> str:
    """A short, countable name for a socket error."""
    if isinstance(exc, socket.timeout):
        return "connect_timeout"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno)).lower()
    return type(exc).__name__


def serve(device: Device, link: Link, world: World) -> tuple[str, float | None]:
    """Handle server frames until the session ends; return why, and the server's retry_after."""
    try:
        while True:
            for payload in link.receive():
                ended = handle(device, orjson.loads(payload), world)
                if ended:
                    return ended
    except LinkClosed:
        return "eof", None
    except OSError as exc:
        return os_reason(exc), None
    finally:
        device.link = None
        link.sock.close()
        world.stats.up -= 1
        world.stats.unanswered_events += len(device.pending)
        device.pending.clear()


def handle(device: Device, frame: dict[str, Any], world: World) -> tuple[str, float | None] | None:
    """React to one server frame; return (reason, retry_after) when it ends the session."""
    kind = frame.get("type")
    stats = world.stats
    if kind == "command":
        device.send({"type": "reply", "id": frame.get("id"), "ok": True, "data": {}})
        stats.commands += 1
    elif kind == "pong" or (kind == "ping" and world.floor):
        # Heartbeats answered are counted, not derived from the interval: the per-heartbeat
        # CPU figure divides by what the server actually did (the floor echoes the ping itself).
        stats.pongs += 1
    elif kind == "ack":
        sent = device.pending.pop(frame.get("id"), None)
        if sent is not None:
            stats.acked += 1
            stats.acked_ids.append(frame["id"])
            stats.ack_ms.append(round((time.monotonic() - sent) * 1000, 2))
    elif kind == "nack":
        device.pending.pop(frame.get("id"), None)
        stats.nacked[str(frame.get("reason"))] += 1
    elif kind == "error":
        code = str(frame.get("code"))
        stats.errors[code] += 1
        if code in CLOSING_ERRORS:
            return code, frame.get("retry_after")
    return None
