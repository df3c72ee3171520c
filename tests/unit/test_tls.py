"""TLS settings, contexts, device names and handshakes (app/tls.py, app/tls_handshake.py), over loopback.

Certificates come from trustme. Servers are greenlets of this process, except in the
resumption test, which forks two, as gunicorn forks its workers.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import ssl
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import gevent
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from gevent import monkey
from gunicorn.config import Config as GunicornConfig

from app.config import ConfigError
from app.tls.contexts import (
    certificate_names,
    certificate_names_device,
    check_gunicorn_ssl,
    device_context,
    https_context,
    load_tls,
)
from app.tls.handshake import HandshakeGate, TlsHandshakeError, handshake

NOW = datetime.now(UTC)
HELLO = b'{"type":"hello","device":"lock-0001","token":"00","v":1}\n'


def _encrypted(key_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(b"secret"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths: the server's chain and key, its CA, the client CA, device certificates, and broken files."""
    root = tmp_path_factory.mktemp("pki")
    ca, device_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    files = {
        "cert": b"".join(blob.bytes() for blob in server.cert_chain_pems),
        "key": server.private_key_pem.bytes(),
        "ca": ca.cert_pem.bytes(),
        "client_ca": device_ca.cert_pem.bytes(),
        "other_key": ca.issue_cert("localhost").private_key_pem.bytes(),
        "expired": ca.issue_cert("localhost", not_before=NOW - timedelta(days=30),
                                 not_after=NOW - timedelta(days=1)).cert_chain_pems[0].bytes(),
        "future": ca.issue_cert("localhost", not_before=NOW + timedelta(days=1)).cert_chain_pems[0].bytes(),
        "garbage": b"not a PEM file\n",
        "encrypted_key": _encrypted(server.private_key_pem.bytes()),
        "leaf_as_ca": device_ca.issue_cert("lock-0001").cert_chain_pems[0].bytes(),
        "device": device_ca.issue_cert("lock-0001").private_key_and_cert_chain_pem.bytes(),
        "stranger": trustme.CA().issue_cert("lock-0001").private_key_and_cert_chain_pem.bytes(),
    }
    paths = {"missing": str(root / "no-such-file")}
    for name, data in files.items():
        (root / name).write_bytes(data)
        paths[name] = str(root / name)
    return paths


def _env(pki: dict[str, str], **variables: str) -> dict[str, str]:
    return {"TLS_CERT_FILE": pki["cert"], "TLS_KEY_FILE": pki["key"], **variables}


# -- load_tls ---------------------------------------------------------------------------

def test_without_cert_and_key_tls_is_off() -> None:
    assert load_tls({}) is None
    assert load_tls({"DEVICE_TLS_PORT": "", "MQTT_TLS_PORT": "", "HTTPS_PORT": ""}) is None


def test_ports_default_and_the_empty_string_disables(pki: dict[str, str]) -> None:
    settings = load_tls(_env(pki))
    assert (settings.device_tls_port, settings.mqtt_tls_port, settings.https_port) == (7879, 8883, None)
    settings = load_tls(_env(pki, DEVICE_TLS_PORT="", MQTT_TLS_PORT="9883", HTTPS_PORT="8443"))
    assert settings.ports == {"MQTT_TLS_PORT": 9883, "HTTPS_PORT": 8443}
    assert settings.cert_not_after > NOW


BAD = [  # (environment from the pki paths, the variable the error must name, words of its message)
    (lambda p: {"TLS_CERT_FILE": p["cert"]}, "TLS_KEY_FILE", "not set"),
    (lambda p: {"TLS_KEY_FILE": p["key"]}, "TLS_CERT_FILE", "not set"),
    (lambda p: {"DEVICE_TLS_PORT": "7879"}, "DEVICE_TLS_PORT", "TLS is not configured"),
    (lambda p: {"MQTT_TLS_PORT": "8883"}, "MQTT_TLS_PORT", "TLS is not configured"),
    (lambda p: {"HTTPS_PORT": "8443"}, "HTTPS_PORT", "TLS is not configured"),
    (lambda p: {"TLS_CLIENT_CA_FILE": p["client_ca"]}, "TLS_CLIENT_CA_FILE", "TLS is not configured"),
    (lambda p: _env(p, TLS_CERT_FILE=p["missing"]), "TLS_CERT_FILE", "cannot be read"),
    (lambda p: _env(p, TLS_CERT_FILE=p["garbage"]), "TLS_CERT_FILE", "not a PEM certificate"),
    (lambda p: _env(p, TLS_CERT_FILE=p["future"]), "TLS_CERT_FILE", "not valid until"),
    (lambda p: _env(p, TLS_KEY_FILE=p["missing"]), "TLS_KEY_FILE", "cannot be read"),
    (lambda p: _env(p, TLS_KEY_FILE=p["garbage"]), "TLS_KEY_FILE", "not a PEM private key"),
    (lambda p: _env(p, TLS_KEY_FILE=p["cert"]), "TLS_KEY_FILE", "not a PEM private key"),
    (lambda p: _env(p, TLS_KEY_FILE=p["encrypted_key"]), "TLS_KEY_FILE", "encrypted"),
    (lambda p: _env(p, TLS_KEY_FILE=p["other_key"]), "TLS_KEY_FILE", "does not match"),
    (lambda p: _env(p, TLS_CLIENT_CA_FILE=p["missing"]), "TLS_CLIENT_CA_FILE", "cannot be read"),
    (lambda p: _env(p, TLS_CLIENT_CA_FILE=p["garbage"]), "TLS_CLIENT_CA_FILE", "not a PEM certificate"),
    (lambda p: _env(p, TLS_CLIENT_CA_FILE=p["leaf_as_ca"]), "TLS_CLIENT_CA_FILE", "not a CA"),
    (lambda p: _env(p, DEVICE_TLS_PORT="tls"), "DEVICE_TLS_PORT", "port number"),
    (lambda p: _env(p, HTTPS_PORT="70000"), "HTTPS_PORT", "between 1 and 65535"),
    (lambda p: _env(p, DEVICE_TLS_PORT="8883"), "MQTT_TLS_PORT", "is also DEVICE_TLS_PORT"),
]


