"""Revoked device certificates end to end (PROTOCOL.md section 6, "Revoked certificates"): TLS_CRL_FILE on a real
two-worker gateway with mutual TLS.

A certificate the CRL lists is refused on DEVICE_TLS_PORT (error `banned`), MQTT_TLS_PORT (CONNACK 0x05, stock
paho) and HTTPS_PORT (the API and /ws), also when it resumes a TLS session made before it was revoked; the others are
welcome. Rewriting the file in place ends exactly the live sessions whose certificates it now revokes, with `banned`,
within 10 s, on whichever worker holds them; the rest stay. Start-up with a bad file is test_tls_gateway_startup.py.
"""

from __future__ import annotations

import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from wsproto.utilities import RemoteProtocolError

from app.auth import mint
from clients.device import Closed
from support.devices import expect_closed, expect_error, ping_ok, uid
from support.gateways import SECRET, Gateway, counted, start_gateway
from support.rabbitmq import EventTap
from support.tls_devices import PahoTls, Pki, TlsDevice, refused_before_welcome
from support.waiting import WAIT, wait_until

WORKERS = 2
VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
AT_HANDSHAKE = 'warren_crl_refusals_total{at="handshake"}'
AT_RELOAD = 'warren_crl_refusals_total{at="reload"}'
_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.DOTALL)


@dataclass
class Device:
    """A device id, the file with its key and certificate (which names it by CN), and its serial."""

    id: str
    file: str
    serial: int

    def context(self, pki: Pki, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        return pki.client_context(self.file, version)


def certified(pki: Pki) -> Device:
    device = uid("crl")
    path = pki.device_cert(device)
    leaf = x509.load_pem_x509_certificate(_CERTIFICATE.search(Path(path).read_bytes()).group(0))
    return Device(device, path, leaf.serial_number)


@dataclass
class CrlFile:
    """TLS_CRL_FILE: the device CA's CRL, rewritten in place (as an operator's `cp` does) with a new number."""

    pki: Pki
    path: Path
    serials: set[int] = field(default_factory=set)
    number: int = 0

    def write(self, next_update: timedelta = timedelta(days=7)) -> None:
        ca = self.pki.device_ca
        now = datetime.now(UTC)
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject)
                   .last_update(now - timedelta(days=30)).next_update(now + next_update)
                   .add_extension(x509.CRLNumber(self.number), critical=False))
        for serial in sorted(self.serials):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
        key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
        self.path.write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        self.number += 1

    def revoke(self, gateway: Gateway, *devices: Device, wait: bool = True,
               next_update: timedelta = timedelta(days=7)) -> None:
        """Add `devices` to the CRL; with `wait`, return once every worker has loaded it."""
        self.serials.update(device.serial for device in devices)
        self.rewrite(gateway, lambda: self.write(next_update), "loaded again" if wait else None)

    def rewrite(self, gateway: Gateway, write: Callable[[], object], logged: str | None) -> None:
        """`write()` the file; with `logged`, return once every worker has logged it (reloaded, or refused)."""
        before = gateway.log().count(logged) if logged else 0
        write()
        if logged:
            wait_until(lambda: gateway.log().count(logged) >= before + WORKERS, timeout=WAIT)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def crl(pki: Pki) -> CrlFile:
    crl = CrlFile(pki, pki.root / "devices.crl")
    crl.write()  # nothing revoked yet
    return crl


@pytest.fixture(scope="module")
def crl_gw(tmp_path_factory: pytest.TempPathFactory, pki: Pki, crl: CrlFile) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("crl"), workers=WORKERS,
                            **pki.tls_env(TLS_CLIENT_CA_FILE=pki.path("device-ca.pem"), TLS_CRL_FILE=str(crl.path)))
    yield gateway
    gateway.stop()


def port(gateway: Gateway, variable: str = "DEVICE_TLS_PORT") -> int:
    return int(gateway.env[variable])


def welcomed(gateway: Gateway, pki: Pki, device: Device, **options: object) -> TlsDevice:
    client = TlsDevice(port(gateway), device.context(pki), **options)
    welcome = client.hello_without_token(device.id)
    assert welcome["type"] == "welcome", welcome
    return client


def test_a_revoked_certificate_is_refused_on_every_tls_port_and_others_are_welcome(crl_gw: Gateway, pki: Pki,
                                                                                  crl: CrlFile) -> None:
    revoked, kept = certified(pki), certified(pki)
    crl.revoke(crl_gw, revoked)
    refusals = counted(crl_gw, AT_HANDSHAKE)
    # DEVICE_TLS_PORT: the hello is answered `banned`, with or without a valid token.
    for token in (None, mint(SECRET.encode(), revoked.id)):
        with TlsDevice(port(crl_gw), revoked.context(pki)) as client:
            client.send({"type": "hello", "device": revoked.id, "v": 1, **({"token": token} if token else {})})
            expect_error(client, "banned")
            expect_closed(client)
    welcomed(crl_gw, pki, kept).close()
    # MQTT_TLS_PORT, stock paho: CONNACK 0x05 (section 8's code for banned).
    for device, connack in ((revoked, "Not authorized"), (kept, "Success")):
        client = PahoTls(port(crl_gw, "MQTT_TLS_PORT"), device.context(pki), device.id)
        try:
            assert client.connack() == connack
        finally:
            client.close()
    # HTTPS_PORT: the connection closes before any answer, for the API as for /ws.
    https, ca = f"https://127.0.0.1:{port(crl_gw, 'HTTPS_PORT')}", pki.path("server-ca.pem")
    with pytest.raises(requests.RequestException):
        requests.get(f"{https}/healthz", verify=ca, cert=revoked.file, timeout=WAIT)
    assert requests.get(f"{https}/healthz", verify=ca, cert=kept.file, timeout=WAIT).status_code == 200

    def over_wss() -> object:
        try:
            client = TlsDevice(port(crl_gw, "HTTPS_PORT"), revoked.context(pki), path="/ws")
        except RemoteProtocolError as exc:  # the connection closed where the upgrade's answer should be
            raise Closed(f"closed before the upgrade's answer: {exc}") from None
        with client:
            return client.hello_without_token(revoked.id)

    refused_before_welcome(over_wss)
    wait_until(lambda: counted(crl_gw, AT_HANDSHAKE) >= refusals + 5, timeout=WAIT)


