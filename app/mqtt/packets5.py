"""The MQTT 5.0 packets a server sends (standard section 3), and fitting them to the client's Maximum Packet Size.

Pure functions returning bytes, as for 3.1.1 (app.mqtt.packets). Their
arguments come from the gateway, not the wire, so a bad one (a reason code the
packet type cannot carry, a property it does not allow, a value out of range)
is a programming error: ValueError. Where the standard lets a packet be cut
short (PUBACK and DISCONNECT with reason 0x00 and no properties, or a reason
code and no properties), the short form is sent: that is what clients send
too, and it is the most common case by far.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Sequence

from app.mqtt import properties
from app.mqtt.packets import PINGRESP, MqttError, Properties
from app.mqtt.reasons import PROTOCOL_ERROR, TO_CLIENT

_U16 = struct.Struct(">H")
_NO_PROPERTIES = b"\x00"


def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + properties.varint_bytes(len(body)) + body


def _check_packet_id(packet_id: int | None) -> int:
    if packet_id is None or not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet identifier {packet_id} is not in 1-65535")
    return packet_id


def _check_reason(reason_code: int, packet: str) -> None:
    if reason_code not in TO_CLIENT[packet]:
        raise ValueError(f"reason code {reason_code:#04x} is not one a server's {packet} may carry")


def connack(reason_code: int, session_present: bool = False, props: Properties | None = None) -> bytes:
    """CONNACK (section 3.2); a refusal (reason 0x80 or above) cannot claim a session (MQTT-3.2.2-6)."""
    _check_reason(reason_code, "CONNACK")
    if reason_code and session_present:
        raise ValueError("session present must be 0 with a refusal")
    return _frame(0x20, bytes((int(session_present), reason_code)) + properties.encode(props, properties.CONNACK))


def publish(topic: str, payload: bytes, qos: int = 0, packet_id: int | None = None, retain: bool = False,
            dup: bool = False, props: Properties | None = None) -> bytes:
    """PUBLISH (section 3.3): a packet identifier at QoS 1 and 2 only, DUP only with one; an empty topic
    only with a Topic Alias."""
    raw = topic.encode()
    if "+" in topic or "#" in topic or "\x00" in topic or len(raw) > 0xFFFF or not raw and (
            props is None or props.topic_alias is None):
        raise ValueError(f"{topic!r} is not a topic name")
    if qos not in (0, 1, 2):
        raise ValueError(f"QoS {qos} is not 0, 1 or 2")
    if qos == 0 and (packet_id is not None or dup):
        raise ValueError("a QoS 0 PUBLISH has no packet identifier and no DUP")
    first = 0x30 | qos << 1 | retain | (dup << 3 if qos else 0)
    packet_id_bytes = _U16.pack(_check_packet_id(packet_id)) if qos else b""
    return _frame(first, b"".join((_U16.pack(len(raw)), raw, packet_id_bytes,
                                   properties.encode(props, properties.PUBLISH), payload)))


def puback(packet_id: int, reason_code: int = 0, props: Properties | None = None) -> bytes:
    """PUBACK (section 3.4): 4 bytes for 0x00 with no properties, 5 for another code with none."""
    _check_packet_id(packet_id)
    _check_reason(reason_code, "PUBACK")
    encoded = properties.encode(props, properties.PUBACK)
    if encoded == _NO_PROPERTIES:
        if not reason_code:
            return b"\x40\x02" + _U16.pack(packet_id)
        return b"\x40\x03" + _U16.pack(packet_id) + bytes((reason_code,))
    return _frame(0x40, _U16.pack(packet_id) + bytes((reason_code,)) + encoded)


def _suback_like(first: int, packet: str, kind: int, packet_id: int, reason_codes: Sequence[int],
                 props: Properties | None) -> bytes:
    _check_packet_id(packet_id)
    if not reason_codes:
        raise ValueError(f"{packet} needs a reason code per topic filter")
    for code in reason_codes:
        _check_reason(code, packet)
    return _frame(first, _U16.pack(packet_id) + properties.encode(props, kind) + bytes(reason_codes))


def suback(packet_id: int, reason_codes: Sequence[int], props: Properties | None = None) -> bytes:
    """SUBACK (section 3.9): one reason code per filter of the SUBSCRIBE, in order."""
    return _suback_like(0x90, "SUBACK", properties.SUBACK, packet_id, reason_codes, props)


def unsuback(packet_id: int, reason_codes: Sequence[int], props: Properties | None = None) -> bytes:
    """UNSUBACK (section 3.11): one reason code per filter of the UNSUBSCRIBE, in order."""
    return _suback_like(0xB0, "UNSUBACK", properties.UNSUBACK, packet_id, reason_codes, props)


def disconnect(reason_code: int = 0, props: Properties | None = None) -> bytes:
    """DISCONNECT (section 3.14): 2 bytes for 0x00 with no properties, 3 for another code with none."""
    _check_reason(reason_code, "DISCONNECT")
    encoded = properties.encode(props, properties.DISCONNECT)
    if encoded == _NO_PROPERTIES:
        return b"\xe0\x00" if not reason_code else bytes((0xE0, 1, reason_code))
    return _frame(0xE0, bytes((reason_code,)) + encoded)


def pingresp() -> bytes:
    return PINGRESP


def fits(packet: bytes, maximum_packet_size: int | None) -> bool:
    """Whether the client takes `packet`: its Maximum Packet Size counts the whole packet (section 3.1.2.11.4);
    None (it sent none) means no limit but the protocol's."""
    return maximum_packet_size is None or len(packet) <= maximum_packet_size


