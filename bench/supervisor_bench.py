"""What supervising a connection greenlet costs, next to bare gevent.spawn.

`python -m bench.supervisor_bench [--children 20000] [--churn 50000]` measures
each way of starting a temporary child:

- held: `--children` children, each waiting on one shared gevent Event: µs per
  start, RSS bytes per held child, then µs per removal once the event is set;
- churn: `--churn` children that return at once, started 64 at a time (as
  gevent's accept callback starts them) with a turn of the event loop between
  batches: µs per start and exit, as in a reconnect stampede.

Metrics are written as a worker writes them (prometheus_client's multiprocess
mode, in a temporary directory) unless `--metrics memory`. Each scenario runs
`--repeat` times, in turn with the others, each time in a fresh interpreter, so
memory freed by one cannot flatter another; the table shows the best of those
runs, since on a shared machine noise only ever adds. Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent import monkey
from gevent.event import Event

from bench.cli import script_parser
from bench.sampling import rss_bytes

SCENARIOS = {
    "connections": "ConnectionSupervisor.spawn",
    "dynamic": "simple_one_for_one start_child",
    "bare": "bare gevent.spawn (the floor)",
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 64  # what a worker's listener accepts per turn of the loop (server.max_accept)


class Starter:
    """One scenario: how to start a child, and how to know every child is gone."""

    def __init__(self, scenario: str) -> None:
        self._stop: Callable[[], None] = lambda: None
        if scenario == "connections":
            from app.supervision import ConnectionSupervisor

            conns = ConnectionSupervisor("bench", max_open=10**9).start()
            self.spawn, self._open, self._stop = conns.spawn, lambda: conns.open, conns.stop
        elif scenario == "dynamic":
            from app.supervision import ChildSpec, Supervisor

            sup = Supervisor("bench", "simple_one_for_one", [ChildSpec("child", gevent.spawn, restart="temporary")])
            sup.start()
            self.spawn, self._open, self._stop = sup.start_child, lambda: sup.count_children()["active"], sup.stop
        else:
            # Children run, wake and exit in the order they were started, so the last one
            # started is the last one gone: the floor needs no bookkeeping at all.
            self._last = gevent.spawn(lambda: None)
            self.spawn, self._open = self._spawn_bare, lambda: int(not self._last.dead)

    def _spawn_bare(self, function: Callable[..., object], *args: object) -> Any:
        self._last = gevent.spawn(function, *args)
        return self._last

    def wait_until_all_gone(self) -> None:
        while self._open():
            gevent.sleep(0.001)

    def stop(self) -> None:
        self._stop()


def measure_held(starter: Starter, children: int) -> dict[str, float]:
    done = Event()
    gevent.sleep(0)
    gc.collect()
    rss_before = rss_bytes()
    began = time.perf_counter()
    for _ in range(children):
        starter.spawn(done.wait)
    started = time.perf_counter()
    gevent.sleep(0)  # let every child run up to its wait, as a live session would be
    gc.collect()
    rss_after = rss_bytes()
    began_removal = time.perf_counter()
    done.set()
    starter.wait_until_all_gone()
    removed = time.perf_counter()
    return {
        "start_s": (started - began) / children,
        "removal_s": (removed - began_removal) / children,
        "bytes": (rss_after - rss_before) / children,
    }


def measure_churn(starter: Starter, children: int) -> dict[str, float]:
    def nothing() -> None:
        pass

    began = time.perf_counter()
    for batch in range(0, children, BATCH):
        for _ in range(min(BATCH, children - batch)):
            starter.spawn(nothing)
        gevent.sleep(0)
    starter.wait_until_all_gone()
    return {"churn_s": (time.perf_counter() - began) / children}


def measure(scenario: str, children: int, churn: int) -> dict[str, float]:
    """Run one scenario in this process (metrics already configured by the caller's environment)."""
    monkey.patch_all()  # as in a worker: prometheus_client's lock becomes gevent's
    starter = Starter(scenario)
    try:
        return {**measure_held(starter, children), **measure_churn(starter, churn)}
    finally:
        starter.stop()


def run_in_fresh_interpreter(scenario: str, options: argparse.Namespace) -> dict[str, float]:
    # Imported rather than run with -m, which made the floor itself look some 2 µs and 130 bytes dearer.
    command = [sys.executable, "-c", "from bench.supervisor_bench import main; main()", "--only", scenario,
               "--children", str(options.children), "--churn", str(options.churn)]
    with tempfile.TemporaryDirectory() as metrics_dir:
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if options.metrics == "multiprocess":
            env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=ROOT).stdout
    return json.loads(output)


def print_table(options: argparse.Namespace, results: dict[str, dict[str, float]]) -> None:
    print(f"held: {options.children:,} children waiting on one gevent Event; "
          f"churn: {options.churn:,} children that return at once, {BATCH} per turn of the loop; "
          f"metrics: {options.metrics}; best of {options.repeat} runs\n")
    print(f"{'':34} {'µs per start':>13} {'µs per removal':>15} {'RSS bytes per child':>20} "
          f"{'µs per start+exit (churn)':>26}")
    for scenario, label in SCENARIOS.items():
        row = results[scenario]
        print(f"{label:34} {row['start_s'] * 1e6:13.1f} {row['removal_s'] * 1e6:15.1f} {row['bytes']:20,.0f} "
              f"{row['churn_s'] * 1e6:26.1f}")


def main() -> None:
    parser = script_parser("python -m bench.supervisor_bench", __doc__)
    parser.add_argument("--children", type=int, default=20_000)
    parser.add_argument("--churn", type=int, default=50_000)
    parser.add_argument("--metrics", choices=("multiprocess", "memory"), default="multiprocess")
    parser.add_argument("--repeat", type=int, default=5, help="runs per scenario; the best is shown")
    parser.add_argument("--only", choices=SCENARIOS, help="run one scenario here and print it as JSON")
    options = parser.parse_args()
    if options.only:
        print(json.dumps(measure(options.only, options.children, options.churn)))
        return
    runs: dict[str, list[dict[str, float]]] = {scenario: [] for scenario in SCENARIOS}
    for _ in range(options.repeat):
        for scenario in SCENARIOS:
            runs[scenario].append(run_in_fresh_interpreter(scenario, options))
    best = {scenario: {key: min(run[key] for run in rows) for key in rows[0]} for scenario, rows in runs.items()}
    print_table(options, best)


if __name__ == "__main__":
    main()
