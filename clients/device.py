"""A device simulator: try the gateway by hand, and the device side of the tests.

    python -m clients.device --url tcp://127.0.0.1:7878 --device lock-0001 --secret s3cret

It says hello, prints every frame it receives, pings at the heartbeat the
server asked for, answers every command with `{"ok": true}` (an `unlock`
also prints "unlocked"), and can send events (`--event door.opened`).
`DeviceClient` is the same thing as a library, over TCP or WebSocket.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import sys
import time
from typing import Any, Self
from urllib.parse import urlsplit

import orjson
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

from app import auth


class Closed(ConnectionError):
    """The server closed the connection."""


class DeviceClient:
    """One device connection: `tcp://host:port` or `ws://host:port/ws`. Blocking, one caller."""

    def __init__(self, url: str, timeout: float = 10.0, source: str | None = None) -> None:
        parts = urlsplit(url)
        self.websocket = parts.scheme == "ws"
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.settimeout(timeout)
        self._buffer = b""
        self._frames: list[dict[str, Any]] = []
        self._ws: WSConnection | None = None
        self._ws_closed: str | None = None  # a close seen while frames read with it were still unread
        if self.websocket:
            self._upgrade(f"{parts.hostname}:{parts.port}", parts.path or "/ws")

    def _upgrade(self, host: str, path: str) -> None:
        self._ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self._ws.send(Request(host=host, target=path)))
        while True:
            for event in self._pump():
                if isinstance(event, AcceptConnection):
                    return
                raise Closed(f"WebSocket upgrade refused: {event!r}")

    def _pump(self) -> list[Any]:
        data = self.sock.recv(65536)
        self._ws.receive_data(data or None)
        return list(self._ws.events())

    # -- frames -----------------------------------------------------------------------
    def send(self, frame: dict[str, Any] | bytes) -> None:
        payload = frame if isinstance(frame, bytes) else orjson.dumps(frame)
        if self._ws is None:
            self.sock.sendall(payload + b"\n")
        else:
            self.sock.sendall(self._ws.send(TextMessage(data=payload.decode())))

    def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The next frame from the server; raises Closed at end of stream, TimeoutError on silence."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        while not self._frames:
            self._read_more()
        return self._frames.pop(0)

    def _read_more(self) -> None:
        if self._ws is None:
            data = self.sock.recv(65536)
            if not data:
                raise Closed("the server closed the connection")
            self._buffer += data
            *lines, self._buffer = self._buffer.split(b"\n")
            self._frames += [orjson.loads(line) for line in lines if line]
            return
        if self._ws_closed is not None:
            raise Closed(self._ws_closed)
        for event in self._pump():
            if isinstance(event, TextMessage):
                self._buffer += event.data.encode()
                if event.message_finished:
                    self._frames.append(orjson.loads(self._buffer))
                    self._buffer = b""
            elif isinstance(event, Ping):
                self.sock.sendall(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self._ws_closed = f"WebSocket closed ({event.code})"
        if self._ws_closed is not None and not self._frames:
            raise Closed(self._ws_closed)

    def hello(self, device: str, secret: bytes | str, **extra: Any) -> dict[str, Any]:
        """Say hello with a token minted from `secret`; return the server's answer."""
        key = secret.encode() if isinstance(secret, str) else secret
        self.send({"type": "hello", "device": device, "token": auth.mint(key, device), "v": 1, **extra})
        return self.receive()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(client: DeviceClient, device: str, secret: str, events: list[str]) -> None:
    """The interactive loop: print frames, ping, answer commands."""
    welcome = client.hello(device, secret)
    print(orjson.dumps(welcome).decode(), flush=True)
    if welcome.get("type") != "welcome":
        sys.exit(1)
    for number, name in enumerate(events, 1):
        client.send({"type": "event", "id": f"e-{number}-{base64.b32encode(os.urandom(5)).decode()}",
                     "name": name, "data": {}})
    heartbeat = float(welcome.get("heartbeat", 30)) / 2
    next_ping = time.monotonic() + heartbeat
    while True:
        try:
            frame = client.receive(timeout=max(0.1, next_ping - time.monotonic()))
        except TimeoutError:
            client.send({"type": "ping"})
            next_ping = time.monotonic() + heartbeat
            continue
        print(orjson.dumps(frame).decode(), flush=True)
        if frame.get("type") == "command":
            if frame.get("name") == "unlock":
                print(f"unlocked {device}", flush=True)
            client.send({"type": "reply", "id": frame["id"], "ok": True, "data": {"done": frame.get("name")}})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="tcp://127.0.0.1:7878", help="tcp://host:port or ws://host:port/ws")
    parser.add_argument("--device", default="lock-0001")
    parser.add_argument("--secret", default=os.environ.get("DEVICE_SECRETS", "").split(",")[0],
                        help="a secret of DEVICE_SECRETS (default: the first of $DEVICE_SECRETS)")
    parser.add_argument("--event", action="append", default=[], help="send this event after welcome")
    args = parser.parse_args(argv)
    if not args.secret:
        parser.error("give --secret or set DEVICE_SECRETS")
    try:
        with DeviceClient(args.url) as client:
            serve(client, args.device, args.secret, args.event)
    except (Closed, KeyboardInterrupt) as exc:
        print(f"closed: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
