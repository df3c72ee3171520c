"""The worker's RabbitMQ side: two kombu connections, each owned by its own pair of greenlets.

Why two connections: RabbitMQ blocks *publishing* connections under memory or
disk alarms; commands and takeover notices must keep flowing to devices while
events are refused, so consuming lives on a connection that never publishes events.

Why a reader and a writer per connection: a py-amqp connection is not safe for
two greenlets at once. Exactly one greenlet reads (`drain_events`), exactly one
writes (it drains an outbox queue that any session may fill without blocking),
and the reader's rare protocol writes (close-ok) go through the same lock as the
writer's frames. Sessions never touch a socket of RabbitMQ.

Publisher confirms are pipelined: each publish gets the channel's next delivery
tag and a callback; `basic.ack`/`basic.nack` (possibly `multiple`) resolve them
in order, a `basic.return` that precedes the ack marks an event unroutable.

A lost connection is not a crash: the link marks itself down, fails what was in
flight with `broker_unavailable`, reconnects with exponential backoff and jitter,
re-declares, re-binds every live device and carries on. Only a bug (an exception
nobody expected) ends the link's greenlet, and then its supervisor decides.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import socket
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import gevent
import orjson
from amqp.method_framing import frame_writer
from gevent.event import AsyncResult, Event
from gevent.lock import RLock
from gevent.queue import Empty, Queue
from kombu import Connection, Exchange
from kombu import Queue as KombuQueue

from app import metrics

log = logging.getLogger("warren.broker")

EVENTS = Exchange("devices.events", type="topic", durable=True)
COMMANDS = Exchange("devices.commands", type="direct", durable=True)
TAKEOVER_TYPE = "warren.takeover"
DEFAULT_COMMAND_TTL = 60.0
CONFIRM_TIMEOUT = 10.0
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 10.0
HEARTBEAT = 20
WRITE_BATCH = 1000

# Why the link went down. Errors a network or a broker can cause; anything else is a bug.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, socket.timeout, EOFError)
try:
    import amqp.exceptions

    CONNECTION_ERRORS += (amqp.exceptions.AMQPError,)
except ImportError:  # pragma: no cover - amqp comes with kombu
    pass

Done = Callable[[str | None], None]
"""A publish's outcome: None once RabbitMQ confirmed it, else the nack reason."""


@dataclass
class Command:
    """A command taken from this worker's queue, on its way to a device."""

    device: str
    id: str
    name: str
    data: Any
    reply_to: str | None
    correlation_id: str
    deadline: float  # time.monotonic() after which it must not reach the device


@dataclass
class _Pending:
    done: Done
    message_id: str
    deadline: float


def backoff_delays(first: float = BACKOFF_FIRST, maximum: float = BACKOFF_MAX):
    """Exponential backoff with full jitter, so that workers do not reconnect in step."""
    delay = first
    while True:
        yield random.uniform(first / 2, delay)
        delay = min(maximum, delay * 2)


