"""The gunicorn worker: gunicorn's gevent worker, serving device sessions on both listeners.

gunicorn pre-forks these workers and shares its listen sockets with them: the
sockets are the acceptor pool (as in Ranch). Each worker runs one supervision tree:

    worker (one_for_one)
    ├── broker (rest_for_one): publisher link, consumer link
    └── connections (simple_one_for_one): one temporary greenlet per accepted connection

A crash in a session ends that connection alone (temporary children are never
restarted). A crash loop in the broker branch exhausts the branch's budget and
escalates to the worker's root; when the root gives up the process exits with
status 70, and gunicorn's arbiter, the next supervisor up, starts a fresh worker.

Like Ranch's `max_connections`, a worker that holds `MAX_CONNECTIONS` sessions
answers new hellos with `overloaded`; with a little more than that open it stops
accepting, and the kernel's backlog (sized for a stampede) keeps the rest for
the workers that still have room.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any

import gevent
from gevent.server import StreamServer
from gunicorn.workers.ggevent import GeventWorker, PyWSGIHandler, PyWSGIServer

from app import config as config_module
from app import logs, metrics, reporting
from app.gateway import Gateway
from app.session import Session
from app.supervisor import ChildSpec, Supervisor
from app.transports.tcp import TcpConnection
from app.transports.ws import HandshakeError, WsConnection

log = logging.getLogger("warren.worker")

EXIT_GAVE_UP = 70
# Python's cyclic GC walks every tracked object of a generation, and held sessions are
# long-lived objects: at 20,000 sessions a worker paused 10-70 ms for the middle
# generation and 325 ms for the oldest, every few seconds, and found nothing (sessions
# make no reference cycles; reference counting frees them). So every second the
# objects that survived it are frozen out of the GC's walk (gc.freeze: O(1), and frozen
# objects are still freed by reference counting), and once an hour everything is
# collected, in case some rare cycle (an exception's traceback) was frozen.
GC_FULL_EVERY = 3600.0
ACCEPT_HEADROOM = 256  # connections beyond MAX_CONNECTIONS: HTTP clients, and devices told `overloaded`


class WebSocketHandler(PyWSGIHandler):
    """gunicorn's pywsgi handler, except that `GET /ws` upgrades become device sessions."""

    # A request's head (request line and headers) must arrive within HELLO_TIMEOUT, as a
    # device's hello must: otherwise a slow-loris on the HTTP port holds a connection (and a
    # place under the accept cap) forever. pywsgi closes on the request line's timeout and
    # answers 400 on the headers'. An idle keep-alive connection is closed after it too.
    def read_requestline(self) -> Any:
        limit = self.server.warren_worker.config.hello_timeout
        self._head_deadline = time.monotonic() + limit
        with gevent.Timeout(limit, TimeoutError("no request line in time")):
            return super().read_requestline()

    def read_request(self, requestline: Any) -> Any:
        remaining = max(0.001, getattr(self, "_head_deadline", 0) - time.monotonic())
        with gevent.Timeout(remaining, TimeoutError("no request head in time")):
            return super().read_request(requestline)

    def run_application(self) -> None:
        if self.environ.get("PATH_INFO") != "/ws" or "HTTP_UPGRADE" not in self.environ:
            super().run_application()
            return
        worker: WarrenWorker = self.server.warren_worker
        self.close_connection = True
        self.status = "101 Switching Protocols"
        try:
            worker.serve_websocket(self.socket, self.client_address, self.environ)
        except HandshakeError as exc:
            self.start_response("400 Bad Request", [("Content-Type", "text/plain")])
            self.write(f"{exc}\n".encode())


