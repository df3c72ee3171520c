"""What TLS costs a Warren listener next to plain TCP: memory per held connection, CPU per handshake, hub stalls.

`python -m bench.tls_bench [--connections 2000] [--handshakes 300] [--stampede 1000]` runs, against a
gevent server on loopback (a child process, so that its RSS and CPU time are the server's alone,
using app/tls.py and app/tls_handshake.py exactly as a worker does):

- memory: `--connections` connections held idle after one round trip (the server's greenlet
  blocked in recv, as a session's is): server RSS delta / N, for plain TCP, TLS 1.3, TLS 1.2,
  and TLS 1.3 with a client certificate (mutual TLS);
- CPU: server CPU time per connection for `--handshakes` sequential connections each way: plain,
  full handshakes and resumed ones (session tickets), TLS 1.3 and 1.2, ECDSA P-256 and RSA-2048
  server keys, with and without a client certificate; "handshake" is that minus the plain
  connection's cost, "OpenSSL" the server's handshake calls alone (both ends over memory BIOs);
- stampede: `--stampede` clients on a slow network, all connected first, whose ClientHellos then
  arrive together (full handshakes, RSA-2048, the heavier case), with and without the
  HandshakeGate: the longest the server's hub went without running a 5 ms timer (what a held
  session's heartbeat would wait), and how many handshakes failed.

Prints figures; asserts nothing. The machine is shared: compare rows, not absolute values.
"""

from gevent import monkey

monkey.patch_all()  # first: the clients and the server are greenlets

import argparse
import contextlib
import ctypes
import gc
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import gevent
import trustme
from gevent.pool import Pool
from gevent.server import StreamServer

from app.tls.contexts import device_context, load_tls
from app.tls.handshake import HandshakeGate, TlsHandshakeError, handshake
from bench.cli import script_parser
from bench.sampling import cpu_seconds, rss_bytes

HELLO_TIMEOUT = 10.0
PROBE_SECONDS = 0.005
GATEWAY_PLAIN_SESSION_KIB = 12.9  # a plain TCP session in the gateway today (BENCHMARKS.md)
PUBLISHED_TLS_OVERHEAD_KIB = 29.0  # published figure for Python servers, per TLS connection
KEY_TYPES = {"ECDSA P-256": trustme.KeyType.ECDSA, "RSA-2048": trustme.KeyType.RSA}
VERSIONS = {"TLS 1.3": ssl.TLSVersion.TLSv1_3, "TLS 1.2": ssl.TLSVersion.TLSv1_2}


# -- the server (a child process) ---------------------------------------------------------

def serve(args: argparse.Namespace) -> None:
    context = None if args.mode == "plain" else device_context(load_tls(os.environ))
    gate = HandshakeGate(args.per_turn, args.max_waiting) if args.per_turn else None
    counts = {"failed": 0, "stall": 0.0}

    def handle(sock: Any, _address: Any) -> None:
        try:
            conn = handshake(sock, context, HELLO_TIMEOUT, gate) if context else sock
        except TlsHandshakeError:
            counts["failed"] += 1
            return
        try:
            while conn.recv(16384):
                conn.sendall(b"k")
        except OSError:
            pass
        finally:
            conn.close()

    def control(sock: Any, _address: Any) -> None:
        for line in sock.makefile("r"):
            if line.strip() == "reset":
                counts.update(failed=0, stall=0.0)
            gc.collect()
            sock.sendall(json.dumps({
                **counts, "rss": rss_bytes(), "cpu": cpu_seconds(),
                "cached_sessions": context.session_stats()["number"] if context else 0,
            }).encode() + b"\n")

    def probe() -> None:
        while True:
            started = time.monotonic()
            gevent.sleep(PROBE_SECONDS)
            counts["stall"] = max(counts["stall"], time.monotonic() - started - PROBE_SECONDS)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    server = StreamServer(listener, handle)
    server.max_accept = 64  # as the worker's listeners
    if gate is not None:
        server.full = gate.full
        gate.on_room = server.start_accepting
    server.start()
    controller = StreamServer(("127.0.0.1", 0), control)
    controller.start()
    if args.probe:  # only when measured: its wake-ups would be counted as CPU per connection
        gevent.spawn(probe)
    print(json.dumps({"port": server.server_port, "control": controller.server_port}), flush=True)
    gevent.wait()


