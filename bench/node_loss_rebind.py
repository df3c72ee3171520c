"""RabbitMQ alone after a node's loss: how soon it takes the lost node's bindings again, with no gateway.

`python -m bench.node_loss_rebind [--nodes 3] [--bindings 10000] [--lanes 4]` boots a cluster of its
own (bench/rabbit_cluster.py), binds `--bindings` routing keys to an exclusive queue on the
second node (as one gateway worker's command queue), opens a queue on the third node beforehand
(a worker that would not even have to declare one), kills the second node, and at once binds the
same keys to the waiting queue over `--lanes` channels (no-wait binds, then a round trip on each
channel, which RabbitMQ answers only after every bind before it). It prints when the first bind
was answered and when all were: RabbitMQ's own share of the gateway's node-loss recovery
(BENCHMARKS.md, issue 13), with no gateway, no devices and no load beside it. Not a floor: binds
in bulk race the survivors' deletion of the same keys, which the gateway's paced binds avoid, so
this can take longer than the gateway does. Run as root or as the `rabbitmq` user; asserts nothing.
"""

from __future__ import annotations

import sys
import time

import amqp

from bench.cli import script_parser
from bench.rabbit_cluster import Node, running_cluster

EXCHANGE = "node-loss-rebind"


def connect(node: Node) -> amqp.Connection:
    connection = amqp.Connection(f"127.0.0.1:{node.port}", userid="guest", password="guest")
    connection.connect()
    return connection


def bind_everything(channel: amqp.Channel, queue: str, keys: list[str]) -> float:
    """No-wait binds, then a passive declare as the barrier; seconds it all took."""
    started = time.monotonic()
    for key in keys:
        channel.queue_bind(queue, EXCHANGE, key, nowait=True)
    channel.queue_declare(queue, passive=True)
    return time.monotonic() - started


def main() -> None:
    parser = script_parser("python -m bench.node_loss_rebind", __doc__)
    parser.add_argument("--nodes", type=int, default=3, choices=(2, 3))
    parser.add_argument("--bindings", type=int, default=10000)
    parser.add_argument("--lanes", type=int, default=4)
    args = parser.parse_args()
    keys = [f"device-{n:06d}" for n in range(args.bindings)]
    with running_cluster(args.nodes) as cluster:
        first, lost = cluster.nodes[:2]
        survivor = cluster.nodes[2] if args.nodes == 3 else first
        print(f"cluster of {args.nodes} up in {cluster.boot_seconds:.1f}s", file=sys.stderr)
        connect(first).channel().exchange_declare(EXCHANGE, "direct", durable=True, auto_delete=False)
        victim = connect(lost).channel()
        doomed, _, _ = victim.queue_declare("", exclusive=True)
        print(f"{args.bindings:,} bindings on {lost.name} in {bind_everything(victim, doomed, keys):.2f}s",
              file=sys.stderr)
        standby = connect(survivor)
        queue, _, _ = standby.channel().queue_declare("", exclusive=True)
        lanes = [standby.channel() for _ in range(args.lanes)]
        cluster.kill_node(lost)
        killed = time.monotonic()
        lanes[0].queue_bind(queue, EXCHANGE, keys[0])  # waits for its bind-ok
        first_bind = time.monotonic() - killed
        for lane, share in enumerate(lanes):
            for key in keys[1 + lane::args.lanes]:
                share.queue_bind(queue, EXCHANGE, key, nowait=True)
        for lane in lanes:
            lane.queue_declare(queue, passive=True)
        every_bind = time.monotonic() - killed
        print(f"{lost.name} killed; binding again on {survivor.name} ({args.nodes - 1} nodes left, "
              f"{args.lanes} channels):")
        # Near 0 when it beat the survivors' clean-up of the lost queue; else about as long as that took.
        print(f"  first bind answered {first_bind:.2f}s after the kill")
        print(f"  all {args.bindings:,} answered {every_bind:.2f}s after the kill "
              f"({(args.bindings - 1) / max(every_bind - first_bind, 1e-3):,.0f} binds/s after the first)")


if __name__ == "__main__":
    main()