class Link:
    """One kombu connection and channel with its reader and writer greenlets.

    Subclasses say what to declare after (re)connecting (`setup`) and what to do
    with deliveries; everything that writes goes through `submit`.
    """

    role = "link"

    def __init__(self, url: str) -> None:
        self.url = url
        self.connected = Event()
        self.outbox: Queue = Queue()
        self.channel: Any = None
        self.connection: Connection | None = None
        self._lost: Event = Event()

    # -- called from any greenlet -------------------------------------------
    def submit(self, operation: Callable[[], None]) -> None:
        """Queue a write for the writer greenlet; never blocks."""
        self.outbox.put(operation)

    @property
    def is_amqp(self) -> bool:
        return not self.url.startswith("memory://")

    # -- the link's own greenlet --------------------------------------------
    def run(self) -> None:
        """Connect, serve, and reconnect forever; return only when killed."""
        delays = backoff_delays()
        while True:
            try:
                self._connect()
            except CONNECTION_ERRORS as exc:
                delay = next(delays)
                log.warning("%s: cannot reach RabbitMQ (%s); retrying in %.1fs", self.role, exc, delay)
                gevent.sleep(delay)
                continue
            delays = backoff_delays()
            try:
                self._serve()
            except CONNECTION_ERRORS as exc:
                log.warning("%s: lost RabbitMQ (%s)", self.role, exc)
            finally:
                self._teardown()
            gevent.sleep(next(delays))

    def _connect(self) -> None:
        connection = Connection(self.url, heartbeat=HEARTBEAT if self.is_amqp else 0,
                                connect_timeout=5, transport_options={"polling_interval": 0.005})
        connection.connect()
        try:
            self.connection = connection
            self.channel = connection.channel()
            self._batch = None
            if self.is_amqp:
                self._batch = _BatchingWriter(connection.connection)
            self._lost.clear()
            self.setup()
        except BaseException:
            # Connected, but the setup failed (a declare refused, the broker closing as it
            # starts): drop this connection, or each retry leaves one open at RabbitMQ until
            # its heartbeat timeout.
            self.connection, self.channel = None, None
            self.on_lost()
            try:
                connection.collect()
            except Exception as exc:  # noqa: BLE001 - it may be half dead already
                log.debug("%s: dropping a connection whose setup failed: %r", self.role, exc)
            raise
        metrics.BROKER_CONNECTED.labels(link=self.role).set(1)
        log.info("%s: connected to %s", self.role, "RabbitMQ" if self.is_amqp else "the in-process broker")
        self.connected.set()

    def _serve(self) -> None:
        reader = gevent.spawn(self._read_forever)
        try:
            self._write_forever()
        finally:
            reader.kill(block=True)
        if reader.exception is not None and not isinstance(reader.exception, gevent.GreenletExit):
            raise reader.exception

    def _read_forever(self) -> None:
        try:
            while True:
                self.connection.drain_events(timeout=None)
        except BaseException:
            self._lost.set()
            self.outbox.put(None)  # wake the writer
            raise

    def _write_forever(self) -> None:
        next_heartbeat = 0.0
        while not self._lost.is_set():
            try:
                operation = self.outbox.get(timeout=1.0)
            except Empty:
                operation = None
            if operation is not None:
                self._write_batch(operation)
            self.tick()
            if self.is_amqp and time.monotonic() >= next_heartbeat:
                self.connection.heartbeat_check()
                next_heartbeat = time.monotonic() + 1.0

    def _write_batch(self, first: Callable[[], None]) -> None:
        """Run every queued write (up to WRITE_BATCH) and send their frames in one syscall."""
        with self._batch.collect() if self._batch else nullcontext():
            first()
            for _ in range(WRITE_BATCH):
                try:
                    operation = self.outbox.get_nowait()
                except Empty:
                    break
                if operation is None:
                    break
                operation()

    def _teardown(self) -> None:
        self.connected.clear()
        metrics.BROKER_CONNECTED.labels(link=self.role).set(0)
        self.on_lost()
        connection, self.connection, self.channel = self.connection, None, None
        if connection is not None:
            try:
                connection.collect()
            except Exception as exc:  # noqa: BLE001 - a dead connection may fail to clean up
                log.debug("%s: cleaning up the old connection failed: %r", self.role, exc)

    # -- hooks --------------------------------------------------------------
    def setup(self) -> None:
        """Declare and subscribe after each connect."""

    def tick(self) -> None:
        """Periodic work in the writer greenlet (about once a second, and after each write)."""

    def on_lost(self) -> None:
        """Fail what was in flight; called after the connection is gone."""


