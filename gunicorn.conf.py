"""gunicorn settings for Warren: every value comes from the environment (app/config.py).

`gunicorn -c gunicorn.conf.py wsgi:app` (the Procfile's `web` line) binds the
HTTP port (`PORT`, with `/ws` and `/mqtt` for devices), the raw TCP device port
(`DEVICE_PORT`) and the MQTT port (`MQTT_PORT`), and pre-forks `WEB_CONCURRENCY`
Warren workers that all accept on all of them: the listen sockets are the
acceptor pool.
"""

import os
import shutil
import socket
import sys
import tempfile

import app.standby  # noqa: F401 - its board is made here, in the master, so every forked worker shares it
from app.config import ConfigError, load
from app.tls.contexts import build_contexts, check_gunicorn_ssl, load_tls
from app.tls.crl import stale_lines

try:
    _config = load()
    _tls = load_tls(os.environ, plain_ports={"PORT": _config.port, "DEVICE_PORT": _config.device_port,
                                             "MQTT_PORT": _config.mqtt_port})
except ConfigError as _error:
    sys.exit(f"warren: bad configuration: {_error}")



def _taken(host: str, port: int) -> bool:
    """Whether another socket holds the port, asked as gunicorn will bind it: with SO_REUSEADDR, so that
    connections of the port still in TIME_WAIT do not count."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


# Ports are probed once per master, at its first reading of this file: a SIGHUP re-reads it while
# the master holds its own listeners, which would look taken. A default device port that another
# program already holds (Mosquitto on 1883 is common) is skipped, and start-up says so loudly; a
# port the operator set that is taken stops start-up, naming its variable.
_device_ports = {"DEVICE_PORT": _config.device_port, "MQTT_PORT": _config.mqtt_port, **(_tls.ports if _tls else {})}
_device_ports = {name: port for name, port in _device_ports.items() if port is not None}
if "WARREN_SKIPPED_PORTS" not in os.environ:
    _skipped_names = []
    for _variable, _port in _device_ports.items():
        if not _taken(_config.bind_host, _port):
            continue
        if _variable in os.environ:
            sys.exit(f"warren: bad configuration: {_variable}={_port}: the port is taken by another program "
                     f"on {_config.bind_host}; choose a free one, or set {_variable} to the empty string")
        _skipped_names.append(_variable)
    os.environ["WARREN_SKIPPED_PORTS"] = ",".join(_skipped_names)
_skipped = [(name, _device_ports[name]) for name in os.environ["WARREN_SKIPPED_PORTS"].split(",")
            if name in _device_ports]
bind = [f"{_config.bind_host}:{_config.port}"]
bind += [f"{_config.bind_host}:{port}" for name, port in _device_ports.items() if (name, port) not in _skipped]

worker_class = "app.worker.WarrenWorker"
workers = 1 if _config.in_process_broker else _config.web_concurrency
# The kernel caps this at net.core.somaxconn; a stampede needs the room.
backlog = 65535
# Heroku-style platforms send SIGKILL 30 s after SIGTERM: drain well before that.
graceful_timeout = int(_config.graceful_timeout)
# Workers report in every second from their hub; 30 s of silence means a blocked hub, not a busy one.
timeout = 30
# A long-lived device connection is not a request to recycle.
max_requests = 0
keepalive = 75
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
accesslog = None
proc_name = "warren"

# prometheus_client picks its multiprocess mode when first imported, which
# happens in this master when gunicorn loads the worker class: set it first.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR",
                      os.path.join(tempfile.gettempdir(), f"warren-metrics-{os.getpid()}"))
shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)


def on_starting(server):
    """Refuse gunicorn's own TLS settings, build the TLS contexts before any fork, say loudly what is missing."""
    try:
        check_gunicorn_ssl(server.cfg)
    except ConfigError as error:
        sys.exit(f"warren: bad configuration: {error}")
    if _tls is not None:
        server.worker_class.tls = (_tls, build_contexts(_tls))
        server.log.info(f"TLS on {', '.join(f'{name}={port}' for name, port in _tls.ports.items())}"
                        f"{' with client certificates (mutual TLS)' if _tls.client_ca_file else ''}; "
                        f"certificate valid until {_tls.cert_not_after:%Y-%m-%d}")
        if _tls.crl is not None:
            server.log.info(f"TLS_CRL_FILE={_tls.crl_file}: {len(_tls.crl.revocations.revoked)} revoked device "
                            f"certificates in {len(_tls.crl.revocations.crls)} CRLs, reloaded by every worker "
                            f"when the file changes")
            for line in stale_lines(_tls.crl.revocations):
                server.log.error(line)
    if _config.in_process_broker:
        server.log.warning(
            "WARNING: no AMQP_URL, CLOUDAMQP_URL or RABBITMQ_URL is set: running ONE worker on "
            "kombu's in-process broker. Events go nowhere durable, bans are kept in memory only "
            "(lost when it stops), and other processes cannot send commands. Set AMQP_URL=amqp://guest:guest@127.0.0.1:5672// for RabbitMQ.")
    if not _config.device_secrets:
        server.log.warning("WARNING: DEVICE_SECRETS is not set: every device hello will be refused.")
    if _config.flap_max:
        server.log.info(f"flapping detection: more than {_config.flap_max} sessions of a device within "
                        f"{_config.flap_window:g}s bans it for {_config.flap_ban:g}s (FLAP_MAX=0 turns it off)")
    if not _config.api_tokens:
        server.log.warning("WARNING: API_TOKENS is not set: the command API answers 401 to everyone.")
    if not _config.ops_tokens:
        server.log.warning("WARNING: OPS_TOKENS is not set: /metrics, / and /status.json are OPEN to anyone who "
                           "can reach the HTTP port (how many devices there are, and where). Set OPS_TOKENS.")
    for variable, port in _skipped:
        server.log.warning(f"WARNING: {variable} is not set and its default port {port} is taken by another "
                           f"program: that listener is OFF. Set {variable} to a free port, or to the empty "
                           f"string to turn it off without this warning.")


def on_reload(server):
    """SIGHUP re-reads this file: new workers get contexts of the certificate as it is now (a renewal),
    and with them new ticket keys (devices pay one full handshake)."""
    server.worker_class.tls = (_tls, build_contexts(_tls)) if _tls is not None else None


def child_exit(server, worker):
    """A dead worker's gauges must stop counting (prometheus_client multiprocess mode)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    shutil.rmtree(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""), ignore_errors=True)
