"""`python -m bench.stampede SCENARIO`: simulate devices (and a backend) against a Warren.

Examples (from the repository root):
  python -m bench.stampede ramp --floor tcp://127.0.0.1:7979 --devices 20000
  python -m bench.stampede hold --target tcp://127.0.0.1:7878 --devices 20000 \\
      --floor tcp://127.0.0.1:7979 --command-rate 200 --event-rate 50 --duration 60
  python -m bench.stampede hold --target mqtt://127.0.0.1:1883 --devices 20000 --heartbeat 30
  python -m bench.stampede suite --devices 30000
  python -m bench.stampede suite --devices 20000 --transport tcp,mqtt --scenarios hold
  python -m bench.stampede suite --devices 20000 --transport mqtt,mqtt5 --scenarios hold,stampede
  python -m bench.stampede stampede --target tls://127.0.0.1:7879 --cafile ca.pem --devices 20000
  python -m bench.stampede suite --devices 20000 --transport tcp,tls --scenarios stampede
  python -m bench.stampede suite --devices 20000 --broker single,cluster --scenarios ramp,stampede
  python -m bench.stampede suite --devices 20000 --broker cluster --scenarios node-loss --command-rate 1000
  python -m bench.stampede suite --devices 20000 --scenarios worker-kill --command-rate 200 --jitter 0

Every run is bounded (device count, --duration, --ramp-timeout) and stops by
itself; its load processes exit with it, Ctrl-C included.
"""

from gevent import monkey

monkey.patch_all()

import argparse
import os
import secrets
import signal
import sys
from pathlib import Path

