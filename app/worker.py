"""The gunicorn worker: gunicorn's gevent worker, with Warren's supervision tree inside.

gunicorn pre-forks these workers and shares its listen sockets with them (the
acceptor pool, app/listeners.py). Each worker runs one supervision tree:

    worker (one_for_one)
    ├── broker (rest_for_one): publisher link, consumer link     app/broker/
    ├── watchdog: hello and idle deadlines of every session       app/sessions/watchdog.py
    └── connections: one temporary greenlet per accepted connection (app/connections.py)

A crash in a session ends that connection alone (temporary children are never
restarted). A crash loop in the broker branch exhausts the branch's budget and
escalates to the worker's root; when the root gives up the process exits with
status 70, and gunicorn's arbiter, the next supervisor up, starts a fresh worker.

This module is the glue: it builds the parts in order, reports in to the
arbiter every second, and drains on shutdown.
"""

from __future__ import annotations

import logging
import os
import time

import gevent
from gunicorn.workers.ggevent import GeventWorker

from app import config as config_module
from app import logs, metrics, reporting
from app.connections import ConnectionSupervisor
from app.gc_policy import GcPolicy
from app.listeners import DeviceHandlers, build_servers
from app.sessions.registry import Registry
from app.supervisor import ChildSpec, Supervisor

log = logging.getLogger("warren.worker")

EXIT_GAVE_UP = 70
ACCEPT_HEADROOM = 256  # connections beyond MAX_CONNECTIONS: HTTP clients, and devices told `overloaded`


class WarrenWorker(GeventWorker):
    """Serves every listener of the instance from one gevent hub."""

    def init_process(self) -> None:
        self.config = config_module.load()
        logs.configure(self.config)
        super().init_process()  # gevent's monkey patching, then run()

    def run(self) -> None:
        # After the fork and after monkey patching, so that sentry-sdk's transport
        # thread and sockets are gevent-cooperative and belong to this worker.
        reporting.init_sentry(self.config)
        # `age` numbers workers 1, 2, 3... (a replacement gets the next): it spreads them over the
        # nodes of a RabbitMQ cluster listed in AMQP_URL.
        self.registry = Registry(self.config, node_offset=self.age)
        self.broker = self.registry.broker
        self.wsgi.attach(self.broker)
        self.connections = ConnectionSupervisor("connections", self.config.max_connections + ACCEPT_HEADROOM)
        self.root = self._start_tree()
        devices = DeviceHandlers(self.config, self.registry, self.broker)
        self.servers = build_servers(self.sockets, self.config, devices, self.wsgi, self.connections.spawn, self.log)
        for server in self.servers:
            self.connections.add_listener(server)
            server.start()
        metrics.WORKERS.set(1)
        log.info("worker %s serving %s", self.pid,
                 ", ".join(f"{s.server_host}:{s.server_port}" for s in self.servers))
        gc_policy = GcPolicy()
        while self.alive:
            self.notify()
            gc_policy.tick()
            gevent.sleep(1.0)
        self._shut_down()

    def _start_tree(self) -> Supervisor:
        links = [ChildSpec(link.role, lambda link=link: gevent.spawn(link.run), shutdown=2.0)
                 for link in self.broker.links]
        children = [
            ChildSpec("broker", lambda: Supervisor("broker", "rest_for_one", children=links).start(),
                      type="supervisor", shutdown="infinity"),
            ChildSpec("watchdog", lambda: gevent.spawn(self.registry.watchdog.run), shutdown="brutal_kill"),
            ChildSpec("connections", self.connections.start, type="supervisor", shutdown="infinity"),
        ]
        root = Supervisor(f"worker-{self.pid}", "one_for_one", children=children).start()
        root.rawlink(self._root_exited)
        return root

    def _root_exited(self, root: Supervisor) -> None:
        if root.exception is not None:
            log.critical("worker %s: its supervision tree gave up (%s); exiting", self.pid, root.exception)
            reporting.flush()
            os._exit(EXIT_GAVE_UP)

    # -- graceful shutdown ------------------------------------------------------------
    def _shut_down(self) -> None:
        """Stop accepting, send every session away with a jittered retry_after, drain, stop the tree."""
        for server in self.servers:
            server.close()
        registry = self.registry
        window = max(1.0, self.cfg.graceful_timeout - 3.0)
        log.info("worker %s shutting down: draining %d sessions over %.0fs", self.pid, len(registry.sessions), window)
        registry.drain(window)
        deadline = time.monotonic() + window
        while registry.sessions and time.monotonic() < deadline:
            self.notify()
            gevent.sleep(0.2)
        if registry.sessions:
            # Confirms RabbitMQ still withholds (an alarm, a partition) would outlast the grace
            # period: nack those events shutting_down, and end whatever session is left with a
            # word rather than a cut, before the tree stops and kills the rest.
            abandoned = self.broker.give_up("shutting_down")
            log.warning("worker %s: %d sessions still draining; %d confirms abandoned",
                        self.pid, len(registry.sessions), abandoned)
            registry.end_all("shutting_down")
            grace = time.monotonic() + 1.0
            while registry.sessions and time.monotonic() < grace:
                gevent.sleep(0.1)
        self.root.stop()
        metrics.WORKERS.set(0)
        reporting.flush()
