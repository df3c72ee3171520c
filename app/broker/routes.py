"""The routing's fixed topology on RabbitMQ: the hash exchange, the partition queues, the policy behind them.

A handful of objects, the same with no device as with a million (PROTOCOL.md section 5,
rule 1): `devices.commands` has no binding of its own; the policy `warren-routes` gives
it the alternate exchange `warren.routes` (`x-consistent-hash`, a plugin that ships with
RabbitMQ), bound once to each partition queue. Declaring is idempotent, so every worker
declares at each connect; what is missing or declared otherwise stops it with a message
that says what to do.
"""

from __future__ import annotations

from typing import Any

import amqp.exceptions
from kombu import Exchange, Queue

from app.broker.link import Wire
from app.broker.messages import (
    COMMANDS_EXCHANGE,
    PARTITION_WEIGHT,
    PARTITIONS,
    PROBE_TYPE,
    ROUTES_EXCHANGE,
    partition_queue,
)
from app.broker.wires import HASH_EXCHANGE_PLUGIN, MissingFeature

PROBE_KEY = "warren.probe"  # no device id has a dot: no session can hold it


def declare(wire: Wire, queue_arguments: dict[str, Any]) -> int:
    """Declare the routes on the wire's channel and check the policy; the number of partitions (one behind
    the in-process broker's fanout, which has no consistent hashing)."""
    channel = wire.channel
    try:
        Exchange(ROUTES_EXCHANGE, type=wire.hash_exchange_type, durable=True)(channel).declare()
    except amqp.exceptions.AMQPError as exc:
        if "exchange type" in str(exc):
            raise MissingFeature(f"RabbitMQ lacks the {HASH_EXCHANGE_PLUGIN} plugin (it ships with RabbitMQ): "
                                 f"rabbitmq-plugins enable {HASH_EXCHANGE_PLUGIN}") from exc
        raise
    partitions = PARTITIONS if wire.hash_exchange_type != "fanout" else 1
    for partition in range(partitions):
        queue = Queue(partition_queue(partition), durable=True, auto_delete=False,
                      queue_arguments=queue_arguments)(channel)
        try:
            queue.declare()
        except amqp.exceptions.PreconditionFailed as exc:
            raise MissingFeature(
                f"the routing partitions exist with other arguments than ROUTE_QUEUES={queue_arguments['x-queue-type']} "
                f"asks ({exc}): set ROUTE_QUEUES as the rest of the deployment has it, or, with every worker "
                f"stopped, delete the queues warren.routes.0-{partitions - 1} (rabbitmqctl delete_queue)") from exc
        channel.queue_bind(partition_queue(partition), ROUTES_EXCHANGE, routing_key=PARTITION_WEIGHT)
    wire.check_alternate(COMMANDS_EXCHANGE, ROUTES_EXCHANGE, (PROBE_KEY, {"type": PROBE_TYPE}))
    return partitions
