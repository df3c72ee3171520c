"""Revoked device certificates, TLS_CRL_FILE (app/tls/crl.py; PROTOCOL.md section 6, "Revoked certificates").

CRLs are built with cryptography's CertificateRevocationListBuilder and signed with trustme CAs' keys; the
sessions a reload ends are real `Session`s over the unit tier's fakes; the resumption test shakes hands over
loopback with the gateway's own device context and handshake driver.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import gevent
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fakes import FakeConn, hello, make_registry, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from app.config import ConfigError
from app.handlers import refuse_revoked
from app.sessions.session import Session
from app.tls import crl
from app.tls.contexts import device_context, load_tls
from app.tls.crl import CrlError, CrlWatcher, certificate_id, parse
from app.tls.handshake import handshake
from app.transports.mqtt import MqttConnection
from bench.stampede import mqtt_codec as mqtt_client

NOW = datetime.now(UTC)


def ca_certificate(ca: trustme.CA) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.cert_pem.bytes())


def ca_key(ca: trustme.CA) -> Any:
    return serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)


def make_crl(ca: trustme.CA, serials: Sequence[int], next_update: timedelta = timedelta(days=7), number: int = 1,
             key: Any = None) -> bytes:
    """A PEM CRL of `ca` revoking `serials`; signed with `key` (default: the CA's own)."""
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_certificate(ca).subject)
               .last_update(NOW - timedelta(days=8)).next_update(NOW + next_update)
               .add_extension(x509.CRLNumber(number), critical=False))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - timedelta(hours=1)).build())
    return builder.sign(key or ca_key(ca), hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def device_der(ca: trustme.CA, name: str, serial: int | None = None) -> bytes:
    """A device certificate of `ca` (DER, as getpeercert(binary_form=True) gives it), with `serial` if given."""
    if serial is None:
        return x509.load_pem_x509_certificate(ca.issue_cert(common_name=name).cert_chain_pems[0].bytes()).public_bytes(
            serialization.Encoding.DER)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(ca_certificate(ca).subject).public_key(key.public_key()).serial_number(serial)
                   .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
                   .sign(ca_key(ca), hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.DER)


def serial_of(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture(scope="module")
def cas() -> tuple[trustme.CA, trustme.CA]:
    return trustme.CA(), trustme.CA()


@pytest.fixture(scope="module")
def devices(cas: tuple[trustme.CA, trustme.CA]) -> dict[str, bytes]:
    ca, _ = cas
    return {name: device_der(ca, name) for name in ("lock-1", "lock-2", "lock-3")}


# -- parse ------------------------------------------------------------------------------------

def test_a_listed_certificate_is_revoked_and_others_are_not(cas: Any, devices: dict[str, bytes]) -> None:
    ca, _ = cas
    revocations = parse(make_crl(ca, [serial_of(devices["lock-1"])]), [ca_certificate(ca)])
    assert certificate_id(devices["lock-1"]) in revocations
    assert certificate_id(devices["lock-2"]) not in revocations
    assert certificate_id(None) not in revocations and certificate_id(b"") is None
    assert [c.entries for c in revocations.crls] == [1] and revocations.crls[0].number == 1


def test_a_certificate_whose_issuer_has_no_crl_is_not_revoked(cas: Any) -> None:
    ca, other = cas
    revoked_serial = 0x1234567
    # Both CAs are trusted; only the first has a CRL, listing a serial the second CA's device also has.
    revocations = parse(make_crl(ca, [revoked_serial]), [ca_certificate(ca), ca_certificate(other)])
    assert certificate_id(device_der(ca, "lock-a", revoked_serial)) in revocations
    assert certificate_id(device_der(other, "lock-b", revoked_serial)) not in revocations


def test_several_crls_in_one_file_are_all_in_force(cas: Any, devices: dict[str, bytes]) -> None:
    ca, other = cas
    stranger = device_der(other, "lock-9")
    data = (b"# the device CA\n" + make_crl(ca, [serial_of(devices["lock-1"])]) + b"\nsome comment\n"
            + make_crl(other, [serial_of(stranger)]) + make_crl(ca, [serial_of(devices["lock-2"])], number=2))
    revocations = parse(data, [ca_certificate(ca), ca_certificate(other)])
    assert len(revocations.crls) == 3
    assert {certificate_id(devices["lock-1"]), certificate_id(devices["lock-2"]), certificate_id(stranger)} <= \
        revocations.revoked
    assert certificate_id(devices["lock-3"]) not in revocations


def test_a_crl_signed_by_another_key_is_refused(cas: Any) -> None:
    ca, other = cas
    forged = make_crl(ca, [1, 2], key=ca_key(other))  # the device CA's name, another CA's signature
    with pytest.raises(CrlError, match="signature does not verify"):
        parse(forged, [ca_certificate(ca), ca_certificate(other)])
    # One forged CRL among good ones spoils the file: nothing in it is trusted half-way.
    with pytest.raises(CrlError, match="CRL 2 of 2"):
        parse(make_crl(ca, [3]) + forged, [ca_certificate(ca)])


def test_a_crl_of_a_ca_that_is_not_in_the_ca_file_is_refused(cas: Any) -> None:
    ca, other = cas
    with pytest.raises(CrlError, match="not a CA of TLS_CLIENT_CA_FILE"):
        parse(make_crl(other, [1]), [ca_certificate(ca)])


@pytest.mark.parametrize("data", [b"", b"garbage\n", b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"])
def test_garbage_is_a_crl_error(cas: Any, data: bytes) -> None:
    with pytest.raises(CrlError):
        parse(data, [ca_certificate(cas[0])])


def test_a_stale_crl_stays_in_force_and_says_so(cas: Any, devices: dict[str, bytes]) -> None:
    ca, _ = cas
    revocations = parse(make_crl(ca, [serial_of(devices["lock-1"])], next_update=-timedelta(hours=1)),
                        [ca_certificate(ca)])
    assert certificate_id(devices["lock-1"]) in revocations
    assert [c.issuer for c in revocations.stale()] == [ca_certificate(ca).subject.rfc4514_string()]
    lines = list(crl.stale_lines(revocations))
    assert len(lines) == 1 and "past its next update" in lines[0] and "TLS_CRL_FILE" in lines[0]
    assert not parse(make_crl(ca, [1]), [ca_certificate(ca)]).stale()


_VALID: list[tuple[bytes, x509.Certificate]] = []


def _valid_der() -> tuple[bytes, x509.Certificate]:
    """A valid CRL (DER) and its CA, made once: hypothesis calls the test many times."""
    if not _VALID:
        ca = trustme.CA()
        _VALID.append((x509.load_pem_x509_crl(make_crl(ca, [1, 2, 3])).public_bytes(serialization.Encoding.DER),
                       ca_certificate(ca)))
    return _VALID[0]


def _pem(der: bytes) -> bytes:
    return b"-----BEGIN X509 CRL-----\n" + base64.encodebytes(der) + b"-----END X509 CRL-----\n"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=512), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)),
                                                    max_size=4), framed=st.booleans(), mutate=st.booleans())
