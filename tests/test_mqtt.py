"""MQTT 3.1.1 devices against real gunicorn (2 workers) and the real RabbitMQ (PROTOCOL.md section 8): CONNECT,
events and commands. Sessions (keep-alive, wills, takeover), WebSocket, malformed input and the mosquitto binaries
are in test_mqtt_sessions.py; the devices of both are in support/mqtt_devices.py.

Devices are unmodified paho-mqtt 2.2.0 clients, or a bare socket (`RawMqtt`) where a real client cannot send what a
test needs (a level 3 CONNECT, nothing at all) or where a test must see every packet the gateway writes, in order.
Backends are `BackendClient`s, the HTTP API, and `EventTap` queues bound to `devices.events`. Nothing asserts how
long something took, only that it happens within a generous timeout.
"""

from __future__ import annotations

import shutil
import uuid
from typing import Any

import orjson
import pytest
import requests

from clients.backend import BackendClient
from support.devices import in_background, uid
from support.gateways import AMQP_URL, Gateway, counted, sessions, start_gateway
from support.mqtt_devices import CONNACK, PINGRESP, MqttDevice, RawMqtt, build, mqtt_device, token
from support.rabbitmq import PRIVATE_VHOST, EventTap, private_vhost, routed
from support.waiting import WAIT, wait_until


@pytest.fixture(scope="module")
def backend() -> Any:
    with BackendClient(AMQP_URL) as client:
        yield client


@pytest.fixture(scope="module")
def lone(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One worker that takes one session (MAX_CONNECTIONS=1) and 5 events a second (a burst of 3), on a RabbitMQ
    vhost of its own so that no catch-all queue of another tool routes its events."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is needed to make a private vhost (the shared one may route every key)")
    instance = start_gateway(tmp_path_factory.mktemp("lone"), workers=1, MAX_CONNECTIONS="1", EVENT_RATE="5",
                             EVENT_BURST="3", AMQP_URL=private_vhost(PRIVATE_VHOST))
    yield instance
    instance.stop()


@pytest.fixture
def lone_gw(lone: Gateway) -> Gateway:
    """The lone gateway once the session of an earlier test is gone."""
    wait_until(lambda: sessions(lone) == 0, WAIT)
    return lone


# == CONNECT ==========================================================================================
@pytest.mark.parametrize("clean_session", [True, False])
def test_connect_is_accepted_and_presence_says_mqtt(gateway: Gateway, clean_session: bool) -> None:
    device = uid("mq")
    with EventTap(f"{device}.session.*") as tap:
        client = mqtt_device(gateway, device, clean_session=clean_session)  # session present 0 either way
        connected = tap.get(f"{device}.session.connected")
        assert connected["device"] == device and connected["data"] == {"transport": "mqtt", "mqtt": 4}
        client.close()
        closed = tap.get(f"{device}.session.closed")
        assert closed["session"] == connected["session"] and closed["data"] == {"reason": "closed"}


@pytest.mark.parametrize(("case", "packet", "code"), [
    ("wrong token", lambda d: build.connect(d, "00" * 32), 0x05),
    ("another device's token", lambda d: build.connect(d, token("someone-else")), 0x05),
    ("no password", lambda d: build.connect(d, username="sdk-user"), 0x05),
    ("will on another topic", lambda d: build.connect(d, token(d), will=("status/gone", b"x")), 0x05),
    ("empty client id", lambda d: build.connect("", token("")), 0x02),
    ("client id with a dot", lambda d: build.connect("lock.1", token("lock.1")), 0x02),
    ("client id of 129 characters", lambda d: build.connect("x" * 129, token("x" * 129)), 0x02),
    ("protocol level 3", lambda d: build.connect(d, token(d), level=3), 0x01),
    ("protocol level 6", lambda d: build.connect(d, token(d), level=6), 0x01),  # 5 is test_mqtt5.py's
])
def test_refused_connect_gets_its_code_then_the_close(gateway: Gateway, case: str, packet: Any, code: int) -> None:
    with RawMqtt(gateway) as raw:
        raw.send(packet(uid("mq")))
        assert raw.read() == (CONNACK, bytes([0, code])), case
        raw.expect_closed()


