"""The worker's connection supervisor, in the manner of Ranch's conns_sup.

Every connection a worker accepts runs in a greenlet that a ConnectionSupervisor
owns. Connections are temporary children: never restarted, and their ends
never charged to any restart budget, so a thousand devices dropping at once
is a thousand set removals and nothing more. A connection that crashes (any
exception but GreenletExit) is logged and reported through the supervisors'
Reporter, and that is all: the device reconnects, which is its restart.

gevent's StreamServer calls `spawn` from its accept callback, in the hub, where
nothing may block or switch. So, unlike a generic Supervisor (whose work all
happens in its own greenlet), `spawn` starts the child right in the caller and
its exit callback drops it, both in O(1); only crash reports, which may do
I/O, and stopping go through the supervisor's own greenlet.

Like Ranch's max_connections it counts what it holds and caps it: once `open`
reaches `max_open` its listeners stop accepting (each as it finds it full,
through gevent's `full` hook), so the kernel's backlog keeps further
connections for the workers that still have room, and they accept again as
soon as one ends. The listen sockets themselves are the acceptor
pool, shared by every worker (gunicorn forks them in).

It is a child supervisor (app.supervision.childspec.ChildSupervisor): give it to a
Supervisor as `ChildSpec(id, start, type="supervisor", shutdown="infinity")`,
where `start` creates it, starts it and adds the listeners. Stopping it ends
all of its connections (killed, after an optional grace) and pauses its
listeners until another ConnectionSupervisor adds them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import gevent
from gevent.baseserver import BaseServer

from app.metrics import ACCEPT_PAUSED, CONNECTIONS
from app.supervision.actor import Actor
from app.supervision.childspec import is_valid_shutdown, require
from app.supervision.reports import report_crash
from app.supervision.shutdown import ShutdownKill, shut_down

log = logging.getLogger("warren.supervisor")

CHILD_NAME = "connection"  # how crash reports name a connection (Sentry's `child` tag)


class ConnectionSupervisor(Actor):
    """Owns, counts and caps the connection greenlets of one worker.

    `max_open` is the cap; `shutdown` is the grace each connection gets when
    the supervisor stops (seconds, or "brutal_kill": one turn of the loop).
    """

    def __init__(self, name: str, max_open: int, *, shutdown: float | str = "brutal_kill") -> None:
        require(isinstance(max_open, int) and max_open > 0, "max_open", "an int > 0", max_open)
        require(is_valid_shutdown(shutdown) and shutdown != "infinity", "shutdown",
                "'brutal_kill' or a number of seconds >= 0", shutdown)
        super().__init__(name)
        self.max_open = max_open
        self._shutdown = shutdown
        self._children: set[gevent.Greenlet] = set()
        self._listeners: list[BaseServer] = []
        self._taking = False  # True from start() until it begins to stop: spawn accepts children
        self._paused = False  # a listener stopped accepting because it was full, and awaits room
        self._child_exited = self._on_child_exit  # one bound method shared by every child's rawlink

    def start(self) -> ConnectionSupervisor:
        self._start_greenlet()
        self._taking = True
        return self

    @property
    def open(self) -> int:
        """Connections now running."""
        return len(self._children)

    @property
    def full(self) -> bool:
        """No room for another connection: `max_open` are open, or it is not running."""
        return not self._taking or len(self._children) >= self.max_open

    def add_listener(self, server: BaseServer) -> None:
        """Start the server's connections here, and have it stop accepting while full.

        Sets the server's spawn (so `spawn=` at construction is optional) and
        its `full` hook, which gevent consults before each accept, as it would
        a Pool's: a yes stops that server accepting, even mid-batch or on an
        accept retried after an error, until an ending connection makes room.
        A started server accepts again here: it may come from a supervisor
        that stopped.
        """
        server.set_spawn(self.spawn)
        server.full = self._full
        self._listeners.append(server)
        if server.started:
            server.start_accepting()

    def spawn(self, function: Callable[..., object], *args: object) -> gevent.Greenlet:
        """Start function(*args) in a new supervised greenlet: O(1), never switches, callable in the hub."""
        if not self._taking:
            raise RuntimeError(f"{self} is not running")
        child = gevent.spawn(function, *args)
        child.rawlink(self._child_exited)
        self._children.add(child)
        CONNECTIONS.inc()
        return child

    def request_stop(self) -> None:
        """Take no more connections, and ask the greenlet to end those it has."""
        self._stop_taking()
        super().request_stop()

    # ----- in the hub -----------------------------------------------------------

    def _full(self) -> bool:
        """gevent's question before each accept; yes stops that listener, and we owe it a resume."""
        if not self.full:
            return False
        if self._taking and not self._paused:
            self._paused = True
            ACCEPT_PAUSED.set(1)
        return True

    def _on_child_exit(self, child: gevent.Greenlet) -> None:
        """Runs in the hub, where nothing may block: drop the child, and queue a crash report."""
        children = self._children
        try:
            children.remove(child)
        except KeyError:
            return  # taken by _wind_down, which stops it: not a crash
        CONNECTIONS.dec()
        if self._paused and self._taking and len(children) < self.max_open:
            self._resume()
        if child.exception is not None:  # GreenletExit leaves it None: a kill is a normal end
            self._post(partial(report_crash, self.name, CHILD_NAME, child.exception))

    def _resume(self) -> None:
        self._paused = False
        ACCEPT_PAUSED.set(0)
        for server in self._listeners:
            if server.started:  # not closed (a worker closes its listeners to shut down)
                server.start_accepting()

    def _stop_taking(self) -> None:
        self._taking = False
        for server in self._listeners:
            server.stop_accepting()

    # ----- in the supervisor's greenlet -----------------------------------------

    def _wind_down(self) -> None:
        """End every connection, however the greenlet is exiting; then make the reports still queued."""
        self._stop_taking()
        children = list(self._children)
        self._children.clear()
        CONNECTIONS.dec(len(children))
        if self._paused:
            self._paused = False
            ACCEPT_PAUSED.set(0)
        log.info("supervisor %s stopping: ending %d connections", self.name, len(children))
        shut_down(children, self._shutdown, self.name)
        for report in self._queued_jobs():  # exits the hub dropped after the stop request, before we took the rest
            report()
        for child in children:
            # Killing leaves GreenletExit (no exception) or ShutdownKill; anything else is a crash of its own,
            # before the stop (its exit callback had yet to run) or in its cleanup.
            if child.exception is not None and not isinstance(child.exception, ShutdownKill):
                report_crash(self.name, CHILD_NAME, child.exception)
