"""
The relay's Prometheus metrics: content-free by construction.

Every label value comes from an enum (below, or in
C{coder1_relay.metric_labels}), and every number is a count, a size, a duration
or a time: no session id, address, label, path or payload can reach a metric,
whatever a party sends.  Each relay has a registry of its
own (not prometheus_client's global one), so that tests and several relays in
one process do not collide.  Only a relay that serves them (C{--metrics-listen})
loads this module; the label values the rest of the relay names are in
C{coder1_relay.metric_labels}.

The forwarding path stays cheap: the hub counts frames and bytes in plain
integers (C{coder1_relay.routing}), and L{RelayCollector} turns them, and the
hub's and connections' state, into metric families when scraped.  Scrapes
are answered in a thread of the reactor's pool (prometheus_client's Twisted
resource is a WSGI app), so what the collector reports is a L{Snapshot}
taken in the reactor thread (L{RelayCollector.refresh}), never the live
dicts, which the reactor changes meanwhile.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from autobahn.websocket.protocol import WebSocketProtocol
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python import threadable
from zope.interface import implementer

from coder1_relay.metric_labels import PairingOutcome, Role
from coder1_relay.store import BridgeRecord, IRelayStore, PendingCode, Presence

if TYPE_CHECKING:
    from coder1_relay.context import Connections
    from coder1_relay.routing import Hub
    from coder1_relay.telemetry import Telemetry

PREFIX = "coder1_relay"
#: A WebSocket whose opening handshake is done and that is not closing.
_OPEN = WebSocketProtocol.STATE_OPEN


class ThrottleReason(enum.Enum):
    """Why a limit throttled or refused a client (C{coder1_relay.telemetry.THROTTLE_REASONS})."""

    RATE = "rate"
    CONNECTIONS = "connections"
    SESSIONS = "sessions"
    PAIRING = "pairing"
    TIMEOUT = "timeout"


class Direction(enum.Enum):
    """Which way a forwarded frame went."""

    TO_BRIDGE = "to_bridge"
    TO_BROWSER = "to_browser"


class StoreOperation(enum.Enum):
    """The store's operations (L{IRelayStore}'s methods), timed by L{TimedStore}."""

    ADD_CODE = "add_code"
    TAKE_CODE = "take_code"
    HIT = "hit"
    COUNT = "count"
    RELEASE = "release"
    REVOKE = "revoke"
    IS_REVOKED = "is_revoked"
    NEXT_PEER = "next_peer"
    ADD_BRIDGE = "add_bridge"
    SET_BRIDGE_KEY = "set_bridge_key"
    BRIDGES = "bridges"
    SET_PRESENCE = "set_presence"
    CLEAR_PRESENCE = "clear_presence"
    CLEAR_ALL_PRESENCE = "clear_all_presence"
    PRESENCE = "presence"


#: Seconds: a local Redis answers in well under a millisecond; the deadline is 2 s.
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@attrs.frozen
class Snapshot:
    """What the collector reports, read at one moment in the reactor thread."""

    connections: Mapping[Role, int]
    paired_sessions: int
    held_connections: int
    frames: Mapping[Direction, int]
    bytes: Mapping[Direction, int]
    heartbeat_closes: int
    throttles: Mapping[ThrottleReason, int]
    #: When the relay's certificate expires, unix seconds.
    certificate_expires_at: float


def certificate_expiry(cert_pem: bytes) -> float:
    """When the leaf (first) certificate of a PEM chain expires, unix seconds."""
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()


@attrs.define
class CertificateExpiry:
    """The expiry of the certificate C{cert_pem()} returns; parsed again only when it changes."""

    cert_pem: Callable[[], bytes]
    _seen: bytes = b""
    _expires_at: float = 0.0

    def __call__(self) -> float:
        pem = self.cert_pem()
        if pem != self._seen:
            self._seen, self._expires_at = pem, certificate_expiry(pem)
        return self._expires_at


def snapshot(
    hub: Hub,
    connections: Connections,
    telemetry: Telemetry,
    certificate_expires_at: float,
) -> Snapshot:
    """The relay's state as the metrics report it (no content: counts only)."""
    roles = dict.fromkeys(Role, 0)
    for connection in connections.live:
        role = getattr(connection, "metrics_role", None)
        if isinstance(role, Role) and getattr(connection, "state", None) == _OPEN:
            roles[role] += 1
    endpoints = hub.endpoints()
    return Snapshot(
        connections=roles,
        paired_sessions=hub.paired_sessions(),
        held_connections=sum(1 for e in endpoints if e.holds),
        frames={
            Direction.TO_BRIDGE: hub.frames_to_bridge,
            Direction.TO_BROWSER: hub.frames_to_browser,
        },
        bytes={
            Direction.TO_BRIDGE: hub.bytes_to_bridge,
            Direction.TO_BROWSER: hub.bytes_to_browser,
        },
        heartbeat_closes=hub.heartbeat_closes,
        throttles={r: telemetry.throttle_totals.get(r.value, 0) for r in ThrottleReason},
        certificate_expires_at=certificate_expires_at,
    )


