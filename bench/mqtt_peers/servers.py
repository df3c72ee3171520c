"""The three servers, each started for its turn and stopped after it, on free loopback ports.

  warren     `gunicorn -c gunicorn.conf.py wsgi:app` as bench.stampede's suite starts it (its environment,
             `--workers` workers), on the machine's RabbitMQ (--amqp-url): that broker's beam is gauged
             apart, since every event and command of Warren's goes through it
  rabbitmq   one RabbitMQ node of its own (bench/rabbit_cluster.py: own name, ports, data directory, run
             as the `rabbitmq` user, killed and deleted at the end) with only rabbitmq_mqtt enabled and
             its MQTT listener on a free port
  mosquitto  `mosquitto -c CONF` on a free port: no persistence, anonymous clients, no connection limit

None touches the machine's broker at 5672 beyond Warren's own use of it, nor the Mosquitto on 1883.
Each server keeps its shipped logging (Warren and RabbitMQ log every connection at INFO, Mosquitto
every connect by default), written to a file under the run's log directory.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from bench.cli import distinct_names
from bench.ports import free_port
from bench.rabbit_cluster import RabbitCluster
from bench.stampede.gauges import pid_listening_on
from bench.stampede.measure import revision
from bench.stampede.suite import ensure_unused, gateway_env, started, wait_for_http, wait_for_port

SERVERS = ("warren", "rabbitmq", "mosquitto")
LABELS = {"warren": "Warren", "rabbitmq": "RabbitMQ MQTT", "mosquitto": "Mosquitto"}
BOOT_TIMEOUT = 60.0


@dataclass
class Server:
    """One server while it runs: where devices connect, which processes are it, what it is."""

    key: str  # one of SERVERS
    url: str  # mqtt://127.0.0.1:PORT
    pid: int  # the top of the process tree measured as the server
    version: str
    log: Path
    broker_pid: int | None = None  # Warren's RabbitMQ, measured apart

    @property
    def label(self) -> str:
        return LABELS[self.key]

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname, parts.port


known_servers = distinct_names("--servers", SERVERS)  # run in the order given


@contextmanager
def running(key: str, args: argparse.Namespace, logs: Path) -> Iterator[Server]:
    """Server `key` for the block, stopped (and its files removed) however the block ends."""
    start = {"warren": warren, "rabbitmq": rabbitmq_mqtt, "mosquitto": mosquitto}[key]
    with start(args, logs) as server:
        yield server


@contextmanager
def warren(args: argparse.Namespace, logs: Path) -> Iterator[Server]:
    """A fresh Warren on free ports, started from --gateway-dir as the stampede suite starts it."""
    one = copy.copy(args)
    one.http_port, one.device_port, one.mqtt_port = free_port(), free_port(), free_port()
    one.api_token = "bench-token"
    ensure_unused({"PORT": one.http_port, "DEVICE_PORT": one.device_port, "MQTT_PORT": one.mqtt_port})
    env = gateway_env(one, args.workers, "mqtt", args.amqp_url)
    log = logs / "warren.log"
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    with started(command, env, log, cwd=args.gateway_dir) as gateway:
        wait_for_http(f"http://127.0.0.1:{one.http_port}/readyz", BOOT_TIMEOUT, gateway)
        broker = urlsplit(args.amqp_url.split(";")[0])
        port = broker.port or 5672
        yield Server("warren", f"mqtt://127.0.0.1:{one.mqtt_port}", gateway.pid,
                     f"revision {revision(args.gateway_dir) or '?'}, {args.workers} workers, on the RabbitMQ at "
                     f"{broker.hostname}:{port}{'' if unquote(broker.path[1:]) in ('', '/') else broker.path}, "
                     f"{env.get('ROUTE_QUEUES') or 'quorum'} routing partitions", log, broker_pid=pid_listening_on(port))


def mqtt_plugin_config(port: int) -> str:
    """rabbitmq.conf lines for the MQTT plugin: a loopback listener on `port` (not the default 1883, which
    the machine's Mosquitto holds), no TLS listener, anonymous clients as guest on `/` via amq.topic."""
    return (f"mqtt.listeners.tcp.1 = 127.0.0.1:{port}\n"
            "mqtt.listeners.ssl = none\n"
            "mqtt.allow_anonymous = true\n"
            "mqtt.default_user = guest\n"
            "mqtt.default_pass = guest\n"
            "mqtt.vhost = /\n"
            "mqtt.exchange = amq.topic\n")


@contextmanager
def rabbitmq_mqtt(args: argparse.Namespace, logs: Path) -> Iterator[Server]:
    """A RabbitMQ node of its own with the MQTT plugin; killed, its data deleted, at the end (log kept)."""
    port = free_port()
    node_set = RabbitCluster(1, plugins=("rabbitmq_mqtt",), config=mqtt_plugin_config(port))
    node = node_set.nodes[0]
    log = logs / "rabbitmq.log"
    try:
        node_set.start()
        wait_for_port(port, BOOT_TIMEOUT, node.process)
        version = node_set.ctl(node, "version").strip()
        yield Server("rabbitmq", f"mqtt://127.0.0.1:{port}", node.process.pid,
                     f"RabbitMQ {version} ({node.name})", log)
    finally:
        if node.running:
            node_set.kill_node(node)  # first, so that its log is whole when kept
        if node.log_path.exists():
            log.write_bytes(node.log_path.read_bytes())
        node_set.close()


def mosquitto_config(port: int) -> str:
    """A private Mosquitto: loopback only, nothing kept on disk, anyone may connect, as many as the open-file
    limit allows; queued messages per client are not capped at the default 1,000 (the backend's subscription
    takes every event), so that no event is dropped for a queue limit the other servers do not have. Nagle
    off, as RabbitMQ's MQTT listener has it by default: with it on (Mosquitto's default) every reply it
    forwards to the backend waited for the backend's delayed ACK, ~10 ms a command round trip."""
    return (f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_connections -1\n"
            "max_queued_messages 0\n"
            "set_tcp_nodelay true\n"
            "log_dest stderr\n")


@contextmanager
def mosquitto(args: argparse.Namespace, logs: Path) -> Iterator[Server]:
    """A private Mosquitto (mosquitto_config) for the block, terminated at its end."""
    program = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/local/sbin")
    if program is None:
        raise SystemExit("mqtt_peers: mosquitto is not installed (apt-get install mosquitto), or leave it out "
                         "with --servers warren,rabbitmq")
    port = free_port()
    conf = logs / "mosquitto.conf"
    conf.write_text(mosquitto_config(port))
    conf.chmod(0o644)  # run as root, mosquitto drops to its own user, after reading this
    log = logs / "mosquitto.log"
    with started([program, "-c", str(conf)], dict(os.environ), log) as broker:
        wait_for_port(port, BOOT_TIMEOUT, broker)
        yield Server("mosquitto", f"mqtt://127.0.0.1:{port}", broker.pid, mosquitto_version(program), log)


def mosquitto_version(program: str) -> str:
    """The first line of `mosquitto -h`: "mosquitto version 2.0.11"."""
    try:
        out = subprocess.run([program, "-h"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out.splitlines()[0].strip() if out else "mosquitto (version unknown)"
