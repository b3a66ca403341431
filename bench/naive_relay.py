"""
The baseline relay: a few lines of Autobahn that forward every message to the other
side of a room, and nothing else (no envelope, no sessions, no heartbeats).

Clients connect to ``/ROOM/a`` and ``/ROOM/b``; what one side sends, the other gets.
With ``--tls-cert`` and ``--tls-key`` it speaks TLS 1.3 with the same Twisted TLS layer
the relay uses.  Prints ``naive relay listening on PORT``.

    python -m bench.naive_relay [--tls-cert PEM --tls-key PEM]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import react


class Forward(WebSocketServerProtocol):
    def onOpen(self) -> None:
        room, _, side = self.http_request_path.strip("/").partition("/")
        self.me, self.other = (room, side), (room, "b" if side == "a" else "a")
        self.factory.sides[self.me] = self

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        other = self.factory.sides.get(self.other)
        if other is not None:
            other.sendMessage(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if getattr(self, "me", None) and self.factory.sides.get(self.me) is self:
            del self.factory.sides[self.me]


def _tls_factory(cert: str, key: str, wrapped: Any) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from OpenSSL import crypto
    from twisted.internet.ssl import CertificateOptions, TLSVersion
    from twisted.protocols.tls import TLSMemoryBIOFactory

    with open(cert, "rb") as f:
        certificate = x509.load_pem_x509_certificate(f.read())
    with open(key, "rb") as f:
        private = serialization.load_pem_private_key(f.read(), password=None)
    options = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(private),  # type: ignore[arg-type]
        certificate=crypto.X509.from_cryptography(certificate),
        raiseMinimumTo=TLSVersion.TLSv1_3,
        enableSessionTickets=False,
    )
    return TLSMemoryBIOFactory(options, False, wrapped)


async def _run(reactor: Any, options: argparse.Namespace) -> None:
    factory = WebSocketServerFactory()
    factory.protocol = Forward
    factory.sides = {}
    site: Any = factory
    if options.tls_cert:
        site = _tls_factory(options.tls_cert, options.tls_key, factory)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
    sys.stdout.write(f"naive relay listening on {port.getHost().port}\n")
    sys.stdout.flush()
    await Deferred()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_relay")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    options = parser.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(_run(reactor, options)))


if __name__ == "__main__":
    main()
