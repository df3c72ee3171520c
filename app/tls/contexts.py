"""TLS for the device and HTTP listeners: settings, server contexts, device names (PROTOCOL.md section 1, "TLS").

Everything a TLS listener needs is decided in the gunicorn master, before the fork:

- `load_tls` reads and checks the certificate, the key and the client CA at start-up, so that a
  wrong file stops the gateway with a `ConfigError` naming its variable instead of failing every
  handshake later (or, worse, serving a certificate that expired last night). TLS_CRL_FILE is
  checked here too (app/tls/crl.py); the workers watch it afterwards, never rebuilding a context.
- `device_context` and `https_context` are built once, in the master. OpenSSL makes a context's
  session-ticket keys when the SSL_CTX is created, so every worker forked from that master
  inherits the same keys: a device that reconnects after a drop resumes its session on whichever
  worker accepts it. A restart of the instance (a new master) makes new keys, and each device pays
  one full handshake after it. The two contexts have separate keys on purpose: a session made on
  the HTTPS port, where a client certificate is optional, can never be resumed on a device port,
  where one is required.
- `certificate_names` says which device a verified client certificate names.

The handshake itself, which runs in the worker under gevent, is in app/tls/handshake.py.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from gevent import ssl as gevent_ssl

from app.config import ConfigError
from app.tls import crl as crl_module

DEFAULT_DEVICE_TLS_PORT = 7879
DEFAULT_MQTT_TLS_PORT = 8883
# A device holds one connection at a time and gets a fresh ticket on every handshake, resumed ones
# included, so one ticket a handshake is all it can use (OpenSSL's default of 2 sends a spare).
TICKETS_PER_HANDSHAKE = 1
TLS_PORT_VARIABLES = ("DEVICE_TLS_PORT", "MQTT_TLS_PORT", "HTTPS_PORT")
# The names a client certificate may give a device (PROTOCOL.md section 1): never IP or e-mail SANs.
NAME_SAN_TYPES = ("DNS", "URI")
_TIME = "%Y-%m-%d %H:%M:%S UTC"


@dataclass(frozen=True)
class TlsSettings:
    """Checked TLS configuration: the files, which listeners speak TLS, and when the certificate expires."""

    cert_file: str
    key_file: str
    client_ca_file: str | None
    device_tls_port: int | None
    mqtt_tls_port: int | None
    https_port: int | None
    cert_not_after: datetime
    crl_file: str | None = None  # TLS_CRL_FILE: revoked device certificates (app/tls/crl.py)
    crl: crl_module.Loaded | None = None  # as the master read it at start-up; each worker watches the file

    @property
    def ports(self) -> dict[str, int]:
        """The enabled TLS listeners' ports, by variable."""
        return {name: port for name, port in zip(TLS_PORT_VARIABLES, (
            self.device_tls_port, self.mqtt_tls_port, self.https_port)) if port is not None}


@dataclass(frozen=True)
class TlsContexts:
    """The two server contexts of an instance, built once in the master."""

    device: ssl.SSLContext  # DEVICE_TLS_PORT and MQTT_TLS_PORT
    https: ssl.SSLContext  # HTTPS_PORT


def load_tls(env: Mapping[str, str], plain_ports: Mapping[str, int | None] | None = None) -> TlsSettings | None:
    """The TLS settings, or None when TLS is not configured; ConfigError naming the first bad variable.

    TLS is configured by TLS_CERT_FILE and TLS_KEY_FILE together. Without them, a TLS port or a
    client CA that is set anyway is refused rather than ignored: a gateway an operator believes to
    serve TLS (or mutual TLS) must not quietly serve neither. `plain_ports` (the plain listeners'
    ports by variable, e.g. {"PORT": 8000}) lets a TLS port that collides with one be named here.
    """
    cert_file, key_file = _text(env, "TLS_CERT_FILE"), _text(env, "TLS_KEY_FILE")
    client_ca_file = _text(env, "TLS_CLIENT_CA_FILE")
    crl_file = _text(env, "TLS_CRL_FILE")
    if not cert_file and not key_file:
        _refuse_without_tls(env)
        return None
    if not key_file:
        raise ConfigError("TLS_KEY_FILE", "", "is not set, but TLS_CERT_FILE is: set both to turn TLS on, or neither")
    if not cert_file:
        raise ConfigError("TLS_CERT_FILE", "", "is not set, but TLS_KEY_FILE is: set both to turn TLS on, or neither")
    now = datetime.now(UTC)
    not_after = _check_certificate_and_key(cert_file, key_file, now)
    if client_ca_file:
        _check_client_ca(client_ca_file, now)
    if crl_file and not client_ca_file:
        raise ConfigError("TLS_CRL_FILE", crl_file, "needs TLS_CLIENT_CA_FILE (the CA whose certificates it "
                                                    "revokes): set it too, or unset TLS_CRL_FILE")
    settings = TlsSettings(
        cert_file=cert_file, key_file=key_file, client_ca_file=client_ca_file,
        device_tls_port=_port(env, "DEVICE_TLS_PORT", DEFAULT_DEVICE_TLS_PORT),
        mqtt_tls_port=_port(env, "MQTT_TLS_PORT", DEFAULT_MQTT_TLS_PORT),
        https_port=_port(env, "HTTPS_PORT", None),
        cert_not_after=not_after,
        crl_file=crl_file,
        crl=crl_module.load(crl_file, client_ca_file) if crl_file and client_ca_file else None,
    )
    _check_distinct(settings.ports, plain_ports or {})
    return settings


