"""What the broker's hot path costs in CPU per item, against the real RabbitMQ.

`python -m bench.amqp_bench [--root DIR] [--items N] [--rate R]` runs, in one gevent
process, N confirmed event publishes through the broker's publisher and N command
deliveries through its consumer, and prints the process's CPU time per item (user +
system, µs). The commands are published by a separate process, so that only the
consuming side is counted here.

`--root` says whose `app` package to measure: `/work/baseline` (a worktree of the
commit before the split) measures the old `app/broker.py`, the default the current one;
only the facade both share is used (`Broker(...)`, `publish_event`, `bind`, `announce`).

`--rate` paces both the publishes and the commands (items per second, spread evenly, as
from thousands of devices at once); `--rate 0` sends them in one burst. Prints figures;
asserts nothing.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # after monkey patching, as in the worker
import json
import resource
import subprocess
import sys
import time
import uuid
from typing import Any

import gevent
from gevent.event import Event

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672//"
TICK = 0.002  # the pacer's step: at 2,000 items/s, four items per step

# Runs in a plain (not gevent) interpreter: publishes the commands, paced, and exits.
COMMAND_SENDER = r"""
import sys, time, amqp, kombu, orjson
url, device, items, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
connection = kombu.Connection(url)
channel = connection.default_channel
body = orjson.dumps({"name": "unlock", "data": {"bench": True}})
started = time.monotonic()
for n in range(items):
    if rate:
        delay = started + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    message = amqp.Message(body, content_type="application/json", message_id=f"c{n}", expiration="60000",
                           timestamp=int(time.time()))
    channel.basic_publish(message, exchange="devices.commands", routing_key=device)
connection.release()
"""


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_broker(root: str | None) -> Any:
    if root:
        sys.path.insert(0, root)
    import app.broker

    return app.broker


def links_of(broker: Any) -> tuple[Any, ...]:
    """The greenlet bodies to run: the facade's `links`, or the old module's two attributes."""
    links = getattr(broker, "links", None)
    return tuple(links) if links is not None else (broker.publisher, broker.consumer)


def declare_witness(url: str, device: str) -> Any:
    """A queue that takes the bench's events (else they are unroutable), deleted at the end."""
    from kombu import Connection, Exchange, Queue

    connection = Connection(url)
    queue = Queue(f"bench.{device}", Exchange("devices.events", type="topic", durable=True),
                  routing_key=f"{device}.#", auto_delete=False, durable=False)
    queue(connection.default_channel).declare()
    return connection, queue


def bench_events(broker: Any, device: str, items: int, rate: float) -> dict[str, Any]:
    outcomes: dict[str, int] = {}
    all_done = Event()
    remaining = [items]

    def done(outcome: str | None) -> None:
        key = outcome or "acked"
        outcomes[key] = outcomes.get(key, 0) + 1
        remaining[0] -= 1
        if remaining[0] == 0:
            all_done.set()

    cpu, wall = cpu_seconds(), time.monotonic()
    for n in range(items):
        if rate and n % max(1, int(rate * TICK)) == 0:
            delay = wall + n / rate - time.monotonic()
            gevent.sleep(max(0.0, delay))
        broker.publish_event(device, "bench-session", "door.opened", f"e{n}", {"n": n}, done)
    all_done.wait(120)
    cpu, wall = cpu_seconds() - cpu, time.monotonic() - wall
    return {"items": items, "outcomes": outcomes, "cpu_us_per_item": round(cpu / items * 1e6, 1),
            "wall_s": round(wall, 2)}


def bench_commands(url: str, device: str, items: int, rate: float, cpu_marks: list[float], delivered: list[int],
                   all_in: Event) -> dict[str, Any]:
    sender = subprocess.Popen([sys.executable, "-c", COMMAND_SENDER, url, device, str(items), str(rate)])
    all_in.wait(120)
    sender.wait(30)
    cpu = cpu_marks[-1] - cpu_marks[0]  # from the first delivery to the last: items - 1 of them
    return {"items": items, "delivered": delivered[0], "cpu_us_per_item": round(cpu / (items - 1) * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="directory holding the `app` package to measure")
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--rate", type=float, default=2000.0, help="items per second; 0 for one burst")
    args = parser.parse_args()
    module = load_broker(args.root)

    device = f"bench-{uuid.uuid4().hex[:8]}"
    session_id = "bench-session"
    routed = Event()
    cpu_marks: list[float] = []
    delivered = [0]
    all_in = Event()

    def deliver(command: Any) -> None:
        delivered[0] += 1
        if delivered[0] in (1, args.items):  # CPU is read at the first delivery and the last only
            cpu_marks.append(cpu_seconds())
        if delivered[0] == args.items:
            all_in.set()

    def takeover(dev: str, started: float, sid: str) -> None:
        if dev == device and sid == session_id:
            routed.set()

    broker = module.Broker(args.url, deliver=deliver, takeover=takeover, max_command_bytes=65536,
                           live_sessions=lambda: [(device, 1.0, session_id)])
    greenlets = [gevent.spawn(link.run) for link in links_of(broker)]
    witness, queue = declare_witness(args.url, device)
    try:
        deadline = time.monotonic() + 20
        while not broker.ready and time.monotonic() < deadline:
            gevent.sleep(0.05)
        broker.bind(device)
        broker.announce(device, 1.0, session_id)
        if not routed.wait(10):
            raise SystemExit("the device's commands never routed here")
        events = bench_events(broker, device, args.items, args.rate)
        commands = bench_commands(args.url, device, args.items, args.rate, cpu_marks, delivered, all_in)
    finally:
        queue(witness.default_channel).delete()
        witness.release()
        gevent.killall(greenlets, timeout=5)
    print(json.dumps({"root": args.root or "current", "rate": args.rate, "events": events,
                      "commands": commands}))


if __name__ == "__main__":
    main()