class Publisher(Link):
    """Events, presence and replies, with pipelined publisher confirms and mandatory returns."""

    role = "publisher"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.blocked = False
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._returned: set[str] = set()
        self._next_tag = 1
        self.on_command_returned: Callable[[str], None] = lambda correlation_id: None
        self._id_prefix = uuid.uuid4().hex[:12]
        self._id_counter = itertools.count()

    @property
    def accepting(self) -> bool:
        return self.connected.is_set() and not self.blocked

    def next_id(self) -> str:
        """A message id unique to this worker's lifetime, without a syscall (uuid4 reads urandom)."""
        return f"{self._id_prefix}.{next(self._id_counter):x}"

    def setup(self) -> None:
        self._next_tag = 1
        self.blocked = False
        for exchange in (EVENTS, COMMANDS):
            exchange(self.channel).declare()
        if self.is_amqp:
            self.channel.confirm_select()
            self.channel.events["basic_ack"].add(self._on_ack)
            self.channel.events["basic_nack"].add(self._on_nack)
            self.channel.events["basic_return"].add(self._on_return)
            self.connection.connection.on_blocked = self._on_blocked
            self.connection.connection.on_unblocked = self._on_unblocked

    def publish(self, exchange: str, routing_key: str, body: bytes, *, done: Done | None = None,
                mandatory: bool = False, persistent: bool = True, **properties: Any) -> None:
        """Queue a publish; `done` learns its outcome. Never blocks the caller."""
        if not self.accepting:
            if done is not None:
                done("broker_unavailable")
            return
        self.submit(lambda: self._write_publish(exchange, routing_key, body, done, mandatory,
                                                persistent, properties))

    def _write_publish(self, exchange: str, routing_key: str, body: bytes, done: Done | None,
                       mandatory: bool, persistent: bool, properties: dict[str, Any]) -> None:
        if self.channel is None or self.blocked:
            if done is not None:
                done("broker_unavailable")
            return
        if "message_id" not in properties:
            properties["message_id"] = self.next_id()
        if persistent:
            properties["delivery_mode"] = 2
        message = self.channel.prepare_message(body, content_type="application/json",
                                               content_encoding="utf-8", properties=properties)
        if not self.is_amqp:
            self._publish_in_process(message, exchange, routing_key, done, mandatory, properties)
            return
        tag, self._next_tag = self._next_tag, self._next_tag + 1
        self._pending[tag] = _Pending(done or _ignore, properties["message_id"],
                                      time.monotonic() + CONFIRM_TIMEOUT)
        self.channel.basic_publish(message, exchange=exchange, routing_key=routing_key,
                                   mandatory=mandatory)

    def _publish_in_process(self, message: Any, exchange: str, routing_key: str, done: Done | None,
                            mandatory: bool, properties: dict[str, Any]) -> None:
        """kombu's memory transport has no confirms or returns: decide routing here, as RabbitMQ would.

        Unroutable messages are dropped, not parked in kombu's dead-letter queue,
        where nothing would ever read them.
        """
        routed = not exchange or bool(self.channel.typeof(exchange).lookup(
            self.channel.get_table(exchange), exchange, routing_key, None))
        if routed:
            self.channel.basic_publish(message, exchange=exchange, routing_key=routing_key)
        elif mandatory and exchange == COMMANDS.name:
            self.on_command_returned(properties.get("correlation_id") or properties.get("message_id"))
        if done is not None:
            done(None if routed or not mandatory else "unroutable")

    def _settle(self, tag: int, multiple: bool, outcome: str | None) -> None:
        """Resolve one publish, or with `multiple` every one up to `tag` (the oldest come first)."""
        if not multiple:
            pending = self._pending.pop(tag, None)
            if pending is not None:
                self._resolve(pending, outcome)
            return
        while self._pending:
            oldest = next(iter(self._pending))
            if oldest > tag:
                return
            self._resolve(self._pending.pop(oldest), outcome)

    def _resolve(self, pending: _Pending, outcome: str | None) -> None:
        if pending.message_id in self._returned:  # basic.return came first: no queue took it
            self._returned.discard(pending.message_id)
            pending.done("unroutable")
        else:
            pending.done(outcome)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, None)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, "broker_unavailable")

    def _on_return(self, exception: Any, exchange: str, routing_key: str, message: Any) -> None:
        properties = message.properties
        self._returned.add(properties.get("message_id", ""))
        if exchange == COMMANDS.name:
            self.on_command_returned(properties.get("correlation_id") or properties.get("message_id"))

    def _on_blocked(self, reason: str) -> None:
        log.warning("publisher: RabbitMQ blocked publishing (%s)", reason)
        self.blocked = True
        metrics.BROKER_BLOCKED.set(1)

    def _on_unblocked(self) -> None:
        log.info("publisher: RabbitMQ unblocked publishing")
        self.blocked = False
        metrics.BROKER_BLOCKED.set(0)

    def tick(self) -> None:
        """Give up on confirms that take too long; the device will resend (at-least-once).

        A confirm overdue on a connection that RabbitMQ has not blocked means the connection
        is dead without a word (a network partition drops packets, nothing closes): heartbeats
        would notice only after two missed (2 x HEARTBEAT), with /readyz saying ready all
        along. Reconnect now instead.
        """
        now = time.monotonic()
        overdue = 0
        while self._pending:
            tag, pending = next(iter(self._pending.items()))
            if pending.deadline > now:
                break
            del self._pending[tag]
            overdue += 1
            pending.done("broker_unavailable")
        if overdue and self.is_amqp and not self.blocked:
            raise ConnectionError(f"{overdue} publisher confirm(s) overdue after {CONFIRM_TIMEOUT:g}s "
                                  f"on a connection RabbitMQ did not block")

    def give_up(self, reason: str) -> int:
        """Answer every publish still awaiting its confirm with `reason` now (shutting down with
        no time left to wait); a confirm that comes later finds nothing. Returns how many."""
        pending, self._pending = self._pending, OrderedDict()
        for item in pending.values():
            item.done(reason)
        return len(pending)

    def on_lost(self) -> None:
        self.give_up("broker_unavailable")
        self._returned.clear()
        self._fail_outbox()

    def _fail_outbox(self) -> None:
        """Queued publishes never reached RabbitMQ; run them now so they fail as unavailable."""
        while True:
            try:
                operation = self.outbox.get_nowait()
            except Empty:
                return
            if operation is not None:
                operation()

    @property
    def in_flight(self) -> int:
        return len(self._pending) + self.outbox.qsize()


