"""MQTT 5 reason codes for what a device may not send, against real gunicorn (PROTOCOL.md section 9).

Every refusal after the CONNACK is a DISCONNECT with the reason code section 9
gives and, as its Reason String, the section 4 code the close is counted under
(the presence event's reason too); Request Problem Information 0 leaves the
DISCONNECT bare. SUBACK codes, and the CONNACK that explains even then.

Most cases over TCP; a representative few over TLS and `/mqtt` as well. Devices:
paho-mqtt 2.x in MQTTv5 mode wherever it can send the case, mosquitto_pub and
mosquitto_sub -V 5 for two, and a bare socket (support/mqtt5_devices.py) for the
bytes no stock client sends. What the gateway ends on its own (busy, shutting
down, idle, takeover), commands and the device's DISCONNECT: test_mqtt5_reasons_server.py.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest
from paho.mqtt.packettypes import PacketTypes

from app.mqtt.packets import Properties
from app.mqtt.properties import varint_bytes
from bench.stampede import mqtt_codec as build
from support.devices import uid
from support.gateways import Gateway, start_gateway
from support.mqtt5_devices import (
    DISCONNECT,
    PUBACK,
    SUBACK,
    Raw5,
    connect5,
    publish5,
    reason_and_properties,
    s,
    subscribe5,
)
from support.mqtt_devices import PINGRESP, token
from support.paho5_devices import Paho5, paho_properties
from support.rabbitmq import EventTap
from support.tls_devices import Pki
from support.waiting import WAIT

MAX_FRAME_BYTES = 65536  # the gateway's default, its CONNACK's Maximum Packet Size
RECEIVE_MAXIMUM = 64  # the gateway's CONNACK says so (test_mqtt5.py asserts it)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("pki5r"))


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Gateway]:
    """Two workers with TLS on: every test's device is its own, so one gateway serves them all."""
    instance = start_gateway(tmp_path_factory.mktemp("mqtt5-reasons"), workers=2, HELLO_TIMEOUT="2",
                             **pki.tls_env())
    yield instance
    instance.stop()


# Only the fixed header of a PUBLISH one byte over MAX_FRAME_BYTES (1 + 3 length bytes + 65533): the gateway
# refuses it from there, and no unread body is left in its socket to turn the close into a reset.
OVERSIZED_PUBLISH = b"\x30" + varint_bytes(MAX_FRAME_BYTES - 3)

EVERYWHERE: dict[str, tuple[bytes, int, str]] = {
    "a publish to another topic": (publish5("status/door", b"1", packet_id=1), 0x90, "unauthorized"),
    "a second CONNECT": (connect5("lock-5"), 0x82, "bad_frame"),
    "a PUBLISH over MAX_FRAME_BYTES": (OVERSIZED_PUBLISH, 0x95, "frame_too_large"),
}


# == the same answers on every transport ==============================================================
@pytest.mark.parametrize("transport", ["tcp", "tls", "ws"])
@pytest.mark.parametrize("case", list(EVERYWHERE))
def test_a_broken_rule_is_a_disconnect_saying_why_on_every_transport(gw: Gateway, pki: Pki, transport: str,
                                                                     case: str) -> None:
    packet, reason, code = EVERYWHERE[case]
    device = uid("mq5")
    with EventTap(f"{device}.session.closed") as tap, Raw5(gw, transport, pki) as raw:
        raw.connect(device)
        raw.send(packet)
        assert raw.expect(DISCONNECT) == (reason, Properties(reason_string=code))
        raw.expect_closed()
        assert tap.get(f"{device}.session.closed")["data"] == {"reason": code}  # counted under the same code


