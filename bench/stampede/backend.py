"""The backend side of a run: send commands to devices and check that acked events arrived.

Commands go through RabbitMQ (exchange `devices.commands`, mandatory, with
reply_to and expiration) or through the HTTP API; either way the round trip is
the time from sending to the reply reaching us. Events are consumed from our
own queue bound to `devices.events` with `#`, so "acked but never arrived" can
be counted (PROTOCOL.md section 5).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import amqp
import gevent
import gevent.event
import gevent.pool
import kombu
import orjson
import urllib3

COMMAND = orjson.dumps({"name": "unlock", "data": {}})
PACE_TICK = 0.01


Settled = tuple[float, str, str, float]
"""A command settled: (send time, device, outcome, when it settled), both times wall-clock."""


class CommandLog:
    """Outcomes of every command, (send time, round trip) of the ones a device answered, and a `Settled`
    of every one settled: the node-loss and worker-kill scenarios read recovery from those."""

    def __init__(self) -> None:
        self.sent = 0
        self.outcomes: Counter = Counter()
        self.samples: list[tuple[float, float]] = []
        self.settled: list[Settled] = []

    def answered(self, started: float, device: str) -> None:
        self.outcomes["ok"] += 1
        now, wall = time.monotonic(), time.time()
        sent = wall - (now - started)
        self.samples.append((sent, (now - started) * 1000))
        self.settled.append((sent, device, "ok", wall))

    def failed(self, started: float, device: str, outcome: str) -> None:
        """`started` is the monotonic send time, as for `answered`."""
        self.outcomes[outcome] += 1
        wall = time.time()
        self.settled.append((wall - (time.monotonic() - started), device, outcome, wall))


BROKER_ERRORS = (OSError, amqp.AMQPError, amqp.exceptions.RecoverableConnectionError)
RETRY_SECONDS = 1.0


class BrokerClient:
    """One RabbitMQ connection owned by one greenlet, reopened when the broker goes away.

    Only that greenlet reads or writes the socket: py-amqp is not safe to share
    between greenlets. `setup` declares what the subclass needs on a fresh
    channel; `tick` runs between reads (for example, to publish).
    """

    read_timeout = 1.0
    yields = False  # after every read (`serve`)

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection: kombu.Connection | None = None
        self.reconnects = 0
        self.blocked = 0
        self.ready = gevent.event.Event()
        self.greenlet = gevent.spawn(self.run_forever)
        if not self.ready.wait(10):
            self.greenlet.kill()
            raise ConnectionError(f"cannot reach RabbitMQ at {url} (or the gateway has not declared "
                                  "its exchanges yet)")

    def run_forever(self) -> None:
        while True:
            try:
                self.connection = kombu.Connection(self.url)
                self.connection.connect()
                self.connection.connection.on_blocked = self.on_blocked
                self.setup(self.connection.connection.channel())
                self.ready.set()
                self.serve()
            except BROKER_ERRORS:
                self.lost()
                if self.ready.is_set():
                    self.reconnects += 1
            gevent.sleep(RETRY_SECONDS)

    def serve(self) -> None:
        """Read and tick forever; a client that `yields` lets the controller's other greenlets run after every read.

        A read that finds its bytes already buffered never blocks, so it never yields: in a
        stampede the event verifier's 400,000 presence events kept the controller from
        sampling and from reading its load processes' reports for minutes (the gateway's
        timeline had gaps of 130 s where the floor's had none). The command client does not
        yield: a reply read late would be counted in the gateway's round trip (at 200,000
        devices and 1,000 commands/s, yielding put the tool's p50 at 676 ms where a quiet
        process measured 109 ms at the same time)."""
        while True:
            self.tick()
            try:
                self.connection.connection.drain_events(timeout=self.read_timeout)
            except TimeoutError:
                continue
            if self.yields:
                gevent.sleep(0)

    def setup(self, channel: amqp.Channel) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        """Work to do between two reads; nothing by default."""

    def lost(self) -> None:
        """The connection broke; nothing to do by default."""

    def on_blocked(self, _reason: str = "") -> None:
        """RabbitMQ raised a resource alarm and blocks publishers: figures taken now are suspect."""
        self.blocked += 1

    def close(self) -> None:
        self.greenlet.kill()
        if self.connection is not None:
            try:
                with gevent.Timeout(5):
                    self.connection.release()
            except (gevent.Timeout, *BROKER_ERRORS):
                pass


class AmqpCommands(BrokerClient):
    """Publishes commands like a backend service would, replies to a queue of our own."""

    read_timeout = PACE_TICK / 2  # publishing waits at most this long for the socket

    def __init__(self, url: str, timeout: float) -> None:
        self.timeout = timeout
        self.log = CommandLog()
        self.pending: dict[str, tuple[float, str]] = {}  # command id -> (monotonic send time, device)
        self.replied: set[str] = set()  # ids answered already: another reply to one is a second answer
        self.outbox: deque[str] = deque()
        self.next_expiry = 0.0
        super().__init__(url)

    def setup(self, channel: amqp.Channel) -> None:
        channel.exchange_declare("devices.commands", "direct", passive=True)
        self.reply_to, _, _ = channel.queue_declare("", exclusive=True, auto_delete=True)
        channel.basic_consume(self.reply_to, callback=self.on_reply, no_ack=True)
        channel.events["basic_return"].add(self.on_return)
        self.channel = channel

    def send(self, device: str) -> None:
        """Queue one command; the connection's greenlet publishes it within PACE_TICK / 2."""
        self.outbox.append(device)

    def tick(self) -> None:
        while self.outbox:
            self.publish(self.outbox.popleft())
        if time.monotonic() > self.next_expiry:
            self.expire()
            self.next_expiry = time.monotonic() + 1.0

    def publish(self, device: str) -> None:
        command_id = uuid.uuid4().hex
        message = amqp.Message(self.body(), content_type="application/json", message_id=command_id,
                               correlation_id=command_id, reply_to=self.reply_to,
                               expiration=str(int(self.timeout * 1000)))
        self.pending[command_id] = (time.monotonic(), device)
        self.log.sent += 1
        self.channel.basic_publish(message, exchange="devices.commands", routing_key=device,
                                   mandatory=True)

    def body(self) -> bytes:
        """A command's body (PROTOCOL.md section 5), the same for every command."""
        return COMMAND

    def lost(self) -> None:
        """Commands not yet published when the broker went away are counted, not silently dropped."""
        now = time.monotonic()
        while self.outbox:
            self.log.failed(now, self.outbox.popleft(), "not_sent_broker_down")

    def on_reply(self, message: amqp.Message) -> None:
        command_id = message.properties.get("correlation_id")
        sent = self.pending.pop(command_id, None)
        if sent is None:  # after its timeout, or a second answer to one answered (delivered twice)
            self.log.outcomes["answered_twice" if command_id in self.replied else "late_reply"] += 1
            return
        self.replied.add(command_id)
        reply = orjson.loads(message.body)
        if reply.get("ok"):
            self.log.answered(*sent)
        else:
            self.log.failed(*sent, f"failed:{reply.get('error')}")

    def on_return(self, _exc: Any, _exchange: str, _routing_key: str, message: amqp.Message) -> None:
        """RabbitMQ returned a mandatory command: no worker holds a route to that device."""
        sent = self.pending.pop(message.properties.get("correlation_id"), None)
        if sent is not None:
            self.log.failed(*sent, "returned_offline")

    def expire(self) -> None:
        """Count commands without any answer well after their expiration as timed out."""
        deadline = time.monotonic() - self.timeout - 2
        for command_id, sent in list(self.pending.items()):
            if sent[0] < deadline:
                del self.pending[command_id]
                self.log.failed(*sent, "timeout")