class CommandConsumer(Link):
    """This worker's exclusive command queue: one binding per connected device.

    It also receives takeover notices (other sessions of our devices) and the
    replies to commands sent through this worker's HTTP API.
    """

    role = "consumer"

    def __init__(self, url: str, on_message: Callable[[Any], None],
                 live_sessions: Callable[[], Iterable[tuple[str, float, str]]]) -> None:
        super().__init__(url)
        self.queue_name = _command_queue_name()
        self.bound: Counter[str] = Counter()
        self._on_message = on_message
        self._live_sessions = live_sessions

    def setup(self) -> None:
        for exchange in (EVENTS, COMMANDS):
            exchange(self.channel).declare()
        KombuQueue(self.queue_name, exclusive=True, auto_delete=True, durable=False)(self.channel).declare()
        # The channel's own consume, not kombu's Consumer: deliveries are handed over as they
        # come (body, properties, delivery_info), without a kombu Message built for each one.
        self.channel.basic_consume(self.queue_name, no_ack=True, callback=self._on_message,
                                   consumer_tag=self.queue_name)
        self._rebind_everything()

    def _rebind_everything(self) -> None:
        """After a reconnect the queue is new: bind every live device again, then announce
        every live session again.

        Announcing all of them, not only those that began during the outage: another
        worker may hold an older session of one of our devices and have rebound after
        our notice went out, or before; whichever order the workers come back in, the
        later announcement reaches the other, and the older session ends `replaced`.
        Binds still queued from before are harmless: `_write_bind` and `_write_unbind`
        check the current state, so a stale operation writes nothing.
        """
        devices = list(self.bound)
        for start in range(0, len(devices), WRITE_BATCH):
            with self._batch.collect() if self._batch else nullcontext():
                for device in devices[start:start + WRITE_BATCH]:
                    self._write_bind(device)
            gevent.sleep(0)  # let sessions run between batches
        sessions = list(self._live_sessions())
        for start in range(0, len(sessions), WRITE_BATCH):
            with self._batch.collect() if self._batch else nullcontext():
                for device, started, session_id in sessions[start:start + WRITE_BATCH]:
                    self._write_takeover(device, started, session_id)
            gevent.sleep(0)

    def bind(self, device: str) -> None:
        self.bound[device] += 1
        if self.bound[device] == 1:
            self.submit(lambda: self._write_bind(device))

    def unbind(self, device: str) -> None:
        self.bound[device] -= 1
        if self.bound[device] <= 0:
            del self.bound[device]
            self.submit(lambda: self._write_unbind(device))

    def announce(self, device: str, started: float, session_id: str) -> None:
        """Tell every other worker holding `device` that a newer session exists.

        Written on this channel after our own bind, so the broker sees the bind first.
        While disconnected there is nothing to do: the reconnect announces every session.
        """
        if self.connected.is_set():
            self.submit(lambda: self._write_takeover(device, started, session_id))

    def _write_bind(self, device: str) -> None:
        if device in self.bound and self.channel is not None:
            self.channel.queue_bind(self.queue_name, COMMANDS.name, routing_key=device, nowait=True)

    def _write_unbind(self, device: str) -> None:
        if device not in self.bound and self.channel is not None:
            self.channel.queue_unbind(self.queue_name, COMMANDS.name, routing_key=device, nowait=True)

    def _write_takeover(self, device: str, started: float, session_id: str) -> None:
        if self.channel is None:
            return  # the reconnect announces every live session
        body = orjson.dumps({"device": device, "session": session_id, "started": started})
        message = self.channel.prepare_message(body, content_type="application/json",
                                               properties={"type": TAKEOVER_TYPE})
        self.channel.basic_publish(message, exchange=COMMANDS.name, routing_key=device)

    def on_lost(self) -> None:
        # Our exclusive queue died with the connection; a fresh name avoids racing its deletion.
        self.queue_name = _command_queue_name()


