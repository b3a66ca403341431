"""The relay as one Twisted service: listener, telemetry, and the parts between."""

from __future__ import annotations

import itertools
import math
import os
import resource
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import attrs
from cryptography import x509
from twisted.application.internet import backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from coder1_relay import certs
from coder1_relay.context import Limits, PerAddress, RelayContext, connection_room
from coder1_relay.drain import DRAIN_TIMEOUT, Drain, exit_zero_after_sigterm
from coder1_relay.mesh import ISessionDirectory, Mesh
from coder1_relay.metric_labels import NotCounted, PairingCounts
from coder1_relay.nodelink import NodeLinks
from coder1_relay.pairing import Pairing, PairingPolicy
from coder1_relay.plain_http import PlainHTTPAnsweringTLS
from coder1_relay.redis_settings import REFUSAL_HINT, RedisSettings
from coder1_relay.reload import (
    CHECK_INTERVAL,
    CertificateReloader,
    ClientTLS,
    PairFiles,
    node_link_tls,
)
from coder1_relay.routing import Hub, HubSettings
from coder1_relay.startup_errors import listen_failure
from coder1_relay.store import IRelayStore, MemoryStore, StoreUnavailable, write_in_thread
from coder1_relay.telemetry import RETENTION, Telemetry, TelemetrySettings
from coder1_relay.tls_server import TLSServerFactory
from coder1_relay.tokens import TokenAuthority, issuer_for
from coder1_relay.web import STATIC, make_node_site, make_site
from coder1_wire.twistd_errors import CannotStart

if TYPE_CHECKING:
    from coder1_relay.metrics import RelayMetrics
    from coder1_relay.redis_store import RedisStore
    from coder1_relay.redis_telemetry import RedisTelemetry

#: Seconds before a node tries again to join its deployment while Redis does not
#: answer; doubled after each try, up to L{JOIN_RETRY_MAX}.
JOIN_RETRY = 0.5
JOIN_RETRY_MAX = 5.0


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
    telemetry: TelemetrySettings = TelemetrySettings()
    #: Where the state shared by a deployment's relay processes is kept (Redis);
    #: None: in this process's memory, and C{pairings.json} in C{state_dir}.
    store: RedisSettings | None = None
    #: With several relay nodes: the endpoint other nodes' links arrive at (TLS
    #: is added), how they reach it (C{host:port}; default: its interface and
    #: port), and the CA file their certificates are checked with (default: this
    #: node's own certificate when it is self-signed, else the system's CAs).
    node_listen: str = "tcp:0:interface=127.0.0.1"
    node_address: str | None = None
    node_ca: FilePath[str] | None = None
    #: Where health, readiness and metrics are served (plain HTTP; None: nowhere).
    metrics_listen: str | None = None
    #: Seconds a stopping relay waits for its connections to close and its store to flush.
    drain_timeout: float = DRAIN_TIMEOUT
    #: Seconds between two looks at the TLS files' modification times (reload.py).
    certificate_check_interval: float = CHECK_INTERVAL


class GuardedTLSFactory(TLSServerFactory):
    """
    TLS on top of the Site, behind a count of the relay's TCP connections
    (C{cap}, from C{Limits.max_connections} and the open-file limit) and of
    each client IP address's (C{Limits.connections_per_ip},
    C{new_connections_per_second}): past any, a new connection is closed at
    once, before any TLS work.
    """

    log = Logger()
    #: Seconds between two log lines saying that the relay is full.
    FULL_LOG_INTERVAL = 60.0
    #: Plain HTTP to this port is redirected to the https URL.
    protocol = PlainHTTPAnsweringTLS

    def __init__(
        self,
        context: RelayContext,
        tls: Callable[[], ssl.SSLContext],
        wrapped: IProtocolFactory,
        cap: int = 0,
    ) -> None:
        super().__init__(tls, wrapped)
        self.context = context
        self.cap = cap
        self.addresses = PerAddress(context.limits, context.clock)
        self._address_of: dict[IProtocol, str] = {}
        self._said_full_at = -math.inf

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if self.cap and len(self.protocols) >= self.cap:
            self.context.telemetry.throttled("connections")
            self._full()
            return None
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

    def https_url(self) -> str:
        """Where plain HTTP requests to this port are sent: the relay's public URL."""
        return self.context.public_url

    def _full(self) -> None:
        """Say why connections are refused, at most once a minute (each is counted)."""
        now = self.context.clock.seconds()
        if now - self._said_full_at >= self.FULL_LOG_INTERVAL:
            self._said_full_at = now
            self.log.warn(
                "refusing new connections: the relay holds {cap}, its most (--max-connections)",
                cap=self.cap,
            )


