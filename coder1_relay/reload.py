"""
Renewing the relay's TLS certificate while it runs (README, "Renewing the
certificate").

On C{SIGHUP}, and when a check every few minutes finds the files changed,
L{CertificateReloader} reads the certificate and key again.  A good pair
replaces the TLS context that new connections get (L{ServerTLS}); open
connections keep the one they were made with, so nobody is dropped.  A bad
pair (unreadable, not PEM, a key that does not match, expired) is refused
with one log line and the current pair stays.
"""

from __future__ import annotations

import datetime
import os
import signal
import ssl
from collections.abc import Callable
from types import FrameType
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.application.service import Service

# Twisted's trust roots implement this interface; twisted.internet.ssl does not re-export it.
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from coder1_relay import certs
from coder1_wire.tls import client_tls_options

#: Seconds between two looks at the files' modification times.
CHECK_INTERVAL = 300.0


@attrs.define
class ServerTLS:
    """
    The TLS settings a listener gives each new connection: whichever context
    is C{current} when it arrives (calling it returns that one).  Replacing
    it is one assignment, made on the reactor thread; a connection keeps the
    context it got.
    """

    current: ssl.SSLContext

    def __call__(self) -> ssl.SSLContext:
        return self.current


@implementer(IOpenSSLClientConnectionCreator)
@attrs.define
class ClientTLS:
    """The client side of L{ServerTLS}: the node links' trust, replaced on reload."""

    current: IOpenSSLClientConnectionCreator

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self.current.clientConnectionForTLS(tlsProtocol)


@implementer(IOpenSSLTrustRoot)
class _EachAsItself:
    """
    Trust in the given certificates where each is trusted as itself (OpenSSL's
    C{PARTIAL_CHAIN}): two self-signed certificates with the same subject, a
    node's old one and its new one, would otherwise be mistaken for each
    other's issuer and one of them refused.
    """

    def __init__(self, certificates: list[x509.Certificate]) -> None:
        self.certificates = certificates

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        trust: Any = trustRootFromCertificates(
            [Certificate(crypto.X509.from_cryptography(each)) for each in self.certificates]
        )
        trust._addCACertsToContext(context)
        store = context.get_cert_store()
        assert store is not None  # an SSL.Context always has one
        store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)


def node_link_tls(hostname: str, trusted_pem: bytes | None) -> IOpenSSLClientConnectionCreator:
    """
    TLS 1.3 towards other relay nodes at C{hostname}: trusting C{trusted_pem}'s
    certificates (CAs, or the shared self-signed certificates, old and new),
    or the system's CAs when None.
    """
    if trusted_pem is None:
        return client_tls_options(hostname, None)
    return optionsForClientTLS(
        hostname,
        trustRoot=_EachAsItself(x509.load_pem_x509_certificates(trusted_pem)),
        extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_3},
    )


class RefusedPair(Exception):
    """A new certificate and key that cannot be used; the message names no path."""


@attrs.frozen
class PairFiles:
    """Where the certificate and key are, and the names a log line gives them."""

    cert: FilePath[str]
    key: FilePath[str]
    cert_name: str = "--tls-cert"
    key_name: str = "--tls-key"

    def signature(self) -> tuple[tuple[int, int, int], ...] | None:
        """What changes when either file is replaced or rewritten; None if one is missing."""
        try:
            found = [os.stat(each.path) for each in (self.cert, self.key)]
        except OSError:
            return None
        return tuple((each.st_mtime_ns, each.st_ino, each.st_size) for each in found)


