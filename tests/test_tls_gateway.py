"""The TLS listeners end to end (PROTOCOL.md section 1, "TLS"): gunicorn started as a user starts it, with
TLS_CERT_FILE/TLS_KEY_FILE and every TLS port on a free port, against the real RabbitMQ.

JSON over TLS and the plain ports beside it, what `openssl s_client` may negotiate, session resumption across
workers and across a restart, HELLO_TIMEOUT over handshake and hello, and a stampede of handshakes beside held
sessions. Mutual TLS, HTTPS and MQTT over TLS are in test_tls_gateway_mtls.py; start-up refusals in
test_tls_gateway_startup.py.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
import requests
from gevent.event import Event

from app.auth import mint
from bench.stampede import mqtt_codec as mqtt_client
from clients.device import Closed, DeviceClient
from support.devices import ping_ok, uid
from support.gateways import SECRET, Gateway, counted, start_gateway
from support.rabbitmq import EventTap
from support.tls_devices import Pki, TlsDevice, reaches, read_to_end, s_client, worker_of
from support.waiting import WAIT, wait_until

HELLO_TIMEOUT = 2.0  # the `quick` gateway's
RESUMED, FULL = 'warren_tls_handshakes_total{outcome="resumed"}', 'warren_tls_handshakes_total{outcome="full"}'
REFUSED, TIMED_OUT = 'warren_tls_handshakes_total{outcome="refused"}', 'warren_tls_handshakes_total{outcome="timeout"}'
HELLO_TIMEOUTS = 'warren_errors_sent_total{code="hello_timeout"}'
VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_gw(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Gateway]:
    """Two workers, TLS on DEVICE_TLS_PORT, MQTT_TLS_PORT and HTTPS_PORT, no client CA."""
    gateway = start_gateway(tmp_path_factory.mktemp("tls"), workers=2, **pki.tls_env())
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Gateway]:
    """One worker with a short HELLO_TIMEOUT."""
    gateway = start_gateway(tmp_path_factory.mktemp("quick"), workers=1, HELLO_TIMEOUT=str(HELLO_TIMEOUT),
                            **pki.tls_env())
    yield gateway
    gateway.stop()


def port(gateway: Gateway, variable: str = "DEVICE_TLS_PORT") -> int:
    return int(gateway.env[variable])


def hello_line(device: str) -> bytes:
    return b'{"type":"hello","device":"%s","token":"%s","v":1}\n' % (device.encode(), mint(SECRET.encode(),
                                                                                              device).encode())


# -- JSON over TLS, and the plain ports beside it ---------------------------------------------

def test_json_over_tls_is_welcomed_and_present_as_tls(tls_gw: Gateway, pki: Pki) -> None:
    device = uid("tls")
    with EventTap(f"{device}.session.connected") as tap, TlsDevice(port(tls_gw), pki.client_context()) as client:
        welcome = client.hello(device, SECRET)
        assert welcome["type"] == "welcome" and welcome["device"] == device, welcome
        ping_ok(client)
        assert tap.get()["data"] == {"transport": "tls"}


# What a plaintext client sends first on each TLS listener.
PLAINTEXT = {
    "DEVICE_TLS_PORT": hello_line,
    "MQTT_TLS_PORT": lambda device: mqtt_client.connect(device, mint(SECRET.encode(), device)),
    "HTTPS_PORT": lambda device: b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
}


@pytest.mark.parametrize("listener", list(PLAINTEXT))
def test_a_plaintext_client_on_a_tls_port_never_reaches_a_session(tls_gw: Gateway, pki: Pki, listener: str) -> None:
    device = uid("plain")
    refused = counted(tls_gw, REFUSED)
    with EventTap(f"{device}.session.*") as tap:
        with socket.create_connection(("127.0.0.1", port(tls_gw, listener)), timeout=WAIT) as sock:
            sock.sendall(PLAINTEXT[listener](device))
            answer = read_to_end(sock)
        # At most a TLS alert record: never a welcome, a CONNACK or an HTTP answer.
        assert b"welcome" not in answer and b"HTTP/" not in answer and not answer.startswith(b"\x20"), answer
        reaches(tls_gw, REFUSED, refused + 1)
        # Nothing reached presence: the first event for this device is the TLS session that follows.
        with TlsDevice(port(tls_gw), pki.client_context()) as client:
            assert client.hello(device, SECRET)["type"] == "welcome"
            first = tap.get()
        assert first["_routing_key"] == f"{device}.session.connected" and first["data"] == {"transport": "tls"}


def test_openssl_s_client_is_refused_tls_1_1(tls_gw: Gateway) -> None:
    refused = counted(tls_gw, REFUSED)
    # SECLEVEL=0: OpenSSL 3 would not even offer TLS 1.1 otherwise, and the refusal must be the server's.
    result = s_client(port(tls_gw), "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", "-brief")
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode != 0 and "CONNECTION ESTABLISHED" not in output, output
    assert "protocol version" in output, output  # the server's protocol_version alert
    reaches(tls_gw, REFUSED, refused + 1)


@pytest.mark.parametrize("flag,version", [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_openssl_s_client_speaks_json_over_tls(tls_gw: Gateway, pki: Pki, flag: str, version: str) -> None:
    # A hello with a bad token: the gateway answers `unauthorized` and closes, which ends s_client.
    result = s_client(port(tls_gw), flag, "-brief", "-CAfile", pki.path("server-ca.pem"), "-verify_return_error",
                      send=b'{"type":"hello","device":"lock-ossl","token":"00","v":1}\n')
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert "CONNECTION ESTABLISHED" in output and f"Protocol version: {version}" in output, output
    assert '"code":"unauthorized"' in output, output


def test_the_plain_ports_stay_plaintext(tls_gw: Gateway) -> None:
    for url in (tls_gw.tcp, tls_gw.ws):
        with DeviceClient(url, timeout=WAIT) as client:
            assert client.hello(uid("plain"), SECRET)["type"] == "welcome"
    assert requests.get(f"{tls_gw.http}/healthz", timeout=WAIT).json() == {"status": "ok"}
    for plain in (tls_gw.device_port, tls_gw.port, tls_gw.mqtt_port):
        result = s_client(plain, "-brief")
        assert "CONNECTION ESTABLISHED" not in (result.stdout + result.stderr).decode(errors="replace")


# -- session resumption ---------------------------------------------------------------------

def welcomed(port_: int, context: ssl.SSLContext, device: str, session: Any = None) -> tuple[dict, Any, bool]:
    """(welcome, the session's ticket to resume next time, whether this handshake resumed)."""
    with TlsDevice(port_, context, session=session) as client:
        welcome = client.hello(device, SECRET)
        assert welcome["type"] == "welcome", welcome
        return welcome, client.tls.session, client.tls.session_reused


@pytest.mark.parametrize("version", list(VERSIONS))
def test_every_reconnect_resumes_on_whichever_worker_accepts_it(tls_gw: Gateway, pki: Pki, version: str) -> None:
    context, device = pki.client_context(version=VERSIONS[version]), uid("resume")
    resumed = counted(tls_gw, RESUMED)
    _, ticket, reused = welcomed(port(tls_gw), context, device)
    assert not reused
    workers: set[int] = set()
    reconnects = 0
    # Until each worker has resumed some (the kernel picks the accepting worker), and at least ten.
    while reconnects < 10 or len(workers) < 2:
        assert reconnects < 200, f"in {reconnects} reconnects, only worker(s) {workers} accepted"
        welcome, ticket, reused = welcomed(port(tls_gw), context, device, ticket)
        reconnects += 1
        assert reused, f"reconnect {reconnects} paid a full handshake on worker {worker_of(tls_gw, welcome['session'])}"
        workers.add(worker_of(tls_gw, welcome["session"]))
    assert workers == set(tls_gw.worker_pids())
    reaches(tls_gw, RESUMED, resumed + reconnects)


def test_after_a_restart_an_old_ticket_does_not_resume(tmp_path: Path, pki: Pki) -> None:
    """A new master makes new ticket keys (app/tls.py): each device pays one full handshake after a restart."""
    env, context, device = pki.tls_env(), pki.client_context(), uid("restart")
    before = start_gateway(tmp_path, workers=1, **env)
    try:
        _, ticket, _ = welcomed(port(before), context, device)
        _, ticket, reused = welcomed(port(before), context, device, ticket)
        assert reused  # the ticket is good on the instance that issued it
    finally:
        before.stop()
    after = start_gateway(tmp_path, workers=1, **env)  # same certificate, key and TLS ports
    try:
        _, _, reused = welcomed(port(after), context, device, ticket)
        assert not reused
        assert (counted(after, FULL), counted(after, RESUMED)) == (1, 0)
    finally:
        after.stop()


def served_serial(gateway: Gateway, pki: Pki) -> str:
    with TlsDevice(port(gateway), pki.client_context()) as client:
        return client.tls.getpeercert()["serialNumber"]


def test_a_renewed_certificate_is_served_after_a_sighup(tmp_path: Path) -> None:
    """Certificate renewal in place (the same paths, as certbot does), then `kill -HUP` the master."""
    pki = Pki.make(tmp_path)
    gateway = start_gateway(tmp_path, workers=1, **pki.tls_env())
    try:
        old_serial, old_workers = served_serial(gateway, pki), set(gateway.worker_pids())
        renewed = pki.server_ca.issue_cert("localhost", "127.0.0.1")
        pki.write("server.pem", b"".join(blob.bytes() for blob in renewed.cert_chain_pems))
        pki.write("server.key", renewed.private_key_pem.bytes())
        gateway.process.send_signal(signal.SIGHUP)
        wait_until(lambda: gateway.worker_pids() and not old_workers & set(gateway.worker_pids()), WAIT)
        assert served_serial(gateway, pki) != old_serial
    finally:
        gateway.stop()


# -- HELLO_TIMEOUT covers the handshake and the hello -----------------------------------------

@pytest.mark.parametrize("listener", list(PLAINTEXT))
def test_a_client_that_sends_nothing_is_closed_and_counted(quick: Gateway, listener: str) -> None:
    timed_out = counted(quick, TIMED_OUT)
    with socket.create_connection(("127.0.0.1", port(quick, listener)), timeout=WAIT) as sock:
        assert read_to_end(sock, timeout=HELLO_TIMEOUT + WAIT) == b""
    reaches(quick, TIMED_OUT, timed_out + 1)


@pytest.mark.parametrize("listener", list(PLAINTEXT))
def test_a_handshake_without_a_hello_is_closed_at_the_hello_timeout(quick: Gateway, pki: Pki, listener: str) -> None:
    hello_timeouts, timed_out = counted(quick, HELLO_TIMEOUTS), counted(quick, TIMED_OUT)
    raw = socket.create_connection(("127.0.0.1", port(quick, listener)), timeout=WAIT)
    with pki.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
        answer = read_to_end(tls, timeout=HELLO_TIMEOUT + WAIT)
    if listener == "DEVICE_TLS_PORT":
        assert b'"code":"hello_timeout"' in answer, answer
    else:  # MQTT has no error packet; HTTPS closes a connection that sends no request line in time
        assert answer == b"", answer
    if listener != "HTTPS_PORT":
        reaches(quick, HELLO_TIMEOUTS, hello_timeouts + 1)
    assert counted(quick, TIMED_OUT) == timed_out  # the handshake itself was in time


def test_the_handshake_spends_the_hello_timeout_too(quick: Gateway, pki: Pki) -> None:
    """A hello sent within HELLO_TIMEOUT of the handshake but after HELLO_TIMEOUT from the accept is too late."""
    hello_timeouts = counted(quick, HELLO_TIMEOUTS)
    device = uid("late")
    with TlsDevice(port(quick), pki.client_context(), before_handshake=0.7 * HELLO_TIMEOUT) as client:
        time.sleep(0.6 * HELLO_TIMEOUT)
        with contextlib.suppress(OSError):  # the gateway may have closed already
            client.send({"type": "hello", "device": device, "token": mint(SECRET.encode(), device), "v": 1})
        try:
            answer = client.receive(timeout=WAIT)
        except (Closed, OSError):
            answer = None  # closed (a reset may lose the error frame): anything but a welcome
        assert answer is None or answer.get("code") == "hello_timeout", answer
    reaches(quick, HELLO_TIMEOUTS, hello_timeouts + 1)


# -- a worker full of TLS connections accepts again once they end ------------------------------

CAP = 1 + 256  # MAX_CONNECTIONS=1 plus app/tree.py's ACCEPT_HEADROOM: the accept cap of the `capped` worker


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("capped"), workers=1, MAX_CONNECTIONS="1", HELLO_TIMEOUT="8",
                            **pki.tls_env())
    yield gateway
    gateway.stop()


