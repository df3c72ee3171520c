"""The three measurements of issue 20, each on deployments of its own, driven by bench.stampede's controller.

Every part connects its fleet with bench.stampede's `ramp` (so the set-up figures are
the suite's own: gateway tree CPU during the ramp / sessions established), and marks
the moments it cares about with `Run.mark`, which samples the gateway tree's CPU and
RSS and the CPU everything else on the machine used meanwhile (`others_cpu_s`).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import tracemalloc
from typing import Any

import gevent

from app.sessions.bans import Ban, BanList, now_ms
from bench.bans.deploy import (
    Api,
    Instance,
    ban_all,
    instance,
    private_vhost,
    say,
    vhost_name,
    wait_for_bans,
    wait_until_quiet,
    workers_for,
)
from bench.stampede.controller import Plan, Run, processes_for
from bench.stampede.scenarios import busy_cores, delta, ramp

BAN_SECONDS = 3600.0  # the in-force bans outlast any run; the vhost (and its stream) is deleted at the end
REACH_TARGET_MS = 1000.0
SETUP_TARGET = 0.05  # CPU per set-up with bans in force within 5 % of none


def plan_for(args: argparse.Namespace, label: str, targets: list[str]) -> Plan:
    return Plan(label=label, targets=targets, devices=args.devices, floor=False, secret=args.secret,
                processes=args.processes or processes_for(args.devices), prefix=args.prefix,
                concurrency=args.concurrency, heartbeat=args.heartbeat)


def run_on(args: argparse.Namespace, plan: Plan, gateway: Instance) -> Run:
    """A run of the fleet against `gateway` (its tree gauged); no backend commands or events."""
    return Run(plan, gateway.pid, "none", args.amqp_url, gateway.http_url, args.api_token, 5.0)


def spread(values: list[float]) -> dict[str, float | int | None]:
    """min, p50, p90, p99 and max (nearest rank), in the values' unit."""
    if not values:
        return {"n": 0, "min": None, "p50": None, "p90": None, "p99": None, "max": None}
    ranked = sorted(values)

    def rank(q: float) -> float:
        return round(ranked[min(len(ranked) - 1, math.ceil(q * len(ranked)) - 1)], 1)

    return {"n": len(ranked), "min": round(ranked[0], 1), "p50": rank(0.5), "p90": rank(0.9),
            "p99": rank(0.99), "max": round(ranked[-1], 1)}


