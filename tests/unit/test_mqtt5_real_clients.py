"""The MQTT 5 codec against real clients: paho-mqtt 2.2.0 in MQTTv5 mode and mosquitto_pub -V 5.

As test_mqtt_real_clients.py: each test listens on its own socket, lets a real
client connect, reads what it sends through `MqttDecoder`, and answers with
app.mqtt.packets5's encoders, checking the client understood them (its
callbacks, with the reason codes and properties it parsed). A last test feeds
our encoders' bytes to paho's own packet decoders (paho.mqtt._packet) with no
network at all.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections import deque
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from app.mqtt import (
    Connect,
    Disconnect,
    MqttDecoder,
    Packet,
    PingReq,
    Properties,
    PubAck,
    Publish,
    Subscribe,
    SubscriptionOptions,
    Unsubscribe,
    Will,
    packets5,
)
from support.waiting import wait_until

LIMIT = 65536


class Peer:
    """The server side of one client connection, read through the codec."""

    def __init__(self, listener: socket.socket) -> None:
        self.sock, _ = listener.accept()
        self.sock.settimeout(10)
        self.decoder = MqttDecoder(LIMIT)
        self.queue: deque[Packet] = deque()

    def next(self) -> Packet:
        """The next packet that is not a PINGREQ (answered, as a client's keep-alive timer sends them any time)."""
        while True:
            while not self.queue:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("the client closed the connection")
                self.queue.extend(self.decoder.feed(data))
            packet = self.queue.popleft()
            if not isinstance(packet, PingReq):
                return packet
            self.send(packets5.pingresp())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.settimeout(10)
        yield sock


def paho_properties(packet_type: int, **values: object) -> PahoProperties:
    props = PahoProperties(packet_type)
    for name, value in values.items():
        setattr(props, name, value)
    return props


def v5_client(seen: list[tuple]) -> paho.Client:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="lock-0001", protocol=paho.MQTTv5,
                         reconnect_on_failure=False)
    client.on_connect = lambda c, u, flags, code, props: seen.append(("connect", code.value, props))
    client.on_subscribe = lambda c, u, mid, codes, props: seen.append(("subscribe", mid, [x.value for x in codes]))
    client.on_unsubscribe = lambda c, u, mid, codes, props: seen.append(("unsubscribe", mid, [x.value for x in codes]))
    client.on_publish = lambda c, u, mid, code, props: seen.append(("published", mid, code.value, props))
    client.on_message = lambda c, u, msg: seen.append(("message", msg.topic, msg.payload, msg.qos, msg.properties))
    client.on_disconnect = lambda c, u, flags, code, props: seen.append(("disconnect", code.value, props))
    return client


def found(seen: list[tuple], kind: str) -> tuple:
    wait_until(lambda: any(item[0] == kind for item in seen))
    match = next(item for item in seen if item[0] == kind)
    seen.remove(match)
    return match


