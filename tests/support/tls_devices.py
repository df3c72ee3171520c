"""TLS peers for the end-to-end TLS tests (test_tls_gateway*.py): a PKI, JSON devices over TLS and wss, paho over
TLS, `openssl s_client`, and the worker that served a session (from the gateway's log).

clients/device.py dials plain sockets only, so `TlsDevice` is its `DeviceClient` over a socket wrapped here.
"""

from __future__ import annotations

import re
import ssl
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clients.device import Closed, DeviceClient
from support.gateways import Gateway, counted, free_port
from support.waiting import WAIT, wait_until

SERVER_NAME = "localhost"


@dataclass
class Pki:
    """A server CA and the gateway's certificate for localhost and 127.0.0.1; a CA for device certificates."""

    root: Path
    server_ca: trustme.CA
    device_ca: trustme.CA

    @classmethod
    def make(cls, root: Path) -> Pki:
        pki = cls(root, trustme.CA(), trustme.CA())
        server = pki.server_ca.issue_cert(SERVER_NAME, "127.0.0.1")
        pki.write("server.pem", b"".join(blob.bytes() for blob in server.cert_chain_pems))
        pki.write("server.key", server.private_key_pem.bytes())
        pki.write("server-ca.pem", pki.server_ca.cert_pem.bytes())
        pki.write("device-ca.pem", pki.device_ca.cert_pem.bytes())
        return pki

    def path(self, name: str) -> str:
        return str(self.root / name)

    def write(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return self.path(name)

    def tls_env(self, **variables: str) -> dict[str, str]:
        """start_gateway's keyword arguments for TLS on every TLS listener, each on a free port."""
        return {"TLS_CERT_FILE": self.path("server.pem"), "TLS_KEY_FILE": self.path("server.key"),
                "DEVICE_TLS_PORT": str(free_port()), "MQTT_TLS_PORT": str(free_port()),
                "HTTPS_PORT": str(free_port()), **variables}

    def device_cert(self, device: str, kind: str = "cn", ca: trustme.CA | None = None) -> str:
        """A file with the key and chain of a device certificate naming `device` by `kind`: its CN only,
        a DNS SAN or a URI SAN."""
        ca = ca or self.device_ca
        if kind == "cn":
            pem = ca.issue_cert(common_name=device).private_key_and_cert_chain_pem.bytes()
        elif kind == "dns":
            pem = ca.issue_cert(device, common_name="not-the-device-name").private_key_and_cert_chain_pem.bytes()
        elif kind == "uri":  # trustme makes no URI SANs
            pem = leaf(ca, "not-the-device-name", [x509.UniformResourceIdentifier(device)])
        else:
            raise ValueError(kind)
        return self.write(f"device-{kind}-{device}.pem", pem)

    def client_context(self, cert: str | None = None, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        """What a device trusts: the server CA; with `cert`, it presents that certificate."""
        context = ssl.create_default_context(cafile=self.path("server-ca.pem"))
        if version is not None:
            context.minimum_version = context.maximum_version = version
        if cert is not None:
            context.load_cert_chain(cert)
        return context


def leaf(ca: trustme.CA, common_name: str, sans: Sequence[x509.GeneralName] = (), days: tuple[int, int] = (-1, 30),
         key_file: Path | None = None) -> bytes:
    """A leaf certificate signed by `ca`, valid from `days[0]` to `days[1]` from now; PEM key then certificate.

    With `key_file`, the key goes there and the result is the certificate alone."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(issuer.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now + timedelta(days=days[0])).not_valid_after(now + timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    cert_pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    if key_file is not None:
        key_file.write_bytes(key_pem)
        return cert_pem
    return key_pem + cert_pem


class TlsDevice(DeviceClient):
    """A `DeviceClient` over TLS: JSON lines on DEVICE_TLS_PORT, or with `path` a WebSocket on HTTPS_PORT.

    `session` is a TLS session (ticket) from an earlier connection, to resume; `before_handshake` seconds pass
    between the connect and the ClientHello."""

    def __init__(self, port: int, context: ssl.SSLContext, path: str | None = None,
                 session: ssl.SSLSession | None = None, timeout: float = WAIT, before_handshake: float = 0) -> None:
        super().__init__(f"tcp://127.0.0.1:{port}", timeout)  # connects and sends nothing
        time.sleep(before_handshake)
        self.sock = context.wrap_socket(self.sock, server_hostname=SERVER_NAME, session=session)
        if path is not None:
            self.websocket = True
            self._upgrade(f"127.0.0.1:{port}", path)

    @property
    def tls(self) -> ssl.SSLSocket:
        return self.sock

    def hello_without_token(self, device: str) -> dict[str, Any]:
        self.send({"type": "hello", "device": device, "v": 1})
        return self.receive()


def refused_before_welcome(attempt: Any) -> str:
    """Run `attempt()` (connect, hello, read); the way it failed. It must fail before any welcome."""
    try:
        answer = attempt()
    except ssl.SSLError as exc:
        return f"TLS alert: {exc.reason or exc}"
    except (Closed, ConnectionError, TimeoutError) as exc:
        return f"closed: {exc}"
    raise AssertionError(f"the gateway answered instead of refusing the handshake: {answer}")


def read_to_end(sock: Any, timeout: float = WAIT) -> bytes:
    """Everything the server sends until it closes (EOF or reset); TimeoutError if it never does."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return data
        if not chunk:
            return data
        data += chunk


class PahoTls:
    """A stock paho-mqtt client over TLS (tls_set_context), on MQTT_TLS_PORT or `/mqtt` on HTTPS_PORT."""

    def __init__(self, port: int, context: ssl.SSLContext, device: str, password: str | None = None,
                 websocket: bool = False) -> None:
        self.codes: list[str] = []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=device, protocol=paho.MQTTv311,
                                  transport="websockets" if websocket else "tcp", reconnect_on_failure=False)
        if websocket:
            self.client.ws_set_options(path="/mqtt")
        if password is not None:
            self.client.username_pw_set("sdk-user", password)
        self.client.tls_set_context(context)
        self.client.on_connect = lambda c, u, flags, code, p: self.codes.append(str(code))
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()

    def connack(self) -> str:
        return wait_until(lambda: self.codes[:1], WAIT)[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def s_client(port: int, *options: str, send: bytes = b"") -> subprocess.CompletedProcess:
    """`openssl s_client` (the real binary) to 127.0.0.1:port; `send` is its stdin, read until the server closes."""
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", SERVER_NAME, *options]
    if send:
        command.append("-ign_eof")
    return subprocess.run(command, input=send, capture_output=True, timeout=WAIT, check=False)


_OPENED = re.compile(r"\[(\d+)\] INFO warren\.registry: session opened device=\S+ session=(\w+)")


def worker_of(gateway: Gateway, session: str) -> int:
    """The pid of the worker whose log line says it opened `session`."""
    def logged() -> int | None:
        return next((int(pid) for pid, opened in _OPENED.findall(gateway.log()) if opened == session), None)

    return wait_until(logged, WAIT)


def reaches(gateway: Gateway, metric: str, value: float) -> None:
    """Wait until `metric` is `value`: a refused or timed-out handshake is counted just after its close."""
    deadline = time.monotonic() + WAIT
    while (now := counted(gateway, metric)) != value:
        assert time.monotonic() < deadline, f"{metric} is {now}, not {value}"
        time.sleep(0.05)