# -- 1. a ban's reach ------------------------------------------------------------------------------
def reach(args: argparse.Namespace, api: Api) -> dict[str, Any]:
    """Two instances of one deployment hold the fleet half each (even devices on A, odd on B);
    --bans devices held on B are banned through A's API, --ban-concurrency PUTs at a time.
    Reach = the wall-clock time the device read `banned` minus the time the 200 was read (also from
    the time the PUT was sent): both clocks are this machine's time.time(), in different processes."""
    workers = args.workers or workers_for(math.ceil(args.devices / 2))
    with private_vhost(args.amqp_url, vhost_name(args.prefix, "reach")) as url, \
            instance(args, "reach-A", url, workers) as a, instance(args, "reach-B", url, workers) as b:
        plan = plan_for(args, "reach", [a.device_url, b.device_url])  # device i goes to targets[i % 2]
        with run_on(args, plan, b) as run:
            figures: dict[str, Any] = {"ramp": ramp(run, args)}
            held_on_b = range(1, args.devices, 2)
            step = max(1, len(held_on_b) // max(1, args.bans))
            victims = [plan.device_name(index) for index in held_on_b[::step][:args.bans]]
            start = run.mark("bans_start")
            answered, statuses = ban_all(api, a.http_url, victims, args.ban_concurrency, None, "reach")
            deadline = time.monotonic() + args.reach_timeout
            while any(device not in run.fleet.banned_at for device in answered) and time.monotonic() < deadline:
                gevent.sleep(0.1)
            end = run.mark("bans_end")
            seen = run.fleet.banned_at
            reach_ms = [(seen[device] - at) * 1000 for device, (_, at) in answered.items() if device in seen]
            from_put_ms = [(seen[device] - sent) * 1000 for device, (sent, _) in answered.items() if device in seen]
            put_ms = [(at - sent) * 1000 for sent, at in answered.values()]
            figures["reach"] = {
                "instances": 2, "workers_per_instance": workers, "banned_through": "A", "held_on": "B",
                "bans": len(victims), "ban_concurrency": args.ban_concurrency, "api_statuses": statuses,
                "sessions_ended_banned": len(reach_ms),
                "never_reached": sorted(set(answered) - set(seen))[:20],
                "reach_ms": spread(reach_ms),
                # Negative: the device read `banned` before the API's 200 (which waits for RabbitMQ's confirm).
                "reach_from_put_sent_ms": spread(from_put_ms), "put_to_200_ms": spread(put_ms),
                "target_p99_ms": REACH_TARGET_MS,
                "meets_target": bool(reach_ms) and len(reach_ms) == len(answered)
                and spread(reach_ms)["p99"] <= REACH_TARGET_MS,
                "refused_banned_hellos": sum(delta(end["failures"], start["failures"]).get(k, 0)
                                             for k in ("error:banned",)),
                "other_cpu_cores": busy_cores(start, end, "others_cpu_s"),
                "samples_ms": [round(value, 1) for value in reach_ms],
            }
    return {"figures": figures, "timelines": {"reach": run.timeline}}


# -- 2. bans in force --------------------------------------------------------------------------------
def in_force(args: argparse.Namespace, api: Api) -> dict[str, Any]:
    """--in-force bans stored (through a writer instance, then stopped), then two fresh deployments side
    by side, one with the bans (replayed at start) and one with none: RSS idle, then ramps of the fleet
    (devices not banned) on each in turn, A B B A ..., every ramp on a quiet machine."""
    workers = args.workers or workers_for(args.devices)
    names = [f"{args.prefix}-banned-{index:06d}" for index in range(args.in_force)]
    with private_vhost(args.amqp_url, vhost_name(args.prefix, "none")) as none_url, \
            private_vhost(args.amqp_url, vhost_name(args.prefix, "bans")) as bans_url:
        with instance(args, "bans-writer", bans_url, workers) as writer:
            stored, statuses = ban_all(api, writer.http_url, names, args.api_concurrency, BAN_SECONDS, "in-force")
        with instance(args, "none", none_url, workers) as none, instance(args, "bans", bans_url, workers) as banned:
            loaded = wait_for_bans(api, banned.http_url, len(stored), timeout=120)
            say(f"in-force: {len(stored):,} bans {'read' if loaded else 'NOT all read'} by the bans deployment")
            wait_until_quiet([none, banned])
            rss = idle_rss([none, banned])
            rounds, timelines = [], {}
            order = [("none", none), ("bans", banned)]
            for round_number in range(args.rounds):
                for label, gateway in order if round_number % 2 == 0 else order[::-1]:
                    name = f"{label}-{round_number + 1}"
                    with run_on(args, plan_for(args, name, [gateway.device_url]), gateway) as run:
                        figures = ramp(run, args)
                    timelines[name] = run.timeline
                    rounds.append({"deployment": label, "round": round_number + 1,
                                   "cpu_us_per_setup": scaled(figures["cpu_ms_per_session"], 1000),
                                   "sessions_per_s": figures["sessions_per_s"], "all_up": figures["all_up"],
                                   "failures": figures["failures"],
                                   "rss_kib_per_session": figures["rss_kib_per_session"],
                                   "other_cpu_cores": figures["other_cpu_cores"]})
                    say(f"in-force: {name}: {rounds[-1]['cpu_us_per_setup']} µs CPU per set-up")
                    wait_until_quiet([none, banned])
    return {"figures": {"in_force": in_force_figures(args, len(stored), statuses, loaded, workers, rss, rounds)},
            "timelines": timelines}


def idle_rss(gateways: list[Instance], samples: int = 5) -> dict[str, float]:
    """Each idle gateway tree's RSS in MiB, the median of a few samples a second apart."""
    readings: dict[str, list[float]] = {gateway.name: [] for gateway in gateways}
    for _ in range(samples):
        for gateway in gateways:
            readings[gateway.name].append(gateway.gauge().get("rss_mb", 0.0))
        gevent.sleep(1.0)
    return {name: round(statistics.median(values), 2) for name, values in readings.items()}


def scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else round(value * scale, 1)


def in_force_figures(args: argparse.Namespace, bans: int, statuses: dict[int, int], loaded: bool, workers: int,
                     rss: dict[str, float], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    cpu = {label: [r["cpu_us_per_setup"] for r in rounds if r["deployment"] == label and r["cpu_us_per_setup"]]
           for label in ("none", "bans")}
    mean = {label: round(statistics.mean(values), 1) if values else None for label, values in cpu.items()}
    ratio = round(mean["bans"] / mean["none"], 3) if mean["bans"] and mean["none"] else None
    rss_delta = rss["bans"] - rss["none"]
    return {
        "bans_in_force": bans, "api_statuses": statuses, "all_read": loaded, "workers": workers,
        "devices": args.devices, "rounds": rounds,
        "cpu_us_per_setup": mean, "ratio_bans_to_none": ratio, "target_ratio_max": 1 + SETUP_TARGET,
        "meets_target": ratio is not None and ratio <= 1 + SETUP_TARGET,
        "memory": {
            "method": "RSS of the idle gateway tree (master and workers), fresh instances, bans replayed from "
                      "the stream at start, median of 5 samples: (with bans - without) / bans",
            "rss_mb": rss, "rss_delta_mb": round(rss_delta, 2),
            "bytes_per_ban": round(rss_delta * 2**20 / bans) if bans else None,
            "bytes_per_ban_per_worker": round(rss_delta * 2**20 / bans / workers) if bans else None,
            "tracemalloc_bytes_per_ban_one_banlist": banlist_bytes(min(bans, 10000) or 1, args.prefix),
        },
    }


def banlist_bytes(count: int, prefix: str) -> int:
    """tracemalloc's bytes per ban for one worker's BanList of `count` bans (the data structure only)."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    bans, now = BanList(), now_ms()
    for index in range(count):
        bans.apply(Ban(f"{prefix}-banned-{index:06d}", now + index, now + 3_600_000, "bench", "operator"))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return round(used / count)


# -- 3. flapping ------------------------------------------------------------------------------------
def flapping(args: argparse.Namespace, api: Api) -> dict[str, Any]:
    """For each of --flap-order (off: FLAP_MAX=0; on: --flap-max/--flap-window/--flap-ban), a fresh
    deployment holds the fleet; after an idle window, --flap-share of the devices reconnect every
    second for --flap-seconds (ignoring retry_after: a broken device's loop)."""
    workers = args.workers or workers_for(args.devices)
    figures, timelines = {}, {}
    for label in args.flap_order.split(","):
        extra = {"FLAP_MAX": "0"} if label == "off" else {
            "FLAP_MAX": str(args.flap_max), "FLAP_WINDOW": f"{args.flap_window:g}", "FLAP_BAN": f"{args.flap_ban:g}"}
        with private_vhost(args.amqp_url, vhost_name(args.prefix, f"flap-{label}")) as url, \
                instance(args, f"flapping-{label}", url, workers, extra) as gateway, \
                run_on(args, plan_for(args, f"flap-{label}", [gateway.device_url]), gateway) as run:
            figures[label] = flap_window(args, api, run, gateway, extra)
        timelines[f"flap-{label}"] = run.timeline
        gevent.sleep(args.settle)
    off, on = figures.get("off", {}).get("flapping"), figures.get("on", {}).get("flapping")
    comparison = None
    if off and on and off["cpu_cores"] and on["cpu_cores"]:
        comparison = {"cpu_cores_on_to_off": round(on["cpu_cores"] / off["cpu_cores"], 3),
                      "above_idle_on_to_off": round(on["cpu_cores_above_idle"] / off["cpu_cores_above_idle"], 3)
                      if off["cpu_cores_above_idle"] else None}
    return {"figures": {"flapping": {**figures, "comparison": comparison}}, "timelines": timelines}


def flap_window(args: argparse.Namespace, api: Api, run: Run, gateway: Instance,
                settings: dict[str, str]) -> dict[str, Any]:
    figures: dict[str, Any] = {"ramp": ramp(run, args)}
    idle_start = run.mark("idle_start")
    gevent.sleep(args.quiet)
    idle_end = run.mark("idle_end")
    count = max(1, round(args.devices * args.flap_share))
    flappers = list(range(0, args.devices, max(1, args.devices // count)))[:count]
    run.fleet.tell({"op": "flap", "indexes": flappers, "interval": 1.0})
    start = run.mark("flap_start")
    gevent.sleep(args.flap_seconds)
    end = run.mark("flap_end")
    issued = api.metric(gateway.http_url, "warren_bans_issued_total", 'by="flapping"') or 0
    idle = busy_cores(idle_start, idle_end, "cpu_s")
    cores = busy_cores(start, end, "cpu_s")
    failures = delta(end["failures"], start["failures"])
    figures["flapping"] = {
        "settings": settings, "workers": gateway.workers, "devices_held": args.devices,
        "flappers": len(flappers), "seconds": round(end["t"] - start["t"], 2),
        "idle_cpu_cores": idle, "cpu_cores": cores,
        "cpu_cores_above_idle": None if cores is None or idle is None else round(cores - idle, 4),
        "cpu_ms_per_flapper_second": None if cores is None or idle is None
        else round((cores - idle) * 1000 / len(flappers), 3),
        "sessions_started": end["established"] - start["established"],
        "hellos_refused_banned": failures.get("error:banned", 0),
        "failures": failures, "sessions_ended": delta(end["lost"], start["lost"]),
        "flapping_bans_issued": int(issued),
        "other_cpu_cores": busy_cores(start, end, "others_cpu_s"),
        "flap_start_t": start["t"],
    }
    return figures
