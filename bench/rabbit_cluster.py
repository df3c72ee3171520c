"""A real RabbitMQ cluster of its own on loopback, for the cluster tests (tests/test_cluster.py),
the stampede benchmark's `--broker cluster` (bench/stampede/brokers.py), bench.binding_memory and
bench.node_loss_rebind. It lives with the benchmarks, which import nothing of tests/; the tests
import it from here.

It runs beside the machine's own broker (rabbit@localhost on 5672) and never touches
it: its nodes have their own names (a random suffix), AMQP and distribution ports,
configuration, plugins file and data/log directories under one temporary directory.
What they share with it is epmd and the Erlang cookie, so that `rabbitmqctl -n <node>`
reaches them as it reaches the machine's broker.

Why the nodes run as the owner of that cookie (Debian's `rabbitmq` user): Erlang
refuses a cookie file that others can read, so the only way to share it is to be its
owner. Hence: run as root (we switch to that user for the node and every CLI call) or
as that user; anything else fails with a message saying so.

Why a node is our own child process and not `rabbitmq-server -detached`: we hold its
pid, stop it with a signal, and the kernel kills it if this process dies without
cleaning up (PR_SET_PDEATHSIG); a directory left by a run killed that way is swept by
the next one.

Booting: every node starts at once (boot is mostly CPU-bound code loading, which two
cores share well enough), then each but the first leaves its blank single-node
cluster and joins the first with `stop_app`, `join_cluster`, `start_app` (about 1.5 s;
the whole takes about 7 s on this machine when it is otherwise quiet).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TMP_PREFIX = "warren-rabbit-"
PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child between fork and exec only calls it
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class ClusterError(RuntimeError):
    """The cluster cannot be started or driven here; the message says why and what to do."""


@dataclass
class Node:
    """One node: its name, ports, directory, and its process while it runs."""

    name: str
    port: int
    dist_port: int
    base: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def log_path(self) -> Path:
        return self.base / "node.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"


def free_port() -> int:
    """A port the kernel has no use for now, for a node to bind within seconds (its AMQP or distribution port).

    Asked of the kernel (bench/ports.py picks below the ephemeral range, for servers that may wait
    longer before they bind): the stampede benchmark boots its cluster with it too (bench/stampede/brokers.py)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def amqp_url(*nodes: Node) -> str:
    """AMQP_URL naming these nodes, in this order (PROTOCOL.md 7: `;`-separated)."""
    return ";".join(node.url for node in nodes)


# The routing's exchange type (app/broker/partitions.py); it ships with RabbitMQ.
WARREN_PLUGINS = ("rabbitmq_consistent_hash_exchange",)


