"""The relay as one Twisted service: listener, telemetry, and the parts between."""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import attrs
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.filepath import FilePath

from coder1_relay import certs
from coder1_relay.context import Limits, PerAddress, RelayContext
from coder1_relay.pairing import Pairing, PairingPolicy
from coder1_relay.routing import Hub, HubSettings
from coder1_relay.store import IRelayStore, MemoryStore, write_in_thread
from coder1_relay.telemetry import Telemetry
from coder1_relay.tokens import TokenAuthority
from coder1_relay.web import STATIC, make_site
from coder1_wire import closecodes


@attrs.frozen
class RelaySettings:
    """Everything an operator can choose (see C{coder1_relay.tap.Options})."""

    listen: str = "tcp:8443:interface=127.0.0.1"
    state_dir: FilePath[str] = attrs.field(factory=certs.default_state_dir)
    tls_cert: FilePath[str] | None = None
    tls_key: FilePath[str] | None = None
    public_url: str | None = None
    allowed_origins: tuple[str, ...] = ()
    DEFAULT_HOSTNAMES: ClassVar[tuple[str, ...]] = ("localhost", "127.0.0.1", "::1")
    hostnames: tuple[str, ...] = DEFAULT_HOSTNAMES
    token_lifetime: float = 30 * 86400.0
    pairing: PairingPolicy = PairingPolicy()
    hub: HubSettings = HubSettings()
    limits: Limits = Limits()
    #: A line per HTTP request (twisted.web's combined log format): about 8 % of
    #: the relay's CPU while it pairs.
    access_log: bool = True


class GuardedTLSFactory(TLSMemoryBIOFactory):
    """
    TLS on top of the Site, behind a count of each client IP address's TCP
    connections (C{Limits.connections_per_ip}, C{new_connections_per_second}):
    past either, a new connection is closed at once, before any TLS work.
    """

    def __init__(
        self,
        context: RelayContext,
        tls: IOpenSSLServerConnectionCreator,
        wrapped: IProtocolFactory,
    ) -> None:
        super().__init__(tls, False, wrapped)
        self.context = context
        self.addresses = PerAddress(context.limits, context.clock)
        self._address_of: dict[IProtocol, str] = {}

    def buildProtocol(self, addr: IAddress | None) -> Any:
        address = getattr(addr, "host", None)
        if address is None:  # not IP (a UNIX socket): a local proxy's, not counted
            return super().buildProtocol(addr)
        if not self.addresses.admit(address):
            self.context.telemetry.throttled("connections")
            return None
        protocol = super().buildProtocol(addr)
        self._address_of[protocol] = address
        return protocol

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        address = self._address_of.pop(p, None)
        if address is not None:
            self.addresses.release(address)


def issuer_for(keys: certs.RelayKeys) -> str:
    """The C{iss} of this relay's tokens: names its signing key, so deployments differ."""
    raw = keys.signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "coder1-relay:" + hashlib.sha256(raw).hexdigest()[:16]


class RelayService(MultiService):
    """The relay: TLS 1.3 listener, WebSocket hub, pairing, telemetry."""

    log = Logger()

    def __init__(
        self, reactor: Any, settings: RelaySettings, store: IRelayStore | None = None
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.settings = settings
        settings.state_dir.makedirs(ignoreExistingDirectory=True)
        settings.state_dir.chmod(0o700)
        self.keys, _ = certs.load_or_create(
            settings.state_dir,
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
            hostnames=settings.hostnames,
        )
        self.fingerprint = certs.fingerprint(self.keys.tls_cert_pem)
        if store is None:
            # Group commit: pairings and revocations arriving together share one
            # write, made in a thread; each is answered once it is on disk.
            store = MemoryStore(
                path=settings.state_dir.child("pairings.json"),
                clock=reactor,
                writer=write_in_thread(reactor),
            )
        self.telemetry = Telemetry(settings.state_dir.child("telemetry.sqlite").path, reactor)
        self.telemetry.setServiceParent(self)
        tokens = TokenAuthority(
            self.keys.signing_key,
            issuer_for(self.keys),
            reactor,
            bridge_lifetime=settings.token_lifetime,
        )
        self.context = RelayContext(
            clock=reactor,
            store=store,
            tokens=tokens,
            pairing=Pairing(store, tokens, reactor, settings.pairing),
            # WebSockets go idle by the heartbeat: one idle timeout for HTTP and WebSockets.
            hub=Hub(
                store,
                self.telemetry,
                reactor,
                attrs.evolve(settings.hub, heartbeat_timeout=settings.limits.idle_timeout),
            ),
            telemetry=self.telemetry,
            public_url=settings.public_url or "",
            extra_origins=settings.allowed_origins,
            limits=settings.limits,
        )
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        self.listening = Deferred.fromCoroutine(self._listen())
        self.listening.addErrback(lambda f: self.log.failure("relay failed to listen", f))

    async def _listen(self) -> IListeningPort:
        endpoint = serverFromString(self.reactor, self.settings.listen)
        factory = GuardedTLSFactory(
            self.context,
            certs.server_tls_options(self.keys),
            make_site(self.context, access_log=self.settings.access_log),
        )
        self.port = port = await endpoint.listen(factory)
        if not self.context.public_url:
            self.context.public_url = f"https://localhost:{port.getHost().port}"
        if not FilePath(STATIC).descendant(["vendor", "xterm.mjs"]).exists():
            self.log.warn(
                "the IDE page's terminal assets are missing: run `npm ci && npm run vendor`"
            )
        self.log.info(
            "coder1 relay at {url} (certificate SHA-256 {fingerprint})",
            url=self.context.public_url,
            fingerprint=self.fingerprint,
        )
        return port

    async def _stop(self) -> None:
        await self.listening
        if self.port is not None:
            await maybeDeferred(self.port.stopListening)
        connections = self.context.connections
        for connection in list(connections.live):
            connection.close(closecodes.SHUTTING_DOWN, "relay shutting down")
        idle = connections.when_idle()

        def abort_stragglers() -> None:
            for connection in list(connections.live):
                connection.abort()

        timer = self.reactor.callLater(5, abort_stragglers)
        await idle
        if timer.active():
            timer.cancel()
        store = self.context.store
        if isinstance(store, MemoryStore):
            await store.flushed()
        await super().stopService()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())