def test_paho_v5_and_the_codec_understand_each_other(listener: socket.socket) -> None:
    seen: list[tuple] = []
    client = v5_client(seen)
    client.will_set("events/gone", b'"bye"', qos=1, properties=paho_properties(
        PacketTypes.WILLMESSAGE, WillDelayInterval=30, MessageExpiryInterval=600, ContentType="application/json",
        ResponseTopic="replies/w", CorrelationData=b"w-1", PayloadFormatIndicator=1, UserProperty=[("k", "v")]))
    client.username_pw_set("sdk-user", "a1b2c3")
    client.connect("127.0.0.1", listener.getsockname()[1], keepalive=30, properties=paho_properties(
        PacketTypes.CONNECT, SessionExpiryInterval=3600, ReceiveMaximum=20, MaximumPacketSize=65536,
        TopicAliasMaximum=10, RequestResponseInformation=1, RequestProblemInformation=0,
        UserProperty=[("sdk", "paho"), ("sdk", "2.2")]))
    client.loop_start()
    try:
        peer = Peer(listener)
        assert peer.next() == Connect("MQTT", 5, "lock-0001", True, 30, Will(
            "events/gone", b'"bye"', 1, False, Properties(
                will_delay_interval=30, message_expiry_interval=600, content_type="application/json",
                response_topic="replies/w", correlation_data=b"w-1", payload_format_indicator=1,
                user_properties=(("k", "v"),))), "sdk-user", b"a1b2c3", Properties(
            session_expiry_interval=3600, receive_maximum=20, maximum_packet_size=65536, topic_alias_maximum=10,
            request_response_information=1, request_problem_information=0,
            user_properties=(("sdk", "paho"), ("sdk", "2.2"))))
        peer.send(packets5.connack(0, props=Properties(
            session_expiry_interval=0, receive_maximum=16, maximum_qos=1, retain_available=0,
            maximum_packet_size=65536, topic_alias_maximum=16, wildcard_subscription_available=1,
            subscription_identifiers_available=0, shared_subscription_available=0, server_keep_alive=60)))
        _, code, props = found(seen, "connect")
        assert code == 0
        assert (props.SessionExpiryInterval, props.ReceiveMaximum, props.MaximumQoS, props.RetainAvailable,
                props.MaximumPacketSize, props.TopicAliasMaximum, props.WildcardSubscriptionAvailable,
                props.SubscriptionIdentifierAvailable, props.SharedSubscriptionAvailable, props.ServerKeepAlive) == (
            0, 16, 1, 0, 65536, 16, 1, 0, 0, 60)

        _, mid = client.subscribe([("commands/#", SubscribeOptions(1, noLocal=True, retainAsPublished=True,
                                                                   retainHandling=2)),
                                   ("other/x", SubscribeOptions(0))],
                                  properties=paho_properties(PacketTypes.SUBSCRIBE, UserProperty=[("s", "t")]))
        assert peer.next() == Subscribe(mid, [("commands/#", 1), ("other/x", 0)],
                                        [SubscriptionOptions(True, True, 2), SubscriptionOptions()],
                                        Properties(user_properties=(("s", "t"),)))
        peer.send(packets5.suback(mid, [1, 0x87]))
        assert found(seen, "subscribe") == ("subscribe", mid, [1, 0x87])

        event = paho_properties(PacketTypes.PUBLISH, ResponseTopic="replies/x", CorrelationData=b"\x00c1",
                                UserProperty=[("a", "1"), ("b", "2"), ("a", "3")], TopicAlias=1,
                                MessageExpiryInterval=90, ContentType="text/plain", PayloadFormatIndicator=1)
        mid = client.publish("events/door.opened", b"23.5 C", qos=1, properties=event).mid
        assert peer.next() == Publish("events/door.opened", b"23.5 C", 1, False, False, mid, Properties(
            response_topic="replies/x", correlation_data=b"\x00c1", user_properties=(("a", "1"), ("b", "2"),
                                                                                      ("a", "3")),
            topic_alias=1, message_expiry_interval=90, content_type="text/plain", payload_format_indicator=1))
        peer.send(packets5.puback(mid))
        assert found(seen, "published")[:3] == ("published", mid, 0)
        # The alias alone now names the topic: paho sends an empty topic name.
        mid = client.publish("", b"{}", qos=1, properties=paho_properties(PacketTypes.PUBLISH, TopicAlias=1)).mid
        packet = peer.next()
        assert packet == Publish("events/door.opened", b"{}", 1, False, False, mid, Properties(topic_alias=1))
        peer.send(packets5.puback(mid, 0x83, Properties(reason_string="unroutable",
                                                        user_properties=(("retry_after", "5"),))))
        _, _, code, props = found(seen, "published")
        assert code == 0x83 and props.ReasonString == "unroutable" and props.UserProperty == [("retry_after", "5")]

        peer.send(packets5.publish("commands/unlock", b'{"id":"c-1","data":null}', 1, 77, props=Properties(
            response_topic="replies/c-1", correlation_data=b"c-1", message_expiry_interval=60,
            content_type="application/json", payload_format_indicator=1, user_properties=(("x", "y"),))))
        assert peer.next() == PubAck(77)
        _, topic, payload, qos, props = found(seen, "message")
        assert (topic, payload, qos) == ("commands/unlock", b'{"id":"c-1","data":null}', 1)
        assert (props.ResponseTopic, props.CorrelationData, props.MessageExpiryInterval, props.ContentType,
                props.PayloadFormatIndicator, props.UserProperty) == (
            "replies/c-1", b"c-1", 60, "application/json", 1, [("x", "y")])

        _, mid = client.unsubscribe(["commands/#"], properties=paho_properties(PacketTypes.UNSUBSCRIBE,
                                                                               UserProperty=[("u", "v")]))
        assert peer.next() == Unsubscribe(mid, ["commands/#"], Properties(user_properties=(("u", "v"),)))
        peer.send(packets5.unsuback(mid, [0x00]))
        assert found(seen, "unsubscribe") == ("unsubscribe", mid, [0])

        client.disconnect(ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"),
                          paho_properties(PacketTypes.DISCONNECT, SessionExpiryInterval=0, ReasonString="bye"))
        assert peer.next() == Disconnect(0x04, Properties(session_expiry_interval=0, reason_string="bye"))
    finally:
        client.loop_stop()


def test_paho_v5_reads_our_disconnect_with_its_reason(listener: socket.socket) -> None:
    seen: list[tuple] = []
    client = v5_client(seen)
    client.connect("127.0.0.1", listener.getsockname()[1])
    client.loop_start()
    try:
        peer = Peer(listener)
        assert isinstance(peer.next(), Connect)
        peer.send(packets5.connack(0))
        found(seen, "connect")
        peer.send(packets5.disconnect(0x8E, Properties(reason_string="replaced")))
        _, code, props = found(seen, "disconnect")
        assert code == 0x8E and props.ReasonString == "replaced"
    finally:
        client.loop_stop()


