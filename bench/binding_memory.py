"""What a per-device binding costs RabbitMQ in memory, on every node of a cluster.

`python -m bench.binding_memory [--nodes 2] [--bindings 100000]` boots a cluster of its own
(bench/rabbit_cluster.py), binds `--bindings` routing keys from a direct exchange to one
exclusive queue on the first node (as gateway workers bind their devices), and reads on every
node, before and after: the VM's total memory and the memory of RabbitMQ's routing tables
(`rabbit_route`, `rabbit_reverse_route` and their semi-durable twin, which every node holds in
full). Prints bytes per binding for each node: the figure docs/million-devices.md scales to a
million. Run as root or as the `rabbitmq` user; asserts nothing.
"""

from __future__ import annotations

import sys
import time

import amqp

from bench.cli import script_parser
from bench.rabbit_cluster import Node, RabbitCluster, running_cluster

EXCHANGE = "binding-memory"
ROUTE_TABLES = ("rabbit_route", "rabbit_reverse_route", "rabbit_semi_durable_route")
# Words of every routing table, then the VM's bytes in all: one Erlang expression for rabbitmqctl eval.
_TABLES = ", ".join(ROUTE_TABLES)
PROBE = (f"{{lists:sum([mnesia:table_info(T, memory) || T <- [{_TABLES}]]) * erlang:system_info(wordsize), "
         f"erlang:memory(total)}}.")


def memory(cluster: RabbitCluster, node: Node) -> tuple[int, int]:
    """(routing tables, whole VM) in bytes on `node`, after a garbage collection of every process."""
    cluster.ctl(node, "eval", "[erlang:garbage_collect(P) || P <- erlang:processes()], ok.")
    tables, total = cluster.ctl(node, "eval", PROBE).strip().strip("{}").split(",")
    return int(tables), int(total)


def main() -> None:
    parser = script_parser("python -m bench.binding_memory", __doc__)
    parser.add_argument("--nodes", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--bindings", type=int, default=100000)
    args = parser.parse_args()
    with running_cluster(args.nodes) as cluster:
        print(f"cluster of {args.nodes} up in {cluster.boot_seconds:.1f}s", file=sys.stderr)
        connection = amqp.Connection(f"127.0.0.1:{cluster.nodes[0].port}", userid="guest", password="guest")
        connection.connect()
        channel = connection.channel()
        channel.exchange_declare(EXCHANGE, "direct", durable=True, auto_delete=False)
        queue, _, _ = channel.queue_declare("", exclusive=True)
        before = {node.name: memory(cluster, node) for node in cluster.nodes}
        started = time.monotonic()
        for n in range(args.bindings):
            channel.queue_bind(queue, EXCHANGE, f"device-{n:07d}", nowait=True)
            if n % 10000 == 9999:
                channel.queue_declare(queue, passive=True)  # a round trip: RabbitMQ has taken them all
                print(f"  {n + 1:,} bound", file=sys.stderr)
        channel.queue_declare(queue, passive=True)
        print(f"{args.bindings:,} bindings in {time.monotonic() - started:.1f}s", file=sys.stderr)
        for node in cluster.nodes:
            tables, total = memory(cluster, node)
            table_delta, total_delta = tables - before[node.name][0], total - before[node.name][1]
            where = "the queue's node" if node is cluster.nodes[0] else "another node"
            print(f"{node.name} ({where}): routing tables {table_delta / args.bindings:,.0f} bytes per binding, "
                  f"whole VM {total_delta / args.bindings:,.0f} bytes per binding "
                  f"({total_delta / 2**20:,.1f} MiB for {args.bindings:,})")


if __name__ == "__main__":
    main()
