"""MQTT 3.1.1 devices as session frames (PROTOCOL.md section 8).

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
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Protocol

import orjson

from app import mqtt, protocol
from app.protocol import DEVICE_ID, ProtocolError
from app.sessions.ports import COMMANDS_MAY_FLOW

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


class ByteStream(Protocol):
    """What MQTT is carried over: mqtt_streams.py's socket or WebSocket stream."""

    def recv(self) -> bytes | None: ...

    def send(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


def payload_data(payload: bytes) -> Any:
    """An MQTT payload as event data: JSON if it is JSON, else its UTF-8 text, null when empty."""
    if not payload:
        return None
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        pass
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("bad_frame", "an event payload must be UTF-8 text or JSON", close=True) from None


def _checked(frame: dict[str, Any]) -> dict[str, Any]:
    """A frame made from a PUBLISH, held to section 3's rules (event names, ids, nesting) here and not only by the
    session: a breach then closes the connection under its own code, so the presence event says why."""
    try:
        return protocol.validate(frame)
    except ProtocolError as exc:
        raise ProtocolError(exc.code, exc.message, exc.frame_id, close=True) from None


class MqttConnection:
    """A `FrameConnection` over an MQTT byte stream."""

    backpressure = True  # PROTOCOL.md section 8: over the rate limit, stop reading; never refuse

    def __init__(self, stream: ByteStream, peer: str, max_frame_bytes: int, max_keepalive: float,
                 transport: str = "mqtt", certificate_names: tuple[str, ...] = ()) -> None:
        self._stream = stream
        self._decoder = mqtt.MqttDecoder(max_frame_bytes)
        self._ready: list[mqtt.Packet] = []
        self._failure: mqtt.MqttError | None = None
        self._max_keepalive = max_keepalive
        self._connected = False  # a CONNECT arrived
        self._welcomed = False  # CONNACK 0x00 went out
        self._refusal = NOT_AUTHORIZED  # the CONNACK code for the session's refusal, if one comes
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
        """Whether a command may be written now: while a subscription to commands/# or commands/+ stands."""
        return self._command_qos is not None

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
                raise ProtocolError(self._failure.code, self._failure.message, close=True)
            data = self._stream.recv()
            if data is None:
                return None
            try:
                self._ready = self._decoder.feed(data)
            except mqtt.MqttError as exc:
                self._ready, self._failure = exc.packets, exc
        return self._ready.pop(0)

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
        if kind is mqtt.PubAck:
            return None  # the device got a command; it stays pending until its reply
        if kind is mqtt.Subscribe:
            return COMMANDS_MAY_FLOW if self._subscribe(packet) else None
        if kind is mqtt.Unsubscribe:
            self._unsubscribe(packet)
            return None
        if kind is mqtt.Disconnect:
            return _BYE
        if kind is mqtt.Connect:
            raise ProtocolError("bad_frame", "a second CONNECT", close=True)
        raise ProtocolError("bad_frame", f"{kind.__name__}: the gateway never sends QoS 2", close=True)

    def _hello(self, connect: mqtt.Connect) -> dict[str, Any]:
        if connect.protocol_level != 4:
            return {"type": "hello", "device": "-", "token": "-", "v": f"mqtt-{connect.protocol_level}"}
        if not DEVICE_ID.fullmatch(connect.client_id):
            self._refusal = BAD_CLIENT_ID
            raise ProtocolError("unauthorized", "the client identifier must be a device id (PROTOCOL.md 2)")
        keep_alive = connect.keep_alive
        if keep_alive == 0 or keep_alive > self._max_keepalive:
            keep_alive = self._max_keepalive
        self.idle_limit = 1.5 * keep_alive
        try:  # no password: no token (a device named by its TLS certificate needs none)
            token = None if connect.password is None else connect.password.decode("utf-8")
        except UnicodeDecodeError:
            token = ""
        hello: dict[str, Any] = {"type": "hello", "device": connect.client_id, "token": token, "v": 1}
        if connect.will is not None:
            hello["will"] = self._will(connect.will)
        return hello

    @staticmethod
    def _will(will: mqtt.Will) -> dict[str, Any]:
        if not will.topic.startswith("events/"):
            raise ProtocolError("unauthorized", "a will must be on events/<name>")
        try:
            data = payload_data(will.payload)
        except ProtocolError:
            raise ProtocolError("unauthorized", "a will's payload must be UTF-8 text or JSON") from None
        return {"name": will.topic[len("events/"):], "data": data}

    def _published(self, packet: mqtt.Publish) -> dict[str, Any]:
        if packet.qos == 2 or packet.retain:
            raise ProtocolError("unauthorized", "QoS 2 and retained publishes are not accepted", close=True)
        topic = packet.topic
        if topic.startswith("events/"):
            event_id = f"{self._event_prefix}{next(self._event_ids)}"
            frame = _checked({"type": "event", "id": event_id, "name": topic[len("events/"):],
                              "data": payload_data(packet.payload)})
            self._events[event_id] = (packet.packet_id, packet.qos)
            return frame
        if topic.startswith("replies/"):
            frame = _checked(self._reply(topic[len("replies/"):], packet.payload))
            if packet.qos == 1:
                self._stream.send(mqtt.puback(packet.packet_id))
            return frame
        raise ProtocolError("unauthorized", f"publishing to {topic[:64]!r} is not allowed", close=True)

    @staticmethod
    def _reply(command_id: str, payload: bytes) -> dict[str, Any]:
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("ok"), bool):
            raise ProtocolError("bad_frame", 'a reply payload must be {"ok": true|false, ...}', close=True)
        error = body.get("error")
        if error is not None and not isinstance(error, str):
            raise ProtocolError("bad_frame", "a reply's error must be a string", close=True)
        return {"type": "reply", "id": command_id, "ok": body["ok"], "data": body.get("data"), "error": error}

    def _subscribe(self, packet: mqtt.Subscribe) -> bool:
        """SUBACK the command filters (at most QoS 1), refuse the others; True when commands may now flow."""
        codes = [min(qos, 1) if topic in COMMAND_FILTERS else mqtt.SUBACK_FAILURE for topic, qos in packet.filters]
        self._stream.send(mqtt.suback(packet.packet_id, codes))
        granted = [code for code in codes if code != mqtt.SUBACK_FAILURE]
        if granted:
            self._command_qos = max(granted + [self._command_qos or 0])
        return bool(granted)

    def _unsubscribe(self, packet: mqtt.Unsubscribe) -> None:
        if any(topic in COMMAND_FILTERS for topic in packet.filters):
            self._command_qos = None  # commands are held again, as before a subscription
        self._stream.send(mqtt.unsuback(packet.packet_id))

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
            _packet_id, qos = self._events.pop(frame["id"], (None, 0))
            if qos == 1:  # not stored: no PUBACK, and the device resends it when it reconnects
                self._stream.finish()
        elif kind == "command":  # only while `commands_flow`: the session holds them until then
            self._write_command(frame)
        elif kind == "welcome":
            self._welcomed = True
            self._stream.send(mqtt.connack(ACCEPTED))
        elif kind == "error":
            self._on_error(frame["code"])

    def _on_error(self, code: str) -> None:
        if code in QUIET_ERRORS and self._welcomed:
            return
        if self._connected and not self._welcomed and code in REFUSALS:
            self._stream.send(mqtt.connack(self._refusal if code == "unauthorized" else REFUSALS[code]))
        self._stream.finish()

    def accepts_command(self, name: str) -> bool:
        return not any(char in name for char in NOT_A_TOPIC_LEVEL)

    def _write_command(self, frame: dict[str, Any]) -> None:
        """PUBLISH commands/<name> at the QoS the subscription granted."""
        qos = self._command_qos or 0
        payload = orjson.dumps({"id": frame["id"], "data": frame["data"]})
        packet_id = next(self._packet_ids) if qos else None
        self._stream.send(mqtt.publish(f"commands/{frame['name']}", payload, qos=qos, packet_id=packet_id))

    def finish(self) -> None:
        self._stream.finish()

    def close(self) -> None:
        self._stream.close()
