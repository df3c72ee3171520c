"""The floor: the least a gevent server can do per connection, to measure Warren against.

`python -m bench.floor --port 7979 --workers 2` opens one listen socket,
forks that many workers (as gunicorn does) and echoes every byte back, so a
device's hello line returns as-is. What Warren costs beyond this is Warren's own.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import sys

from bench.cli import script_parser

BACKLOG = 4096
RECV_BYTES = 4096


def echo(sock: socket.socket, _address: tuple[str, int]) -> None:
    """Send back whatever arrives, until the peer closes."""
    try:
        while data := sock.recv(RECV_BYTES):
            sock.sendall(data)
    except OSError:
        pass


def listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)  # workers race for each accept; the losers must not block
    return sock


def serve(listener: socket.socket) -> None:
    """One worker: a gevent StreamServer on the shared listen socket (imported after fork)."""
    from gevent.server import StreamServer

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    StreamServer(listener, echo).serve_forever()


def fork_workers(listener: socket.socket, count: int) -> list[int]:
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            try:
                serve(listener)
            finally:
                os._exit(0)
        pids.append(pid)
    return pids


def main(argv: list[str] | None = None) -> None:
    parser = script_parser("python -m bench.floor", __doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7979)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = listen(args.host, args.port)  # kept open here too, as a gunicorn master does
    pids = fork_workers(listener, args.workers)
    print(f"floor: echoing on {args.host}:{args.port} with {args.workers} workers "
          f"(pids {' '.join(map(str, pids))})", file=sys.stderr, flush=True)

    def stop(*_: object) -> None:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in pids:
        os.wait()


if __name__ == "__main__":
    main()
