"""What a simple_one_for_one supervisor costs per temporary child, next to bare gevent.spawn.

`python -m bench.supervisor_bench [--children 20000]` starts that many
temporary children (each a greenlet waiting on one shared gevent Event), then
sets the event and measures until all are gone. Each scenario runs in a fresh
interpreter, so memory freed by one cannot flatter the other. Prints figures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time

SCENARIOS = {
    "supervised": "simple_one_for_one start_child",
    "bare": "bare gevent.spawn (the floor)",
}


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure(scenario: str, children: int) -> dict[str, float]:
    """Run one scenario in this process; return seconds per start and removal, and bytes per child."""
    import gevent
    from gevent.event import Event

    from app.supervisor import ChildSpec, Supervisor

    done = Event()
    sup = Supervisor("bench", "simple_one_for_one", [ChildSpec("child", gevent.spawn, (done.wait,), "temporary")])
    sup.start()
    gevent.sleep(0)
    gc.collect()
    rss_before = rss_bytes()

    began = time.perf_counter()
    if scenario == "supervised":
        for _ in range(children):
            sup.start_child()
    else:
        greenlets = [gevent.spawn(done.wait) for _ in range(children)]
    started = time.perf_counter()
    gevent.sleep(0)  # let every child run up to its wait, as a live session would be
    gc.collect()
    rss_after = rss_bytes()

    began_removal = time.perf_counter()
    done.set()
    if scenario == "supervised":
        while sup.count_children()["active"]:
            gevent.sleep(0.001)
    else:
        gevent.joinall(greenlets)
    removed = time.perf_counter()
    sup.stop()
    return {
        "start_s": (started - began) / children,
        "removal_s": (removed - began_removal) / children,
        "bytes": (rss_after - rss_before) / children,
    }


def run_in_fresh_interpreter(scenario: str, children: int) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.supervisor_bench", "--children", str(children), "--only", scenario]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output)


def print_table(children: int, results: dict[str, dict[str, float]]) -> None:
    print(f"{children:,} temporary children, each a greenlet waiting on one gevent Event\n")
    print(f"{'':34} {'µs per start':>13} {'µs per removal':>15} {'RSS bytes per child':>20}")
    for scenario, label in SCENARIOS.items():
        row = results[scenario]
        print(f"{label:34} {row['start_s'] * 1e6:13.1f} {row['removal_s'] * 1e6:15.1f} {row['bytes']:20,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=20_000)
    parser.add_argument("--only", choices=SCENARIOS, help="run one scenario here and print it as JSON")
    options = parser.parse_args()
    if options.only:
        print(json.dumps(measure(options.only, options.children)))
        return
    results = {scenario: run_in_fresh_interpreter(scenario, options.children) for scenario in SCENARIOS}
    print_table(options.children, results)


if __name__ == "__main__":
    main()