class RabbitCluster:
    """`size` clustered RabbitMQ nodes; `start()` boots them, `close()` leaves nothing behind.

    Each node runs `plugins` (Warren's by default) with `config` (rabbitmq.conf lines) added to the
    few lines every node gets: bench.mqtt_peers boots one node of RabbitMQ's MQTT plugin so."""

    def __init__(self, size: int = 2, plugins: tuple[str, ...] = WARREN_PLUGINS, config: str = "") -> None:
        self.plugins, self.config = plugins, config
        self.user = _node_user()
        self.scripts = _scripts_dir()
        _sweep_stale_dirs()
        self.root = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-"))
        self._prefix, self._letters = f"warren-{uuid.uuid4().hex[:8]}", iter(string.ascii_lowercase)
        self.nodes = [self._new_node() for _ in range(size)]
        self.boot_seconds = 0.0

    def _new_node(self) -> Node:
        short_name = f"{self._prefix}-{next(self._letters)}"
        base = self.root / short_name
        for sub in ("mnesia", "log", "conf.d"):
            (base / sub).mkdir(parents=True)
        # Our own files, so that nothing of /etc/rabbitmq (its 5672 listener, its NODENAME,
        # enabled plugins with their HTTP listeners) applies to these nodes.
        (base / "rabbitmq.conf").write_text(f"log.console = true\nlog.file = false\n{self.config}")
        (base / "rabbitmq-env.conf").write_text("")
        (base / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        return Node(f"{short_name}@localhost", free_port(), free_port(), base)

    # -- the whole cluster ---------------------------------------------------------------
    def start(self) -> None:
        """Boot every node at once, then cluster them; `boot_seconds` says how long it all took."""
        started = time.monotonic()
        self._chown(self.root)
        try:
            for node in self.nodes:
                self._spawn(node)
            for node in self.nodes:
                self.await_node(node)
            first, *others = self.nodes
            for node in others:  # one at a time: each join changes the cluster's membership
                self._join(node, first)
            self.ctl(first, *ROUTES_POLICY)  # cluster-wide, like every policy
        except BaseException:
            self.close()
            raise
        self.boot_seconds = time.monotonic() - started

    def _join(self, node: Node, first: Node) -> None:
        self.ctl(node, "stop_app")
        self.ctl(node, "join_cluster", first.name)
        self.ctl(node, "start_app")

    def add_node(self) -> Node:
        """Boot one more node and join it (for the test that needs a third)."""
        node = self._new_node()
        self._chown(node.base)
        self.nodes.append(node)
        self._spawn(node)
        self.await_node(node)
        self._join(node, self.nodes[0])
        return node

    def forget_node(self, node: Node) -> None:
        """A node lost for good: killed if it still runs, its data deleted, the others told to forget it."""
        if node.running:
            self.kill_node(node)
        self.nodes.remove(node)
        shutil.rmtree(node.base)
        self.ctl(self.nodes[0], "forget_cluster_node", node.name)

    def close(self) -> None:
        """Kill every node (their data goes too, so no graceful stop is owed) and remove the directory."""
        for node in self.nodes:
            if node.running:
                node.process.kill()
        for node in self.nodes:
            if node.process is not None:
                node.process.wait(STOP_TIMEOUT)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- one node ------------------------------------------------------------------------
    def stop_node(self, node: Node) -> None:
        """A graceful stop (SIGTERM: the VM runs init:stop, RabbitMQ closes its connections first)."""
        node.process.terminate()
        try:
            node.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(STOP_TIMEOUT)
            raise ClusterError(f"{node.name} did not stop within {STOP_TIMEOUT:g}s:\n{node.log_tail()}") from None

    def kill_node(self, node: Node) -> None:
        """A crash: SIGKILL, no goodbye to clients or to the other nodes."""
        node.process.kill()
        node.process.wait(STOP_TIMEOUT)

    def start_node(self, node: Node) -> None:
        """Boot a stopped node again from its data; it rejoins the cluster by itself."""
        self._spawn(node)
        self.await_node(node)

    def await_node(self, node: Node, timeout: float = BOOT_TIMEOUT) -> None:
        """Until the node accepts AMQP connections (its listener opens last in boot)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not node.running:
                raise ClusterError(f"{node.name} exited with {node.process.returncode}:\n{node.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", node.port), timeout=1):
                return
            time.sleep(0.05)
        raise ClusterError(f"{node.name} not accepting AMQP on {node.port} within {timeout:g}s:\n{node.log_tail()}")

    def ctl(self, node: Node, *args: str, timeout: float = 60) -> str:
        """`rabbitmqctl -n <node> <args>`; its output, or ClusterError with what it said."""
        out = subprocess.run([str(self.scripts / "rabbitmqctl"), "-n", node.name, *args], env=self._env(node),
                             capture_output=True, text=True, timeout=timeout, check=False,
                             preexec_fn=self._as_node_user)
        if out.returncode != 0:
            raise ClusterError(f"rabbitmqctl -n {node.name} {' '.join(args)} exited with {out.returncode}:\n"
                               f"{out.stdout}{out.stderr}")
        return out.stdout

    def connection_peer_ports(self, node: Node) -> set[int]:
        """The client-side ports of the AMQP connections this node holds, as RabbitMQ sees them
        (list_connections lists the whole cluster's: we keep those accepted on the node's port)."""
        out = self.ctl(node, "list_connections", "--quiet", "--formatter", "json", "port", "peer_port")
        return {row["peer_port"] for row in parse_json_listing(out) if row.get("port") == node.port}

    # -- processes -----------------------------------------------------------------------
    def _spawn(self, node: Node) -> None:
        with node.log_path.open("ab") as log:
            node.process = subprocess.Popen([str(self.scripts / "rabbitmq-server")], cwd=node.base,
                                            env=self._env(node), stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT,
                                            # Only syscalls, and under gevent there is one OS thread.
                                            preexec_fn=self._as_node_user)  # noqa: PLW1509

    def _env(self, node: Node) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": self.user.pw_dir,  # where Erlang reads the cookie
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(node.port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CONF_ENV_FILE": str(node.base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(node.base / "rabbitmq.conf"),
            "RABBITMQ_CONFIG_FILES": str(node.base / "conf.d"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.base / "log"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",  # should the node have to start epmd itself
            # rabbitmq-server then execs the VM instead of running it behind a shell that traps
            # signals: our pid is the VM's, so that SIGKILL (and PR_SET_PDEATHSIG) reaches it.
            "RUNNING_UNDER_SYSTEMD": "true",
        })
        return env

    def _as_node_user(self) -> None:
        """In the child before exec: its own session (a Ctrl-C at the terminal is for pytest, which
        then stops the nodes), the cookie owner's identity, and death when this process dies."""
        os.setsid()
        if os.geteuid() != self.user.pw_uid:
            os.setgroups([self.user.pw_gid])
            os.setgid(self.user.pw_gid)
            os.setuid(self.user.pw_uid)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def _chown(self, path: Path) -> None:
        if os.geteuid() == self.user.pw_uid:
            return
        for directory, _, files in os.walk(path):
            for name in [directory, *(os.path.join(directory, f) for f in files)]:
                os.chown(name, self.user.pw_uid, self.user.pw_gid)


ROUTES_POLICY = ("set_policy", "warren-routes", r"^devices\.commands$", '{"alternate-exchange":"warren.routes"}',
                 "--apply-to", "exchanges")
"""What the README asks of every RabbitMQ Warren uses: devices.commands passes what no binding takes (every
command) on to the routing's hash exchange."""


def parse_json_listing(out: str) -> list[dict]:
    """The rows of a `rabbitmqctl list_* --formatter json` listing: one JSON array, which rabbitmqctl
    3.10 prints an object a line (`[`, `{...}`, `,{...}`, `]`). Lines around the array (a warning the
    CLI prints on some machines) are skipped; a table read by whitespace broke on such lines."""
    lines = out.splitlines()
    start = next((n for n, line in enumerate(lines) if line.lstrip().startswith("[")), None)
    if start is None:
        raise ClusterError(f"no JSON listing in rabbitmqctl's output:\n{out}")
    try:
        rows, _ = json.JSONDecoder().raw_decode("\n".join(lines[start:]).lstrip())  # and ignore what follows
    except ValueError as exc:
        raise ClusterError(f"rabbitmqctl's JSON listing does not parse ({exc}):\n{out}") from None
    return [row for row in rows if isinstance(row, dict)]


@contextlib.contextmanager
def running_cluster(size: int = 2) -> Iterator[RabbitCluster]:
    """A started cluster, closed however the block ends (a failure, Ctrl-C, or SIGTERM to pytest)."""
    cluster = RabbitCluster(size)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- this machine --------------------------------------------------------------------------
def _node_user() -> pwd.struct_passwd:
    """The owner of the machine broker's Erlang cookie, if we may run as it."""
    cookie = _cookie_path()
    owner = pwd.getpwuid(cookie.stat().st_uid)
    if os.geteuid() not in (0, owner.pw_uid):
        raise ClusterError(f"the cluster tests run RabbitMQ nodes as {owner.pw_name}, the owner of {cookie} "
                           f"(the cookie they share with the machine's broker): run them as root or as "
                           f"{owner.pw_name}")
    return owner


def _cookie_path() -> Path:
    candidates = []
    with contextlib.suppress(KeyError):
        candidates.append(Path(pwd.getpwnam("rabbitmq").pw_dir) / ".erlang.cookie")
    candidates.append(Path.home() / ".erlang.cookie")
    for path in candidates:
        if path.exists():
            return path
    raise ClusterError(f"no Erlang cookie at {' or '.join(map(str, candidates))}: is RabbitMQ installed and "
                       f"started once (`make rabbitmq`)?")


def _scripts_dir() -> Path:
    """Where the real rabbitmq-server and rabbitmqctl scripts are (not Debian's su wrappers)."""
    found = shutil.which("rabbitmq-server") or shutil.which("rabbitmq-server", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise ClusterError("rabbitmq-server is not installed (Debian/Ubuntu: apt-get install rabbitmq-server; "
                           "`make rabbitmq` does it as root)")
    real = Path(os.path.realpath(found))
    # Debian links /usr/sbin/rabbitmq-* to one wrapper that su's and then runs its sibling of that name.
    return real.parent


def _sweep_stale_dirs() -> None:
    """Remove the directories of earlier runs whose pytest is gone (killed before it could clean up)."""
    for path in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        pid = path.name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
