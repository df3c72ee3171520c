"""All configuration, read from the environment in one place (PROTOCOL.md section 7).

A bad value stops start-up with a `ConfigError` naming the variable and the
value, before any worker forks: a typo must not become a half-working gateway.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

AMQP_URL_VARIABLES = ("AMQP_URL", "CLOUDAMQP_URL", "RABBITMQ_URL")
IN_PROCESS_BROKER = "memory://"


class ConfigError(ValueError):
    """A configuration variable holds a value Warren cannot use."""

    def __init__(self, variable: str, value: str, why: str) -> None:
        super().__init__(f"{variable}={value!r}: {why}")
        self.variable = variable


def _cores() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Config:
    """Every setting and its one default; `load` reads the environment over these."""

    port: int = 8000
    device_port: int | None = 7878
    mqtt_port: int | None = 1883
    mqtt_max_keepalive: float = 1200.0  # the longest MQTT keep-alive honoured; 0 and longer ones get this
    bind_host: str = "0.0.0.0"
    amqp_url: str = IN_PROCESS_BROKER
    device_secrets: tuple[bytes, ...] = ()
    api_tokens: tuple[str, ...] = ()
    ops_tokens: tuple[str, ...] = ()  # empty: /metrics, / and /status.json are open (said loudly at start)
    web_concurrency: int = field(default_factory=_cores)
    max_connections: int = 18000
    heartbeat: float = 30.0
    hello_timeout: float = 10.0
    max_frame_bytes: int = 65536
    sentry_dsn: str | None = None
    flap_max: int = 30  # sessions a device may start within flap_window (0: no flapping detection)
    flap_window: float = 60.0
    flap_ban: float = 120.0
    # Extensions beyond PROTOCOL.md section 7 (README: "Configuration").
    event_rate: float = 50.0
    event_burst: int = 100
    hello_rate: float = 10000.0
    send_buffer_bytes: int = 262144
    graceful_timeout: float = 25.0
    confirm_timeout: float = 10.0  # a publisher confirm overdue this long: the link is presumed dead
    amqp_heartbeat: int = 20  # AMQP heartbeat with RabbitMQ, seconds (0 turns it off)
    max_pending_commands: int = 64  # commands awaiting a device's reply, per session
    route_wait: float = 10.0  # how long a hello waits for its route before it is refused `overloaded`
    # The routing partitions' queue type: quorum survives a node's loss (three nodes or more); classic
    # is a single node's choice, with no replication to wait for on every command (README, "RabbitMQ").
    route_queues: str = "quorum"
    # The stream that holds the deployment's bans: one name per deployment sharing a RabbitMQ vhost.
    bans_stream: str = "warren.bans"
    log_format: str = "text"
    log_level: str = "INFO"
    environment: str = "production"
    release: str | None = None

    @property
    def in_process_broker(self) -> bool:
        return self.amqp_url.startswith("memory://")


DEFAULTS = Config()


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, raw, "must be a whole number") from None
    if value < minimum:
        raise ConfigError(name, raw, f"must be at least {minimum}")
    return value


def _positive(env: Mapping[str, str], name: str, default: float, unit: str = "seconds") -> float:
    """A positive, finite number: a duration in seconds, or a rate per second."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, raw, f"must be a number of {unit}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(name, raw, f"must be a positive number of {unit}")
    return value


# Device listeners that an empty value turns off (PORT, the HTTP port, is always on).
OPTIONAL_PORTS = ("DEVICE_PORT", "MQTT_PORT")


