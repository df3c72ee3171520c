"""What an MQTT 5.0 device is told, and what it asked for (PROTOCOL.md section 9).

mqtt.py maps packets to session frames for both versions; where MQTT 5 says
more than 3.1.1 (why a connection is refused or ended, a PUBACK that says an
event was not stored, properties on commands and events), it asks a `Peer5`,
made from the device's CONNECT. Everything that explains (Reason Strings, User
Properties) goes through `packets5.fitted`, so a device's Maximum Packet Size
and Request Problem Information are honoured in one place.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from app.mqtt import packets5
from app.mqtt import reasons as rc
from app.mqtt.packets import Connect, Properties
from app.sessions.ports import EventProperties

RECEIVE_MAXIMUM = 64  # QoS 1 events a device may have unacknowledged at once (section 9: at least 16)
NO_EXPIRY_SECONDS = 60  # a command without expiration stays pending that long (section 9)

# The refusal of a hello, by its section 4 code ("unauthorized" is refined by the transport: 0x85, 0x87, 0x8C).
CONNACKS = {"unauthorized": rc.BAD_USERNAME_OR_PASSWORD, "banned": rc.BANNED, "overloaded": rc.SERVER_BUSY,
            "shutting_down": rc.SERVER_UNAVAILABLE, "frame_too_large": rc.PACKET_TOO_LARGE,
            "unsupported_version": rc.UNSUPPORTED_PROTOCOL_VERSION}
# The end of a session after its CONNACK, by the section 4 code it is counted under ("unauthorized" and
# "bad_frame" are refined by the transport where it knows better: 0x90, 0x9A, 0x9B, 0x93, 0x94, 0x99, 0xA1).
DISCONNECTS = {"replaced": rc.SESSION_TAKEN_OVER, "idle_timeout": rc.KEEP_ALIVE_TIMEOUT,
               "hello_timeout": rc.KEEP_ALIVE_TIMEOUT, "shutting_down": rc.SERVER_SHUTTING_DOWN,
               "kicked": rc.ADMINISTRATIVE_ACTION, "banned": rc.ADMINISTRATIVE_ACTION, "overloaded": rc.SERVER_BUSY,
               "frame_too_large": rc.PACKET_TOO_LARGE, "bad_frame": rc.MALFORMED, "unauthorized": rc.NOT_AUTHORIZED}
RETRY_ON_CONNACK = frozenset({"overloaded", "shutting_down", "banned"})
RETRY_ON_DISCONNECT = frozenset({"shutting_down", "banned"})


def seconds_text(seconds: float) -> str:
    """A `retry_after` User Property: 30.0 as "30", 4.46 as "4.5"."""
    return f"{round(seconds, 1):g}"


def _explained(code: str, retry_after: float | None) -> Properties:
    user = (("retry_after", seconds_text(retry_after)),) if retry_after is not None else ()
    return Properties(reason_string=code, user_properties=user)


def event_properties(props: Properties | None) -> EventProperties | None:
    """An event's Message Expiry Interval as AMQP `expiration` (milliseconds) and its User Properties as
    AMQP headers, a key given more than once as the list of its values, in order; None when it has neither.
    The properties of an `events/<name>` PUBLISH, or of a will (published as that event, section 8)."""
    if props is None or (props.message_expiry_interval is None and not props.user_properties):
        return None
    headers: dict[str, Any] | None = None
    if props.user_properties:
        headers = {}
        for key, value in props.user_properties:
            if key not in headers:
                headers[key] = value
            elif isinstance(headers[key], list):
                headers[key].append(value)
            else:
                headers[key] = [headers[key], value]
    expiry = props.message_expiry_interval
    return EventProperties(None if expiry is None else str(expiry * 1000), headers)


@lru_cache(maxsize=64)
def _connack(session_expiry_asked: bool, server_keep_alive: int | None, max_frame_bytes: int,
             topic_alias_maximum: int) -> bytes:
    """A successful CONNACK: one of a handful per configuration, so encoded once (a stampede sends thousands)."""
    props = Properties(
        session_expiry_interval=0 if session_expiry_asked else None, server_keep_alive=server_keep_alive,
        receive_maximum=RECEIVE_MAXIMUM, maximum_qos=1, retain_available=0,
        maximum_packet_size=max_frame_bytes, topic_alias_maximum=topic_alias_maximum,
        subscription_identifiers_available=0, shared_subscription_available=0)
    return packets5.connack(rc.SUCCESS, props=props)


class Peer5:
    """An MQTT 5 device's connection as its CONNECT set it up, and the packets only MQTT 5 has."""

    __slots__ = ("in_flight", "maximum_packet_size", "problem_information", "receive_maximum", "session_expiry",
                 "will_delay")

    def __init__(self, connect: Connect) -> None:
        props = connect.properties or Properties()
        self.receive_maximum = props.receive_maximum or 65535  # absent: the protocol's maximum
        self.maximum_packet_size = props.maximum_packet_size
        self.problem_information = props.request_problem_information != 0
        self.session_expiry = props.session_expiry_interval or 0
        will_props = connect.will.properties if connect.will is not None else None
        self.will_delay = float(will_props.will_delay_interval or 0) if will_props is not None else 0.0
        self.in_flight: set[int] = set()  # packet ids of QoS 1 commands the device has not PUBACKed

    # -- CONNACK ------------------------------------------------------------------------------
    def connack(self, asked_keep_alive: int, keep_alive: float, max_frame_bytes: int,
                topic_alias_maximum: int) -> bytes:
        """CONNACK 0x00 with the properties of section 9."""
        return _connack(self.session_expiry != 0, int(keep_alive) if keep_alive != asked_keep_alive else None,
                        max_frame_bytes, topic_alias_maximum)

    def refusal(self, reason: int, code: str, retry_after: float | None) -> bytes | None:
        """A refused CONNECT: its reason code, the section 4 code as Reason String (always: section 9),
        `retry_after` for the refusals that say when to come back."""
        props = _explained(code, retry_after if code in RETRY_ON_CONNACK else None)
        return packets5.fitted(packets5.connack, reason, props=props, maximum_packet_size=self.maximum_packet_size)

    # -- after CONNACK ---------------------------------------------------------------------------
    def disconnect(self, reason: int, code: str, retry_after: float | None) -> bytes | None:
        """The gateway's DISCONNECT; nothing explains it with Request Problem Information 0 (section 9)."""
        props = _explained(code, retry_after if code in RETRY_ON_DISCONNECT else None)
        return packets5.fitted(packets5.disconnect, reason, props=props, maximum_packet_size=self.maximum_packet_size,
                               problem_information=self.problem_information)

    def not_stored(self, packet_id: int, reason: str, retry_after: float | None) -> bytes | None:
        """PUBACK 0x83 for an event that cannot be stored: the nack reason and when to send it again."""
        return packets5.fitted(packets5.puback, packet_id, rc.IMPLEMENTATION_SPECIFIC,
                               props=_explained(reason, retry_after), maximum_packet_size=self.maximum_packet_size,
                               problem_information=self.problem_information)

    def command(self, topic: str, payload: bytes, qos: int, packet_id: int | None, command_id: str,
                expires_in: float | None) -> bytes | None:
        """A command's PUBLISH with section 9's properties; None when it is over the device's Maximum Packet Size."""
        expiry = NO_EXPIRY_SECONDS if expires_in is None or not math.isfinite(expires_in) \
            else max(1, math.ceil(expires_in))
        props = Properties(response_topic=f"replies/{command_id}", correlation_data=command_id.encode(),
                           message_expiry_interval=expiry, content_type="application/json",
                           payload_format_indicator=1)
        return packets5.fitted(packets5.publish, topic, payload, qos, packet_id, props=props,
                               maximum_packet_size=self.maximum_packet_size)

    @property
    def window_open(self) -> bool:
        """Whether another QoS 1 command may go out under the device's Receive Maximum."""
        return len(self.in_flight) < self.receive_maximum