def families(state: Snapshot) -> Iterable[Metric]:
    """The metric families of a snapshot; every label value is an enum's."""
    connections = GaugeMetricFamily(
        f"{PREFIX}_connections", "WebSocket connections open, by role.", labels=["role"]
    )
    for role in Role:
        connections.add_metric([role.value], state.connections[role])
    yield connections
    yield GaugeMetricFamily(
        f"{PREFIX}_paired_sessions",
        "Browser sessions held by this process with a bridge connected.",
        value=state.paired_sessions,
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_held_connections",
        "Connections not read now (flow control: what they feed is congested, or a rate).",
        value=state.held_connections,
    )
    frames = CounterMetricFamily(
        f"{PREFIX}_forwarded_frames",
        "End-to-end frames forwarded, by direction (each tab's copy counted).",
        labels=["direction"],
    )
    sent = CounterMetricFamily(
        f"{PREFIX}_forwarded_bytes",
        "Bytes of end-to-end frames forwarded, by direction.",
        labels=["direction"],
    )
    for direction in Direction:
        frames.add_metric([direction.value], state.frames[direction])
        sent.add_metric([direction.value], state.bytes[direction])
    yield frames
    yield sent
    yield CounterMetricFamily(
        f"{PREFIX}_heartbeat_closes",
        "Connections closed because nothing was heard from them for the idle timeout.",
        value=state.heartbeat_closes,
    )
    throttles = CounterMetricFamily(
        f"{PREFIX}_throttles",
        "Clients throttled or refused by a limit, by reason.",
        labels=["reason"],
    )
    for reason in ThrottleReason:
        throttles.add_metric([reason.value], state.throttles[reason])
    yield throttles
    yield GaugeMetricFamily(
        f"{PREFIX}_certificate_expiry_timestamp_seconds",
        "When the relay's TLS certificate expires (unix seconds).",
        value=state.certificate_expires_at,
    )


@attrs.define(eq=False)
class RelayCollector(Collector):
    """
    Reports L{snapshot}s: taken at once when collected in the reactor thread,
    else the last one L{refresh} took (a scrape's thread must not read the
    reactor's dicts while it changes them).
    """

    take: Callable[[], Snapshot]
    _latest: Snapshot | None = None

    def refresh(self) -> None:
        """Take a snapshot now (in the reactor thread), for the next collection."""
        self._latest = self.take()

    def collect(self) -> Iterable[Metric]:
        latest = self._latest
        if threadable.isInIOThread() or latest is None:
            latest = self.take()
        return list(families(latest))


