"""What the MQTT codec costs per hot-path packet, next to orjson.loads of a 60-byte JSON line.

`python -m bench.mqtt_codec_bench [--seconds 0.3]` times decoding a feed that
holds one PINGREQ, one QoS 1 PUBLISH (60-byte JSON payload) or one PUBACK (the
common case: one small packet per recv), a feed that holds 100 such PUBLISHes,
and encoding a PUBLISH and a PUBACK; then the same on an MQTT 5 connection
(a PUBLISH with a User Property and a Message Expiry Interval, a PUBACK, and
encoding a command as PROTOCOL.md section 9 sends it, with its five
properties). Each figure is the best of five runs, in
µs per packet. orjson.loads is the yardstick: the gateway parses every JSON
payload anyway, so a codec well under it is not the bottleneck. Prints figures;
asserts nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson

from app.mqtt import MqttDecoder, Properties, packets5, puback, publish
from bench.cli import script_parser

PAYLOAD = b'{"temp":21.5,"humidity":40,"battery":97,"door":"open","n":1}'
TOPIC = "events/door.state"


def per_call_us(fn: Callable[[], object], seconds: float, per_call: int = 1) -> float:
    """Best of five runs of `fn` repeated for about `seconds`, in µs per packet."""
    runs = max(1, int(seconds / _once(fn)))
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(runs):
            fn()
        best = min(best, (time.perf_counter() - began) / runs)
    return best * 1e6 / per_call


def _once(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    for _ in range(1000):
        fn()
    return max((time.perf_counter() - began) / 1000, 1e-9)


def main() -> None:
    parser = script_parser("python -m bench.mqtt_codec_bench", __doc__)
    parser.add_argument("--seconds", type=float, default=0.3, help="time per run (five runs per figure)")
    seconds = parser.parse_args().seconds

    decoder = MqttDecoder(65536)
    ping = b"\xc0\x00"
    event = publish(TOPIC, PAYLOAD, qos=1, packet_id=4242)
    ack = puback(4242)
    burst = event * 100
    figures = {
        f"orjson.loads, {len(PAYLOAD)}-byte JSON (yardstick)": per_call_us(lambda: orjson.loads(PAYLOAD), seconds),
        "decode PINGREQ": per_call_us(lambda: decoder.feed(ping), seconds),
        f"decode QoS 1 PUBLISH ({len(PAYLOAD)}-byte payload)": per_call_us(lambda: decoder.feed(event), seconds),
        "decode PUBACK": per_call_us(lambda: decoder.feed(ack), seconds),
        "decode 100 QoS 1 PUBLISHes in one feed, per packet": per_call_us(lambda: decoder.feed(burst), seconds, 100),
        f"encode QoS 1 PUBLISH ({len(PAYLOAD)}-byte payload)":
            per_call_us(lambda: publish(TOPIC, PAYLOAD, 1, 4242), seconds),
        "encode PUBACK": per_call_us(lambda: puback(4242), seconds),
    }
    decoder5 = MqttDecoder(65536)
    decoder5.feed(b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x01d")  # a version 5 CONNECT
    event5 = packets5.publish(TOPIC, PAYLOAD, 1, 4242, props=Properties(message_expiry_interval=60,
                                                                         user_properties=(("site", "hq"),)))
    ack5 = packets5.puback(4242)
    burst5 = event5 * 100
    command = Properties(response_topic="replies/c-0001", correlation_data=b"c-0001", message_expiry_interval=60,
                         content_type="application/json", payload_format_indicator=1)
    figures.update({
        "MQTT 5: decode QoS 1 PUBLISH, 2 properties": per_call_us(lambda: decoder5.feed(event5), seconds),
        "MQTT 5: decode PUBACK": per_call_us(lambda: decoder5.feed(ack5), seconds),
        "MQTT 5: decode 100 QoS 1 PUBLISHes in one feed, per packet":
            per_call_us(lambda: decoder5.feed(burst5), seconds, 100),
        "MQTT 5: encode command PUBLISH, 5 properties":
            per_call_us(lambda: packets5.publish("commands/unlock", PAYLOAD, 1, 4242, props=command), seconds),
        "MQTT 5: encode PUBACK": per_call_us(lambda: packets5.puback(4242), seconds),
    })
    yardstick = next(iter(figures.values()))
    width = max(map(len, figures))
    for name, us in figures.items():
        print(f"{name:<{width}}  {us:6.3f} µs  ({us / yardstick:4.2f} × orjson.loads)")


if __name__ == "__main__":
    main()
