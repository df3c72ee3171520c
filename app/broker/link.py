"""One kombu connection and channel, owned by exactly one reader and one writer greenlet.

Why a reader and a writer: a py-amqp connection is not safe for two greenlets at
once. Exactly one greenlet reads the socket and exactly one writes it; the writer
drains what any greenlet queued, without blocking them, and the reader's rare
protocol writes (close-ok) and the writer's sends take the same lock, so that no
two frames ever interleave on the socket. Sessions never touch a RabbitMQ socket.

Why batches: each writer pass takes everything queued since the last one, up to a
limit, and the wire (wires.py) sends it with one syscall.

Which broker: the wire, chosen for the node's URL on each connect (`wire_for`), is
RabbitMQ's or kombu's in-process `memory://` (what `make run` uses with no AMQP_URL);
everything here and in the links is the same for both.

A lost connection is not a crash: the link marks itself down, lets its owner fail
what was in flight, and reconnects with exponential backoff and full jitter. The
URL may list several nodes of one cluster separated by `;` (PROTOCOL.md section 7):
each worker starts at its own node (`node_offset`) and, when a node goes, moves to
the next in its own order, so that a node's loss moves only that node's share and
spreads it over the others. Only a bug (an exception nobody expected) ends `run`.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Iterator

import amqp.exceptions
import gevent
from gevent.event import Event
from kombu import Connection

from app import metrics
from app.broker.memory_wire import MemoryWire
from app.broker.wires import AmqpWire, ContentHandler, MethodHandler

log = logging.getLogger("warren.broker")

BACKOFF_FIRST, BACKOFF_MAX = 0.2, 10.0
CONNECT_TIMEOUT = 5.0
SETUP_TIMEOUT = 15.0
WRITE_BATCH = 1000  # items one writer pass takes before it lets the sessions run
TICK = 1.0  # seconds between the writer's periodic work (confirm timeouts, heartbeats)
# How long publishes may be nacked with no ack before the channel is replaced (`NackStreak`). Long enough
# that a nack or two in passing (a quorum queue electing its leader, a queue at its length limit) costs no
# reconnect; short enough that acks come again within a few seconds once the queue has a leader. While it
# has none, this reconnects every NACK_STREAK seconds: one connection and channel a worker, cheap for RabbitMQ.
NACK_STREAK = 2.0
HEARTBEATS_OFF = 20  # seconds: with AMQP_HEARTBEAT=0, TCP_USER_TIMEOUT is 2 x this, as with the default heartbeat

Wire = AmqpWire | MemoryWire


def socket_settings(heartbeat: int) -> dict[int, int]:
    """TCP options for a link's socket: how long RabbitMQ may leave what we sent unread.

    py-amqp sets TCP_USER_TIMEOUT to 1 s unless told otherwise, and the kernel then cuts a
    connection whose peer takes none of our bytes for that long (ETIMEDOUT). RabbitMQ does
    that on purpose, for longer, whenever its credit flow throttles a connection that
    publishes faster than its queues take (a stampede's presence events) or a node is merely
    busy: at 200,000 devices every few minutes a publisher lost its connection to it, and its
    sessions' events were nacked while it came back. A dead peer is what heartbeats find (two
    missed); the kernel's limit matches them, so a writer stuck on a dead host's full window
    gives up no earlier, and no later, than the heartbeats would."""
    if not hasattr(socket, "TCP_USER_TIMEOUT"):  # not Linux: no such option
        return {}
    return {socket.TCP_USER_TIMEOUT: 2 * (heartbeat or HEARTBEATS_OFF) * 1000}


def wire_for(url: str) -> type[Wire]:
    """The wire for a node's URL (config.py accepts amqp, amqps, pyamqp and memory)."""
    return MemoryWire if url.startswith("memory://") else AmqpWire


# Why a link went down: errors a network or a broker can cause. Anything else is a bug.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, socket.timeout, EOFError, amqp.exceptions.AMQPError)


class StuckChannel(ConnectionError):
    """The node works but our channel is stuck in a bad state: reconnect to the same node."""


