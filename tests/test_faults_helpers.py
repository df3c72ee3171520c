"""Helpers shared by the fault tests (tests/test_faults_*.py); no tests here.

Every fault test runs real gunicorn (conftest.start_gateway, or `launch` below
when the gateway must start without RabbitMQ) against the real RabbitMQ. Faults
are injected from outside only: rabbitmqctl, signals, sockets, PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import requests
from conftest import AMQP_URL, SECRET, Gateway, metric_value, start_gateway, wait_until
from kombu import Connection

from clients.backend import EVENTS, BackendClient
from clients.device import Closed, DeviceClient

AMQP_PORT = 5672


def unique(prefix: str = "fx") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# -- gateways ----------------------------------------------------------------------
def launch(tmp_path: Path, workers: int = 2, wait: bool = True, **env_overrides: str) -> Gateway:
    """conftest.start_gateway with the fault tests' short hello timeout and generous rate limit."""
    env = {"HELLO_TIMEOUT": "2", "EVENT_RATE": "1000", "EVENT_BURST": "1000", **env_overrides}
    return start_gateway(tmp_path, workers, wait=wait, **env)


def get(gateway: Gateway, path: str, timeout: float = 5) -> requests.Response:
    return requests.get(f"{gateway.http}{path}", timeout=timeout)


def metrics(gateway: Gateway) -> str:
    return get(gateway, "/metrics").text


def metric(gateway: Gateway, name: str) -> float:
    return metric_value(metrics(gateway), name)


def readyz_codes(gateway: Gateway, tries: int = 6) -> set[int]:
    """Status codes of a few /readyz requests (any worker may answer each)."""
    codes = set()
    for _ in range(tries):
        try:
            codes.add(get(gateway, "/readyz", timeout=3).status_code)
        except requests.RequestException:
            codes.add(0)
    return codes


def all_ready(gateway: Gateway, workers: int) -> bool:
    """Every worker has both RabbitMQ links up (the instance-wide gauge)."""
    text = metrics(gateway)
    return (metric_value(text, 'warren_broker_connected{link="consumer"}') >= workers
            and metric_value(text, 'warren_broker_connected{link="publisher"}') >= workers)


def kill_tree(gateway: Gateway) -> None:
    """SIGKILL the master and its workers at once (a host that dies)."""
    pids = [gateway.process.pid, *gateway.worker_pids()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    gateway.process.wait(10)
    for pid in pids[1:]:
        wait_until(lambda pid=pid: not psutil.pid_exists(pid) or
                   psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, timeout=10)


# -- RabbitMQ from outside -------------------------------------------------------------
def rabbitmqctl(*args: str, check: bool = True, timeout: float = 120) -> str:
    out = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout,
                         check=False)
    if check and out.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {out.stdout}{out.stderr}")
    return out.stdout


def amqp_connection_names(pids: list[int]) -> list[str]:
    """RabbitMQ's names of the AMQP connections these processes hold."""
    names = []
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections("tcp")
        except psutil.NoSuchProcess:
            continue
        for conn in connections:
            if conn.raddr and conn.raddr.port == AMQP_PORT and conn.status == psutil.CONN_ESTABLISHED:
                names.append(f"{conn.laddr.ip}:{conn.laddr.port} -> {conn.raddr.ip}:{conn.raddr.port}")
    return names


def close_connections(pids: list[int], reason: str = "test") -> list[str]:
    """Close these processes' AMQP connections from the broker side (`rabbitmqctl close_connection`).

    Only the gateway's own connections: other tests on this RabbitMQ are left alone.
    """
    names = set(amqp_connection_names(pids))
    by_name = {}
    for line in rabbitmqctl("list_connections", "-q", "--no-table-headers", "pid", "name").splitlines():
        pid, _, name = line.partition("\t")
        by_name[name.strip()] = pid.strip()
    targets = [by_name[name] for name in names if name in by_name]
    procs = [subprocess.Popen(["rabbitmqctl", "close_connection", pid, reason],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in targets]
    for proc in procs:
        proc.wait(60)
    return targets


class DurableQueue:
    """A durable, non-exclusive queue bound to devices.events (deleted by `delete`)."""

    def __init__(self, *bindings: str) -> None:
        self.name = unique("faults-q")
        self.connection = Connection(AMQP_URL, connect_timeout=5)
        channel = self.connection.channel()
        EVENTS(channel).declare()
        channel.queue_declare(self.name, durable=True, exclusive=False, auto_delete=False)
        for binding in bindings:
            channel.queue_bind(self.name, EVENTS.name, routing_key=binding)
        channel.close()

    def drain(self) -> list[dict[str, Any]]:
        """Every message now in the queue (taken out), as decoded bodies."""
        import orjson

        connection = Connection(AMQP_URL, connect_timeout=5)  # fresh: the broker may have restarted
        channel = connection.channel()
        bodies = []
        try:
            while True:
                message = channel.basic_get(self.name, no_ack=True)
                if message is None:
                    return bodies
                bodies.append(orjson.loads(message.body))
        finally:
            connection.release()

    def delete(self) -> None:
        """Best effort in teardown: the broker may be gone, and the connection with it."""
        with contextlib.suppress(Exception):
            connection = Connection(AMQP_URL, connect_timeout=5)
            connection.channel().queue_delete(self.name)
            connection.release()
        with contextlib.suppress(Exception):
            self.connection.release()


# -- devices ---------------------------------------------------------------------------
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


class Blackhole:
    """A TCP proxy to RabbitMQ that can partition the network: while `partitioned`, bytes
    are held (neither forwarded nor refused) and new connections hang after accept, as
    when a firewall or a broken route drops packets. `heal()` drops the connections that
    lived through the partition (as the TCP stacks would) and forwards again."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", AMQP_PORT)) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.partitioned = False
        self.generation = 0
        self.sockets: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            threading.Thread(target=self._open, args=(client,), daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        generation = self.generation
        while self.partitioned:
            time.sleep(0.05)
            if self.generation != generation or self.closed:
                return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self.sockets.append(upstream)
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst, self.generation), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, generation: int) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while self.partitioned and self.generation == generation:
                    time.sleep(0.05)
                if self.generation != generation:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.close()
            except OSError:
                pass

    def partition(self) -> None:
        self.partitioned = True

    def heal(self) -> None:
        self.generation += 1
        old, self.sockets = self.sockets, []
        self.partitioned = False
        for sock in old:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        self.heal()
        self.listener.close()
