"""What sessions, the registry and the HTTP API see of RabbitMQ (PROTOCOL.md section 5): `Broker`.

    app/broker/
    ├── __init__.py   Broker, the facade: nothing reaches through it into a link
    ├── link.py       one connection with its reader and writer greenlets; reconnects, fails over
    ├── wires.py      RabbitMQ's wire (a py-amqp socket): all that differs from kombu's memory://
    ├── memory_wire.py  ... and kombu's memory:// (make run's in-process broker)
    ├── frames.py     the AMQP frames of the hot path, packed and unpacked directly
    ├── publisher.py  events, presence, replies and commands, with publisher confirms
    ├── consumer.py   this worker's own queue: claims and releases out; commands, notices, answers in
    ├── partitions.py the routing partitions this worker owns: their directory carried out on RabbitMQ
    ├── directory.py  the partition owner's rules (who holds each device, who wins a race, who flaps): no I/O
    ├── updates.py    a partition's claims, releases and copies, read into its directory
    ├── receipts.py   what an owner holds of a delivery, and the acks a message of many updates waits for
    ├── ring.py       RabbitMQ's consistent-hash ring, computed here (and checked against the deployment's)
    ├── bans.py       the deployment's bans: a stream every worker replays and follows
    ├── rpc.py        the HTTP API's requests (commands, operators' questions) and their answers
    └── messages.py   what travels: kinds of message, deliveries parsed into Commands, the bodies (no I/O)

Who calls whom: sessions and the registry call the facade (it is their `Backend`
and `Outbound`, app/sessions/ports.py); the facade calls the sessions side only
through the one `Inbound` given to `Broker.attach` (the registry), from the
consumer's reader. `Command`, what it hands over, is the sessions side's: this
package imports app.sessions.ports, never the other way round.

Two links, because RabbitMQ blocks any connection that publishes during a memory or
disk alarm: events then fail at once on the publisher's, while the consumer's keeps
delivering commands to devices already routed (it publishes too, claims and
forwards, so under an alarm new sessions wait for their route until it clears).
A third follows the ban stream (bans.py), so that a stream RabbitMQ cannot serve
never takes the routing down with it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from gevent.event import AsyncResult

from app import metrics
from app.broker.bans import BanStream, ban_now, lift_now
from app.broker.consumer import CommandConsumer
from app.broker.directory import Starts
from app.broker.link import Link
from app.broker.messages import (
    BAN,
    EVENT,
    EVENT_WITH_PROPERTIES,
    PRESENCE,
    REPLY,
    MessageIds,
    Refusal,
    ban_body,
    event_body,
    reply_body,
)
from app.broker.publisher import CONFIRM_TIMEOUT, Done, Publisher
from app.broker.rpc import RpcClient

if TYPE_CHECKING:
    from app.sessions.bans import Ban
    from app.sessions.ports import Command, EventProperties, Inbound

__all__ = ["Broker", "Done"]

log = logging.getLogger("warren.broker")

_REFUSAL_OUTCOMES = {"too_large": "too_large", "bad_command": "malformed"}


class Broker:
    """A worker's RabbitMQ: publish events and presence, take commands, answer them, send them, ask.

    Built first, then given the sessions side with `attach` before its links run (the worker's tree
    does both, app/tree.py): the registry needs a broker to be built, and the broker must not call
    into a half-built registry. The attached `Inbound` is called in the consumer's reader greenlet
    and must not block: `deliver` (a command for one of our devices), `routed` and `replaced` (a
    partition owner's word on one of our sessions), `live_sessions` (to claim again after a
    reconnect) and `answer` (an operator's `ask` about one of our devices).
    """

    def __init__(self, url: str, *, max_command_bytes: int, confirm_timeout: float = CONFIRM_TIMEOUT,
                 amqp_heartbeat: int = 20, node_offset: int = 0, workers: int = 1,
                 route_queues: str = "quorum", bans_stream: str = "warren.bans",
                 flapping: tuple[int, float, float] = (0, 60.0, 120.0)) -> None:
        """`flapping` is (FLAP_MAX, FLAP_WINDOW, FLAP_BAN); FLAP_MAX 0 turns the detection off."""
        self._publisher = Publisher(url, heartbeat=amqp_heartbeat, node_offset=node_offset,
                                    confirm_timeout=confirm_timeout)
        self._rpc = RpcClient(self._publisher, reply_to=lambda: self._consumer.queue_name)
        flap_max, flap_window, self._flap_ban = flapping
        self._bans = BanStream(url, bans_stream, heartbeat=amqp_heartbeat, node_offset=node_offset)
        self._consumer = CommandConsumer(url, max_command_bytes=max_command_bytes, refuse=self._refuse,
                                         reply_received=self._rpc.reply_received, asked=self._asked,
                                         heartbeat=amqp_heartbeat, node_offset=node_offset, slots=workers,
                                         queue_type=route_queues, bans=self._bans,
                                         starts=Starts(flap_max, flap_window) if flap_max > 0 else None,
                                         flapped=self._ban_flapping)
        self._inbound: Inbound | None = None
        self._ids = MessageIds()
        self.links: tuple[Link, ...] = (self._publisher, self._consumer, self._bans)
        """In start order; each has `.role` and `.run()`, a greenlet body that returns only when killed."""

    def attach(self, inbound: Inbound) -> None:
        """The sessions side the consumer delivers to; once, before the links run."""
        self._inbound = inbound
        self._consumer.attach(inbound)
        self._bans.changed = inbound.ban_changed

    @property
    def ready(self) -> bool:
        """Both links connected, neither blocked: events are taken and commands route here."""
        return self._publisher.accepting and self._consumer.ready

    @property
    def routing(self) -> bool:
        """Sessions can be routed now (the consumer's link is up and RabbitMQ reads from it), or soon: the
        worker is starting and its link's first connect is under way. A hello waits for its route then;
        a session welcomed without one (as during an outage) would hear `offline` for its first commands,
        sent to it as soon as a backend sees it connected (a worker restarted under a reconnecting crowd)."""
        return self._consumer.ready or self._consumer.starting

    @property
    def accepting(self) -> bool:
        """The publisher takes events right now."""
        return self._publisher.accepting

    @property
    def backlog(self) -> int:
        """Publishes queued or awaiting a confirm."""
        return self._publisher.backlog

    # -- the device side ----------------------------------------------------------------------
    def publish_event(self, device: str, session: str, name: str, event_id: str, data: Any, done: Done,
                      properties: EventProperties | None = None) -> None:
        """Persistent, mandatory, confirmed: `done(None)` once RabbitMQ confirmed it and a queue took
        it, else `done("broker_unavailable")` or `done("unroutable")`. Never blocks. `properties`: the
        transport's AMQP headers and expiration (MQTT 5), on the slower path that serializes them."""
        body = event_body(device, session, event_id, name, data, int(time.time() * 1000))
        message_id = f"{device}/{event_id}/{self._ids.next()}"
        if properties is None:
            self._publisher.publish(EVENT, f"{device}.{name}", body, (message_id,), done)
            return
        headers = dict(properties.headers) if properties.headers else None
        self._publisher.publish(EVENT_WITH_PROPERTIES, f"{device}.{name}", body,
                                (headers, properties.expiration, message_id), done)

    def publish_presence(self, device: str, session: str, what: str, data: Any) -> None:
        """The `session.<what>` event (its id is the session id); not mandatory, no outcome."""
        name = f"session.{what}"
        body = event_body(device, session, session, name, data, int(time.time() * 1000))
        self._publisher.publish(PRESENCE, f"{device}.{name}", body, (f"{device}/{session}/{self._ids.next()}",))

    def reply(self, command: Command, ok: bool, data: Any = None, error: str | None = None) -> None:
        """A device's reply (or the gateway's `offline`/`expired`) to the command's sender, if it has one."""
        if command.reply_to:
            self._publisher.publish(REPLY, command.reply_to, reply_body(command.device, command.id, ok, data, error),
                                    (command.correlation_id,))

    def claim(self, device: str, started: float, session_id: str) -> None:
        """Route `device`'s commands to this session; its partition's owner answers `Inbound.routed`."""
        self._consumer.claim(device, started, session_id)

    def release(self, device: str, session_id: str, will_until: float | None = None) -> None:
        """This session of `device` ended (a release of a session already replaced changes nothing);
        `will_until`: its will is held until then (wall clock), unless the device starts a new session."""
        self._consumer.release(device, session_id, will_until)

    def give_up(self, reason: str) -> int:
        """Answer every publish awaiting a confirm with `reason` now; returns how many."""
        return self._publisher.give_up(reason)

    # -- bans (PROTOCOL.md section 6) --------------------------------------------------------------
    def banned(self, device: str) -> Ban | None:
        """The ban in force on `device`, as this worker read the deployment's ban stream."""
        return self._bans.bans.banned(device)

    def bans(self) -> list[Ban]:
        """Every ban in force."""
        return self._bans.bans.in_force()

    def ban(self, device: str, seconds: float | None, reason: str, by: str = "operator") -> AsyncResult:
        """Ban `device` everywhere; resolves to the Ban once RabbitMQ confirmed it is stored, else to an
        error string (`broker_unavailable`, `unroutable`: the stream is not there yet)."""
        record = ban_now(device, seconds, reason, by, after=self._bans.bans.latest(device))
        return self._store(record)

    def lift(self, device: str) -> AsyncResult | None:
        """End `device`'s ban everywhere (resolves as `ban` does); None when no ban of it is in force."""
        current = self.banned(device)
        return None if current is None else self._store(lift_now(device, current))

    def _store(self, record: Ban) -> AsyncResult:
        result = AsyncResult()
        self._publisher.publish(BAN, self._bans.name, ban_body(record), (f"ban/{record.device}/{self._ids.next()}",),
                                lambda error: result.set(record if error is None else error))
        return result

    def _ban_flapping(self, device: str) -> None:
        """A partition we own saw `device` start one session too many: ban it for FLAP_BAN seconds."""
        stored = self._store(ban_now(device, self._flap_ban, "flapping", "flapping",
                                     after=self._bans.bans.latest(device)))
        stored.rawlink(lambda result: self._flapping_banned(device, result.value))

    def _flapping_banned(self, device: str, stored: Ban | str) -> None:
        if isinstance(stored, str):  # its hello was not routed (it ends `overloaded`); its next start counts again
            log.error("device %s is flapping, but its ban was not stored (%s)", device, stored)
            return
        metrics.BANS_ISSUED.labels(by="flapping").inc()
        log.warning("device %s is flapping (more than FLAP_MAX sessions within FLAP_WINDOW): banned for %gs",
                    device, self._flap_ban)

    # -- the backend side (the HTTP API) --------------------------------------------------------
    def send_command(self, device: str, name: str, data: Any, timeout: float) -> AsyncResult:
        """A command to whichever worker holds `device`; resolves to {"ok", "data", "error"}."""
        return self._rpc.send_command(device, name, data, timeout)

    def ask(self, device: str, kind: str, timeout: float) -> AsyncResult:
        """An operator's question (`info`, `kick`) to whichever worker holds `device`: resolves to its
        answer, {"device", "online": False} when none does, or {"error": "timeout" / "broker_unavailable"}."""
        return self._rpc.ask(device, kind, timeout)

    # -- from the consumer's reader ---------------------------------------------------------------
    def _asked(self, device: str, kind: str, reply_to: str | None, correlation_id: str | None) -> None:
        answer = self._inbound.answer(device, kind) if self._inbound is not None else None
        if answer is not None and reply_to:
            self._publisher.publish(REPLY, reply_to, orjson.dumps(answer), (correlation_id or "",))

    def _refuse(self, refusal: Refusal) -> None:
        log.warning("command %s for %s refused: %s", refusal.id, refusal.device, refusal.error)
        metrics.COMMANDS.labels(outcome=_REFUSAL_OUTCOMES[refusal.error]).inc()
        if refusal.reply_to:
            self._publisher.publish(REPLY, refusal.reply_to,
                                    reply_body(refusal.device, refusal.id, False, None, refusal.error),
                                    (refusal.correlation_id,))
