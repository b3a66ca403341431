"""
Why the relay could not be reached, said for a person: what happened and
what to try, never an exception class or OpenSSL's own words.

L{WitnessedTLS} keeps the certificate a relay presented even when the
handshake refused it, so that a self-signed relay can be named by its
fingerprint, to compare with the one the relay printed when it started.
"""

from __future__ import annotations

import errno
from datetime import UTC, datetime
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from coder1_bridge.config import RelayAddress

#: Where a development relay keeps its certificate, as the README says.
DEV_CERT = "~/.local/state/coder1-relay/dev-cert.pem"


class ProxyRefused(Exception):
    """The HTTP proxy answered CONNECT with something else than 200."""

    def __init__(self, proxy: str, status: int, reason: str) -> None:
        super().__init__(f"{proxy} answered {status} {reason}")
        self.proxy, self.status, self.reason = proxy, status, reason


class ProxyUnreachable(Exception):
    """The HTTP proxy itself could not be reached; C{cause} says why."""

    def __init__(self, proxy: str, cause: BaseException) -> None:
        super().__init__(f"{proxy}: {cause}")
        self.proxy, self.cause = proxy, cause


class UpgradeRefused(Exception):
    """The relay answered the WebSocket handshake with an HTTP error."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@implementer(IOpenSSLClientConnectionCreator)
@attrs.define
class WitnessedTLS:
    """Client TLS settings that remember the last connection they made."""

    creator: IOpenSSLClientConnectionCreator
    last: SSL.Connection | None = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        self.last = self.creator.clientConnectionForTLS(tlsProtocol)
        return self.last

    def presented(self) -> x509.Certificate | None:
        """The leaf certificate the relay sent last, verified or not."""
        if self.last is None:
            return None
        chain = self.last.get_peer_cert_chain(as_cryptography=True)
        return chain[0] if chain else None


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256, as C{openssl x509 -fingerprint -sha256} and the relay print it."""
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


@attrs.frozen
class Where:
    """What was being reached, to say it."""

    relay: RelayAddress
    #: What the person can do with a certificate, e.g. "pair again with --ca-cert FILE".
    ca_hint: str = "pass the relay's certificate with --ca-cert FILE"

    @property
    def address(self) -> str:
        return f"{self.relay.host}:{self.relay.port}"


def explain(
    failure: Failure | BaseException,
    where: Where,
    now: float,
    presented: x509.Certificate | None = None,
) -> str:
    """
    One or two sentences: what went wrong reaching the relay, and what to try.
    C{now} dates an expired certificate; C{presented} is the certificate the
    relay sent, if the handshake got that far.
    """
    cause = _root(_value(failure))
    if isinstance(cause, ProxyUnreachable):
        return (
            f"The proxy {cause.proxy} (HTTPS_PROXY) cannot be reached: "
            f"{_network(_root(cause.cause), where, proxy=cause.proxy)}"
        )
    if isinstance(cause, ProxyRefused):
        return (
            f"The proxy {cause.proxy} refused to open a tunnel to {where.address} "
            f"(HTTP {cause.status} {cause.reason}). Check HTTPS_PROXY, or list "
            f"{where.relay.host} in NO_PROXY if the relay is reachable without it."
        )
    if isinstance(cause, UpgradeRefused):
        return _upgrade(cause.status, where)
    if _is_tls(cause):
        return _tls(cause, where, now, presented)
    return _network(cause, where)


def _root(cause: BaseException) -> BaseException:
    """The cause under Twisted's wrappers (ResponseNeverReceived and the like)."""
    reasons = getattr(cause, "reasons", None)
    if reasons:
        causes = [_root(_value(r)) for r in reasons]
        tls = [c for c in causes if _is_tls(c)]
        return (tls or causes)[0]
    return cause


def _value(failure: Failure | BaseException) -> BaseException:
    if isinstance(failure, Failure):
        return failure.value if failure.value is not None else error.ConnectionDone()
    return failure


def _is_tls(cause: BaseException) -> bool:
    return isinstance(cause, SSL.Error | VerificationError)


def _tls(cause: BaseException, where: Where, now: float, presented: x509.Certificate | None) -> str:
    address, host = where.address, where.relay.host
    words = str(cause).lower()
    if isinstance(cause, VerificationError):
        names = _names(presented)
        named = f" (it is for {names})" if names else ""
        return (
            f"The relay's certificate is not for {host}{named}. Use the name the certificate "
            "was made for in --relay, or, for a development relay, start it with --hostname "
            f"{host}."
        )
    if "certificate verify failed" in words:
        return _untrusted(where, now, presented)
    if "unsupported protocol" in words or "protocol version" in words:
        return (
            f"The server at {address} does not speak TLS 1.3, which the bridge requires. "
            "Is it the relay, and up to date?"
        )
    if any(w in words for w in ("wrong version number", "packet length", "record layer", "http")):
        return (
            f"Something answers at {address}, but not with TLS: is that the relay's HTTPS "
            "port (check --relay)?"
        )
    return (
        f"The secure connection to the relay at {address} failed during the TLS handshake. "
        "Run `coder1-bridge doctor` to see which step fails."
    )


