"""The relay's parts, wired once by tap.py and shared by the web and WebSocket layers."""

from __future__ import annotations

from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from coder1_relay.mesh import Mesh
from coder1_relay.metric_labels import NotCounted, PairingCounts
from coder1_relay.pairing import Pairing
from coder1_relay.routing import Hub
from coder1_relay.store import BridgeRecord, IRelayStore
from coder1_relay.telemetry import Telemetry
from coder1_relay.tokens import TokenAuthority

#: The browser session cookie; C{__Host-} makes browsers insist on Secure, Path=/ and no Domain.
SESSION_COOKIE = "__Host-coder1-session"


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


def _not_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be 0 (no limit) or more, not {value!r}")


@attrs.frozen
class Limits:
    """
    What one client may take of the relay.  Every field is a twistd option
    (C{coder1_relay.tap}); README.md ("Limits") gives the reasons for the
    defaults, docs/protocol.md the answers a client gets past them.
    """

    #: Largest WebSocket message, and frame, header included (bytes); past it: close 1009.
    max_message_size: int = attrs.field(default=1024 * 1024, validator=_positive)
    #: Seconds an HTTP request (a WebSocket opening handshake too) may take to arrive
    #: whole, from its first byte; past it the connection is dropped (slowloris).
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Largest HTTP request body (bytes); more is not even kept: 413.
    max_body_size: int = attrs.field(default=16 * 1024, validator=_positive)
    #: Seconds from TCP connect to a finished TLS handshake; past it: dropped.
    tls_handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Seconds an HTTP connection may stay open with nothing received between
    #: requests.  (WebSockets go idle by C{HubSettings.heartbeat_timeout}, which
    #: C{--idle-timeout} sets too.)
    idle_timeout: float = attrs.field(default=45.0, validator=_positive)
    #: Messages (and WebSocket pings) a second an IDE connection may send, in
    #: bursts of up to C{message_burst}; past it: close 4029, C{too many messages}.
    messages_per_second: float = attrs.field(default=200.0, validator=_positive)
    message_burst: int = attrs.field(default=400, validator=_positive)
    #: The same for a bridge, whose output is bulk: past it the relay reads the
    #: bridge's socket more slowly (TCP backpressure), it never closes it.
    bridge_messages_per_second: float = attrs.field(default=5000.0, validator=_positive)
    bridge_message_burst: int = attrs.field(default=10000, validator=_positive)
    #: TCP connections open at once from one client IP address (0: no limit);
    #: past it a new connection is closed at once, before TLS.
    connections_per_ip: int = attrs.field(default=64, validator=_not_negative)
    #: New TCP connections a second from one client IP address, in bursts of up
    #: to C{new_connection_burst} (0: no limit); past it: closed at once, before TLS.
    new_connections_per_second: float = attrs.field(default=20.0, validator=_not_negative)
    new_connection_burst: int = attrs.field(default=200, validator=_positive)
    #: IDE WebSockets open at once per browser session; past it: HTTP 429 at the handshake.
    ide_connections_per_session: int = attrs.field(default=16, validator=_positive)
    #: Paired (unexpired, unrevoked) bridges per browser session; past it: 409
    #: when the browser asks for a code and when a bridge redeems one.
    bridges_per_session: int = attrs.field(default=16, validator=_positive)
    #: TCP connections open at once over the whole relay (0: as many as the
    #: open-file limit leaves, L{connection_room}); past it a new connection is
    #: closed at once, before TLS.
    max_connections: int = attrs.field(default=0, validator=_not_negative)


#: File descriptors the relay keeps for itself, not for connections: its listening
#: socket, log, telemetry database, state file writes, the reactor's and its threads'.
FD_RESERVE = 64


@attrs.frozen
class ConnectionRoom:
    """How many TCP connections the relay holds at once, and what it says about that at start."""

    #: 0: no cap (no open-file limit, and no C{--max-connections}).
    cap: int
    message: str
    #: Whether the message is a warning: the cap could be higher, or is lower than asked.
    warn: bool