class Server:
    """The server child: started on entry, asked for its figures over a control connection, stopped on exit."""

    def __init__(self, pki: dict[str, str], mode: str, per_turn: int = 0, max_waiting: int = 256,
                 probe: bool = False) -> None:
        env = {**os.environ, "TLS_CERT_FILE": pki["cert"], "TLS_KEY_FILE": pki["key"]}
        if mode == "mtls":
            env["TLS_CLIENT_CA_FILE"] = pki["client_ca"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.tls_bench", "serve", "--mode", mode, "--per-turn", str(per_turn),
             "--max-waiting", str(max_waiting), *(["--probe"] if probe else [])], stdout=subprocess.PIPE, env=env, text=True)
        ready = json.loads(self.process.stdout.readline())
        self.port = ready["port"]
        self._control = socket.create_connection(("127.0.0.1", ready["control"]))
        self._replies = self._control.makefile("r")

    def stats(self, command: str = "stats") -> dict[str, Any]:
        self._control.sendall(command.encode() + b"\n")
        return json.loads(self._replies.readline())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._control.close()
        self.process.terminate()
        self.process.wait(timeout=10)


# -- clients --------------------------------------------------------------------------------

def client_context(pki: dict[str, str], version: ssl.TLSVersion, certificate: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki["ca"])
    context.minimum_version = context.maximum_version = version
    if certificate:
        context.load_cert_chain(pki["device"])
    return context


def connect(port: int, context: ssl.SSLContext | None, session: Any = None) -> Any:
    """A connection after one round trip (so the server has finished its handshake, tickets included)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no delayed-ACK waits between our writes
    if context is not None:
        conn = context.wrap_socket(conn, server_hostname="localhost", session=session)
    conn.sendall(b"x")
    if conn.recv(1) != b"k":
        raise ConnectionError("no answer")
    return conn


def open_many(port: int, context: ssl.SSLContext | None, count: int, concurrency: int = 200) -> list[Any]:
    return list(Pool(concurrency).imap_unordered(lambda _: connect(port, context), range(count)))


# -- measurements ---------------------------------------------------------------------------

def memory_per_connection(pki: dict[str, str], mode: str, version: ssl.TLSVersion, count: int) -> dict[str, Any]:
    context = None if mode == "plain" else client_context(pki, version, certificate=mode == "mtls")
    with Server(pki, mode) as server:
        for conn in open_many(server.port, context, 100):  # warm: allocator arenas, OpenSSL's tables
            conn.close()
        gevent.sleep(0.5)
        before = server.stats("reset")["rss"]
        held = open_many(server.port, context, count)
        gevent.sleep(0.5)
        after = server.stats()
        for conn in held:
            conn.close()
    return {"bytes": (after["rss"] - before) / count, "cached_sessions": after["cached_sessions"]}


def cpu_per_connection(pki: dict[str, str], mode: str, version: ssl.TLSVersion, count: int) -> dict[str, float]:
    """Server CPU seconds per connection: new sessions, then (TLS) resumed ones."""
    context = None if mode == "plain" else client_context(pki, version, certificate=mode == "mtls")
    figures = {}
    with Server(pki, mode) as server:
        for conn in open_many(server.port, context, 20):
            conn.close()
        started = server.stats("reset")["cpu"]
        for _ in range(count):
            connect(server.port, context).close()
        figures["full"] = (server.stats()["cpu"] - started) / count
        if context is None:
            return figures
        conn = connect(server.port, context)
        session, resumed = conn.session, 0
        conn.close()
        started = server.stats()["cpu"]
        for _ in range(count):
            conn = connect(server.port, context, session)
            resumed += conn.session_reused
            session = conn.session
            conn.close()
        figures["resumed"] = (server.stats()["cpu"] - started) / count
        figures["resumed_share"] = resumed / count
    return figures


class MemoryClient:
    """A TLS client over memory BIOs, so that its ClientHello can be made before the stampede and sent at once."""

    def __init__(self, context: ssl.SSLContext, session: Any = None) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost", session=session)
        self.hello = self.step()

    def step(self) -> bytes:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    def finish(self, conn: socket.socket) -> None:
        """Complete the handshake and one round trip over `conn`, whose ClientHello has been sent."""
        while True:
            data = conn.recv(16384)
            if not data:
                raise ConnectionError("closed during the handshake")
            self.incoming.write(data)
            conn.sendall(self.step())
            if self.tls.version() is not None:
                break
        self.tls.write(b"x")
        conn.sendall(self.outgoing.read())
        while True:
            try:
                if self.tls.read(1) == b"k":
                    return
                raise ConnectionError("no answer")
            except ssl.SSLWantReadError:
                data = conn.recv(16384)
                if not data:
                    raise ConnectionError("closed before the answer") from None
                self.incoming.write(data)


def openssl_seconds(pki: dict[str, str], mode: str, version: ssl.TLSVersion, count: int) -> dict[str, float]:
    """Server CPU seconds per handshake in OpenSSL alone: both ends over memory BIOs, only the server's calls timed."""
    env = {"TLS_CERT_FILE": pki["cert"], "TLS_KEY_FILE": pki["key"]}
    if mode == "mtls":
        env["TLS_CLIENT_CA_FILE"] = pki["client_ca"]
    server_context, client = device_context(load_tls(env)), client_context(pki, version, mode == "mtls")

    def one(session: Any) -> tuple[float, Any]:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        server, peer, spent = server_context.wrap_bio(incoming, outgoing, server_side=True), MemoryClient(
            client, session), 0.0
        incoming.write(peer.hello)
        while server.version() is None or outgoing.pending:
            started = cpu_seconds()
            try:
                server.do_handshake()
            except ssl.SSLWantReadError:
                pass
            spent += cpu_seconds() - started
            peer.incoming.write(outgoing.read())
            incoming.write(peer.step())
        with contextlib.suppress(ssl.SSLWantReadError):
            peer.tls.read(1)  # take the tickets
        return spent, peer.tls.session

    session = one(None)[1]
    full = sum(one(None)[0] for _ in range(count)) / count
    resumed = 0.0
    for _ in range(count):
        spent, session = one(session)
        resumed += spent
    return {"full": full, "resumed": resumed / count}