def _port(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    """A TCP port; an empty DEVICE_PORT or MQTT_PORT disables that listener."""
    raw = env.get(name, "").strip()
    if not raw:
        return None if name in OPTIONAL_PORTS and name in env else default
    value = _int(env, name, 0)
    if value > 65535:
        raise ConfigError(name, raw, "must be a port number between 0 and 65535")
    return value


def _amqp_url(env: Mapping[str, str]) -> str:
    for name in AMQP_URL_VARIABLES:
        raw = env.get(name, "").strip()
        if raw:
            _check_url(name, raw)
            return raw
    return IN_PROCESS_BROKER


def _check_url(name: str, raw: str) -> None:
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(name, raw, f"is not a URL ({exc})") from None
    if parts.scheme not in {"amqp", "amqps", "pyamqp", "memory"}:
        raise ConfigError(name, raw, "must start with amqp:// or amqps://")
    if parts.scheme != "memory" and not parts.hostname:
        raise ConfigError(name, raw, "has no host name")


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def _choice(env: Mapping[str, str], name: str, default: str, choices: set[str]) -> str:
    raw = env.get(name, "").strip() or default
    if raw not in choices:
        raise ConfigError(name, raw, f"must be one of {', '.join(sorted(choices))}")
    return raw


def _queue_name(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    if not re.fullmatch(r"[A-Za-z0-9._:-]{1,200}", raw) or raw.startswith("amq."):
        raise ConfigError(name, raw, "must be a RabbitMQ queue name: 1-200 of A-Z a-z 0-9 . _ : -, not amq.*")
    return raw


def load(env: Mapping[str, str] | None = None) -> Config:
    """Read the configuration; raise ConfigError naming the first bad variable."""
    env = os.environ if env is None else env
    return Config(
        port=_port(env, "PORT", DEFAULTS.port) or DEFAULTS.port,
        device_port=_port(env, "DEVICE_PORT", DEFAULTS.device_port),
        mqtt_port=_port(env, "MQTT_PORT", DEFAULTS.mqtt_port),
        mqtt_max_keepalive=_positive(env, "MQTT_MAX_KEEPALIVE", DEFAULTS.mqtt_max_keepalive),
        bind_host=env.get("BIND_HOST", "").strip() or DEFAULTS.bind_host,
        amqp_url=_amqp_url(env),
        device_secrets=tuple(s.encode() for s in _list(env, "DEVICE_SECRETS")),
        api_tokens=_list(env, "API_TOKENS"),
        ops_tokens=_list(env, "OPS_TOKENS") or DEFAULTS.ops_tokens,
        web_concurrency=_int(env, "WEB_CONCURRENCY", _cores(), minimum=1),
        max_connections=_int(env, "MAX_CONNECTIONS", DEFAULTS.max_connections, minimum=1),
        heartbeat=_positive(env, "HEARTBEAT", DEFAULTS.heartbeat),
        hello_timeout=_positive(env, "HELLO_TIMEOUT", DEFAULTS.hello_timeout),
        max_frame_bytes=_int(env, "MAX_FRAME_BYTES", DEFAULTS.max_frame_bytes, minimum=64),
        sentry_dsn=env.get("SENTRY_DSN", "").strip() or None,
        flap_max=_int(env, "FLAP_MAX", DEFAULTS.flap_max),
        flap_window=_positive(env, "FLAP_WINDOW", DEFAULTS.flap_window),
        flap_ban=_positive(env, "FLAP_BAN", DEFAULTS.flap_ban),
        event_rate=_positive(env, "EVENT_RATE", DEFAULTS.event_rate, "frames a second"),
        event_burst=_int(env, "EVENT_BURST", DEFAULTS.event_burst, minimum=1),
        hello_rate=_positive(env, "HELLO_RATE", DEFAULTS.hello_rate, "hellos a second"),
        send_buffer_bytes=_int(env, "SEND_BUFFER_BYTES", DEFAULTS.send_buffer_bytes, minimum=4096),
        graceful_timeout=_positive(env, "GRACEFUL_TIMEOUT", DEFAULTS.graceful_timeout),
        confirm_timeout=_positive(env, "CONFIRM_TIMEOUT", DEFAULTS.confirm_timeout),
        amqp_heartbeat=_int(env, "AMQP_HEARTBEAT", DEFAULTS.amqp_heartbeat),
        max_pending_commands=_int(env, "MAX_PENDING_COMMANDS", DEFAULTS.max_pending_commands, minimum=1),
        route_wait=_positive(env, "ROUTE_WAIT", DEFAULTS.route_wait),
        route_queues=_choice(env, "ROUTE_QUEUES", DEFAULTS.route_queues, {"quorum", "classic"}),
        bans_stream=_queue_name(env, "BANS_STREAM", DEFAULTS.bans_stream),
        log_format=_choice(env, "LOG_FORMAT", DEFAULTS.log_format, {"text", "json"}),
        log_level=_choice(env, "LOG_LEVEL", DEFAULTS.log_level, {"DEBUG", "INFO", "WARNING", "ERROR"}),
        environment=env.get("SENTRY_ENVIRONMENT", "").strip() or DEFAULTS.environment,
        release=(env.get("SENTRY_RELEASE") or env.get("SOURCE_VERSION")
                 or env.get("HEROKU_SLUG_COMMIT") or "").strip() or None,
    )
