"""The MQTT 5.0 body decoders: how a client's packets read once its CONNECT said protocol level 5.

app.mqtt.codec frames the stream and picks these for a version 5 connection;
each takes the packet's first byte and its body's bounds in `data`, and returns
the packet or raises `MqttError` with the reason code the standard gives
(section 4.13: 0x81 Malformed Packet for what cannot be parsed, 0x82 Protocol
Error for a rule broken by well-formed bytes, 0x94 and 0x99 where the standard
names them). What MQTT 5 adds over 3.1.1: properties after each variable
header (app.mqtt.properties), reason codes on the acknowledgements, DISCONNECT
and AUTH (which may be cut short when they are 0x00 with no properties),
subscription options, a zero-length topic name with a Topic Alias, and a
password without a user name.
"""

from __future__ import annotations

from collections.abc import Callable

from app.mqtt import properties
from app.mqtt.packets import (
    Auth,
    Connect,
    Disconnect,
    MqttError,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    Subscribe,
    SubscriptionOptions,
    Unsubscribe,
    Will,
)
from app.mqtt.reader import Reader, connect_flags, malformed, protocol_error, text, topic_filter, topic_name
from app.mqtt.reasons import FROM_CLIENT, PAYLOAD_FORMAT_INVALID

PROTOCOL_LEVEL = 5
Decoder5 = Callable[[int, bytes, int, int], "PubAck | PubRec | PubRel | PubComp"]
_OPTIONS = {byte: SubscriptionOptions(bool(byte & 4), bool(byte & 8), byte >> 4 & 3) for byte in range(64)}


def _payload_format(payload: bytes, props: Properties, what: str) -> None:
    """Payload Format Indicator 1 promises UTF-8 (section 3.3.2.3.2): checked, 0x99 when broken."""
    if props.payload_format_indicator == 1:
        try:
            payload.decode()
        except UnicodeDecodeError:
            raise MqttError("bad_frame", f"{what} is marked UTF-8 but is not", PAYLOAD_FORMAT_INVALID) from None


def connect(reader: Reader, name: str) -> Connect:
    """The rest of a level 5 CONNECT, after the protocol name and level (section 3.1)."""
    flags, will_qos = connect_flags(reader)
    keep_alive = reader.u16("keep alive")
    props, reader.pos = properties.decode(reader.data, reader.pos, reader.end, properties.CONNECT)
    client_id = reader.text("client identifier")
    will = None
    if flags & 0x04:
        will_props, reader.pos = properties.decode(reader.data, reader.pos, reader.end, properties.WILL)
        topic = topic_name(reader.binary("will topic"), "will topic")
        will = Will(topic, reader.binary("will message"), will_qos, bool(flags & 0x20), will_props)
        _payload_format(will.payload, will_props, "the will message")
    username = reader.text("user name") if flags & 0x80 else None
    password = reader.binary("password") if flags & 0x40 else None  # MQTT 5 allows one without a user name
    reader.finish("CONNECT payload")
    return Connect(name, PROTOCOL_LEVEL, client_id, bool(flags & 0x02), keep_alive, will, username, password, props)


def publish(first: int, data: bytes, start: int, end: int) -> Publish:
    """PUBLISH (section 3.3); a Topic Alias is left for the decoder to resolve, which holds the aliases."""
    if end - start < 2:
        raise malformed("PUBLISH ends before its topic name")
    topic_end = start + 2 + (data[start] << 8 | data[start + 1])
    qos = first >> 1 & 3
    pos = topic_end + 2 if qos else topic_end
    if pos > end:
        raise malformed("PUBLISH ends inside its topic name or packet identifier")
    raw = data[start + 2:topic_end]
    topic = text(raw, "topic name")
    if "+" in topic or "#" in topic:
        topic_name(raw, "topic name")  # raises, saying why
    packet_id = None
    if qos:
        packet_id = data[topic_end] << 8 | data[topic_end + 1]
        if not packet_id:
            raise malformed("packet identifier 0")
    props, pos = properties.decode(data, pos, end, properties.PUBLISH)
    if props.subscription_identifiers:
        raise protocol_error("a client's PUBLISH carries a subscription identifier")
    if not topic and props.topic_alias is None:
        raise protocol_error("zero-length topic name without a topic alias")
    payload = data[pos:end]
    _payload_format(payload, props, "the payload")
    return Publish(topic, payload, qos, first & 1 == 1, first & 8 == 8, packet_id, props)