def stampede(pki: dict[str, str], count: int, per_turn: int) -> dict[str, float]:
    """`count` devices on a slow network: all connected first, their ClientHellos arriving together."""
    clients = [MemoryClient(client_context(pki, ssl.TLSVersion.TLSv1_3)) for _ in range(count)]
    with Server(pki, "tls", per_turn=per_turn, probe=True) as server:
        conns = list(Pool(200).imap(lambda _: socket.create_connection(("127.0.0.1", server.port)), range(count)))
        gevent.sleep(1.0)  # the server accepts them all; each waits for its ClientHello
        server.stats("reset")
        started = time.monotonic()
        for conn, client in zip(conns, clients, strict=True):
            conn.sendall(client.hello)
        done = Pool(count).map(lambda pair: _finish(*pair), zip(clients, conns, strict=True))
        elapsed = time.monotonic() - started
        stats = server.stats()
        for conn in conns:
            conn.close()
    return {"stall_ms": stats["stall"] * 1000, "seconds": elapsed, "failed": stats["failed"] + done.count(False)}


def _finish(client: MemoryClient, conn: socket.socket) -> bool:
    try:
        client.finish(conn)
    except (OSError, ssl.SSLError):
        return False
    return True


def release_buffers_mode(context: ssl.SSLContext) -> str:
    """Whether CPython set SSL_MODE_RELEASE_BUFFERS on a context (read through libssl: CPython has no getter).

    The SSL_CTX pointer is the first field after the object header of CPython's PySSLContext.
    """
    try:
        libssl = ctypes.CDLL("libssl.so.3")
        libssl.SSL_CTX_ctrl.restype = ctypes.c_long
        libssl.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        ssl_ctx = ctypes.c_void_p.from_address(id(context) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
        mode = libssl.SSL_CTX_ctrl(ssl_ctx, 33, 0, None)  # SSL_CTRL_MODE with 0: read the mode
    except (OSError, AttributeError, ValueError) as exc:
        return f"unknown ({exc})"
    return "on" if mode & 0x10 else "OFF"  # SSL_MODE_RELEASE_BUFFERS


# -- certificates and the report --------------------------------------------------------------

def make_pki(root: Path) -> dict[str, dict[str, str]]:
    pki = {}
    ca, device_ca = trustme.CA(), trustme.CA()
    for name, key_type in KEY_TYPES.items():
        server = ca.issue_cert("localhost", key_type=key_type)
        files = {"cert": server.cert_chain_pems[0].bytes(), "key": server.private_key_pem.bytes(),
                 "ca": ca.cert_pem.bytes(), "client_ca": device_ca.cert_pem.bytes(),
                 "device": device_ca.issue_cert("lock-0001").private_key_and_cert_chain_pem.bytes()}
        pki[name] = {}
        for kind, data in files.items():
            path = root / f"{key_type.name}-{kind}.pem"
            path.write_bytes(data)
            pki[name][kind] = str(path)
    return pki


def report_memory(args: argparse.Namespace, pki: dict[str, dict[str, str]]) -> None:
    ecdsa = pki["ECDSA P-256"]
    context = device_context(load_tls({"TLS_CERT_FILE": ecdsa["cert"], "TLS_KEY_FILE": ecdsa["key"]}))
    print(f"SSL_MODE_RELEASE_BUFFERS on Warren's contexts: {release_buffers_mode(context)}; "
          f"OP_NO_COMPRESSION: {'on' if context.options & ssl.OP_NO_COMPRESSION else 'OFF'}")
    print(f"\nMemory per held idle connection ({args.connections} connections, server RSS delta / N; ECDSA P-256)")
    rows = [("plain TCP", "plain", ssl.TLSVersion.TLSv1_3), ("TLS 1.3", "tls", ssl.TLSVersion.TLSv1_3),
            ("TLS 1.2", "tls", ssl.TLSVersion.TLSv1_2), ("TLS 1.3, client certificate", "mtls", ssl.TLSVersion.TLSv1_3)]
    plain = 0.0
    for label, mode, version in rows:
        figure = memory_per_connection(ecdsa, mode, version, args.connections)
        kib = figure["bytes"] / 1024
        if mode == "plain":
            plain = kib
            print(f"  {label:<28} {kib:6.1f} KiB")
            continue
        session = GATEWAY_PLAIN_SESSION_KIB + kib - plain
        print(f"  {label:<28} {kib:6.1f} KiB  TLS adds {kib - plain:4.1f} KiB (published: +{PUBLISHED_TLS_OVERHEAD_KIB:.0f}):"
              f" a gateway session {session:.1f} KiB = {session / GATEWAY_PLAIN_SESSION_KIB:.2f}x plain (target <= 2x);"
              f" sessions in the server's cache: {figure['cached_sessions']}")


def report_cpu(args: argparse.Namespace, pki: dict[str, dict[str, str]]) -> None:
    print(f"\nServer CPU per connection ({args.handshakes} sequential connections each; handshake = minus plain;"
          f" OpenSSL = the server's handshake calls alone, over memory BIOs)")
    plain = cpu_per_connection(pki["ECDSA P-256"], "plain", ssl.TLSVersion.TLSv1_3, args.handshakes)["full"]
    print(f"  {'plain TCP':<36} {plain * 1e6:10.0f} us")
    rows = [(f"{key}, {label}", pki[key], "tls", version) for key in KEY_TYPES for label, version in VERSIONS.items()]
    rows += [(f"ECDSA P-256, {label}, client cert", pki["ECDSA P-256"], "mtls", version)
             for label, version in VERSIONS.items()]
    for name, files, mode, version in rows:
        cpu = cpu_per_connection(files, mode, version, args.handshakes)
        alone = openssl_seconds(files, mode, version, args.handshakes)
        print(f"  {name:<36} full {cpu['full'] * 1e6:5.0f} us (handshake {(cpu['full'] - plain) * 1e6:4.0f}, OpenSSL"
              f" {alone['full'] * 1e6:4.0f})  resumed {cpu['resumed'] * 1e6:5.0f} us (handshake"
              f" {(cpu['resumed'] - plain) * 1e6:4.0f}, OpenSSL {alone['resumed'] * 1e6:4.0f}; {cpu['resumed_share']:.0%}"
              f" resumed)")


def report_stampede(args: argparse.Namespace, pki: dict[str, dict[str, str]]) -> None:
    print(f"\nStampede: {args.stampede} connected clients whose ClientHellos arrive together, full TLS 1.3, RSA-2048"
          f" (longest the hub went without running a {PROBE_SECONDS * 1000:.0f} ms timer)")
    for label, per_turn in (("no gate", 0), (f"HandshakeGate(per_turn={args.per_turn})", args.per_turn)):
        result = stampede(pki["RSA-2048"], args.stampede, per_turn)
        print(f"  {label:<28} longest stall {result['stall_ms']:7.1f} ms, all done in {result['seconds']:.1f} s, "
              f"{result['failed']} failed")


REPORTS = {"memory": report_memory, "cpu": report_cpu, "stampede": report_stampede}


def main() -> None:
    parser = script_parser("python -m bench.tls_bench", __doc__)
    parser.add_argument("role", nargs="?", choices=["report", "serve"], default="report")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--handshakes", type=int, default=300)
    parser.add_argument("--stampede", type=int, default=1000)
    parser.add_argument("--per-turn", type=int, default=16)
    parser.add_argument("--max-waiting", type=int, default=256)
    parser.add_argument("--only", choices=["memory", "cpu", "stampede"], help="one part of the report")
    parser.add_argument("--mode", choices=["plain", "tls", "mtls"], default="tls", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "serve":
        serve(args)
        return
    with tempfile.TemporaryDirectory(prefix="tls-bench-") as root:
        pki = make_pki(Path(root))
        for name, part in REPORTS.items():
            if args.only in (None, name):
                part(args, pki)


if __name__ == "__main__":
    main()
