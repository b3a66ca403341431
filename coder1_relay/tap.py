"""C{twistd coder1-relay}: options in, a RelayService out."""

from __future__ import annotations

from typing import Any

from twisted.python import usage
from twisted.python.filepath import FilePath

from coder1_relay.certs import default_state_dir
from coder1_relay.service import RelayService, RelaySettings


class Options(usage.Options):
    """Options for the relay; every listening address is an endpoint string."""

    synopsis = "[options]"
    longdesc = (
        "Runs the Coder1 relay: serves the IDE page, issues pairing codes, and forwards "
        "frames between browsers and their paired bridges over TLS 1.3 WebSockets. With no "
        "options it listens on 127.0.0.1:8443 with a self-signed development certificate."
    )
    optParameters = [
        [
            "listen",
            "l",
            "tcp:8443:interface=127.0.0.1",
            "Socket endpoint to listen on (TLS is added).",
        ],
        [
            "state-dir",
            "s",
            None,
            "Keys, dev certificate, pairings, telemetry (default: XDG state dir).",
        ],
        [
            "tls-cert",
            None,
            None,
            "PEM certificate chain (leaf first) instead of the dev certificate.",
        ],
        ["tls-key", None, None, "PEM private key for --tls-cert."],
        [
            "public-url",
            None,
            None,
            "The URL users reach this relay at (default https://localhost:PORT).",
        ],
        ["token-days", None, 30.0, "Lifetime of bridge tokens, in days.", float],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["allowed-origin"] = []
        self["hostname"] = []

    def opt_allowed_origin(self, origin: str) -> None:
        """Another origin allowed to open IDE WebSockets (repeatable)."""
        self["allowed-origin"].append(origin.rstrip("/"))

    def opt_hostname(self, name: str) -> None:
        """A name or address the dev certificate covers (repeatable; default: loopback)."""
        self["hostname"].append(name)

    def postOptions(self) -> None:
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["token-days"] <= 0:
            raise usage.UsageError("--token-days must be positive")
        url = self["public-url"]
        if url is not None and not url.startswith("https://"):
            raise usage.UsageError("--public-url must be an https:// URL")

    def settings(self) -> RelaySettings:
        """The settings these options describe."""
        return RelaySettings(
            tls_cert=FilePath(self["tls-cert"]) if self["tls-cert"] else None,
            tls_key=FilePath(self["tls-key"]) if self["tls-key"] else None,
            hostnames=tuple(self["hostname"]) or RelaySettings.DEFAULT_HOSTNAMES,
            listen=self["listen"],
            state_dir=FilePath(self["state-dir"]) if self["state-dir"] else default_state_dir(),
            public_url=self["public-url"].rstrip("/") if self["public-url"] else None,
            allowed_origins=tuple(self["allowed-origin"]),
            token_lifetime=self["token-days"] * 86400.0,
        )


def makeService(options: Options) -> RelayService:
    """The relay service for C{twistd coder1-relay}."""
    from twisted.internet import reactor

    reactor_: Any = reactor
    return RelayService(reactor_, options.settings())
