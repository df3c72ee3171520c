"""What the broker's hot path costs in CPU per item, against the real RabbitMQ.

`python -m bench.amqp_bench [--root DIR] [--items N] [--rate R] [--rebind D]` runs, in
one gevent process, N confirmed event publishes through the broker's publisher and N
command deliveries through its consumer, and prints the process's CPU time per item
(user + system, µs). The commands are published by a separate process, so that only
the consuming side is counted here.

`--rebind D` then binds D devices, cuts both connections (as a node's loss does) and
reports how the consumer comes back: when the first command for the first device it
re-binds arrives, the worst delay of such a command meanwhile (a probe process sends
one every 5 ms; those sent before that bind are dropped unrouted), and when every
device is bound and every session announced again.

`--root` says whose `app` package to measure: `/work/baseline` (a worktree of the
commit before the split) measures the old `app/broker.py`, the default the current one;
only the facade both share is used (`Broker(...)`, `publish_event`, `bind`, `announce`; the
sessions side attached as one `Inbound` where the broker has `attach`, as callbacks before).

`--rate` paces both the publishes and the commands (items per second, spread evenly, as
from thousands of devices at once); `--rate 0` sends them in one burst. Prints figures;
asserts nothing.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import gc  # after monkey patching, as in the worker
import json
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

import gevent
from gevent.event import Event

from bench.cli import script_parser
from bench.sampling import cpu_seconds

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672//"
TICK = 0.002  # the pacer's step: at 2,000 items/s, four items per step
PROBE_EVERY = 0.005

# Runs in a plain (not gevent) interpreter: publishes commands to one device, paced, and exits.
COMMAND_SENDER = r"""
import sys, time, amqp, kombu, orjson
url, device, items, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
connection = kombu.Connection(url)
channel = connection.default_channel
started = time.monotonic()
for n in range(items):
    if rate:
        delay = started + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    body = orjson.dumps({"name": "unlock", "data": {"sent": time.time()}})
    message = amqp.Message(body, content_type="application/json", message_id=f"c{n}", expiration="60000",
                           timestamp=int(time.time()))
    channel.basic_publish(message, exchange="devices.commands", routing_key=device)
