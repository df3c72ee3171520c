"""Thousands of JSON devices in the test process, and a backend that commands them, for the routing tests
(tests/test_routing.py): who got which command on which session, who answered, when each was welcomed.

`Swarm` devices answer every command at once and record its delivery (device, session, when); a device
may hold several connections at a time (a takeover: the new hello while the old connection is still up).
`CommandingBackend` publishes commands (a steady flow, and one to each device as soon as its
`session.connected` arrives, as a backend reacting to presence would) and counts the answers per command.
Times are this process's monotonic clock, so that a delivery, a welcome and a publish compare.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import random
import time
from collections import Counter, defaultdict
from typing import Any

import amqp
import gevent
import orjson
from gevent import socket
from gevent.queue import Queue

from support.gateways import SECRET
from support.rabbitmq import AMQP_HOST


def token(device: str, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), device.encode(), hashlib.sha256).hexdigest()


class Swarm:
    """Devices on one gateway's DEVICE_PORT, each connection served by a greenlet of its own."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.address = (host, port)
        self.deliveries: dict[str, list[tuple[str, str, float]]] = defaultdict(list)  # command id -> ...
        self.welcomes: dict[str, list[tuple[str, float]]] = defaultdict(list)  # device -> (session, when)
        self.errors: Counter[str] = Counter()
        self.sockets: list[socket.socket] = []

    def connect(self, device: str, attempts: int = 20) -> str:
        """A welcomed session of `device` (trying again after `overloaded`); its session id."""
        for _ in range(attempts):
            sock = socket.create_connection(self.address, timeout=30)
            sock.sendall(orjson.dumps({"type": "hello", "device": device, "token": token(device)}) + b"\n")
            reader = sock.makefile("rb")
            frame = orjson.loads(reader.readline())
            if frame.get("type") == "welcome":
                self.welcomes[device].append((frame["session"], time.monotonic()))
                self.sockets.append(sock)
                gevent.spawn(self._serve, sock, reader, device, frame["session"])
                return frame["session"]
            self.errors[frame.get("code", "?")] += 1
            sock.close()
            gevent.sleep(frame.get("retry_after", 0.5) / 10)
        raise AssertionError(f"{device} was never welcomed ({dict(self.errors)})")

    def connect_all(self, devices: list[str], concurrency: int = 200) -> None:
        pool = gevent.pool.Pool(concurrency)
        for device in devices:
            pool.spawn(self.connect, device)
        pool.join(raise_error=True)

    def _serve(self, sock: socket.socket, reader: Any, device: str, session: str) -> None:
        try:
            for line in reader:
                frame = orjson.loads(line)
                if frame.get("type") == "command":
                    self.deliveries[frame["id"]].append((device, session, time.monotonic()))
                    sock.sendall(orjson.dumps({"type": "reply", "id": frame["id"], "ok": True, "data": session})
                                 + b"\n")
                elif frame.get("type") == "error":
                    self.errors[frame["code"]] += 1
        except OSError:
            pass
        finally:
            sock.close()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class CommandingBackend:
    """Commands devices through RabbitMQ and counts every answer to each (device replies and `offline`)."""

    def __init__(self, presence_devices: set[str]) -> None:
        self.published: dict[str, tuple[str, float]] = {}  # command id -> (device, when)
        self.answers: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._ids = itertools.count()
        self._outbox: Queue = Queue()
        self._presence_devices = presence_devices
        self._listener = amqp.Connection(AMQP_HOST, userid="guest", password="guest")
        self._listener.connect()
        channel = self._listener.channel()
        self.reply_queue, _, _ = channel.queue_declare("", exclusive=True)
        presence, _, _ = channel.queue_declare("", exclusive=True)
        channel.queue_bind(presence, "devices.events", routing_key="*.session.connected")
        channel.basic_consume(self.reply_queue, no_ack=True, callback=self._on_answer)
        channel.basic_consume(presence, no_ack=True, callback=self._on_presence)
        self._sender = amqp.Connection(AMQP_HOST, userid="guest", password="guest")
        self._sender.connect()
        self._send_channel = self._sender.channel()
        self._greenlets = [gevent.spawn(self._listen), gevent.spawn(self._send)]
        self._flow: gevent.Greenlet | None = None

    def command(self, device: str) -> None:
        self._outbox.put(device)

    def flow(self, devices: list[str], rate: float) -> None:
        """A steady flow of commands to random devices, until `stop_flow`."""
        def run() -> None:
            while True:
                self.command(random.choice(devices))
                gevent.sleep(1 / rate)
        self._flow = gevent.spawn(run)

    def stop_flow(self) -> None:
        if self._flow is not None:
            self._flow.kill()

    def settle(self, timeout: float) -> None:
        """Wait until every command published has an answer, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self._outbox.qsize() or
                                               any(cid not in self.answers for cid in self.published)):
            gevent.sleep(0.2)

    def close(self) -> None:
        self.stop_flow()
        gevent.killall(self._greenlets)
        for connection in (self._listener, self._sender):
            connection.collect()

    def _send(self) -> None:
        while True:
            device = self._outbox.get()
            command_id = f"{device}.{next(self._ids)}"
            message = amqp.Message(orjson.dumps({"name": "probe", "data": None}), message_id=command_id,
                                   correlation_id=command_id, reply_to=self.reply_queue, expiration="60000",
                                   content_type="application/json")
            self.published[command_id] = (device, time.monotonic())
            self._send_channel.basic_publish(message, exchange="devices.commands", routing_key=device,
                                             mandatory=True)

    def _listen(self) -> None:
        while True:
            try:
                self._listener.drain_events(timeout=1)
            except TimeoutError:
                pass

    def _on_answer(self, message: amqp.Message) -> None:
        self.answers[message.properties.get("correlation_id", "")].append(orjson.loads(message.body))

    def _on_presence(self, message: amqp.Message) -> None:
        device = orjson.loads(message.body)["device"]
        if device in self._presence_devices:
            self.command(device)
