"""The fault tests' devices (tests/test_faults_*.py, and the cluster tests): welcomed JSON sessions, frames read until
one matches, events and command round trips, and raw TCP sessions opened in bulk or dropped with an RST.

Every fault test runs real gunicorn (support.gateways.launch: start_gateway with short timeouts, also when
the gateway must start without RabbitMQ) against the real RabbitMQ. Faults are injected from outside only:
rabbitmqctl, signals, sockets, PYTHONPATH (support.rabbitmq holds the RabbitMQ side).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psutil
import requests

from clients.backend import BackendClient
from clients.device import Closed, DeviceClient
from support.gateways import SECRET, Gateway


def unique(prefix: str = "fx") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def connect(url: str, device: str, timeout: float = 10.0) -> DeviceClient:
    """A welcomed device session (fails the test otherwise)."""
    client = DeviceClient(url, timeout=timeout)
    welcome = client.hello(device, SECRET)
    assert welcome.get("type") == "welcome", welcome
    client.session = welcome["session"]
    client.device = device
    return client


def expect(client: DeviceClient, predicate: Callable[[dict], bool], timeout: float = 10.0,
           seen: list | None = None) -> dict:
    """Read frames until one satisfies predicate; others go to `seen`."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no matching frame within {timeout}s; saw {seen}")
        frame = client.receive(timeout=remaining)
        if predicate(frame):
            return frame
        if seen is not None:
            seen.append(frame)


def ping(client: DeviceClient, timeout: float = 10.0) -> None:
    client.send({"type": "ping"})
    expect(client, lambda f: f.get("type") == "pong", timeout)


def send_event(client: DeviceClient, event_id: str, name: str = "door.opened",
               timeout: float = 15.0) -> dict:
    """Send an event; return its ack or nack."""
    client.send({"type": "event", "id": event_id, "name": name, "data": {"n": event_id}})
    return expect(client, lambda f: f.get("type") in {"ack", "nack"} and f.get("id") == event_id, timeout)


def command_roundtrip(backend: BackendClient, client: DeviceClient, timeout: float = 10.0) -> dict:
    """A command through RabbitMQ (BackendClient) to `client`, answered by it; the reply."""
    command_id = backend.send(client.device, "unlock", {"via": "amqp"}, timeout=timeout)
    frame = expect(client, lambda f: f.get("type") == "command", timeout)
    assert frame["id"] == command_id
    client.send({"type": "reply", "id": frame["id"], "ok": True, "data": {"done": True}})
    return backend.wait(command_id, timeout)


def http_roundtrip(gateway: Gateway, client: DeviceClient, timeout: float = 10.0) -> requests.Response:
    """A command through the HTTP API to `client`, answered by it; the HTTP response."""
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "response", gateway.command(client.device, "unlock", timeout=timeout)))
    thread.start()
    try:
        frame = expect(client, lambda f: f.get("type") == "command", timeout + 2)
        client.send({"type": "reply", "id": frame["id"], "ok": True, "data": {"done": True}})
    finally:
        thread.join(timeout + 15)
    return result["response"]


def worker_of(gateway: Gateway, clients: list[DeviceClient]) -> dict[int, list[DeviceClient]]:
    """Which worker pid holds each client's connection (matched by the client's local port)."""
    by_port = {client.sock.getsockname()[1]: client for client in clients}
    held: dict[int, list[DeviceClient]] = {}
    for pid in gateway.worker_pids():
        for conn in psutil.Process(pid).net_connections("tcp"):
            if conn.raddr and conn.raddr.port in by_port and conn.laddr.port in (gateway.port,
                                                                                  gateway.device_port):
                held.setdefault(pid, []).append(by_port[conn.raddr.port])
    return held