def read_pair(files: PairFiles, now: float) -> tuple[bytes, bytes]:
    """
    The chain (leaf first) and key in C{files}, checked as a pair that is
    valid at C{now} (POSIX seconds).

    @raise RefusedPair: saying what is wrong, by the files' option names.
    """
    try:
        cert_data = files.cert.getContent()
    except OSError:
        raise RefusedPair(f"{files.cert_name} cannot be read") from None
    try:
        key_data = files.key.getContent()
    except OSError:
        raise RefusedPair(f"{files.key_name} cannot be read") from None
    try:
        chain = x509.load_pem_x509_certificates(cert_data)
    except ValueError:
        raise RefusedPair(f"{files.cert_name} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise RefusedPair(f"{files.key_name} is not an unencrypted PEM private key") from None
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    leaf = chain[0]
    if leaf.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise RefusedPair(
            f"the key in {files.key_name} does not match the first certificate in {files.cert_name}"
        )
    at = datetime.datetime.fromtimestamp(now, datetime.UTC)
    if leaf.not_valid_after_utc <= at:
        raise RefusedPair(
            f"the certificate in {files.cert_name} expired on {leaf.not_valid_after_utc:%Y-%m-%d}"
        )
    if leaf.not_valid_before_utc > at:
        raise RefusedPair(
            f"the certificate in {files.cert_name} is not valid before "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return b"".join(each.public_bytes(serialization.Encoding.PEM) for each in chain), key_pem


class CertificateReloader(Service):
    """
    Reads the TLS pair again on L{reload} (what C{SIGHUP} calls) and when a
    check every C{interval} seconds finds either file changed.

    @ivar keys: the relay's keys, with the pair now served.
    """

    log = Logger()

    def __init__(
        self,
        clock: Any,
        files: PairFiles,
        keys: certs.RelayKeys,
        reloaded: Callable[[certs.RelayKeys], None],
        interval: float = CHECK_INTERVAL,
    ) -> None:
        self.clock = clock
        self.files = files
        self.keys = keys
        self.tls = ServerTLS(certs.server_ssl_context(keys))
        self._reloaded = reloaded
        self._seen = files.signature()
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock
        self.interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Any:
        if self._loop.running:
            self._loop.stop()
        return super().stopService()

    def check(self) -> None:
        """Reload if either file changed since it was last read (or refused)."""
        if self.files.signature() != self._seen:
            self.reload()

    def reload(self) -> bool:
        """Read the pair again and serve it if it is good; say why not in one line if not."""
        self._seen = self.files.signature()
        try:
            cert_pem, key_pem = read_pair(self.files, self.clock.seconds())
            keys = attrs.evolve(self.keys, tls_cert_pem=cert_pem, tls_key_pem=key_pem)
            context = certs.server_ssl_context(keys)  # OpenSSL's own checks, too
        except RefusedPair as e:
            self._refused(str(e))
            return False
        except (ValueError, ssl.SSLError):
            self._refused(f"OpenSSL refused {self.files.cert_name} or {self.files.key_name}")
            return False
        if cert_pem == self.keys.tls_cert_pem and key_pem == self.keys.tls_key_pem:
            self.log.info(
                "TLS certificate unchanged (SHA-256 {fingerprint})", fingerprint=_fp(keys)
            )
            return True
        self.tls.current = context
        self.keys = keys
        self._reloaded(keys)
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
        self.log.info(
            "TLS certificate reloaded: new connections get SHA-256 {fingerprint}, "
            "valid until {until}",
            fingerprint=_fp(keys),
            until=f"{leaf.not_valid_after_utc:%Y-%m-%d}",
        )
        return True

    def _refused(self, why: str) -> None:
        self.log.error(
            "TLS certificate not reloaded: {why}; still serving SHA-256 {fingerprint}",
            why=why,
            fingerprint=_fp(self.keys),
        )


def _fp(keys: certs.RelayKeys) -> str:
    return certs.fingerprint(keys.tls_cert_pem)


class ReloadOnHangup(Service):
    """
    While running, C{SIGHUP} calls C{reload} (on the reactor thread; the
    handler before it is put back on stop).  Only C{twistd}'s service has
    it: a relay made inside a test process leaves the process's signals alone.
    """

    def __init__(self, reactor: Any, reload: Callable[[], object]) -> None:
        self.reactor = reactor
        self.reload = reload
        self._before: Any = None

    def startService(self) -> None:
        super().startService()
        self._before = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> Any:
        signal.signal(signal.SIGHUP, self._before or signal.SIG_DFL)
        return super().stopService()

    def _hangup(self, signum: int, frame: FrameType | None) -> None:
        self.reactor.callFromThread(self.reload)
