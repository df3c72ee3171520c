"""What a session needs of the world, as structural types (ports, in the ports-and-adapters sense).

The transports (app/transports/) provide `FrameConnection`, the broker facade
(app/broker/) provides `Backend`, the registry provides `Host`. None of them is
imported here, so sessions depend on no transport and no RabbitMQ, and the unit
tier can drive a session with fakes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from app.broker.messages import Command
    from app.config import Config

Frame = dict[str, Any]
"""One decoded frame, as PROTOCOL.md sections 2-4 write it (`{"type": "ping"}`, ...)."""

Done = Callable[[str | None], None]
"""A publish's outcome: None once RabbitMQ confirmed it, else the nack reason."""

COMMANDS_MAY_FLOW: Frame = {"type": "commands_may_flow"}
"""Handed up by `FrameConnection.receive` (this very object) when `commands_flow` has just become true
(an MQTT SUBSCRIBE to commands/#): the session writes the commands it holds. Never a device's frame."""


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
