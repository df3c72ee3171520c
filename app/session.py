"""One device's session, from hello to close (PROTOCOL.md sections 2-4).

A session runs in its connection's greenlet and sees only a `FrameConnection`
(frames in, frames out) and the `Gateway` of its worker (admission, the
registry of live sessions, RabbitMQ). It knows nothing of sockets, TCP or
WebSocket. Whatever a device sends, the worst outcome is the end of this one
session: a `ProtocolError` becomes an error frame; anything else is a bug that
the connection supervisor logs and reports.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from gevent import Timeout
from gevent.event import Event

from app import auth, metrics, protocol
from app.protocol import ProtocolError

if TYPE_CHECKING:
    from app.broker import Command
    from app.gateway import Gateway
    from app.transports import FrameConnection

log = logging.getLogger("warren.session")

MAX_PENDING_COMMANDS = 64
# How long a hello waits for RabbitMQ to route the device's commands here before the welcome.
ROUTE_WAIT = 5.0


def _seconds(value: float) -> float | int:
    """30.0 as 30, but HEARTBEAT=0.5 as 0.5 (int() made it 0: a device told to ping constantly)."""
    return int(value) if float(value).is_integer() else value


class TokenBucket:
    """At most `rate` frames a second on average, `burst` at once."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait_time(self) -> float:
        return max(0.0, (1 - self.tokens) / self.rate)


