"""`python -m bench.stampede suite`: start the floor and the gateway, run every scenario against both.

The gateway is started as production starts it (`gunicorn -c gunicorn.conf.py
wsgi:app`) on RabbitMQ, with as many workers as the device count needs (a
worker holds at most MAX_CONNECTIONS=18000 sessions under the 20,000
open-file limit) and the floor gets the same worker count. `--gateway-dir`
starts it from another checkout (run with this checkout's virtualenv), so one
session can measure before and after a change; `--transport ws` connects the
gateway's devices over `/ws`. Results go to bench/results/PREFIX-SCENARIO.{json,png}
and bench/results/PREFIX.md, PREFIX being --out's name or suite-DEVICES[-ws].
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import urllib3

from bench.stampede import report
from bench.stampede.measure import machine, measure, publish

SESSIONS_PER_WORKER = 18000
SCENARIO_ORDER = ("ramp", "hold", "stampede", "kill-load")
RESULTS = Path("bench/results")


@contextmanager
def started(command: list[str], env: dict[str, str], log: Path,
            cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """A server process for the duration of the block, terminated (then killed) afterwards."""
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for_http(url: str, timeout: float, process: subprocess.Popen) -> None:
    """Wait for a 200 from `url` (the gateway's /readyz); fail early if the server died."""
    http = urllib3.PoolManager(retries=False, timeout=2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if http.request("GET", url).status == 200:
                return
        except urllib3.exceptions.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f}s")


def gateway_env(args: argparse.Namespace, workers: int) -> dict[str, str]:
    """The gateway's environment; PYTHONPATH is its own checkout, so `app` never comes from this one."""
    env = {**os.environ, "PORT": str(args.http_port), "DEVICE_PORT": str(args.device_port),
           "WEB_CONCURRENCY": str(workers), "AMQP_URL": args.amqp_url,
           "DEVICE_SECRETS": args.secret, "API_TOKENS": args.api_token or "bench-token",
           "MAX_CONNECTIONS": str(SESSIONS_PER_WORKER), "PYTHONPATH": str(args.gateway_dir.resolve())}
    if args.heartbeat:
        env["HEARTBEAT"] = f"{args.heartbeat:g}"
    return env


def prefix(args: argparse.Namespace) -> str:
    """The name every file of this suite starts with: --out's, or suite-DEVICES[-ws]."""
    if args.out:
        return args.out.with_suffix("").name
    return f"suite-{args.devices}" + ("-ws" if args.transport == "ws" else "")


def run_suite(args: argparse.Namespace) -> None:
    """Start both servers, run each scenario against both, write the JSON, PNGs and Markdown."""
    workers = args.workers or max(2, math.ceil(args.devices / SESSIONS_PER_WORKER))
    args.api_token = args.api_token or "bench-token"
    args.http_url = f"http://127.0.0.1:{args.http_port}"
    floor_command = [sys.executable, "-m", "bench.floor", "--port", str(args.floor_port),
                     "--workers", str(workers)]
    gateway_command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    logs = Path(tempfile.mkdtemp(prefix="stampede-suite-"))
    print(f"suite: {workers} workers each; gateway from {args.gateway_dir.resolve()}; server logs in {logs}",
          file=sys.stderr)
    sections = []
    for scenario in args.scenarios.split(","):
        # Fresh servers for every scenario: memory freed by one run must not hide the next one's cost.
        with started(floor_command, dict(os.environ), logs / f"floor-{scenario}.log") as floor, \
                started(gateway_command, gateway_env(args, workers),
                        logs / f"gateway-{scenario}.log", cwd=args.gateway_dir) as gateway:
            wait_for_http(f"{args.http_url}/readyz", 60, gateway)
            one = scenario_args(args, scenario, floor.pid, gateway.pid)
            results = measure(one)
            publish(results, one)
            sections.append(markdown_section(results, one.plot))
            if gateway.poll() is not None:
                print(f"suite: the gateway exited during {scenario}; see {logs}", file=sys.stderr)
    write_markdown(args, workers, sections)


def known_scenarios(names: str) -> str:
    """argparse type for --scenarios: a comma-separated subset of SCENARIO_ORDER."""
    unknown = set(names.split(",")) - set(SCENARIO_ORDER)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return names


def scenario_args(args: argparse.Namespace, scenario: str, floor_pid: int,
                  gateway_pid: int) -> argparse.Namespace:
    """The suite's options, pointed at one scenario and at the two servers it started."""
    one = copy.copy(args)
    one.scenario = scenario
    one.floor = f"tcp://127.0.0.1:{args.floor_port}"
    one.target = [f"tcp://127.0.0.1:{args.device_port}" if args.transport == "tcp"
                  else f"ws://127.0.0.1:{args.http_port}/ws"]
    one.floor_pid, one.gateway_pid = floor_pid, gateway_pid
    one.out = (args.out.parent if args.out else RESULTS) / f"{prefix(args)}-{scenario}.json"
    one.plot = one.out.with_suffix(".png")
    return one


def markdown_section(results: dict, plot: Path) -> str:
    scenario = results["scenario"]
    return (f"### {scenario}\n\n`{results['command']}`\n\n![{scenario}]({plot})"
            f"\n\n{report.markdown(results)}\n")


def write_markdown(args: argparse.Namespace, workers: int, sections: list[str]) -> None:
    facts = machine()
    header = (f"## Suite: {args.devices:,} devices ({args.transport}), {workers} workers (gateway and floor)\n\n"
              f"Gateway from `{args.gateway_dir.resolve()}`.\n\n"
              f"Machine: {facts['cores']} cores, {facts['memory_gib']} GiB, kernel {facts['kernel']}, "
              f"Python {facts['python']}, open-file limit {facts['open_files_limit']:,}.\n")
    path = (args.out.parent if args.out else RESULTS) / f"{prefix(args)}.md"
    path.write_text("\n".join([header, *sections]))
    print(f"wrote {path}", file=sys.stderr)