def build_contexts(settings: TlsSettings) -> TlsContexts:
    """Both contexts; build them in the gunicorn master, before the fork, so that every worker shares their ticket keys."""
    return TlsContexts(device=device_context(settings), https=https_context(settings))


def device_context(settings: TlsSettings) -> ssl.SSLContext:
    """DEVICE_TLS_PORT and MQTT_TLS_PORT: with a client CA, a device without a certificate it signed is refused."""
    context = _server_context(settings)
    if settings.client_ca_file:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=settings.client_ca_file)
    return context


def https_context(settings: TlsSettings) -> ssl.SSLContext:
    """HTTPS_PORT: a certificate is asked for, never required (API clients, browsers and Prometheus have none)."""
    context = _server_context(settings)
    if settings.client_ca_file:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cafile=settings.client_ca_file)
    return context


def _server_context(settings: TlsSettings) -> ssl.SSLContext:
    # gevent's SSLContext (a subclass of the standard one, importable before monkey patching)
    # wraps sockets as gevent's SSLSocket, whose waits yield to the hub: a context of the standard
    # class, built in the unpatched master, would make blocking sockets in the workers.
    context = gevent_ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    # No compression (CRIME, and per-connection zlib state); no renegotiation, which would let a
    # client ask for full handshakes on a held connection, outside the HandshakeGate.
    # Tickets stay on (Python leaves OP_NO_TICKET clear) for TLS 1.2 resumption, which also keeps
    # OpenSSL's per-process server session cache empty. CPython already sets
    # SSL_MODE_RELEASE_BUFFERS, so an idle connection holds no 16 KiB record buffers.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options &= ~ssl.OP_NO_TICKET
    context.num_tickets = TICKETS_PER_HANDSHAKE
    context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


# -- device names -----------------------------------------------------------------------