def open_file_limit() -> tuple[int | None, int | None]:
    """This process's C{RLIMIT_NOFILE}: soft and hard, None for unlimited."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    return (None if soft == unlimited else soft), (None if hard == unlimited else hard)


def home_relative(path: str) -> str:
    """C{path}, with the home directory as C{~}: shorter to read, and no user name in it."""
    home = os.path.expanduser("~")
    return "~" + path[len(home) :] if path.startswith(home + os.sep) else path


def _public_host(settings: RelaySettings) -> str:
    """The host name in the public URL: what the relay's certificate is for."""
    if settings.public_url is None:
        return "localhost"
    return urlsplit(settings.public_url).hostname or "localhost"


def node_trust(keys: certs.RelayKeys, node_ca: FilePath[str] | None) -> bytes | None:
    """
    The certificates a node trusts on the other nodes' listeners: C{node_ca}'s;
    else this node's own when it is self-signed (nodes share their
    certificate); else None, the system's CAs.
    """
    if node_ca is not None:
        return node_ca.getContent()
    leaf = x509.load_pem_x509_certificates(keys.tls_cert_pem)[0]
    return keys.tls_cert_pem if leaf.issuer == leaf.subject else None


def _pair_files(settings: RelaySettings) -> PairFiles:
    """The TLS pair's files: the operator's, else the dev certificate in the state directory."""
    if settings.tls_cert is not None and settings.tls_key is not None:
        return PairFiles(settings.tls_cert, settings.tls_key)
    state = settings.state_dir
    return PairFiles(
        state.child(certs.DEV_CERT_NAME),
        state.child(certs.DEV_KEY_NAME),
        certs.DEV_CERT_NAME,
        certs.DEV_KEY_NAME,
    )