from bench.stampede.brokers import BROKERS, known_brokers
from bench.stampede.catalog import SCENARIOS
from bench.stampede.measure import measure, publish
from bench.stampede.suite import DEFAULT_SCENARIOS, TRANSPORTS, known_scenarios, known_transports, run_suite

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def first_of(variable: str, default: str) -> str:
    """The first item of a comma-separated environment variable (the minting secret, a token)."""
    return (os.environ.get(variable, "").split(",")[0].strip()) or default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.stampede", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=[*SCENARIOS, "suite"])
    where = parser.add_argument_group("where")
    where.add_argument("--target", action="append", default=[],
                       help="gateway device endpoint: tcp://host:7878 or ws://host:8000/ws (JSON devices), "
                            "tls://host:7879 or wss://host:8443/ws (the same inside TLS; see --cafile), "
                            "mqtt://host:1883 or mqtt+ws://host:8000/mqtt (MQTT 3.1.1 devices; mqtt5://, mqtt5+ws:// "
                            "for MQTT 5.0; keep alive = "
                            "--heartbeat, default 30 s) (repeat to split devices over several)")
    where.add_argument("--cafile", help="CA certificate (PEM) the devices trust on tls:// and wss:// targets "
                                        "(default: the system's; the suite makes its own)")
    where.add_argument("--insecure", action="store_true",
                       help="tls:// and wss://: verify neither the certificate nor the host name")
    where.add_argument("--floor", help="floor echo server, e.g. tcp://127.0.0.1:7979 (JSON devices only): "
                                        "measured first, every figure also reported as a ratio to it")
    where.add_argument("--gateway-dir", type=Path, default=Path("."),
                       help="checkout of the gateway measured: the suite starts it there (for before/after "
                            "comparisons); its git revision goes in the results (default: this one)")
    where.add_argument("--gateway-pid", type=int, help="gunicorn master (found from the port if local)")
    where.add_argument("--floor-pid", type=int, help="floor parent (found from the port if local)")
    where.add_argument("--amqp-url", default=os.environ.get("AMQP_URL") or DEFAULT_AMQP_URL)
    where.add_argument("--http-url", default="http://127.0.0.1:8000", help="gateway HTTP API")
    where.add_argument("--secret", default=first_of("DEVICE_SECRETS", "bench-secret"))
    where.add_argument("--api-token", default=first_of("API_TOKENS", ""))
    load = parser.add_argument_group("load")
    load.add_argument("--devices", type=int, default=1000)
    load.add_argument("--processes", type=int, help="load processes (default: one per 15,000 devices)")
    load.add_argument("--concurrency", type=int, default=500, help="in-flight connects per process")
    load.add_argument("--heartbeat", type=float, help="ping interval (default: the welcome's; "
                                                      "the suite also starts the gateway with it)")
    load.add_argument("--prefix", default=f"stampede{secrets.token_hex(2)}",
                      help="device ids are PREFIX-000000 ... (default: random per run, so that two "
                           "runs sharing a RabbitMQ never take over each other's devices)")
    load.add_argument("--commands-via", choices=["amqp", "http", "none"], default="amqp")
    load.add_argument("--command-rate", type=float, default=50.0, help="commands per second")
    load.add_argument("--command-timeout", type=float, default=5.0)
    load.add_argument("--event-rate", type=float, default=20.0, help="events per second (all devices)")
    timing = parser.add_argument_group("timing (seconds)")
    timing.add_argument("--duration", type=float, default=20.0,
                        help="hold: the commands window, then the events window; kill-load: commands; "
                             "worker-kill, mass-reconnect: commands after the kill or the cut")
    timing.add_argument("--jitter", type=float, default=10.0,
                        help="stampede: reconnects spread over this; worker-kill, mass-reconnect: the devices "
                             "cut off come back after their backoff plus up to this (0: at once)")
    timing.add_argument("--quiet", type=float, default=10.0,
                        help="hold: the idle window first (heartbeats only: CPU per heartbeat, and the "
                             "baseline the traffic windows are measured above); worker-kill, mass-reconnect, "
                             "node-loss: commands before the fault")
    timing.add_argument("--settle", type=float, default=3.0, help="pause after connecting before measuring")
    timing.add_argument("--ramp-timeout", type=float, default=120.0)
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, help="JSON results (default bench/results/SCENARIO.json; "
                                                  "suite: OUT's name is the prefix of every file it writes)")
    output.add_argument("--plot", type=Path, help="PNG plot (default: next to --out)")
    suite = parser.add_argument_group("suite (starts the floor and the gateway itself)")
    suite.add_argument("--workers", type=int, help="gateway and floor workers (default: enough for "
                                                    "--devices at 18,000 sessions each, at least 2)")
    suite.add_argument("--scenarios", type=known_scenarios, default=",".join(DEFAULT_SCENARIOS),
                       help=f"which scenarios, comma-separated (default: {','.join(DEFAULT_SCENARIOS)}; "
                            "worker-kill SIGKILLs the gateway worker holding the most devices; mass-reconnect "
                            "cuts every device's connection at once with commands flowing; "
                            "node-loss, which kills a RabbitMQ node, only runs with --broker cluster)")
    suite.add_argument("--transport", type=known_transports, default=["tcp"],
                       help=f"how the gateway's devices connect, one or a comma-separated list of "
                            f"{', '.join(TRANSPORTS)}: each runs on its own fresh gateway, compared "
                            "with the first (default: tcp)")
    suite.add_argument("--broker", type=known_brokers, default=["single"],
                       help=f"which RabbitMQ the gateway runs on, one or a comma-separated list of "
                            f"{', '.join(BROKERS)}: single is --amqp-url, cluster a two-node cluster the suite "
                            "boots beside it (bench/rabbit_cluster.py; root or the rabbitmq user), cluster3 one "
                            "of three, the gateway listing every node; each runs on its own fresh gateway "
                            "(default: single)")
    suite.add_argument("--floor-port", type=int, default=7979)
    suite.add_argument("--device-port", type=int, default=7878)
    suite.add_argument("--http-port", type=int, default=8000)
    suite.add_argument("--mqtt-port", type=int, help="the gateway's MQTT_PORT (default: a free port)")
    suite.add_argument("--device-tls-port", type=int, help="tls: the gateway's DEVICE_TLS_PORT (default: a free port)")
    suite.add_argument("--https-port", type=int, help="wss: the gateway's HTTPS_PORT (default: a free port)")
    parser.set_defaults(rabbit=None)  # the suite's Broker, for the run on it (node-loss loses one of its nodes)
    args = parser.parse_args(argv)
    if args.scenario != "suite":
        args.out = args.out or Path("bench/results") / f"{args.scenario}.json"
        args.plot = args.plot or args.out.with_suffix(".png")
    if args.scenario != "suite" and not (args.target or args.floor):
        parser.error("give --target and/or --floor")
    if args.floor and not args.floor.startswith(("tcp:", "ws:")):
        parser.error("--floor is an echo server: tcp://host:port or ws://host:port/path")
    return args


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args()
    if args.scenario == "suite":
        run_suite(args)
        return
    publish(measure(args), args)


if __name__ == "__main__":
    main()
