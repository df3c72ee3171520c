"""Mutual TLS end to end (PROTOCOL.md section 1, "TLS"): TLS_CLIENT_CA_FILE on a real two-worker gateway.

On DEVICE_TLS_PORT and MQTT_TLS_PORT a device must present a certificate of that CA, which names it (CN only,
DNS SAN or URI SAN) so that it may omit its token; on HTTPS_PORT a certificate is optional: the API serves
clients without one, and a WebSocket device that has one is named by it. MQTT over TLS with a stock paho.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

import pytest
import requests
import trustme

from app.auth import mint
from bench.stampede import mqtt_codec as mqtt_client
from clients.device import Closed
from support.devices import answer_next_command, expect_closed, expect_error, in_background, uid
from support.gateways import API_TOKEN, SECRET, Gateway, counted, start_gateway
from support.rabbitmq import EventTap
from support.tls_devices import PahoTls, Pki, TlsDevice, leaf, reaches, refused_before_welcome
from support.waiting import WAIT

REFUSED = 'warren_tls_handshakes_total{outcome="refused"}'
VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
KINDS = {"cn": "cn", "dns": "dns", "uri": "urn:warren:dev"}  # kind -> a device id prefix it can name


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_gw(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("mtls"), workers=2,
                            **pki.tls_env(TLS_CLIENT_CA_FILE=pki.path("device-ca.pem")))
    yield gateway
    gateway.stop()


def port(gateway: Gateway, variable: str = "DEVICE_TLS_PORT") -> int:
    return int(gateway.env[variable])


def https(gateway: Gateway) -> str:
    return f"https://127.0.0.1:{port(gateway, 'HTTPS_PORT')}"


def token(device: str) -> str:
    return mint(SECRET.encode(), device)


def certified(pki: Pki, kind: str = "cn") -> tuple[str, ssl.SSLContext]:
    """A fresh device id and a client context presenting a certificate that names it by `kind`."""
    device = uid(KINDS[kind])
    return device, pki.client_context(pki.device_cert(device, kind))


# -- the device ports require a certificate of the CA ----------------------------------------

def json_attempt(gateway: Gateway, context: ssl.SSLContext, device: str):
    def attempt() -> object:
        with TlsDevice(port(gateway), context) as client:
            return client.hello(device, SECRET)  # with a valid token: it does not stand in for the certificate
    return attempt


def mqtt_attempt(gateway: Gateway, context: ssl.SSLContext, device: str):
    def attempt() -> object:
        raw = socket.create_connection(("127.0.0.1", port(gateway, "MQTT_TLS_PORT")), timeout=WAIT)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(mqtt_client.connect(device, token(device)))
            answer = tls.recv(4)
            if not answer:
                raise Closed("closed without a CONNACK")
            return answer
    return attempt


def presented(pki: Pki, certificate: str, device: str) -> str | None:
    """The certificate file a device presents: none, one of another CA, or an expired one of the right CA."""
    if certificate == "none":
        return None
    if certificate == "another CA's":
        return pki.device_cert(device, ca=trustme.CA())
    return pki.write(f"expired-{device}.pem", leaf(pki.device_ca, device, days=(-30, -1)))


@pytest.mark.parametrize("version", list(VERSIONS))
@pytest.mark.parametrize("certificate", ["none", "another CA's", "expired"])
@pytest.mark.parametrize("listener", ["DEVICE_TLS_PORT", "MQTT_TLS_PORT"])
def test_a_device_port_refuses_a_device_without_a_certificate_of_the_ca(mtls_gw: Gateway, pki: Pki, listener: str,
                                                                        certificate: str, version: str) -> None:
    device = uid("nocert")
    context = pki.client_context(presented(pki, certificate, device), VERSIONS[version])
    refused = counted(mtls_gw, REFUSED)
    make = json_attempt if listener == "DEVICE_TLS_PORT" else mqtt_attempt
    # TLS 1.2 fails in the client's handshake; TLS 1.3 at its first read (the server verifies after the client's Finished).
    refused_before_welcome(make(mtls_gw, context, device))
    reaches(mtls_gw, REFUSED, refused + 1)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_certificate_names_its_device_and_the_token_may_be_omitted(mtls_gw: Gateway, pki: Pki, kind: str) -> None:
    device, context = certified(pki, kind)
    with EventTap(f"{device}.session.connected") as tap, TlsDevice(port(mtls_gw), context) as client:
        welcome = client.hello_without_token(device)
        assert welcome["type"] == "welcome" and welcome["device"] == device, welcome
        assert tap.get()["data"] == {"transport": "tls"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_certificate_for_another_device_is_unauthorized(mtls_gw: Gateway, pki: Pki, kind: str) -> None:
    _, context = certified(pki, kind)
    other = uid("other") if kind == "cn" else "not-the-device-name"  # a SAN names the device, never the CN
    for send_token in (False, True):  # a valid token for the other device does not help
        with TlsDevice(port(mtls_gw), context) as client:
            client.send({"type": "hello", "device": other, "v": 1, **({"token": token(other)} if send_token else {})})
            expect_error(client, "unauthorized")
            expect_closed(client)


@pytest.mark.parametrize("wrong", ["00" * 32, "another device's"])
def test_a_wrong_token_is_unauthorized_with_the_right_certificate(mtls_gw: Gateway, pki: Pki, wrong: str) -> None:
    device, context = certified(pki)
    with TlsDevice(port(mtls_gw), context) as client:
        client.send({"type": "hello", "device": device, "v": 1,
                     "token": token(uid()) if wrong == "another device's" else wrong})
        expect_error(client, "unauthorized")
        expect_closed(client)


@pytest.mark.parametrize("version", list(VERSIONS))
@pytest.mark.parametrize("listener,path", [("DEVICE_TLS_PORT", None), ("HTTPS_PORT", "/ws")])
def test_a_resumed_session_is_still_named_by_its_certificate(mtls_gw: Gateway, pki: Pki, version: str, listener: str,
                                                             path: str | None) -> None:
    """A resumption sends no certificate: the name must come from the ticket's session."""
    device = uid("dns")
    context = pki.client_context(pki.device_cert(device, "dns"), VERSIONS[version])
    ticket = None
    for reconnect in range(4):
        with TlsDevice(port(mtls_gw, listener), context, path=path, session=ticket) as client:
            assert client.hello_without_token(device)["type"] == "welcome"
            assert client.tls.session_reused == (reconnect > 0)
            ticket = client.tls.session


