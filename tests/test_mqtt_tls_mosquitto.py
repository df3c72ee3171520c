"""MQTT over TLS with the real mosquitto clients (PROTOCOL.md sections 1 and 8).

`mosquitto_pub --cafile` on MQTT_TLS_PORT with its token, and, with
TLS_CLIENT_CA_FILE set, with a device certificate and no password at all.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from support.gateways import Gateway, start_gateway
from support.mqtt_devices import token
from support.rabbitmq import EventTap
from support.tls_devices import Pki
from support.waiting import WAIT


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_gateway(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("mtls"), workers=1,
                            **pki.tls_env(TLS_CLIENT_CA_FILE=pki.path("device-ca.pem")))
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("tls"), workers=1, **pki.tls_env())
    yield gateway
    gateway.stop()


def mosquitto_pub(gateway: Gateway, pki: Pki, device: str, *credentials: str) -> subprocess.CompletedProcess:
    binary = shutil.which("mosquitto_pub")
    if binary is None:
        pytest.fail("mosquitto_pub is not installed (Debian's mosquitto-clients)")
    return subprocess.run(
        [binary, "-h", "127.0.0.1", "-p", gateway.env["MQTT_TLS_PORT"], "-V", "mqttv311", "--cafile",
         pki.path("server-ca.pem"), "-i", device, *credentials, "-q", "1", "-t", "events/door.opened",
         "-m", '{"battery": 97}'], capture_output=True, text=True, timeout=WAIT + 10, check=False)


def device_id() -> str:
    return f"mqtls-{uuid.uuid4().hex[:10]}"


def test_mosquitto_pub_over_tls_with_its_token(tls_gateway: Gateway, pki: Pki) -> None:
    device = device_id()
    with EventTap(f"{device}.#") as tap:
        done = mosquitto_pub(tls_gateway, pki, device, "-u", "sdk", "-P", token(device))
        assert done.returncode == 0, done.stderr  # at QoS 1 it waits for the PUBACK
        assert tap.get(f"{device}.session.connected")["data"] == {"transport": "mqtts", "mqtt": 4}
        assert tap.get(f"{device}.door.opened")["data"] == {"battery": 97}


def test_mosquitto_pub_with_a_device_certificate_and_no_password(mtls_gateway: Gateway, pki: Pki) -> None:
    device = device_id()
    cert = pki.device_cert(device)
    with EventTap(f"{device}.#") as tap:
        done = mosquitto_pub(mtls_gateway, pki, device, "--cert", cert, "--key", cert)
        assert done.returncode == 0, done.stderr
        assert tap.get(f"{device}.door.opened")["data"] == {"battery": 97}


def test_mosquitto_pub_without_a_certificate_is_refused_under_mutual_tls(mtls_gateway: Gateway, pki: Pki) -> None:
    device = device_id()
    with EventTap(f"{device}.#") as tap:
        done = mosquitto_pub(mtls_gateway, pki, device, "-u", "sdk", "-P", token(device))
        assert done.returncode != 0
        with pytest.raises(pytest.fail.Exception):  # the handshake failed: nothing reached a session
            tap.get(timeout=1.0)
