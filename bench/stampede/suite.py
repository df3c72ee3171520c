"""`python -m bench.stampede suite`: start the floor and the gateway, run every scenario against both.

The gateway is started as production starts it (`gunicorn -c gunicorn.conf.py
wsgi:app`) on RabbitMQ, with as many workers as the device count needs (a
worker holds at most MAX_CONNECTIONS=18000 sessions under the 20,000
open-file limit) and the floor gets the same worker count. `--gateway-dir`
starts it from another checkout (run with this checkout's virtualenv), so one
session can measure before and after a change. `--transport` says how the
gateway's devices connect: `tcp` (the device port), `ws` (`/ws`), `mqtt`
(MQTT_PORT, a free port unless --mqtt-port says), `mqtt-ws` (`/mqtt`),
`mqtt5`, `mqtt5-ws` (the same ports, MQTT 5.0 devices: PROTOCOL.md section 9), `tls`
(JSON lines on DEVICE_TLS_PORT) or `wss` (`/ws` on HTTPS_PORT); a
comma-separated list runs each scenario once per transport, each on a fresh
gateway, and compares every later one with the first (`mqtt/tcp`; `mqtt5/mqtt` for
`--transport mqtt,mqtt5`). For the
TLS transports the suite makes a throw-away CA and server certificate (trustme)
and starts that gateway with TLS_CERT_FILE/TLS_KEY_FILE and its TLS ports on free
ports; the devices trust that CA. The floor is always plain JSON lines (an echo
server has no MQTT and no TLS), so a TLS run's ratio to it includes the handshake. Each server runs alone: the
floor first, then each gateway, so none disturbs another's figures.
Results go to bench/results/PREFIX-SCENARIO.{json,png} and bench/results/PREFIX.md,
PREFIX being --out's name or suite-DEVICES[-TRANSPORTS].
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gevent
import trustme
import urllib3

from bench.cli import distinct_names
from bench.ports import free_port
from bench.stampede import report
from bench.stampede.brokers import Broker, brokers
from bench.stampede.measure import ServerRun, assemble, machine, measure_server, publish

SESSIONS_PER_WORKER = 18000
SCENARIO_ORDER = ("ramp", "hold", "stampede", "kill-load", "worker-kill", "mass-reconnect", "node-loss")
# worker-kill and node-loss kill part of the server, mass-reconnect cuts every device with commands flowing:
# asked for by name (node-loss needs --broker cluster).
DEFAULT_SCENARIOS = SCENARIO_ORDER[:4]
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


TRANSPORTS = ("tcp", "ws", "mqtt", "mqtt-ws", "mqtt5", "mqtt5-ws", "tls", "wss")
TLS_TRANSPORTS = ("tls", "wss")


known_transports = distinct_names("--transport", TRANSPORTS)


def ensure_unused(ports: dict[str, int]) -> None:
    """Stop unless every port a server is about to bind is free.

    Why: gunicorn binds with SO_REUSEPORT, so a gateway started on a port that
    another gateway (someone else's benchmark) already listens on does not fail:
    the two share it and the kernel spreads devices over both, spoiling both runs.
    A plain bind (SO_REUSEADDR only, so TIME_WAIT is no obstacle) fails on a port
    anyone listens on.
    """
    for option, port in ports.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                raise SystemExit(f"suite: port {port} ({option}) is in use: another gateway or benchmark "
                                 "listens there; wait for it, or pick other ports") from None


def wait_for_port(port: int, timeout: float, process: subprocess.Popen) -> None:
    """Wait until something accepts on `port` (the floor); fail early if the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout:.0f}s")


def gateway_ports(args: argparse.Namespace, transport: str | None = None) -> dict[str, int]:
    """The ports a gateway binds: the plain ones always, the TLS ones when it serves `transport` over TLS."""
    ports = {"--http-port": args.http_port, "--device-port": args.device_port, "--mqtt-port": args.mqtt_port}
    if transport in TLS_TRANSPORTS:
        ports |= {"DEVICE_TLS_PORT": args.device_tls_port, "HTTPS_PORT": args.https_port}
    return ports


