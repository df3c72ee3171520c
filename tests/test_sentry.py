"""Sentry: a real sentry-sdk in real gunicorn workers, reporting to a local envelope receiver.

The receiver is a tiny HTTP server (POST /api/<project>/envelope/) and the DSN
is http://public@127.0.0.1:<port>/1. A session crash is reported once, tagged
with device, session and worker pid; expected protocol errors never are.
"""

from __future__ import annotations

import gzip
import json
import os
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clients.device import Closed, DeviceClient
from support.gateways import ROOT, SECRET, start_gateway
from support.waiting import wait_until


class SentryReceiver:
    """Collects the events (and messages) of every envelope POSTed to it."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding == "br":
                    import brotli  # only if sentry-sdk found it installed

                    body = brotli.decompress(body)
                if self.path.startswith("/api/") and self.path.endswith("/envelope/"):
                    receiver._take(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self.server.server_address[1]}/1"

    def _take(self, body: bytes) -> None:
        """Parse an envelope: a header line, then (item header, payload) pairs."""
        _header, _, rest = body.partition(b"\n")
        while rest.strip():
            item_line, _, rest = rest.partition(b"\n")
            item = json.loads(item_line)
            if "length" in item:
                payload, rest = rest[:item["length"]], rest[item["length"] + 1:]
            else:
                payload, _, rest = rest.partition(b"\n")
            if item.get("type") == "event":
                with self.lock:
                    self.events.append(json.loads(payload))

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.events)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def tags(event: dict) -> dict:
    raw = event.get("tags") or {}
    return dict(raw) if isinstance(raw, dict) else {k: v for k, v in raw}


def exception_types(event: dict) -> list[str]:
    return [value.get("type") for value in (event.get("exception") or {}).get("values", [])]


@pytest.fixture(scope="module")
def receiver() -> Iterator[SentryReceiver]:
    instance = SentryReceiver()
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def sentry_gateway(tmp_path_factory, receiver):
    tmp = tmp_path_factory.mktemp("sentry")
    (tmp / "sitecustomize.py").write_text(FAULT_INJECTION)
    pythonpath = os.pathsep.join([str(tmp), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    instance = start_gateway(tmp, workers=2, SENTRY_DSN=receiver.dsn, SENTRY_ENVIRONMENT="ci",
                             SOURCE_VERSION="abc123", HELLO_TIMEOUT="2", PYTHONPATH=pythonpath)
    yield instance
    instance.stop()


# A crash that no input can cause must still be caught, tagged and reported once. No frame
# crashes a session on purpose (that would be a bug, and the protocol fuzz tests hunt for
# those), so the test injects one into the real gunicorn workers from outside app/: a
# sitecustomize module on PYTHONPATH wraps protocol.validate so that a frame of type
# "test.crash" raises inside the session greenlet, exactly where a bug would.
FAULT_INJECTION = """
import app.protocol as _protocol

_validate = _protocol.validate


def _validate_or_crash(frame):
    if frame.get("type") == "test.crash":
        raise RuntimeError("injected fault: a bug in a session")
    return _validate(frame)


