"""What sessions need of the world and what they offer it, as structural types (ports, in the
ports-and-adapters sense), and the one value that crosses them from RabbitMQ: `Command`.

The transports (app/transports/) provide `FrameConnection`, the broker facade
(app/broker/) provides `Backend` (what a session needs) and `Outbound` (what the
registry needs), the registry provides `Host` (to its sessions) and `Inbound` (to
the broker). Who calls whom between the broker and the sessions is written here:
the broker calls `Inbound`, the sessions and the registry call `Backend` and
`Outbound`. None of the adapters is imported here (app/broker imports this module,
never the other way round), so sessions depend on no transport and no RabbitMQ, and
the unit tier can drive them with fakes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from app.config import Config
    from app.sessions.bans import Ban

Frame = dict[str, Any]
"""One decoded frame, as PROTOCOL.md sections 2-4 write it (`{"type": "ping"}`, ...)."""

Done = Callable[[str | None], None]
"""A publish's outcome: None once RabbitMQ confirmed it, else the nack reason."""

COMMANDS_MAY_FLOW: Frame = {"type": "commands_may_flow"}
"""Handed up by `FrameConnection.receive` (this very object) when `commands_flow` has just become true
(an MQTT SUBSCRIBE to commands/#): the session writes the commands it holds. Never a device's frame."""

BYE_WITH_WILL: Frame = {"type": "bye_with_will"}
"""Handed up by `FrameConnection.receive` (this very object) for a goodbye that still wants the will
published (MQTT 5's DISCONNECT 0x04): the session ends `closed`, will and all. Never a device's frame."""

NO_PRESENCE: Mapping[str, Any] = MappingProxyType({})
"""`FrameConnection.presence` of the JSON transports: nothing to add to the presence events."""


@dataclass(frozen=True, slots=True)
class EventProperties:
    """What a transport adds to an event's AMQP message (MQTT 5's Message Expiry Interval and User
    Properties, PROTOCOL.md section 9). Rides in the event frame (or a hello's will) under `amqp`; the
    session passes it on only as this type, so a JSON device cannot set AMQP properties by sending an
    `amqp` field."""

    expiration: str | None = None  # AMQP's expiration: milliseconds, as a string
    headers: Mapping[str, Any] | None = None  # AMQP headers: strings, or lists of strings for repeated keys

    @staticmethod
    def carried_by(frame: Frame) -> EventProperties | None:
        """Those a transport put in an event frame, or in a hello's `will` (the same event, later)."""
        extra = frame.get("amqp")
        return extra if type(extra) is EventProperties else None


@dataclass(frozen=True, slots=True)
class Command:
    """A command taken from this worker's queue, on its way to a device.

    Defined here, not in app/broker, because it is what the sessions side accepts: the broker
    builds it (app/broker/messages.py parses deliveries into it) and hands it over `Inbound`."""

    device: str
    id: str
    name: str
    data: Any
    reply_to: str | None
    correlation_id: str
    deadline: float  # time.monotonic() after which it must not reach the device


class FrameConnection(Protocol):
    """A device connection as frames: the transport decodes and encodes, the session never sees bytes."""

    transport: str  # the presence name: tcp, tls, ws, wss, mqtt, ...
    peer: str
    idle_limit: float | None  # seconds of silence the transport allows (MQTT keep-alive); None: 2 x heartbeat
    backpressure: bool  # over the rate limit, wait (stop reading) instead of refusing the frame
    certificate_names: tuple[str, ...]  # the device names of a verified TLS client certificate; () without one
    will_delay: float  # seconds to wait before publishing the will (MQTT 5's Will Delay Interval); 0: at once
    timed_commands: bool  # command frames must carry `expires_in` (seconds left): MQTT 5's Message Expiry

    @property
    def presence(self) -> Mapping[str, Any]:
        """Fields the transport adds to the `session.connected` presence event (MQTT: its version);
        JSON transports: NO_PRESENCE."""

    @property
    def commands_flow(self) -> bool:
        """Whether a command frame may be sent now; JSON transports: always (a class attribute).

        The session holds commands until its welcome and while this is false (MQTT: until the device
        subscribes to commands/#, and again after it unsubscribes); when it becomes true, `receive`
        hands up COMMANDS_MAY_FLOW."""

    def receive(self) -> Frame | None:
        """The next frame, None once the peer is gone; raises ProtocolError for a bad one."""

    def send(self, frame: Frame) -> None:
        """Queue one frame (a command only while `commands_flow`); never blocks."""

    def command_refusal(self, command_id: str, name: str, data: Any) -> str | None:
        """None when this command can be carried, else the error its sender gets: `bad_command` (an MQTT
        topic level cannot hold `/`), `too_large` (over an MQTT 5 device's Maximum Packet Size)."""

    def finish(self) -> None:
        """Cut the connection once what is queued is written; never blocks."""

    def close(self) -> None:
        """Flush briefly and close (the session's own greenlet, at its end)."""


