"""Server-side TLS handshakes under gevent, paced so that a stampede cannot stall a worker's hub.

A full handshake costs the server public-key operations (ECDHE and a signature: 0.2-0.4 ms
in OpenSSL, about twice that with Python's share) and they run on the hub's thread. gevent
wakes every greenlet whose socket became readable in one turn of its loop, so thousands of
ClientHellos arriving together are thousands of crypto steps between two polls, in which no
held session's heartbeat is read and nothing is accepted (bench/tls_bench.py: 3,000 at once
stalled the hub 560 ms, growing with their number; 14 ms through the gate). `HandshakeGate`
bounds that:

- at most `per_turn` handshake steps run in one turn of the loop; a step over it waits, in
  arrival order, for a later turn (within its connection's deadline). Waiting costs nothing but
  the greenlet; the held sessions' reads and the accept loop run between turns.
- a slot is taken only for a step, never while a handshake waits for its peer, so clients that
  connect and send nothing (a slow loris) cannot fill the gate: they cost what they cost on the
  plain ports, a connection under the accept cap until HELLO_TIMEOUT.
- when `max_waiting` steps are waiting the gate is `full()`: the TLS listeners stop accepting
  (wire `full` into the gevent servers) until it has room again (`on_room`). The rest of a
  stampede then waits in the kernel's backlog of the shared listen socket, where it costs this
  process nothing, its HELLO_TIMEOUT has not started, and any worker with less to do takes it:
  accepting more than a worker can shake hands with in time would only turn them into timeouts.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from typing import Any

from gevent import get_hub
from gevent import ssl as gevent_ssl
from gevent.lock import Semaphore
from gevent.socket import wait_read, wait_write

# What OpenSSL says when the first bytes are not a TLS record: a plaintext client on a TLS port.
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL",
            "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}


class TlsHandshakeError(Exception):
    """A TLS handshake that did not complete; the connection is closed and never reaches a session.

    `reason` is one of "timeout" (not done by the deadline), "closed" (the peer went away) and
    "refused" (not TLS, a protocol version below 1.2, no or a bad client certificate, ...).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"TLS handshake {reason}: {detail}")
        self.reason = reason


class HandshakeGate:
    """Paces one worker's handshakes: `per_turn` steps a turn of the hub's loop, `max_waiting` before accept pauses.

    Make one per worker, after the fork (it belongs to that worker's hub).
    """

    def __init__(self, per_turn: int = 16, max_waiting: int = 256, on_room: Callable[[], Any] | None = None) -> None:
        if per_turn < 1 or max_waiting < 1:
            raise ValueError("per_turn and max_waiting must be at least 1")
        self.per_turn = per_turn
        self.max_waiting = max_waiting
        self.on_room = on_room
        self.waiting = 0
        self._slots = Semaphore(per_turn)
        self._turn: Any = None  # the loop timer that starts the next turn; made on first use
        self._paused = False

    def full(self) -> bool:
        """Whether the TLS listeners should stop accepting (a gevent server's `full`)."""
        full = self.waiting >= self.max_waiting
        self._paused = self._paused or full
        return full

    def enter(self, deadline: float) -> None:
        """Take a slot for one handshake step in this turn or a later one; TlsHandshakeError past `deadline`."""
        # Behind anyone already waiting, in arrival order; straight through when nobody is.
        if self.waiting or not self._slots.acquire(blocking=False):
            self.waiting += 1
            try:
                got = self._slots.acquire(timeout=max(0.0, deadline - time.monotonic()))
            finally:
                self.waiting -= 1
                self._maybe_room()
            if not got:
                raise TlsHandshakeError("timeout", "no turn for the handshake before the deadline")
        self._next_turn()

    def _next_turn(self) -> None:
        # A zero-delay libev timer fires after the loop's next poll: the slots come back only once
        # the I/O that is ready has had its turn.
        if self._turn is None:
            self._turn = get_hub().loop.timer(0.0, ref=False)
        if not self._turn.active:
            self._turn.start(self._refill)

    def _refill(self) -> None:
        for _ in range(self.per_turn - self._slots.counter):
            self._slots.release()

    def _maybe_room(self) -> None:
        if self._paused and self.waiting < self.max_waiting:
            self._paused = False
            if self.on_room is not None:
                self.on_room()


def handshake(sock: Any, context: ssl.SSLContext, timeout: float, gate: HandshakeGate | None = None) -> Any:
    """Complete a server-side handshake on an accepted gevent socket within `timeout` seconds.

    `timeout` is what is left of HELLO_TIMEOUT, counted from the accept. The whole handshake must
    fit in it, however slowly the peer sends its bytes. Returns the gevent SSLSocket (blocking,
    no timeout: the session sets its own); on failure the connection is closed and
    TlsHandshakeError raised, so that nothing a client sent before a completed handshake (a
    plaintext hello, say) can reach a session.
    """
    if not isinstance(context, gevent_ssl.SSLContext):
        raise TypeError("handshake needs a context from app.tls (gevent's SSLContext): a standard one blocks the hub")
    deadline = time.monotonic() + timeout
    try:
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except OSError as exc:  # the peer is gone already (ENOTCONN)
        sock.close()
        raise TlsHandshakeError("closed", str(exc)) from None
    try:
        tls.settimeout(0.0)  # each step returns at once; the waits are ours, under one deadline
        _drive(tls, deadline, gate)
        tls.settimeout(None)
    except BaseException:
        tls.close()
        raise
    return tls


def _drive(tls: Any, deadline: float, gate: HandshakeGate | None) -> None:
    while True:
        if gate is not None:
            gate.enter(deadline)
        try:
            tls.do_handshake()
            return
        except ssl.SSLWantReadError:
            wait = wait_read
        except ssl.SSLWantWriteError:
            wait = wait_write
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
            raise TlsHandshakeError("closed", str(exc)) from None
        except ssl.SSLError as exc:
            raise TlsHandshakeError("refused", _refusal(exc)) from None
        except OSError as exc:  # reset by the peer, or closed under us by another greenlet
            raise TlsHandshakeError("closed", str(exc) or type(exc).__name__) from None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TlsHandshakeError("timeout", "the handshake did not complete in time")
        wait(tls.fileno(), timeout=remaining,
             timeout_exc=TlsHandshakeError("timeout", "the handshake did not complete in time"))


def _refusal(exc: ssl.SSLError) -> str:
    reason = getattr(exc, "reason", None) or ""
    if reason in _NOT_TLS:
        return f"not TLS ({reason}): a plaintext client on a TLS port?"
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no client certificate: this port requires one signed by TLS_CLIENT_CA_FILE"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate refused: {exc.verify_message}"
    return reason or str(exc)
