"""MQTT 3.1.1 for devices (PROTOCOL.md section 8): a sans-I/O codec; the transport and session mapping sit on it."""

from app.mqtt.codec import MqttDecoder
from app.mqtt.packets import (
    PINGRESP,
    SUBACK_FAILURE,
    Connect,
    Disconnect,
    MqttError,
    Packet,
    PingReq,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    Subscribe,
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
    "PINGRESP", "SUBACK_FAILURE", "Connect", "Disconnect", "MqttDecoder", "MqttError", "Packet", "PingReq", "PubAck",
    "PubComp", "PubRec", "PubRel", "Publish", "Subscribe", "Unsubscribe", "Will", "connack", "pingresp", "puback",
    "publish", "suback", "unsuback",
]
