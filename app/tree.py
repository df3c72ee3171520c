"""A worker's supervision tree and the parts it supervises, built after the fork.

    worker (one_for_one)
    ├── broker (rest_for_one): publisher link, consumer link     app/broker/
    ├── watchdog: hello and idle deadlines of every session       app/sessions/watchdog.py
    ├── metrics: per-command and per-event counts, written each second app/metrics.py
    ├── crl (with TLS_CRL_FILE): reloads the file when it changes app/tls/crl.py
    └── connections: one temporary greenlet per accepted connection (app/supervision/connections.py)

A crash in a session ends that connection alone (temporary children are never
restarted). A crash loop in the broker branch exhausts the branch's budget and
escalates to the worker's root; when the root gives up the process exits with
status 70, and gunicorn's arbiter, the next supervisor up, starts a fresh worker.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import gevent

from app import metrics, sentry
from app.broker import Broker
from app.config import Config
from app.handlers import DeviceHandlers
from app.listeners import build_servers
from app.sessions.registry import Registry
from app.supervision import ChildSpec, ConnectionSupervisor, Supervisor
from app.tls.contexts import TlsContexts, TlsSettings
from app.tls.crl import CrlWatcher
from app.tls.handshake import HandshakeGate

log = logging.getLogger("warren.tree")

EXIT_GAVE_UP = 70
ACCEPT_HEADROOM = 256  # connections beyond MAX_CONNECTIONS: HTTP clients, and devices told `overloaded`


class WorkerTree:
    """Everything one worker runs: the registry and its broker, the listeners, the supervisors."""

    def __init__(self, config: Config, sockets: list[Any], wsgi: Any, gunicorn_log: Any, age: int,
                 tls: tuple[TlsSettings, TlsContexts] | None = None, workers: int = 1) -> None:
        self.config = config
        # `age` numbers workers 1, 2, 3... (a replacement gets the next): it spreads them over the
        # nodes of a RabbitMQ cluster listed in AMQP_URL, and the routing partitions over the workers.
        self.broker = Broker(config.amqp_url, max_command_bytes=config.max_frame_bytes,
                             confirm_timeout=config.confirm_timeout, amqp_heartbeat=config.amqp_heartbeat,
                             node_offset=age, workers=workers, route_queues=config.route_queues,
                             bans_stream=config.bans_stream,
                             flapping=(config.flap_max, config.flap_window, config.flap_ban))
        # The registry calls the broker (its `Outbound`); the broker calls the registry (its `Inbound`),
        # attached once the registry is whole and before `start` runs the links.
        self.registry = Registry(config, self.broker)
        self.broker.attach(self.registry)
        wsgi.attach(self.broker)
        # One gate per worker paces the TLS handshakes; while too many wait, the TLS listeners stop
        # accepting and the rest of a stampede waits in the kernel's backlog for whichever worker has room.
        self.gate = HandshakeGate(on_room=self._resume_tls) if tls is not None else None
        self.crl = _crl_watcher(tls[0]) if tls is not None else None
        devices = DeviceHandlers(config, self.registry, self.broker, tls[1] if tls else None, self.gate, self.crl)
        # Each server's `spawn` is set by the connection supervisor that adopts it (`add_listener`).
        self.servers, self.tls_servers = build_servers(sockets, config, tls[0] if tls else None, devices, wsgi,
                                                       gunicorn_log)
        self.connections: ConnectionSupervisor | None = None
        self.root: Supervisor | None = None

    def start(self) -> None:
        self.root = self._start_root()
        metrics.WORKERS.set(1)
        log.info("worker %s serving %s", os.getpid(),
                 ", ".join(f"{s.server_host}:{s.server_port}" for s in self.servers))

    def _start_root(self) -> Supervisor:
        links = [ChildSpec(link.role, lambda link=link: gevent.spawn(link.run), shutdown=2.0)
                 for link in self.broker.links]
        children = [
            ChildSpec("broker", lambda: Supervisor("broker", "rest_for_one", children=links).start(),
                      type="supervisor", shutdown="infinity"),
            ChildSpec("watchdog", lambda: gevent.spawn(self.registry.watchdog.run), shutdown="brutal_kill"),
            ChildSpec("metrics", lambda: gevent.spawn(metrics.flush_forever), shutdown="brutal_kill"),
            *([ChildSpec("crl", lambda: gevent.spawn(self.crl.run), shutdown="brutal_kill")] if self.crl else []),
            ChildSpec("connections", self._start_connections, type="supervisor", shutdown="infinity"),
        ]
        root = Supervisor(f"worker-{os.getpid()}", "one_for_one", children=children).start()
        root.rawlink(_root_exited)
        return root

    def _start_connections(self) -> ConnectionSupervisor:
        """A fresh connection supervisor (also after a restart) that adopts every listener, then starts
        the listeners that are not yet: no connection is ever accepted outside a supervisor."""
        self.connections = ConnectionSupervisor("connections", self.config.max_connections + ACCEPT_HEADROOM).start()
        connections = self.connections
        for server in self.servers:
            connections.add_listener(server)
            if server in self.tls_servers:
                gate = self.gate
                # The supervisor's own hook (set by add_listener) first: it records the pause it must resume.
                server.full = lambda counted=server.full, gate=gate: counted() or gate.full()
            if not server.started:
                server.start()
        return connections

    def _resume_tls(self) -> None:
        """The handshake gate has room again: TLS listeners accept, unless the worker is full."""
        if self.connections is None or self.connections.full:
            return
        for server in self.tls_servers:
            if server.started:
                server.start_accepting()

    def shut_down(self, graceful_timeout: float, notify: Callable[[], None]) -> None:
        """Stop accepting, send every session away with a jittered retry_after, drain, stop the tree."""
        for server in self.servers:
            server.close()
        registry = self.registry
        window = max(1.0, graceful_timeout - 3.0)
        log.info("worker %s shutting down: draining %d sessions over %.0fs", os.getpid(), len(registry.sessions),
                 window)
        registry.drain(window)
        deadline = time.monotonic() + window
        while registry.sessions and time.monotonic() < deadline:
            notify()
            gevent.sleep(0.2)
        if registry.sessions:
            # Confirms RabbitMQ still withholds (an alarm, a partition) would outlast the grace
            # period: nack those events shutting_down, and end whatever session is left with a
            # word rather than a cut, before the tree stops and kills the rest.
            abandoned = self.broker.give_up("shutting_down")
            log.warning("worker %s: %d sessions still draining; %d confirms abandoned",
                        os.getpid(), len(registry.sessions), abandoned)
            registry.end_all("shutting_down")
            grace = time.monotonic() + 1.0
            while registry.sessions and time.monotonic() < grace:
                gevent.sleep(0.1)
        if self.root is not None:
            self.root.stop()
        metrics.flush()
        metrics.WORKERS.set(0)
        sentry.flush()


def _crl_watcher(settings: TlsSettings) -> CrlWatcher | None:
    """TLS_CRL_FILE's CRL as the master loaded it, then the file as it is now: a worker forked later (a
    replacement) must not serve with an older CRL than its file, even for the watcher's first interval."""
    if settings.crl is None or settings.crl_file is None:
        return None
    watcher = CrlWatcher(settings.crl_file, settings.crl)
    watcher.check()
    return watcher


def _root_exited(root: Supervisor) -> None:
    if root.exception is not None:
        log.critical("worker %s: its supervision tree gave up (%s); exiting", os.getpid(), root.exception)
        sentry.flush()
        os._exit(EXIT_GAVE_UP)
