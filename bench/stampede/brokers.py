"""Which RabbitMQ a suite's gateway runs on: the machine's own broker, or a two-node cluster of the suite's.

`--broker single,cluster` runs every scenario once per broker, each on a fresh
gateway, the later compared with the first; `cluster3` is a cluster of three nodes,
so that the nodes left after a loss are still a cluster. A cluster is the one the cluster
tests boot (bench/rabbit_cluster.py: own node names, ports and data, run as the
`rabbitmq` user, killed when the suite ends), booted once for the whole suite.
The gateway lists every node in AMQP_URL (`a;b`), so its workers spread over them;
this tool's backend (its commands and the event verifier) connects to the first
node only, so that commands and events cross the cluster as they would between
hosts, and `lose_node` (the node-loss scenario) kills the second: the backend
keeps its connection, and what is measured is the gateway's recovery.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from bench.cli import distinct_names
from bench.rabbit_cluster import ClusterError, RabbitCluster, amqp_url, parse_json_listing, running_cluster

CLUSTER_SIZES = {"cluster": 2, "cluster3": 3}
BROKERS = ("single", *CLUSTER_SIZES)


@dataclass
class Broker:
    """Where one gateway's RabbitMQ is, and (on a cluster) how to lose and restore a node."""

    name: str
    gateway_url: str  # the gateway's AMQP_URL
    backend_url: str  # this tool's commands and event verifier
    cluster: RabbitCluster | None = field(default=None, repr=False)

    @property
    def pids(self) -> list[int] | None:
        """The cluster's node processes, whose memory the run gauges (None: the machine's broker)."""
        if self.cluster is None:
            return None
        return [node.process.pid for node in self.cluster.nodes if node.running]

    @property
    def can_lose_node(self) -> bool:
        return self.cluster is not None

    def lose_node(self) -> float:
        """SIGKILL the second node (a crash: no goodbye to clients); the wall-clock time it died."""
        self.cluster.kill_node(self.cluster.nodes[1])
        return time.time()

    def metadata(self) -> dict[str, int] | None:
        """RabbitMQ's queues, bindings and exchanges in the default vhost: what PROTOCOL.md section 5 says a
        session's start must not add to (issue 19). None when rabbitmqctl cannot tell."""
        counts = {}
        for what in ("queues", "bindings", "exchanges"):
            args = (f"list_{what}", "--formatter", "json", "source_name" if what == "bindings" else "name")
            try:
                if self.cluster is None:
                    out = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60,
                                         check=True).stdout
                else:
                    node = next(node for node in self.cluster.nodes if node.running)
                    out = self.cluster.ctl(node, *args)
                counts[what] = len(parse_json_listing(out))
            except (OSError, subprocess.SubprocessError, ClusterError, StopIteration):
                return None
        return counts

    def restore_node(self) -> float:
        """Boot the lost node again from its data (it rejoins by itself); seconds until it accepts AMQP."""
        started = time.monotonic()
        self.cluster.start_node(self.cluster.nodes[1])
        return time.monotonic() - started


known_brokers = distinct_names("--broker", BROKERS)


@contextmanager
def brokers(names: list[str], single_url: str) -> Iterator[dict[str, Broker]]:
    """Every broker named, by name; a cluster is booted first and killed when the block ends."""
    with ExitStack() as stack:
        found = {}
        for name in names:
            if name == "single":
                found[name] = Broker(name, single_url, single_url)
                continue
            size = CLUSTER_SIZES[name]
            print(f"suite: booting a RabbitMQ cluster of {size} nodes (bench/rabbit_cluster.py)", file=sys.stderr)
            cluster = stack.enter_context(running_cluster(size))
            print(f"suite: cluster {', '.join(node.name for node in cluster.nodes)} up in "
                  f"{cluster.boot_seconds:.1f}s", file=sys.stderr)
            found[name] = Broker(name, amqp_url(*cluster.nodes), cluster.nodes[0].url, cluster)
        yield found
