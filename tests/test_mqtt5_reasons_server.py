"""MQTT 5 reason codes for what the gateway refuses or ends on its own, against real gunicorn (PROTOCOL.md section 9).

CONNACK 0x89 (server busy) and 0x88 (server unavailable, in a drain) with
`retry_after`; DISCONNECT 0x8B (shutting down), 0x8D (keep alive timeout) and
0x8E (taken over, across transports); a command over the device's Maximum
Packet Size, never sent, answered `too_large`; the SUBACK mosquitto_sub -V 5
reads; the device's own DISCONNECT 0x04 (the will first) and 0x00 (no will);
Request Problem Information 0 on a DISCONNECT and a PUBACK 0x83. What a device
may not send: test_mqtt5_reasons.py.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from app.mqtt.packets import Properties
from bench.stampede import mqtt_codec as build
from clients.backend import BackendClient
from support.devices import uid
from support.gateways import AMQP_URL, Gateway, sessions, start_gateway
from support.mqtt5_devices import DISCONNECT, PUBACK, PUBLISH, SUBACK, Raw5, command_publish, publish5, subscribe5
from support.mqtt_devices import PINGRESP, token
from support.paho5_devices import Paho5
from support.rabbitmq import PRIVATE_VHOST, EventTap, private_vhost, routed
from support.tls_devices import Pki
from support.waiting import WAIT, wait_until

QUIET = Properties(request_problem_information=0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("pki5s"))


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Gateway]:
    """Two workers with TLS on, for what any gateway does."""
    instance = start_gateway(tmp_path_factory.mktemp("mqtt5-server"), workers=2, HELLO_TIMEOUT="2", **pki.tls_env())
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def lone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One worker that takes one session."""
    instance = start_gateway(tmp_path_factory.mktemp("mqtt5-lone"), workers=1, MAX_CONNECTIONS="1")
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """On a vhost of its own, so that no catch-all queue of another tool routes its events."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is needed to make a private vhost (the shared one may route every key)")
    instance = start_gateway(tmp_path_factory.mktemp("mqtt5-private-r"), workers=1,
                             AMQP_URL=private_vhost(PRIVATE_VHOST))
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def backend() -> Iterator[BackendClient]:
    with BackendClient(AMQP_URL) as client:
        yield client


def retry_after(props: Properties | None) -> float:
    """The one User Property of a refusal that says when to come back, in seconds."""
    assert props is not None
    [(key, value)] = props.user_properties
    assert key == "retry_after"
    return float(value)


# == the gateway cannot take a session ================================================================
@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_over_max_connections_a_connect_is_connack_0x89_with_retry_after(lone: Gateway, transport: str) -> None:
    wait_until(lambda: sessions(lone) == 0, WAIT)  # the last test's session is gone
    with Raw5(lone, transport) as first, Raw5(lone, transport) as second:
        assert first.connect(uid("mq5"))[0] == 0x00
        code, props = second.connect(uid("mq5"))
        assert code == 0x89 and props is not None and props.reason_string == "overloaded"
        assert 0 < retry_after(props) <= 30
        second.expect_closed()
        first.send(build.PINGREQ)  # the session it holds goes on
        assert first.read() == (PINGRESP, b"")


@pytest.mark.slow
def test_a_drain_ends_sessions_0x8b_and_refuses_connects_0x88(tmp_path: Path) -> None:
    """SIGTERM: every session gets DISCONNECT 0x8B, and a CONNECT on a connection accepted before it gets 0x88.

    A worker drains only while it holds sessions: `holder`'s stays in the worker's registry while its second
    PINGREQ waits for the rate limit (EVENT_RATE 0.1: ten seconds), so the drain lasts its whole window
    (GRACEFUL_TIMEOUT less 3 s: seven seconds, the most a retry_after may say), and the late CONNECTs,
    sent once the drain has begun, meet a worker that is shutting down, not one that is gone.
    """
    gateway = start_gateway(tmp_path, workers=1, EVENT_RATE="0.1", EVENT_BURST="1", GRACEFUL_TIMEOUT="10")
    try:
        with Raw5(gateway) as holder, Raw5(gateway) as quiet, Raw5(gateway) as late, Raw5(gateway, "ws") as late_ws:
            holder.connect(uid("mq5"))
            holder.send(build.PINGREQ * 2)
            assert holder.read() == (PINGRESP, b"")
            quiet.connect(uid("mq5"), props=QUIET)
            gateway.process.send_signal(signal.SIGTERM)
            code, props = holder.expect(DISCONNECT)
            assert code == 0x8B and props is not None and props.reason_string == "shutting_down"
            assert 0 < retry_after(props) <= 7
            assert quiet.read() == (DISCONNECT, b"\x8b")  # Request Problem Information 0: no reason, no retry_after
            for refused in (late, late_ws):
                code, props = refused.connect(uid("mq5"))
                assert code == 0x88 and props is not None and props.reason_string == "shutting_down"
                assert 0 < retry_after(props) <= 7
                refused.expect_closed()
        assert gateway.process.wait(WAIT + 10) == 0
    finally:
        gateway.stop()


# == the gateway ends a session =======================================================================
@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_a_silent_device_gets_disconnect_0x8d_after_its_keep_alive(gw: Gateway, pki: Pki, transport: str) -> None:
    device = uid("mq5")
    with EventTap(f"{device}.session.closed") as tap, Raw5(gw, transport, pki) as raw:
        assert raw.connect(device, keep_alive=1)[0] == 0x00  # closed past 1.5 s of silence
        assert raw.expect(DISCONNECT) == (0x8D, Properties(reason_string="idle_timeout"))
        raw.expect_closed()
        assert tap.get(f"{device}.session.closed")["data"] == {"reason": "idle_timeout"}


REPLACED = Properties(reason_string="replaced")


@pytest.mark.parametrize(("old", "props", "new", "told"), [
    ("ws", None, "tls", REPLACED),
    ("tls", QUIET, "ws", None),  # Request Problem Information 0: no Reason String
    ("tcp", None, "paho", REPLACED),
], ids=["ws by tls", "tls by ws, no problem information", "tcp by paho"])
def test_a_takeover_is_disconnect_0x8e(gw: Gateway, pki: Pki, old: str, props: Properties | None, new: str,
                                       told: Properties | None) -> None:
    device = uid("mq5")
    with Raw5(gw, old, pki) as older:
        older.connect(device, props=props)
        if new == "paho":
            with Paho5(gw, device=device):
                assert older.expect(DISCONNECT) == (0x8E, told)
        else:
            with Raw5(gw, new, pki) as newer:
                assert newer.connect(device)[0] == 0x00
                assert older.expect(DISCONNECT) == (0x8E, told)
        older.expect_closed()


# == commands =========================================================================================
def test_a_command_over_the_devices_maximum_packet_size_is_not_sent_and_answered_too_large(
        gw: Gateway, backend: BackendClient) -> None:
    device = uid("mq5")
    with Raw5(gw) as raw:
        raw.connect(device, props=Properties(maximum_packet_size=256))
        raw.send(subscribe5(1, ("commands/#", 1)))
        assert raw.read() == (SUBACK, b"\x00\x01\x00\x01")
        big = backend.send(device, "unlock", {"note": "x" * 256}, timeout=WAIT)
        assert backend.wait(big, WAIT) == {"device": device, "id": big, "ok": False, "data": None,
                                           "error": "too_large"}
        small = backend.send(device, "lock", {"n": 1}, timeout=WAIT)
        first, body = raw.read()  # the next PUBLISH is the small one: the big one never went
        assert first & 0xF0 == PUBLISH
        topic, _, props, payload = command_publish(body, 1)
        assert (topic, orjson.loads(payload), props.correlation_data) == ("commands/lock", {"id": small, "data":
                                                                                             {"n": 1}}, small.encode())


def test_mosquitto_sub_reads_its_suback_and_receives_a_command(gw: Gateway, backend: BackendClient) -> None:
    binary = shutil.which("mosquitto_sub")
    if binary is None:
        pytest.fail("mosquitto_sub is not installed (Debian's mosquitto-clients)")
    device = uid("mq5")
    with EventTap(f"{device}.session.connected") as tap:
        process = subprocess.Popen([binary, "-h", "127.0.0.1", "-p", str(gw.mqtt_port), "-V", "5", "-i", device,
                                    "-u", "sdk", "-P", token(device), "-q", "1", "-t", "commands/#", "-t", "status/#",
                                    "-t", "commands/+", "-C", "1", "-v", "-d"], stdout=subprocess.PIPE, text=True)
        try:
            tap.get(f"{device}.session.connected")
            command_id = backend.send(device, "unlock", {"for": 5}, timeout=WAIT)
            out, _ = process.communicate(timeout=WAIT)
        finally:
            process.kill()
    lines = out.splitlines()
    assert "Subscribed (mid: 1): 1, 135, 1" in lines, out  # QoS 1, 0x87 not authorized, QoS 1
    assert f'commands/unlock {{"id":"{command_id}","data":{{"for":5}}}}' in lines, out


# == the device's DISCONNECT ==========================================================================
CLOSED = ("session.closed", {"reason": "closed"})


@pytest.mark.parametrize(("reason", "events"), [
    (0x04, [("lock.lost", "gone"), CLOSED]),  # disconnect with will message: the will first
    (0x00, [CLOSED]),  # a normal disconnection: no will (it would have come first)
], ids=["0x04", "0x00"])
def test_the_devices_disconnect_says_whether_its_will_goes(gw: Gateway, reason: int, events: list[tuple]) -> None:
    device = uid("mq5")
    with EventTap(f"{device}.#") as tap:
        client = Paho5(gw, device=device, will=("events/lock.lost", b'"gone"'))
        assert tap.get()["name"] == "session.connected"
        client.close(reason)
        assert [(event["name"], event["data"]) for event in (tap.get() for _ in events)] == events


# == Request Problem Information 0 on a PUBACK ========================================================
def test_request_problem_information_0_leaves_puback_0x83_bare(private: Gateway) -> None:
    device, name = uid("nobody-listens"), f"probe.{uuid.uuid4().hex[:8]}"
    if routed(f"{device}.{name}", PRIVATE_VHOST):
        pytest.skip(f"a queue on vhost {PRIVATE_VHOST} routes every key: an unroutable event cannot be made")
    with Raw5(private) as raw:
        raw.connect(device, props=QUIET)
        raw.send(publish5(f"events/{name}", b"1", packet_id=7))
        assert raw.read() == (PUBACK, b"\x00\x07\x83")  # no unroutable, no retry_after
        raw.send(build.PINGREQ)  # and the connection stays
        assert raw.read() == (PINGRESP, b"")


def test_no_worker_logged_a_crash(gw: Gateway, lone: Gateway) -> None:
    """Last: no session crashed and no worker died (the logs say so)."""
    for gateway in (gw, lone):
        log = gateway.log()
        for marker in ("Traceback", "CRITICAL", "Worker exiting", "WORKER TIMEOUT"):
            assert marker not in log, log