@attrs.define(eq=False)
class RelayMetrics:
    """
    A relay's registry: the collector of its state, and the few metrics counted
    where they happen (pairing and store calls, never per frame).
    """

    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    pairings: Counter = attrs.field(init=False)
    codes_issued: Counter = attrs.field(init=False)
    store_seconds: Histogram = attrs.field(init=False)
    collector: RelayCollector | None = None

    def __attrs_post_init__(self) -> None:
        self.pairings = Counter(
            f"{PREFIX}_pairings",
            "Code redemptions by bridges (POST /api/pair), by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in PairingOutcome:
            self.pairings.labels(outcome.value)
        self.codes_issued = Counter(
            f"{PREFIX}_codes_issued", "Pairing codes issued to browsers.", registry=self.registry
        )
        self.store_seconds = Histogram(
            f"{PREFIX}_store_operation_seconds",
            "How long the relay's store took to answer, by operation.",
            ["operation"],
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)

    def issued(self) -> None:
        """A pairing code was issued."""
        self.codes_issued.inc()

    def paired(self, outcome: PairingOutcome) -> None:
        """A redemption ended with C{outcome}."""
        self.pairings.labels(outcome.value).inc()

    def watch(self, take: Callable[[], Snapshot]) -> None:
        """Report the relay's state as C{take} reads it."""
        self.collector = RelayCollector(take)
        self.registry.register(self.collector)


@implementer(IRelayStore)
@attrs.frozen
class TimedStore:
    """An L{IRelayStore} that times every call of the store it wraps, on C{clock}."""

    store: IRelayStore
    histogram: Histogram
    clock: IReactorTime
    #: Each operation's histogram, looked up once (C{labels} takes a lock and builds a key).
    _children: dict[StoreOperation, Any] = attrs.field(
        init=False,
        default=attrs.Factory(
            lambda self: {op: self.histogram.labels(op.value) for op in StoreOperation},
            takes_self=True,
        ),
    )

    def _timed(self, operation: StoreOperation, answer: Deferred[Any]) -> Deferred[Any]:
        started = self.clock.seconds()
        child = self._children[operation]
        if answer.called and not answer.paused:
            # Answered already (a store in memory): no callback to add and run.
            child.observe(max(0.0, self.clock.seconds() - started))
            return answer

        def observe(result: object) -> object:
            child.observe(max(0.0, self.clock.seconds() - started))
            return result

        return answer.addBoth(observe)

    def add_code(self, code: str, pending: PendingCode, now: float) -> Deferred[bool]:
        return self._timed(StoreOperation.ADD_CODE, self.store.add_code(code, pending, now))

    def take_code(self, code: str, now: float) -> Deferred[PendingCode | None]:
        return self._timed(StoreOperation.TAKE_CODE, self.store.take_code(code, now))

    def hit(self, key: str, now: float, window: float, limit: int) -> Deferred[float | None]:
        return self._timed(StoreOperation.HIT, self.store.hit(key, now, window, limit))

    def count(self, key: str, now: float, window: float) -> Deferred[int]:
        return self._timed(StoreOperation.COUNT, self.store.count(key, now, window))

    def release(self, key: str, now: float) -> Deferred[None]:
        return self._timed(StoreOperation.RELEASE, self.store.release(key, now))

    def revoke(self, jti: str, expires_at: float, now: float) -> Deferred[None]:
        return self._timed(StoreOperation.REVOKE, self.store.revoke(jti, expires_at, now))

    def is_revoked(self, jti: str, now: float) -> Deferred[bool]:
        return self._timed(StoreOperation.IS_REVOKED, self.store.is_revoked(jti, now))

    def next_peer(self, session: str) -> Deferred[int]:
        return self._timed(StoreOperation.NEXT_PEER, self.store.next_peer(session))

    def add_bridge(self, session: str, record: BridgeRecord) -> Deferred[None]:
        return self._timed(StoreOperation.ADD_BRIDGE, self.store.add_bridge(session, record))

    def set_bridge_key(
        self, session: str, peer: int, bridge_key: str
    ) -> Deferred[BridgeRecord | None]:
        return self._timed(
            StoreOperation.SET_BRIDGE_KEY, self.store.set_bridge_key(session, peer, bridge_key)
        )

    def bridges(self, session: str, now: float) -> Deferred[list[BridgeRecord]]:
        return self._timed(StoreOperation.BRIDGES, self.store.bridges(session, now))

    def set_presence(self, session: str, presence: Presence) -> Deferred[None]:
        return self._timed(StoreOperation.SET_PRESENCE, self.store.set_presence(session, presence))

    def clear_presence(self, session: str, peer: int) -> Deferred[None]:
        return self._timed(StoreOperation.CLEAR_PRESENCE, self.store.clear_presence(session, peer))

    def clear_all_presence(self, session: str) -> Deferred[None]:
        return self._timed(
            StoreOperation.CLEAR_ALL_PRESENCE, self.store.clear_all_presence(session)
        )

    def presence(self, session: str) -> Deferred[list[Presence]]:
        return self._timed(StoreOperation.PRESENCE, self.store.presence(session))