def test_the_pem_loader_answers_crl_error_or_revocations_never_another_exception(
        data: bytes, flips: list[tuple[int, int]], framed: bool, mutate: bool) -> None:
    der, authority = _valid_der()
    if mutate:  # a real CRL with bytes changed: bad DER, bad signature, or (rarely) still fine
        body = bytearray(der)
        for position, xor in flips:
            body[position % len(body)] ^= xor
        data = _pem(bytes(body))
    elif framed:
        data = _pem(data)
    try:
        revocations = parse(data, [authority])
    except CrlError:
        return
    assert isinstance(revocations, crl.Revocations)


# -- start-up: load_tls ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, cas: Any, devices: dict[str, bytes]) -> dict[str, str]:
    root = tmp_path_factory.mktemp("crl")
    ca, other = cas
    server_ca = trustme.CA()
    server = server_ca.issue_cert("localhost", "127.0.0.1")
    data = {
        "cert": b"".join(blob.bytes() for blob in server.cert_chain_pems),
        "key": server.private_key_pem.bytes(),
        "server_ca": server_ca.cert_pem.bytes(),
        "client_ca": ca.cert_pem.bytes(),
        "crl": make_crl(ca, [serial_of(devices["lock-1"])]),
        "garbage": b"this is not a CRL\n",
        "certificate": ca.cert_pem.bytes(),
        "forged": make_crl(ca, [1], key=ca_key(other)),
        "device": ca.issue_cert(common_name="lock-5").private_key_and_cert_chain_pem.bytes(),
        "device_revoked": ca.issue_cert(common_name="lock-6").private_key_and_cert_chain_pem.bytes(),
    }
    paths = {"missing": str(root / "no-such-file")}
    for name, blob in data.items():
        (root / name).write_bytes(blob)
        paths[name] = str(root / name)
    return paths


