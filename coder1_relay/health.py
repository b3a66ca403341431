"""
Health, readiness and metrics on a private listener (C{--metrics-listen}).

| Path | Answer |
|------|--------|
| C{/healthz} | 200 C{ok}: the process is alive and its reactor turns. |
| C{/readyz} | 200 when ready for traffic, else 503; either way a line per check. |
| C{/metrics} | The Prometheus text format (C{coder1_relay.metrics}). |

Ready means: the public listener is listening, the store answers (a Redis
PING within the client's deadline; the in-memory store always does), and the
TLS certificate does not expire within L{CERTIFICATE_MARGIN}.  The answer's
wording is fixed: no path, address or name is in it.  L{judge} is the logic,
with no I/O and the time passed in; L{ReadinessProbe} gathers its inputs.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource, NoResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from coder1_relay.context import Seconds
from coder1_relay.metrics import CertificateExpiry, RelayCollector, RelayMetrics, snapshot

if TYPE_CHECKING:
    from coder1_relay.service import RelayService

#: A certificate that expires sooner than this (seconds) makes the relay not ready.
CERTIFICATE_MARGIN = 7 * 86400.0
#: Seconds a connection to the metrics listener may stay idle.
IDLE_TIMEOUT = 60.0


class Check(enum.Enum):
    """What readiness checks, in the order the answer lists them."""

    LISTENING = "listening"
    STORE = "store"
    CERTIFICATE = "certificate"


@attrs.frozen
class CheckResult:
    """One check: whether it passed, and what to say (fixed wording)."""

    check: Check
    ok: bool
    says: str


@attrs.frozen
class Readiness:
    """The checks' results, and the HTTP answer they make."""

    results: tuple[CheckResult, ...]

    @property
    def ready(self) -> bool:
        return all(result.ok for result in self.results)

    @property
    def status(self) -> int:
        return http.OK if self.ready else http.SERVICE_UNAVAILABLE

    def body(self) -> bytes:
        lines = ["ready" if self.ready else "not ready"]
        lines += [f"{r.check.value}: {r.says}" for r in self.results]
        return ("\n".join(lines) + "\n").encode()


def judge(
    now: float,
    *,
    listening: bool,
    store_reachable: bool,
    certificate_expires_at: float,
    margin: float = CERTIFICATE_MARGIN,
) -> Readiness:
    """Whether the relay is ready, from what was found at C{now} (no I/O)."""
    if certificate_expires_at <= now:
        certificate = CheckResult(Check.CERTIFICATE, False, "expired")
    elif certificate_expires_at - now < margin:
        days = f"{margin / 86400:g}"
        certificate = CheckResult(Check.CERTIFICATE, False, f"expires within {days} days")
    else:
        certificate = CheckResult(Check.CERTIFICATE, True, "ok")
    return Readiness(
        (
            CheckResult(Check.LISTENING, listening, "ok" if listening else "not listening"),
            CheckResult(Check.STORE, store_reachable, "ok" if store_reachable else "unreachable"),
            certificate,
        )
    )


@attrs.define
class ReadinessProbe:
    """
    Gathers what L{judge} needs: C{listening()}, a store C{ping()} (None: the
    in-memory store, always reachable) and C{certificate_expires_at()}.  Probes
    that arrive while a ping is under way share it.
    """

    clock: Seconds
    listening: Callable[[], bool]
    certificate_expires_at: Callable[[], float]
    ping: Callable[[], Deferred[Any]] | None = None
    _pinging: list[Deferred[bool]] | None = None

    async def check(self) -> Readiness:
        reachable = await self._reachable()
        return judge(
            self.clock.seconds(),
            listening=self.listening(),
            store_reachable=reachable,
            certificate_expires_at=self.certificate_expires_at(),
        )

    def _reachable(self) -> Deferred[bool]:
        waiting: Deferred[bool] = Deferred()
        if self.ping is None:
            waiting.callback(True)
            return waiting
        if self._pinging is not None:
            self._pinging.append(waiting)
            return waiting
        self._pinging = [waiting]

        def answered(result: object) -> None:
            pinging, self._pinging = self._pinging or [], None
            for each in pinging:
                each.callback(not isinstance(result, Failure))

        maybeDeferred(self.ping).addBoth(answered)
        return waiting


def listening(port: Callable[[], IListeningPort | None]) -> Callable[[], bool]:
    """Whether the port C{port()} returns is listening (not None, not stopped)."""

    def check() -> bool:
        current = port()
        # Twisted's TCP and UNIX ports say whether they still listen; others are taken at
        # their word.
        return current is not None and bool(getattr(current, "connected", True))

    return check


