"""Error reporting: Sentry in each worker, and the supervisor's one reporting hook.

sentry-sdk is initialised after the fork and after gevent's monkey patching
(at the start of the worker's `run`, which gunicorn's GeventWorker calls
after `monkey.patch_all()`), never in gunicorn's master, so its
transport thread and sockets belong to the worker that uses them. Expected
protocol errors are answered with error frames and never reach Sentry; a
crash of a session greenlet, or a supervisor giving up, does.
"""

from __future__ import annotations

import logging
import os

import sentry_sdk

from app import metrics, supervision
from app.config import Config

log = logging.getLogger("warren.reporting")


class SupervisorReporter(supervision.Reporter):
    """Counts restarts, reports crashes and give-ups to Sentry (when configured)."""

    def crash(self, supervisor_name: str, child_id: str, exc: BaseException) -> None:
        metrics.CHILD_CRASHES.labels(supervisor=supervisor_name).inc()
        with sentry_sdk.new_scope() as scope:
            scope.set_tag("supervisor", supervisor_name)
            scope.set_tag("child", child_id)
            scope.set_tag("worker_pid", os.getpid())
            for key in ("device", "session"):
                value = getattr(exc, f"warren_{key}", None)
                if value:
                    scope.set_tag(key, value)
            sentry_sdk.capture_exception(exc)

    def restart(self, supervisor_name: str, child_id: str) -> None:
        metrics.SUPERVISOR_RESTARTS.labels(supervisor=supervisor_name).inc()

    def gave_up(self, supervisor_name: str, exc: BaseException) -> None:
        metrics.SUPERVISOR_GAVE_UP.labels(supervisor=supervisor_name).inc()
        with sentry_sdk.new_scope() as scope:
            scope.set_tag("supervisor", supervisor_name)
            scope.set_tag("worker_pid", os.getpid())
            scope.set_level("fatal")
            sentry_sdk.capture_message(f"supervisor {supervisor_name} gave up: {exc}")


def init_sentry(config: Config) -> None:
    """Start sentry-sdk in this worker when SENTRY_DSN is set; install the supervisor hook."""
    supervision.set_reporter(SupervisorReporter())
    if not config.sentry_dsn:
        return
    sentry_sdk.init(dsn=config.sentry_dsn, release=config.release, environment=config.environment,
                    default_integrations=False, auto_enabling_integrations=False,
                    integrations=[])
    sentry_sdk.set_tag("worker_pid", os.getpid())
    log.info("Sentry reporting enabled (environment %s)", config.environment)


def flush() -> None:
    """Send what is queued before the process exits."""
    client = sentry_sdk.get_client()
    if client.is_active():
        client.flush(timeout=2.0)
