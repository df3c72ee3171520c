"""One device's session, from hello to close (PROTOCOL.md sections 2-4).

A session runs in its connection's greenlet and sees only its ports (app/sessions/ports.py):
a `FrameConnection` of decoded frames, the `Backend` that publishes to RabbitMQ, and the
`Host` (registry and watchdog); no sockets, TCP, WebSocket or MQTT. Whatever a device
sends, the worst outcome is the end of this one session: a `ProtocolError` becomes an
error frame; anything else is a bug that the connection supervisor logs and reports.

The states, in order (a session only moves forward); `state` is the one answer to "where is
this session", and `close_code` is set exactly when it is CLOSING:

    GREETING  connected, waiting for the hello (the watchdog enforces HELLO_TIMEOUT)
    ROUTING   registered; waiting until its partition's owner routes this device's commands here
    OPEN      welcomed; frames flow (the watchdog enforces 2 x heartbeat of silence)
    CLOSING   ending with `close_code`; nothing more is delivered

Commands are held in one place, `held`, until they may flow: through ROUTING, and while the
transport says they may not (an MQTT device that has not subscribed to commands/# yet).
`_write_held` writes them in order once they may: the one place a held command's deadline is checked.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import Event

from app import auth, metrics, protocol
from app.protocol import ProtocolError
from app.sessions.limits import TokenBucket
from app.sessions.ports import BYE_WITH_WILL, COMMANDS_MAY_FLOW, EventProperties
from app.sessions.wills import Will

if TYPE_CHECKING:
    from app.sessions.ports import Backend, Command, Frame, FrameConnection, Host

log = logging.getLogger("warren.session")

PONG: dict[str, Any] = {"type": "pong"}


class State(enum.IntEnum):
    GREETING = 0
    ROUTING = 1
    OPEN = 2
    CLOSING = 3


def _seconds(value: float) -> float | int:
    """30.0 as 30, but HEARTBEAT=0.5 as 0.5 (int() made it 0: a device told to ping constantly)."""
    return int(value) if float(value).is_integer() else value


class Session:
    """The protocol state of one device connection."""

    __slots__ = ("__weakref__", "backend", "bucket", "clean", "close_code", "conn", "deadline", "device", "draining",
                 "held", "host", "id", "idle_limit", "in_flight", "pending", "routed", "started", "state", "welcomed",
                 "will")

    def __init__(self, conn: FrameConnection, host: Host, backend: Backend, hello_deadline: float | None = None) -> None:
        self.conn = conn
        self.host = host
        self.backend = backend
        self.state = State.GREETING
        self.device = ""
        self.id = ""
        self.started = 0.0
        self.close_code: str | None = None  # why the session ends: set exactly when `state` is CLOSING
        self.draining = False
        self.in_flight = 0
        self.pending: dict[str, tuple[Command, float]] = {}  # in delivery order
        self.bucket: TokenBucket | None = None
        self.routed: Event | None = None  # the route wait's wake-up, only while ROUTING (not a state of its own)
        self.welcomed = False  # `session.connected` went out: `session.closed` follows at the end
        self.held: list[Command] | None = None  # delivered, not yet written (None, not [], when none: memory)
        self.will: Will | None = None  # published if the session ends uncleanly
        self.clean = False  # the device said goodbye (`bye`, MQTT DISCONNECT): no will
        # The watchdog ends the session once time.monotonic() passes `deadline`: the whole hello
        # within HELLO_TIMEOUT of the accept (a slow-loris dribbling a byte a second must not
        # hold its connection), then 2 x heartbeat of silence, refreshed by every frame.
        self.idle_limit = 2 * host.config.heartbeat
        # On a TLS port the handshake already spent part of HELLO_TIMEOUT: the caller passes what is left.
        self.deadline = hello_deadline or time.monotonic() + host.config.hello_timeout

    # -- life -----------------------------------------------------------------
    def run(self) -> None:
        """Serve the connection until it ends; always leaves the registry and the watchdog clean."""
        reason = "closed"
        self.host.watch(self)
        try:
            if self._hello():
                self._serve()
            reason = self.close_code or "closed"
        except ProtocolError as exc:
            reason = exc.code
            self.send_error(exc.code, exc.message, exc.frame_id)
        except Exception as exc:
            # A bug, not the device's fault: the connection supervisor reports it (Sentry tags).
            exc.warren_device, exc.warren_session = self.device or None, self.id or None
            raise
        finally:
            self._close_with(reason)
            self.host.forget(self)
            if self.id:
                self.host.close(self, reason)  # the will, if any, the release and `session.closed`
            self.conn.close()

    def expire(self) -> None:
        """The watchdog found this session past its deadline."""
        self.end("idle_timeout" if self.state is State.OPEN else "hello_timeout", "no frame in time")

    def _hello(self) -> bool:
        """Authenticate the first frame; True once the device is welcomed."""
        try:
            frame = self.conn.receive()
        except ProtocolError as exc:
            if exc.code in protocol.CLOSING_ERRORS:
                raise
            return self._refuse("unauthorized", exc.message)  # not JSON, a binary WebSocket message, ...
        if frame is None or self.state is State.CLOSING:
            return False
        try:
            device, token = protocol.validate_hello(frame)
            will = protocol.validate_will(frame)
        except ProtocolError as exc:
            code = "unsupported_version" if exc.code == "unsupported_version" else "unauthorized"
            return self._refuse(code, exc.message)
        refusal_reason = auth.refusal(self.host.config.device_secrets, self.conn.certificate_names, device, token)
        if refusal_reason is not None:
            return self._refuse("unauthorized", refusal_reason)
        if (ban := self.host.banned(device)) is not None:  # after the token: nobody else learns of a ban
            return self._refuse("banned", "this device is banned", ban.retry_after())
        # The hello is in: from here the route wait (ROUTE_WAIT) bounds the wait, not HELLO_TIMEOUT.
        self.deadline = time.monotonic() + self.idle_limit
        refusal = self.host.admit()
        if refusal is not None:
            code, retry_after = refusal
            return self._refuse(code, "the gateway cannot take a new session now", retry_after)
        self.will = None if will is None else Will(*will, EventProperties.carried_by(frame["will"]))
        return self._welcome(device)

    def _welcome(self, device: str) -> bool:
        """Register the session, wait until its commands route here, then welcome it."""
        config = self.host.config
        # 64 random bits name the session everywhere (takeover orders sessions by (hello time, id)); the
        # random module, reseeded in each forked worker, gives them without a syscall per session.
        self.device, self.id, self.started = device, f"{random.getrandbits(64):016x}", time.time()
        self.bucket = TokenBucket(config.event_rate, config.event_burst)
        self.state, self.routed = State.ROUTING, Event()
        self.host.open(self)
        # Welcome once the device's partition owner says its commands come here (`route_confirmed`), so
        # that a command sent on the welcome or on `session.connected` reaches this session and no older
        # one. No owner to ask (RabbitMQ away or blocking us): welcome now, claimed when it is back.
        routed = self._routed_within(config.route_wait)
        self.routed = None
        ban = self.host.banned(device) if routed else None  # banned while its route was on the way?
        if not routed or ban is not None:  # not routed: no answer within ROUTE_WAIT (a queue without its majority)
            code, why = ("banned", "this device is banned") if ban else ("overloaded", "its commands cannot be routed yet")
            metrics.HELLO_FAILURES.labels(code=code).inc()
            self.end(code, why, ban.retry_after() if ban else self.host.retry_after())
            return False  # never welcomed: no presence events either
        self.welcomed = True
        self.host.welcomed(self)
        if self.state is State.CLOSING:  # replaced while waiting: _serve ends at once
            self._answer_held_offline()
            return True
        self.state = State.OPEN
        self.idle_limit = self.conn.idle_limit or self.idle_limit
        self.deadline = time.monotonic() + self.idle_limit
        self.conn.send({"type": "welcome", "device": device, "session": self.id,
                        "heartbeat": _seconds(config.heartbeat)})
        self._write_held()
        return True

    def _routed_within(self, seconds: float) -> bool:
        """True once the owner's word came, or once routing stopped being possible; False after `seconds`."""
        deadline, routed = time.monotonic() + seconds, self.routed
        while self.host.routing and not routed.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                return False
        return True

    def route_confirmed(self) -> None:
        """RabbitMQ now routes this device's commands to us (the registry saw the proof)."""
        if self.routed is not None:
            self.routed.set()

    def _answer_held_offline(self) -> None:
        """Commands held for a welcome that never came were never written: their senders hear `offline`."""
        held, self.held = self.held or [], None
        for command in held:
            entry = self.pending.pop(command.id, None)
            if entry is not None:
                metrics.COMMANDS_OFFLINE.inc()
                self.backend.reply(entry[0], ok=False, error="offline")

    def _refuse(self, code: str, message: str, retry_after: float | None = None) -> bool:
        metrics.HELLO_FAILURES.labels(code=code).inc()
        self.send_error(code, message, retry_after=retry_after)
        return False

    def _serve(self) -> None:
        conn, idle_limit, bucket, closing = self.conn, self.idle_limit, self.bucket, State.CLOSING
        while self.state is not closing:
            try:
                # Inside the try: a transport's own `bad_frame` (a binary WebSocket message) keeps
                # the session open like any other bad frame; `frame_too_large` still closes it.
                frame = conn.receive()
                if frame is None:
                    return
                self.deadline = time.monotonic() + idle_limit
                if frame.get("type") == "ping":  # the frame that dominates: nothing to validate
                    if bucket.take() or self._over_the_limit(frame):
                        conn.send(PONG)
                    continue
                if frame is COMMANDS_MAY_FLOW:  # the transport's, not the device's: not rate limited
                    self._write_held()
                    continue
                if frame is BYE_WITH_WILL:  # the transport's: a goodbye that keeps the will (MQTT 5)
                    return
                frame = protocol.validate(frame)
                kind = frame["type"]
                if kind == "bye":
                    self.clean = True
                    return
                if bucket.take() or self._over_the_limit(frame):
                    if kind == "event":
                        self._on_event(frame)
                    else:
                        self._on_reply(frame)
            except ProtocolError as exc:
                if exc.closes:
                    raise
                self.send_error(exc.code, exc.message, exc.frame_id)

    def _over_the_limit(self, frame: Frame) -> bool:
        """A frame over the rate limit: True once it may go on anyway (backpressure waited), False if refused."""
        if self.conn.backpressure:
            self._wait_for_tokens()
            return True
        if frame.get("type") == "event":
            self._nack(frame["id"], "rate_limited", self.bucket.wait_time())
        else:
            self.send_error("rate_limited", "too many frames", frame.get("id"), retry_after=self.bucket.wait_time())
        return False

    # -- events ---------------------------------------------------------------
    def _on_event(self, frame: Frame) -> None:
        event_id = frame["id"]
        if self.draining:
            self._nack(event_id, "shutting_down", self.host.retry_after())
            return
        if not self.backend.accepting:
            self._nack(event_id, "broker_unavailable", self.host.retry_after())
            return
        self.in_flight += 1
        received = time.monotonic()

        def done(outcome: str | None) -> None:
            self.in_flight -= 1
            if outcome is None:
                metrics.EVENT_CONFIRM_TIMES.observe(time.monotonic() - received)
                metrics.EVENTS_ACKED.inc()
                self.conn.send({"type": "ack", "id": event_id})
            else:
                retry = self.host.retry_after() if outcome != "unroutable" else 30.0
                self._nack(event_id, outcome, retry)
            if self.draining and self.in_flight == 0:
                self.end("shutting_down", self.host.retry_after())

        self.backend.publish_event(self.device, self.id, frame["name"], event_id, frame.get("data"), done,
                                   EventProperties.carried_by(frame))

    def _wait_for_tokens(self) -> None:
        """Backpressure (MQTT): stop reading until the limit allows the frame; the wait is not silence."""
        while not self.bucket.take():
            gevent.sleep(self.bucket.wait_time())
        self.deadline = time.monotonic() + self.idle_limit

    def _nack(self, event_id: str, reason: str, retry_after: float) -> None:
        metrics.EVENTS.labels(outcome=reason).inc()
        self.conn.send({"type": "nack", "id": event_id, "reason": reason, "retry_after": round(retry_after, 1)})

    # -- commands -------------------------------------------------------------
    def deliver(self, command: Command) -> bool:
        """Take a command for the device (written now, or held until it may be); False if this session
        can no longer take it."""
        if self.state is State.CLOSING:
            return False
        refusal = self.conn.command_refusal(command.id, command.name, command.data)
        if refusal is not None:
            metrics.COMMANDS.labels(outcome=refusal).inc()
            self.backend.reply(command, ok=False, error=refusal)
            return True  # answered: not `offline`
        self._forget_expired()
        if len(self.pending) >= self.host.config.max_pending_commands:
            del self.pending[next(iter(self.pending))]
            metrics.COMMANDS.labels(outcome="dropped").inc()
        self.pending[command.id] = (command, time.monotonic())
        if self.held is None and self.state is State.OPEN and self.conn.commands_flow:
            self._write(command)  # the common case: nothing held and nothing to wait for
        else:
            self._hold(command)
        metrics.COMMANDS_DELIVERED.inc()
        return True

    def _hold(self, command: Command) -> None:
        """Keep a command until it may flow; bounded like `pending` (an MQTT device may never subscribe)."""
        if self.held is None:
            self.held = [command]
        else:
            self.held.append(command)
            if len(self.held) > self.host.config.max_pending_commands:
                self.held = [held for held in self.held if held.id in self.pending]
        # A command held while ROUTING proves nothing: its owner may have passed it on for an older
        # session of the device that lived in this worker, before it read that session's release and
        # our claim. Welcomed on it, the device's next command could reach the owner before our claim
        # and be answered `offline` while connected (section 2.4). Only the owner's `routed` welcomes.

    def _write_held(self) -> None:
        """Write the held commands, in order, while they may flow: OPEN, and the transport says so (an MQTT 5
        device's Receive Maximum may stop the flow part way: the rest stay held until it flows again).

        The one deadline check of a held command: one held past its deadline is never written; it leaves
        `pending` counted `expired`, as `_forget_expired` would have counted it. One that left `pending`
        meanwhile (pushed out by MAX_PENDING_COMMANDS, counted `dropped`) is not written either."""
        held = self.held
        if held is None or self.state is not State.OPEN or not self.conn.commands_flow:
            return
        self.held = None
        now = time.monotonic()
        for index, command in enumerate(held):
            if not self.conn.commands_flow:
                self.held = held[index:]
                return
            if command.id not in self.pending:
                continue
            if command.deadline <= now:
                del self.pending[command.id]
                metrics.COMMANDS.labels(outcome="expired").inc()
                continue
            self._write(command)

    def _write(self, command: Command) -> None:
        frame = {"type": "command", "id": command.id, "name": command.name, "data": command.data}
        if self.conn.timed_commands:
            frame["expires_in"] = command.deadline - time.monotonic()
        self.conn.send(frame)

    def _forget_expired(self) -> None:
        if not self.pending:
            return
        now = time.monotonic()
        for command_id in [cid for cid, (cmd, _) in self.pending.items() if cmd.deadline <= now]:
            del self.pending[command_id]
            metrics.COMMANDS.labels(outcome="expired").inc()

    def _on_reply(self, frame: Frame) -> None:
        self._forget_expired()
        entry = self.pending.pop(frame["id"], None)
        if entry is None:
            self.send_error("unknown_command", "no pending command has this id", frame["id"])
            return
        command, sent = entry
        metrics.COMMAND_DEVICE_TIMES.observe(time.monotonic() - sent)
        metrics.COMMANDS_REPLIED.inc()
        self.backend.reply(command, ok=frame["ok"], data=frame.get("data"), error=frame.get("error"))

    # -- ending ---------------------------------------------------------------
    def end(self, code: str, message: str | None = None, retry_after: float | None = None) -> None:
        """End this session from any greenlet: tell the device why, then cut. Never blocks."""
        if not self._close_with(code):
            return
        self.route_confirmed()  # a hello waiting for its route stops waiting
        self.send_error(code, message, retry_after=retry_after)
        self.conn.finish()

    def _close_with(self, code: str) -> bool:
        """Move to CLOSING with `code`; False if the session was closing already (its first code stands)."""
        if self.state is State.CLOSING:
            return False
        self.state, self.close_code = State.CLOSING, code
        return True

    def drain(self) -> None:
        """Shutting down: refuse new events, end once the in-flight ones are confirmed."""
        self.draining = True
        if self.in_flight == 0:
            self.end("shutting_down", retry_after=self.host.retry_after())

    def send_error(self, code: str, message: str | None = None, frame_id: Any = None,
                   retry_after: float | None = None) -> None:
        metrics.ERRORS_SENT.labels(code=code).inc()
        self.conn.send(protocol.error(code, message, frame_id, retry_after))