@pytest.mark.parametrize(("device", "password", "reason"), [
    (None, "00" * 32, "Not authorized"), (None, None, "Not authorized"),
    ("lock.1", token("lock.1"), "Client identifier not valid"),
])
def test_paho_hears_the_refusal(gateway: Gateway, device: str | None, password: str | None, reason: str) -> None:
    client = MqttDevice(gateway, device, password=password)
    try:
        assert client.connack() == (False, reason)
    finally:
        client.client.loop_stop()


def test_connect_over_max_connections_is_connack_3(lone_gw: Gateway) -> None:
    with RawMqtt(lone_gw) as first, RawMqtt(lone_gw) as second:
        device = uid("mq")
        assert first.connect(device, token(device)) == 0x00
        other = uid("mq")
        assert second.connect(other, token(other)) == 0x03
        second.expect_closed()
        first.send(build.PINGREQ)
        assert first.read() == (PINGRESP, b"")


@pytest.mark.parametrize("first_bytes", [b"", build.PINGREQ, build.connect("lock-1", token("lock-1"))[:9]],
                         ids=["nothing", "PINGREQ", "part of a CONNECT"])
def test_no_connect_in_time_closes_without_a_connack(gateway: Gateway, first_bytes: bytes) -> None:
    """HELLO_TIMEOUT=2: nothing, a packet that is not CONNECT, or an unfinished CONNECT is closed, unanswered."""
    with RawMqtt(gateway) as raw:
        raw.send(first_bytes)
        raw.expect_closed()


# == events/<name> ====================================================================================
@pytest.mark.parametrize(("payload", "data"), [
    (b'{"battery": 97}', {"battery": 97}), (b"[1, 2]", [1, 2]), (b"42", 42), (b"on", "on"),
    ("23.5 °C".encode(), "23.5 °C"), (b"", None),
], ids=["object", "array", "number", "text", "utf-8 text", "empty"])
def test_qos1_event_is_pubacked_once_it_is_in_rabbitmq(gateway: Gateway, payload: bytes, data: Any) -> None:
    device = uid("mq")
    with EventTap(f"{device}.#") as tap, mqtt_device(gateway, device) as client:
        session = tap.get(f"{device}.session.connected")["session"]
        ids = set()
        for _ in range(2):
            client.event("reading.now", payload)
            # The PUBACK came after RabbitMQ's confirm, so the event is in our queue already: one get, no waiting.
            message = tap.channel.basic_get(tap.queue, no_ack=True)
            assert message is not None, "PUBACK before the event reached its queue"
            assert message.delivery_info["routing_key"] == f"{device}.reading.now"
            body = orjson.loads(message.body)
            assert (body["device"], body["session"], body["name"], body["data"]) == (device, session, "reading.now",
                                                                                       data)
            ids.add(body["id"])
        assert len(ids) == 2, "the gateway's event ids must be unique"


def test_event_ids_are_unique_across_connections(gateway: Gateway) -> None:
    """Backends deduplicate at-least-once events by (device, id): a reconnected device must not reuse ids."""
    device = uid("mq")
    with EventTap(f"{device}.reading.*") as tap:
        ids = []
        for _ in range(2):
            with mqtt_device(gateway, device) as client:
                client.event("reading.now", b"1")
            ids.append(tap.get(f"{device}.reading.now")["id"])
        assert ids[0] != ids[1], ids


def test_unroutable_qos1_event_closes_the_connection_without_puback(lone_gw: Gateway) -> None:
    device, name = uid("nobody-listens"), f"probe.{uuid.uuid4().hex[:8]}"
    if routed(f"{device}.{name}", PRIVATE_VHOST):
        pytest.skip(f"a queue on vhost {PRIVATE_VHOST} routes every key: an unroutable event cannot be made")
    before = counted(lone_gw, 'warren_events_total{outcome="unroutable"}')
    with mqtt_device(lone_gw, device) as client:
        mid = client.publish(f"events/{name}", b"1")
        wait_until(client.disconnected, WAIT)
        assert not client.acked(mid), client.seen
    wait_until(lambda: counted(lone_gw, 'warren_events_total{outcome="unroutable"}') > before, WAIT)
    wait_until(lambda: sessions(lone_gw) == 0, WAIT)
    # The same event, once a queue takes it, is PUBACKed: the close was about routing alone.
    with EventTap(f"{device}.#", vhost=PRIVATE_VHOST) as tap, mqtt_device(lone_gw, device) as client:
        client.event(name, b"1")
        assert tap.get(f"{device}.{name}")["data"] == 1