class Session:
    """The protocol state of one device connection."""

    __slots__ = (
        "__weakref__",
        "bucket",
        "closing",
        "conn",
        "device",
        "draining",
        "gateway",
        "held",
        "id",
        "in_flight",
        "pending",
        "routed",
        "started",
    )

    def __init__(self, conn: FrameConnection, gateway: Gateway) -> None:
        self.conn = conn
        self.gateway = gateway
        self.device = ""
        self.id = ""
        self.started = 0.0
        self.closing: str | None = None  # the error code this session is ending with
        self.draining = False
        self.in_flight = 0
        self.pending: dict[str, tuple[Command, float]] = {}  # in delivery order
        self.bucket: TokenBucket | None = None
        self.routed: Event | None = None  # set once our command binding is in effect (hello only)
        self.held: list[dict[str, Any]] | None = None  # commands that arrived before the welcome

    # -- life -----------------------------------------------------------------
    def run(self) -> None:
        """Serve the connection until it ends; always leaves the registry clean."""
        reason = "closed"
        try:
            if self._hello():
                self._serve()
            reason = self.closing or "closed"
        except ProtocolError as exc:
            reason = exc.code
            self.send_error(exc.code, exc.message, exc.frame_id)
        except TimeoutError:
            reason = "idle_timeout" if self.id else "hello_timeout"
            self.send_error(reason, "no frame in time")
        except Exception as exc:
            # A bug, not the device's fault: the connection supervisor reports it (Sentry tags).
            exc.warren_device, exc.warren_session = self.device or None, self.id or None
            raise
        finally:
            if self.id:
                self.gateway.close(self, reason)
            self.conn.close()

    def _hello(self) -> bool:
        """Authenticate the first frame; True once the device is welcomed."""
        config = self.gateway.config
        self.conn.set_timeout(config.hello_timeout)
        try:
            # The whole hello within HELLO_TIMEOUT, not each read: a slow-loris that dribbles a
            # byte a second would otherwise hold its connection forever.
            with Timeout(config.hello_timeout, TimeoutError("no hello in time")):
                payload = self.conn.receive()
        except ProtocolError as exc:
            if exc.code in protocol.CLOSING_ERRORS:
                raise
            return self._refuse("unauthorized", exc.message)  # e.g. a binary WebSocket message
        if payload is None:
            return False
        try:
            device, token = protocol.validate_hello(protocol.decode(payload))
        except ProtocolError as exc:
            code = "unsupported_version" if exc.code == "unsupported_version" else "unauthorized"
            return self._refuse(code, exc.message)
        if not auth.verify(config.device_secrets, device, token):
            return self._refuse("unauthorized", "the token does not match this device")
        refusal = self.gateway.admit()
        if refusal is not None:
            code, retry_after = refusal
            return self._refuse(code, "the gateway cannot take a new session now", retry_after)
        return self._welcome(device)

    def _welcome(self, device: str) -> bool:
        """Register the session, wait until its commands route here, then welcome it."""
        config = self.gateway.config
        self.device, self.id, self.started = device, uuid.uuid4().hex[:16], time.time()
        self.bucket = TokenBucket(config.event_rate, config.event_burst)
        self.routed = Event()
        self.gateway.open(self)
        # Welcome only once RabbitMQ routes this device's commands here: a backend that sends a
        # command as soon as the device is welcomed (or on `session.connected`) must not get
        # `offline`. Our own takeover notice, published after the bind, coming back proves it.
        if self.gateway.broker.ready:
            self.routed.wait(ROUTE_WAIT)
        self.routed = None
        self.gateway.welcomed(self)
        if self.closing is not None:  # replaced while waiting: _serve ends at once
            self._answer_held_offline()
            return True
        self._send({"type": "welcome", "device": device, "session": self.id,
                    "heartbeat": _seconds(config.heartbeat)})
        held, self.held = self.held or [], None
        for frame in held:
            self._send(frame)
        self.conn.set_timeout(2 * config.heartbeat)
        return True

    def _answer_held_offline(self) -> None:
        """Commands held for a welcome that never came were never written: their senders hear `offline`."""
        for frame in self.held or []:
            entry = self.pending.pop(frame["id"], None)
            if entry is not None:
                metrics.COMMANDS.labels(outcome="offline").inc()
                self.gateway.broker.reply(entry[0], ok=False, error="offline")
        self.held = None

    def _refuse(self, code: str, message: str, retry_after: float | None = None) -> bool:
        metrics.HELLO_FAILURES.labels(code=code).inc()
        self.send_error(code, message, retry_after=retry_after)
        return False

    def _serve(self) -> None:
        while self.closing is None:
            try:
                # Inside the try: a transport's own `bad_frame` (a binary WebSocket message) keeps
                # the session open like any other bad frame; `frame_too_large` still closes it.
                payload = self.conn.receive()
                if payload is None:
                    return
                self._handle(protocol.validate(protocol.decode(payload)))
            except ProtocolError as exc:
                if exc.code in protocol.CLOSING_ERRORS:
                    raise
                self.send_error(exc.code, exc.message, exc.frame_id)

    def _handle(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if not self.bucket.take():
            if kind == "event":
                self._nack(frame["id"], "rate_limited", self.bucket.wait_time())
            else:
                self.send_error("rate_limited", "too many frames", frame.get("id"),
                                retry_after=self.bucket.wait_time())
            return
        if kind == "ping":
            self._send({"type": "pong"})
        elif kind == "event":
            self._on_event(frame)
        else:
            self._on_reply(frame)

    # -- events ---------------------------------------------------------------
    def _on_event(self, frame: dict[str, Any]) -> None:
        event_id = frame["id"]
        if self.draining:
            self._nack(event_id, "shutting_down", self.gateway.retry_after())
            return
        broker = self.gateway.broker
        if not broker.publisher.accepting:
            self._nack(event_id, "broker_unavailable", self.gateway.retry_after())
            return
        self.in_flight += 1
        received = time.monotonic()

        def done(outcome: str | None) -> None:
            self.in_flight -= 1
            if outcome is None:
                metrics.EVENT_CONFIRM.observe(time.monotonic() - received)
                metrics.EVENTS.labels(outcome="acked").inc()
                self._send({"type": "ack", "id": event_id})
            else:
                retry = self.gateway.retry_after() if outcome != "unroutable" else 30.0
                self._nack(event_id, outcome, retry)
            if self.draining and self.in_flight == 0:
                self.end("shutting_down", self.gateway.retry_after())

        broker.publish_event(self.device, self.id, frame["name"], event_id, frame.get("data"), done)

    def _nack(self, event_id: str, reason: str, retry_after: float) -> None:
        metrics.EVENTS.labels(outcome=reason).inc()
        self._send({"type": "nack", "id": event_id, "reason": reason,
                    "retry_after": round(retry_after, 1)})

    # -- commands -------------------------------------------------------------
    def deliver(self, command: Command) -> bool:
        """Write a command to the device; False if this session can no longer take it."""
        if self.closing is not None:
            return False
        self._forget_expired()
        if len(self.pending) >= MAX_PENDING_COMMANDS:
            del self.pending[next(iter(self.pending))]
            metrics.COMMANDS.labels(outcome="dropped").inc()
        self.pending[command.id] = (command, time.monotonic())
        frame = {"type": "command", "id": command.id, "name": command.name, "data": command.data}
        if self.routed is not None:  # still saying hello: the command follows the welcome
            self.routed.set()
            self.held = [*(self.held or []), frame]
        else:
            self._send(frame)
        metrics.COMMANDS.labels(outcome="delivered").inc()
        return True

    def _forget_expired(self) -> None:
        now = time.monotonic()
        for command_id in [cid for cid, (cmd, _) in self.pending.items() if cmd.deadline <= now]:
            del self.pending[command_id]
            metrics.COMMANDS.labels(outcome="expired").inc()

    def _on_reply(self, frame: dict[str, Any]) -> None:
        self._forget_expired()
        entry = self.pending.pop(frame["id"], None)
        if entry is None:
            self.send_error("unknown_command", "no pending command has this id", frame["id"])
            return
        command, sent = entry
        metrics.COMMAND_DEVICE_RTT.observe(time.monotonic() - sent)
        metrics.COMMANDS.labels(outcome="replied").inc()
        self.gateway.broker.reply(command, ok=frame["ok"], data=frame.get("data"),
                                  error=frame.get("error"))

    # -- ending ---------------------------------------------------------------
    def end(self, code: str, retry_after: float | None = None) -> None:
        """End this session from any greenlet: tell the device why, then cut. Never blocks."""
        if self.closing is not None:
            return
        if self.routed is not None:
            self.routed.set()
        self.closing = code
        self.send_error(code, None, retry_after=retry_after)
        self.conn.finish()

    def drain(self) -> None:
        """Shutting down: refuse new events, end once the in-flight ones are confirmed."""
        self.draining = True
        if self.in_flight == 0:
            self.end("shutting_down", self.gateway.retry_after())

    def send_error(self, code: str, message: str | None = None, frame_id: Any = None,
                   retry_after: float | None = None) -> None:
        metrics.ERRORS_SENT.labels(code=code).inc()
        self._send(protocol.error(code, message, frame_id, retry_after))

    def _send(self, frame: dict[str, Any]) -> None:
        self.conn.send(protocol.encode(frame))