class CommandFlow:
    """Commands to `clients` in turn, one every `interval`, through a backend connection of its own, while
    each client answers every command it gets in a thread of its own; until `stop`, which waits for every
    reply. Meanwhile the clients' frames are the flow's: read them again only after `stop`."""

    def __init__(self, backend: BackendClient, clients: list[DeviceClient], interval: float = 0.02) -> None:
        self.backend, self.clients, self.interval = backend, clients, interval
        self.sent: list[str] = []  # command ids, in order
        self.delivered: list[str] = []  # the command ids the clients got, as often as they got them
        self._stop_sending, self._stop_answering = threading.Event(), threading.Event()
        self._threads = [threading.Thread(target=self._answer, args=(client,), daemon=True) for client in clients]
        self._threads.append(threading.Thread(target=self._send, daemon=True))
        for thread in self._threads:
            thread.start()

    def _send(self) -> None:
        """Send on time, reading replies in between (unread, they would fill the connection's buffers)."""
        due = time.monotonic()
        while not self._stop_sending.is_set():
            if time.monotonic() >= due:
                client = self.clients[len(self.sent) % len(self.clients)]
                self.sent.append(self.backend.send(client.device, "unlock", timeout=10))
                due += self.interval
            try:
                self.backend.connection.drain_events(timeout=max(0.001, due - time.monotonic()))
            except TimeoutError:
                pass

    def _answer(self, client: DeviceClient) -> None:
        while not self._stop_answering.is_set():
            try:
                frame = client.receive(timeout=0.2)
            except TimeoutError:
                continue
            except (Closed, OSError):  # its session ended: its commands go unanswered, which `stop` shows
                return
            if frame.get("type") == "command":
                self.delivered.append(frame["id"])
                client.send({"type": "reply", "id": frame["id"], "ok": True, "data": None})

    def stop(self) -> list[dict]:
        """Stop sending; every command's reply, in the order sent (the clients answer until they are in)."""
        self._stop_sending.set()
        self._threads[-1].join(10)
        replies = []
        for command_id in self.sent:
            try:
                replies.append(self.backend.wait(command_id, timeout=15))
            except TimeoutError:
                replies.append({"id": command_id, "ok": False, "error": "no reply"})
        self.close()
        return replies

    def close(self) -> None:
        """Stop sending and answering at once (a test that failed half way)."""
        self._stop_sending.set()
        self._stop_answering.set()
        for thread in self._threads:
            thread.join(10)


def is_closed(client: DeviceClient, timeout: float = 5.0) -> bool:
    """True when the server closed the connection (after whatever frames it sent first)."""
    try:
        while True:
            client.receive(timeout=timeout)
    except (Closed, ConnectionError):
        return True
    except TimeoutError:
        return False


def read_until_closed(client: DeviceClient, timeout: float = 15.0) -> list[dict]:
    """Every frame until the server closes the connection (TimeoutError if it does not).

    DeviceClient raises Closed as soon as it parses a WebSocket close, possibly with
    frames of the same read still buffered: those are collected too.
    """
    frames: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            frames.append(client.receive(timeout=max(0.1, deadline - time.monotonic())))
    except (Closed, ConnectionError):
        frames += client._frames
        client._frames = []
    return frames


def hello_line(device: str) -> bytes:
    import orjson

    from app import auth

    return orjson.dumps({"type": "hello", "device": device, "token": auth.mint(SECRET.encode(), device),
                         "v": 1}) + b"\n"


def read_line(sock: socket.socket, timeout: float = 30.0) -> dict:
    """One newline-delimited frame from a raw TCP device socket."""
    import orjson

    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise Closed("the server closed the connection")
        data += chunk
    return orjson.loads(data)


def bulk_sessions(gateway: Gateway, devices: list[str], timeout: float = 60.0) -> list[socket.socket]:
    """Many welcomed TCP sessions, cheaply: raw sockets, every hello sent before any welcome is read."""
    socks = []
    for device in devices:
        sock = socket.create_connection(("127.0.0.1", gateway.device_port), timeout=timeout)
        sock.sendall(hello_line(device))
        socks.append(sock)
    for sock in socks:
        frame = read_line(sock, timeout)
        assert frame.get("type") == "welcome", frame
    return socks


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0): the way a NAT or a crash drops a device."""
    import struct

    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