# == bytes no stock client sends ======================================================================
RAW: dict[str, tuple[bytes, int, str]] = {
    "a PUBLISH at QoS 3": (build.packet(0x36, s("events/x") + b"\x00\x01\x00" + b"1"), 0x81, "bad_frame"),
    "a SUBSCRIBE without its reserved flags": (build.packet(0x80, b"\x00\x01\x00" + s("commands/#") + b"\x01"),
                                               0x81, "bad_frame"),
    "a remaining length in more bytes than it needs": (b"\xc0\x80\x00", 0x81, "bad_frame"),
    "a topic that is not UTF-8": (build.packet(0x30, s(b"events/\xff") + b"\x00" + b"1"), 0x81, "bad_frame"),
    "a wildcard in a topic name": (publish5("events/+", b"1"), 0x81, "bad_frame"),
    "a CONNACK": (b"\x20\x03\x00\x00\x00", 0x82, "bad_frame"),
    "an AUTH": (b"\xf0\x00", 0x82, "bad_frame"),
    "a PUBREC (the gateway never sends QoS 2)": (b"\x50\x02\x00\x01", 0x82, "bad_frame"),
    "an empty topic with an alias never set": (publish5("", b"1", props=Properties(topic_alias=3)), 0x82, "bad_frame"),
    "topic alias 0": (publish5("events/x", b"1", props=Properties(topic_alias=0)), 0x94, "bad_frame"),
    "a topic alias over the maximum": (publish5("events/x", b"1", props=Properties(topic_alias=17)), 0x94,
                                       "bad_frame"),
    "an event payload that is not UTF-8": (publish5("events/x", b"\xff\xfe", packet_id=1), 0x99, "bad_frame"),
    "event data nested too deep": (publish5("events/deep", b"[" * 201 + b"]" * 201, packet_id=1), 0x99,
                                   "bad_frame"),
    "a reply that is not an object": (publish5("replies/c-1", b"[1]", packet_id=1), 0x99, "bad_frame"),
    "a reserved event name": (publish5("events/session.forged", b"1"), 0x90, "bad_frame"),
}


@pytest.mark.parametrize("case", list(RAW))
def test_what_no_stock_client_sends_is_a_disconnect_saying_why(gw: Gateway, case: str) -> None:
    packet, reason, code = RAW[case]
    with Raw5(gw) as raw:
        raw.connect(uid("mq5"))
        raw.send(packet)
        assert raw.expect(DISCONNECT) == (reason, Properties(reason_string=code))
        raw.expect_closed()


def test_more_qos_1_events_in_flight_than_the_receive_maximum_is_0x93(gw: Gateway) -> None:
    """Sent in one write, ahead of any PUBACK: the one past the CONNACK's Receive Maximum ends the connection."""
    with Raw5(gw) as raw:
        raw.connect(uid("mq5"))
        raw.send(b"".join(publish5("events/burst", b"1", packet_id=n) for n in range(1, RECEIVE_MAXIMUM + 17)))
        acked = 0
        while (packet := raw.read())[0] == PUBACK:
            acked += 1
        assert packet[0] == DISCONNECT and acked <= RECEIVE_MAXIMUM
        assert reason_and_properties(*packet) == (0x93, Properties(reason_string="bad_frame"))
        raw.expect_closed()


# == paho, unmodified =================================================================================
PAHO: dict[str, tuple[Callable[[Paho5], object], int, str]] = {
    "QoS 2": (lambda device: device.client.publish("events/x", b"1", qos=2), 0x9B, "unauthorized"),
    "a retained publish": (lambda device: device.client.publish("events/x", b"1", qos=1, retain=True), 0x9A,
                           "unauthorized"),
    "Payload Format Indicator 1 on bytes that are not UTF-8": (lambda device: device.client.publish(
        "events/x", b"\xc3\x28", qos=1, properties=paho_properties(PacketTypes.PUBLISH, PayloadFormatIndicator=1)),
        0x99, "bad_frame"),
    "a Subscription Identifier": (lambda device: device.subscribe(("commands/#", 1), props=paho_properties(
        PacketTypes.SUBSCRIBE, SubscriptionIdentifier=7)), 0xA1, "bad_frame"),
}


