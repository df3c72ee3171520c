"""What travels on RabbitMQ (PROTOCOL.md section 5), as values: no I/O here.

The kinds of message this worker publishes (exchange, mandatory, properties), the
commands it takes from its queue (app/sessions/ports.py's `Command`: the sessions
side owns what it accepts), the refusals it answers instead, the claims, releases
and notices of the routing (partitions.py), and every body as bytes.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from kombu import Exchange

from app.broker.frames import Properties, PublishKind, WholeProperties
from app.sessions.bans import Ban
from app.sessions.ports import Command  # the sessions side owns what it accepts; we only build it

EVENTS_EXCHANGE = "devices.events"
COMMANDS_EXCHANGE = "devices.commands"
EXCHANGES = (Exchange(EVENTS_EXCHANGE, type="topic", durable=True),
             Exchange(COMMANDS_EXCHANGE, type="direct", durable=True))
"""What both links declare on connecting (kombu's declarations: no I/O until bound to a channel)."""
ROUTES_EXCHANGE = "warren.routes"
"""x-consistent-hash (the plugin that ships with RabbitMQ): device id -> one of the PARTITIONS queues.
`devices.commands` passes what no binding takes (every command) on to it: its alternate exchange."""
PARTITIONS = 16
"""Fixed for a deployment: every worker must hash a device to the same partition."""
PARTITION_WEIGHT = "20"  # points on the hash ring per partition: 1 each spreads devices unevenly
PARTITION_ARGUMENTS = {
    # Replicated: the directory survives a node's loss. Each command waits for a majority's write.
    "quorum": {"x-queue-type": "quorum", "x-single-active-consumer": True, "x-queue-leader-locator": "balanced"},
    # One node's: no replication (a node's loss stops its partitions until it is back), no fsync to wait for.
    "classic": {"x-queue-type": "classic", "x-single-active-consumer": True},
}
"""By ROUTE_QUEUES: the same for every worker of a deployment (RabbitMQ refuses a declare that differs)."""
PARTITION_PREFETCH = 65535
"""The most AMQP can ask. Not 0 ("no limit"): a quorum queue reads 0 as 2,000, and a partition holding 2,000
live claims (32,000 devices over the 16) would then deliver nothing more, neither commands nor claims."""

ASK_TYPE = "warren.ask"
FORWARD_TYPE = "warren.command"  # a command passed on by its partition's owner to its holder
CLAIM_TYPE = "warren.claim"
RELEASE_TYPE = "warren.release"
ROUTED_TYPE = "warren.routed"
ROUTED_MANY_TYPE = "warren.routed-many"  # `routed` for many sessions of one holder, to a holder that sent updates
REPLACED_TYPE = "warren.replaced"
PING_TYPE = "warren.ping"  # is this holder's queue still there? (returned if not)
PROBE_TYPE = "warren.probe"  # start-up's check of the alternate exchange; its owner drops it
UPDATES_TYPE = "warren.updates"  # a holder's claims and releases of one partition's devices, in order
RING_TYPE = "warren.ring"  # a holder's check of ring.py against warren.routes, and the owner's answer
COPIES_TYPE = "warren.copies"  # an owner's copies of its partition's old claims, to its own queue
BAN_TYPE = "warren.ban"  # a ban or a lift, in the deployment's ban stream (bans.py)
MARK_TYPE = "warren.mark"  # a worker's marker in the ban stream: read back, it has replayed what came before
DEVICE_HEADER = "x-warren-device"  # on a forward: the device (its routing key is now the holder's queue)
TAG_HEADER = "x-warren-tag"  # on a forward: the partition delivery it came from, for a return
AGAIN_HEADER = "x-warren-again"  # on a forward: taken from a redelivery, so maybe passed on before
DEFAULT_COMMAND_TTL = 60.0  # seconds a command without `expiration` may wait for its device

_JSON = {"content_type": "application/json", "content_encoding": "utf-8"}
_PERSISTENT = 2

EVENT = PublishKind(EVENTS_EXCHANGE, mandatory=True, message_id_at=0,
                    properties=Properties({**_JSON, "delivery_mode": _PERSISTENT}, ("message_id",)))
"""A device's event: persistent, mandatory (no queue takes it: `unroutable`), confirmed."""
EVENT_WITH_PROPERTIES = PublishKind(EVENTS_EXCHANGE, mandatory=True, message_id_at=2, properties=WholeProperties(
    {**_JSON, "delivery_mode": _PERSISTENT}, ("application_headers", "expiration", "message_id")))
"""An event whose transport gave it AMQP properties (MQTT 5: headers, expiration); otherwise as EVENT."""
PRESENCE = PublishKind(EVENTS_EXCHANGE, mandatory=False,
                       properties=Properties({**_JSON, "delivery_mode": _PERSISTENT}, ("message_id",)))
"""`session.connected` / `session.closed`: nobody is told if no queue takes it."""
REPLY = PublishKind("", mandatory=False, properties=Properties(_JSON, ("correlation_id",)))
"""A device's reply (or the gateway's refusal) to a command, to its `reply_to` queue."""
COMMAND = PublishKind(COMMANDS_EXCHANGE, mandatory=True, message_id_at=3, properties=Properties(
    _JSON, ("correlation_id", "reply_to", "expiration", "message_id", "timestamp")))
"""A command from this worker's HTTP API: returned at once when no worker holds the device."""
ASK = PublishKind(COMMANDS_EXCHANGE, mandatory=True, message_id_at=3, properties=Properties(
    _JSON, ("correlation_id", "reply_to", "expiration", "message_id", "type")))
"""An operator's question (`info`, `kick`) to whichever worker holds a device; returned when none does."""
CLAIM = PublishKind(ROUTES_EXCHANGE, mandatory=False, properties=Properties({**_JSON, "type": CLAIM_TYPE}))
"""A holder's claim of a device for one of its sessions, to the device's partition."""
RELEASE = PublishKind(ROUTES_EXCHANGE, mandatory=False, properties=Properties({**_JSON, "type": RELEASE_TYPE}))
"""A holder's word that a session ended, to the device's partition."""
UPDATES = PublishKind("", mandatory=False, properties=Properties({**_JSON, "type": UPDATES_TYPE}))
"""A holder's claims and releases of one partition, to its queue by name (the holder hashed their devices)."""
RING_PROBE = PublishKind(ROUTES_EXCHANGE, mandatory=False, properties=Properties({**_JSON, "type": RING_TYPE}))
"""A key whose partition the holder worked out (ring.py), through the hash exchange: where does it land?"""
RING_ANSWER = PublishKind("", mandatory=False, properties=Properties({**_JSON, "type": RING_TYPE}))
"""The owner's answer to a ring probe, to the holder's queue by name."""
CLAIM_COPY = PublishKind("", mandatory=False, properties=Properties({**_JSON, "type": CLAIM_TYPE}))
"""A claim an owner publishes again to its own partition queue (before RabbitMQ's consumer timeout)."""
CLAIM_COPIES = PublishKind("", mandatory=False, properties=Properties({**_JSON, "type": COPIES_TYPE}))
"""An owner's copies of many of a partition's claims, as one message (what owners before them sent one by one)."""
ROUTED_NOTICE = PublishKind("", mandatory=True, message_id_at=0,
                     properties=Properties({**_JSON, "type": ROUTED_TYPE}, ("app_id",)))
REPLACED_NOTICE = PublishKind("", mandatory=True, message_id_at=0,
                       properties=Properties({**_JSON, "type": REPLACED_TYPE}, ("app_id",)))
ROUTED_MANY = PublishKind("", mandatory=True, message_id_at=0,
                          properties=Properties({**_JSON, "type": ROUTED_MANY_TYPE}, ("app_id",)))
PING = PublishKind("", mandatory=True, message_id_at=0, properties=Properties({"type": PING_TYPE}, ("app_id",)))
"""An owner's notices to a holder's queue, by name: mandatory, so that a queue gone says so (a return)."""
BAN = PublishKind("", mandatory=True, message_id_at=0,
                  properties=Properties({**_JSON, "delivery_mode": _PERSISTENT, "type": BAN_TYPE}, ("app_id",)))
"""A ban or a lift, to the ban stream by name: persistent, mandatory, confirmed before the API answers."""
BAN_COPY = PublishKind("", mandatory=False,
                       properties=Properties({**_JSON, "delivery_mode": _PERSISTENT, "type": BAN_TYPE}))
"""A ban published again before the stream's retention drops it (bans.py); lost, it is made at the next look."""
MARK = PublishKind("", mandatory=False, properties=Properties({**_JSON, "type": MARK_TYPE}))
"""A worker's marker, to the ban stream by name (bans.py): no confirm; a marker lost is waited out."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A delivery that cannot become a command; its sender hears `error` (too_large, bad_command)."""

    device: str
    id: str
    reply_to: str | None
    correlation_id: str
    error: str


def parse_command(device: str, properties: Mapping[str, Any], body: bytes, max_bytes: int, *,
                  monotonic: float, wall: float) -> Command | Refusal:
    """A delivery from devices.commands as a complete Command, or why it is refused.

    `monotonic` and `wall` are the clocks now (time.monotonic(), time.time()).
    """
    command_id = str(properties.get("message_id") or uuid.uuid4().hex)
    reply_to = properties.get("reply_to") or None
    correlation_id = str(properties.get("correlation_id") or command_id)
    if len(body) > max_bytes:
        return Refusal(device, command_id, reply_to, correlation_id, "too_large")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Refusal(device, command_id, reply_to, correlation_id, "bad_command")
    name = parsed.get("name") if isinstance(parsed, dict) else None
    if not isinstance(name, str) or not name:
        return Refusal(device, command_id, reply_to, correlation_id, "bad_command")
    return Command(device, command_id, name, parsed.get("data"), reply_to, correlation_id,
                   deadline(properties, monotonic=monotonic, wall=wall))


def deadline(properties: Mapping[str, Any], *, monotonic: float, wall: float) -> float:
    """When a command must no longer reach its device, on the monotonic clock.

    RabbitMQ does not say how long a message sat in the queue: when the sender
    stamped `timestamp` (seconds since the epoch) the TTL counts from then, else from now.
    """
    ttl = DEFAULT_COMMAND_TTL
    expiration = properties.get("expiration")
    if expiration:
        try:
            ttl = max(0.0, float(expiration) / 1000)
        except ValueError:
            pass
    sent = properties.get("timestamp")
    waited = max(0.0, wall - sent) if isinstance(sent, (int, float)) else 0.0
    return monotonic + ttl - waited


def partition_queue(partition: int) -> str:
    return f"{ROUTES_EXCHANGE}.{partition}"


def claim_body(device: str, session_id: str, started: float, holder: str, fresh: bool, epoch: int) -> bytes:
    """`epoch` counts the holder's connections to RabbitMQ: of two claims of one session, the later
    connection's names the holder's queue of now."""
    return orjson.dumps({"device": device, "session": session_id, "started": started, "holder": holder,
                         "fresh": fresh, "epoch": epoch})


def decode_claim(body: bytes) -> tuple[str, str, float, str, bool, int] | None:
    """(device, session id, started, holder queue, fresh, epoch), or None for a claim that is not ours to read."""
    try:
        claim = orjson.loads(body)
        device, session_id, started = claim["device"], claim["session"], claim["started"]
        holder, fresh, epoch = claim["holder"], claim["fresh"], claim["epoch"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return None
    if not (isinstance(device, str) and isinstance(session_id, str) and isinstance(holder, str)
            and isinstance(started, (int, float)) and isinstance(fresh, bool) and type(epoch) is int):
        return None
    return device, session_id, float(started), holder, fresh, epoch


CLAIMED, RELEASED = "c", "r"  # an update's kind


def updates_body(holder: str, epoch: int, updates: list[tuple[str, str, str, float, bool]]) -> bytes:
    """Claims and releases of one partition, in the order the holder made them, as one message: each
    `(kind, device, session, started or will_until, fresh)`, as `claim_body` and `release_body` say."""
    return orjson.dumps({"holder": holder, "epoch": epoch, "updates": updates})


def decode_updates(body: bytes) -> tuple[str, int, list[tuple[str, str, str, float, bool]]] | None:
    """(holder queue, epoch, updates), or None when any part is not ours to read (all or nothing: a
    message cut in two would break the order the owner relies on)."""
    try:
        message = orjson.loads(body)
        holder, epoch, updates = message["holder"], message["epoch"], message["updates"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return None
    if not (isinstance(holder, str) and type(epoch) is int and isinstance(updates, list) and updates):
        return None
    decoded = []
    for update in updates:
        if not (isinstance(update, list) and len(update) == 5):
            return None
        kind, device, session_id, when, fresh = update
        if kind not in (CLAIMED, RELEASED) or not (isinstance(device, str) and isinstance(session_id, str)
                                                   and isinstance(when, (int, float)) and isinstance(fresh, bool)):
            return None
        decoded.append((kind, device, session_id, float(when), fresh))
    if len({update[1] for update in decoded}) != len(decoded):  # a holder never sends a device twice (consumer.py)
        return None
    return holder, epoch, decoded


def copies_body(claims: list[tuple[str, str, float, str, int]]) -> bytes:
    """Claims an owner publishes again, each `(device, session, started, holder, epoch)` as `claim_body` has them."""
    return orjson.dumps({"claims": claims})


def decode_copies(body: bytes) -> list[tuple[str, str, float, str, int]] | None:
    """The claims of `copies_body`, or None when any is not ours to read (or a device is there twice)."""
    try:
        claims = orjson.loads(body)["claims"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return None
    if not isinstance(claims, list) or not claims:
        return None
    decoded = []
    for claim in claims:
        if not (isinstance(claim, list) and len(claim) == 5):
            return None
        device, session_id, started, holder, epoch = claim
        if not (isinstance(device, str) and isinstance(session_id, str) and isinstance(started, (int, float))
                and isinstance(holder, str) and type(epoch) is int):
            return None
        decoded.append((device, session_id, float(started), holder, epoch))
    return decoded if len({claim[0] for claim in decoded}) == len(decoded) else None


def ring_probe_body(holder: str, expect: int) -> bytes:
    return orjson.dumps({"holder": holder, "expect": expect})


def ring_answer_body(expect: int, landed: int) -> bytes:
    return orjson.dumps({"expect": expect, "landed": landed})


def decode_ring(body: bytes, first: str, second: str) -> tuple[Any, int] | None:
    """A ring probe's (holder, expected partition) or an answer's (expected, landed partition), by
    the fields named; None when it is not ours to read."""
    try:
        message = orjson.loads(body)
        one, two = message[first], message[second]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return None
    if not (type(one) in (str, int) and type(two) is int):
        return None
    return one, two


def notice_body(device: str, session_id: str) -> bytes:
    """A release, or an owner's `routed` / `replaced`."""
    return orjson.dumps({"device": device, "session": session_id})


def routed_many_body(sessions: list[tuple[str, str]]) -> bytes:
    """`routed` for each `(device, session)`."""
    return orjson.dumps(sessions)


def decode_routed_many(body: bytes) -> list[tuple[str, str]] | None:
    try:
        sessions = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(sessions, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, str) for part in pair)
            for pair in sessions):
        return None
    return [(device, session) for device, session in sessions]


def decode_notice(body: bytes) -> tuple[str, str] | None:
    """(device, session id), or None."""
    try:
        notice = orjson.loads(body)
        device, session_id = notice["device"], notice["session"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return None
    if not (isinstance(device, str) and isinstance(session_id, str)):
        return None
    return device, session_id


def release_body(device: str, session_id: str, will_until: float) -> bytes:
    """A release; `will_until` (wall clock, when not 0) says the session's will is held until then."""
    if not will_until:
        return notice_body(device, session_id)
    return orjson.dumps({"device": device, "session": session_id, "will_until": will_until})


def decode_release(body: bytes) -> tuple[str, str, float | None] | None:
    """(device, session id, will_until or None), or None for a release that is not ours to read."""
    notice = decode_notice(body)
    if notice is None:
        return None
    will_until = orjson.loads(body).get("will_until")
    return (*notice, float(will_until) if isinstance(will_until, (int, float)) else None)


def ban_body(ban: Ban) -> bytes:
    return orjson.dumps({"device": ban.device, "issued": ban.issued, "until": ban.until, "reason": ban.reason,
                         "by": ban.by, "lifted": ban.lifted})


def decode_ban(body: bytes) -> Ban | None:
    """A record of the ban stream, or None for one that is not ours to read (it is skipped, not fatal:
    a stream cannot drop a bad record, and every worker replays it at every start)."""
    try:
        record = orjson.loads(body)
        device, issued, until = record["device"], record["issued"], record["until"]
        reason, by, lifted = record.get("reason", ""), record.get("by", "operator"), record.get("lifted", False)
    except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
        return None
    if not (isinstance(device, str) and type(issued) is int and (until is None or type(until) is int)
            and isinstance(reason, str) and by in ("operator", "flapping") and isinstance(lifted, bool)):
        return None
    return Ban(device, issued, until, reason, by, lifted)


def event_body(device: str, session: str, event_id: str, name: str, data: Any, ts_ms: int) -> bytes:
    return orjson.dumps({"device": device, "session": session, "id": event_id, "name": name,
                         "data": data, "ts": ts_ms})


def reply_body(device: str, command_id: str, ok: bool, data: Any, error: str | None) -> bytes:
    return orjson.dumps({"device": device, "id": command_id, "ok": ok, "data": data, "error": error})


def command_body(name: str, data: Any) -> bytes:
    return orjson.dumps({"name": name, "data": data})


def ask_body(kind: str) -> bytes:
    return orjson.dumps({"kind": kind})


def decode_ask(body: bytes) -> str | None:
    """What an operator's question asks (`info`, `kick`...), or None if it is not one."""
    try:
        kind = orjson.loads(body).get("kind")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def decode_reply(body: bytes) -> dict[str, Any] | None:
    """A reply to one of our commands as {"ok", "data", "error", ...}, or None if it is not one."""
    try:
        reply = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return reply if isinstance(reply, dict) else None


class MessageIds:
    """Message ids unique to this process's lifetime, without a syscall each (uuid4 reads urandom)."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:12]
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}.{next(self._counter):x}"
