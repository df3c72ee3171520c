"""RabbitMQ from the tests' side: reading events off `devices.events` (EventTap, DurableQueue), asking whether a key
routes, publishing a command by hand, and faults injected from outside (rabbitmqctl, closing a gateway's connections,
a network partition in front of the broker).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from typing import Any, Self

import amqp
import orjson
import psutil
import pytest
from kombu import Connection

from bench.rabbit_cluster import ROUTES_POLICY
from clients.backend import EVENTS, BackendClient
from support.fault_devices import unique
from support.gateways import AMQP_URL
from support.waiting import WAIT

AMQP_HOST = AMQP_URL.split("@", 1)[1].split("/", 1)[0]  # host:port
AMQP_PORT = 5672
PRIVATE_VHOST = "warren-private-test"


class EventTap:
    """Our own exclusive queue on `devices.events`, bound before anything is published."""

    def __init__(self, *bindings: str, vhost: str = "/") -> None:
        self.connection = amqp.Connection(AMQP_HOST, userid="guest", password="guest", virtual_host=vhost)
        self.connection.connect()
        self.channel = self.connection.channel()
        self.queue, _, _ = self.channel.queue_declare(queue="", exclusive=True, auto_delete=True)
        for binding in bindings:
            self.channel.queue_bind(self.queue, "devices.events", routing_key=binding)

    def get(self, routing_key: str | None = None, timeout: float = WAIT) -> dict[str, Any]:
        """The next event (whose routing key is `routing_key`, skipping others)."""
        message = self.message(routing_key, timeout)
        body = orjson.loads(message.body)
        body["_routing_key"] = message.delivery_info["routing_key"]
        return body

    def message(self, routing_key: str | None = None, timeout: float = WAIT) -> amqp.Message:
        """The next event as it came, AMQP properties and all (whose routing key is `routing_key`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.channel.basic_get(self.queue, no_ack=True)
            if message is None:
                time.sleep(0.02)
                continue
            if routing_key is None or message.delivery_info["routing_key"] == routing_key:
                return message
        pytest.fail(f"no event {routing_key or ''} within {timeout}s")

    def close(self) -> None:
        with contextlib.suppress(Exception):  # best effort at teardown
            self.connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def routed(routing_key: str, vhost: str = "/") -> bool:
    """Would RabbitMQ route a message on devices.events with this key to some queue right now?"""
    connection = amqp.Connection(AMQP_HOST, userid="guest", password="guest", confirm_publish=True,
                                 virtual_host=vhost)
    connection.connect()
    try:
        channel = connection.channel()
        returned: list[str] = []
        channel.events["basic_return"].add(lambda *args: returned.append("returned"))
        channel.basic_publish(amqp.Message(b"{}"), exchange="devices.events", routing_key=routing_key,
                              mandatory=True)
        return not returned
    finally:
        connection.close()


def publish_command(backend: BackendClient, device: str, name: str, data: Any = None,
                    **properties: Any) -> None:
    """A command with exactly these AMQP properties (BackendClient.send picks its own)."""
    message = backend.channel.prepare_message(orjson.dumps({"name": name, "data": data}),
                                              content_type="application/json", properties=properties)
    backend.channel.basic_publish(message, exchange="devices.commands", routing_key=device, mandatory=True)


# -- faults from outside ---------------------------------------------------------------
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


class Blackhole:
    """A TCP proxy to RabbitMQ that can partition the network: while `partitioned`, bytes
    are held (neither forwarded nor refused) and new connections hang after accept, as
    when a firewall or a broken route drops packets. `heal()` drops the connections that
    lived through the partition (as the TCP stacks would) and forwards again; `resume()`
    forwards again on the same connections (a RabbitMQ that stopped reading, then read on)."""

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

    def resume(self) -> None:
        """Forward again, every connection kept: RabbitMQ only stopped reading for a while (its credit
        flow holds back a connection that publishes faster than its queues take, or a node is busy)."""
        self.partitioned = False

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


def private_vhost(name: str) -> str:
    """A vhost of the tests' own, set up as the README asks of any Warren deployment (the routing's
    policy); returns the AMQP URL of it. Idempotent: the vhost may exist from an earlier run."""
    for args in (("add_vhost", name), ("set_permissions", "-p", name, "guest", ".*", ".*", ".*"),
                 (*ROUTES_POLICY[:1], "-p", name, *ROUTES_POLICY[1:])):
        rabbitmqctl(*args, check=False)
    return AMQP_URL.split("@", 1)[0] + "@" + AMQP_HOST + "/" + name
