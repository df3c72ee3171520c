"""A worker's live sessions and the rules that join them to RabbitMQ.

The registry is the directory (one session per device id in this worker), the
admission control (who may start a session now), and the glue between the
broker's deliveries and the sessions: commands, takeovers, presence. Sessions
call it through the `Host` port; it calls RabbitMQ through the `Outbound` port
it is built with, and the broker calls it back through the `Inbound` port it
implements (`deliver`, `routed`, `replaced`, `live_sessions`, and `answer` for an
operator's lookup or kick from any worker's HTTP API). The worker's tree
(app/tree.py) builds the broker, then the registry with it, then attaches the
registry to the broker: this module imports nothing of app/broker.

Takeover across workers and hosts: a new session claims its device, and the
device's partition owner (app/broker/partitions.py, the one place that decides
between racing hellos) answers `routed` to it and `replaced` to the holder of any
older session, so that whichever way two hellos race, exactly one session
survives. After RabbitMQ comes back, every worker claims all its sessions again,
so that two sessions of one device started during an outage find each other.
An owner that fails over may pass a command on twice: the registry remembers the
ids of the last commands it took and drops a second copy (at most once).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from typing import TYPE_CHECKING, Any

from app import metrics
from app.sessions.bans import now_ms
from app.sessions.limits import TokenBucket
from app.sessions.watchdog import Watchdog
from app.sessions.wills import DelayedWills, publish_will

if TYPE_CHECKING:
    from app.config import Config
    from app.sessions.bans import Ban
    from app.sessions.ports import Command, Outbound
    from app.sessions.session import Session

log = logging.getLogger("warren.registry")

# Publishes queued or awaiting confirms past which new hellos are told `overloaded`:
# a broker that cannot keep up must not be handed a stampede's presence events too.
MAX_BROKER_BACKLOG = 20000
# Command ids remembered, so that a command an owner passes on twice (it died before its ack) reaches
# the device once: an owner's failover redelivers within seconds, far fewer commands than this.
TAKEN_MEMORY = 65536


class Registry:
    """The worker's sessions by device id: the `Host` every session of this worker sees, and the
    `Inbound` its broker delivers to."""

    def __init__(self, config: Config, broker: Outbound) -> None:
        self.config = config
        self.sessions: dict[str, Session] = {}
        self.broker = broker
        self.watchdog = Watchdog(min(config.hello_timeout, 2 * config.heartbeat))
        self.hellos = TokenBucket(config.hello_rate, max(1, int(config.hello_rate)))
        self.shutting_down = False
        self.drain_window = 10.0
        self._taken: dict[tuple[str, str], None] = {}  # (device, id) of the last commands delivered, oldest first
        self.wills = DelayedWills(broker)

    # -- admission --------------------------------------------------------------
    def admit(self) -> tuple[str, float] | None:
        """None when a new session may start, else (error code, retry_after)."""
        if self.shutting_down:
            return "shutting_down", self.retry_after()
        if len(self.sessions) >= self.config.max_connections:
            return "overloaded", random.uniform(5, 30)
        if self.broker.backlog > MAX_BROKER_BACKLOG or not self.hellos.take():
            return "overloaded", random.uniform(1, 10)
        return None

    def retry_after(self) -> float:
        """A jittered wait, so that devices told to go away do not come back together."""
        return random.uniform(1.0, self.drain_window)

    @property
    def routing(self) -> bool:
        """Whether a new session can be routed now (else it is welcomed, and claimed once RabbitMQ is back)."""
        return self.broker.routing

    def banned(self, device: str) -> Ban | None:
        """The ban in force on `device`, as this worker read the deployment's bans (a dict lookup)."""
        return self.broker.banned(device)

    # -- deadlines (the watchdog sweeps every connection that is a session, hello included) ---------
    def watch(self, session: Session) -> None:
        self.watchdog.watch(session)

    def forget(self, session: Session) -> None:
        self.watchdog.forget(session)

    # -- session life -------------------------------------------------------------
    def open(self, session: Session) -> None:
        older = self.sessions.get(session.device)
        if older is not None:
            older.end("replaced")
        self.sessions[session.device] = session
        self.wills.cancel_device(session.device)  # a new session here: no will of an ended one goes out
        self.broker.claim(session.device, session.started, session.id)
        transport = session.conn.transport
        metrics.SESSIONS.labels(transport=transport).inc()
        metrics.SESSIONS_OPENED.labels(transport=transport).inc()
        metrics.SESSIONS_BY_WORKER.set(len(self.sessions))
        log.info("session opened", extra={"device": session.device, "session": session.id,
                                          "transport": transport, "peer": session.conn.peer})

    def welcomed(self, session: Session) -> None:
        """The session's commands are routed here (or RabbitMQ is away and it is claimed later): tell the backends."""
        self.broker.publish_presence(session.device, session.id, "connected",
                                     {"transport": session.conn.transport, **session.conn.presence})

    def close(self, session: Session, reason: str) -> None:
        """The session ended: its will (now, or held back by its delay), its release, `session.closed`."""
        if self.sessions.get(session.device) is session:
            del self.sessions[session.device]
        will, session.will = (None if session.clean else session.will), None
        delay = min(session.conn.will_delay, 2 * self.config.heartbeat) if will is not None else 0.0
        if will is not None and delay <= 0:  # before `session.closed`, on the same channel, in that order
            publish_will(self.broker, session.device, session.id, will)
        will_until = None
        if will is not None and delay > 0:  # after `session.closed`, unless a new session starts meanwhile
            will_until = self.wills.hold(session.device, session.id, will, delay)
        self.broker.release(session.device, session.id, will_until)
        metrics.SESSIONS.labels(transport=session.conn.transport).dec()
        metrics.SESSIONS_CLOSED.labels(reason=reason).inc()
        metrics.SESSIONS_BY_WORKER.set(len(self.sessions))
        if session.welcomed:  # a hello refused while routing was never announced either
            self.broker.publish_presence(session.device, session.id, "closed", {"reason": reason})
        log.info("session closed", extra={"device": session.device, "session": session.id,
                                          "reason": reason, "transport": session.conn.transport})

    def live_sessions(self) -> list[tuple[str, float, str]]:
        """(device, hello time, session id) of every session, for the broker to claim again."""
        return [(s.device, s.started, s.id) for s in self.sessions.values()]

    # -- from RabbitMQ (the `Inbound` port) -----------------------------------------------
    def deliver(self, command: Command, again: bool = False) -> None:
        """A command passed on to us: to its device's session, or `offline`/`expired` to its sender.
        `again`: its owner took it from a redelivery, so it may have passed it on to us already."""
        taken, key = self._taken, (command.device, command.id)
        if again and key in taken:
            metrics.COMMANDS.labels(outcome="duplicate").inc()
            return
        taken.pop(key, None)  # to the end: the memory forgets the least recently delivered first
        taken[key] = None
        if len(taken) > TAKEN_MEMORY:
            del taken[next(iter(taken))]
        if command.deadline <= time.monotonic():
            metrics.COMMANDS.labels(outcome="expired").inc()
            self.broker.reply(command, ok=False, error="expired")
            return
        session = self.sessions.get(command.device)
        if session is not None and session.deliver(command):
            return
        metrics.COMMANDS_OFFLINE.inc()
        self.broker.reply(command, ok=False, error="offline")

    def routed(self, device: str, session_id: str) -> None:
        """The owner says this session's claim stands: it may be welcomed."""
        session = self.sessions.get(device)
        if session is not None and session.id == session_id:
            session.route_confirmed()

    def replaced(self, device: str, session_id: str) -> None:
        """The owner says a newer session of `device` claimed it: ours ends, if it is still the one."""
        session = self.sessions.get(device)
        if session is not None and session.id == session_id:
            session.end("replaced")
        else:
            self.wills.cancel(device, session_id)  # an ended session's held will: a new one started elsewhere

    def ban_changed(self, ban: Ban) -> None:
        """A ban reached this worker: the device's session here, if any, ends (wherever the ban was
        issued, and also a session started here while the ban was on its way)."""
        if not ban.in_force(now_ms()):
            return
        session = self.sessions.get(ban.device)
        if session is not None:
            log.info("session of a banned device ended", extra={"device": ban.device, "session": session.id})
            session.end("banned", "this device is banned", ban.retry_after())

    # -- operators (PROTOCOL.md section 6): asked through RabbitMQ by any worker's HTTP API ---------
    def answer(self, device: str, question: str) -> dict[str, Any] | None:
        """`Inbound.answer`. Only the worker the device's owner routes it to is asked; one that holds
        no session of it now (it just ended, its release on the way) says so with `online` false."""
        if question not in ("info", "kick"):
            return None
        answer = self.info(device) if question == "info" else self.kick(device)
        return answer or {"device": device, "online": False}

    def info(self, device: str) -> dict[str, Any] | None:
        """Where and since when `device`'s session lives, if it lives in this worker."""
        session = self.sessions.get(device)
        if session is None:
            return None
        return {"device": device, "online": True, "session": session.id, "transport": session.conn.transport,
                "connected_at": int(session.started * 1000), "worker": os.getpid(), "host": socket.gethostname()}

    def kick(self, device: str) -> dict[str, Any] | None:
        """End `device`'s session here with `kicked`, if it lives in this worker; say which one ended."""
        session = self.sessions.get(device)
        if session is None:
            return None
        log.info("session kicked by an operator", extra={"device": device, "session": session.id})
        session.end("kicked")
        return {"device": device, "online": True, "ended": session.id}

    # -- shutdown -------------------------------------------------------------------
    def drain(self, window: float) -> None:
        """Ask every session to go, each told to come back at a different time."""
        self.shutting_down = True
        self.drain_window = max(1.0, window)
        for session in list(self.sessions.values()):
            session.drain()

    def end_all(self, code: str) -> None:
        """End every session still here with `code` (the drain ran out of time)."""
        for session in list(self.sessions.values()):
            session.end(code, retry_after=self.retry_after())
