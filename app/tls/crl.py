"""Revoked device certificates: TLS_CRL_FILE (PROTOCOL.md section 6, "Revoked certificates").

The file holds one or more PEM CRLs of the device CA (TLS_CLIENT_CA_FILE). Three parts:

- `parse` (sans-I/O): PEM bytes and the CA file's certificates -> `Revocations`, the set of
  (issuer name DER, serial) of every revoked certificate. Each CRL must verify with the key of a
  CA of TLS_CLIENT_CA_FILE whose subject is the CRL's issuer; anything else (not PEM, not a CRL,
  signed by another key) is a `CrlError`, never another exception. A certificate is looked up
  by its issuer and serial, so a certificate whose issuer has no CRL in the file is not revoked.
- `load` reads both files at start-up: ConfigError naming TLS_CRL_FILE when they do not make a
  CRL set (the master calls it from `load_tls`, so a bad file stops start-up).
- `CrlWatcher` holds the CRL in force in one worker. Its greenlet stats the file every
  WATCH_INTERVAL seconds and loads it again when its inode, size, mtime or ctime changed; a file
  that does not load keeps the CRL in force, said with log.error and `warren_crl_file_bad`.
  After a reload, the sessions that presented a certificate now revoked end with `banned`
  (`track` remembers which certificate each session presented); no other session is touched and
  the TLS contexts (with their shared ticket keys) stay as they are.

A CRL past its next update stays in force for what it lists (a stale CRL is better than none)
and is reported: `warren_crl_stale` counts such CRLs, and each is logged once when it goes stale.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from weakref import WeakKeyDictionary

import gevent
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from app.config import ConfigError

log = logging.getLogger("warren.crl")

VARIABLE = "TLS_CRL_FILE"
WATCH_INTERVAL = 2.0  # seconds between two looks at the file: a change is in force within this (PROTOCOL: 10 s)
REVOKED_MESSAGE = "the client certificate is revoked"

CertificateId = tuple[bytes, int]
"""(the DER of the certificate's issuer name, its serial number): what a CRL entry names."""

Stamp = tuple[int, int, int, int, int] | None
"""(device, inode, size, mtime ns, ctime ns) of the file; None when it cannot be stat'ed."""

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----\s.*?-----END X509 CRL-----", re.DOTALL)
_TIME = "%Y-%m-%d %H:%M:%S UTC"


class CrlError(ValueError):
    """The bytes are not a set of CRLs signed by the device CA; the message says why."""


@dataclass(frozen=True)
class Crl:
    """One CRL of the file, as reported (the entries themselves are in `Revocations.revoked`)."""

    issuer: str  # RFC 4514
    next_update: datetime | None
    entries: int
    number: int | None  # the CRL number extension, when there is one

    def stale(self, now: datetime) -> bool:
        return self.next_update is not None and now > self.next_update

    def describe(self) -> str:
        number = f" number {self.number}" if self.number is not None else ""
        when = f"{self.next_update:{_TIME}}" if self.next_update else "never"
        return f"CRL{number} of {self.issuer} ({self.entries} revoked; next update {when})"


@dataclass(frozen=True)
class Revocations:
    """The CRLs in force: every revoked certificate by (issuer name DER, serial)."""

    revoked: frozenset[CertificateId]
    crls: tuple[Crl, ...]

    def __contains__(self, certificate: object) -> bool:
        return certificate in self.revoked

    def stale(self, now: datetime | None = None) -> tuple[Crl, ...]:
        now = now or datetime.now(UTC)
        return tuple(crl for crl in self.crls if crl.stale(now))


@dataclass(frozen=True)
class Loaded:
    """What `load` read: the revocations, the stamp of the file they came from, and the CAs that verify CRLs.

    The CAs are TLS_CLIENT_CA_FILE as read at start-up, which is what the TLS contexts trust until the next
    start; a reload verifies the new CRLs against them, not against whatever the CA file holds by then."""

    revocations: Revocations
    stamp: Stamp
    authorities: tuple[x509.Certificate, ...]


# -- sans-I/O ---------------------------------------------------------------------------

def parse(data: bytes, authorities: Sequence[x509.Certificate]) -> Revocations:
    """The revocations of every PEM CRL in `data`, each verified against `authorities`; CrlError otherwise."""
    blocks = _PEM_CRL.findall(data)
    if not blocks:
        raise CrlError("holds no PEM CRL (-----BEGIN X509 CRL-----)")
    revoked: set[CertificateId] = set()
    crls = []
    for index, block in enumerate(blocks):
        where = f"CRL {index + 1} of {len(blocks)}"
        try:
            crl = x509.load_pem_x509_crl(block)
            issuer = crl.issuer.public_bytes()
            _verify(crl, authorities, where)
            serials = [entry.serial_number for entry in crl]
            crls.append(Crl(crl.issuer.rfc4514_string(), crl.next_update_utc, len(serials), _number(crl)))
        except CrlError:
            raise
        except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:  # InvalidVersion: not a ValueError
            raise CrlError(f"{where} is not a valid CRL ({exc})") from None
        revoked.update((issuer, serial) for serial in serials)
    return Revocations(frozenset(revoked), tuple(crls))


def _verify(crl: x509.CertificateRevocationList, authorities: Sequence[x509.Certificate], where: str) -> None:
    issuers = [ca for ca in authorities if ca.subject == crl.issuer]
    if not issuers:
        raise CrlError(f"{where} is issued by {crl.issuer.rfc4514_string()}, which is not a CA of "
                       f"TLS_CLIENT_CA_FILE: only CRLs of the device CA are accepted")
    for ca in issuers:
        try:
            if crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
                return
        except (InvalidSignature, TypeError, ValueError, UnsupportedAlgorithm):
            continue
    raise CrlError(f"{where} claims to be of {crl.issuer.rfc4514_string()} but its signature does not verify "
                   f"with that CA's key in TLS_CLIENT_CA_FILE")


def _number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def certificate_id(der: bytes | None) -> CertificateId | None:
    """What a CRL would list the certificate (DER, as `getpeercert(binary_form=True)` gives it) as."""
    if not der:
        return None
    try:
        certificate = x509.load_der_x509_certificate(der)
        return certificate.issuer.public_bytes(), certificate.serial_number
    except ValueError:  # OpenSSL verified it, so this does not happen; never let it crash a connection
        return None


# -- the files ----------------------------------------------------------------------------

def stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def read(path: str, authorities: Sequence[x509.Certificate]) -> Revocations:
    """The file read and parsed; OSError or CrlError."""
    with open(path, "rb") as file:
        return parse(file.read(), authorities)


def load(path: str, ca_path: str) -> Loaded:
    """At start-up: the CRL file checked against TLS_CLIENT_CA_FILE, or ConfigError naming TLS_CRL_FILE."""
    before = stamp(path)
    try:
        with open(ca_path, "rb") as file:
            authorities = tuple(x509.load_pem_x509_certificates(file.read()))
        revocations = read(path, authorities)
    except OSError as exc:
        raise ConfigError(VARIABLE, path, f"cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # CrlError, or a CA file that is not PEM (load_tls has refused that already)
        raise ConfigError(VARIABLE, path, str(exc)) from None
    return Loaded(revocations, before, authorities)


# -- one worker's CRL in force ---------------------------------------------------------------

def _metrics() -> Any:
    # Not imported at the top: the master imports this module (load_tls, from gunicorn.conf.py) before it sets
    # PROMETHEUS_MULTIPROC_DIR, and prometheus_client picks its multiprocess mode when first imported.
    from app import metrics

    return metrics


class CrlWatcher:
    """The CRL in force in this worker, the sessions that presented a certificate, and the file's watcher."""

    def __init__(self, path: str, loaded: Loaded, interval: float = WATCH_INTERVAL,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.path, self.interval, self.clock = path, interval, clock
        self.authorities = loaded.authorities
        self.revocations = loaded.revocations
        self._stamp = loaded.stamp  # the version of the file last loaded or last refused
        self._sessions: WeakKeyDictionary[Any, CertificateId] = WeakKeyDictionary()
        self._stale: frozenset[Crl] = frozenset()
        _metrics().CRL_FILE_BAD.set(0)
        _metrics().CRL_REVOKED.set(len(self.revocations.revoked))

    def revoked(self, certificate: CertificateId | None) -> bool:
        return certificate is not None and certificate in self.revocations

    def track(self, session: Any, certificate: CertificateId) -> None:
        """Remember the certificate `session` presented, to end it (`session.end`) if a reload revokes it."""
        self._sessions[session] = certificate

    def run(self) -> None:
        """The watcher's greenlet: look at the file every `interval` seconds."""
        while True:
            self.check()
            gevent.sleep(self.interval)

    def check(self) -> bool:
        """Load the file again if it changed, report stale CRLs; True when a new CRL came into force."""
        current = stamp(self.path)
        reloaded = current != self._stamp and self._reload(current)
        self._report_stale()
        return reloaded

    def _reload(self, before: Stamp) -> bool:
        try:
            revocations = read(self.path, self.authorities)
        except Exception as exc:  # noqa: BLE001 - OSError, CrlError, any other: no file may crash the watcher
            if stamp(self.path) != before:
                return False  # being written as we read it: read it again next time
            self._stamp = before
            self._refused(exc)
            return False
        if stamp(self.path) != before:
            return False  # written while we read it: this may be half of it
        self._stamp, self.revocations = before, revocations
        _metrics().CRL_FILE_BAD.set(0)
        _metrics().CRL_RELOADS.labels(outcome="loaded").inc()
        _metrics().CRL_REVOKED.set(len(revocations.revoked))
        log.warning("%s=%s loaded again: %d revoked certificates in %d CRLs", VARIABLE, self.path,
                    len(revocations.revoked), len(revocations.crls))
        self.end_revoked()
        return True

    def _refused(self, exc: Exception) -> None:
        reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
        _metrics().CRL_FILE_BAD.set(1)
        _metrics().CRL_RELOADS.labels(outcome="failed").inc()
        log.error("%s=%s changed but cannot be loaded (%s): the CRL loaded before STAYS IN FORCE (%d revoked "
                  "certificates) until the file is fixed", VARIABLE, self.path, reason,
                  len(self.revocations.revoked))

    def end_revoked(self) -> int:
        """End, with `banned`, every live session whose certificate the CRL in force lists; how many."""
        ended = 0
        for session, certificate in list(self._sessions.items()):
            if certificate in self.revocations:
                del self._sessions[session]
                session.end("banned", REVOKED_MESSAGE)
                _metrics().CRL_REFUSALS.labels(at="reload").inc()
                ended += 1
        if ended:
            log.warning("%d sessions ended: their client certificates are revoked now (%s)", ended, VARIABLE)
        return ended

    def _report_stale(self) -> None:
        stale = frozenset(self.revocations.stale(self.clock()))
        _metrics().CRL_STALE.set(len(stale))
        for crl in stale - self._stale:
            log.error("%s: the %s is past its next update: it STAYS IN FORCE for the certificates it lists; "
                      "publish a fresh CRL", VARIABLE, crl.describe())
        self._stale = stale


def stale_lines(revocations: Revocations, now: datetime | None = None) -> Iterable[str]:
    """What start-up says loudly about CRLs past their next update."""
    for crl in revocations.stale(now):
        yield (f"WARNING: {VARIABLE}: the {crl.describe()} is past its next update: it stays in force for the "
               f"certificates it lists; publish a fresh CRL")
