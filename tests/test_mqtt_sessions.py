"""MQTT 3.1.1 sessions against real gunicorn (2 workers) and the real RabbitMQ (PROTOCOL.md section 8): keep-alive,
wills, takeover across transports, MQTT over WebSocket, malformed input, and the mosquitto_pub/mosquitto_sub
binaries. The devices are support/mqtt_devices.py's.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import requests
from wsproto.events import AcceptConnection, RejectConnection

from clients.backend import BackendClient
from clients.device import Closed, DeviceClient
from support.devices import answer_next_command, connect, expect_closed, expect_error, in_background, uid
from support.gateways import AMQP_URL, API_TOKEN, Gateway, counted, sessions
from support.mqtt_devices import (
    CONNACK,
    PINGRESP,
    PUBACK,
    PUBLISH,
    SUBACK,
    RawMqtt,
    RawMqttWs,
    build,
    closed_by_gateway,
    mqtt_device,
    token,
)
from support.rabbitmq import EventTap
from support.waiting import WAIT, wait_until

API = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture(scope="module")
def backend() -> Any:
    with BackendClient(AMQP_URL) as client:
        yield client


def session_ending(tap: EventTap, device: str) -> list[tuple[str, Any]]:
    """(name, data) of the events of `device`'s next session after its `session.connected`, through its
    `session.closed` (a newer session's events, which may come in between, are left out)."""
    session = tap.get(f"{device}.session.connected")["session"]
    got: list[tuple[str, Any]] = []
    while not got or got[-1][0] != "session.closed":
        event = tap.get()
        if event["device"] == device and event["session"] == session:
            got.append((event["name"], event["data"]))
    return got


# == keep-alive =======================================================================================
def test_a_silent_client_is_closed_after_its_keep_alive_and_its_will_published(gateway: Gateway) -> None:
    """K = 4: the silent client is cut (idle_timeout, its will first); the one whose paho pings stays."""
    silent, pinging = uid("mq"), uid("mq")
    with EventTap(f"{silent}.#", f"{pinging}.#") as tap:
        quiet = mqtt_device(gateway, silent, keepalive=4, will=("events/gone", b'{"why": "silent"}'))
        with mqtt_device(gateway, pinging, keepalive=4) as alive:
            sock = quiet.silence()
            assert session_ending(tap, silent) == [("gone", {"why": "silent"}),
                                                   ("session.closed", {"reason": "idle_timeout"})]
            assert closed_by_gateway(sock)
            # The pinging client has lived past 1.5 K too, and is still served.
            alive.event("still.here", b"")
            assert not alive.disconnected()
        assert tap.get(f"{pinging}.session.closed")["data"] == {"reason": "closed"}


# == wills ============================================================================================
def test_the_will_is_published_when_the_network_drops(gateway: Gateway) -> None:
    device = uid("mq")
    with EventTap(f"{device}.#") as tap:
        client = mqtt_device(gateway, device, will=("events/battery.gone", b"flat"))
        client.drop()
        assert session_ending(tap, device) == [("battery.gone", "flat"), ("session.closed", {"reason": "closed"})]


def test_no_will_after_disconnect(gateway: Gateway) -> None:
    device = uid("mq")
    with EventTap(f"{device}.#") as tap:
        mqtt_device(gateway, device, will=("events/battery.gone", b"flat")).close()
        # The will would come before session.closed: nothing does.
        assert session_ending(tap, device) == [("session.closed", {"reason": "closed"})]


def test_the_will_is_published_when_an_operator_kicks_the_session(gateway: Gateway) -> None:
    device = uid("mq")
    with EventTap(f"{device}.#") as tap, mqtt_device(gateway, device, will=("events/gone", b'{"kicked": true}')) as client:
        kicked = requests.delete(f"{gateway.http}/devices/{device}/session", headers=API, timeout=WAIT)
        assert kicked.status_code == 200, kicked.text
        wait_until(client.disconnected, WAIT)
        assert session_ending(tap, device) == [("gone", {"kicked": True}), ("session.closed", {"reason": "kicked"})]


# == takeover across transports =======================================================================
def test_an_mqtt_connect_replaces_a_json_session(gateway: Gateway) -> None:
    device = uid("mq")
    with EventTap(f"{device}.session.*") as tap:
        older, welcome = connect(gateway, "tcp", device)
        with older, mqtt_device(gateway, device) as newer:
            expect_error(older, "replaced")
            expect_closed(older)
            closed = tap.get(f"{device}.session.closed")
            assert closed["session"] == welcome["session"] and closed["data"] == {"reason": "replaced"}
            newer.subscribe(("commands/#", 1))
            for _ in range(3):  # the API, on whichever worker, reaches the MQTT session
                response = in_background(gateway.command, device, "unlock", timeout=WAIT)
                newer.answer(data="done")
                assert response.result(WAIT + 10).json() == {"ok": True, "data": "done", "error": None}
            assert not newer.disconnected()


def test_a_json_hello_replaces_an_mqtt_session(gateway: Gateway) -> None:
    device = uid("mq")
    with EventTap(f"{device}.#") as tap, mqtt_device(gateway, device, will=("events/gone", b"replaced")) as older:
        newer, _ = connect(gateway, "tcp", device)
        with newer:
            wait_until(older.disconnected, WAIT)
            assert session_ending(tap, device) == [("gone", "replaced"), ("session.closed", {"reason": "replaced"})]
            for _ in range(3):
                response = in_background(gateway.command, device, "unlock", timeout=WAIT)
                answer_next_command(newer)
                assert response.result(WAIT + 10).status_code == 200


def still_open(connection: RawMqtt | DeviceClient) -> bool:
    """Whether the gateway still holds this connection: it sends nothing for a moment (a replaced JSON session is
    told `replaced`, then closed; a replaced MQTT one is closed)."""
    try:
        if isinstance(connection, DeviceClient):
            frame = connection.receive(timeout=0.05)
            assert frame == {"type": "error", "code": "replaced", "id": None}, frame
            expect_closed(connection)
            return False
        connection.sock.settimeout(0.05)
        pytest.fail(f"unexpected packet {connection.read()}")
    except TimeoutError:
        return True
    except (Closed, OSError):
        return False
    finally:
        if isinstance(connection, RawMqtt):
            connection.sock.settimeout(WAIT)


def answer_on_mqtt(raw: RawMqtt) -> None:
    """Subscribe, read the next command and reply to it, on a bare-socket device."""
    raw.send(build.subscribe(1, ("commands/#", 1)))
    assert raw.read() == (SUBACK, b"\x00\x01\x01")
    first, body = raw.read()
    assert first == PUBLISH | 0x02, (first, body)  # QoS 1
    topic_end = 2 + int.from_bytes(body[:2])
    command = orjson.loads(body[topic_end + 2:])
    raw.send(build.publish(f"replies/{command['id']}", b'{"ok": true}', qos=1, packet_id=7))
    assert raw.read() == (PUBACK, b"\x00\x07")


def test_simultaneous_connects_over_mqtt_and_json_leave_exactly_one(gateway: Gateway) -> None:
    device = uid("mq")
    raws = [RawMqtt(gateway) for _ in range(3)]
    jsons = [DeviceClient(gateway.tcp, timeout=WAIT) for _ in range(3)]
    try:
        for raw, client in zip(raws, jsons, strict=True):  # as close together as we can
            raw.send(build.connect(device, token(device)))
            client.send({"type": "hello", "device": device, "token": token(device)})
        alive: list[RawMqtt | DeviceClient] = []
        for raw in raws:  # a CONNECT replaced while its route was being made is closed without a CONNACK
            with contextlib.suppress(Closed):
                assert raw.read() == (CONNACK, b"\x00\x00")
                alive.append(raw)
        for client in jsons:
            frame = client.receive(timeout=WAIT)
            if frame["type"] == "welcome":
                alive.append(client)
            else:
                assert frame == {"type": "error", "code": "replaced", "id": None}, frame
                expect_closed(client)

        def one_left() -> bool:
            alive[:] = [connection for connection in alive if still_open(connection)]
            return len(alive) <= 1

        wait_until(one_left, WAIT)
        assert len(alive) == 1, "no session survived"
        wait_until(lambda: sessions(gateway) == 1, WAIT)
        survivor = alive[0]
        response = in_background(gateway.command, device, "unlock", timeout=WAIT)
        if isinstance(survivor, RawMqtt):
            answer_on_mqtt(survivor)
        else:
            answer_next_command(survivor)
        assert response.result(WAIT + 10).status_code == 200
        assert still_open(survivor)
    finally:
        for connection in [*raws, *jsons]:
            connection.close()


# == MQTT over WebSocket ==============================================================================
def test_mqtt_over_websocket(gateway: Gateway, backend: BackendClient) -> None:
    device = uid("mq")
    with EventTap(f"{device}.#") as tap, mqtt_device(gateway, device, websocket=True) as client:
        connected = tap.get(f"{device}.session.connected")
        assert connected["data"] == {"transport": "mqtt-ws", "mqtt": 4}
        client.event("door.opened", b'{"by": "ws"}')
        assert tap.get(f"{device}.door.opened")["data"] == {"by": "ws"}
        assert client.subscribe(("commands/#", 1)) == [1]
        command_id = backend.send(device, "unlock", [1, 2], timeout=WAIT)
        assert client.next_command() == ("unlock", {"id": command_id, "data": [1, 2]}, 1)
        client.reply(command_id, data="ok")
        assert backend.wait(command_id, WAIT)["data"] == "ok"


def test_mqtt_over_websocket_is_one_byte_stream(gateway: Gateway) -> None:
    """A packet may span binary messages, and one message may hold several packets (MQTT 3.1.1 section 6)."""
    device = uid("mq")
    with EventTap(f"{device}.reading.*") as tap, RawMqttWs(gateway) as raw:
        assert isinstance(raw.upgrade, AcceptConnection) and raw.upgrade.subprotocol == "mqtt"
        hello = build.connect(device, token(device))
        raw.send(hello[:1], hello[1:7], hello[7:])
        assert raw.read() == (CONNACK, b"\x00\x00")
        raw.send(build.subscribe(1, ("commands/#", 1)) + build.publish("events/reading.ws", b"7", qos=1, packet_id=9)
                 + build.PINGREQ)
        assert sorted(raw.read() for _ in range(3)) == [(PUBACK, b"\x00\x09"), (SUBACK, b"\x00\x01\x01"),
                                                        (PINGRESP, b"")]
        assert tap.get(f"{device}.reading.ws")["data"] == 7


def test_an_mqtt_websocket_without_the_mqtt_subprotocol_is_400(gateway: Gateway) -> None:
    with RawMqttWs(gateway, subprotocols=()) as raw:
        assert isinstance(raw.upgrade, RejectConnection) and raw.upgrade.status_code == 400


# == malformed input ==================================================================================
def raw_after_connect(data: bytes) -> Callable[[Gateway, str], None]:
    """A case: a bare-socket device, accepted, then sends `data`; the gateway closes it without an answer."""
    def case(gateway: Gateway, device: str) -> None:
        with RawMqtt(gateway) as raw:
            assert raw.connect(device, token(device)) == 0x00
            raw.send(data)
            raw.expect_closed()
    return case


def websocket_after_connect(send: Callable[[RawMqttWs], None]) -> Callable[[Gateway, str], None]:
    """A case: a device on `GET /mqtt`, accepted, then breaks the WebSocket's rules; the gateway closes it."""
    def case(gateway: Gateway, device: str) -> None:
        with RawMqttWs(gateway) as raw:
            raw.send(build.connect(device, token(device)))
            assert raw.read() == (CONNACK, b"\x00\x00")
            send(raw)
            raw.expect_closed()
    return case


def paho_publishes(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Callable[[Gateway, str], None]:
    """A case: a paho device publishes what it may not; the gateway closes it."""
    def case(gateway: Gateway, device: str) -> None:
        with mqtt_device(gateway, device) as client:
            mid = client.publish(topic, payload, qos, retain)
            wait_until(client.disconnected, WAIT)
            assert not client.acked(mid) or qos == 0
    return case


@pytest.mark.parametrize(("case", "code"), [
    (raw_after_connect(b"\x30\xff\xff\xff\xff\x01"), "bad_frame"),  # remaining length over 4 bytes
    (raw_after_connect(build.connect("lock-1", token("lock-1"))), "bad_frame"),  # a second CONNECT
    (raw_after_connect(b"\x20\x02\x00\x00"), "bad_frame"),  # CONNACK: a packet only a server sends
    (raw_after_connect(build.publish("events/x", b"\xff\xfe")), "bad_frame"),  # a payload that is not UTF-8
    (paho_publishes("events/door.opened", b"{}", qos=2), "unauthorized"),
    (paho_publishes("events/door.opened", b"{}", retain=True), "unauthorized"),
    (paho_publishes("devices/other/commands/unlock", b"{}"), "unauthorized"),
    (paho_publishes("events/big", b"x" * 70000, qos=0), "frame_too_large"),
    (paho_publishes("events/session.closed", b'{"reason": "spoofed"}'), "bad_frame"),  # reserved for the gateway
    (paho_publishes("events/door opened", b"{}"), "bad_frame"),  # not dot-separated words
    (paho_publishes("replies/c-1", b"done"), "bad_frame"),  # a reply must be {"ok": ...}
    (websocket_after_connect(lambda raw: raw.send_text("PINGREQ")), "bad_frame"),
    (websocket_after_connect(lambda raw: raw.sock.sendall(b"\x82\x02" + build.PINGREQ)), "bad_frame"),  # unmasked
], ids=["remaining length", "second CONNECT", "server packet", "not UTF-8", "QoS 2", "retained", "other topic",
        "too large", "session event", "bad event name", "bad reply", "ws text message", "ws unmasked frame"])
def test_malformed_input_closes_only_that_connection_and_is_counted(gateway: Gateway, case: Any, code: str) -> None:
    metric = f'warren_errors_sent_total{{code="{code}"}}'
    device, other = uid("mq"), uid("mq")
    with EventTap(f"{device}.session.closed", f"{other}.still.here") as tap, mqtt_device(gateway, other) as bystander:
        before = counted(gateway, metric)
        case(gateway, device)
        assert tap.get(f"{device}.session.closed")["data"] == {"reason": code}
        wait_until(lambda: counted(gateway, metric) > before, WAIT)
        bystander.event("still.here", b"1")
        assert not bystander.disconnected()


# == the mosquitto binaries ===========================================================================
def mosquitto(binary: str, gateway: Gateway, device: str, *args: str) -> subprocess.Popen:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed")
    return subprocess.Popen([path, "-h", "127.0.0.1", "-p", str(gateway.mqtt_port), "-V", "mqttv311", "-i", device,
                             "-u", "sdk", "-P", token(device), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_mosquitto_pub_publishes_an_event(gateway: Gateway) -> None:
    device = uid("mq")
    with EventTap(f"{device}.#") as tap:
        process = mosquitto("mosquitto_pub", gateway, device, "-q", "1", "-t", "events/door.opened",
                            "-m", '{"battery": 97}')
        _, err = process.communicate(timeout=WAIT)
        assert process.returncode == 0, err  # at QoS 1 it waits for the PUBACK
        event = tap.get(f"{device}.door.opened")
        assert (event["device"], event["data"]) == (device, {"battery": 97})


def test_mosquitto_sub_receives_a_command(gateway: Gateway, backend: BackendClient) -> None:
    device = uid("mq")
    with EventTap(f"{device}.session.connected") as tap:
        process = mosquitto("mosquitto_sub", gateway, device, "-q", "1", "-t", "commands/#", "-C", "1", "-v")
        try:
            tap.get(f"{device}.session.connected")
            command_id = backend.send(device, "unlock", {"for": 5}, timeout=WAIT)
            out, err = process.communicate(timeout=WAIT)
        finally:
            process.kill()
    assert process.returncode == 0, err
    topic, payload = out.decode().strip().split(" ", 1)
    assert (topic, orjson.loads(payload)) == ("commands/unlock", {"id": command_id, "data": {"for": 5}})


def test_no_gateway_logged_a_crash(gateway: Gateway) -> None:
    """Last: whatever the tests above sent, no session crashed and no worker died (the logs say so)."""
    log = gateway.log()
    for marker in ("Traceback", "CRITICAL", "Worker exiting", "WORKER TIMEOUT"):
        assert marker not in log, f"{marker!r} in {gateway.log_path}:\n{log[-5000:]}"
    assert requests.get(f"{gateway.http}/healthz", timeout=WAIT).status_code == 200

