"""`python -m bench.mqtt_peers`: Warren next to RabbitMQ's MQTT plugin and Mosquitto under one MQTT load.

Each server in turn (--servers, default warren,rabbitmq,mosquitto), started by this tool and stopped
after its turn: the same devices (MQTT 3.1.1, QoS 1), the same rates, the same client code.

Examples (from the repository root, as root or the rabbitmq user, for the RabbitMQ node):
  python -m bench.mqtt_peers --devices 500 --duration 5 --quiet 5
  python -m bench.mqtt_peers --devices 10000 --out /tmp/peers --publish mqtt-peers-10000

Everything is bounded (device count, --duration, --quiet, --ramp-timeout) and stops by itself; the
servers and load processes it started go with it, Ctrl-C and SIGTERM included.
"""

from gevent import monkey

monkey.patch_all()

import argparse
import math
import os
import secrets
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import gevent

from bench.cli import script_parser
from bench.mqtt_peers import output
from bench.mqtt_peers.measure import measure, say
from bench.mqtt_peers.servers import LABELS, SERVERS, known_servers, running
from bench.stampede.__main__ import DEFAULT_AMQP_URL, first_of
from bench.stampede.controller import processes_for
from bench.stampede.measure import machine
from bench.stampede.suite import SESSIONS_PER_WORKER

RESULTS = Path("bench/results")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser("python -m bench.mqtt_peers", __doc__)
    parser.add_argument("--servers", type=known_servers, default=list(SERVERS),
                        help=f"which, in this order (default: {','.join(SERVERS)})")
    parser.add_argument("--devices", type=positive_int, default=10000)
    parser.add_argument("--processes", type=positive_int,
                        help="load processes (default: one per 15,000 devices, at least 2)")
    parser.add_argument("--concurrency", type=positive_int, default=500, help="in-flight connects per process")
    parser.add_argument("--heartbeat", type=float, default=30.0, help="MQTT keep alive of every device, seconds")
    parser.add_argument("--event-rate", type=float, default=100.0, help="QoS 1 events per second (all devices)")
    parser.add_argument("--command-rate", type=float, default=100.0, help="commands per second")
    parser.add_argument("--command-timeout", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of events, then of commands")
    parser.add_argument("--quiet", type=float, default=30.0,
                        help="seconds of keep-alive only (default: one keep-alive period, every device pings once)")
    parser.add_argument("--settle", type=float, default=3.0, help="pause after connecting, after the drop "
                                                                  "and between servers")
    parser.add_argument("--ramp-timeout", type=float, default=120.0)
    warren = parser.add_argument_group("Warren")
    warren.add_argument("--workers", type=positive_int,
                        help="gunicorn workers (default: as the stampede suite, one per 18,000 devices, at least 2)")
    warren.add_argument("--amqp-url", default=os.environ.get("AMQP_URL") or DEFAULT_AMQP_URL)
    warren.add_argument("--gateway-dir", type=Path, default=Path("."), help="the checkout Warren starts from")
    warren.add_argument("--secret", default=first_of("DEVICE_SECRETS", "bench-secret"))
    output_group = parser.add_argument_group("output")
    output_group.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()),
                              help="directory for the JSON (every timeline), page, plot and server logs "
                                   "(default: %(default)s)")
    output_group.add_argument("--name", help="file names' stem (default: mqtt-peers-DEVICES)")
    output_group.add_argument("--publish", metavar="NAME",
                              help=f"also write the page and the plot as {RESULTS}/NAME.md and NAME.png")
    parser.add_argument("--prefix", default=f"peers{secrets.token_hex(2)}", help="device ids are PREFIX-000000 ...")
    args = parser.parse_args(argv)
    args.processes = args.processes or max(2, processes_for(args.devices))
    args.workers = args.workers or max(2, math.ceil(args.devices / SESSIONS_PER_WORKER))
    args.name = args.name or f"mqtt-peers-{args.devices}"
    if min(args.event_rate, args.command_rate, args.duration, args.quiet, args.heartbeat) <= 0:
        parser.error("--event-rate, --command-rate, --duration, --quiet and --heartbeat must be positive")
    return args


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def run_all(args: argparse.Namespace, logs: Path) -> dict[str, dict[str, Any]]:
    """Every server's turn; a server that fails is reported as failed and the next one still runs."""
    results: dict[str, dict[str, Any]] = {}
    for number, key in enumerate(args.servers):
        if number:
            gevent.sleep(args.settle)  # let the last server's exit settle before the next one starts
        started_at = time.monotonic()
        say(f"starting {LABELS[key]} ({number + 1} of {len(args.servers)}); logs in {logs}")
        try:
            with running(key, args, logs) as server:
                results[key] = measure(args, server)
        except Exception as exc:  # noqa: BLE001 - one server's failure must not lose the others' figures
            traceback.print_exc()
            results[key] = {"server": LABELS[key], "error": f"{type(exc).__name__}: {exc}"}
        say(f"{LABELS[key]} done in {time.monotonic() - started_at:.0f}s")
    return results


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    facts = machine()
    return {"command": " ".join(["python -m bench.mqtt_peers", *sys.argv[1:]]), "devices": args.devices,
            "processes": args.processes, "workers": args.workers, "heartbeat": args.heartbeat,
            "event_rate": args.event_rate, "command_rate": args.command_rate, "duration": args.duration,
            "quiet": args.quiet, "servers": args.servers,
            "machine": f"{facts['cores']} cores, {facts['memory_gib']} GiB, kernel {facts['kernel']}, "
                       f"Python {facts['python']}, open-file limit {facts['open_files_limit']:,}"}


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds every `with`: servers and loads stop
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix=f"{args.name}-logs-", dir=args.out))
    started_at = time.monotonic()
    results = run_all(args, logs)
    print(output.text_table(results))
    print(output.summary(results))
    publish = RESULTS / args.publish if args.publish else None
    for path in output.write(results, settings_of(args), args.out, args.name, publish):
        say(f"wrote {path}")
    say(f"all done in {time.monotonic() - started_at:.0f}s")


if __name__ == "__main__":
    main()