def test_unroutable_qos0_event_is_dropped_counted_and_the_connection_stays(lone_gw: Gateway) -> None:
    device = uid("nobody-listens")
    if routed(f"{device}.probe.zero", PRIVATE_VHOST):
        pytest.skip(f"a queue on vhost {PRIVATE_VHOST} routes every key: an unroutable event cannot be made")
    before = counted(lone_gw, 'warren_events_total{outcome="unroutable"}')
    with RawMqtt(lone_gw) as raw:
        assert raw.connect(device, token(device)) == 0x00
        raw.send(build.publish("events/probe.zero", b"1", qos=0))
        wait_until(lambda: counted(lone_gw, 'warren_events_total{outcome="unroutable"}') > before, WAIT)
        raw.send(build.PINGREQ)
        assert raw.read() == (PINGRESP, b"")


def test_qos1_event_that_rabbitmq_nacks_closes_the_connection_without_puback(gateway: Gateway) -> None:
    """Routed, yet refused: a queue that rejects publishes makes RabbitMQ nack the event, so the PUBACK (which only
    RabbitMQ's confirm may give) never comes."""
    device = uid("mq")
    with EventTap(f"{device}.session.closed") as tap, mqtt_device(gateway, device) as client:
        full, _, _ = tap.channel.queue_declare(queue="", exclusive=True, auto_delete=True,
                                               arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
        tap.channel.queue_bind(full, "devices.events", routing_key=f"{device}.refused.*")
        mid = client.publish("events/refused.one", b"1")
        wait_until(client.disconnected, WAIT)
        assert not client.acked(mid), client.seen
        assert tap.get(f"{device}.session.closed")["data"] == {"reason": "closed"}


def test_events_over_the_rate_limit_are_slowed_down_never_refused(lone_gw: Gateway) -> None:
    """EVENT_RATE=5, EVENT_BURST=3: a burst of 12 QoS 1 events is read more slowly (backpressure), and every one is
    PUBACKed and stored; over JSON, most would have been nacked `rate_limited`."""
    device = uid("mq")
    limited = 'warren_events_total{outcome="rate_limited"}'
    before = counted(lone_gw, limited)
    with EventTap(f"{device}.burst.*", vhost=PRIVATE_VHOST) as tap, mqtt_device(lone_gw, device) as client:
        mids = [client.publish("events/burst.n", str(n).encode()) for n in range(12)]
        wait_until(lambda: all(client.acked(mid) for mid in mids), WAIT)
        assert [tap.get(f"{device}.burst.n")["data"] for _ in mids] == list(range(12))
        assert not client.disconnected()
    assert counted(lone_gw, limited) == before


def test_qos0_event_is_published_and_never_answered(gateway: Gateway) -> None:
    device = uid("mq")
    with EventTap(f"{device}.reading.*") as tap, RawMqtt(gateway) as raw:
        assert raw.connect(device, token(device)) == 0x00
        raw.send(build.publish("events/reading.zero", b'{"t": 1}', qos=0) + build.PINGREQ)
        assert raw.read() == (PINGRESP, b""), "a QoS 0 event got an answer"
        assert tap.get(f"{device}.reading.zero")["data"] == {"t": 1}


# == commands =========================================================================================
def test_commands_through_rabbitmq_and_the_http_api(gateway: Gateway, backend: BackendClient) -> None:
    with mqtt_device(gateway) as client:
        assert client.subscribe(("commands/#", 1)) == [1]
        command_id = backend.send(client.device, "unlock", {"for": 5}, timeout=WAIT)
        name, payload, qos = client.next_command()
        assert (name, payload, qos) == ("unlock", {"id": command_id, "data": {"for": 5}}, 1)
        client.reply(command_id, data={"unlocked": True})
        reply = backend.wait(command_id, WAIT)
        assert (reply["device"], reply["ok"], reply["data"]) == (client.device, True, {"unlocked": True})

        response = in_background(gateway.command, client.device, "lock", {"now": True}, timeout=WAIT)
        name, payload, _ = client.answer(ok=False, error="jammed")
        assert (name, payload["data"]) == ("lock", {"now": True})
        answered = response.result(WAIT + 10)
        assert answered.status_code == 200 and answered.json() == {"ok": False, "data": None, "error": "jammed"}


def test_a_command_before_subscribe_is_held_until_it(gateway: Gateway, backend: BackendClient) -> None:
    delivered = 'warren_commands_total{outcome="delivered"}'
    with mqtt_device(gateway) as client:
        before = counted(gateway, delivered)
        command_id = backend.send(client.device, "unlock", "held", timeout=WAIT)
        wait_until(lambda: counted(gateway, delivered) > before, WAIT)  # the session has it
        assert client.messages() == []
        assert client.subscribe(("commands/+", 0)) == [0]
        assert client.next_command() == ("unlock", {"id": command_id, "data": "held"}, 0)
        kinds = [seen[0] for seen in client.seen]
        assert kinds.index("suback") < kinds.index("message"), client.seen
        client.reply(command_id)
        assert backend.wait(command_id, WAIT)["ok"] is True


def test_a_reply_for_no_pending_command_is_pubacked_counted_and_ignored(gateway: Gateway) -> None:
    metric = 'warren_errors_sent_total{code="unknown_command"}'
    with mqtt_device(gateway) as client:
        before = counted(gateway, metric)
        client.reply("no-such-command")  # PUBACKed at once
        wait_until(lambda: counted(gateway, metric) > before, WAIT)
        assert client.subscribe(("commands/#", 1)) == [1] and not client.disconnected()


@pytest.mark.parametrize("name", ["door/unlock", "door+", "#"])
def test_a_command_name_that_is_no_topic_level_is_bad_command(gateway: Gateway, backend: BackendClient,
                                                               name: str) -> None:
    with mqtt_device(gateway) as client:
        client.subscribe(("commands/#", 1))
        reply = backend.command(client.device, name, timeout=WAIT)
        assert (reply["ok"], reply["error"]) == (False, "bad_command")
        command_id = backend.send(client.device, "unlock", timeout=WAIT)  # the session carries on
        assert client.next_command() == ("unlock", {"id": command_id, "data": None}, 1)
        assert len(client.messages()) == 1


def test_suback_refuses_other_filters_and_a_command_comes_once(gateway: Gateway, backend: BackendClient) -> None:
    with mqtt_device(gateway) as client:
        codes = client.subscribe(("commands/#", 0), ("events/#", 1), ("commands/unlock", 1), ("#", 0),
                                 ("commands/+", 1))
        assert codes == [0, 0x80, 0x80, 0x80, 1]
        first = backend.send(client.device, "unlock", 1, timeout=WAIT)
        second = backend.send(client.device, "unlock", 2, timeout=WAIT)
        assert client.next_command() == ("unlock", {"id": first, "data": 1}, 1)  # the highest QoS granted
        assert client.next_command() == ("unlock", {"id": second, "data": 2}, 1)  # not `first` again


def test_no_gateway_logged_a_crash(gateway: Gateway, lone: Gateway) -> None:
    """Last: whatever the tests above sent, no session crashed and no worker died (the logs say so)."""
    for instance in (gateway, lone):
        log = instance.log()
        for marker in ("Traceback", "CRITICAL", "Worker exiting", "WORKER TIMEOUT"):
            assert marker not in log, f"{marker!r} in {instance.log_path}:\n{log[-5000:]}"
        assert requests.get(f"{instance.http}/healthz", timeout=WAIT).status_code == 200