def connection_room(max_connections: int, soft: int | None, hard: int | None) -> ConnectionRoom:
    """
    The relay-wide cap on connections: C{max_connections} if given, else what
    the open-file limit (C{RLIMIT_NOFILE}, C{soft} and C{hard}; None: none)
    leaves after L{FD_RESERVE}, and never more than that.  A paired session
    holds two connections (a tab and its bridge), so the message says how
    many sessions fit.
    """
    how = "ulimit -n, or LimitNOFILE= in a systemd unit"
    fits = None if soft is None else max(1, soft - FD_RESERVE)
    derived = not max_connections or (fits is not None and max_connections > fits)
    if fits is None and derived:
        return ConnectionRoom(0, "no open-file limit and no --max-connections: no cap", False)
    cap = fits if derived and fits is not None else max_connections
    why = (
        f"RLIMIT_NOFILE {soft}, less {FD_RESERVE} for its own files"
        if derived
        else "--max-connections"
    )
    said = (
        f"room for {cap} connections ({why}): about {cap // 2} paired sessions"
        " (a browser tab and a bridge each)"
    )
    if max_connections > cap:
        return ConnectionRoom(
            cap,
            f"--max-connections {max_connections} is more than the open-file limit allows: "
            f"{said}; raise the limit ({how})",
            warn=True,
        )
    if derived and soft is not None and (hard is None or hard > soft):
        up_to = "" if hard is None else f" up to {hard}"
        return ConnectionRoom(cap, f"{said}; raise the limit{up_to} for more ({how})", warn=True)
    return ConnectionRoom(cap, said, warn=False)


class Seconds(Protocol):
    """A clock as the sans-IO parts need it (the reactor, or a test's C{Clock})."""

    def seconds(self) -> float: ...


@attrs.define
class TokenBucket:
    """
    A token bucket on an injected clock, and no I/O: C{rate} tokens a second
    come in, at most C{burst} are kept, and it starts full.
    """

    clock: Seconds
    rate: float
    burst: float
    _tokens: float = attrs.field(init=False)
    _stamp: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._tokens = float(self.burst)
        self._stamp = self.clock.seconds()

    def _refill(self) -> float:
        # Once per frame: plain comparisons, no min() or max().
        now = self.clock.seconds()
        elapsed = now - self._stamp
        self._stamp = now
        if elapsed > 0.0:
            tokens = self._tokens + elapsed * self.rate
            self._tokens = tokens if tokens < self.burst else float(self.burst)
        return self._tokens

    def allow(self) -> bool:
        """Take a token if there is one: whether there was."""
        if self._refill() >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def borrow(self, headroom: float = 0.0) -> float:
        """
        Take a token even if there is none, going into debt: 0.0 while not in
        debt, else the seconds until the debt is paid and C{headroom} tokens
        are back (so a throttled caller is not woken for every single token).
        """
        self._refill()
        self._tokens -= 1.0
        if self._tokens >= 0.0:
            return 0.0
        return (min(float(self.burst), headroom) - self._tokens) / self.rate

    def refill(self) -> float:
        """
        Add what came in since the last look, for L{take} and L{owe}: a caller
        that handles many frames in one instant (one socket read) reads the
        clock once for all of them.

        @return: the clock's time it read, for the caller's other uses.
        """
        self._refill()
        return self._stamp

    def take(self) -> bool:
        """L{allow} without reading the clock (see L{refill})."""
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def owe(self, headroom: float = 0.0) -> float:
        """L{borrow} without reading the clock (see L{refill})."""
        self._tokens -= 1.0
        if self._tokens >= 0.0:
            return 0.0
        return (min(float(self.burst), headroom) - self._tokens) / self.rate

    @property
    def full(self) -> bool:
        """Whether the bucket is full: a bucket that is can be forgotten and made anew."""
        return self._refill() >= self.burst