class NackStreak:
    """RabbitMQ 3.10 nacks every later publish of a channel whose first publish to a quorum queue came
    while the queue had no leader (a node going down), even once it has one again, until the channel
    closes. A channel nacked for `limit` seconds with not one ack is dropped, with its connection,
    for a fresh one (`check`, from the link's tick, raises StuckChannel).

    `despite_acks`: also drop it once nacks have kept coming, with no pause of `limit`, for that long,
    acks or not. For a channel that publishes to several quorum queues (the routing's, to 16 partitions)
    whose leaders were spread over the nodes: the lost node's partitions nack for good while the others
    ack, and the first rule alone never fires (it took 5 s after a node's loss at 20,000 devices). Not
    for the publisher: a backend's queue at its length limit (`reject-publish`) nacks for as long as it
    is full, and reconnecting would not help it."""

    def __init__(self, limit: float = 0.0, despite_acks: float | None = None) -> None:
        self.limit = limit or NACK_STREAK
        self.despite_acks = despite_acks
        self.since: float | None = None  # the first nack since the last ack (monotonic)
        self.nacking_since: float | None = None  # the first nack of a run with no pause of `limit`
        self.last_nack = 0.0

    def acked(self) -> None:
        self.since = None

    def nacked(self) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
        if self.nacking_since is None or now - self.last_nack >= self.limit:
            self.nacking_since = now
        self.last_nack = now

    def check(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.since is not None and now - self.since >= self.limit:
            raise StuckChannel(f"publishes nacked for {now - self.since:.0f}s with no ack: reconnecting "
                               f"for a fresh channel (a quorum queue's leaderless channel state)")
        if self.despite_acks is not None and self.nacking_since is not None and now - self.last_nack < self.limit \
                and now - self.nacking_since >= self.despite_acks:
            raise StuckChannel(f"publishes nacked without pause for {now - self.nacking_since:.0f}s: reconnecting "
                               f"for a fresh channel (some quorum queues' leaderless channel state)")


class StuckSetup(ConnectionError):
    """RabbitMQ took the connection but does not answer the setup's declares: try again later."""


def backoff_delays(first: float = BACKOFF_FIRST, maximum: float = BACKOFF_MAX) -> Iterator[float]:
    """Exponential backoff with full jitter (uniform up to a doubling ceiling), so that the
    workers a broker dropped together do not come back together."""
    ceiling = first
    while True:
        yield random.uniform(0.0, ceiling)
        ceiling = min(maximum, ceiling * 2)


def node_order(url: str, offset: int) -> list[str]:
    """The order in which a worker tries the `;`-separated nodes of `url`.

    Worker N starts at node N mod len(nodes); the rest follow in an order rotated by
    N // len(nodes), so that the workers sharing a node fail over to different ones.
    """
    nodes = [node.strip() for node in url.split(";") if node.strip()]
    if not nodes:
        raise ValueError("no RabbitMQ URL")
    start = offset % len(nodes)
    rest = nodes[start + 1:] + nodes[:start]
    if rest:
        shift = (offset // len(nodes)) % len(rest)
        rest = rest[shift:] + rest[:shift]
    return [nodes[start], *rest]


class Link:
    """A connection with its reader and writer; subclasses say what flows over it.

    Hooks: `setup` declares after each connect; `write` writes what is due in one
    writer pass; `tick` runs about once a second in the writer; `on_lost` fails
    what was in flight once the connection is gone. Inbound frames of our channels
    go to `methods` and `contents` (by method signature, see frames.py); RabbitMQ's
    resource alarms to `on_blocked` and `on_unblocked`.
    """

    role = "link"

    def __init__(self, url: str, *, heartbeat: int = 20, node_offset: int = 0) -> None:
        self.nodes = node_order(url, node_offset)
        self.heartbeat = heartbeat  # kombu's memory:// ignores it (and its wire sends none)
        self.connected = False
        # Until the first connect has succeeded or failed, RabbitMQ is not known to be away: it is the
        # worker starting, and what waits for the link (a hello's route) should wait, not give up on it.
        self.starting = True
        self.blocked = False  # RabbitMQ stopped reading from this connection (a resource alarm)
        self.methods: dict[bytes, MethodHandler] = {}
        self.contents: dict[bytes, ContentHandler] = {}
        self._wakeup = Event()
        self._tick_due = False

    def wake(self) -> None:
        """Ask for a writer pass. It runs at the hub's next turn, so what others queue until then joins it."""
        self._wakeup.set()

    # -- the link's own greenlet ------------------------------------------------------------
    def run(self) -> None:
        """Connect, serve, and reconnect forever; return only when killed."""
        delays = backoff_delays()
        node = 0
        while True:
            try:
                connection, wire = self._connect(self.nodes[node])
            except CONNECTION_ERRORS as exc:
                self.starting = False
                node = (node + 1) % len(self.nodes)
                delay = next(delays)
                log.warning("%s: cannot reach RabbitMQ (%s); retrying in %.1fs", self.role, exc, delay)
                gevent.sleep(delay)
                continue
            delays = backoff_delays()
            suspect = True  # the node that dropped us: try the next first
            try:
                self._serve(wire)
            except CONNECTION_ERRORS as exc:
                log.warning("%s: lost RabbitMQ (%s)", self.role, exc)
                suspect = not isinstance(exc, StuckChannel)
            finally:
                self._teardown(connection)
            if suspect:
                node = (node + 1) % len(self.nodes)
            gevent.sleep(next(delays))

    def _connect(self, url: str) -> tuple[Connection, Wire]:
        started = time.monotonic()
        # The polling interval is memory://'s (how often its reader looks for messages); AMQP ignores it.
        connection = Connection(url, heartbeat=self.heartbeat, connect_timeout=CONNECT_TIMEOUT,
                                transport_options={"polling_interval": 0.005,
                                                   "socket_settings": socket_settings(self.heartbeat)})
        # Not `connect()`, which tries again itself after 2 s: a dead node would hold up the failover.
        connection.ensure_connection(max_retries=0, reraise_as_library_errors=False)
        try:
            self.blocked = False
            wire = wire_for(url)(connection, connection.channel(), self)
            # Bounded: a declare RabbitMQ cannot answer (a quorum queue without its majority) would hold
            # the link here for good, neither connected nor retrying.
            with gevent.Timeout(SETUP_TIMEOUT, StuckSetup(f"no answer to the setup within {SETUP_TIMEOUT:g}s")):
                self.setup(wire)
        except BaseException:
            # Connected, but the setup failed (a declare refused, the broker closing as it starts):
            # drop this connection, or each retry leaves one open at RabbitMQ until its heartbeat timeout.
            self._teardown(connection)
            raise
        self.connected, self.starting = True, False
        metrics.BROKER_CONNECTED.labels(link=self.role).set(1)
        # How long connecting and declaring took: seconds after a node's loss, while the survivors clean up.
        log.info("%s: connected to %s in %.2fs", self.role, wire.peer, time.monotonic() - started)
        return connection, wire

    def _serve(self, wire: Wire) -> None:
        reader = gevent.spawn(self._read, wire)
        reader.rawlink(self._reader_ended)
        ticker = gevent.get_hub().loop.timer(TICK, TICK)
        ticker.start(self._tick)
        self._wakeup.set()  # a first pass for what `setup` queued (the consumer's re-claims)
        try:
            self._write_forever(wire, reader)
        finally:
            ticker.close()
            reader.unlink(self._reader_ended)
            reader.kill(block=True)

    def _write_forever(self, wire: Wire, reader: gevent.Greenlet) -> None:
        wakeup = self._wakeup
        while True:
            wakeup.wait()
            wakeup.clear()
            if reader.dead:
                raise reader.exception or reader.value
            if self._write_pass(wire):
                wakeup.set()
                gevent.sleep(0)  # more is due: let the sessions and the reader run first

    def _write_pass(self, wire: Wire) -> bool:
        wire.collecting = True
        try:
            more = self.write(wire)
            if self._tick_due:
                self._tick_due = False
                self.tick(time.monotonic())
                wire.heartbeat()
        finally:
            wire.collecting = False
        wire.flush()
        return more

    def _read(self, wire: Wire) -> BaseException:
        """The reader greenlet: returns why the connection ended (a bug raises, and gevent reports it)."""
        try:
            wire.read_forever()
        except CONNECTION_ERRORS as exc:
            return exc

    def _reader_ended(self, _reader: gevent.Greenlet) -> None:
        self._wakeup.set()

    def _tick(self) -> None:
        self._tick_due = True
        self._wakeup.set()

    def _teardown(self, connection: Connection) -> None:
        self.connected = False
        metrics.BROKER_CONNECTED.labels(link=self.role).set(0)
        try:
            connection.collect()
        except Exception as exc:  # noqa: BLE001 - a dead connection may fail to clean up
            log.debug("%s: cleaning up the old connection failed: %r", self.role, exc)
        self.on_lost()

    def on_blocked(self, reason: str) -> None:
        """RabbitMQ stopped reading from this connection (a memory or disk alarm); in the reader."""
        log.warning("%s: RabbitMQ blocked this connection (%s)", self.role, reason)
        self.blocked = True

    def on_unblocked(self) -> None:
        log.info("%s: RabbitMQ unblocked this connection", self.role)
        self.blocked = False

    # -- hooks --------------------------------------------------------------------------------
    def setup(self, wire: Wire) -> None:
        """Declare and subscribe after each connect (synchronous: before the reader and writer start).

        `wire.channel` is the one the writer writes on; the wire opens any others (`channel_for`)."""

    def write(self, wire: Wire) -> bool:
        """Write what is due (at most WRITE_BATCH items); True when more is waiting."""
        return False

    def tick(self, now: float) -> None:
        """Periodic work in the writer, about once every TICK seconds."""

    def on_lost(self) -> None:
        """Fail what was in flight; called once the connection is gone."""