def tls_env(files: dict[str, str], **variables: str) -> dict[str, str]:
    return {"TLS_CERT_FILE": files["cert"], "TLS_KEY_FILE": files["key"], "TLS_CLIENT_CA_FILE": files["client_ca"],
            **variables}


def test_load_tls_reads_the_crl(files: dict[str, str], devices: dict[str, bytes]) -> None:
    settings_ = load_tls(tls_env(files, TLS_CRL_FILE=files["crl"]))
    assert settings_.crl_file == files["crl"] and settings_.crl is not None
    assert certificate_id(devices["lock-1"]) in settings_.crl.revocations
    assert settings_.crl.stamp == crl.stamp(files["crl"])
    assert load_tls(tls_env(files)).crl is None


@pytest.mark.parametrize(("file", "says"), [("missing", "cannot be read"), ("garbage", "holds no PEM CRL"),
                                             ("certificate", "holds no PEM CRL"),
                                             ("forged", "signature does not verify")])
def test_a_bad_crl_file_stops_start_up_naming_tls_crl_file(files: dict[str, str], file: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_tls(tls_env(files, TLS_CRL_FILE=files[file]))
    assert caught.value.variable == "TLS_CRL_FILE"
    assert says in str(caught.value) and "TLS_CRL_FILE" in str(caught.value)


def test_tls_crl_file_needs_tls_client_ca_file_and_tls(files: dict[str, str]) -> None:
    without_ca = tls_env(files, TLS_CRL_FILE=files["crl"])
    del without_ca["TLS_CLIENT_CA_FILE"]
    with pytest.raises(ConfigError, match="needs TLS_CLIENT_CA_FILE") as caught:
        load_tls(without_ca)
    assert caught.value.variable == "TLS_CRL_FILE"
    with pytest.raises(ConfigError, match="TLS is not configured") as caught:
        load_tls({"TLS_CRL_FILE": files["crl"]})
    assert caught.value.variable == "TLS_CRL_FILE"


# -- the watcher ------------------------------------------------------------------------------------

def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def rewrite(path: Path, data: bytes) -> None:
    """Replace the file's content so that its stamp surely changes (size, or mtime set forward)."""
    before = os.stat(path)
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def watched(tmp_path: Path, cas: Any, devices: dict[str, bytes]) -> tuple[Path, CrlWatcher]:
    ca, _ = cas
    path, ca_path = tmp_path / "crl.pem", tmp_path / "ca.pem"
    path.write_bytes(make_crl(ca, [serial_of(devices["lock-1"])]))
    ca_path.write_bytes(ca.cert_pem.bytes())
    return path, CrlWatcher(str(path), crl.load(str(path), str(ca_path)))


def test_the_watcher_reloads_on_change_and_keeps_the_old_crl_on_a_bad_file(
        watched: tuple[Path, CrlWatcher], cas: Any, devices: dict[str, bytes],
        caplog: pytest.LogCaptureFixture) -> None:
    path, watcher = watched
    ca, _ = cas
    one, two, three = (certificate_id(devices[name]) for name in ("lock-1", "lock-2", "lock-3"))
    assert watcher.revoked(one) and not watcher.revoked(two) and not watcher.check()  # unchanged: nothing read
    rewrite(path, make_crl(ca, [serial_of(devices["lock-1"]), serial_of(devices["lock-2"])], number=2))
    assert watcher.check() and watcher.revoked(two)
    assert gauge("warren_crl_revoked_certificates") == 2
    failed = gauge("warren_crl_reloads_total", outcome="failed") or 0.0
    for bad in (b"garbage\n", make_crl(ca, [serial_of(devices["lock-3"])], key=ca_key(cas[1]))):
        with caplog.at_level(logging.ERROR, logger="warren.crl"):
            caplog.clear()
            rewrite(path, bad)
            assert not watcher.check()
        assert watcher.revoked(one) and watcher.revoked(two) and not watcher.revoked(three)  # the old one stands
        assert "STAYS IN FORCE" in caplog.text and "TLS_CRL_FILE" in caplog.text
        assert gauge("warren_crl_file_bad") == 1
        caplog.clear()
        assert not watcher.check() and not caplog.text  # said once per version of the file, not every look
    assert gauge("warren_crl_reloads_total", outcome="failed") == failed + 2
    path.unlink()  # gone: the same, loudly
    with caplog.at_level(logging.ERROR, logger="warren.crl"):
        assert not watcher.check()
    assert "cannot be loaded" in caplog.text and watcher.revoked(one)
    path.write_bytes(make_crl(ca, [serial_of(devices["lock-3"])], number=3))
    assert watcher.check() and watcher.revoked(three) and not watcher.revoked(one)  # a CRL may un-revoke (hold)
    assert gauge("warren_crl_file_bad") == 0


def test_a_crl_that_goes_stale_is_reported_once_and_stays_in_force(
        watched: tuple[Path, CrlWatcher], devices: dict[str, bytes], caplog: pytest.LogCaptureFixture) -> None:
    _, watcher = watched
    watcher.clock = lambda: NOW
    watcher.check()
    assert gauge("warren_crl_stale") == 0
    watcher.clock = lambda: NOW + timedelta(days=8)  # past next update
    with caplog.at_level(logging.ERROR, logger="warren.crl"):
        watcher.check()
        watcher.check()
    assert gauge("warren_crl_stale") == 1
    assert caplog.text.count("past its next update") == 1
    assert watcher.revoked(certificate_id(devices["lock-1"]))


def test_a_reload_ends_exactly_the_sessions_whose_certificates_it_revokes(
        watched: tuple[Path, CrlWatcher], cas: Any, devices: dict[str, bytes]) -> None:
    path, watcher = watched
    ca, _ = cas
    registry = make_registry()
    runs = {}
    for name in ("lock-2", "lock-3"):
        conn = FakeConn()
        session = Session(conn, registry, registry.broker)
        watcher.track(session, certificate_id(devices[name]))
        runs[name] = (conn, gevent.spawn(session.run))
        conn.push(hello(name))
    wait_for(lambda: all("welcome" in conn.types() for conn, _ in runs.values()))
    ended = gauge("warren_crl_refusals_total", at="reload") or 0.0
    rewrite(path, make_crl(ca, [serial_of(devices["lock-1"]), serial_of(devices["lock-2"])], number=2))
    assert watcher.check()
    conn, runner = runs["lock-2"]
    runner.join(2)
    assert runner.dead and conn.sent[-1]["type"] == "error" and conn.sent[-1]["code"] == "banned", conn.sent
    assert set(registry.sessions) == {"lock-3"} and runs["lock-3"][0].types() == ["welcome"]
    assert gauge("warren_crl_refusals_total", at="reload") == ended + 1
    assert gauge("warren_sessions_closed_total", reason="banned") >= 1
    runs["lock-3"][0].finish()
    runs["lock-3"][1].join(2)


def test_the_watcher_loop_notices_a_change_within_its_interval(watched: tuple[Path, CrlWatcher], cas: Any,
                                                               devices: dict[str, bytes]) -> None:
    path, watcher = watched
    watcher.interval = 0.05
    loop = gevent.spawn(watcher.run)
    try:
        rewrite(path, make_crl(cas[0], [serial_of(devices["lock-3"])], number=2))
        wait_for(lambda: watcher.revoked(certificate_id(devices["lock-3"])), timeout=2)
    finally:
        loop.kill()


# -- the refusal on a connection ----------------------------------------------------------------

def test_a_revoked_json_device_hears_banned_after_its_hello() -> None:
    conn = FakeConn()
    conn.push(hello("lock-1"))
    refuse_revoked(conn, deadline=float("inf"))
    assert conn.sent == [{"type": "error", "code": "banned", "message": crl.REVOKED_MESSAGE, "id": None}]
    assert conn.closed


class Stream:
    def __init__(self, data: bytes) -> None:
        self.data: list[bytes | None] = [data, None]
        self.out = b""
        self.closed = False

    def recv(self) -> bytes | None:
        return self.data.pop(0)

    def send(self, data: bytes) -> None:
        self.out += data

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_a_revoked_mqtt_device_gets_connack_not_authorized() -> None:
    stream = Stream(mqtt_client.connect("lock-1", None))
    refuse_revoked(MqttConnection(stream, "127.0.0.1:9", 65536, 1200), deadline=float("inf"))
    assert stream.out == b"\x20\x02\x00\x05" and stream.closed  # CONNACK 0x05, as section 8 says for banned


# -- resumption: the certificate a resumed session carries -------------------------------------------

@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_resumed_session_carries_the_certificate_first_presented(files: dict[str, str],
                                                                   version: ssl.TLSVersion) -> None:
    """A resumption sends no certificate and verifies none: the server must still see which one it was."""
    context = device_context(load_tls(tls_env(files, TLS_CRL_FILE=files["crl"])))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(files["server_ca"])
    client.load_cert_chain(files["device"])
    client.minimum_version = client.maximum_version = version
    expected = certificate_id(x509.load_pem_x509_certificate(Path(files["device"]).read_bytes()).public_bytes(
        serialization.Encoding.DER))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def serve() -> tuple[Any, bool]:
        conn, _ = listener.accept()
        tls = handshake(conn, context, 5.0)
        seen = certificate_id(tls.getpeercert(binary_form=True)), tls.session_reused
        tls.sendall(b"x")
        tls.recv(1)
        tls.close()
        return seen

    session = None
    try:
        for attempt in range(2):
            server = gevent.spawn(serve)
            with (socket.create_connection(listener.getsockname(), timeout=5) as raw,
                  client.wrap_socket(raw, server_hostname="localhost", session=session) as tls):
                assert tls.recv(1) == b"x"
                assert tls.session_reused == (attempt == 1)
                session = tls.session
            assert server.get(timeout=5) == (expected, attempt == 1)
    finally:
        listener.close()


def test_a_reload_verifies_against_the_cas_read_at_start_up(watched: tuple[Path, CrlWatcher], cas: Any,
                                                            devices: dict[str, bytes]) -> None:
    """The TLS contexts trust TLS_CLIENT_CA_FILE as it was at start-up: so does a reload, whatever the file holds now."""
    path, watcher = watched
    ca, other = cas
    (path.parent / "ca.pem").write_bytes(other.cert_pem.bytes())  # replaced on disk, not yet in force
    rewrite(path, make_crl(ca, [serial_of(devices["lock-2"])], number=2))
    assert watcher.check() and watcher.revoked(certificate_id(devices["lock-2"]))
    rewrite(path, make_crl(other, [1], number=3))
    assert not watcher.check() and watcher.revoked(certificate_id(devices["lock-2"]))


def test_a_crl_with_a_version_cryptography_refuses_is_a_crl_error() -> None:
    """cryptography's InvalidVersion is not a ValueError (found by the fuzzer above)."""
    der, authority = _valid_der()
    version = der.index(b"\x02\x01\x01")  # TBSCertList's version: INTEGER 1 (v2)
    broken = der[:version] + b"\x02\x01\x00" + der[version + 3:]
    with pytest.raises(CrlError, match="not a valid CRL"):
        parse(_pem(broken), [authority])