def gateway_env(args: argparse.Namespace, workers: int, transport: str, amqp_url: str) -> dict[str, str]:
    """The gateway's environment; PYTHONPATH is its own checkout, so `app` never comes from this one.

    TLS listeners only for a TLS transport: the plain transports are measured on a gateway without them,
    as they are deployed. MQTT_TLS_PORT is disabled, so that its default port (8883) is never contended.
    """
    env = {**os.environ, "PORT": str(args.http_port), "DEVICE_PORT": str(args.device_port),
           "MQTT_PORT": str(args.mqtt_port), "WEB_CONCURRENCY": str(workers), "AMQP_URL": amqp_url,
           "DEVICE_SECRETS": args.secret, "API_TOKENS": args.api_token or "bench-token",
           "MAX_CONNECTIONS": str(SESSIONS_PER_WORKER), "PYTHONPATH": str(args.gateway_dir.resolve())}
    for variable in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE", "TLS_CRL_FILE"):
        env.pop(variable, None)
    if transport in TLS_TRANSPORTS:
        env |= {"TLS_CERT_FILE": args.tls_cert_file, "TLS_KEY_FILE": args.tls_key_file,
                "DEVICE_TLS_PORT": str(args.device_tls_port), "HTTPS_PORT": str(args.https_port),
                "MQTT_TLS_PORT": ""}
    if args.heartbeat:
        env["HEARTBEAT"] = f"{args.heartbeat:g}"
    return env


def make_certificates(args: argparse.Namespace, directory: Path) -> None:
    """A throw-away CA and a server certificate for 127.0.0.1 in `directory`; the devices trust that CA."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    args.cafile = str(directory / "ca.pem")
    args.tls_cert_file = str(directory / "server.pem")
    args.tls_key_file = str(directory / "server.key")
    ca.cert_pem.write_to_path(args.cafile)
    server.private_key_pem.write_to_path(args.tls_key_file)
    server.cert_chain_pems[0].write_to_path(args.tls_cert_file)
    for intermediate in server.cert_chain_pems[1:]:
        intermediate.write_to_path(args.tls_cert_file, append=True)


def device_url(args: argparse.Namespace, transport: str) -> str:
    """Where the gateway's devices connect over `transport`."""
    return {"tcp": f"tcp://127.0.0.1:{args.device_port}", "ws": f"ws://127.0.0.1:{args.http_port}/ws",
            "mqtt": f"mqtt://127.0.0.1:{args.mqtt_port}",
            "mqtt-ws": f"mqtt+ws://127.0.0.1:{args.http_port}/mqtt",
            "mqtt5": f"mqtt5://127.0.0.1:{args.mqtt_port}",
            "mqtt5-ws": f"mqtt5+ws://127.0.0.1:{args.http_port}/mqtt",
            "tls": f"tls://127.0.0.1:{args.device_tls_port}",
            "wss": f"wss://127.0.0.1:{args.https_port}/ws"}[transport]


def gateway_label(args: argparse.Namespace, transport: str, broker: str) -> str:
    """"gateway" when the suite measures one transport on one broker (as results always said), else what
    varies: the transport, the broker (`cluster`), or both (`mqtt-cluster`)."""
    varies = [*([transport] if len(args.transport) > 1 else []), *([broker] if len(args.broker) > 1 else [])]
    return "-".join(varies) or "gateway"


def prefix(args: argparse.Namespace) -> str:
    """The name every file of this suite starts with: --out's, or suite-DEVICES[-TRANSPORTS][-BROKERS]."""
    if args.out:
        return args.out.with_suffix("").name
    return (f"suite-{args.devices}" + ("" if args.transport == ["tcp"] else "-" + "-".join(args.transport))
            + ("" if args.broker == ["single"] else "-" + "-".join(args.broker)))