def _text(request: Request, status: int, body: bytes) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return body


class Alive(Resource):
    """C{/healthz}: answered by the reactor thread, so it says the process is alive."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _text(request, http.OK, b"ok\n")


class Ready(Resource):
    """C{/readyz}: the readiness checks' answer."""

    isLeaf = True
    log = Logger()

    def __init__(self, probe: ReadinessProbe) -> None:
        super().__init__()
        self.probe = probe

    def render_GET(self, request: Request) -> int:
        gone = [False]
        request.notifyFinish().addBoth(lambda _: gone.__setitem__(0, True))

        def answer(status: int, body: bytes) -> None:
            if not gone[0]:
                request.write(_text(request, status, body))
                request.finish()

        def failed(failure: Failure) -> None:
            self.log.failure("the readiness check failed", failure)
            answer(http.SERVICE_UNAVAILABLE, b"not ready\nthe checks failed: see the relay's log\n")

        Deferred.fromCoroutine(self.probe.check()).addCallbacks(
            lambda readiness: answer(readiness.status, readiness.body()), failed
        )
        return NOT_DONE_YET


class FreshMetrics(Resource):
    """
    C{/metrics}: prometheus_client's Twisted resource (a WSGI app, run in the
    reactor's thread pool), after the collector has taken its snapshot here, in
    the reactor thread.
    """

    isLeaf = True

    def __init__(self, collector: RelayCollector, exposition: IResource) -> None:
        super().__init__()
        self.collector = collector
        self.exposition = exposition

    def render(self, request: Request) -> Any:
        self.collector.refresh()
        return self.exposition.render(request)


class QuietSite(Site):
    """A Site that logs no request (a balancer probes every few seconds)."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def make_metrics_site(probe: ReadinessProbe, collector: RelayCollector, registry: Any) -> Site:
    """The private listener's tree: /healthz, /readyz, /metrics, and 404 elsewhere."""
    # Imported here: prometheus_client's Twisted module imports the global reactor.
    from prometheus_client.twisted import MetricsResource

    root = Resource()
    root.putChild(b"", NoResource("see /healthz, /readyz, /metrics"))
    root.putChild(b"healthz", Alive())
    root.putChild(b"readyz", Ready(probe))
    root.putChild(b"metrics", FreshMetrics(collector, MetricsResource(registry)))
    site = QuietSite(root, timeout=IDLE_TIMEOUT)
    site.displayTracebacks = False
    return site


class MetricsService(Service):
    """Listens on C{--metrics-listen} with L{make_metrics_site}, from start to stop."""

    log = Logger()

    def __init__(self, reactor: Any, description: str, site: Site) -> None:
        self.reactor = reactor
        self.description = description
        self.site = site
        self.port: IListeningPort | None = None
        self.listening: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self.listening = Deferred.fromCoroutine(self._listen())

    async def _listen(self) -> None:
        try:
            self.port = await serverFromString(self.reactor, self.description).listen(self.site)
        except Exception as e:
            self.log.error(
                "cannot serve metrics on {endpoint}: {reason}",
                endpoint=self.description,
                reason=str(e) or type(e).__name__,
            )
            return
        self.log.info("health and metrics on {endpoint}", endpoint=self.description)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.listening is not None:
            await self.listening
        if self.port is not None:
            port, self.port = self.port, None
            await maybeDeferred(port.stopListening)


def watch_relay(relay: RelayService, metrics: RelayMetrics) -> None:
    """
    Report C{relay}'s state in C{metrics} and serve them with health and
    readiness on C{--metrics-listen} (a child service of the relay's).
    """
    context = relay.context
    expiry = CertificateExpiry(lambda: relay.keys.tls_cert_pem)
    metrics.watch(lambda: snapshot(context.hub, context.connections, relay.telemetry, expiry()))
    description = relay.settings.metrics_listen
    assert description is not None
    redis = relay.redis
    probe = ReadinessProbe(
        relay.reactor,
        listening(lambda: relay.port),
        expiry,
        # A real PING, within the Redis client's deadline.
        None if redis is None else lambda: redis.client.call("PING"),
    )
    assert metrics.collector is not None
    site = make_metrics_site(probe, metrics.collector, metrics.registry)
    MetricsService(relay.reactor, description, site).setServiceParent(relay)
