"""Logging: one line per meaningful event, as text or as JSON (`LOG_FORMAT=json`).

Session lines carry `device` and `session` through `extra=`; the JSON formatter
puts every such field into the object, so log search can filter on them.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import orjson

from app.config import Config

STANDARD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": os.getpid(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in STANDARD_FIELDS})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """The classic line, with the `extra=` fields appended as key=value (device=..., session=...)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in STANDARD_FIELDS)
        if not fields:
            return line
        head, newline, rest = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {fields}{newline}{rest}"


def configure(config: Config) -> None:
    """Route Warren's loggers to stderr in the chosen format (gunicorn keeps its own)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.log_format == "json" else TextFormatter())
    root = logging.getLogger("warren")
    root.handlers[:] = [handler]
    root.setLevel(config.log_level)
    root.propagate = False
    # Each record would ask threading.current_thread(), which under gevent builds a
    # dummy thread object per greenlet: a third of the cost of a session's log line.
    logging.logThreads = False
    logging.logMultiprocessing = False