@pytest.mark.parametrize("version", list(VERSIONS))
def test_a_revoked_device_that_resumes_a_tls_session_is_refused(crl_gw: Gateway, pki: Pki, crl: CrlFile,
                                                                version: str) -> None:
    """A resumption verifies no certificate: the one its session carries is checked against the CRL in force."""
    device = certified(pki)
    context = device.context(pki, VERSIONS[version])
    with TlsDevice(port(crl_gw), context) as client:
        assert client.hello_without_token(device.id)["type"] == "welcome"
        ticket = client.tls.session
    with TlsDevice(port(crl_gw), context, session=ticket) as client:  # the ticket resumes, on either worker
        assert client.hello_without_token(device.id)["type"] == "welcome"
        assert client.tls.session_reused
        ticket = client.tls.session
    crl.revoke(crl_gw, device)
    for _ in range(WORKERS + 1):  # whichever worker accepts it
        with TlsDevice(port(crl_gw), context, session=ticket) as client:
            assert client.tls.session_reused
            answer = client.hello_without_token(device.id)
            assert (answer["type"], answer["code"]) == ("error", "banned"), answer
            expect_closed(client)


def test_rewriting_the_crl_ends_exactly_the_revoked_live_sessions_with_banned(crl_gw: Gateway, pki: Pki,
                                                                              crl: CrlFile) -> None:
    second, third, over_mqtt = certified(pki), certified(pki), certified(pki)
    ended = counted(crl_gw, AT_RELOAD)
    with (welcomed(crl_gw, pki, second) as second_client, welcomed(crl_gw, pki, third) as third_client,
          EventTap(f"{second.id}.session.closed") as closed):
        mqtt = PahoTls(port(crl_gw, "MQTT_TLS_PORT"), over_mqtt.context(pki), over_mqtt.id)
        gone = threading.Event()
        mqtt.client.on_disconnect = lambda *args: gone.set()
        try:
            assert mqtt.connack() == "Success"
            written = time.monotonic()
            crl.revoke(crl_gw, second, over_mqtt, wait=False)
            banned = expect_error(second_client, "banned", timeout=10)  # the contract: within 10 s of the change
            assert time.monotonic() - written < 10, banned
            expect_closed(second_client)
            assert gone.wait(10), "the revoked MQTT session was not ended"
        finally:
            mqtt.close()
        assert closed.get()["data"] == {"reason": "banned"}
        ping_ok(third_client)  # the third device's session stays, on whichever worker it is
        time.sleep(1)
        ping_ok(third_client)
    wait_until(lambda: counted(crl_gw, AT_RELOAD) >= ended + 2, timeout=WAIT)
    assert "warren_crl_stale 0.0" in requests.get(f"{crl_gw.http}/metrics", timeout=WAIT).text


def test_a_bad_file_after_start_up_keeps_the_crl_in_force_loudly_and_a_stale_one_stays_in_force(
        crl_gw: Gateway, pki: Pki, crl: CrlFile) -> None:
    revoked, kept, bystander = certified(pki), certified(pki), certified(pki)
    crl.revoke(crl_gw, revoked)
    with welcomed(crl_gw, pki, bystander) as live:
        for bad in (b"-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n", b""):
            crl.rewrite(crl_gw, lambda bad=bad: crl.path.write_bytes(bad), "STAYS IN FORCE")
            assert counted(crl_gw, "warren_crl_file_bad") == 1
            with TlsDevice(port(crl_gw), revoked.context(pki)) as client:
                assert client.hello_without_token(revoked.id)["code"] == "banned"
            welcomed(crl_gw, pki, kept).close()
        assert "ERROR warren.crl" in crl_gw.log()
        # A CRL past its next update: enforced, and said (log and metric).
        crl.revoke(crl_gw, next_update=-timedelta(hours=1))
        assert counted(crl_gw, "warren_crl_file_bad") == 0
        wait_until(lambda: counted(crl_gw, "warren_crl_stale") == 1, timeout=WAIT)
        assert "past its next update" in crl_gw.log()
        with TlsDevice(port(crl_gw), revoked.context(pki)) as client:
            assert client.hello_without_token(revoked.id)["code"] == "banned"
        welcomed(crl_gw, pki, kept).close()
        crl.revoke(crl_gw)  # fresh again
        wait_until(lambda: counted(crl_gw, "warren_crl_stale") == 0, timeout=WAIT)
        ping_ok(live)  # none of it ended a session whose certificate stays good
