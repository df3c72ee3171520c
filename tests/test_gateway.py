"""PROTOCOL.md, section by section, against real gunicorn (2 workers) and the real RabbitMQ.

Every device-facing test runs over both transports. Devices are `DeviceClient`s,
backend services are `BackendClient`s or the HTTP API; events and presence are
read from our own exclusive queue bound to `devices.events`. Nothing here
asserts how long something took: only that it happens within a generous timeout.

Gateways: the conftest `gateway` (2 workers, HELLO_TIMEOUT=2) for most tests,
`tight` (1 worker, MAX_CONNECTIONS=3, EVENT_RATE=5, EVENT_BURST=3,
SEND_BUFFER_BYTES=4096, two device secrets) and `heartbeat` (1 worker,
HEARTBEAT=0.75) for the limits.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import uuid
from typing import Any

import orjson
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.events import BytesMessage, TextMessage

from app.auth import mint
from clients.backend import BackendClient
from clients.device import Closed, DeviceClient
from support.devices import (
    TRANSPORTS,
    Responder,
    answer_next_command,
    connect,
    expect,
    expect_closed,
    expect_error,
    in_background,
    ping_ok,
    survivors,
    uid,
)
from support.gateways import AMQP_URL, API_TOKEN, SECRET, Gateway, metric_value, metrics_text, sessions, start_gateway
from support.rabbitmq import PRIVATE_VHOST, EventTap, private_vhost, publish_command, routed
from support.waiting import WAIT, wait_until

MAX_FRAME_BYTES = 65536


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def backend() -> Any:
    with BackendClient(AMQP_URL) as client:
        yield client


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Any:
    instance = start_gateway(tmp_path_factory.mktemp("tight"), workers=1, MAX_CONNECTIONS="3",
                             EVENT_RATE="5", EVENT_BURST="3", SEND_BUFFER_BYTES="4096",
                             DEVICE_SECRETS="new-secret,old-secret", HELLO_TIMEOUT="5")
    yield instance
    instance.stop()


@pytest.fixture
def tight_gw(tight: Gateway) -> Gateway:
    """The tight gateway, once the sessions of earlier tests are gone (it takes three at most)."""
    wait_until(lambda: sessions(tight) == 0, WAIT)
    return tight


# == section 2: hello ===============================================================================
def test_welcome_fields(gateway: Gateway, transport: str) -> None:
    device = uid("lock")
    with DeviceClient(gateway.url(transport)) as client:
        welcome = client.hello(device, SECRET)
        assert set(welcome) == {"type", "device", "session", "heartbeat"}
        assert welcome["type"] == "welcome" and welcome["device"] == device
        assert isinstance(welcome["session"], str) and welcome["session"]
        assert welcome["heartbeat"] == 30
        ping_ok(client)


def test_missing_version_means_1(gateway: Gateway, transport: str) -> None:
    device = uid()
    with DeviceClient(gateway.url(transport)) as client:
        client.send({"type": "hello", "device": device, "token": mint(SECRET.encode(), device)})
        expect(client, "welcome", device=device)
        ping_ok(client)


@pytest.mark.parametrize("version", [2, 0, "1", True, None, [1]])
def test_other_versions_are_unsupported(gateway: Gateway, transport: str, version: Any) -> None:
    with DeviceClient(gateway.url(transport)) as client:
        device = uid()
        client.send({"type": "hello", "device": device, "token": mint(SECRET.encode(), device), "v": version})
        expect_error(client, "unsupported_version")
        expect_closed(client)


@pytest.mark.parametrize("device", ["lock.0001", "", "x" * 129, "lock 1", "lock/1", "schloß", 42, None])
def test_bad_device_id_is_unauthorized(gateway: Gateway, transport: str, device: Any) -> None:
    token = mint(SECRET.encode(), device if isinstance(device, str) else "x")
    with DeviceClient(gateway.url(transport)) as client:
        client.send({"type": "hello", "device": device, "token": token, "v": 1})
        expect_error(client, "unauthorized")
        expect_closed(client)


def test_longest_device_id_is_fine(gateway: Gateway, transport: str) -> None:
    device = "A-z_0:9" + "x" * 121
    assert len(device) == 128
    client, welcome = connect(gateway, transport, device)
    with client:
        assert welcome["device"] == device


@pytest.mark.parametrize("token", ["other-device", "wrong-secret", "uppercase", "empty", "number"])
def test_bad_token_is_unauthorized(gateway: Gateway, transport: str, token: str) -> None:
    device = uid()
    tokens = {"other-device": mint(SECRET.encode(), uid()), "wrong-secret": mint(b"not-the-secret", device),
              "uppercase": mint(SECRET.encode(), device).upper(), "empty": "", "number": 12345}
    with DeviceClient(gateway.url(transport)) as client:
        client.send({"type": "hello", "device": device, "token": tokens[token], "v": 1})
        expect_error(client, "unauthorized")
        expect_closed(client)


@pytest.mark.parametrize("first", [{"type": "ping"}, {"type": "event", "id": "e", "name": "x"},
                                   {"type": "welcome"}, {"device": "lock-1"}, [1, 2], "hello"])
def test_first_frame_not_a_hello_is_unauthorized(gateway: Gateway, transport: str, first: Any) -> None:
    with DeviceClient(gateway.url(transport)) as client:
        client.send(orjson.dumps(first))
        expect_error(client, "unauthorized")
        expect_closed(client)


@pytest.mark.parametrize("garbage", [b"\x00\xff\xfe garbage", b"GET / HTTP/1.1", b"{", b""])
def test_garbage_before_hello_is_unauthorized(gateway: Gateway, transport: str, garbage: bytes) -> None:
    with DeviceClient(gateway.url(transport)) as client:
        if transport == "ws":
            client.send(garbage.decode("utf-8", "replace").encode())
        else:
            client.sock.sendall(garbage + b"\n")
        expect_error(client, "unauthorized")
        expect_closed(client)


def test_raw_garbage_on_the_websocket_closes_it(gateway: Gateway) -> None:
    with DeviceClient(gateway.ws) as client:
        client.sock.sendall(b"\x8f\xff" + b"\x00" * 64)  # a reserved opcode, not a WebSocket frame
        expect_closed(client)
    with DeviceClient(gateway.ws) as client:
        client.hello(uid(), SECRET)
        client.sock.sendall(b"\x00" * 64)
        expect_closed(client)


def test_no_hello_in_time_is_hello_timeout(gateway: Gateway) -> None:
    """HELLO_TIMEOUT is 2 s here: both transports at once, silent from the start (or the upgrade)."""
    with DeviceClient(gateway.tcp) as tcp, DeviceClient(gateway.ws) as ws:
        for client in (tcp, ws):
            frame = expect_error(client, "hello_timeout")
            assert frame["id"] is None
            expect_closed(client)


def test_a_partial_hello_is_hello_timeout_too(gateway: Gateway) -> None:
    with DeviceClient(gateway.tcp) as client:
        client.sock.sendall(b'{"type":"hello",')
        expect_error(client, "hello_timeout")
        expect_closed(client)


def test_a_welcomed_session_is_not_cut_by_the_hello_timeout(gateway: Gateway, transport: str) -> None:
    client, _ = connect(gateway, transport)
    with client:
        time.sleep(2.5)  # past HELLO_TIMEOUT (2 s), well within 2 × heartbeat (60 s)
        ping_ok(client)


# == sections 1 and 3: frames after welcome ========================================================
BAD_FRAMES: list[tuple[str, bytes]] = [
    ("not json", b"this is not json"),
    ("truncated json", b'{"type":"ping"'),
    ("invalid utf-8", b'{"type":"\xff"}'),
    ("empty line", b""),
    ("array", b'[{"type":"ping"}]'),
    ("string", b'"ping"'),
    ("number", b"42"),
    ("null", b"null"),
    ("no type", b'{"id":"e-1"}'),
    ("type not a string", b'{"type":1}'),
    ("unknown type", b'{"type":"pong"}'),
    ("second hello", b'{"type":"hello","device":"x","token":"y"}'),
    ("event without id", b'{"type":"event","name":"door.opened"}'),
    ("event id not a string", b'{"type":"event","id":7,"name":"door.opened"}'),
    ("event id empty", b'{"type":"event","id":"","name":"door.opened"}'),
    ("event id too long", b'{"type":"event","id":"' + b"e" * 65 + b'","name":"door.opened"}'),
    ("event without name", b'{"type":"event","id":"e-1"}'),
    ("event name too long", b'{"type":"event","id":"e-1","name":"' + b"n" * 121 + b'"}'),
    ("event name with space", b'{"type":"event","id":"e-1","name":"door opened"}'),
    ("event name with empty word", b'{"type":"event","id":"e-1","name":"door..opened"}'),
    ("event name with wildcard", b'{"type":"event","id":"e-1","name":"door.#"}'),
    ("reserved session.connected", b'{"type":"event","id":"e-1","name":"session.connected"}'),
    ("reserved session.closed", b'{"type":"event","id":"e-1","name":"session.closed"}'),
    ("reserved session.x", b'{"type":"event","id":"e-1","name":"session.x"}'),
    ("reply without ok", b'{"type":"reply","id":"c-1"}'),
    ("reply ok not bool", b'{"type":"reply","id":"c-1","ok":"true"}'),
    ("reply without id", b'{"type":"reply","ok":true}'),
    ("reply error not a string", b'{"type":"reply","id":"c-1","ok":false,"error":{"x":1}}'),
]


def test_bad_frames_get_bad_frame_and_the_session_stays_open(gateway: Gateway, transport: str) -> None:
    before = metric_value(metrics_text(gateway), 'warren_errors_sent_total{code="bad_frame"}')
    client, _ = connect(gateway, transport)
    with client:
        for label, payload in BAD_FRAMES:
            if transport == "ws" and label == "invalid utf-8":
                continue  # a text message cannot carry it; see the binary test
            client.send(payload)
            frame = client.receive(timeout=WAIT)
            assert frame.get("type") == "error" and frame.get("code") == "bad_frame", (label, frame)
            if b'"id":"e-1"' in payload or b'"id":"c-1"' in payload:
                assert frame.get("id") in {"e-1", "c-1"}, (label, frame)
            ping_ok(client)
    expected = len(BAD_FRAMES) - (transport == "ws")
    wait_until(lambda: metric_value(metrics_text(gateway), 'warren_errors_sent_total{code="bad_frame"}')
               >= before + expected, WAIT)


def test_binary_websocket_message_is_bad_frame(gateway: Gateway) -> None:
    client, _ = connect(gateway, "ws")
    with client:
        client.sock.sendall(client._ws.send(BytesMessage(data=b'{"type":"ping"}')))
        expect_error(client, "bad_frame")
        ping_ok(client)


def test_crlf_line_endings_on_tcp(gateway: Gateway) -> None:
    device = uid()
    with DeviceClient(gateway.tcp) as client:
        hello = {"type": "hello", "device": device, "token": mint(SECRET.encode(), device)}
        client.sock.sendall(orjson.dumps(hello) + b"\r\n")
        expect(client, "welcome", device=device)
        client.sock.sendall(b'{"type":"ping"}\r\n{"type":"ping"}\n{"type":"ping"}\r\n')
        for _ in range(3):
            expect(client, "pong")


def _padded_ping(size: int) -> bytes:
    frame = b'{"type":"ping","pad":""}'
    return frame[:-2] + b"p" * (size - len(frame)) + frame[-2:]


def test_frame_at_the_limit_is_fine_one_byte_more_is_frame_too_large(gateway: Gateway, transport: str) -> None:
    client, _ = connect(gateway, transport)
    with client:
        client.send(_padded_ping(MAX_FRAME_BYTES))
        expect(client, "pong")
        if transport == "tcp":
            client.sock.sendall(_padded_ping(MAX_FRAME_BYTES) + b"\r\n")  # the line end does not count
            expect(client, "pong")
        client.send(_padded_ping(MAX_FRAME_BYTES + 1))
        expect_error(client, "frame_too_large")
        expect_closed(client)


def test_endless_line_is_frame_too_large(gateway: Gateway) -> None:
    client, _ = connect(gateway, "tcp")
    with client:
        try:
            for _ in range(20):
                client.sock.sendall(b"x" * 8192)  # never a line end
        except OSError:
            pass  # the server may already have cut us
        try:
            expect_error(client, "frame_too_large")
        except (Closed, ConnectionResetError):
            pass  # a reset can overtake the error frame when our unread bytes are still in flight
        expect_closed(client)


def test_oversized_hello_is_frame_too_large(gateway: Gateway, transport: str) -> None:
    with DeviceClient(gateway.url(transport)) as client:
        client.send(b'{"type":"hello","device":"' + b"x" * MAX_FRAME_BYTES + b'"}')
        expect_error(client, "frame_too_large")
        expect_closed(client)


# == section 3: events ===============================================================================
def test_event_is_acked_once_in_rabbitmq(gateway: Gateway, transport: str) -> None:
    device = uid("lock")
    with EventTap(f"{device}.door.#") as tap:
        client, welcome = connect(gateway, transport, device)
        with client:
            data = {"by": "pin", "nested": [1, 2.5, None, {"ü": True}]}
            client.send({"type": "event", "id": "e-1", "name": "door.opened", "data": data})
            expect(client, "ack", id="e-1")
            event = tap.get(f"{device}.door.opened", timeout=5)
            assert set(event) - {"_routing_key"} == {"device", "session", "id", "name", "data", "ts"}
            assert event["device"] == device and event["session"] == welcome["session"]
            assert event["id"] == "e-1" and event["name"] == "door.opened" and event["data"] == data
            assert isinstance(event["ts"], int) and abs(event["ts"] - time.time() * 1000) < 3_600_000
            # `data` is optional; resending the same id is the device's right (at-least-once).
            client.send({"type": "event", "id": "e-1", "name": "door.closed"})
            expect(client, "ack", id="e-1")
            assert tap.get(f"{device}.door.closed")["data"] is None


def test_many_events_each_acked_exactly_once(gateway: Gateway, transport: str) -> None:
    device = uid()
    with EventTap(f"{device}.#") as tap:
        client, _ = connect(gateway, transport, device)
        with client:
            ids = [f"e-{n}" for n in range(50)]
            for event_id in ids:
                client.send({"type": "event", "id": event_id, "name": "meter.reading", "data": {"n": event_id}})
            acked = [expect(client, "ack")["id"] for _ in ids]
            assert sorted(acked) == sorted(ids)
            got = {tap.get(f"{device}.meter.reading")["id"] for _ in ids}
            assert got == set(ids)


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A gateway on a RabbitMQ vhost of its own: no catch-all ('#') queue of another tool routes its events."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is needed to make a private vhost (the shared one may route every key)")
    instance = start_gateway(tmp_path_factory.mktemp("private"), workers=1, AMQP_URL=private_vhost(PRIVATE_VHOST))
    yield instance
    instance.stop()


def test_unroutable_event_is_nacked(private: Gateway, transport: str) -> None:
    device, name = uid("nobody-listens"), f"probe.{uuid.uuid4().hex[:8]}"
    key = f"{device}.{name}"
    if routed(key, PRIVATE_VHOST):
        pytest.skip(f"a queue on vhost {PRIVATE_VHOST} routes every key: an unroutable event cannot be made")
    client, _ = connect(private, transport, device)
    with client:
        client.send({"type": "event", "id": "e-lost", "name": name, "data": 1})
        frame = client.receive(timeout=WAIT)
        assert frame == {"type": "nack", "id": "e-lost", "reason": "unroutable",
                         "retry_after": frame.get("retry_after")}, frame
        assert isinstance(frame["retry_after"], int | float) and frame["retry_after"] > 0
        # The same event, once a queue takes it, is acked: the nack was about routing alone.
        with EventTap(f"{device}.#", vhost=PRIVATE_VHOST) as tap:
            client.send({"type": "event", "id": "e-lost", "name": name, "data": 1})
            expect(client, "ack", id="e-lost")
            assert tap.get(key)["data"] == 1
        ping_ok(client)


def test_rate_limited_events_and_frames(tight_gw: Gateway, transport: str) -> None:
    """EVENT_RATE=5, EVENT_BURST=3: a burst of 12 events gets a few acks and many rate_limited nacks."""
    device = uid()
    with EventTap(f"{device}.#"):
        client, _ = connect(tight_gw, transport, device, secret="new-secret")
        with client:
            ids = [f"e-{n}" for n in range(12)]
            client.sock.sendall(b"".join(
                _frame_bytes(client, {"type": "event", "id": i, "name": "burst", "data": None}) for i in ids))
            answers = {}
            while len(answers) < len(ids):
                frame = client.receive(timeout=WAIT)
                assert frame["type"] in {"ack", "nack"}, frame
                answers[frame["id"]] = frame
            acked = [i for i in ids if answers[i]["type"] == "ack"]
            limited = [answers[i] for i in ids if answers[i]["type"] == "nack"]
            assert acked[:3] == ids[:3], answers  # the burst
            assert len(limited) >= 5, answers
            for nack in limited:
                assert nack["reason"] == "rate_limited" and nack["retry_after"] >= 0, nack
            # Other frames over the limit get error rate_limited (the bucket is empty right now).
            client.sock.sendall(b"".join(_frame_bytes(client, {"type": "ping"}) for _ in range(6)))
            frames = [client.receive(timeout=WAIT) for _ in range(6)]
            errors = [f for f in frames if f["type"] == "error"]
            assert errors and all(f["code"] == "rate_limited" and "retry_after" in f for f in errors), frames
            assert all(f["type"] in {"pong", "error"} for f in frames), frames
            time.sleep(1.0)  # the bucket refills: the session was never closed
            ping_ok(client)


def _frame_bytes(client: DeviceClient, frame: dict[str, Any]) -> bytes:
    """One frame as the bytes this client would write (so that many go in one write)."""
    payload = orjson.dumps(frame)
    if client._ws is None:
        return payload + b"\n"
    return client._ws.send(TextMessage(data=payload.decode()))


# == section 5: presence =============================================================================
def test_presence_connected_and_closed(gateway: Gateway, transport: str) -> None:
    device = uid()
    with EventTap(f"{device}.session.*") as tap:
        client, welcome = connect(gateway, transport, device)
        session = welcome["session"]
        connected = tap.get(f"{device}.session.connected")
        assert connected["device"] == device and connected["session"] == session and connected["id"] == session
        assert connected["name"] == "session.connected" and connected["data"] == {"transport": transport}
        assert isinstance(connected["ts"], int)
        client.close()
        closed = tap.get(f"{device}.session.closed")
        assert closed["session"] == session and closed["id"] == session
        assert closed["data"] == {"reason": "closed"}


def test_presence_closed_carries_the_error_code(gateway: Gateway, transport: str) -> None:
    device = uid()
    with EventTap(f"{device}.session.closed") as tap:
        client, _ = connect(gateway, transport, device)
        with client:
            client.send(_padded_ping(MAX_FRAME_BYTES + 10))
            expect_error(client, "frame_too_large")
        assert tap.get(f"{device}.session.closed")["data"] == {"reason": "frame_too_large"}


# == sections 4 and 5: commands through RabbitMQ ======================================================
def test_command_and_reply_through_rabbitmq(gateway: Gateway, backend: BackendClient, transport: str) -> None:
    device = uid("lock")
    client, _ = connect(gateway, transport, device)
    with client:
        command_id = backend.send(device, "unlock", {"for": 5}, timeout=WAIT)
        frame = expect(client, "command", id=command_id, name="unlock", data={"for": 5})
        assert set(frame) == {"type", "id", "name", "data"}
        client.send({"type": "reply", "id": command_id, "ok": True, "data": {"unlocked": True}})
        assert backend.wait(command_id, WAIT) == {"device": device, "id": command_id, "ok": True,
                                                  "data": {"unlocked": True}, "error": None}
        command_id = backend.send(device, "lock", None, timeout=WAIT)
        expect(client, "command", id=command_id, name="lock", data=None)
        client.send({"type": "reply", "id": command_id, "ok": False, "error": "jammed"})
        reply = backend.wait(command_id, WAIT)
        assert reply["ok"] is False and reply["error"] == "jammed" and reply["data"] is None


def test_reply_goes_to_reply_to_with_the_correlation_id(gateway: Gateway, backend: BackendClient,
                                                        transport: str) -> None:
    device = uid()
    client, _ = connect(gateway, transport, device)
    with client:
        publish_command(backend, device, "status", {"q": 1}, message_id="m-1", correlation_id="corr-77",
                        reply_to="amq.rabbitmq.reply-to", expiration=str(int(WAIT * 1000)))
        expect(client, "command", id="m-1", name="status")
        client.send({"type": "reply", "id": "m-1", "ok": True, "data": 3})
        assert backend.wait("corr-77", WAIT) == {"device": device, "id": "m-1", "ok": True, "data": 3,
                                                 "error": None}
        # Without a correlation_id the reply carries the command id; without a message_id one is made.
        publish_command(backend, device, "status", message_id="m-2", reply_to="amq.rabbitmq.reply-to")
        expect(client, "command", id="m-2")
        client.send({"type": "reply", "id": "m-2", "ok": True})
        assert backend.wait("m-2", WAIT)["id"] == "m-2"
        publish_command(backend, device, "status", correlation_id="corr-78", reply_to="amq.rabbitmq.reply-to")
        generated = expect(client, "command", name="status")["id"]
        assert isinstance(generated, str) and generated
        client.send({"type": "reply", "id": generated, "ok": True})
        assert backend.wait("corr-78", WAIT)["id"] == generated
        # Without reply_to the reply goes nowhere, and the session carries on.
        publish_command(backend, device, "fire-and-forget", message_id="m-3")
        expect(client, "command", id="m-3")
        client.send({"type": "reply", "id": "m-3", "ok": True})
        ping_ok(client)


def test_command_for_an_offline_device_is_answered_at_once(backend: BackendClient, gateway: Gateway) -> None:
    reply = backend.command(uid("offline"), "unlock", timeout=WAIT)
    assert reply["ok"] is False and reply["error"] == "offline"


def test_command_larger_than_a_frame_is_refused_and_the_session_kept(gateway: Gateway, backend: BackendClient,
                                                                     transport: str) -> None:
    device = uid()
    client, _ = connect(gateway, transport, device)
    with client:
        reply = backend.command(device, "upload", {"blob": "x" * 70000}, timeout=WAIT)
        assert reply["ok"] is False and reply["error"] == "too_large"
        ping_ok(client)


def test_command_that_expired_before_delivery_is_answered_expired(gateway: Gateway, backend: BackendClient,
                                                                   transport: str) -> None:
    device = uid()
    client, _ = connect(gateway, transport, device)
    with client:
        publish_command(backend, device, "unlock", message_id="old-1", correlation_id="old-1",
                        reply_to="amq.rabbitmq.reply-to", expiration="60000",
                        timestamp=int(time.time()) - 3600)
        reply = backend.wait("old-1", WAIT)
        assert reply["ok"] is False and reply["error"] == "expired", reply
        ping_ok(client)  # the command never reached the device: the next frame is the pong


def test_a_command_right_after_the_welcome_is_delivered(gateway: Gateway, backend: BackendClient) -> None:
    """Once a device is welcomed (or announced connected), a command must reach it, never `offline`."""
    for n in range(12):
        device = uid()
        with EventTap(f"{device}.session.connected") as tap:
            client, _ = connect(gateway, TRANSPORTS[n % 2], device)
            with client:
                command_id = backend.send(device, "unlock", timeout=WAIT)
                expect(client, "command", id=command_id)
                client.send({"type": "reply", "id": command_id, "ok": True})
                assert backend.wait(command_id, WAIT)["ok"] is True
                # A backend that reacts to session.connected reaches the device too.
                tap.get(f"{device}.session.connected")
                command_id = backend.send(device, "lock", timeout=WAIT)
                expect(client, "command", id=command_id)


def test_reply_to_an_unknown_command(gateway: Gateway, backend: BackendClient, transport: str) -> None:
    device = uid()
    client, _ = connect(gateway, transport, device)
    with client:
        client.send({"type": "reply", "id": "never-sent", "ok": True})
        assert expect_error(client, "unknown_command")["id"] == "never-sent"
        command_id = backend.send(device, "unlock", timeout=WAIT)
        expect(client, "command", id=command_id)
        client.send({"type": "reply", "id": command_id, "ok": True})
        assert backend.wait(command_id, WAIT)["ok"] is True
        client.send({"type": "reply", "id": command_id, "ok": True})
        assert expect_error(client, "unknown_command")["id"] == command_id
        ping_ok(client)


def test_a_pending_command_is_dropped_once_it_expires(gateway: Gateway, backend: BackendClient) -> None:
    device = uid()
    client, _ = connect(gateway, "tcp", device)
    with client:
        # No timestamp: the gateway counts the expiration from when the command reaches it.
        publish_command(backend, device, "unlock", message_id="short-1", correlation_id="short-1",
                        reply_to="amq.rabbitmq.reply-to", expiration="1000")
        expect(client, "command", id="short-1")
        with pytest.raises(TimeoutError):
            backend.wait("short-1", 1.5)  # no reply to the sender: the device said nothing
        client.send({"type": "reply", "id": "short-1", "ok": True})  # too late: it was dropped
        expect_error(client, "unknown_command")


# == section 6: HTTP API ==============================================================================
def test_http_command_gets_the_device_reply(gateway: Gateway, transport: str) -> None:
    device = uid("lock")
    client, _ = connect(gateway, transport, device)
    with client:
        response = in_background(gateway.command, device, "unlock", {"for": 5}, timeout=WAIT)
        command = answer_next_command(client)
        assert command["name"] == "unlock" and command["data"] == {"for": 5}
        result = response.result(WAIT + 10)
        assert result.status_code == 200, result.text
        assert result.json() == {"ok": True, "data": {"done": "unlock", "got": {"for": 5}}, "error": None}
        response = in_background(gateway.command, device, "lock", None, timeout=WAIT)
        answer_next_command(client, ok=False, data=None, error="jammed")
        result = response.result(WAIT + 10)
        assert result.status_code == 200 and result.json() == {"ok": False, "data": None, "error": "jammed"}


def test_http_offline_is_404(gateway: Gateway) -> None:
    response = gateway.command(uid("offline"), timeout=WAIT)
    assert response.status_code == 404
    assert response.json()["error"] == "offline"


def test_http_device_that_never_answers_is_504(gateway: Gateway, transport: str) -> None:
    device = uid()
    client, _ = connect(gateway, transport, device)
    with client:
        response = gateway.command(device, timeout=1)
        assert response.status_code == 504 and response.json()["error"] == "timeout"
        client.send({"type": "ping"})  # the session is fine (the command came first, unless it expired on the way)
        frame = client.receive(timeout=WAIT)
        if frame["type"] == "command":
            assert frame["name"] == "unlock"
            frame = client.receive(timeout=WAIT)
        assert frame == {"type": "pong"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_TOKEN},
                                     {"Authorization": f"Basic {API_TOKEN}"}, {"Authorization": "Bearer "}])
def test_http_unauthorized(gateway: Gateway, headers: dict[str, str]) -> None:
    response = requests.post(f"{gateway.http}/devices/lock-1/commands", json={"name": "unlock"},
                             headers=headers, timeout=WAIT)
    assert response.status_code == 401 and response.json()["error"] == "unauthorized"


@pytest.mark.parametrize(("path", "body"), [
    ("lock-1", b"{not json"),
    ("lock-1", b""),
    ("lock-1", b"[1]"),
    ("lock-1", b'{"data":{}}'),
    ("lock-1", b'{"name":""}'),
    ("lock-1", b'{"name":5}'),
    ("lock-1", b'{"name":"unlock","timeout":0}'),
    ("lock-1", b'{"name":"unlock","timeout":-1}'),
    ("lock-1", b'{"name":"unlock","timeout":30.5}'),
    ("lock-1", b'{"name":"unlock","timeout":"5"}'),
    ("lock-1", b'{"name":"unlock","timeout":true}'),
    ("lock.1", b'{"name":"unlock"}'),
    ("x" * 129, b'{"name":"unlock"}'),
    ("lock%201", b'{"name":"unlock"}'),
])
def test_http_bad_request(gateway: Gateway, path: str, body: bytes) -> None:
    response = requests.post(f"{gateway.http}/devices/{path}/commands", data=body, timeout=WAIT,
                             headers={"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_request" and response.json()["message"]


def test_http_body_too_large_is_413(gateway: Gateway) -> None:
    response = requests.post(f"{gateway.http}/devices/lock-1/commands", timeout=WAIT,
                             data=orjson.dumps({"name": "unlock", "data": "x" * 70000}),
                             headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert response.status_code == 413


@pytest.mark.parametrize("version", ["8", ""])
def test_websocket_upgrade_with_a_bad_version_is_400(gateway: Gateway, version: str) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=WAIT) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: "
                     + version.encode() + b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")


def test_http_timeout_30_is_allowed(gateway: Gateway) -> None:
    response = gateway.command(uid("offline"), timeout=30)
    assert response.status_code == 404  # accepted, and the device is offline


def test_http_health_ready_and_routes(gateway: Gateway) -> None:
    response = requests.get(f"{gateway.http}/healthz", timeout=WAIT)
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    response = requests.get(f"{gateway.http}/readyz", timeout=WAIT)
    assert response.status_code == 200
    assert requests.get(f"{gateway.http}/devices/lock-1/commands", timeout=WAIT).status_code == 405
    assert requests.get(f"{gateway.http}/ws", timeout=WAIT).status_code == 400  # not an upgrade
    assert requests.get(f"{gateway.http}/nothing-here", timeout=WAIT).status_code == 404


def test_metrics_count_the_sessions_of_every_worker(gateway: Gateway) -> None:
    """Whichever worker answers /metrics, it counts the sessions of both workers."""
    wait_until(lambda: sessions(gateway) == 0, WAIT)  # the sessions of earlier tests are gone
    baseline = 0
    clients: list[DeviceClient] = []
    try:
        def both_workers_hold_some() -> bool:
            client, _ = connect(gateway, TRANSPORTS[len(clients) % 2])
            clients.append(client)
            per_worker = [float(line.rsplit(" ", 1)[1]) for line in metrics_text(gateway).splitlines()
                          if line.startswith("warren_worker_sessions{")]
            return len(clients) >= 4 and sum(1 for value in per_worker if value > 0) >= 2
        wait_until(both_workers_hold_some, 60, interval=0)
        for _ in range(5):  # several answers, from whichever workers take them
            text = metrics_text(gateway)
            assert metric_value(text, "warren_sessions") == baseline + len(clients)
            assert metric_value(text, "warren_workers") == 2
        assert 'warren_sessions{transport="tcp"}' in text and 'warren_sessions{transport="ws"}' in text
    finally:
        for client in clients:
            client.close()
    wait_until(lambda: sessions(gateway) == baseline, WAIT)


# == section 2.4: takeover =============================================================================
def test_takeover_replaces_the_older_session(gateway: Gateway, transport: str) -> None:
    device = uid()
    other = "ws" if transport == "tcp" else "tcp"
    with EventTap(f"{device}.session.closed") as tap:
        old, first = connect(gateway, transport, device)
        new, second = connect(gateway, other, device)
        with old, new:
            assert first["session"] != second["session"]
            expect_error(old, "replaced")
            expect_closed(old)
            closed = tap.get(f"{device}.session.closed")
            assert closed["session"] == first["session"] and closed["data"] == {"reason": "replaced"}
            ping_ok(new)
            for _ in range(3):  # the API, on whichever worker, reaches the new session
                response = in_background(gateway.command, device, "unlock", timeout=WAIT)
                answer_next_command(new)
                assert response.result(WAIT + 10).status_code == 200


def test_simultaneous_hellos_leave_exactly_one(gateway: Gateway) -> None:
    device = uid()
    hello = {"type": "hello", "device": device, "token": mint(SECRET.encode(), device)}
    clients = [DeviceClient(gateway.url(TRANSPORTS[n % 2])) for n in range(8)]
    try:
        payloads = [_frame_bytes(client, hello) for client in clients]
        for client, payload in zip(clients, payloads, strict=True):  # as close together as we can
            client.sock.sendall(payload)
        # A session replaced while its hello is still being routed gets `replaced` without a welcome.
        welcomed = []
        for client in clients:
            frame = client.receive(timeout=WAIT)
            if frame == {"type": "error", "code": "replaced", "id": None}:
                expect_closed(client)
            else:
                assert frame["type"] == "welcome" and frame["device"] == device, frame
                welcomed.append(client)
        alive = survivors(welcomed, settle=2.0)
        assert len(alive) == 1, f"{len(alive)} sessions survived"
        survivor = alive[0]
        ping_ok(survivor)
        response = in_background(gateway.command, device, "unlock", timeout=WAIT)
        answer_next_command(survivor)
        assert response.result(WAIT + 10).status_code == 200
    finally:
        for client in clients:
            client.close()


# == limits ============================================================================================
def test_key_rotation_both_secrets_verify(tight_gw: Gateway, transport: str) -> None:
    for secret in ("new-secret", "old-secret"):
        client, _ = connect(tight_gw, transport, secret=secret)
        with client:
            ping_ok(client)
    with DeviceClient(tight_gw.url(transport)) as client:
        assert client.hello(uid(), SECRET)["code"] == "unauthorized"
        expect_closed(client)


def test_overloaded_when_full(tight_gw: Gateway, transport: str) -> None:
    """One worker with MAX_CONNECTIONS=3: the fourth hello gets `overloaded`; the three carry on."""
    devices = [uid() for _ in range(3)]
    clients = [connect(tight_gw, TRANSPORTS[n % 2], device, "new-secret")[0] for n, device in enumerate(devices)]
    try:
        with DeviceClient(tight_gw.url(transport)) as fourth:
            frame = fourth.hello(uid(), "new-secret")
            assert frame["type"] == "error" and frame["code"] == "overloaded", frame
            assert isinstance(frame["retry_after"], int | float) and frame["retry_after"] > 0
            expect_closed(fourth)
        for client, device in zip(clients, devices, strict=True):
            response = in_background(tight_gw.command, device, "unlock", timeout=WAIT)
            answer_next_command(client)
            assert response.result(WAIT + 10).status_code == 200
    finally:
        for client in clients:
            client.close()


def test_a_device_that_stops_reading_is_cut_alone(tight_gw: Gateway, backend: BackendClient) -> None:
    """SEND_BUFFER_BYTES=4096: commands pile up for a device that never reads; only it is cut."""
    pid = tight_gw.worker_pids()
    slow_device, good_device = uid("slow"), uid("good")
    slow = DeviceClient(tight_gw.tcp)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    assert slow.hello(slow_device, "new-secret")["type"] == "welcome"
    good, _ = connect(tight_gw, "ws", good_device, "new-secret")
    before = metric_value(metrics_text(tight_gw), 'warren_sessions_closed_total{reason="closed"}')
    try:
        blob = "x" * 3000  # each command fits the buffer; together they do not
        for _ in range(3000):
            backend.send(slow_device, "flood", blob, timeout=60)
        wait_until(lambda: sessions(tight_gw) == 1, 60, interval=0.2)
        # Cut by the gateway (the device never closed): its session ended as "closed", not by a timeout.
        assert metric_value(metrics_text(tight_gw), 'warren_sessions_closed_total{reason="closed"}') == before + 1
        assert backend.command(slow_device, "unlock", timeout=WAIT)["error"] == "offline"
        # The worker lives on and the other session still answers (commands of the same size too).
        assert tight_gw.worker_pids() == pid
        for data in ("small", blob):
            response = in_background(tight_gw.command, good_device, "unlock", data, timeout=WAIT)
            answer_next_command(good)
            assert response.result(WAIT + 10).status_code == 200
        ping_ok(good)
    finally:
        slow.close()
        good.close()


@pytest.fixture(scope="module")
def heartbeat(tmp_path_factory: pytest.TempPathFactory) -> Any:
    instance = start_gateway(tmp_path_factory.mktemp("heartbeat"), workers=1, HEARTBEAT="0.75")
    yield instance
    instance.stop()


def test_idle_timeout(heartbeat: Gateway, transport: str) -> None:
    """HEARTBEAT=0.75: a silent session is cut after about 1.5 s; one that pings stays."""
    silent, welcome = connect(heartbeat, transport)
    talker, _ = connect(heartbeat, transport)
    assert welcome["heartbeat"] == 0.75  # not rounded down to 0
    responder = Responder(talker, ping_every=0.3)
    try:
        with silent:
            expect_error(silent, "idle_timeout")
            expect_closed(silent)
        time.sleep(1.5)
        assert responder.ended is None and responder.is_alive()
        assert not responder.errors()
    finally:
        responder.stop()
        talker.close()


# == nothing a device sends harms another session =================================================
fuzz_frames = st.fixed_dictionaries(
    {"type": st.sampled_from(["ping", "event", "reply", "hello", "command", "ack", "pong"]) | st.text(max_size=5)},
    optional={"id": st.text(max_size=70) | st.integers(), "name": st.text(max_size=20) | st.just("session.closed"),
              "ok": st.booleans() | st.none(), "data": st.recursive(st.none() | st.integers(-10, 10) | st.text(max_size=5),
                                                                    lambda inner: st.lists(inner, max_size=3), max_leaves=8),
              "error": st.text(max_size=5) | st.integers(), "device": st.text(max_size=5), "token": st.text(max_size=5)})
fuzz_actions = st.one_of(
    st.tuples(st.just("frame"), fuzz_frames.map(lambda f: json.dumps(f).encode())),
    st.tuples(st.just("bytes"), st.binary(max_size=200)),
    st.tuples(st.just("raw"), st.binary(min_size=1, max_size=100)),
    st.tuples(st.just("huge"), st.just(b"[" * 20 + b"1" * 70000)),
    st.tuples(st.just("deep"), st.just(b'{"type":"event","id":"d","name":"x","data":' + b"[" * 5000 + b"]" * 5000
                                       + b"}")),
)


def test_nothing_a_device_sends_harms_another_session(gateway: Gateway) -> None:
    pids = sorted(gateway.worker_pids())
    victims = {transport: connect(gateway, transport) for transport in TRANSPORTS}
    victim_devices = {client: welcome["device"] for client, welcome in victims.values()}
    victims = {transport: client for transport, (client, _) in victims.items()}
    attackers: dict[str, DeviceClient | None] = {"tcp": None, "ws": None}

    def attacker(transport: str) -> DeviceClient:
        client = attackers[transport]
        if client is None:
            client, _ = connect(gateway, transport)
            client.sock.settimeout(WAIT)
            attackers[transport] = client
        return client

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.sampled_from(TRANSPORTS), fuzz_actions)
    def attack(transport: str, action: tuple[str, bytes]) -> None:
        kind, payload = action
        client = attacker(transport)
        try:
            if kind == "raw" or (kind == "bytes" and transport == "tcp"):
                client.sock.sendall(payload)  # may break the WebSocket framing: that ends this session only
            elif kind == "bytes":
                client.send(payload.decode("utf-8", "replace").encode())
            else:
                client.send(payload)
        except OSError:
            client.close()
            attackers[transport] = None
        if kind in {"raw", "huge"}:
            client.close()
            attackers[transport] = None
        for victim in victims.values():
            ping_ok(victim)

    try:
        attack()
        for victim in victims.values():
            welcome_device = victim_devices[victim]
            response = in_background(gateway.command, welcome_device, "unlock", timeout=WAIT)
            answer_next_command(victim)
            assert response.result(WAIT + 10).status_code == 200
        assert sorted(gateway.worker_pids()) == pids
        log = gateway.log()
        assert "Traceback" not in log, log[-5000:]
    finally:
        for client in [*victims.values(), *(a for a in attackers.values() if a is not None)]:
            client.close()


def test_no_gateway_logged_a_crash(gateway: Gateway, tight: Gateway, heartbeat: Gateway, private: Gateway) -> None:
    """Last: whatever the tests above sent, no session crashed and no worker died (the logs say so)."""
    for instance in (gateway, tight, heartbeat, private):
        log = instance.log()
        for marker in ("Traceback", "CRITICAL", "Worker exiting", "WORKER TIMEOUT"):
            assert marker not in log, f"{marker!r} in {instance.log_path}:\n{log[-5000:]}"