def _untrusted(where: Where, now: float, presented: x509.Certificate | None) -> str:
    if presented is None:
        return (
            f"The relay's certificate at {where.address} is not trusted by this machine. "
            f"If it is a development relay, {where.ca_hint} ({DEV_CERT})."
        )
    shown = fingerprint(presented)
    expires = presented.not_valid_after_utc
    if expires.timestamp() < now:
        return (
            f"The relay's certificate expired on {expires:%Y-%m-%d}. The relay's operator "
            "must renew it (a development relay makes a new one when it restarts); then "
            f"{where.ca_hint}."
        )
    if where.relay.ca_cert_pem is not None:
        return (
            "The relay's certificate is not the one this bridge trusts (the relay's: "
            f"SHA-256 {shown}). If the relay made a new certificate (a development relay does "
            "when its own expires or its names change), compare that fingerprint with the one "
            f"it printed and {where.ca_hint}; if not, someone may be intercepting."
        )
    if presented.issuer == presented.subject:
        return (
            "The relay's certificate is self-signed, so this machine cannot check it. If it is "
            f"your development relay, compare its fingerprint, SHA-256 {shown}, with the one the "
            f"relay printed when it started, and {where.ca_hint} ({DEV_CERT})."
        )
    return (
        "The relay's certificate is not signed by an authority this machine trusts (SHA-256 "
        f"{shown}). Install that authority, or {where.ca_hint}."
    )


def _names(certificate: x509.Certificate | None) -> str:
    if certificate is None:
        return ""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ""
    names = [str(n.value) for n in san.value]
    return ", ".join(names[:5])


def _network(cause: BaseException, where: Where, proxy: str | None = None) -> str:
    """A failure below TLS, reaching the relay (or C{proxy}, when given: HTTPS_PROXY)."""
    party = "the proxy" if proxy else "the relay"
    address = proxy.split("://")[-1] if proxy else where.address
    host = address.rsplit(":", 1)[0] if proxy else where.relay.host
    option = "HTTPS_PROXY" if proxy else "--relay"
    if isinstance(cause, error.ConnectionRefusedError):
        return (
            f"Nothing accepts connections at {address}: is {party} running, and is the port "
            f"in {option} right?"
        )
    if isinstance(cause, error.DNSLookupError):
        return (
            f"The name {host} cannot be found (DNS): check the spelling in {option} and this "
            "machine's network."
        )
    if isinstance(cause, error.TimeoutError | TimeoutError):
        return (
            f"{party.capitalize()} at {address} does not answer (timed out): check the "
            "address, this machine's network, or a firewall in between."
        )
    if isinstance(cause, error.NoRouteError) or _os_errno(cause) in (
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
    ):
        return f"This machine has no route to {host}: is it online?"
    if isinstance(cause, error.ConnectionLost | error.ConnectionDone):
        return (
            f"The server at {address} closed the connection before answering: is it "
            f"{party} ({option})?"
        )
    return (
        f"{party.capitalize()} at {address} cannot be reached. Run `coder1-bridge doctor` to "
        "see which step fails."
    )


def _os_errno(cause: BaseException) -> int | None:
    os_error = getattr(cause, "osError", None)
    if isinstance(os_error, int):
        return os_error
    return os_error.errno if isinstance(os_error, OSError) else None


def _upgrade(status: int, where: Where) -> str:
    if status == 429:
        return (
            "The relay refuses more connections from this address for now (too many at once): "
            "it will let the bridge in again shortly."
        )
    if status in (404, 405):
        return f"{where.relay.url} answers, but has no bridge endpoint: is it the relay's address?"
    return f"The relay at {where.address} answered with an error (HTTP {status})."


#: The first Unix time Python's dates cannot show.
_YEAR_10000 = 253_402_300_800


def describe_time(timestamp: object) -> str:
    """A relay's Unix time for people (C{2025-01-31 14:02 UTC}); else "an unknown date"."""
    if (
        isinstance(timestamp, int | float)
        and not isinstance(timestamp, bool)
        and 0 <= timestamp < _YEAR_10000
    ):
        return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "an unknown date"