def _command_queue_name() -> str:
    """A name that says where the queue's consumer lives (host, worker pid) in RabbitMQ's tools."""
    return f"warren.commands.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def _ignore(_outcome: str | None) -> None:
    pass


class _BatchingWriter:
    """A py-amqp connection's frame writer that can gather frames and send them at once.

    py-amqp writes each frame with its own `sendall`; at thousands of binds and
    publishes a second, gathering what one writer pass produces saves most of the
    syscalls. It also holds the one lock every frame write takes, so that the
    reader's rare protocol answers (close-ok) never interleave with the writer's.
    """

    def __init__(self, amqp_connection: Any) -> None:
        self._transport = amqp_connection.transport
        self._pending: list[bytes] | None = None
        self._lock = RLock()
        write_frame = frame_writer(amqp_connection, self)

        def locked_write_frame(*args: Any) -> Any:
            with self._lock:
                return write_frame(*args)

        amqp_connection.frame_writer = locked_write_frame

    def write(self, data: Any) -> None:
        """Called by py-amqp's frame writer with a view of its reused buffer: copy when gathering."""
        if self._pending is None:
            self._transport.write(data)
        else:
            self._pending.append(bytes(data))

    @contextmanager
    def collect(self) -> Iterator[None]:
        with self._lock:
            self._pending = []
            try:
                yield
            finally:
                data, self._pending = b"".join(self._pending), None
                if data:
                    self._transport.write(data)


