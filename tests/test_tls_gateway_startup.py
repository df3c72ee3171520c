"""A TLS configuration Warren cannot serve stops `gunicorn -c gunicorn.conf.py wsgi:app` at start, with a
message naming the variable (PROTOCOL.md section 1, "TLS"): never a gateway that serves plaintext, or an expired
certificate, where the operator asked for TLS."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from support.gateways import AMQP_URL, ROOT, SECRET, free_port, start_gateway
from support.tls_devices import Pki, leaf

GUNICORN = str(Path(sys.executable).parent / "gunicorn")


def crl_of(ca: trustme.CA) -> bytes:
    """An empty CRL of `ca`, signed with its key."""
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject
    now = datetime.now(UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer).last_update(now)
               .next_update(now + timedelta(days=7)))
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki.make(tmp_path_factory.mktemp("pki"))
    pki.write("expired.pem", leaf(pki.server_ca, "localhost", [x509.DNSName("localhost")], days=(-30, -1),
                                  key_file=pki.root / "expired.key"))
    pki.write("other.key", trustme.CA().issue_cert("localhost").private_key_pem.bytes())
    pki.write("leaf-as-ca.pem", pki.device_ca.issue_cert(common_name="lock-0001").cert_chain_pems[0].bytes())
    pki.write("device.crl", crl_of(pki.device_ca))
    pki.write("foreign.crl", crl_of(trustme.CA()))
    return pki


def start(tmp_path: Path, *options: str, **variables: str) -> tuple[int, str]:
    """Run gunicorn as a user does, with `variables` in its environment; (exit status, output) once it exits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TLS_", "AMQP_", "PROMETHEUS_"))
           and k not in {"DEVICE_TLS_PORT", "MQTT_TLS_PORT", "HTTPS_PORT", "GUNICORN_CMD_ARGS"}}
    env.update({"PORT": str(free_port()), "DEVICE_PORT": str(free_port()), "MQTT_PORT": str(free_port()),
                "WEB_CONCURRENCY": "1", "AMQP_URL": AMQP_URL, "DEVICE_SECRETS": SECRET, "BIND_HOST": "127.0.0.1",
                "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"), **variables})
    try:
        result = subprocess.run([GUNICORN, "-c", "gunicorn.conf.py", *options, "wsgi:app"], cwd=ROOT, env=env,
                                capture_output=True, timeout=30, check=False)
    except subprocess.TimeoutExpired as exc:  # it started (and was killed): the refusal is missing
        pytest.fail(f"gunicorn did not stop: {(exc.stdout or b'').decode(errors='replace')[-2000:]}")
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace")


def tls(pki: Pki, **variables: str) -> dict[str, str]:
    return pki.tls_env(**variables)


def mtls(pki: Pki, **variables: str) -> dict[str, str]:
    return pki.tls_env(TLS_CLIENT_CA_FILE=pki.path("device-ca.pem"), **variables)


# case -> (the environment, what the message must say)
REFUSALS: dict[str, tuple[Callable[[Pki], dict[str, str]], tuple[str, ...]]] = {
    "unreadable TLS_CERT_FILE": (lambda pki: tls(pki, TLS_CERT_FILE=pki.path("no-such.pem")),
                                 ("TLS_CERT_FILE=", "cannot be read")),
    "a key that does not match": (lambda pki: tls(pki, TLS_KEY_FILE=pki.path("other.key")),
                                  ("TLS_KEY_FILE=", "does not match")),
    "an expired certificate": (lambda pki: tls(pki, TLS_CERT_FILE=pki.path("expired.pem"),
                                               TLS_KEY_FILE=pki.path("expired.key")),
                               ("TLS_CERT_FILE=", "expired on")),
    "a client CA that is not a CA": (lambda pki: tls(pki, TLS_CLIENT_CA_FILE=pki.path("leaf-as-ca.pem")),
                                     ("TLS_CLIENT_CA_FILE=", "not a CA")),
    "DEVICE_TLS_PORT without TLS": (lambda pki: {"DEVICE_TLS_PORT": str(free_port())},
                                    ("DEVICE_TLS_PORT=", "TLS_CERT_FILE")),
    "MQTT_TLS_PORT without TLS": (lambda pki: {"MQTT_TLS_PORT": str(free_port())}, ("MQTT_TLS_PORT=", "TLS_CERT_FILE")),
    "HTTPS_PORT without TLS": (lambda pki: {"HTTPS_PORT": str(free_port())}, ("HTTPS_PORT=", "TLS_CERT_FILE")),
    "TLS_CLIENT_CA_FILE without TLS": (lambda pki: {"TLS_CLIENT_CA_FILE": pki.path("device-ca.pem")},
                                       ("TLS_CLIENT_CA_FILE=", "TLS_CERT_FILE")),
    # TLS_CRL_FILE (PROTOCOL.md section 6, "Revoked certificates")
    "an unreadable TLS_CRL_FILE": (lambda pki: mtls(pki, TLS_CRL_FILE=pki.path("no-such.crl")),
                                   ("TLS_CRL_FILE=", "cannot be read")),
    "a TLS_CRL_FILE that is not a CRL": (lambda pki: mtls(pki, TLS_CRL_FILE=pki.path("device-ca.pem")),
                                         ("TLS_CRL_FILE=", "holds no PEM CRL")),
    "a CRL of another CA": (lambda pki: mtls(pki, TLS_CRL_FILE=pki.path("foreign.crl")),
                            ("TLS_CRL_FILE=", "not a CA of TLS_CLIENT_CA_FILE")),
    "TLS_CRL_FILE without TLS_CLIENT_CA_FILE": (lambda pki: tls(pki, TLS_CRL_FILE=pki.path("device.crl")),
                                                ("TLS_CRL_FILE=", "needs TLS_CLIENT_CA_FILE")),
    "TLS_CRL_FILE without TLS": (lambda pki: {"TLS_CRL_FILE": pki.path("device.crl")},
                                 ("TLS_CRL_FILE=", "TLS_CERT_FILE")),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_tls_configuration_stops_start_up_naming_its_variable(tmp_path: Path, pki: Pki, case: str) -> None:
    environment, says = REFUSALS[case]
    status, output = start(tmp_path, **environment(pki))
    assert status != 0, output
    assert all(words in output for words in says), output
    assert "Listening at" not in output, output


def test_gunicorns_own_certfile_and_keyfile_stop_start_up_saying_what_to_set(tmp_path: Path, pki: Pki) -> None:
    status, output = start(tmp_path, "--certfile", pki.path("server.pem"), "--keyfile", pki.path("server.key"))
    assert status != 0, output
    says = f"set TLS_CERT_FILE={pki.path('server.pem')} and TLS_KEY_FILE={pki.path('server.key')} in the environment"
    assert says in output, output
    assert "Listening at" not in output, output  # it never served plaintext, even for a moment


def test_the_same_start_with_good_files_serves(tmp_path: Path, pki: Pki) -> None:
    """The control: what the refusals change is the configuration, and "Listening at" is what serving logs."""
    gateway = start_gateway(tmp_path, workers=1, **tls(pki, TLS_CLIENT_CA_FILE=pki.path("device-ca.pem")))
    try:
        assert "Listening at" in gateway.log()
    finally:
        gateway.stop()
