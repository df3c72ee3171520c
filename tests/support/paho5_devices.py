"""paho-mqtt 2.x in MQTTv5 mode, unmodified, for the MQTT 5 end-to-end tests (test_mqtt5_reasons*.py).

A stock client is the device section 9 promises to serve: where paho can send a
case (QoS 2, a retained publish, a Payload Format Indicator on bytes that are
not UTF-8, a Subscription Identifier, a DISCONNECT 0x04), the tests use it, and
read the gateway's answer as paho reports it to its application.
"""

from __future__ import annotations

from typing import Any, Self

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.reasoncodes import ReasonCode

from support.devices import uid
from support.gateways import Gateway
from support.mqtt_devices import token
from support.tls_devices import Pki
from support.waiting import WAIT, wait_until


def paho_properties(packet_type: int, **fields: Any) -> PahoProperties:
    """paho's properties for `packet_type` (PacketTypes.PUBLISH, ...), named as paho names them."""
    props = PahoProperties(packet_type)
    for name, value in fields.items():
        setattr(props, name, value)
    return props


class Paho5:
    """A device on paho in MQTTv5 mode over TCP, TLS (MQTT_TLS_PORT) or `/mqtt`; its loop runs on a thread.

    Recorded as paho reports them: the SUBACKs' reason codes by message id, and each end of the
    connection as (from the gateway's DISCONNECT?, reason code, properties as paho's JSON).
    """

    def __init__(self, gateway: Gateway, transport: str = "tcp", pki: Pki | None = None, device: str | None = None,
                 will: tuple[str, bytes] | None = None) -> None:
        self.device = device or uid("mq5")
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.device, protocol=paho.MQTTv5,
                                  transport="websockets" if transport == "ws" else "tcp", reconnect_on_failure=False)
        port = gateway.mqtt_port
        if transport == "ws":
            self.client.ws_set_options(path="/mqtt")
            port = gateway.port
        elif transport == "tls":
            assert pki is not None
            self.client.tls_set_context(pki.client_context())
            port = int(gateway.env["MQTT_TLS_PORT"])
        self.client.username_pw_set("sdk", token(self.device))
        if will is not None:
            self.client.will_set(*will, qos=1)
        self.connacks: list[int] = []
        self.subacks: dict[int, list[int]] = {}
        self.ends: list[tuple[bool, int, dict[str, Any]]] = []
        self.client.on_connect = lambda c, u, flags, code, props: self.connacks.append(code.value)
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.update({mid: [
            code.value for code in codes]})
        self.client.on_disconnect = lambda c, u, flags, code, props: self.ends.append(
            (flags.is_disconnect_packet_from_server, code.value, props.json() if props is not None else {}))
        self.client.connect("127.0.0.1", port, 60)
        self.client.loop_start()
        self._running = True
        assert wait_until(lambda: self.connacks, WAIT) == [0x00]

    def disconnected_by_gateway(self) -> tuple[int, dict[str, Any]]:
        """(reason code, properties) of the gateway's DISCONNECT; fails if the connection ended without one."""
        from_gateway, code, props = wait_until(lambda: self.ends, WAIT)[0]
        assert from_gateway, f"the connection ended without a DISCONNECT from the gateway: {self.ends}"
        return code, props

    def subscribe(self, *filters: tuple[str, int], props: PahoProperties | None = None) -> int:
        """Send a SUBSCRIBE; its message id."""
        _, mid = self.client.subscribe(list(filters), properties=props)
        return mid

    def close(self, reason: int = 0x00) -> None:
        """The device's own DISCONNECT with `reason` (0x04: disconnect with will message)."""
        if self._running:
            self.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=reason))
            self.client.loop_stop()
            self._running = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