def _acknowledgement(kind: type[PubAck | PubRec | PubRel | PubComp], packet_type: int) -> Decoder5:
    """PUBACK, PUBREC, PUBREL or PUBCOMP (sections 3.4-3.7): a packet id, then a reason code and properties
    unless the remaining length stops before them (then 0x00, none)."""
    allowed = FROM_CLIENT[kind.__name__.upper()]

    def decode(first: int, data: bytes, start: int, end: int) -> PubAck | PubRec | PubRel | PubComp:
        if end - start < 2:
            raise malformed(f"{kind.__name__.upper()} ends before its packet identifier")
        packet_id = data[start] << 8 | data[start + 1]
        if not packet_id:
            raise malformed("packet identifier 0")
        if end - start == 2:
            return kind(packet_id)
        reason = data[start + 2]
        if reason not in allowed:
            raise protocol_error(f"reason code {reason:#04x} is not one a client's {kind.__name__.upper()} has")
        if end - start == 3:
            return kind(packet_id, reason)
        props, pos = properties.decode(data, start + 3, end, packet_type)
        if pos != end:
            raise malformed(f"bytes left over after the {kind.__name__.upper()} properties")
        return kind(packet_id, reason, props)
    return decode


def subscribe(first: int, data: bytes, start: int, end: int) -> Subscribe:
    """SUBSCRIBE (section 3.8): each filter's options byte has reserved bits 6-7, which must be 0."""
    reader = Reader(data, start, end)
    packet_id = reader.packet_id()
    props, reader.pos = properties.decode(data, reader.pos, end, properties.SUBSCRIBE)
    packet = Subscribe(packet_id, properties=props)
    while reader.more():
        subscription = topic_filter(reader.binary("topic filter"))
        options = reader.byte("subscription options")
        if options & 0xC0:
            raise malformed(f"subscription options {options:#04x} set reserved bits")
        if options & 3 == 3:
            raise protocol_error("subscription options ask for QoS 3")
        if options & 0x30 == 0x30:
            raise protocol_error("subscription options ask for retain handling 3")
        if options & 4 and subscription.startswith("$share/"):
            raise protocol_error("no local on a shared subscription")
        packet.filters.append((subscription, options & 3))
        packet.options.append(_OPTIONS[options])
    if not packet.filters:
        raise protocol_error("SUBSCRIBE without a topic filter")
    return packet


def unsubscribe(first: int, data: bytes, start: int, end: int) -> Unsubscribe:
    reader = Reader(data, start, end)
    packet_id = reader.packet_id()
    props, reader.pos = properties.decode(data, reader.pos, end, properties.UNSUBSCRIBE)
    packet = Unsubscribe(packet_id, properties=props)
    while reader.more():
        packet.filters.append(topic_filter(reader.binary("topic filter")))
    if not packet.filters:
        raise protocol_error("UNSUBSCRIBE without a topic filter")
    return packet


_NORMAL_DISCONNECT = Disconnect()  # the commonest, a bare e0 00: shared, as the decoders never change a packet


def disconnect(first: int, data: bytes, start: int, end: int) -> Disconnect:
    """DISCONNECT (section 3.14): remaining length 0 means reason 0x00 with no properties, 1 a reason alone."""
    if start == end:
        return _NORMAL_DISCONNECT
    reason = data[start]
    if reason not in FROM_CLIENT["DISCONNECT"]:
        raise protocol_error(f"reason code {reason:#04x} is not one a client's DISCONNECT has")
    if end - start == 1:
        return Disconnect(reason)
    props, pos = properties.decode(data, start + 1, end, properties.DISCONNECT)
    if pos != end:
        raise malformed("bytes left over after the DISCONNECT properties")
    return Disconnect(reason, props)


def auth(first: int, data: bytes, start: int, end: int) -> Auth:
    """AUTH (section 3.15): empty for 0x00 with no properties, else a reason code and properties."""
    if start == end:
        return Auth()
    reason = data[start]
    if reason not in FROM_CLIENT["AUTH"]:
        raise protocol_error(f"reason code {reason:#04x} is not one an AUTH has")
    props, pos = properties.decode(data, start + 1, end, properties.AUTH)
    if pos != end:
        raise malformed("bytes left over after the AUTH properties")
    return Auth(reason, props)


DECODERS = {
    properties.PUBLISH: publish,
    properties.PUBACK: _acknowledgement(PubAck, properties.PUBACK),
    properties.PUBREC: _acknowledgement(PubRec, properties.PUBREC),
    properties.PUBREL: _acknowledgement(PubRel, properties.PUBREL),
    properties.PUBCOMP: _acknowledgement(PubComp, properties.PUBCOMP),
    properties.SUBSCRIBE: subscribe,
    properties.UNSUBSCRIBE: unsubscribe,
    properties.DISCONNECT: disconnect,
    properties.AUTH: auth,
}
