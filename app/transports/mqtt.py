"""MQTT 3.1.1 and 5.0 devices as session frames (PROTOCOL.md sections 8 and 9).

MQTT is a transport here, not a second session: this module turns the
packets of app/mqtt/ into the frames a `Session` understands and the session's
frames back into packets, with MQTT's own acknowledgement rules:

    CONNECT                      -> hello (client id = device, password = token, will)
    PUBLISH events/<name>        -> event (id generated here; PUBACK once the session says ack)
    PUBLISH replies/<id>         -> reply (PUBACK at once at QoS 1)
    PINGREQ                      -> ping; pong -> PINGRESP
    DISCONNECT                   -> bye (a clean end: no will)
    SUBSCRIBE commands/# or /+   -> SUBACK here; commands may flow (the session writes those it held)
    UNSUBSCRIBE commands/...     -> UNSUBACK here; commands are held again, as before a subscription
    welcome                      -> CONNACK 0x00; a refusal -> CONNACK with its code, then close
    command                      -> PUBLISH commands/<name> {"id", "data"} at the granted QoS
    nack of a QoS 1 event        -> close without PUBACK, so the device sends it again later
    any other error              -> close (MQTT has no error frame); unknown_command is only counted

Everything a device may not do (QoS 2, retain, other topics, a second
CONNECT, malformed packets, an event or reply that breaks section 3's rules)
raises a closing ProtocolError, which the session counts under its section 4
code and ends on.

MQTT 5 (a CONNECT at protocol level 5; mqtt5.py says what differs): a refusal or
an end is a CONNACK or DISCONNECT with a reason code (`_closing` remembers the
precise one for the error the session is about to send back), a nack is a
PUBACK 0x83 and the connection stays open, a DISCONNECT 0x04 keeps the will,
commands carry properties and wait for the device's Receive Maximum.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import orjson

from app import auth, mqtt, protocol
from app.mqtt import packets5
from app.mqtt import reasons as rc
from app.protocol import DEVICE_ID, ProtocolError
from app.sessions.ports import BYE_WITH_WILL, COMMANDS_MAY_FLOW, NO_PRESENCE
from app.transports.mqtt5 import CONNACKS, DISCONNECTS, RECEIVE_MAXIMUM, Peer5, event_properties
from app.transports.mqtt_payloads import ByteStream, payload_data, reply_frame

# CONNACK return codes (MQTT 3.1.1 section 3.2.2.3).
ACCEPTED, BAD_PROTOCOL_LEVEL, BAD_CLIENT_ID, UNAVAILABLE, NOT_AUTHORIZED = 0x00, 0x01, 0x02, 0x03, 0x05
REFUSALS = {"unsupported_version": BAD_PROTOCOL_LEVEL, "unauthorized": NOT_AUTHORIZED, "banned": NOT_AUTHORIZED,
            "overloaded": UNAVAILABLE, "shutting_down": UNAVAILABLE}
COMMAND_FILTERS = ("commands/#", "commands/+")
NOT_A_TOPIC_LEVEL = ("/", "+", "#", "\0")
# Errors a session sends that leave an MQTT connection open: there is nothing to tell the device.
QUIET_ERRORS = frozenset({"unknown_command", "rate_limited"})
_PINGRESP = mqtt.pingresp()
_PING = {"type": "ping"}
_BYE = {"type": "bye"}
_PRESENCE = {4: {"mqtt": 4}, 5: {"mqtt": 5}}


class MqttConnection:
    """A `FrameConnection` over an MQTT byte stream."""

    backpressure = True  # PROTOCOL.md section 8: over the rate limit, stop reading; never refuse
    timed_commands = True  # an MQTT 5 command's Message Expiry Interval is the time it has left

    def __init__(self, stream: ByteStream, peer: str, max_frame_bytes: int, max_keepalive: float,
                 transport: str = "mqtt", certificate_names: tuple[str, ...] = ()) -> None:
        self._stream = stream
        self._decoder = mqtt.MqttDecoder(max_frame_bytes)
        self._decoder_max = max_frame_bytes
        self._keep_alive = (0, max_keepalive)  # (asked, used) by the CONNECT
        self._ready: list[mqtt.Packet] = []
        self._failure: mqtt.MqttError | None = None
        self._max_keepalive = max_keepalive
        self._connected = False  # a CONNECT arrived
        self._welcomed = False  # CONNACK 0x00 went out
        self._refusal = NOT_AUTHORIZED  # the CONNACK code for the session's refusal, if one comes
        self._v5: Peer5 | None = None  # an MQTT 5 device's connection (its CONNECT said level 5)
        self._closing_reason: tuple[str, int] | None = None  # (code, MQTT 5 reason) of the error raised last
        self._told = False  # a CONNACK or DISCONNECT already said why the connection closes
        self._command_qos: int | None = None  # granted by a SUBSCRIBE to commands/#; None: commands are held
        self._events: dict[str, tuple[int | None, int]] = {}  # event id -> (packet id, QoS), until acked
        # Event ids are the gateway's (PROTOCOL.md section 8) and must be unique per device, not per connection:
        # backends deduplicate at-least-once events by (device, id), and a device reconnects often.
        self._event_prefix = f"m{random.getrandbits(48):012x}-"  # no syscall; random is reseeded in each fork
        self._event_ids = itertools.count(1)
        self._packet_ids = itertools.cycle(range(1, 65536))
        self.peer = peer
        self.transport = transport
        self.idle_limit: float | None = None
        self.certificate_names = certificate_names

    @property
    def commands_flow(self) -> bool:
        """Whether a command may be written now: while a subscription to commands/# or commands/+ stands,
        and (MQTT 5, QoS 1) while fewer commands than the device's Receive Maximum await its PUBACK."""
        qos = self._command_qos
        return qos is not None and (not qos or self._v5 is None or self._v5.window_open)

    @property
    def presence(self) -> dict[str, Any]:
        """`"mqtt": 4` or `5` in the presence events (PROTOCOL.md section 9)."""
        return _PRESENCE.get(self._decoder.protocol_level or 0, NO_PRESENCE)  # type: ignore[return-value]

    @property
    def will_delay(self) -> float:
        """MQTT 5's Will Delay Interval, in seconds (0: the will goes out as the session ends)."""
        return 0.0 if self._v5 is None else self._v5.will_delay

    def _closing(self, code: str, message: str, reason: int) -> ProtocolError:
        """A closing error whose MQTT 5 DISCONNECT (or CONNACK) reason is `reason`, not the code's default."""
        self._closing_reason = (code, reason)
        return ProtocolError(code, message, close=True)

    # -- device -> session ---------------------------------------------------------------------
    def receive(self) -> dict[str, Any] | None:
        while True:
            packet = self._next_packet()
            if packet is None:
                return None
            frame = self._frame_for(packet)
            if frame is not None:
                return frame

    def _next_packet(self) -> mqtt.Packet | None:
        while not self._ready:
            if self._failure is not None:  # served what came before the bad bytes; now the error
                self._say_why(self._failure)
                raise ProtocolError(self._failure.code, self._failure.message, close=True)
            data = self._stream.recv()
            if data is None:
                return None
            try:
                self._ready = self._decoder.feed(data)
            except mqtt.MqttError as exc:
                self._ready, self._failure = exc.packets, exc
        return self._ready.pop(0)

    def _say_why(self, failure: mqtt.MqttError) -> None:
        """MQTT 5: the decoder's reason code, in a CONNACK before the welcome and a DISCONNECT after."""
        problem_information = self._v5 is None or self._v5.problem_information
        packet = packets5.refusal(failure, self._welcomed, problem_information)
        if packet is not None and not self._told:
            self._told = True
            self._stream.send(packet)

    def _frame_for(self, packet: mqtt.Packet) -> dict[str, Any] | None:
        if not self._connected:
            if not isinstance(packet, mqtt.Connect):
                raise ProtocolError("unauthorized", "the first packet must be CONNECT", close=True)
            self._connected = True
            return self._hello(packet)
        kind = type(packet)
        if kind is mqtt.PingReq:
            return _PING
        if kind is mqtt.Publish:
            return self._published(packet)
        if kind is mqtt.PubAck:  # the device got a command; it stays pending until its reply
            return self._command_acked(packet.packet_id) if self._v5 is not None else None
        if kind is mqtt.Subscribe:
            return COMMANDS_MAY_FLOW if self._subscribe(packet) else None
        if kind is mqtt.Unsubscribe:
            self._unsubscribe(packet)
            return None
        if kind is mqtt.Disconnect:  # MQTT 5: any reason but 0x00 keeps the will (0x04 asks for it)
            return BYE_WITH_WILL if packet.reason_code else _BYE
        if kind is mqtt.Connect:
            raise self._closing("bad_frame", "a second CONNECT", rc.PROTOCOL_ERROR)
        if kind is mqtt.Auth:
            raise self._closing("bad_frame", "AUTH: enhanced authentication is not offered", rc.PROTOCOL_ERROR)
        raise self._closing("bad_frame", f"{kind.__name__}: the gateway never sends QoS 2", rc.PROTOCOL_ERROR)

    def _command_acked(self, packet_id: int) -> dict[str, Any] | None:
        """MQTT 5: a PUBACK frees a place under the device's Receive Maximum; held commands may flow again."""
        in_flight = self._v5.in_flight  # type: ignore[union-attr]
        was_full = not self._v5.window_open  # type: ignore[union-attr]
        in_flight.discard(packet_id)
        return COMMANDS_MAY_FLOW if was_full and self.commands_flow else None

    def _hello(self, connect: mqtt.Connect) -> dict[str, Any]:
        if connect.protocol_level not in (4, 5):
            return {"type": "hello", "device": "-", "token": "-", "v": f"mqtt-{connect.protocol_level}"}
        if connect.protocol_level == 5:
            self._v5 = Peer5(connect)
            if connect.properties is not None and connect.properties.authentication_method is not None:
                self._refusal = rc.BAD_AUTHENTICATION_METHOD
                raise ProtocolError("unauthorized", "enhanced authentication is not offered")
        if not DEVICE_ID.fullmatch(connect.client_id):
            self._refusal = BAD_CLIENT_ID if self._v5 is None else rc.CLIENT_ID_NOT_VALID
            raise ProtocolError("unauthorized", "the client identifier must be a device id (PROTOCOL.md 2)")
        keep_alive = connect.keep_alive
        if keep_alive == 0 or keep_alive > self._max_keepalive:
            keep_alive = self._max_keepalive
        self.idle_limit = 1.5 * keep_alive
        self._keep_alive = (connect.keep_alive, keep_alive)
        try:  # no password: no token (a device named by its TLS certificate needs none)
            token = None if connect.password is None else connect.password.decode("utf-8")
        except UnicodeDecodeError:
            token = ""
        hello: dict[str, Any] = {"type": "hello", "device": connect.client_id, "token": token, "v": 1}
        if connect.will is not None:
            hello["will"] = self._will(connect.will)
        return hello

    def _will(self, will: mqtt.Will) -> dict[str, Any]:
        if self._v5 is not None:
            self._refusal = rc.NOT_AUTHORIZED  # both refusals below are 0x87 (the token's is 0x86)
        if not will.topic.startswith("events/"):
            raise ProtocolError("unauthorized", "a will must be on events/<name>")
        try:
            data = payload_data(will.payload)
        except ProtocolError:
            raise ProtocolError("unauthorized", "a will's payload must be UTF-8 text or JSON") from None
        self._refusal = NOT_AUTHORIZED
        frame = {"name": will.topic[len("events/"):], "data": data}
        if self._v5 is not None:
            self._add_properties(frame, will.properties)
        return frame

    @staticmethod
    def _add_properties(frame: dict[str, Any], props: mqtt.Properties | None) -> None:
        """MQTT 5: what an event's (or a will's) properties add to its AMQP message, under `amqp`."""
        extra = event_properties(props)
        if extra is not None:
            frame["amqp"] = extra

    def _published(self, packet: mqtt.Publish) -> dict[str, Any]:
        if packet.qos == 2:
            raise self._closing("unauthorized", "QoS 2 publishes are not accepted", rc.QOS_NOT_SUPPORTED)
        if packet.retain:
            raise self._closing("unauthorized", "retained publishes are not accepted", rc.RETAIN_NOT_SUPPORTED)
        topic = packet.topic
        if topic.startswith("events/"):
            return self._event(packet, topic[len("events/"):])
        if topic.startswith("replies/"):
            frame = self._checked(self._reply(topic[len("replies/"):], packet.payload))
            if packet.qos == 1:
                self._stream.send(mqtt.puback(packet.packet_id))
            return frame
        raise self._closing("unauthorized", f"publishing to {topic[:64]!r} is not allowed", rc.TOPIC_NAME_INVALID)

    def _event(self, packet: mqtt.Publish, name: str) -> dict[str, Any]:
        if packet.qos == 1 and self._v5 is not None and len(self._events) >= RECEIVE_MAXIMUM \
                and sum(qos for _packet_id, qos in self._events.values()) >= RECEIVE_MAXIMUM:
            raise self._closing("bad_frame", f"more than {RECEIVE_MAXIMUM} QoS 1 events unacknowledged",
                                rc.RECEIVE_MAXIMUM_EXCEEDED)
        event_id = f"{self._event_prefix}{next(self._event_ids)}"
        frame = self._checked({"type": "event", "id": event_id, "name": name, "data": self._data(packet.payload)})
        if self._v5 is not None:
            self._add_properties(frame, packet.properties)
        self._events[event_id] = (packet.packet_id, packet.qos)
        return frame

    def _data(self, payload: bytes) -> Any:
        try:
            return payload_data(payload)
        except ProtocolError as exc:
            raise self._closing(exc.code, exc.message, rc.PAYLOAD_FORMAT_INVALID) from None

    def _checked(self, frame: dict[str, Any]) -> dict[str, Any]:
        """A frame made from a PUBLISH, held to section 3's rules (event names, ids, nesting) here and not only
        by the session: a breach then closes the connection under its own code, so the presence event says why.
        MQTT 5 blames the topic (0x90: the event name or command id in it) unless only the payload broke them
        (0x99: data nested too deep); telling which costs a second check on the failing path alone."""
        try:
            return protocol.validate(frame)
        except ProtocolError as exc:
            try:
                protocol.validate({**frame, "data": None})
            except ProtocolError:
                reason = rc.TOPIC_NAME_INVALID
            else:
                reason = rc.PAYLOAD_FORMAT_INVALID
            raise self._closing(exc.code, exc.message, reason) from None

    def _reply(self, command_id: str, payload: bytes) -> dict[str, Any]:
        try:
            return reply_frame(command_id, payload)
        except ProtocolError as exc:
            raise self._closing(exc.code, exc.message, rc.PAYLOAD_FORMAT_INVALID) from None

    def _subscribe(self, packet: mqtt.Subscribe) -> bool:
        """SUBACK the command filters (at most QoS 1), refuse the others; True when commands may now flow."""
        if self._v5 is None:
            codes = [min(qos, 1) if topic in COMMAND_FILTERS else mqtt.SUBACK_FAILURE for topic, qos in packet.filters]
            self._stream.send(mqtt.suback(packet.packet_id, codes))
        else:
            if packet.properties is not None and packet.properties.subscription_identifiers:
                raise self._closing("bad_frame", "subscription identifiers are not supported",
                                    rc.SUBSCRIPTION_IDS_NOT_SUPPORTED)
            codes = [min(qos, 1) if topic in COMMAND_FILTERS else rc.NOT_AUTHORIZED for topic, qos in packet.filters]
            self._stream.send(packets5.suback(packet.packet_id, codes))
            codes = [mqtt.SUBACK_FAILURE if code == rc.NOT_AUTHORIZED else code for code in codes]
        granted = [code for code in codes if code != mqtt.SUBACK_FAILURE]
        if granted:
            self._command_qos = max(granted + [self._command_qos or 0])
        return bool(granted)

    def _unsubscribe(self, packet: mqtt.Unsubscribe) -> None:
        if any(topic in COMMAND_FILTERS for topic in packet.filters):
            self._command_qos = None  # commands are held again, as before a subscription
        if self._v5 is None:
            self._stream.send(mqtt.unsuback(packet.packet_id))
        else:
            codes = [rc.SUCCESS if topic in COMMAND_FILTERS else rc.NO_SUBSCRIPTION_EXISTED for topic in packet.filters]
            self._stream.send(packets5.unsuback(packet.packet_id, codes))

    # -- session -> device ---------------------------------------------------------------------
    def send(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "pong":
            self._stream.send(_PINGRESP)
        elif kind == "ack":
            packet_id, qos = self._events.pop(frame["id"], (None, 0))
            if qos == 1:
                self._stream.send(mqtt.puback(packet_id))
        elif kind == "nack":
            packet_id, qos = self._events.pop(frame["id"], (None, 0))
            if qos == 1 and self._v5 is not None:  # MQTT 5 says so, and the connection stays open
                self._send(self._v5.not_stored(packet_id, frame["reason"], frame.get("retry_after")))
            elif qos == 1:  # 3.1.1: not stored: no PUBACK, and the device resends it when it reconnects
                self._stream.finish()
        elif kind == "command":  # only while `commands_flow`: the session holds them until then
            self._write_command(frame)
        elif kind == "welcome":
            self._welcomed = True
            if self._v5 is None:
                self._stream.send(mqtt.connack(ACCEPTED))
            else:
                asked, used = self._keep_alive
                self._stream.send(self._v5.connack(asked, used, self._decoder_max, mqtt.TOPIC_ALIAS_MAXIMUM))
        elif kind == "error":
            self._on_error(frame)

    def _send(self, packet: bytes | None) -> None:
        if packet is not None:
            self._stream.send(packet)

    def _on_error(self, frame: dict[str, Any]) -> None:
        code = frame["code"]
        if code in QUIET_ERRORS and self._welcomed:
            return
        if self._v5 is not None and self._connected and not self._told:
            self._told = True
            self._send(self._v5_refusal(code, frame) if not self._welcomed else
                       self._v5.disconnect(self._reason_for(code, DISCONNECTS), code, frame.get("retry_after")))
        elif self._connected and not self._welcomed and code in REFUSALS and not self._told:
            self._stream.send(mqtt.connack(self._refusal if code == "unauthorized" else REFUSALS[code]))
        self._stream.finish()

    def _v5_refusal(self, code: str, frame: dict[str, Any]) -> bytes | None:
        if code not in CONNACKS:
            return None  # hello_timeout, ...: no CONNECT to answer
        reason = self._reason_for(code, CONNACKS)
        if code == "unauthorized" and frame.get("message") == auth.OTHER_DEVICE:
            reason = rc.NOT_AUTHORIZED
        elif code == "unauthorized" and self._refusal != NOT_AUTHORIZED:
            reason = self._refusal
        return self._v5.refusal(reason, code, frame.get("retry_after"))  # type: ignore[union-attr]

    def _reason_for(self, code: str, table: dict[str, int]) -> int:
        """The MQTT 5 reason for closing with `code`: the one `_closing` named for it, else the table's."""
        if self._closing_reason is not None and self._closing_reason[0] == code:
            return self._closing_reason[1]
        return table.get(code, rc.UNSPECIFIED_ERROR)

    def command_refusal(self, command_id: str, name: str, data: Any) -> str | None:
        if any(char in name for char in NOT_A_TOPIC_LEVEL):
            return "bad_command"
        if self._v5 is not None and self._v5.maximum_packet_size is not None:
            payload = orjson.dumps({"id": command_id, "data": data})
            if self._v5.command(f"commands/{name}", payload, 1, 1, command_id, None) is None:
                return "too_large"
        return None

    def _write_command(self, frame: dict[str, Any]) -> None:
        """PUBLISH commands/<name> at the QoS the subscription granted (MQTT 5: with section 9's properties)."""
        qos = self._command_qos or 0
        payload = orjson.dumps({"id": frame["id"], "data": frame["data"]})
        packet_id = next(self._packet_ids) if qos else None
        topic = f"commands/{frame['name']}"
        if self._v5 is None:
            self._stream.send(mqtt.publish(topic, payload, qos=qos, packet_id=packet_id))
            return
        packet = self._v5.command(topic, payload, qos, packet_id, frame["id"], frame.get("expires_in"))
        if packet is not None:  # command_refusal kept those that do not fit from coming here
            if packet_id is not None:
                self._v5.in_flight.add(packet_id)
            self._stream.send(packet)

    def finish(self) -> None:
        self._stream.finish()

    def close(self) -> None:
        self._stream.close()
