"""A quiet probe beside a running benchmark: one device and one backend of its own, in a process of its own.

`python -m bench.probe --target 127.0.0.1:7878 --secret bench-secret --rate 20 --seconds 30`
connects one JSON-lines device (`probe-<pid>`), sends it `--rate` commands a second
through `devices.commands` (each stamped with its send time) and one event every 50 ms,
and prints three figures, p50 / p90 / p99 in ms:

- round trip: command published → the device's reply back at this backend;
- publish → device: the first half of it, from the stamp the device reads;
- event ack: the device's event → its `ack` (one hop through the gateway and RabbitMQ).

Why: `python -m bench.stampede` measures round trips in its controller, a process that
also drives 200,000 devices' load and samples the machine; on a saturated machine its
own delay is part of what it reports. This process does little, so its figures are
the gateway's and RabbitMQ's (and the machine's). Run it during a benchmark's hold, once
with the benchmark sending no commands and once while it does. Asserts nothing.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import os  # after monkey patching
import socket
import sys
import time

import amqp
import gevent
import kombu
import orjson

from app.auth import mint
from bench.cli import script_parser
from bench.stampede.controller import percentiles

EVENT_EVERY = 0.05


class ProbeDevice:
    """One device on its own connection: answers commands at once, sends events, times both."""

    def __init__(self, host: str, port: int, secret: bytes) -> None:
        self.name = f"probe-{os.getpid()}"
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.lines = self.sock.makefile("rb")
        self.send({"type": "hello", "device": self.name, "token": mint(secret, self.name), "v": 1})
        welcome = orjson.loads(self.lines.readline())
        if welcome.get("type") != "welcome":
            raise SystemExit(f"bench.probe: the gateway did not welcome {self.name}: {welcome}")
        self.to_device: list[float] = []
        self.event_ack: list[float] = []
        self.events_pending: dict[str, float] = {}

    def send(self, frame: dict) -> None:
        self.sock.sendall(orjson.dumps(frame) + b"\n")

    def read_forever(self) -> None:
        while line := self.lines.readline():
            frame = orjson.loads(line)
            if frame.get("type") == "command":
                self.to_device.append((time.time() - frame["data"]["sent"]) * 1000)
                self.send({"type": "reply", "id": frame["id"], "ok": True, "data": {}})
            elif frame.get("type") == "ack" and (sent := self.events_pending.pop(frame.get("id"), None)):
                self.event_ack.append((time.monotonic() - sent) * 1000)

    def events_forever(self) -> None:
        for number in range(1, sys.maxsize):
            gevent.sleep(EVENT_EVERY)
            event_id = f"e{number}"
            self.events_pending[event_id] = time.monotonic()
            self.send({"type": "event", "id": event_id, "name": "probe", "data": {}})


def round_trips(url: str, device: str, rate: float, seconds: float) -> list[float]:
    """Send `rate` commands a second to `device` for `seconds`; the round trip of each one answered, in ms."""
    broker = kombu.Connection(url)
    broker.connect()
    connection = broker.connection  # py-amqp's, underneath
    channel = connection.channel()
    reply_to, _, _ = channel.queue_declare("", exclusive=True, auto_delete=True)
    # Our device's events need a queue to be routable (else they are nacked `unroutable`): ours, read by nobody,
    # as a backend's would be; exclusive, so it goes with this connection.
    events, _, _ = channel.queue_declare("", exclusive=True, auto_delete=True, arguments={"x-max-length": 1000})
    channel.queue_bind(events, "devices.events", f"{device}.#")
    sent: dict[str, float] = {}
    answered: list[float] = []

    def on_reply(message: amqp.Message) -> None:
        if (started := sent.pop(message.properties["correlation_id"], None)) is not None:
            answered.append((time.monotonic() - started) * 1000)

    channel.basic_consume(reply_to, callback=on_reply, no_ack=True)
    started = next_at = time.monotonic()
    number = 0
    while (now := time.monotonic()) < started + seconds + 2:  # 2 s more for the last replies
        if now >= next_at and now < started + seconds:
            number += 1
            command_id = f"c{number}"
            sent[command_id] = time.monotonic()
            body = orjson.dumps({"name": "probe", "data": {"sent": time.time()}})
            channel.basic_publish(amqp.Message(body, content_type="application/json", message_id=command_id,
                                               correlation_id=command_id, reply_to=reply_to, expiration="10000"),
                                  exchange="devices.commands", routing_key=device, mandatory=True)
            next_at += 1 / rate
        try:
            connection.drain_events(timeout=0.002)
        except TimeoutError:
            pass
    broker.release()
    return answered


def line(label: str, values: list[float]) -> str:
    figures = percentiles(values)
    if not figures["n"]:
        return f"{label}: none"
    p90 = sorted(values)[min(len(values) - 1, int(0.9 * len(values)))]
    return f"{label}: n={figures['n']} p50={figures['p50']:.1f} p90={p90:.1f} p99={figures['p99']:.1f} ms"


def main() -> None:
    parser = script_parser("python -m bench.probe", __doc__)
    parser.add_argument("--target", default="127.0.0.1:7878", help="the gateway's JSON-lines device port")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("--secret", default=os.environ.get("DEVICE_SECRETS", "bench-secret").split(",")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="commands a second")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    device = ProbeDevice(host, int(port), args.secret.encode())
    readers = [gevent.spawn(device.read_forever), gevent.spawn(device.events_forever)]
    answered = round_trips(args.amqp_url, device.name, args.rate, args.seconds)  # events acked from its bind on
    gevent.killall(readers)
    print(line("round trip", answered))
    print(line("publish -> device", device.to_device))
    print(line("event ack", device.event_ack))


if __name__ == "__main__":
    main()