class HttpCommands:
    """Sends commands through `POST /devices/<id>/commands`, each in its own greenlet."""

    def __init__(self, base_url: str, token: str, timeout: float, concurrency: int = 256) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.body = orjson.dumps({"name": "unlock", "data": {}, "timeout": timeout})
        self.http = urllib3.PoolManager(maxsize=concurrency, timeout=timeout + 5, retries=False)
        self.greenlets = gevent.pool.Pool(concurrency)
        self.log = CommandLog()

    def send(self, device: str) -> None:
        if self.greenlets.full():
            self.log.outcomes["not_sent_too_many_in_flight"] += 1
            return
        self.log.sent += 1
        self.greenlets.spawn(self.post, device)

    def post(self, device: str) -> None:
        started = time.monotonic()
        try:
            response = self.http.request("POST", f"{self.base_url}/devices/{device}/commands",
                                         body=self.body, headers=self.headers)
        except urllib3.exceptions.HTTPError as exc:
            self.log.failed(started, device, f"http_error:{type(exc).__name__}")
            return
        if response.status == 200 and orjson.loads(response.data).get("ok"):
            self.log.answered(started, device)
        else:
            self.log.failed(started, device, f"http_{response.status}")

    def close(self) -> None:
        self.greenlets.join(timeout=10)
        self.http.clear()


