"""A small backend client for Warren over RabbitMQ: send commands, wait for replies, read events.

What a backend service (or a test, or a person at a prompt) uses to talk to
devices without knowing where their connections live:

    with BackendClient("amqp://guest:guest@127.0.0.1:5672//") as backend:
        reply = backend.command("lock-0001", "unlock", {"for": 5}, timeout=5)
        where = backend.device_info("lock-0001")   # {"online": True, "host", "worker", ...}
        ended = backend.kick("lock-0001")          # the session id ended, or None if offline
        backend.ban("lock-0001", seconds=3600, reason="stolen")   # refused everywhere for an hour
        backend.bans(); backend.lift("lock-0001")
        for event in backend.events("lock-0001.#", timeout=10): ...

Commands are published mandatory to `devices.commands` with `reply_to` set to
RabbitMQ's direct reply-to pseudo-queue, so a device with no session anywhere
comes back at once as `offline` (PROTOCOL.md section 5). An operator's lookup or
kick travels the same way, as a message of type `warren.ask`, and the worker
holding the device answers it. Bans go where the gateway keeps them: its
deployment's ban stream (`BANS_STREAM`), read from the start like a worker reads it
and written with a publisher confirm. The client is blocking and single-threaded:
one connection, used by one caller.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any, Self

import amqp
import orjson
from kombu import Connection, Exchange

from app.broker.bans import STREAM_ARGUMENTS, ban_now, lift_now, mark_body
from app.broker.messages import BAN_TYPE, MARK_TYPE, ban_body, decode_ban
from app.sessions.bans import BanList

# The exchanges of PROTOCOL.md section 5, declared by backends as the gateway declares them.
EVENTS = Exchange("devices.events", type="topic", durable=True)
COMMANDS = Exchange("devices.commands", type="direct", durable=True)

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
ASK_TYPE = "warren.ask"  # an operator's question for the worker holding a device: {"kind": "info" | "kick"}
# After a worker said it binds the device but holds no session of it (the device is between
# sessions), how long to wait for another worker holding a newer session (a takeover) to answer.
NOT_HERE_GRACE = 0.5
BANS_STREAM = "warren.bans"  # the gateway's default BANS_STREAM


class BackendClient:
    def __init__(self, url: str) -> None:
        self.connection = Connection(url, connect_timeout=5)
        self.connection.connect()
        self.channel = self.connection.channel()
        self._replies: dict[str, dict[str, Any]] = {}
        self._answers: dict[str, list[dict[str, Any]]] = {}  # by question id, while it is asked
        self._returned: set[str] = set()
        self.channel.events["basic_return"].add(self._on_return)
        self.channel.basic_consume(DIRECT_REPLY_TO, no_ack=True, callback=self._on_reply)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.connection.release()

    # -- commands -------------------------------------------------------------------
    def send(self, device: str, name: str, data: Any = None, timeout: float = 5.0) -> str:
        """Publish a command without waiting; returns its id (also its correlation id)."""
        command_id = uuid.uuid4().hex
        message = self.channel.prepare_message(
            orjson.dumps({"name": name, "data": data}), content_type="application/json",
            properties={"message_id": command_id, "correlation_id": command_id,
                        "reply_to": DIRECT_REPLY_TO, "expiration": str(max(1, int(timeout * 1000))),
                        "timestamp": int(time.time())})
        self.channel.basic_publish(message, exchange=COMMANDS.name, routing_key=device, mandatory=True)
        return command_id

    def wait(self, command_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The device's reply `{"device","id","ok","data","error"}`; `offline` at once if nobody holds it.

        Raises TimeoutError when neither a reply nor a return comes within `timeout`.
        """
        deadline = time.monotonic() + timeout
        while command_id not in self._replies:
            if command_id in self._returned:
                self._returned.discard(command_id)
                return {"id": command_id, "ok": False, "data": None, "error": "offline"}
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply to command {command_id} within {timeout:g}s")
            try:
                self.connection.drain_events(timeout=min(remaining, 1.0))
            except TimeoutError:
                continue
        return self._replies.pop(command_id)

    def command(self, device: str, name: str, data: Any = None, timeout: float = 5.0) -> dict[str, Any]:
        """Send a command and wait for its reply."""
        return self.wait(self.send(device, name, data, timeout), timeout)

    def _on_reply(self, message: Any) -> None:
        correlation_id = message.properties.get("correlation_id")
        if correlation_id in self._answers:  # a question may have several answers: keep them all
            self._answers[correlation_id].append(orjson.loads(message.body))
        elif correlation_id:
            self._replies[correlation_id] = orjson.loads(message.body)

    def _on_return(self, exception: Any, exchange: str, routing_key: str, message: Any) -> None:
        self._returned.add(message.properties.get("correlation_id", ""))

    # -- operators ------------------------------------------------------------------
    def device_info(self, device: str, timeout: float = 5.0) -> dict[str, Any]:
        """`{"device","online":true,"session","transport","connected_at","worker","host"}` from the worker
        holding `device`, or `{"device","online":false}` when none does.

        Raises TimeoutError when a worker binds the device but none answers within `timeout`.
        """
        return self._ask(device, "info", timeout)

    def kick(self, device: str, timeout: float = 5.0) -> str | None:
        """End `device`'s session with error `kicked`, wherever it is: the session id ended, or None
        when the device has no session. Raises TimeoutError as `device_info` does."""
        return self._ask(device, "kick", timeout).get("ended")

    def _ask(self, device: str, kind: str, timeout: float) -> dict[str, Any]:
        """Publish a question as a command is published; the holder's answer, or offline.

        Every worker whose queue binds the device is asked. The one holding the session
        answers with `online` true; one that binds the device but holds no session of it now
        answers `online` false, which is final only if no holder answers within NOT_HERE_GRACE.
        """
        question_id = uuid.uuid4().hex
        offline = {"device": device, "online": False}
        self._answers[question_id] = answers = []
        try:
            message = self.channel.prepare_message(
                orjson.dumps({"kind": kind}), content_type="application/json",
                properties={"message_id": question_id, "correlation_id": question_id, "type": ASK_TYPE,
                            "reply_to": DIRECT_REPLY_TO, "expiration": str(max(1, int(timeout * 1000)))})
            self.channel.basic_publish(message, exchange=COMMANDS.name, routing_key=device, mandatory=True)
            deadline, not_here_until = time.monotonic() + timeout, None
            while True:
                held = next((answer for answer in answers if answer.get("online") is True), None)
                if held is not None:
                    return held
                if question_id in self._returned:
                    self._returned.discard(question_id)
                    return offline
                now = time.monotonic()
                if answers and not_here_until is None:
                    not_here_until = now + NOT_HERE_GRACE
                if not_here_until is not None and now >= not_here_until:
                    return offline
                if now >= deadline:
                    raise TimeoutError(f"no worker holding {device} answered within {timeout:g}s")
                self._drain(min(deadline, not_here_until or deadline) - now)
        finally:
            del self._answers[question_id]

    # -- bans (PROTOCOL.md section 6) ---------------------------------------------------
    def bans(self, stream: str = BANS_STREAM, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every ban in force, `{"device","until","reason","by"}` each, as the workers read them."""
        return [ban.public() for ban in self._read_bans(stream, timeout).in_force()]

    def ban(self, device: str, seconds: float | None = None, reason: str = "", stream: str = BANS_STREAM,
            timeout: float = 10.0) -> dict[str, Any]:
        """Ban `device` everywhere (its session ends, its hellos are refused) for `seconds` (None: until
        lifted); returns the ban once RabbitMQ confirmed it is stored."""
        record = ban_now(device, seconds, reason, "operator", after=self._read_bans(stream, timeout).latest(device))
        self._store(stream, ban_body(record))
        return record.public()

    def lift(self, device: str, stream: str = BANS_STREAM, timeout: float = 10.0) -> bool:
        """End `device`'s ban everywhere; False when no ban of it is in force."""
        current = self._read_bans(stream, timeout).banned(device)
        if current is None:
            return False
        self._store(stream, ban_body(lift_now(device, current)))
        return True

    def _read_bans(self, stream: str, timeout: float) -> BanList:
        """Replay the ban stream from its first record up to a marker of ours (then it is all read)."""
        bans, mark, seen = BanList(), mark_body(uuid.uuid4().hex), []
        channel = self.connection.connection.channel()  # py-amqp's: a stream consumer needs arguments and acks
        try:
            channel.queue_declare(stream, durable=True, auto_delete=False, arguments=STREAM_ARGUMENTS)
            channel.basic_qos(0, 1000, False)

            def read(message: amqp.Message) -> None:
                kind = message.properties.get("type")
                if kind == BAN_TYPE and (record := decode_ban(message.body)) is not None:
                    bans.apply(record)
                elif kind == MARK_TYPE and message.body == mark:
                    seen.append(True)
                channel.basic_ack(message.delivery_tag)

            channel.basic_consume(stream, callback=read, arguments={"x-stream-offset": "first"})
            channel.basic_publish(amqp.Message(mark, type=MARK_TYPE, content_type="application/json"),
                                  exchange="", routing_key=stream)
            deadline = time.monotonic() + timeout
            while not seen:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the ban stream {stream} was not read to its end within {timeout:g}s")
                self._drain(deadline - time.monotonic())
        finally:
            channel.close()
        return bans

    def _store(self, stream: str, body: bytes) -> None:
        """Publish a record to the ban stream and wait for RabbitMQ's confirm (raises if it refuses)."""
        channel = self.connection.connection.channel()
        try:
            channel.confirm_select()
            channel.basic_publish_confirm(amqp.Message(body, type=BAN_TYPE, content_type="application/json",
                                                       delivery_mode=2), exchange="", routing_key=stream,
                                          mandatory=True)
        finally:
            channel.close()

    def _drain(self, seconds: float) -> None:
        try:
            self.connection.drain_events(timeout=max(0.001, min(seconds, 1.0)))
        except TimeoutError:
            pass

    # -- events ---------------------------------------------------------------------
    def events(self, binding: str = "#", timeout: float = 10.0) -> Iterator[dict[str, Any]]:
        """Yield device events (and presence) matching a topic binding, until `timeout` of silence."""
        channel = self.connection.channel()
        try:
            queue, _, _ = channel.queue_declare(queue="", exclusive=True, auto_delete=True)
            channel.queue_bind(queue, EVENTS.name, routing_key=binding)
            received: list[dict[str, Any]] = []
            channel.basic_consume(queue, no_ack=True,
                                  callback=lambda message: received.append(orjson.loads(message.body)))
            while True:
                while received:
                    yield received.pop(0)
                try:
                    self.connection.drain_events(timeout=timeout)
                except TimeoutError:
                    return
        finally:
            channel.close()
