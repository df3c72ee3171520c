"""MQTT 3.1.1 and 5.0 for devices (PROTOCOL.md sections 8 and 9): a sans-I/O codec; the transport and session
mapping sit on it. The 3.1.1 encoders are at this package's top; MQTT 5's are `app.mqtt.packets5` (same names,
with reason codes and properties), its reason codes `app.mqtt.reasons`."""

from app.mqtt.codec import TOPIC_ALIAS_MAXIMUM, MqttDecoder
from app.mqtt.packets import (
    PINGRESP,
    SUBACK_FAILURE,
    Auth,
    Connect,
    Disconnect,
    MqttError,
    Packet,
    PingReq,
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
    connack,
    pingresp,
    puback,
    publish,
    suback,
    unsuback,
)

__all__ = [
    "PINGRESP", "SUBACK_FAILURE", "TOPIC_ALIAS_MAXIMUM", "Auth", "Connect", "Disconnect", "MqttDecoder", "MqttError",
    "Packet", "PingReq", "Properties", "PubAck", "PubComp", "PubRec", "PubRel", "Publish", "Subscribe",
    "SubscriptionOptions", "Unsubscribe", "Will", "connack", "pingresp", "puback", "publish", "suback", "unsuback",
]