@attrs.define
class PerAddress:
    """
    The TCP connections of each client IP address, against C{Limits}: how many
    are open, and a bucket for how fast new ones come.  No I/O.
    """

    limits: Limits
    clock: Seconds
    _open: dict[str, int] = attrs.field(factory=dict)
    _buckets: dict[str, TokenBucket] = attrs.field(factory=dict)
    #: How many buckets may be kept before the full ones of addresses with
    #: nothing open are forgotten; doubles when that frees too little.
    _prune_at: int = 1024

    def admit(self, address: str) -> bool:
        """A connection from C{address} arrived: whether it may stay (it is counted if so)."""
        limits = self.limits
        if limits.connections_per_ip and self._open.get(address, 0) >= limits.connections_per_ip:
            return False
        if limits.new_connections_per_second:
            bucket = self._buckets.get(address)
            if bucket is None:
                if len(self._buckets) >= self._prune_at:
                    self._prune()
                bucket = self._buckets[address] = TokenBucket(
                    self.clock, limits.new_connections_per_second, limits.new_connection_burst
                )
            if not bucket.allow():
                return False
        self._open[address] = self._open.get(address, 0) + 1
        return True

    def release(self, address: str) -> None:
        """An admitted connection from C{address} closed."""
        left = self._open.get(address, 0) - 1
        if left > 0:
            self._open[address] = left
        else:
            self._open.pop(address, None)

    def open(self, address: str) -> int:
        """How many connections from C{address} are open."""
        return self._open.get(address, 0)

    def _prune(self) -> None:
        for address, bucket in list(self._buckets.items()):
            if address not in self._open and bucket.full:
                del self._buckets[address]
        self._prune_at = max(1024, 2 * len(self._buckets))


class Closable(Protocol):
    """A live connection, as shutdown needs it."""

    def close(self, code: int, reason: str) -> None:
        """Close with a close code and reason."""

    def abort(self) -> None:
        """Drop at once."""


@attrs.define
class Connections:
    """Every WebSocket connection the relay holds, so shutdown can wait for them."""

    live: set[Closable] = attrs.field(factory=set)
    _idle: list[Deferred[None]] = attrs.field(factory=list)

    def add(self, connection: Closable) -> None:
        self.live.add(connection)

    def remove(self, connection: Closable) -> None:
        self.live.discard(connection)
        if not self.live:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fires once no connection is left."""
        if not self.live:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d


@attrs.define
class RelayContext:
    """Everything a request handler needs; nothing else reaches relay state."""

    clock: IReactorTime
    store: IRelayStore
    tokens: TokenAuthority
    pairing: Pairing
    hub: Hub
    telemetry: Telemetry
    public_url: str
    extra_origins: tuple[str, ...] = ()
    limits: Limits = Limits()
    connections: Connections = attrs.field(factory=Connections)
    #: Where the development certificate is (C{~/...} if under the home directory), for the
    #: pairing command the page shows; None with an operator's certificate.
    dev_cert: str | None = None
    #: With several relay nodes: this node's part (None: a relay on its own).
    mesh: Mesh | None = None
    #: What the API counts for the metrics (nothing without C{--metrics-listen}).
    metrics: PairingCounts = attrs.field(factory=NotCounted)

    def paired(self, session: str, record: BridgeRecord) -> None:
        """A bridge of C{session} presented its key: tell its tabs, wherever they are."""
        if self.mesh is None:
            self.hub.paired(session, record)
        else:
            self.mesh.paired(session, record)

    def disconnect_bridge(self, session: str, peer: int, code: int, reason: str) -> None:
        """Close bridge C{peer} of C{session}, wherever it is connected (it was revoked)."""
        if self.mesh is None:
            self.hub.disconnect_bridge(session, peer, code, reason)
        else:
            self.mesh.disconnect_bridge(session, peer, code, reason)

    @property
    def allowed_origins(self) -> set[str]:
        """The relay's own origin plus the operator's C{--allowed-origin}s."""
        return {self.public_url.rstrip("/"), *self.extra_origins}