@pytest.mark.parametrize(("make_env", "variable", "words"), BAD, ids=[f"{v}-{w}" for _, v, w in BAD])
def test_every_validation_error_names_its_variable(pki: dict[str, str], make_env: Callable, variable: str,
                                                    words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_tls(make_env(pki))
    assert caught.value.variable == variable
    assert words in str(caught.value)


def test_an_expired_certificate_says_when(pki: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="expired on") as caught:
        load_tls(_env(pki, TLS_CERT_FILE=pki["expired"]))
    assert caught.value.variable == "TLS_CERT_FILE"
    assert (NOW - timedelta(days=1)).strftime("%Y-%m-%d") in str(caught.value)


def test_a_tls_port_on_a_plain_listeners_port_is_refused(pki: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="is also PORT") as caught:
        load_tls(_env(pki, HTTPS_PORT="8000"), plain_ports={"PORT": 8000, "DEVICE_PORT": None})
    assert caught.value.variable == "HTTPS_PORT"


@pytest.mark.parametrize(("setting", "instead"), [
    ("certfile", "TLS_CERT_FILE"), ("keyfile", "TLS_KEY_FILE"), ("ca_certs", "TLS_CLIENT_CA_FILE")])
def test_gunicorns_own_tls_settings_stop_start_up(pki: dict[str, str], setting: str, instead: str) -> None:
    check_gunicorn_ssl(GunicornConfig())
    cfg = GunicornConfig()
    cfg.set(setting, pki["cert"])
    with pytest.raises(ConfigError, match=instead) as caught:
        check_gunicorn_ssl(cfg)
    assert caught.value.variable == setting


# -- servers and clients over loopback --------------------------------------------------------

def _listen() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener


def _serve_one(listener: socket.socket, context: ssl.SSLContext, timeout: float = 5.0,
               gate: HandshakeGate | None = None) -> list[str]:
    """Accept one connection, shake hands, send back the names the client certificate gave it."""
    conn, _ = listener.accept()
    tls = handshake(conn, context, timeout, gate)
    names = list(certificate_names(tls.getpeercert()))
    tls.sendall(json.dumps(names).encode() + b"\n")
    tls.recv(1)  # until the client closes
    tls.close()
    return names


def _server(context: ssl.SSLContext, timeout: float = 5.0,
            gate: HandshakeGate | None = None) -> tuple[int, gevent.Greenlet]:
    listener = _listen()
    return listener.getsockname()[1], gevent.spawn(_serve_one, listener, context, timeout, gate)


def _client_context(pki: dict[str, str], cert: str | None = None,
                    version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki["ca"])
    if cert:
        context.load_cert_chain(pki[cert])
    if version:
        context.minimum_version = context.maximum_version = version
    return context


def _talk(context: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None) -> tuple[list, bool, Any]:
    """Connect, read the server's line; (names it saw, whether the session was resumed, the session)."""
    with (socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
          context.wrap_socket(raw, server_hostname="localhost", session=session) as tls):
        line = tls.makefile("rb").readline()
        return json.loads(line), tls.session_reused, tls.session


def _refused_by_server(context: ssl.SSLContext, client: ssl.SSLContext) -> TlsHandshakeError:
    port, server = _server(context)
    with pytest.raises((ssl.SSLError, OSError, json.JSONDecodeError)):
        _talk(client, port)
    with pytest.raises(TlsHandshakeError) as caught:
        server.get(timeout=5)
    return caught.value


@pytest.fixture(scope="module")
def mutual(pki: dict[str, str]) -> Any:
    return load_tls(_env(pki, TLS_CLIENT_CA_FILE=pki["client_ca"]))


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("make", [device_context, https_context])
def test_contexts_accept_tls_1_2_and_1_3(pki: dict[str, str], make: Callable, version: ssl.TLSVersion) -> None:
    port, server = _server(make(load_tls(_env(pki))))
    assert _talk(_client_context(pki, version=version), port)[0] == []
    server.get(timeout=5)


def test_contexts_refuse_tls_1_1(pki: dict[str, str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # asking for TLS 1.1 at all is deprecated
        client = _client_context(pki, version=ssl.TLSVersion.TLSv1_1)
    client.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 offers TLS 1.1 at security level 0 only
    for make in (device_context, https_context):
        refusal = _refused_by_server(make(load_tls(_env(pki))), client)
        assert refusal.reason == "refused", refusal


def test_mutual_tls_names_the_device(pki: dict[str, str], mutual: Any) -> None:
    port, server = _server(device_context(mutual))
    assert _talk(_client_context(pki, "device"), port)[0] == ["lock-0001"]
    assert server.get(timeout=5) == ["lock-0001"]


@pytest.mark.parametrize("cert", [None, "stranger"])
def test_device_port_refuses_a_device_without_a_certificate_of_the_ca(pki: dict[str, str], mutual: Any,
                                                                        cert: str | None) -> None:
    refusal = _refused_by_server(device_context(mutual), _client_context(pki, cert))
    assert refusal.reason == "refused"
    assert "certificate" in str(refusal)


def test_https_port_asks_for_a_certificate_without_requiring_one(pki: dict[str, str], mutual: Any) -> None:
    port, server = _server(https_context(mutual))
    assert _talk(_client_context(pki), port)[0] == []
    server.get(timeout=5)
    port, server = _server(https_context(mutual))
    assert _talk(_client_context(pki, "device"), port)[0] == ["lock-0001"]
    server.get(timeout=5)


def test_an_https_session_cannot_be_resumed_past_mutual_tls(pki: dict[str, str], mutual: Any) -> None:
    client = _client_context(pki)
    port, server = _server(https_context(mutual))
    session = _talk(client, port)[2]
    server.get(timeout=5)
    port, server = _server(device_context(mutual))
    with pytest.raises((ssl.SSLError, OSError, json.JSONDecodeError)):
        _talk(client, port, session)
    with pytest.raises(TlsHandshakeError, match="certificate"):
        server.get(timeout=5)


# -- handshake failures -----------------------------------------------------------------

def test_a_client_that_sends_nothing_times_out(pki: dict[str, str]) -> None:
    port, server = _server(device_context(load_tls(_env(pki))), timeout=0.2)
    with socket.create_connection(("127.0.0.1", port)), pytest.raises(TlsHandshakeError) as caught:
        server.get(timeout=5)
    assert caught.value.reason == "timeout"


def test_the_deadline_covers_the_whole_handshake_however_slowly_it_drips(pki: dict[str, str]) -> None:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = _client_context(pki).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    client_hello = outgoing.read()
    port, server = _server(device_context(load_tls(_env(pki))), timeout=0.3)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        for index in range(len(client_hello)):  # one byte each 20 ms: each wait is short, the sum is not
            if server.dead:
                break
            raw.sendall(client_hello[index:index + 1])
            gevent.sleep(0.02)
        with pytest.raises(TlsHandshakeError) as caught:
            server.get(timeout=5)
    assert caught.value.reason == "timeout"


def test_a_plaintext_hello_on_a_tls_port_never_gets_past_the_handshake(pki: dict[str, str]) -> None:
    port, server = _server(device_context(load_tls(_env(pki))))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(HELLO)
        with pytest.raises(TlsHandshakeError, match="not TLS") as caught:
            server.get(timeout=5)
        with contextlib.suppress(ConnectionResetError):  # the rest of the hello was never read: a reset
            while raw.recv(4096):  # at most a TLS alert, then the end: never an answer to the hello
                pass
    assert caught.value.reason == "refused"


def test_a_standard_context_is_refused_because_it_would_block_the_hub(pki: dict[str, str]) -> None:
    standard = monkey.get_original("ssl", "SSLContext")(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(TypeError, match="blocks the hub"):
        handshake(socket.socket(), standard, 1.0)


# -- resumption across gunicorn's fork --------------------------------------------------

def _fork_server(listener: socket.socket, others: list[socket.socket], make_context: Callable) -> int:
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        for other in others:
            if other is not listener:
                other.close()
        listener.settimeout(10)  # a client that never comes must not leave the child behind
        _serve_one(listener, make_context())
        status = 0
    finally:
        os._exit(status)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
@pytest.mark.parametrize("built", ["before the fork", "in each worker"])
def test_a_session_from_one_worker_resumes_on_another(pki: dict[str, str], mutual: Any, version: ssl.TLSVersion,
                                                      built: str) -> None:
    context = device_context(mutual)
    make_context = (lambda: context) if built == "before the fork" else (lambda: device_context(mutual))
    listeners = [_listen(), _listen()]
    pids = [_fork_server(listener, listeners, make_context) for listener in listeners]
    ports = [listener.getsockname()[1] for listener in listeners]
    for listener in listeners:
        listener.close()
    client = _client_context(pki, "device", version)
    names, reused, session = _talk(client, ports[0])
    assert (names, reused) == (["lock-0001"], False)
    names, reused, _ = _talk(client, ports[1], session)
    assert [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids] == [0, 0]
    assert names == ["lock-0001"]  # a resumed session still names its device
    assert reused is (built == "before the fork")


# -- device names -----------------------------------------------------------------------

def _peercert(cn: str | None = None, *sans: tuple[str, str]) -> dict[str, Any]:
    cert: dict[str, Any] = {"subject": ((("organizationName", "Acme"),),) + (((("commonName", cn),),) if cn else ())}
    if sans:
        cert["subjectAltName"] = sans
    return cert


@pytest.mark.parametrize(("peercert", "names"), [
    (_peercert("lock-0001"), ("lock-0001",)),
    (_peercert("ignored", ("DNS", "lock-0001"), ("DNS", "lock-0002")), ("lock-0001", "lock-0002")),
    (_peercert("ignored", ("URI", "urn:dev:lock-0001")), ("urn:dev:lock-0001",)),
    (_peercert("lock-0001", ("IP Address", "10.0.0.1"), ("email", "a@b.c")), ("lock-0001",)),
    (_peercert(None), ()),
    ({}, ()),  # a certificate the context did not verify
    (None, ()),  # no certificate
])
def test_names_come_from_dns_or_uri_sans_else_the_cn(peercert: Any, names: tuple[str, ...]) -> None:
    assert certificate_names(peercert) == names


def test_a_certificate_names_a_device_by_exact_comparison() -> None:
    cert = _peercert("lock-0009", ("DNS", "lock-0001"), ("DNS", "*"))
    assert certificate_names_device(cert, "lock-0001")
    assert not certificate_names_device(cert, "LOCK-0001")
    assert not certificate_names_device(cert, "lock-0002")  # neither a wildcard
    assert not certificate_names_device(cert, "lock-0009")  # nor the CN when there are SANs
    assert not certificate_names_device(_peercert(""), "")


# -- the handshake gate -----------------------------------------------------------------

def test_the_gate_lets_per_turn_steps_through_a_turn_in_arrival_order() -> None:
    gate, loop, passed = HandshakeGate(per_turn=2, max_waiting=100), gevent.get_hub().loop, []

    def step(index: int) -> None:
        gate.enter(time.monotonic() + 5)
        passed.append((index, loop.iteration))

    gevent.joinall([gevent.spawn(step, index) for index in range(8)], raise_error=True)
    assert [index for index, _ in passed] == list(range(8))
    assert max(collections.Counter(turn for _, turn in passed).values()) == 2


def test_handshakes_through_a_gate_all_complete(pki: dict[str, str]) -> None:
    gate, context = HandshakeGate(per_turn=1), device_context(load_tls(_env(pki)))
    servers = [_server(context, gate=gate) for _ in range(4)]
    clients = [gevent.spawn(_talk, _client_context(pki), port) for port, _ in servers]
    assert [client.get(timeout=5)[0] for client in clients] == [[]] * 4
    gevent.joinall([server for _, server in servers], raise_error=True)


def test_a_step_with_no_time_left_for_a_turn_times_out() -> None:
    gate = HandshakeGate(per_turn=1)
    gate.enter(time.monotonic() + 5)
    with pytest.raises(TlsHandshakeError) as caught:
        gate.enter(time.monotonic() - 1)
    assert caught.value.reason == "timeout"


def test_a_full_gate_pauses_accept_until_it_has_room() -> None:
    rooms: list[int] = []
    gate = HandshakeGate(per_turn=1, max_waiting=2, on_room=lambda: rooms.append(gate.waiting))
    gate.enter(time.monotonic() + 5)
    steps = [gevent.spawn(gate.enter, time.monotonic() + 5) for _ in range(3)]
    gevent.sleep(0)  # the three are waiting for a turn now
    assert (gate.waiting, gate.full()) == (3, True)
    gevent.joinall(steps, raise_error=True)
    assert not gate.full()
    assert rooms == [1]