_protocol.validate = _validate_or_crash
"""


def refused(device: DeviceClient) -> str:
    """The error code of a refusal, or "closed" when the close overtook the frame (WebSocket)."""
    try:
        return device.receive(timeout=10)["code"]
    except Closed:
        return "closed"


def test_session_crash_is_reported_once_with_tags_and_protocol_errors_are_not(sentry_gateway, receiver):
    gateway = sentry_gateway
    # Expected protocol errors first: wrong tokens, bad hellos, bad frames, oversized... none reported.
    for transport in ("tcp", "ws"):
        with DeviceClient(gateway.url(transport)) as device:
            device.send({"type": "hello", "device": "lock-bad", "token": "00" * 32, "v": 1})
            assert refused(device) in {"unauthorized", "closed"}
        with DeviceClient(gateway.url(transport)) as device:
            device.send(b"not json at all")
            assert refused(device) in {"unauthorized", "closed"}
        with DeviceClient(gateway.url(transport)) as device:
            assert device.hello(f"lock-ok-{transport}", SECRET)["type"] == "welcome"
            for frame in (b"{", b"[1,2]", b'{"type":"nope"}', b'{"type":"event","id":"x"}',
                          b'{"type":"event","id":"e","name":"session.closed"}',
                          b'{"type":"reply","id":"c-1","ok":true}'):
                device.send(frame)
                answer = device.receive()
                assert answer["type"] == "error", answer
            device.send({"type": "ping"})
            assert device.receive() == {"type": "pong"}

    # A crash of one session (see FAULT_INJECTION).
    with DeviceClient(gateway.tcp) as device:
        welcome = device.hello("lock-crash", SECRET)
        assert welcome["type"] == "welcome"
        device.send({"type": "test.crash"})
        with pytest.raises((Closed, ConnectionError)):
            while True:
                device.receive(timeout=10)

    # The other sessions of that worker live on: nothing a device sends crashes more than its session.
    with DeviceClient(gateway.tcp) as device:
        assert device.hello("lock-after", SECRET)["type"] == "welcome"
        device.send({"type": "ping"})
        assert device.receive() == {"type": "pong"}

    def crash_events() -> list[dict]:
        return [e for e in receiver.snapshot() if "RuntimeError" in exception_types(e)]

    wait_until(crash_events, timeout=15)
    time.sleep(1.5)  # time for a duplicate, had there been one
    events = receiver.snapshot()
    crashes = crash_events()
    assert len(crashes) == 1, [exception_types(e) for e in events]
    crash = crashes[0]
    crash_tags = tags(crash)
    assert crash_tags["device"] == "lock-crash"
    assert crash_tags["session"] == welcome["session"]
    assert int(crash_tags["worker_pid"]) in gateway.worker_pids()
    assert crash_tags["supervisor"] == "connections"
    assert crash["environment"] == "ci"
    assert crash["release"] == "abc123"
    # Nothing else: no event for the unauthorized hellos, bad frames or protocol errors.
    assert events == crashes, [(exception_types(e), e.get("message")) for e in events]

    # A graceful shutdown (SIGTERM, as on every deploy) with live sessions reports nothing either.
    devices = [DeviceClient(gateway.url(transport)) for transport in ("tcp", "ws") * 3]
    try:
        for number, device in enumerate(devices):
            assert device.hello(f"lock-drain-{number}", SECRET)["type"] == "welcome"
        assert gateway.stop() == 0
    finally:
        for device in devices:
            device.close()
    assert receiver.snapshot() == crashes, [(exception_types(e), e.get("message")) for e in receiver.snapshot()]


def test_supervisor_giving_up_is_its_own_event(receiver):
    """In-process: the real SupervisorReporter with a real sentry-sdk, and a supervisor that gives up."""
    import gevent
    import sentry_sdk

    from app import sentry, supervision
    from app.config import load

    before = len(receiver.snapshot())
    sentry.init_sentry(load({"SENTRY_DSN": receiver.dsn, "SENTRY_ENVIRONMENT": "ci"}))
    try:
        def crash() -> None:
            raise RuntimeError("broken child")

        tree = supervision.Supervisor("flaky", "one_for_one", max_restarts=2, max_seconds=60, children=[
            supervision.ChildSpec("crasher", lambda: gevent.spawn(crash))]).start()
        with pytest.raises(supervision.SupervisorGaveUp):
            tree.wait(timeout=10)
        sentry.flush()
        wait_until(lambda: [e for e in receiver.snapshot()[before:] if e.get("level") == "fatal"], timeout=10)
        new = receiver.snapshot()[before:]
        gave_up = [e for e in new if e.get("level") == "fatal"]
        assert len(gave_up) == 1
        assert tags(gave_up[0])["supervisor"] == "flaky"
        assert "gave up" in json.dumps(gave_up[0].get("message") or gave_up[0].get("logentry"))
        crashes = [e for e in new if "RuntimeError" in exception_types(e)]
        assert len(crashes) == 3  # the first exit and two restarts, each reported once
    finally:
        supervision.set_reporter(None)
        sentry_sdk.get_client().close()
        sentry_sdk.init()  # back to a disabled client