def test_the_certificate_and_a_valid_token_together_are_welcome(mtls_gw: Gateway, pki: Pki) -> None:
    device, context = certified(pki)
    with TlsDevice(port(mtls_gw), context) as client:
        assert client.hello(device, SECRET)["type"] == "welcome"


# -- HTTPS_PORT: a certificate is asked for, never required --------------------------------------

def test_https_serves_the_api_without_a_client_certificate(mtls_gw: Gateway, pki: Pki) -> None:
    ca = pki.path("server-ca.pem")
    assert requests.get(f"{https(mtls_gw)}/healthz", verify=ca, timeout=WAIT).json() == {"status": "ok"}
    device, context = certified(pki)
    with TlsDevice(port(mtls_gw), context) as client:
        assert client.hello_without_token(device)["type"] == "welcome"
        answer = in_background(requests.post, f"{https(mtls_gw)}/devices/{device}/commands", verify=ca,
                               json={"name": "unlock", "data": {"door": 1}, "timeout": 5},
                               headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=WAIT)
        assert answer_next_command(client)["name"] == "unlock"
        response = answer.result(WAIT)
    assert response.status_code == 200 and response.json()["ok"] is True, response.text


def test_a_wss_device_is_named_by_its_certificate(mtls_gw: Gateway, pki: Pki) -> None:
    device, context = certified(pki, "dns")
    with (EventTap(f"{device}.session.connected") as tap,
          TlsDevice(port(mtls_gw, "HTTPS_PORT"), context, path="/ws") as client):
        assert client.hello_without_token(device)["type"] == "welcome"
        assert tap.get()["data"] == {"transport": "wss"}
    # Without a certificate, a wss device is welcome with its token only.
    without = uid("wss")
    with TlsDevice(port(mtls_gw, "HTTPS_PORT"), pki.client_context(), path="/ws") as client:
        refusal = client.hello_without_token(without)
        assert (refusal["type"], refusal["code"]) == ("error", "unauthorized"), refusal
    with TlsDevice(port(mtls_gw, "HTTPS_PORT"), pki.client_context(), path="/ws") as client:
        assert client.hello(without, SECRET)["type"] == "welcome"


# -- MQTT over TLS, stock paho ---------------------------------------------------------------

@pytest.mark.parametrize("websocket,transport", [(False, "mqtts"), (True, "mqtt-wss")])
def test_paho_over_tls_with_a_certificate_needs_no_password(mtls_gw: Gateway, pki: Pki, websocket: bool,
                                                            transport: str) -> None:
    device, context = certified(pki)
    listener = "HTTPS_PORT" if websocket else "MQTT_TLS_PORT"
    with EventTap(f"{device}.session.connected") as tap:
        client = PahoTls(port(mtls_gw, listener), context, device, websocket=websocket)
        try:
            assert client.connack() == "Success"
            assert tap.get()["data"] == {"transport": transport, "mqtt": 4}
        finally:
            client.close()


def test_paho_over_wss_without_a_certificate_connects_with_its_token(mtls_gw: Gateway, pki: Pki) -> None:
    device = uid("wssmq")
    with EventTap(f"{device}.session.connected") as tap:
        client = PahoTls(port(mtls_gw, "HTTPS_PORT"), pki.client_context(), device, password=token(device),
                         websocket=True)
        try:
            assert client.connack() == "Success"
            assert tap.get()["data"] == {"transport": "mqtt-wss", "mqtt": 4}
        finally:
            client.close()


@pytest.mark.parametrize("case", ["another device's certificate", "a wrong password"])
def test_paho_is_not_authorized_by_a_certificate_alone(mtls_gw: Gateway, pki: Pki, case: str) -> None:
    device, context = certified(pki)
    if case == "another device's certificate":
        device = uid("other")
    client = PahoTls(port(mtls_gw, "MQTT_TLS_PORT"), context, device,
                     password=token(device) if case == "another device's certificate" else "00" * 32)
    try:
        assert client.connack() == "Not authorized"
    finally:
        client.close()