@pytest.mark.parametrize(("case", "transport"), [*((case, "tcp") for case in PAHO), ("QoS 2", "tls"), ("QoS 2", "ws")])
def test_paho_hears_why_it_was_disconnected(gw: Gateway, pki: Pki, case: str, transport: str) -> None:
    send, reason, code = PAHO[case]
    with Paho5(gw, transport, pki) as device:
        send(device)
        assert device.disconnected_by_gateway() == (reason, {"ReasonString": code})


# == Request Problem Information 0 ====================================================================
QUIET = Properties(request_problem_information=0)


@pytest.mark.parametrize(("packet", "reason", "code"), [
    (publish5("status/door", b"1"), 0x90, "unauthorized"),  # the transport's refusal
    (publish5("events/x", b"1", props=Properties(topic_alias=17)), 0x94, "bad_frame"),  # the decoder's
], ids=["another topic", "an alias over the maximum"])
def test_request_problem_information_0_leaves_the_disconnect_bare(gw: Gateway, packet: bytes, reason: int,
                                                                  code: str) -> None:
    device = uid("mq5")
    with EventTap(f"{device}.session.closed") as tap, Raw5(gw) as raw:
        raw.connect(device, props=QUIET)
        raw.send(packet)
        assert raw.read() == (DISCONNECT, bytes((reason,)))  # no properties at all
        raw.expect_closed()
        assert tap.get(f"{device}.session.closed")["data"] == {"reason": code}  # counted all the same


def test_request_problem_information_0_still_hears_why_a_connect_is_refused(gw: Gateway) -> None:
    with Raw5(gw) as raw:
        assert raw.connect(uid("mq5"), password="00" * 32, props=QUIET) == (0x86, Properties(
            reason_string="unauthorized"))
        raw.expect_closed()


# == SUBACK ===========================================================================================
def test_suback_grants_the_command_filters_and_refuses_any_other_0x87(gw: Gateway) -> None:
    with Raw5(gw) as raw:
        raw.connect(uid("mq5"))
        raw.send(subscribe5(9, ("commands/#", 0), ("commands/+", 1), ("commands/#", 2), ("status/#", 1), ("#", 0),
                            ("commands/unlock", 1), ("$share/g/commands/#", 1)))
        assert raw.read() == (SUBACK, b"\x00\x09\x00" + bytes((0x00, 0x01, 0x01, 0x87, 0x87, 0x87, 0x87)))
        raw.send(build.PINGREQ)  # a refused filter ends nothing
        assert raw.read() == (PINGRESP, b"")


# == mosquitto_pub and mosquitto_sub -V 5 =============================================================
def mosquitto5(binary: str, gw: Gateway, *args: str) -> subprocess.CompletedProcess:
    """Run a mosquitto client at protocol level 5 (-d: it prints what it receives) to its end."""
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed (Debian's mosquitto-clients)")
    device = uid("mq5")
    return subprocess.run([path, "-h", "127.0.0.1", "-p", str(gw.mqtt_port), "-V", "5", "-i", device, "-u", "sdk",
                           "-P", token(device), "-d", *args], capture_output=True, text=True, timeout=WAIT,
                          check=False)


def test_mosquitto_pub_hears_0x90_for_another_topic(gw: Gateway) -> None:
    done = mosquitto5("mosquitto_pub", gw, "-q", "1", "-t", "status/door", "-m", "open")
    assert "Received DISCONNECT (144)" in done.stdout.splitlines(), done.stdout
    assert done.returncode != 0  # the PUBACK it waited for never came


def test_mosquitto_sub_hears_0xa1_for_a_subscription_identifier(gw: Gateway) -> None:
    done = mosquitto5("mosquitto_sub", gw, "-q", "1", "-t", "commands/#", "-D", "subscribe", "subscription-identifier",
                      "7")
    assert "Received DISCONNECT (161)" in done.stdout.splitlines(), done.stdout


def test_no_worker_logged_a_crash(gw: Gateway) -> None:
    """Last: whatever the tests above sent, no session crashed and no worker died (the log says so)."""
    log = gw.log()
    for marker in ("Traceback", "CRITICAL", "Worker exiting", "WORKER TIMEOUT"):
        assert marker not in log, log