class EventVerifier(BrokerClient):
    """Consumes everything on `devices.events` to check acked events and count presence.

    Our queue is exclusive, so it vanishes with a lost connection: after a
    reconnect (`reconnects` > 0) events published meanwhile are not seen, and
    `missing` may name events that did arrive in RabbitMQ.
    """

    yields = True  # a stampede's presence events come faster than we read them: others run between

    def __init__(self, url: str, device_prefix: str) -> None:
        self.device_prefix = device_prefix
        self.seen: set[str] = set()
        self.presence: Counter = Counter()
        super().__init__(url)

    def setup(self, channel: amqp.Channel) -> None:
        channel.exchange_declare("devices.events", "topic", passive=True)
        queue, _, _ = channel.queue_declare("", exclusive=True, auto_delete=True)
        channel.queue_bind(queue, "devices.events", "#")
        channel.basic_consume(queue, callback=self.on_event, no_ack=True)

    def on_event(self, message: amqp.Message) -> None:
        key = message.delivery_info.get("routing_key", "")
        if not key.startswith(self.device_prefix):
            return  # another user's device on a shared RabbitMQ
        if ".session." in key:
            self.presence[key.rsplit(".", 1)[-1]] += 1
        else:
            self.seen.add(device_event_id(orjson.loads(message.body)))

    def missing(self, acked_ids: list[str], wait: float = 10.0) -> list[str]:
        """Acked event ids not (yet) consumed, after waiting up to `wait` seconds for stragglers."""
        return unseen(self.seen, acked_ids, wait)


def unseen(seen: set[str], acked_ids: list[str], wait: float = 10.0) -> list[str]:
    """Acked event ids not (yet) in `seen` (the ids consumed, a set that consuming fills), after waiting up to
    `wait` seconds for stragglers."""
    deadline = time.monotonic() + wait
    missing = [event_id for event_id in acked_ids if event_id not in seen]
    while missing and time.monotonic() < deadline:
        gevent.sleep(0.5)
        missing = [event_id for event_id in missing if event_id not in seen]
    return missing


def device_event_id(body: dict[str, Any]) -> str | None:
    """The id the device gave an event: its own `id` (JSON devices), or the `ref` in its data (MQTT devices,
    whose events the gateway names itself, PROTOCOL.md section 8)."""
    data = body.get("data")
    if isinstance(data, dict) and "ref" in data:
        return data["ref"]
    return body.get("id")


def pace(rate: float, seconds: float, action: Callable[[], None]) -> None:
    """Call `action` `rate` times a second, evenly, for `seconds`."""
    started = time.monotonic()
    done = 0
    while (elapsed := time.monotonic() - started) < seconds:
        while done < int(elapsed * rate):
            action()
            done += 1
        gevent.sleep(PACE_TICK)
