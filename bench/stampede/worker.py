"""A load process: holds up to ~18,000 devices (JSON or MQTT) under gevent and obeys the controller.

Started by `controller.py` as `python -m bench.stampede.worker '<json settings>'`.
It reads one JSON command per line on stdin (connect, drop, cut, events, flap, where,
reconnect_spread, stop) and writes its counters as one JSON line per second on stdout,
sessions lost and regained (`changes`) within CHANGES_TICK, and the devices' addresses
(`where`) when asked. When stdin closes (the controller died) it exits, so no load
process outlives its run.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import contextlib
import gc
import random
import resource
import socket
import sys
import time
from typing import Any

import gevent
import orjson
from gevent.fileobject import FileObjectPosix
from gevent.lock import BoundedSemaphore, Semaphore

from bench.stampede.device import Device, World, flap, live
from bench.stampede.json_device import JsonDevice
from bench.stampede.links import Target, client_context
from bench.stampede.mqtt5_device import Mqtt5Device
from bench.stampede.mqtt_device import BrokerMqttDevice, MqttDevice

EVENT_TICK = 0.1
CHANGES_TICK = 0.05  # a comeback reaches the controller this soon: it sends its first command then


class Worker:
    def __init__(self, settings: dict[str, Any]) -> None:
        tls = client_context(settings["cafile"], settings["verify_tls"])  # one for all: built once, shared
        targets = [Target(url, tls) for url in settings["targets"]]
        self.number = settings["worker"]
        self.run_id = settings["run_id"]  # keeps event ids unique across runs sharing a RabbitMQ
        self.world = World(
            targets=targets, sources=settings["sources"], floor=settings["floor"],
            gate=BoundedSemaphore(settings["concurrency"]),
            connect_timeout=settings["connect_timeout"],
            welcome_timeout=settings["welcome_timeout"], heartbeat=settings["heartbeat"])
        secret = settings["secret"].encode()
        first, count = settings["first"], settings["count"]
        self.first = first
        dialect = settings.get("dialect")
        self.devices = [device_for(f"{settings['prefix']}-{index:06d}", secret, targets[index % len(targets)],
                                   dialect) for index in range(first, first + count)]
        self.greenlets: list[gevent.Greenlet] = []
        self.event_rate = 0.0
        self.event_seq = 0
        self.out = FileObjectPosix(sys.stdout.fileno(), "wb", close=False)
        self.writing = Semaphore()  # a long line (`where`) may block mid-write: no other line in between

    def connect(self, jitter: float) -> None:
        """Start every device, each after a random delay of up to `jitter` seconds."""
        self.drop()
        self.greenlets = [gevent.spawn_later(random.uniform(0, jitter), live, device, self.world)
                          for device in self.devices]

    def flap(self, indexes: list[int], interval: float) -> None:
        """Make the devices of `indexes` (this worker's among them) reconnect every `interval` seconds."""
        for index in indexes:
            position = index - self.first
            if 0 <= position < len(self.greenlets):
                self.greenlets[position].kill()
                self.greenlets[position] = gevent.spawn(flap, self.devices[position], self.world, interval)

    def drop(self) -> None:
        """Close every connection at once (the devices' own doing, so nothing counts as lost)."""
        gevent.killall(self.greenlets)
        self.greenlets = []

    def cut(self) -> None:
        """End every connection's both directions at once, as a network outage seen by the devices would:
        unlike `drop`, each device counts its session lost and comes back as firmware does (`live`)."""
        for device in self.devices:
            link = device.link
            if link is not None:
                with contextlib.suppress(OSError):
                    link.sock.shutdown(socket.SHUT_RDWR)  # its reader sees the end; the server gets a FIN

    def report_forever(self) -> None:
        """Report at once (the controller waits for that: it means ready), then every second.

        Each second also freezes what survived it out of the cyclic GC's walk, as the
        gateway does: otherwise 15,000 held devices cost this process GC pauses of up
        to a second, and they would show up as the gateway's round-trip tail.
        """
        while True:
            self.emit({"worker": self.number, "t": time.time(), **self.world.stats.report()})
            gc.freeze()
            gevent.sleep(1.0)

    def emit(self, line: dict[str, Any]) -> None:
        """Write one JSON line to the controller."""
        with self.writing:
            self.out.write(orjson.dumps(line) + b"\n")
            self.out.flush()

    def changes_forever(self) -> None:
        """Pass sessions lost and regained on within a tick, not with the next second's report."""
        while True:
            gevent.sleep(CHANGES_TICK)
            if self.world.changes:
                changes, self.world.changes = self.world.changes, []
                self.emit({"worker": self.number, "changes": changes})

    def where(self) -> None:
        """Each connected device's own address (source IP, port): the server's side of its connection
        names it as its peer, so the controller can tell which server process holds which device."""
        found = {}
        for device in self.devices:
            link = device.link
            if link is not None:
                found[device.name] = link.sock.getsockname()[:2]
        self.emit({"worker": self.number, "where": found})

    def heartbeats_forever(self) -> None:
        """Ping from every device once per heartbeat; phases are spread at connect time."""
        while True:
            gevent.sleep(1.0)
            now = time.monotonic()
            for device in self.devices:
                if device.link is not None and now >= device.next_ping:
                    device.next_ping = now + device.heartbeat
                    device.ping()

    def events_forever(self) -> None:
        """Send events at `event_rate` per second from random connected devices."""
        owed = 0.0
        while True:
            gevent.sleep(EVENT_TICK)
            owed += self.event_rate * EVENT_TICK
            while owed >= 1:
                owed -= 1
                self.send_event(random.choice(self.devices))

    def send_event(self, device: Device) -> None:
        self.event_seq += 1
        event_id = f"{self.run_id}-w{self.number}-{self.event_seq}"
        if device.send_event(event_id, self.event_seq, self.world):
            self.world.stats.events_sent += 1

    def obey(self) -> None:
        """Run controller commands until `stop` or until stdin closes."""
        commands = FileObjectPosix(sys.stdin.fileno(), "rb", close=False)
        while line := commands.readline():
            command = orjson.loads(line)
            op = command["op"]
            if op == "connect":
                self.connect(command.get("jitter", 0.0))
            elif op == "drop":
                self.drop()
            elif op == "cut":
                self.cut()
            elif op == "flap":
                self.flap(command["indexes"], float(command.get("interval", 1.0)))
            elif op == "events":
                self.event_rate = float(command["rate"])
            elif op == "where":
                self.where()
            elif op == "reconnect_spread":
                self.world.reconnect_spread = float(command["seconds"])
            elif op == "stop":
                break
        self.drop()


def device_for(name: str, secret: bytes, target: Target, dialect: str | None = None) -> Device:
    """A device of the dialect `target` speaks: MQTT 3.1.1 or 5.0 (PROTOCOL.md sections 8, 9) or JSON frames;
    the `broker` dialect is MQTT 3.1.1 to a general MQTT broker (bench.mqtt_peers)."""
    if dialect == "broker":
        if target.scheme != "mqtt":
            raise ValueError(f"the broker dialect is MQTT 3.1.1 over TCP (mqtt://host:port), not {target.url}")
        return BrokerMqttDevice(name, secret, target)
    if target.mqtt:
        return (Mqtt5Device if target.mqtt_level == 5 else MqttDevice)(name, secret, target)
    return JsonDevice(name, secret, target)


def raise_file_limit() -> None:
    """Use the hard open-file limit: every device is a file."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    raise_file_limit()
    worker = Worker(orjson.loads(sys.argv[1]))
    for forever in (worker.report_forever, worker.heartbeats_forever, worker.events_forever,
                    worker.changes_forever):
        gevent.spawn(forever)
    worker.obey()


if __name__ == "__main__":
    main()
