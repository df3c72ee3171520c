"""Free ports for the servers a benchmark or a test starts (gateways, the floor, fake receivers)."""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    """A port below the kernel's ephemeral range, which load tools fill with client sockets.

    Tried on every interface: a port free there is free on 127.0.0.1 too, and a gateway started
    as the platform starts it (the Procfile) binds 0.0.0.0."""
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