class Broker:
    """What sessions and the HTTP API see of RabbitMQ (PROTOCOL.md section 5)."""

    def __init__(self, url: str, deliver: Callable[[Command], None],
                 takeover: Callable[[str, float, str], None], max_command_bytes: int,
                 live_sessions: Callable[[], Iterable[tuple[str, float, str]]]) -> None:
        self.url = url
        self.max_command_bytes = max_command_bytes
        self.publisher = Publisher(url)
        self.consumer = CommandConsumer(url, self._on_message, live_sessions)
        self.publisher.on_command_returned = self._on_command_returned
        self._deliver = deliver
        self._takeover = takeover
        self._waiting: dict[str, AsyncResult] = {}

    @property
    def ready(self) -> bool:
        return self.publisher.accepting and self.consumer.connected.is_set()

    # -- device side ----------------------------------------------------------
    def publish_event(self, device: str, session: str, name: str, event_id: str, data: Any,
                      done: Done | None, mandatory: bool = True) -> None:
        body = orjson.dumps({"device": device, "session": session, "id": event_id, "name": name,
                             "data": data, "ts": int(time.time() * 1000)})
        self.publisher.publish(EVENTS.name, f"{device}.{name}", body, done=done,
                               mandatory=mandatory, message_id=f"{device}/{event_id}/{self.publisher.next_id()}")

    def reply(self, command: Command, ok: bool, data: Any = None, error: str | None = None) -> None:
        """Send a device's reply (or the gateway's `offline`/`expired`) to the command's sender."""
        if not command.reply_to:
            return
        body = orjson.dumps({"device": command.device, "id": command.id, "ok": ok,
                             "data": data, "error": error})
        self.publisher.publish("", command.reply_to, body, persistent=False,
                               correlation_id=command.correlation_id)

    def bind(self, device: str) -> None:
        self.consumer.bind(device)

    def unbind(self, device: str) -> None:
        self.consumer.unbind(device)

    def announce(self, device: str, started: float, session_id: str) -> None:
        self.consumer.announce(device, started, session_id)

    # -- backend side (the HTTP API) -------------------------------------------
    def send_command(self, device: str, name: str, data: Any, timeout: float) -> AsyncResult:
        """Publish a command and return a result that gets the device's reply as a dict.

        The reply comes back to this worker's own queue; a command nobody holds is
        returned by RabbitMQ at once and resolves as `{"ok": False, "error": "offline"}`.
        """
        result = AsyncResult()
        command_id = uuid.uuid4().hex
        self._waiting[command_id] = result
        result.rawlink(lambda _: self._waiting.pop(command_id, None))

        def failed(outcome: str | None) -> None:
            if outcome is not None and not result.ready():
                result.set({"ok": False, "error": outcome, "data": None})

        body = orjson.dumps({"name": name, "data": data})
        self.publisher.publish(COMMANDS.name, device, body, done=failed, mandatory=True,
                               persistent=False, message_id=command_id, correlation_id=command_id,
                               reply_to=self.consumer.queue_name,
                               expiration=str(max(1, int(timeout * 1000))),
                               timestamp=int(time.time()))
        return result

    def _on_command_returned(self, correlation_id: str | None) -> None:
        waiting = self._waiting.get(correlation_id or "")
        if waiting is not None and not waiting.ready():
            waiting.set({"ok": False, "error": "offline", "data": None})

    # -- deliveries -------------------------------------------------------------
    def _on_message(self, message: Any) -> None:
        """Route one delivery from our queue: a reply to us, a takeover notice, or a command."""
        properties = message.properties
        if message.delivery_info.get("exchange", "") == "":
            self._on_reply(properties.get("correlation_id"), message.body)
        elif properties.get("type") == TAKEOVER_TYPE:
            notice = orjson.loads(message.body)
            self._takeover(notice["device"], notice["started"], notice["session"])
        else:
            self._on_command(message)

    def _on_reply(self, correlation_id: str | None, body: bytes) -> None:
        waiting = self._waiting.get(correlation_id or "")
        if waiting is None or waiting.ready():
            return
        try:
            reply = orjson.loads(body)
        except orjson.JSONDecodeError:
            log.warning("ignoring a reply that is not JSON (correlation_id=%s)", correlation_id)
            return
        waiting.set(reply)

    def _on_command(self, message: Any) -> None:
        properties = message.properties
        device = message.delivery_info.get("routing_key", "")
        command_id = str(properties.get("message_id") or uuid.uuid4().hex)
        command = Command(device=device, id=command_id, name="", data=None,
                          reply_to=properties.get("reply_to"),
                          correlation_id=str(properties.get("correlation_id") or command_id),
                          deadline=_deadline(properties))
        if len(message.body) > self.max_command_bytes:
            log.warning("command %s for %s is %d bytes, over MAX_FRAME_BYTES; refused",
                        command_id, device, len(message.body))
            metrics.COMMANDS.labels(outcome="too_large").inc()
            self.reply(command, ok=False, error="too_large")
            return
        try:
            body = orjson.loads(message.body)
            command.name = body["name"]
            command.data = body.get("data")
            if not isinstance(command.name, str) or not command.name:
                raise ValueError("name")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("command %s for %s is not {name, data} JSON; refused", command_id, device)
            metrics.COMMANDS.labels(outcome="malformed").inc()
            self.reply(command, ok=False, error="bad_command")
            return
        self._deliver(command)


def _deadline(properties: dict[str, Any]) -> float:
    """When a command must no longer reach its device, on our monotonic clock.

    RabbitMQ does not say how long a message sat in the queue; when the sender
    stamped `timestamp` (seconds) we count from there, else from now.
    """
    ttl = DEFAULT_COMMAND_TTL
    expiration = properties.get("expiration")
    if expiration:
        try:
            ttl = max(0.0, float(expiration) / 1000)
        except ValueError:
            pass
    sent = properties.get("timestamp")
    waited = 0.0
    if isinstance(sent, (int, float)):
        waited = max(0.0, time.time() - float(sent))
    elif hasattr(sent, "timestamp"):
        waited = max(0.0, time.time() - sent.timestamp())
    return time.monotonic() + ttl - waited