def run_suite(args: argparse.Namespace) -> None:
    """For each scenario: the floor, then a fresh gateway per transport; write the JSON, PNGs and Markdown."""
    workers = args.workers or max(2, math.ceil(args.devices / SESSIONS_PER_WORKER))
    args.api_token = args.api_token or "bench-token"
    args.http_url = f"http://127.0.0.1:{args.http_port}"
    args.mqtt_port = args.mqtt_port or free_port()
    args.device_tls_port = args.device_tls_port or free_port()
    args.https_port = args.https_port or free_port()
    floor_command = [sys.executable, "-m", "bench.floor", "--port", str(args.floor_port),
                     "--workers", str(workers)]
    logs = Path(tempfile.mkdtemp(prefix="stampede-suite-"))
    print(f"suite: {workers} workers each; gateway from {args.gateway_dir.resolve()} over "
          f"{', '.join(args.transport)}; server logs in {logs}", file=sys.stderr)
    if set(args.transport) & set(TLS_TRANSPORTS):
        make_certificates(args, logs)
        print(f"suite: TLS gateways serve a throw-away certificate (CA {args.cafile}) on DEVICE_TLS_PORT "
              f"{args.device_tls_port} and HTTPS_PORT {args.https_port}; the floor stays plain TCP",
              file=sys.stderr)
    sections = []
    with brokers(args.broker, args.amqp_url) as found:
        for scenario in args.scenarios.split(","):
            # Fresh servers for every run: memory freed by one must not hide the next one's cost.
            one = scenario_args(args, scenario)
            ensure_unused({"--floor-port": args.floor_port, **gateway_ports(args)})
            with started(floor_command, dict(os.environ), logs / f"floor-{scenario}.log") as floor:
                wait_for_port(args.floor_port, 30, floor)
                runs = {"floor": measure_server(one, "floor", [one.floor], floor.pid)}
            for broker in found.values():
                if scenario == "node-loss" and not broker.can_lose_node:
                    print(f"suite: node-loss skipped on the {broker.name} broker (one node: nothing to lose)",
                          file=sys.stderr)
                    continue
                for transport in args.transport:
                    gevent.sleep(args.settle)
                    log = logs / f"gateway-{scenario}-{transport}-{broker.name}.log"
                    runs[gateway_label(args, transport, broker.name)] = run_gateway(one, transport, broker,
                                                                                   workers, log)
            results = assemble(one, runs)
            publish(results, one)
            sections.append(markdown_section(results, one.plot))
    write_markdown(args, workers, sections)


def run_gateway(args: argparse.Namespace, transport: str, broker: Broker, workers: int, log: Path) -> ServerRun:
    """One scenario against a fresh gateway on `broker` whose devices connect over `transport`."""
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    ensure_unused(gateway_ports(args, transport))
    on_broker = copy.copy(args)
    on_broker.amqp_url, on_broker.rabbit = broker.backend_url, broker
    env = gateway_env(args, workers, transport, broker.gateway_url)
    with started(command, env, log, cwd=args.gateway_dir) as gateway:
        wait_for_http(f"{args.http_url}/readyz", 60, gateway)
        label = gateway_label(args, transport, broker.name)
        run = measure_server(on_broker, label, [device_url(args, transport)], gateway.pid)
        if gateway.poll() is not None:
            print(f"suite: the gateway exited during {args.scenario} over {transport} on the {broker.name} broker; "
                  f"see {log}", file=sys.stderr)
        return run


def known_scenarios(names: str) -> str:
    """argparse type for --scenarios: a comma-separated subset of SCENARIO_ORDER."""
    unknown = set(names.split(",")) - set(SCENARIO_ORDER)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return names


def scenario_args(args: argparse.Namespace, scenario: str) -> argparse.Namespace:
    """The suite's options, pointed at one scenario."""
    one = copy.copy(args)
    one.scenario = scenario
    one.floor = f"tcp://127.0.0.1:{args.floor_port}"
    one.out = (args.out.parent if args.out else RESULTS) / f"{prefix(args)}-{scenario}.json"
    one.plot = one.out.with_suffix(".png")
    return one


def markdown_section(results: dict, plot: Path) -> str:
    """One scenario's part of the page: its command, its plots (a fault's recovery plot too) and figures.
    The page is written beside the plots, so it links them by name."""
    scenario = results["scenario"]
    recovery = plot.with_name(f"{plot.stem}-recovery.png")
    recovery_link = f"\n\n![{scenario}: recovery]({recovery.name})" if recovery.exists() else ""
    return (f"### {scenario}\n\n`{results['command']}`\n\n![{scenario}]({plot.name}){recovery_link}"
            f"\n\n{report.markdown(results)}\n")


TLS_NOTE = (" TLS gateways serve a throw-away trustme certificate; the floor stays plain TCP, so their ratio "
            "to it includes the TLS handshake and record layer.")


def write_markdown(args: argparse.Namespace, workers: int, sections: list[str]) -> None:
    facts = machine()
    header = (f"## Suite: {args.devices:,} devices ({', '.join(args.transport)}; RabbitMQ: "
              f"{', '.join(args.broker)}), {workers} workers (each gateway and the floor)\n\n"
              f"Gateway from `{args.gateway_dir.resolve()}`."
              f"{TLS_NOTE if set(args.transport) & set(TLS_TRANSPORTS) else ''}\n\n"
              f"Machine: {facts['cores']} cores, {facts['memory_gib']} GiB, kernel {facts['kernel']}, "
              f"Python {facts['python']}, open-file limit {facts['open_files_limit']:,}.\n")
    path = (args.out.parent if args.out else RESULTS) / f"{prefix(args)}.md"
    path.write_text("\n".join([header, *sections]))
    print(f"wrote {path}", file=sys.stderr)
