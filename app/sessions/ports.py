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

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from app.config import Config

Frame = dict[str, Any]
"""One decoded frame, as PROTOCOL.md sections 2-4 write it (`{"type": "ping"}`, ...)."""

Done = Callable[[str | None], None]
"""A publish's outcome: None once RabbitMQ confirmed it, else the nack reason."""

COMMANDS_MAY_FLOW: Frame = {"type": "commands_may_flow"}
"""Handed up by `FrameConnection.receive` (this very object) when `commands_flow` has just become true
(an MQTT SUBSCRIBE to commands/#): the session writes the commands it holds. Never a device's frame."""


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

    def accepts_command(self, name: str) -> bool:
        """Whether a command of this name can be carried at all (an MQTT topic level cannot hold `/`)."""

    def finish(self) -> None:
        """Cut the connection once what is queued is written; never blocks."""

    def close(self) -> None:
        """Flush briefly and close (the session's own greenlet, at its end)."""


class Backend(Protocol):
    """What a session needs of RabbitMQ."""

    @property
    def accepting(self) -> bool: ...

    def publish_event(self, device: str, session: str, name: str, event_id: str, data: Any,
                      done: Done) -> None: ...

    def reply(self, command: Command, ok: bool, data: Any = None, error: str | None = None) -> None: ...


class Outbound(Backend, Protocol):
    """What the registry needs of RabbitMQ besides a session's `Backend`: routes, takeover notices,
    presence, and how far behind the publisher is (admission says `overloaded` past a backlog)."""

    @property
    def backlog(self) -> int: ...

    def bind(self, device: str) -> None:
        """Route `device`'s commands to this worker (refcounted with `unbind`)."""

    def unbind(self, device: str) -> None: ...

    def announce(self, device: str, started: float, session_id: str) -> None:
        """Tell every worker holding `device` (this one too) that this session exists, after its bind.
        Our own notice comes back through `Inbound.announced`: the proof that the bind is in effect."""

    def publish_presence(self, device: str, session: str, what: str, data: Any) -> None: ...


class Inbound(Protocol):
    """What the broker calls on the sessions side (the registry implements it).

    Every method is called in the consumer's reader greenlet and must not block: a slow
    one holds up every delivery behind it."""

    def deliver(self, command: Command) -> None:
        """A command from our queue, for one of our devices (or one that just left)."""

    def announced(self, device: str, started: float, session_id: str) -> None:
        """A takeover notice: a session of `device` (hello time `started`) exists somewhere. Ours too:
        our own notice coming back proves that the bind written before it is in effect."""

    def live_sessions(self) -> Iterable[tuple[str, float, str]]:
        """(device, hello time, session id) of every session, to announce again after a reconnect."""

    def answer(self, device: str, question: str) -> dict[str, Any] | None:
        """An operator's question (`info`, `kick`) about a device our queue binds: a dict to send back
        (`online` false when no session of it lives here now), or None to stay silent."""


class Host(Protocol):
    """What a session needs of its worker: configuration, admission, the registry, the watchdog."""

    config: Config

    def admit(self) -> tuple[str, float] | None: ...

    def retry_after(self) -> float: ...

    def watch(self, session: Any) -> None: ...

    def forget(self, session: Any) -> None: ...

    def open(self, session: Any) -> None: ...

    def welcomed(self, session: Any) -> None: ...

    def close(self, session: Any, reason: str) -> None: ...
