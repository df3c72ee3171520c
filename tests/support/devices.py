"""JSON devices on a real gateway (test_gateway.py, test_two_hosts.py, the MQTT and TLS tests): welcomed sessions,
what the next frame must be, a device answering every command on a thread of its own, takeovers.

Devices are clients/device.py's `DeviceClient`s, over TCP or WebSocket (TRANSPORTS); each check reads with WAIT.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from clients.device import Closed, DeviceClient
from support.gateways import SECRET, Gateway
from support.waiting import WAIT

TRANSPORTS = ["tcp", "ws"]


def uid(prefix: str = "dev") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def connect(gateway: Gateway, transport: str, device: str | None = None,
            secret: str = SECRET) -> tuple[DeviceClient, dict[str, Any]]:
    """A welcomed device session."""
    client = DeviceClient(gateway.url(transport), timeout=WAIT)
    welcome = client.hello(device or uid(), secret)
    assert welcome["type"] == "welcome", welcome
    return client, welcome


def expect(client: DeviceClient, kind: str, timeout: float = WAIT, **fields: Any) -> dict[str, Any]:
    """The next frame is of type `kind` with these fields."""
    frame = client.receive(timeout=timeout)
    assert frame.get("type") == kind, frame
    for key, value in fields.items():
        assert frame.get(key) == value, (key, frame)
    return frame


def expect_error(client: DeviceClient, code: str, timeout: float = WAIT) -> dict[str, Any]:
    return expect(client, "error", timeout, code=code)


def expect_closed(client: DeviceClient, timeout: float = WAIT) -> None:
    """The server ends the connection (EOF, a WebSocket close or a reset), sending nothing more."""
    try:
        frame = client.receive(timeout=timeout)
    except TimeoutError:
        pytest.fail(f"the server did not close the connection within {timeout}s")
    except (Closed, OSError):
        return
    pytest.fail(f"expected the connection to close, got {frame}")


def ping_ok(client: DeviceClient) -> None:
    client.send({"type": "ping"})
    expect(client, "pong")


def answer_next_command(client: DeviceClient, ok: bool = True, data: Any = ...,
                        error: str | None = None) -> dict[str, Any]:
    """Read frames until a command, reply to it; return the command."""
    while True:
        frame = client.receive(timeout=WAIT)
        if frame["type"] == "command":
            reply: dict[str, Any] = {"type": "reply", "id": frame["id"], "ok": ok,
                                     "data": {"done": frame["name"], "got": frame["data"]} if data is ... else data}
            if error is not None:
                reply["error"] = error
            client.send(reply)
            return frame


def in_background(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a blocking call (an HTTP request) on a thread; returns a Future."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(function, *args, **kwargs)
    pool.shutdown(wait=False)
    return future


class Responder(threading.Thread):
    """A device that answers every command (and pings every `ping_every` seconds) until stopped."""

    def __init__(self, client: DeviceClient, ping_every: float | None = None) -> None:
        super().__init__(daemon=True)
        self.client, self.ping_every = client, ping_every
        self.frames: list[dict[str, Any]] = []
        self.ended: BaseException | None = None
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        next_ping = time.monotonic() + (self.ping_every or 0)
        while not self._halt.is_set():
            try:
                if self.ping_every and time.monotonic() >= next_ping:
                    self.client.send({"type": "ping"})
                    next_ping = time.monotonic() + self.ping_every
                frame = self.client.receive(timeout=0.1)
            except TimeoutError:
                continue
            except (Closed, OSError, ValueError) as exc:
                self.ended = exc
                return
            self.frames.append(frame)
            if frame.get("type") == "command":
                try:
                    self.client.send({"type": "reply", "id": frame["id"], "ok": True,
                                      "data": {"done": frame["name"], "got": frame["data"]}})
                except OSError as exc:
                    self.ended = exc
                    return

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def errors(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == "error"]


def survivors(clients: list[DeviceClient], settle: float) -> list[DeviceClient]:
    """Read every client until only one is left (or WAIT passes), then `settle`; return the live ones."""
    alive = list(clients)

    def sweep(timeout: float) -> None:
        for client in list(alive):
            try:
                frame = client.receive(timeout=timeout)
            except TimeoutError:
                continue
            except (Closed, OSError):
                alive.remove(client)
                continue
            assert frame == {"type": "error", "code": "replaced", "id": None}, frame
            expect_closed(client)
            alive.remove(client)

    deadline = time.monotonic() + WAIT
    while len(alive) > 1 and time.monotonic() < deadline:
        sweep(0.05)
    end = time.monotonic() + settle
    while time.monotonic() < end:
        sweep(0.05)
    return alive