class RelayService(MultiService):
    """The relay: TLS 1.3 listener, WebSocket hub, pairing, telemetry."""

    log = Logger()
    #: Called when the relay stops its reactor because it cannot run (C{twistd
    #: coder1-relay} makes the process exit with status 1).
    cannot_run: Callable[[], object] = staticmethod(lambda: None)

    def __init__(
        self,
        reactor: Any,
        settings: RelaySettings,
        store: IRelayStore | None = None,
        directory: ISessionDirectory | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.settings = settings
        #: The shared store, when C{settings.store} asks for one.
        self.redis: RedisStore | None = None
        settings.state_dir.makedirs(ignoreExistingDirectory=True)
        settings.state_dir.chmod(0o700)
        self.keys, _ = certs.load_or_create(
            settings.state_dir,
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
            hostnames=settings.hostnames,
        )
        self.fingerprint = certs.fingerprint(self.keys.tls_cert_pem)
        #: Reads the TLS pair again on SIGHUP and when its files change.
        self.certificates = CertificateReloader(
            reactor,
            _pair_files(settings),
            self.keys,
            self._reloaded,
            settings.certificate_check_interval,
        )
        self.certificates.setServiceParent(self)
        #: The node links' trust: kept in step with the certificate.
        self.node_tls = ClientTLS(
            node_link_tls(_public_host(settings), node_trust(self.keys, settings.node_ca))
        )
        if store is None:
            store = self._make_store(reactor, settings)
        #: The store itself (the context's times its calls, for the metrics).
        self.store = store
        metrics: PairingCounts = NotCounted()
        #: Its Prometheus metrics, when it serves them (C{--metrics-listen}).
        self.metrics: RelayMetrics | None = None
        if settings.metrics_listen is not None:
            self.metrics, store = _measured(store, reactor)
            metrics = self.metrics
        self.telemetry = Telemetry(
            settings.state_dir.child("telemetry.sqlite").path,
            reactor,
            settings=settings.telemetry,
            shared=self._shared_telemetry(settings),
        )
        self.telemetry.setServiceParent(self)
        tokens = TokenAuthority(
            self.keys.signing_key,
            issuer_for(self.keys.signing_key.public_key()),
            reactor,
            bridge_lifetime=settings.token_lifetime,
            accepted={issuer_for(key): key for key in self.keys.accepted},
        )
        # WebSockets go idle by the heartbeat: one idle timeout for HTTP and WebSockets.
        hub_settings = attrs.evolve(settings.hub, heartbeat_timeout=settings.limits.idle_timeout)
        hub = Hub(store, self.telemetry, reactor, hub_settings)
        if directory is None and self.redis is not None:
            directory = self._make_directory(reactor, self.redis, tokens.issuer)
        mesh = None
        if directory is not None:
            links = NodeLinks(
                reactor,
                tokens,
                self.node_tls,
                _public_host(settings),
                settings.limits,
                hub_settings.send_buffer,
            )
            mesh = Mesh(directory, hub, reactor, links)
        self.context = RelayContext(
            clock=reactor,
            store=store,
            tokens=tokens,
            pairing=Pairing(store, tokens, reactor, settings.pairing),
            hub=hub,
            mesh=mesh,
            telemetry=self.telemetry,
            public_url=settings.public_url or "",
            extra_origins=settings.allowed_origins,
            limits=settings.limits,
            dev_cert=None
            if settings.tls_cert
            else home_relative(settings.state_dir.child(certs.DEV_CERT_NAME).path),
            metrics=metrics,
        )
        self.port: IListeningPort | None = None
        self.node_port: IListeningPort | None = None
        if self.metrics is not None:
            from coder1_relay.health import watch_relay

            watch_relay(self, self.metrics)

    def reload_certificate(self) -> bool:
        """Serve the TLS pair now on disk, if it is good (what SIGHUP does)."""
        return self.certificates.reload()

    def _reloaded(self, keys: certs.RelayKeys) -> None:
        """
        A new pair is served: node links trust it too (and still the one before,
        which nodes that have not reloaded yet present).
        """
        before, self.keys = self.keys, keys
        self.fingerprint = certs.fingerprint(keys.tls_cert_pem)
        try:
            trust = node_trust(keys, self.settings.node_ca)
            if trust is not None and self.settings.node_ca is None:
                trust += node_trust(before, None) or b""
            self.node_tls.current = node_link_tls(_public_host(self.settings), trust)
        except (OSError, ValueError):
            self.log.error("--node-ca cannot be read: node links keep the CAs they had")

    def _make_directory(self, reactor: Any, redis: RedisStore, key_id: str) -> ISessionDirectory:
        """Several relay nodes on one Redis: who holds which session (docs/scaling.md)."""
        from coder1_relay.redis_directory import RedisDirectory

        return RedisDirectory(redis.client, reactor, key_id, prefix=redis.prefix)

    def _shared_telemetry(self, settings: RelaySettings) -> RedisTelemetry | None:
        """With a Redis store: every relay process's telemetry in it, in one place."""
        if self.redis is None:
            return None
        from coder1_relay.redis_telemetry import RedisTelemetry

        return RedisTelemetry(
            self.redis.client, RETENTION, settings.telemetry.crash_budget.per_relay
        )

    def _make_store(self, reactor: Any, settings: RelaySettings) -> IRelayStore:
        if settings.store is None:
            # Group commit: pairings and revocations arriving together share one
            # write, made in a thread; each is answered once it is on disk.
            return MemoryStore(
                path=settings.state_dir.child("pairings.json"),
                clock=reactor,
                writer=write_in_thread(reactor),
            )
        # The optional `redis` extra: imported only when asked for.
        from coder1_relay.redis_client import RedisClient
        from coder1_relay.redis_store import RedisStore

        client = RedisClient(reactor, settings.store)
        client.setServiceParent(self)
        self.redis = RedisStore(client)
        return self.redis

    def startService(self) -> None:
        super().startService()
        # Ports from tcp:, unix:, systemd: and the like are bound at once: a
        # listener that fails is raised from here, so twistd exits non-zero (a
        # daemon's parent too).  One that fails later stops the relay.
        starting = True

        def failed(reason: Failure) -> Failure | None:
            if reason.check(CancelledError):
                return None  # stopped before it was up (a node waiting for Redis)
            if starting and reason.check(CannotStart):
                return reason
            self._failed_to_listen(reason)
            return None

        self.listening = Deferred.fromCoroutine(self._listen())
        self.listening.addErrback(failed)
        starting = False
        failed_now: list[Failure] = []
        self.listening.addErrback(failed_now.append)
        if failed_now:
            failed_now[0].raiseException()
        self.store_checked = Deferred.fromCoroutine(self._check_store())

    async def _check_store(self) -> None:
        """Say where the shared state is, and, once Redis answers, what a crash of it could lose."""
        if self.redis is None:
            return
        settings = self.redis.client.settings
        self.log.info(
            "keeping shared state in Redis at {address} (keys {prefix}*)",
            address=settings.address,
            prefix=settings.prefix,
        )
        try:
            await self.redis.client.when_ready()
            notes = await self.redis.persistence()
        except StoreUnavailable:
            return  # the client has said why, and says when Redis is back
        for level, text in notes:
            self.log.emit(level, "{text}", text=text)

    def _failed_to_listen(self, reason: Failure) -> None:
        if not reason.check(CannotStart):
            self.log.failure("relay failed to start", reason)
            return
        # A listener that fails later (an endpoint that listens asynchronously):
        # a relay listening on nothing must not stay up.
        self.log.critical("{message}", message=reason.getErrorMessage())
        if getattr(self.reactor, "running", False):
            self.cannot_run()
            self.reactor.stop()

    async def _listen_on(
        self, description: str, option: str, factory: IProtocolFactory
    ) -> IListeningPort:
        """Listen on endpoint C{description}; L{CannotStart} says why not."""
        try:
            return await serverFromString(self.reactor, description).listen(factory)
        except Exception as e:
            raise listen_failure(description, option, e) from None

    async def _listen(self) -> IListeningPort:
        room = connection_room(self.settings.limits.max_connections, *open_file_limit())
        (self.log.warn if room.warn else self.log.info)("{room}", room=room.message)
        factory = GuardedTLSFactory(
            self.context,
            self.certificates.tls,
            make_site(self.context, access_log=self.settings.access_log),
            room.cap,
        )
        self.port = port = await self._listen_on(self.settings.listen, "--listen", factory)
        if not self.context.public_url:
            host: Any = port.getHost()
            self.context.public_url = f"https://localhost:{host.port}"
        if self.context.mesh is not None:
            await self._join(self.context.mesh)
        if not FilePath(STATIC).descendant(["vendor", "xterm.mjs"]).exists():
            self.log.warn(
                "the IDE page's terminal assets are missing: run `npm ci && npm run vendor`"
            )
        trust = f"; bridges trust it with --ca-cert {self.context.dev_cert}"
        self.log.info(
            "coder1 relay at {url} (certificate SHA-256 {fingerprint}){trust}",
            url=self.context.public_url,
            fingerprint=self.fingerprint,
            trust=trust if self.context.dev_cert else "",
        )
        return port

    async def _join(self, mesh: Mesh) -> None:
        """Listen for other nodes' links, and join the deployment."""
        node_factory = TLSServerFactory(self.certificates.tls, make_node_site(self.context))
        self.node_port = await self._listen_on(
            self.settings.node_listen, "--node-listen", node_factory
        )
        host: Any = self.node_port.getHost()
        address = self.settings.node_address or f"{host.host}:{host.port}"
        # Redis may be down or slow now (started after the relay, restarting, a
        # loaded host): the node joins once it answers.  A refusal (password,
        # database) is final: the relay stops.
        delay = backoffPolicy(JOIN_RETRY, JOIN_RETRY_MAX, factor=2.0, jitter=lambda: 0.0)
        for attempt in itertools.count():
            try:
                await mesh.directory.start(address)
                break
            except StoreUnavailable as e:
                refusal = self.redis.client.refusal if self.redis is not None else None
                if refusal is not None:
                    raise CannotStart(f"{refusal}; {REFUSAL_HINT}") from None
                if attempt == 0:
                    self.log.warn(
                        "cannot join the deployment yet ({why}); trying again until Redis "
                        "answers: check that it runs and that --store names it",
                        why=str(e),
                    )
            await deferLater(self.reactor, delay(attempt))
        self.log.info("relay node {node} joined at {address}", node=mesh.node, address=address)

    async def _stop(self) -> None:
        self.listening.cancel()  # a node still waiting to join stops waiting
        await self.listening
        mesh = self.context.mesh
        store = self.store  # not the metrics' timing wrapper

        async def leave() -> None:
            # Leave first: the connections closed next reconnect to other nodes,
            # which may claim this node's sessions at once.
            assert mesh is not None
            if self.node_port is not None:
                await maybeDeferred(self.node_port.stopListening)
            await mesh.directory.stop()

        await Drain(self.reactor, self.settings.drain_timeout).run(
            [self.port] if self.port is not None else [],
            (lambda: Deferred.fromCoroutine(leave())) if mesh is not None else None,
            self.context.connections,
            store.flushed if isinstance(store, MemoryStore) else lambda: succeed(None),
        )
        if mesh is not None:
            mesh.stop()
        # Telemetry before the store's client: with Redis, its last batch goes there.
        await self.telemetry.stopService()
        await super().stopService()
        exit_zero_after_sigterm(self.reactor)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())


def _measured(store: IRelayStore, reactor: Any) -> tuple[RelayMetrics, IRelayStore]:
    """
    The metrics of a relay that serves them, and its store timed for them.
    Only then is prometheus_client loaded (C{coder1_relay.metric_labels}).
    """
    from coder1_relay.metrics import RelayMetrics, TimedStore

    metrics = RelayMetrics()
    return metrics, TimedStore(store, metrics.store_seconds, reactor)