def test_a_worker_filled_by_tls_connections_accepts_again_when_they_end(capped: Gateway, pki: Pki) -> None:
    """Only TLS connections fill the worker; once they close, the TLS listener must resume (not stay paused)."""
    context = pki.client_context()
    fillers = gevent.joinall([gevent.spawn(TlsDevice, port(capped), context) for _ in range(CAP)], raise_error=True)
    late = gevent.spawn(lambda: TlsDevice(port(capped), context, timeout=WAIT).hello(uid("late"), SECRET))
    gevent.sleep(0.5)  # the late connect waits in the backlog while the worker is full (/metrics would too)
    assert not late.ready(), late.value
    for filler in fillers:
        filler.value.close()
    late.join(WAIT * 2)
    assert late.successful() and late.value["type"] == "welcome", late.exception or late.value


# -- a stampede of handshakes beside held sessions -----------------------------------------------

def keep_pinging(client: DeviceClient, stop: Event) -> int:
    """Ping until `stop`; every ping must get its pong. How many did."""
    pongs = 0
    while not stop.is_set():
        ping_ok(client)
        pongs += 1
        stop.wait(0.2)
    return pongs


def test_a_stampede_of_tls_connects_while_held_sessions_ping(tls_gw: Gateway, pki: Pki) -> None:
    context, count = pki.client_context(), 300
    timed_out, hello_timeouts = counted(tls_gw, TIMED_OUT), counted(tls_gw, HELLO_TIMEOUTS)
    held = [TlsDevice(port(tls_gw), context) for _ in range(20)]
    for client in held:
        assert client.hello(uid("held"), SECRET)["type"] == "welcome"
    stop, go = Event(), Event()
    pingers = [gevent.spawn(keep_pinging, client, stop) for client in held]

    def connect(number: int) -> dict[str, Any]:
        go.wait()
        with TlsDevice(port(tls_gw), context, timeout=60) as client:
            return client.hello(f"herd-{number}-{uid()}", SECRET)

    herd = [gevent.spawn(connect, number) for number in range(count)]
    go.set()
    gevent.joinall(herd, timeout=90)
    answers = [greenlet.value if greenlet.successful() else repr(greenlet.exception) for greenlet in herd]
    missing = [answer for answer in answers if not (isinstance(answer, dict) and answer.get("type") == "welcome")]
    assert not missing, f"{len(missing)} of {count} got no welcome, e.g. {missing[:3]}"
    stop.set()
    gevent.joinall(pingers, timeout=WAIT)
    assert all(pinger.successful() and pinger.value > 0 for pinger in pingers), [p.exception for p in pingers]
    for client in held:
        ping_ok(client)  # still open
        client.close()
    assert (counted(tls_gw, TIMED_OUT), counted(tls_gw, HELLO_TIMEOUTS)) == (timed_out, hello_timeouts)