def test_paho_v5_reads_our_connack_refusal(listener: socket.socket) -> None:
    seen: list[tuple] = []
    client = v5_client(seen)
    client.connect("127.0.0.1", listener.getsockname()[1])
    client.loop_start()
    try:
        peer = Peer(listener)
        assert isinstance(peer.next(), Connect)
        peer.send(packets5.connack(0x89, props=Properties(reason_string="overloaded",
                                                          user_properties=(("retry_after", "5"),))))
        _, code, props = found(seen, "connect")
        assert code == 0x89 and props.ReasonString == "overloaded" and props.UserProperty == [("retry_after", "5")]
    finally:
        client.loop_stop()


def split(data: bytes) -> tuple[int, bytes]:
    """(first byte, body) of one packet, for paho's decoders, which take the fixed header apart."""
    length, shift, index = 0, 0, 1
    while True:
        length |= (data[index] & 0x7F) << shift
        index += 1
        if not data[index - 1] & 0x80:
            break
        shift += 7
    assert len(data) == index + length
    return data[0], data[index:]


V5 = MQTTProtocolVersion.MQTTv5


def test_pahos_own_decoders_parse_our_packets() -> None:
    connack = _packet.decode_connack(*split(packets5.connack(0, True, Properties(
        receive_maximum=16, maximum_qos=1, assigned_client_identifier="lock-9", reason_string="ok"))), V5)
    assert (connack.flags, connack.reason.value, connack.properties.ReceiveMaximum, connack.properties.MaximumQoS,
            connack.properties.AssignedClientIdentifier, connack.properties.ReasonString) == (1, 0, 16, 1, "lock-9",
                                                                                              "ok")
    publish = _packet.decode_publish(*split(packets5.publish("commands/x", b"\x01" * 300, 1, 9, props=Properties(
        response_topic="replies/c", correlation_data=b"c", user_properties=(("k", "v"),)))), V5)
    assert (publish.topic, publish.mid, publish.payload, publish.properties.ResponseTopic,
            publish.properties.CorrelationData, publish.properties.UserProperty) == (
        b"commands/x", 9, b"\x01" * 300, "replies/c", b"c", [("k", "v")])
    puback = _packet.decode_puback(*split(packets5.puback(5, 0x83)), V5)
    assert (puback.mid, puback.reason.value) == (5, 0x83)
    puback = _packet.decode_puback(*split(packets5.puback(5, 0x83, Properties(reason_string="broker_unavailable"))),
                                   V5)
    assert (puback.reason.value, puback.properties.ReasonString) == (0x83, "broker_unavailable")
    disconnect = _packet.decode_disconnect(*split(packets5.disconnect(0x8E)), V5)
    assert disconnect.reason.value == 0x8E
    suback = _packet.decode_suback(*split(packets5.suback(3, [0, 1, 0x87])), V5)
    assert (suback.mid, [code.value for code in suback.reason_codes]) == (3, [0, 1, 0x87])
    unsuback = _packet.decode_unsuback(*split(packets5.unsuback(4, [0, 0x11])), V5)
    assert (unsuback.mid, [code.value for code in unsuback.reason_codes]) == (4, [0, 0x11])


def test_mosquitto_pub_v5_with_properties_is_decoded(listener: socket.socket) -> None:
    path = shutil.which("mosquitto_pub")
    if path is None:
        pytest.skip("mosquitto_pub is not installed")
    process = subprocess.Popen(
        [path, "-h", "127.0.0.1", "-p", str(listener.getsockname()[1]), "-V", "5", "-i", "lock-0002", "-P", "f00d",
         "-u", "sdk", "-q", "1", "-t", "events/door.opened", "-m", '{"battery":97}',
         "-D", "connect", "session-expiry-interval", "120", "-D", "connect", "receive-maximum", "8",
         "-D", "publish", "user-property", "site", "hq", "-D", "publish", "response-topic", "replies/r",
         "-D", "publish", "correlation-data", "c-9", "-D", "publish", "content-type", "application/json",
         "-D", "publish", "message-expiry-interval", "30", "-D", "publish", "payload-format-indicator", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        peer = Peer(listener)
        hello = peer.next()
        assert isinstance(hello, Connect) and (hello.protocol_level, hello.client_id, hello.password) == (
            5, "lock-0002", b"f00d")
        assert (hello.properties.session_expiry_interval, hello.properties.receive_maximum) == (120, 8)
        peer.send(packets5.connack(0))
        packet = peer.next()
        assert packet == Publish("events/door.opened", b'{"battery":97}', 1, False, False, packet.packet_id,
                                 Properties(user_properties=(("site", "hq"),), response_topic="replies/r",
                                            correlation_data=b"c-9", content_type="application/json",
                                            message_expiry_interval=30, payload_format_indicator=1))
        peer.send(packets5.puback(packet.packet_id))
        assert isinstance(peer.next(), Disconnect)
        assert process.wait(10) == 0, process.stderr.read()
    finally:
        process.kill()
        process.wait(10)
