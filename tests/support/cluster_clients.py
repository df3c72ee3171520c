"""Clients and checks for the cluster tests (tests/test_cluster.py); no tests here.

Backends' queues (EventQueue), devices served by a greenlet of their own (HeldDevice),
commands sent round after round (CommandRounds), and what the tests read off an
instance: its connections to a node, the answers to its events, whether it crashed.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import Any

import gevent
import orjson
import psutil
from kombu import Connection

from bench.rabbit_cluster import Node
from clients.backend import EVENTS, BackendClient
from clients.device import Closed, DeviceClient
from support.fault_devices import read_until_closed, send_event, unique
from support.gateways import Gateway
from support.waiting import wait_until


def assert_no_crash(gateway: Gateway) -> None:
    """No worker died, hung or logged a traceback, whatever the nodes went through."""
    log = gateway.log()
    assert log.count("Booting worker") == int(gateway.env["WEB_CONCURRENCY"]), f"a worker restarted:\n{log[-4000:]}"
    for marker in ("Traceback", "CRITICAL", "WORKER TIMEOUT"):
        assert marker not in log, f"{marker!r} in {gateway.log_path}:\n{log[-4000:]}"


class EventQueue:
    """A durable queue bound to devices.events, as a backend declares one: classic (on the node
    `url` names first), or quorum (a member on every node, its leader on that node)."""

    def __init__(self, url: str, bindings: list[str], quorum: bool = False) -> None:
        self.url, self.name = url, unique("cluster-q")
        self.received: list[dict[str, Any]] = []
        with Connection(url, connect_timeout=5) as connection:
            channel = connection.channel()
            EVENTS(channel).declare()
            channel.queue_declare(self.name, durable=True, auto_delete=False,
                                  arguments={"x-queue-type": "quorum"} if quorum else None)
            for binding in bindings:
                channel.queue_bind(self.name, EVENTS.name, routing_key=binding)

    def drain(self) -> list[dict[str, Any]]:
        """Take out what is in the queue now; return everything taken so far."""
        with Connection(self.url, connect_timeout=5) as connection:  # fresh: nodes come and go
            channel = connection.channel()
            while (message := channel.basic_get(self.name, no_ack=True)) is not None:
                self.received.append(orjson.loads(message.body))
        return self.received

    def wait_for(self, **fields: Any) -> dict[str, Any]:
        def arrived() -> dict[str, Any] | None:
            return next((body for body in self.drain() if fields.items() <= body.items()), None)

        arrived.__name__ = f"a message with {fields} in {self.name}"
        return wait_until(arrived, timeout=20, interval=0.1)

    def ids(self) -> set[str]:
        return {body["id"] for body in self.drain()}

    def delete(self) -> None:
        with contextlib.suppress(Exception), Connection(self.url, connect_timeout=5) as connection:
            connection.channel().queue_delete(self.name)


class HeldDevice:
    """A session served by a greenlet of its own, as a real device would serve it: it answers
    every command, sends an event every `every` seconds, and keeps a record of it all."""

    def __init__(self, client: DeviceClient, every: float = 0.1) -> None:
        self.client, self.device, self.every = client, client.device, every
        self.commands: list[str] = []  # ids of the commands delivered
        self.acked: list[str] = []
        self.nacked: Counter[str] = Counter()  # by reason
        self.errors: list[dict[str, Any]] = []
        self.closed: str | None = None
        self._serving = True
        self._greenlet = gevent.spawn(self._serve)

    def _serve(self) -> None:
        next_event, sent = time.monotonic(), 0
        while self._serving:
            if time.monotonic() >= next_event:
                sent += 1
                self.client.send({"type": "event", "id": f"{self.device}-{sent}", "name": "door.opened"})
                next_event = time.monotonic() + self.every
            try:
                frame = self.client.receive(timeout=max(0.01, next_event - time.monotonic()))
            except TimeoutError:
                continue
            except (Closed, ConnectionError) as exc:
                self.closed = str(exc)
                return
            self._handle(frame)

    def _handle(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "command":
            self.commands.append(frame["id"])
            self.client.send({"type": "reply", "id": frame["id"], "ok": True, "data": {"done": frame["name"]}})
        elif frame["type"] == "ack":
            self.acked.append(frame["id"])
        elif frame["type"] == "nack":
            self.nacked[frame["reason"]] += 1
        elif frame["type"] == "error":
            self.errors.append(frame)

    def stop(self) -> None:
        """Stop serving (the session stays open), after reading what was already on its way."""
        self._serving = False  # not kill(): a frame half written would break the session
        self._greenlet.join(5)
        with contextlib.suppress(TimeoutError):
            while True:
                self._handle(self.client.receive(timeout=1))


class CommandRounds:
    """A command to every device, round after round, from a greenlet, each round recorded as
    (began, ended, devices that answered within a second): commands flow whatever the test does."""

    def __init__(self, backend: BackendClient, devices: list[HeldDevice]) -> None:
        self.backend, self.devices = backend, devices
        self.rounds: list[tuple[float, float, int]] = []
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            began = time.monotonic()
            # Each command may wait 5 s in the gateway (its expiration); we wait 1 s for its reply.
            ids = [self.backend.send(device.device, "unlock", timeout=5) for device in self.devices]
            answered = 0
            for command_id in ids:
                with contextlib.suppress(TimeoutError):
                    remaining = max(0.05, began + 1 - time.monotonic())
                    answered += self.backend.wait(command_id, remaining)["ok"] is True
            self.rounds.append((began, time.monotonic(), answered))

    def all_answered_since(self, moment: float) -> bool:
        return any(began >= moment and answered == len(self.devices) for began, _, answered in self.rounds)

    def short(self) -> list[int]:
        return [answered for _, _, answered in self.rounds if answered < len(self.devices)]

    def recovered_at(self) -> float:
        """When every device answered again: the end of the first round begun after the last short one."""
        last_short = max((ended for _, ended, answered in self.rounds if answered < len(self.devices)), default=0)
        return next(ended for began, ended, _ in self.rounds if began >= last_short)

    def stop(self) -> None:
        self._greenlet.kill()


def instance_ports(gateway: Gateway, node: Node) -> set[int]:
    """Local ports of the instance's connections to `node` (the peer ports the node sees)."""
    return {conn.laddr.port for pid in gateway.worker_pids() for conn in psutil.Process(pid).net_connections("tcp")
            if conn.raddr and conn.raddr.port == node.port and conn.status == psutil.CONN_ESTABLISHED}


def events_until_acked(client: DeviceClient, prefix: str, timeout: float = 60) -> list[dict[str, Any]]:
    """Events until one is acked, for `timeout` seconds at most; every answer (the caller judges them)."""
    answers: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (answers and answers[-1]["type"] == "ack"):
        answers.append(send_event(client, f"{prefix}-{len(answers)}"))
        gevent.sleep(0.1 if answers[-1]["type"] == "nack" else 0)
    return answers


def acked(answers: list[dict[str, Any]]) -> list[str]:
    return [answer["id"] for answer in answers if answer["type"] == "ack"]


def was_replaced(client: DeviceClient) -> bool:
    """Whether the server has told this session `replaced` and closed it (not waiting if not)."""
    try:
        frame = client.receive(timeout=0.05)
    except TimeoutError:
        return False
    assert frame["type"] == "error" and frame["code"] == "replaced", frame
    read_until_closed(client, timeout=10)
    return True
