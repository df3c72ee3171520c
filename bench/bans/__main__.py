"""`python -m bench.bans`: measure issue 20's targets for bans on gateways this tool starts (see __init__.py).

Full size (alone on the machine; about 15 minutes):
  python -m bench.bans --devices 20000 --bans 200 --in-force 10000 --rounds 2 --flap-seconds 90
Smoke (a shared machine):
  python -m bench.bans --devices 2000 --bans 50 --in-force 2000 --rounds 2 --flap-seconds 45 --quiet 5

Needs RabbitMQ on --amqp-url with the consistent-hash plugin, and `rabbitmqctl` on this machine
(it adds a vhost per deployment and deletes it at the end).
"""

from gevent import monkey

monkey.patch_all()

import argparse
import secrets
import signal
import sys
import time
from pathlib import Path

from bench.bans import parts
from bench.bans.deploy import Api, environment_note, logs_dir, say
from bench.bans.output import plot, summary, write_json
from bench.stampede.__main__ import DEFAULT_AMQP_URL, first_of
from bench.stampede.measure import machine, revision

PARTS = ("reach", "in-force", "flapping")
KEPT = ("t", "up", "rate", "established", "cpu_s", "rss_mb", "others_cpu_s")  # of each timeline entry, in the JSON


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bans", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated among {', '.join(PARTS)}")
    parser.add_argument("--devices", type=int, default=20000, help="devices held (reach: half on each instance)")
    parser.add_argument("--gateway-dir", type=Path, default=Path("."), help="checkout of the gateway measured")
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL, help="RabbitMQ (its default vhost is not used)")
    parser.add_argument("--workers", type=int, help="gateway workers per instance (default: 18,000 sessions "
                                                    "each, at least 2)")
    parser.add_argument("--processes", type=int, help="load processes (default: one per 15,000 devices)")
    parser.add_argument("--concurrency", type=int, default=500, help="in-flight connects per load process")
    parser.add_argument("--heartbeat", type=float, help="device ping interval (default: the welcome's)")
    parser.add_argument("--settle", type=float, default=3.0, help="pause after connecting (s)")
    parser.add_argument("--ramp-timeout", type=float, default=120.0)
    reach = parser.add_argument_group("1. reach")
    reach.add_argument("--bans", type=int, default=200, help="devices held on instance B banned through A")
    reach.add_argument("--ban-concurrency", type=int, default=4, help="PUTs in flight at once")
    reach.add_argument("--reach-timeout", type=float, default=15.0, help="wait for the last `banned` (s)")
    force = parser.add_argument_group("2. in force")
    force.add_argument("--in-force", type=int, default=10000, help="bans in force")
    force.add_argument("--api-concurrency", type=int, default=16, help="PUTs in flight while storing them")
    force.add_argument("--rounds", type=int, default=2, help="pairs of ramps (none, bans), order alternated")
    flap = parser.add_argument_group("3. flapping")
    flap.add_argument("--flap-share", type=float, default=0.01, help="share of the devices that flap")
    flap.add_argument("--flap-seconds", type=float, default=90.0, help="the flapping window")
    flap.add_argument("--quiet", type=float, default=10.0, help="idle window before it (the baseline)")
    flap.add_argument("--flap-order", default="off,on", help="off (FLAP_MAX=0) and on, in this order")
    flap.add_argument("--flap-max", type=int, default=30)
    flap.add_argument("--flap-window", type=float, default=60.0)
    flap.add_argument("--flap-ban", type=float, default=120.0)
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/bans-DEVICES.json; the PNG "
                                                 "goes next to it)")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if set(args.flap_order.split(",")) - {"off", "on"}:
        parser.error("--flap-order takes off and/or on")
    args.out = args.out or Path("bench/results") / f"bans-{args.devices}.json"
    # What bench.stampede's Plan, ramp and gateway_env read.
    args.prefix = f"bans{secrets.token_hex(2)}"
    args.secret = first_of("DEVICE_SECRETS", "bench-secret")
    args.api_token = first_of("API_TOKENS", "bench-token")
    args.logs = logs_dir()
    return args


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args()
    api = Api(args.api_token, size=max(args.api_concurrency, args.ban_concurrency) + 4)
    results = {"devices": args.devices, "command": " ".join(["python -m bench.bans", *sys.argv[1:]]),
               "machine": machine(), "machine_note": environment_note(), "revision": revision(args.gateway_dir),
               "gateway_dir": str(args.gateway_dir.resolve()), "flap_share": args.flap_share,
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "figures": {}, "timelines": {}}
    say(f"parts {args.parts}; {args.devices:,} devices; gateway logs in {args.logs}; {results['machine_note']}")
    for part in args.parts.split(","):
        say(f"--- {part} ---")
        found = {"reach": parts.reach, "in-force": parts.in_force, "flapping": parts.flapping}[part](args, api)
        results["figures"] |= found["figures"]
        results["timelines"] |= {label: [{key: entry.get(key) for key in KEPT} for entry in timeline]
                                 for label, timeline in found["timelines"].items()}  # bench/results stays small
        write_json(results, args.out)  # after every part: a later failure loses nothing measured
    plot_path = args.out.with_suffix(".png")
    plot(results, plot_path)
    print(summary(results))
    print(f"\nwrote {args.out} and {plot_path}")


if __name__ == "__main__":
    main()