connection.release()
"""


def load_broker(root: str | None) -> Any:
    if root:
        sys.path.insert(0, root)
    import app.broker

    return app.broker


def send_commands(url: str, device: str, items: int, rate: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", COMMAND_SENDER, url, device, str(items), str(rate)])


class Harness:
    """The broker's `Inbound` (app/sessions/ports.py), counting what arrives; `sessions` is what
    `live_sessions` reports."""

    def __init__(self, module: Any, url: str) -> None:
        self.device = f"bench-{uuid.uuid4().hex[:8]}"
        self.sessions = [(self.device, 1.0, "bench-session")]
        self.echoed: set[str] = set()  # devices whose own notice came back
        self.all_announced = Event()
        self.delivered = 0
        self.expected = 0
        self.cpu_marks: list[float] = []
        self.all_delivered = Event()
        self.probes: list[tuple[float, float]] = []  # (arrival, delay since sent) of each probe
        if hasattr(module.Broker, "attach"):  # the sessions side as one `Inbound`: this harness
            self.broker = module.Broker(url, max_command_bytes=65536)
            self.broker.attach(self)
        else:  # before app/sessions/ports.py's `Inbound`, the broker took callbacks
            self.broker = module.Broker(url, deliver=self.deliver, takeover=self.announced, max_command_bytes=65536,
                                        live_sessions=self.live_sessions)
        links = getattr(self.broker, "links", None)  # the old module had two attributes instead
        self.links = tuple(links) if links is not None else (self.broker.publisher, self.broker.consumer)

    def deliver(self, command: Any) -> None:
        if isinstance(command.data, dict) and command.device != self.device:
            self.probes.append((time.monotonic(), time.time() - command.data["sent"]))
            return
        self.delivered += 1
        if self.delivered in (1, self.expected):  # CPU is read at the first delivery and the last only
            self.cpu_marks.append(cpu_seconds())
        if self.delivered == self.expected:
            self.all_delivered.set()

    def announced(self, device: str, _started: float, _session_id: str) -> None:
        self.echoed.add(device)
        if len(self.echoed) >= len(self.sessions):
            self.all_announced.set()

    def live_sessions(self) -> list[tuple[str, float, str]]:
        return list(self.sessions)

    def answer(self, _device: str, _question: str) -> None:
        return None


def bench_events(harness: Harness, items: int, rate: float) -> dict[str, Any]:
    outcomes: dict[str, int] = {}
    all_done = Event()

    def done(outcome: str | None) -> None:
        key = outcome or "acked"
        outcomes[key] = outcomes.get(key, 0) + 1
        if sum(outcomes.values()) == items:
            all_done.set()

    cpu, wall = cpu_seconds(), time.monotonic()
    for n in range(items):
        if rate and n % max(1, int(rate * TICK)) == 0:
            gevent.sleep(max(0.0, wall + n / rate - time.monotonic()))
        harness.broker.publish_event(harness.device, "bench-session", "door.opened", f"e{n}", {"n": n}, done)
    all_done.wait(120)
    cpu, wall = cpu_seconds() - cpu, time.monotonic() - wall
    return {"items": items, "outcomes": outcomes, "cpu_us_per_item": round(cpu / items * 1e6, 1),
            "wall_s": round(wall, 2)}


def bench_commands(harness: Harness, url: str, items: int, rate: float) -> dict[str, Any]:
    harness.expected = items
    sender = send_commands(url, harness.device, items, rate)
    harness.all_delivered.wait(120)
    sender.wait(30)
    cpu = harness.cpu_marks[-1] - harness.cpu_marks[0]  # from the first delivery to the last: items - 1
    return {"items": items, "delivered": harness.delivered, "cpu_us_per_item": round(cpu / (items - 1) * 1e6, 1)}


def bench_rebind(harness: Harness, url: str, devices: int) -> dict[str, Any]:
    names = [f"{harness.device}-r{n}" for n in range(devices)]
    harness.sessions = [(name, 1.0, f"s{n}") for n, name in enumerate(names)]
    harness.echoed.clear()
    harness.all_announced.clear()
    for n, name in enumerate(names):
        harness.broker.bind(name)
        harness.broker.announce(name, 1.0, f"s{n}")
    if not harness.all_announced.wait(120):
        return {"devices": devices, "error": "the first binds never completed"}
    probe = send_commands(url, names[0], 100000, 1 / PROBE_EVERY)  # the first device re-bound
    gevent.sleep(1.0)
    harness.echoed.clear()
    harness.all_announced.clear()
    harness.probes.clear()
    cut = time.monotonic()
    for sock in [o for o in gc.get_objects() if isinstance(o, socket.socket) and _peer_port(o) == 5672]:
        sock.shutdown(socket.SHUT_RDWR)
    harness.all_announced.wait(120)
    back = time.monotonic() - cut
    gevent.sleep(0.5)
    probe.kill()
    after = [(arrival, delay) for arrival, delay in harness.probes if arrival - delay > cut]  # sent after the cut
    during = [delay for arrival, delay in after if arrival <= cut + back]
    first = min((arrival - cut for arrival, _ in after), default=None)
    return {"devices": devices, "all_bound_and_announced_s": round(back, 2),
            "first_command_sent_after_the_cut_arrived_s": None if first is None else round(first, 3),
            "commands_during_rebind": len(during),
            "worst_command_delay_during_rebind_ms": round(max(during, default=0) * 1000, 1)}


def _peer_port(sock: socket.socket) -> int | None:
    try:
        return sock.getpeername()[1]
    except (OSError, IndexError, TypeError):
        return None


def declare_witness(url: str, device: str) -> tuple[Any, Any]:
    """A queue that takes the bench's events (else they are unroutable), deleted at the end."""
    from kombu import Connection, Exchange, Queue

    connection = Connection(url)
    queue = Queue(f"bench.{device}", Exchange("devices.events", type="topic", durable=True),
                  routing_key=f"{device}.#", auto_delete=False, durable=False)
    queue(connection.default_channel).declare()
    return connection, queue


def main() -> None:
    parser = script_parser("python -m bench.amqp_bench", __doc__)
    parser.add_argument("--root", help="directory holding the `app` package to measure")
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--rate", type=float, default=2000.0, help="items per second; 0 for one burst")
    parser.add_argument("--rebind", type=int, default=0, help="devices to re-bind after a cut (0: skip)")
    args = parser.parse_args()
    harness = Harness(load_broker(args.root), args.url)
    greenlets = [gevent.spawn(link.run) for link in harness.links]
    results: dict[str, Any] = {"root": args.root or "current", "rate": args.rate}
    try:
        deadline = time.monotonic() + 20
        while not harness.broker.ready and time.monotonic() < deadline:
            gevent.sleep(0.05)
        harness.broker.bind(harness.device)
        harness.broker.announce(harness.device, 1.0, "bench-session")
        if not harness.all_announced.wait(10):
            raise SystemExit("the device's commands never routed here")
        witness, queue = declare_witness(args.url, harness.device)
        try:
            results["events"] = bench_events(harness, args.items, args.rate)
        finally:
            queue(witness.default_channel).delete()
            witness.release()
        results["commands"] = bench_commands(harness, args.url, args.items, args.rate)
        if args.rebind:
            results["rebind"] = bench_rebind(harness, args.url, args.rebind)
    finally:
        gevent.killall(greenlets, timeout=5)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