def fitted(encode: Callable[..., bytes], *args: object, props: Properties | None = None,
           maximum_packet_size: int | None = None, problem_information: bool = True) -> bytes | None:
    """`encode(*args, props=props)` made to fit the client, or None when it cannot be sent at all.

    For CONNACK, PUBACK, SUBACK, UNSUBACK and DISCONNECT, whose Reason String
    and User Properties only explain: the standard says the server must not send
    either when it would take the packet past the client's Maximum Packet Size
    (MQTT-3.2.2-19/20 and the like), so they are dropped, User Properties first,
    then the Reason String. `problem_information` False (the client's Request
    Problem Information 0) drops both from the start (PROTOCOL.md section 9 says
    on which packets the transport passes it). A PUBLISH's properties are the
    message's own, never dropped: one that does not fit is None (PROTOCOL.md
    section 9: the command's sender gets `too_large`).
    """
    if encode is publish:
        packet = encode(*args, props=props)
        return packet if fits(packet, maximum_packet_size) else None
    if props is not None and not problem_information:
        props = dataclasses.replace(props, reason_string=None, user_properties=())
    packet = encode(*args, props=props)
    if fits(packet, maximum_packet_size) or props is None:
        return packet if fits(packet, maximum_packet_size) else None
    for trimmed in (dataclasses.replace(props, user_properties=()),
                    dataclasses.replace(props, user_properties=(), reason_string=None)):
        packet = encode(*args, props=trimmed)
        if fits(packet, maximum_packet_size):
            return packet
    return None


def refusal(error: MqttError, connack_sent: bool, problem_information: bool = True) -> bytes | None:
    """What a version 5 connection is told before it is closed for `error` (a decoder's), or None for 3.1.1.

    Before the CONNACK went out, a CONNACK with the error's reason code (a broken
    CONNECT, standard section 4.13.1); after, a DISCONNECT. The Reason String is
    the PROTOCOL.md section 4 code the close is counted under (section 9:
    `bad_frame`, `frame_too_large`), left out with Request Problem Information 0.
    A reason the packet type cannot carry (0x94 Topic Alias invalid in a
    CONNACK) becomes 0x82 Protocol Error there.
    """
    if error.level != 5:
        return None
    packet = "DISCONNECT" if connack_sent else "CONNACK"
    reason = error.reason if error.reason in TO_CLIENT[packet] else PROTOCOL_ERROR
    if connack_sent:
        return disconnect(reason, Properties(reason_string=error.code) if problem_information else None)
    return connack(reason, props=Properties(reason_string=error.code))
