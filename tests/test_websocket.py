"""The WebSocket upgrade path on a real gateway: stock clients, keep-alive before an upgrade, bad handshakes.

A WebSocket session leaves pywsgi at its upgrade (app/listeners.py): these tests hold
the path to what it did before, with a client nobody here wrote (websocket-client),
an HTTP request on the same connection before the upgrade, and a 400 with a message
for every handshake the gateway refuses.
"""

from __future__ import annotations

import base64
import os
import socket
import time

import orjson
import pytest
import websocket

from app.auth import mint
from bench.stampede import mqtt_codec
from support.browser import CHROMEDRIVER, CHROMIUM, webdriver
from support.devices import uid
from support.gateways import SECRET, Gateway
from support.waiting import WAIT

KEY = base64.b64encode(os.urandom(16)).decode()


def test_a_stock_websocket_client_holds_a_json_session(gateway: Gateway) -> None:
    device = uid("wsc")
    ws = websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/ws", timeout=WAIT)
    try:
        ws.send(orjson.dumps({"type": "hello", "device": device, "token": mint(SECRET.encode(), device)}).decode())
        welcome = orjson.loads(ws.recv())
        assert welcome["type"] == "welcome" and welcome["device"] == device, welcome
        ws.send('{"type":"ping"}')
        assert orjson.loads(ws.recv()) == {"type": "pong"}
        ws.ping(b"are you there")  # a control frame the gateway answers without the session
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert (opcode, frame.data) == (websocket.ABNF.OPCODE_PONG, b"are you there")
    finally:
        ws.close()


def test_a_stock_websocket_client_speaks_mqtt_on_the_mqtt_subprotocol(gateway: Gateway) -> None:
    device = uid("wscm")
    ws = websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/mqtt", subprotocols=["mqtt"], timeout=WAIT)
    try:
        assert ws.getsubprotocol() == "mqtt"
        ws.send_binary(mqtt_codec.connect(device, mint(SECRET.encode(), device)))
        assert ws.recv()[:4] == b"\x20\x02\x00\x00"  # CONNACK, accepted
        ws.send_binary(mqtt_codec.PINGREQ)
        assert ws.recv() == b"\xd0\x00"  # PINGRESP
    finally:
        ws.close()


def _upgrade_request(path: str = "/ws", method: str = "GET", version: str = "13", key: str = KEY,
                     extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n{extra}\r\n").encode()


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return data


def test_an_api_request_before_an_upgrade_on_one_keep_alive_connection(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=WAIT) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = _read_head(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        body = head.split(b"\r\n\r\n", 1)[1]
        while b"ok" not in body:
            body += sock.recv(4096)
        sock.sendall(_upgrade_request())
        assert _read_head(sock).startswith(b"HTTP/1.1 101 Switching Protocols")
        device = uid("keep")
        hello = orjson.dumps({"type": "hello", "device": device, "token": mint(SECRET.encode(), device)})
        sock.sendall(_masked_text(hello))
        frame = sock.recv(4096)
        assert frame[0] == 0x81 and orjson.loads(frame[2:2 + frame[1]])["type"] == "welcome", frame


def test_an_upgrade_head_that_arrives_in_pieces_goes_through_pywsgi_and_works(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=WAIT) as sock:
        head = _upgrade_request()
        sock.sendall(head[:20])
        time.sleep(0.2)  # the gateway's peek sees a part: it leaves the request to pywsgi
        sock.sendall(head[20:])
        assert _read_head(sock).startswith(b"HTTP/1.1 101 Switching Protocols")
        sock.sendall(_masked_text(b'{"type":"ping"}'))  # before a hello: not a valid hello, so unauthorized
        frame = sock.recv(4096)
        assert frame[0] == 0x81 and orjson.loads(frame[2:2 + frame[1]])["code"] == "unauthorized", frame


def _masked_text(payload: bytes) -> bytes:
    mask = os.urandom(4)
    return bytes((0x81, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize(("request_bytes", "message"), [
    (_upgrade_request(version="8"), b"only WebSocket version 13 is supported"),
    (_upgrade_request(key=""), b"missing Sec-WebSocket-Key"),
    (_upgrade_request(method="POST"), b"a WebSocket upgrade must be a GET"),
    (_upgrade_request(path="/mqtt"), b"must offer the subprotocol 'mqtt'"),
    (_upgrade_request(extra="Upgrade: h2c\r\n").replace(b"Upgrade: websocket\r\n", b""), b"missing 'Upgrade: websocket'"),
])
def test_a_refused_handshake_is_a_400_saying_why(gateway: Gateway, request_bytes: bytes, message: bytes) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=WAIT) as sock:
        sock.sendall(request_bytes)
        answer = b""
        while (chunk := sock.recv(4096)):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 400"), answer
        assert message in answer, answer


# Opens a WebSocket as a page would, says hello, pings, and hands back what came back.
BROWSER_SESSION = """
const [url, hello, done] = arguments;
const seen = [];
const ws = new WebSocket(url);
ws.onopen = () => ws.send(hello);
ws.onmessage = (event) => {
  seen.push(JSON.parse(event.data));
  if (seen.length === 1) ws.send('{"type":"ping"}'); else { ws.close(); done(seen); }
};
ws.onerror = () => done(["error", ...seen]);
"""


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="needs Chromium: run .ci/ensure-chromium first")
def test_a_browser_holds_a_json_session_on_ws(gateway: Gateway, tmp_path) -> None:
    device = uid("chromium")
    hello = orjson.dumps({"type": "hello", "device": device, "token": mint(SECRET.encode(), device)}).decode()
    with webdriver(tmp_path) as browser:
        browser.open(f"{gateway.http}/healthz")
        seen = browser.run_async(BROWSER_SESSION, f"ws://127.0.0.1:{gateway.port}/ws", hello)
    assert [frame["type"] for frame in seen] == ["welcome", "pong"], seen
    assert seen[0]["device"] == device
