"""An object whose state only its own greenlet changes: the process behind every supervisor.

Like an Erlang process running gen_server, an Actor's greenlet takes jobs from
its inbox one at a time, so its state never changes under a running job and
no locks are needed. Other greenlets hand it work with `_call`, and wait for
the answer; hub callbacks (a child's exit) may only `_post`, since nothing may
block in the hub. When asked to stop, or when a job raises, the greenlet winds
down (`_wind_down`: a supervisor stops its children there) and exits.

The lifecycle members (started, dead, exception, rawlink, request_stop, join)
are what app.supervision.childspec.ChildSupervisor asks of a child supervisor.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import gevent
from gevent.event import AsyncResult
from gevent.queue import Queue

_STOP = object()  # queued by request_stop(): the greenlet's signal to wind down


class Actor:
    """A greenlet with an inbox of jobs; subclasses add the state and the jobs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._inbox: Queue = Queue()
        self._greenlet = gevent.Greenlet(self._serve)

    def __str__(self) -> str:
        return f"{type(self).__name__} {self.name!r}"

    # ----- lifecycle ------------------------------------------------------------

    @property
    def exception(self) -> BaseException | None:
        """Why the greenlet exited: None after a normal stop, else the error that ended it."""
        return self._greenlet.exception

    @property
    def started(self) -> bool:
        """start() has been called (the actor may have exited since)."""
        return bool(self._greenlet) or self._greenlet.dead

    @property
    def dead(self) -> bool:
        return self._greenlet.dead

    def rawlink(self, callback: Callable[[Actor], object]) -> None:
        """Call callback(self) in the hub once the actor has exited, like Greenlet.rawlink."""
        self._greenlet.rawlink(lambda _greenlet: callback(self))

    def request_stop(self) -> None:
        """Ask the actor to wind down and exit, without waiting for it."""
        if self._greenlet:
            self._inbox.put(_STOP)
        else:  # never started, or already exited
            self._greenlet.kill()  # an unstarted actor must never start later

    def join(self, timeout: float | None = None) -> None:
        """Wait until the actor has exited or the timeout expired; never raises (wait() does)."""
        self._greenlet.join(timeout)

    def stop(self) -> None:
        """Ask the actor to stop and return once it has exited."""
        self._refuse_to_wait_here()
        self.request_stop()
        self._greenlet.join()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the actor exits; raise its exception if it has one.

        Returns True once it has exited normally, False if the timeout expired first.
        """
        self._greenlet.join(timeout)
        if not self._greenlet.dead:
            return False
        if self.exception is not None:
            raise self.exception
        return True

    # ----- for subclasses -----------------------------------------------------

    def _start_greenlet(self) -> None:
        if self.started:
            raise RuntimeError(f"{self} was already started")
        self._greenlet.start()

    def _serve(self) -> None:
        """Body of the greenlet: handle jobs until stopped (or a job raises), then wind down."""
        try:
            self._handle_jobs()
        finally:
            self._wind_down()

    def _handle_jobs(self) -> None:
        while (job := self._inbox.get()) is not _STOP:
            job()

    def _wind_down(self) -> None:
        """Runs in the greenlet just before it exits, however it exits."""

    def _queued_jobs(self) -> list[Callable[[], object]]:
        """Take the jobs still queued (for a subclass winding down), leaving out the stop signal."""
        jobs = []
        while not self._inbox.empty():
            job = self._inbox.get_nowait()
            if job is not _STOP:
                jobs.append(job)
        return jobs

    def _post(self, job: Callable[[], object]) -> None:
        """Queue a job and return at once: safe anywhere, even in a hub callback."""
        self._inbox.put(job)

    def _call(self, function: Callable[..., object], *args: object) -> object:
        """Run function(*args) as a job in the actor's greenlet and return (or raise) its result."""
        self._refuse_to_wait_here()
        if not self._greenlet:
            raise RuntimeError(f"{self} is not running")
        reply = AsyncResult()
        self._inbox.put(partial(_run_for_caller, reply, function, args))
        gevent.wait([reply, self._greenlet], count=1)
        if not reply.ready():
            raise RuntimeError(f"{self} exited before handling the call")
        return reply.get()

    def _read(self, function: Callable[[], object]) -> object:
        """A call, except where none can be made: in its own greenlet, or after exit (its final state)."""
        if gevent.getcurrent() is self._greenlet or not self._greenlet:
            return function()
        return self._call(function)

    def _refuse_to_wait_here(self) -> None:
        """Refuse to wait where waiting cannot work.

        The actor's greenlet would wait for itself forever (e.g. a start function
        calling stop), and the hub (an accept or exit callback) may not wait at all.
        """
        current = gevent.getcurrent()
        if current is self._greenlet:
            raise RuntimeError(f"calling {self} from its own greenlet would deadlock")
        if current is gevent.get_hub():
            raise RuntimeError(f"calling {self} from the hub would block the event loop")


def _run_for_caller(reply: AsyncResult, function: Callable[..., object], args: tuple) -> None:
    """A job: run function in the actor's greenlet, hand result or error back to the caller."""
    try:
        reply.set(function(*args))
    except Exception as exc:  # noqa: BLE001 - handed to the caller, who re-raises it
        reply.set_exception(exc)
