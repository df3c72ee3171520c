"""The gunicorn worker: gunicorn's gevent worker, running one Warren supervision tree.

gunicorn pre-forks these workers and shares its listen sockets with them (the
acceptor pool, app/listeners.py). This module is only the glue: read the
configuration, build the tree (app/tree.py) after the fork, report in to the
arbiter every second, and drain on shutdown.

Why the tree is imported inside `run`: gunicorn's master imports this module to
find the worker class, before any fork, and gevent patches `ssl`, `socket` and
threads only in the worker (GeventWorker.init_process). kombu and sentry-sdk
import `ssl` and urllib3 at import time; imported in the master, they would be
the unpatched modules every worker inherits (gevent's MonkeyPatchWarning).
"""

from __future__ import annotations

import gevent
from gunicorn.workers.ggevent import GeventWorker

from app import config as config_module
from app import logs


class WarrenWorker(GeventWorker):
    """Serves every listener of the instance from one gevent hub."""

    # Set by gunicorn.conf.py in the master, before any fork (TLS settings, server contexts): every
    # worker inherits the same contexts, and with them the same session-ticket keys.
    tls = None

    def init_process(self) -> None:
        self.config = config_module.load()
        logs.configure(self.config)
        super().init_process()  # gevent's monkey patching, then run()

    def run(self) -> None:
        from app import sentry
        from app.gc_policy import GcPolicy
        from app.tree import WorkerTree

        # After the fork and after monkey patching, so that sentry-sdk's transport
        # thread and sockets are gevent-cooperative and belong to this worker.
        sentry.init_sentry(self.config)
        tree = WorkerTree(self.config, self.sockets, self.wsgi, self.log, self.age, self.tls, self.cfg.workers)
        tree.start()
        gc_policy = GcPolicy()
        while self.alive:
            self.notify()
            gc_policy.tick()
            gevent.sleep(1.0)
        tree.shut_down(self.cfg.graceful_timeout, self.notify)