def certificate_names(peercert: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The names a verified certificate gives its holder: its DNS and URI SANs when it has any, else its CN.

    `peercert` is `SSLSocket.getpeercert()`: None without a certificate, and {} when the context
    did not verify it, which names nobody.
    """
    if not peercert:
        return ()
    names = tuple(value for kind, value in peercert.get("subjectAltName", ()) if kind in NAME_SAN_TYPES)
    if names:
        return names
    return tuple(value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName")


def certificate_names_device(peercert: Mapping[str, Any] | None, device: str) -> bool:
    """Whether the certificate names `device`: exact comparison, no wildcards, no case folding."""
    return bool(device) and device in certificate_names(peercert)


# -- gunicorn's own TLS settings ---------------------------------------------------------

# gunicorn's setting -> what to set instead.
_GUNICORN_SSL = {"certfile": "TLS_CERT_FILE", "keyfile": "TLS_KEY_FILE", "ca_certs": "TLS_CLIENT_CA_FILE"}


def check_gunicorn_ssl(cfg: Any) -> None:
    """Refuse gunicorn's certfile/keyfile/ca_certs/cert_reqs: Warren's listeners do not use them.

    They are not mapped onto TLS_CERT_FILE and friends because they mean something else: in
    gunicorn they turn every bound port, PORT included, into TLS, while Warren keeps PORT plain and
    serves TLS on its own ports. Mapping them would leave PORT in plaintext for an operator who
    believes it encrypted, so start-up stops and says what to set instead.
    """
    given = {setting: value for setting in _GUNICORN_SSL if (value := getattr(cfg, setting, None))}
    if given:  # all in one message: --certfile and --keyfile come as a pair, and so must their replacements
        first = next(iter(given))
        instead = " and ".join(f"{_GUNICORN_SSL[setting]}={value}" for setting, value in given.items())
        raise ConfigError(first, str(given[first]), _instead(instead))
    cert_reqs = getattr(cfg, "cert_reqs", ssl.CERT_NONE)
    if cert_reqs != ssl.CERT_NONE:
        raise ConfigError("cert_reqs", str(cert_reqs), _instead("TLS_CLIENT_CA_FILE=<CA file> (mutual TLS)"))


def _instead(what: str) -> str:
    return (f"gunicorn's own TLS settings are not used by Warren's listeners: set {what} in the environment "
            f"instead. With TLS_CERT_FILE and TLS_KEY_FILE set, DEVICE_TLS_PORT (7879), MQTT_TLS_PORT (8883) "
            f"and HTTPS_PORT speak TLS, and PORT stays plain (PROTOCOL.md section 1)")


# -- checks -----------------------------------------------------------------------------

def _text(env: Mapping[str, str], name: str) -> str | None:
    return env.get(name, "").strip() or None


def _refuse_without_tls(env: Mapping[str, str]) -> None:
    needs = "is set but TLS is not configured: set TLS_CERT_FILE and TLS_KEY_FILE too, or unset it"
    for name in (*TLS_PORT_VARIABLES, "TLS_CLIENT_CA_FILE", "TLS_CRL_FILE"):
        raw = env.get(name, "").strip()
        if raw:
            raise ConfigError(name, raw, needs)


def _port(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    """A listener's port: unset is the default, the empty string disables it."""
    if name not in env:
        return default
    raw = env[name].strip()
    if not raw:
        return None
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(name, raw, "must be a port number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(name, raw, "must be a port number between 1 and 65535")
    return port


def _check_distinct(tls_ports: Mapping[str, int], plain_ports: Mapping[str, int | None]) -> None:
    taken = {port: name for name, port in plain_ports.items() if port}
    for name, port in tls_ports.items():
        if port in taken:
            raise ConfigError(name, str(port), f"is also {taken[port]}: every listener needs its own port")
        taken[port] = name


def _read(variable: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(variable, path, f"cannot be read ({exc.strerror or exc})") from None


def _certificates(variable: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(variable, path, "is not a PEM certificate file (-----BEGIN CERTIFICATE-----)") from None


def _check_valid(variable: str, path: str, certificate: x509.Certificate, now: datetime, what: str) -> None:
    not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if now > not_after:
        raise ConfigError(variable, path, f"{what} expired on {not_after:{_TIME}}")
    if now < not_before:
        raise ConfigError(variable, path, f"{what} is not valid until {not_before:{_TIME}} (is the clock right?)")


def _check_certificate_and_key(cert_file: str, key_file: str, now: datetime) -> datetime:
    """Check the chain's dates and that the key is the leaf's; the leaf's expiry."""
    chain = _certificates("TLS_CERT_FILE", cert_file, _read("TLS_CERT_FILE", cert_file))
    for index, certificate in enumerate(chain):
        what = "the certificate" if index == 0 else f"certificate {index + 1} of the chain"
        _check_valid("TLS_CERT_FILE", cert_file, certificate, now, what)
    key_data = _read("TLS_KEY_FILE", key_file)
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise ConfigError("TLS_KEY_FILE", key_file, "is encrypted: Warren needs an unencrypted key "
                                                    "(protect the file with its permissions)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError("TLS_KEY_FILE", key_file, "is not a PEM private key (-----BEGIN PRIVATE KEY-----)") from None
    if _public_der(key.public_key()) != _public_der(chain[0].public_key()):
        raise ConfigError("TLS_KEY_FILE", key_file,
                          f"does not match the certificate in TLS_CERT_FILE ({cert_file}): its public key differs")
    # What OpenSSL itself would refuse (an unusable key type, say), said now rather than at the first handshake.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise ConfigError("TLS_KEY_FILE", key_file, f"OpenSSL refuses this key with TLS_CERT_FILE: {exc}") from None
    return chain[0].not_valid_after_utc


def _check_client_ca(path: str, now: datetime) -> None:
    for certificate in _certificates("TLS_CLIENT_CA_FILE", path, _read("TLS_CLIENT_CA_FILE", path)):
        subject = certificate.subject.rfc4514_string()
        try:
            is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ConfigError("TLS_CLIENT_CA_FILE", path,
                              f"holds a certificate that is not a CA ({subject}: no basicConstraints CA:TRUE); "
                              f"it must hold the CA that signs the device certificates, not a device's own")
        _check_valid("TLS_CLIENT_CA_FILE", path, certificate, now, f"the CA {subject}")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError("TLS_CLIENT_CA_FILE", path, f"OpenSSL refuses this CA file: {exc}") from None


def _public_der(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