class Backend(Protocol):
    """What a session needs of RabbitMQ."""

    @property
    def accepting(self) -> bool: ...

    def publish_event(self, device: str, session: str, name: str, event_id: str, data: Any,
                      done: Done, properties: EventProperties | None = None) -> None: ...

    def reply(self, command: Command, ok: bool, data: Any = None, error: str | None = None) -> None: ...


class Outbound(Backend, Protocol):
    """What the registry needs of RabbitMQ besides a session's `Backend`: routes, presence, and how far
    behind the publisher is (admission says `overloaded` past a backlog)."""

    @property
    def backlog(self) -> int: ...

    @property
    def routing(self) -> bool:
        """Whether a claim can be made now (else the session is claimed once RabbitMQ is back)."""

    def claim(self, device: str, started: float, session_id: str) -> None:
        """Route `device`'s commands to this session, anywhere in the deployment. The answer comes
        back through `Inbound.routed` (the proof that commands now reach it) or `Inbound.replaced`."""

    def release(self, device: str, session_id: str, will_until: float | None = None) -> None:
        """This session ended: its device's commands are answered `offline` from now on, unless a
        newer session claimed it. `will_until` (wall clock): the session's will is held until then, and
        a new session of the device claimed before it must reach us as `Inbound.replaced` of this one."""

    def publish_presence(self, device: str, session: str, what: str, data: Any) -> None: ...

    def banned(self, device: str) -> Ban | None:
        """The ban in force on `device` across the deployment (PROTOCOL.md section 6), if any."""


class Inbound(Protocol):
    """What the broker calls on the sessions side (the registry implements it).

    Every method is called in the consumer's reader greenlet and must not block: a slow
    one holds up every delivery behind it."""

    def deliver(self, command: Command, again: bool = False) -> None:
        """A command for one of our devices (or one that just left), passed on by its partition's owner.
        `again`: the owner took it from a redelivery (it failed over), so this may be a second copy:
        the registry drops a command id it has taken."""

    def routed(self, device: str, session_id: str) -> None:
        """That session's claim stands: commands for `device` now reach it and no older session."""

    def replaced(self, device: str, session_id: str) -> None:
        """A newer session of `device` claimed it somewhere: that session of ours ends `replaced` (one
        that has ended already loses the will it still held back, if any)."""

    def live_sessions(self) -> Iterable[tuple[str, float, str]]:
        """(device, hello time, session id) of every session, to claim again after a reconnect."""

    def answer(self, device: str, question: str) -> dict[str, Any] | None:
        """An operator's question (`info`, `kick`) about a device routed here: a dict to send back
        (`online` false when no session of it lives here now), or None to stay silent."""

    def ban_changed(self, ban: Ban) -> None:
        """The ban stream's latest word on a device (a ban or a lift): a device banned now loses its
        session here, if it has one."""


class Host(Protocol):
    """What a session needs of its worker: configuration, admission, the registry, the watchdog."""

    config: Config

    def admit(self) -> tuple[str, float] | None: ...

    def retry_after(self) -> float: ...

    def watch(self, session: Any) -> None: ...

    def forget(self, session: Any) -> None: ...

    @property
    def routing(self) -> bool: ...

    def banned(self, device: str) -> Ban | None: ...

    def open(self, session: Any) -> None: ...

    def welcomed(self, session: Any) -> None: ...

    def close(self, session: Any, reason: str) -> None: ...
