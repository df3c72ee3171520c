"""Shared fixtures: the `gateway` most end-to-end tests talk to (real gunicorn on free ports, the real RabbitMQ).

Fixtures only: how a gateway is started and reached is tests/support/gateways.py. pytest puts tests/ on
sys.path (pyproject.toml's `pythonpath`), so tests import their helpers as `support.<module>`.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()  # first: the supervisor tests run greenlets, and patching must precede imports

from collections.abc import Iterator

import pytest

from support.gateways import Gateway, start_gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Two workers on RabbitMQ, short timeouts so that tests of them stay quick."""
    instance = start_gateway(tmp_path_factory.mktemp("gateway"), workers=2,
                             HELLO_TIMEOUT="2", HEARTBEAT="30", EVENT_RATE="1000", EVENT_BURST="1000")
    yield instance
    instance.stop()
