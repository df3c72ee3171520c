"""Fakes of the transport and the broker for the unit tier, and small helpers shared by its tests."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.queue import Queue

from app import auth
from app.config import Config
from app.protocol import ProtocolError
from app.sessions.bans import Ban, BanList
from app.sessions.registry import Registry

SECRET = b"unit-secret"
CONFIG = Config(device_secrets=(SECRET,), heartbeat=30.0, hello_timeout=10.0, route_wait=2.0,
                event_rate=1000.0, event_burst=1000)


@dataclass
class Command:
    device: str
    id: str
    name: str = "unlock"
    data: Any = None
    reply_to: str | None = "backend"
    correlation_id: str = ""
    deadline: float = float("inf")


class FakeConn:
    """Frames in through `push`, frames out in `sent`; `finish` ends the stream like a cut socket."""

    transport, peer = "tcp", "127.0.0.1:1"
    certificate_names: tuple[str, ...] = ()
    idle_limit: float | None = None
    backpressure = False
    commands_flow = True  # as the JSON transports: commands flow from the welcome on
    will_delay = 0.0
    timed_commands = False
    presence: dict[str, Any] = {}  # noqa: RUF012 -- read only, as the JSON transports' NO_PRESENCE

    def __init__(self) -> None:
        self.inbox: Queue = Queue()
        self.sent: list[dict[str, Any]] = []
        self.finished = self.closed = False

    def push(self, frame: dict[str, Any] | ProtocolError | None) -> None:
        self.inbox.put(frame)

    def receive(self) -> dict[str, Any] | None:
        item = self.inbox.get()
        if isinstance(item, ProtocolError):
            raise item
        return item

    def send(self, frame: dict[str, Any]) -> None:
        self.sent.append(frame)

    def command_refusal(self, command_id: str, name: str, data: Any) -> str | None:
        return "bad_command" if "/" in name else None

    def finish(self) -> None:
        self.finished = True
        self.inbox.put(None)

    def close(self) -> None:
        self.closed = True

    def types(self) -> list[str]:
        return [frame["type"] for frame in self.sent]


class FakeBroker:
    """Records what the registry and sessions ask of RabbitMQ (its `Outbound`), and plays the partition
    owner's answers back to the attached `Inbound`: `route` and `replace` by hand, and, while `answers`
    is true, `routed` for every claim a moment after it is made (as the owner does once it took it)."""

    def __init__(self) -> None:
        self.inbound: Any = None
        self.accepting = True
        self.routing = True  # the consumer's link is up: a hello waits for its route
        self.backlog = 0
        self.answers = True
        self.claims: list[tuple[str, float, str]] = []
        self.releases: list[tuple[str, str]] = []
        self.event_properties: dict[str, Any] = {}  # event id -> the EventProperties it was published with
        self.wills_until: dict[str, float | None] = {}  # device -> the will_until of its last release
        self.claimed: dict[str, str] = {}  # device -> the session whose claim stands, as the owner would see it
        self.presence: list[tuple[str, str, dict]] = []
        self.events: list[tuple[str, str, Any]] = []
        self.replies: list[tuple[str, bool, Any, Any]] = []
        self.bans = BanList()
        self.links = ()

    def banned(self, device: str) -> Any:
        return self.bans.banned(device)

    def ban(self, ban: Ban) -> None:
        """A record of the ban stream reaches this worker (as the consumer's reader hands it over)."""
        if self.bans.apply(ban):
            self.inbound.ban_changed(ban)

    def attach(self, inbound: Any) -> None:
        self.inbound = inbound

    def claim(self, device: str, started: float, session_id: str) -> None:
        self.claims.append((device, started, session_id))
        self.claimed[device] = session_id
        if self.answers:  # the owner's answer comes back through our own queue, a moment later
            gevent.spawn(self.inbound.routed, device, session_id)

    def release(self, device: str, session_id: str, will_until: float | None = None) -> None:
        self.releases.append((device, session_id))
        self.wills_until[device] = will_until
        if self.claimed.get(device) == session_id:  # a release of a session already replaced changes nothing
            del self.claimed[device]

    def route(self, device: str, session_id: str) -> None:
        """The owner's `routed`: that session's claim stands."""
        self.inbound.routed(device, session_id)

    def replace(self, device: str, session_id: str) -> None:
        """The owner's `replaced`: a newer session of `device` claimed it somewhere else."""
        self.inbound.replaced(device, session_id)

    def publish_presence(self, device: str, session: str, what: str, data: dict) -> None:
        self.presence.append((device, what, data))

    def publish_event(self, device: str, session: str, name: str, event_id: str, data: Any, done: Any,
                      properties: Any = None) -> None:
        self.events.append((name, event_id, done))
        self.event_properties[event_id] = properties

    def reply(self, command: Command, ok: bool, data: Any = None, error: str | None = None) -> None:
        self.replies.append((command.id, ok, data, error))


def make_registry(config: Config = CONFIG) -> Registry:
    """A registry on a FakeBroker, built as the worker's tree builds the real pair (app/tree.py)."""
    broker = FakeBroker()
    registry = Registry(config, broker)
    broker.attach(registry)
    return registry


def hello(device: str = "lock-1") -> dict[str, Any]:
    return {"type": "hello", "device": device, "token": auth.mint(SECRET, device), "v": 1}


def wait_for(condition: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        gevent.sleep(0.001)