class WarrenWorker(GeventWorker):
    """Serves the device port and the HTTP port (with `/ws`) from one gevent hub."""

    def init_process(self) -> None:
        self.config = config_module.load()
        logs.configure(self.config)
        super().init_process()  # gevent's monkey patching, then run()

    def run(self) -> None:
        # After the fork and after monkey patching, so that sentry-sdk's transport
        # thread and sockets are gevent-cooperative and belong to this worker.
        reporting.init_sentry(self.config)
        self.gateway = Gateway(self.config)
        self.wsgi.gateway = self.gateway
        self.open_connections = 0
        self.accept_cap = self.config.max_connections + ACCEPT_HEADROOM
        self.servers: list[StreamServer] = []
        self.root = self._start_tree()
        self._start_servers()
        metrics.WORKERS.set(1)
        log.info("worker %s serving %s", self.pid,
                 ", ".join(f"{s.server_host}:{s.server_port}" for s in self.servers))
        next_full_collection = time.monotonic() + GC_FULL_EVERY
        while self.alive:
            self.notify()
            gc.freeze()
            if time.monotonic() >= next_full_collection:
                _full_collection()
                next_full_collection = time.monotonic() + GC_FULL_EVERY
            gevent.sleep(1.0)
        self._shut_down()

    # -- the supervision tree -----------------------------------------------------
    def _start_tree(self) -> Supervisor:
        broker = self.gateway.broker
        branch = ChildSpec("broker", lambda: Supervisor("broker", "rest_for_one", children=[
            ChildSpec("publisher", lambda: gevent.spawn(broker.publisher.run), shutdown=2.0),
            ChildSpec("consumer", lambda: gevent.spawn(broker.consumer.run), shutdown=2.0),
        ]).start(), type="supervisor", shutdown="infinity")
        connections = ChildSpec("connections", self._start_connections, type="supervisor",
                                shutdown="infinity")
        root = Supervisor(f"worker-{self.pid}", "one_for_one", children=[branch, connections]).start()
        root.rawlink(self._root_exited)
        return root

    def _root_exited(self, root: Supervisor) -> None:
        if root.exception is not None:
            log.critical("worker %s: its supervision tree gave up (%s); exiting", self.pid, root.exception)
            reporting.flush()
            os._exit(EXIT_GAVE_UP)

    def _start_connections(self) -> Supervisor:
        self.connections = Supervisor("connections", "simple_one_for_one", children=[
            ChildSpec("connection", gevent.spawn, restart="temporary", shutdown="brutal_kill"),
        ]).start()
        return self.connections

    # -- listeners ----------------------------------------------------------------
    def _start_servers(self) -> None:
        for sock in self.sockets:
            sock.setblocking(1)
            if sock.getsockname()[1] == self.config.device_port:
                server = StreamServer(sock, handle=self.serve_tcp, spawn=self._spawn_connection)
            else:
                server = PyWSGIServer(sock, application=self.wsgi, spawn=self._spawn_connection,
                                      log=self.log, handler_class=WebSocketHandler,
                                      environ={"SERVER_SOFTWARE": "warren"})
                server.warren_worker = self
            server.full = self._full
            server.max_accept = 64
            server.start()
            self.servers.append(server)

    def _spawn_connection(self, function: Any, *args: Any) -> gevent.Greenlet:
        child = self.connections.start_child(function, *args)
        self.open_connections += 1
        metrics.CONNECTIONS.inc()
        child.rawlink(self._connection_ended)
        return child

    def _full(self) -> bool:
        full = self.open_connections >= self.accept_cap
        if full:
            metrics.ACCEPT_PAUSED.set(1)
        return full

    def _connection_ended(self, _child: gevent.Greenlet) -> None:
        self.open_connections -= 1
        metrics.CONNECTIONS.dec()
        if self.open_connections == self.accept_cap - 1 and not self.gateway.shutting_down:
            metrics.ACCEPT_PAUSED.set(0)
            for server in self.servers:
                server.start_accepting()

    def serve_tcp(self, sock: Any, address: tuple) -> None:
        config = self.config
        connection = TcpConnection(sock, _peer(address), config.max_frame_bytes, config.send_buffer_bytes)
        Session(connection, self.gateway).run()

    def serve_websocket(self, sock: Any, address: Any, environ: dict[str, Any]) -> None:
        config = self.config
        connection = WsConnection(sock, _peer(address), environ, config.max_frame_bytes,
                                  config.send_buffer_bytes)
        Session(connection, self.gateway).run()

    # -- graceful shutdown ------------------------------------------------------------
    def _shut_down(self) -> None:
        """Stop accepting, send every session away with a jittered retry_after, drain, stop the tree."""
        for server in self.servers:
            server.close()
        window = max(1.0, self.cfg.graceful_timeout - 3.0)
        log.info("worker %s shutting down: draining %d sessions over %.0fs",
                 self.pid, len(self.gateway.sessions), window)
        self.gateway.drain(window)
        deadline = time.monotonic() + window
        while self.gateway.sessions and time.monotonic() < deadline:
            self.notify()
            gevent.sleep(0.2)
        if self.gateway.sessions:
            # Confirms RabbitMQ still withholds (an alarm, a partition) would outlast the grace
            # period: nack those events shutting_down, and end whatever session is left with a
            # word rather than a cut, before the tree stops and kills the rest.
            abandoned = self.gateway.broker.publisher.give_up("shutting_down")
            log.warning("worker %s: %d sessions still draining; %d confirms abandoned",
                        self.pid, len(self.gateway.sessions), abandoned)
            for session in list(self.gateway.sessions.values()):
                session.end("shutting_down", self.gateway.retry_after())
            grace = time.monotonic() + 1.0
            while self.gateway.sessions and time.monotonic() < grace:
                gevent.sleep(0.1)
        self.root.stop()
        metrics.WORKERS.set(0)
        reporting.flush()


def _full_collection() -> None:
    started = time.monotonic()
    gc.unfreeze()
    found = gc.collect()
    log.info("full garbage collection: %d objects in cycles, %.0f ms", found,
             (time.monotonic() - started) * 1000)


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
