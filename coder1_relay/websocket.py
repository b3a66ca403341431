"""
The relay's two WebSocket endpoints, as thin Autobahn adapters over the hub.

C{/ws/ide} admits a browser with a valid session cookie from an allowed
Origin; C{/ws/bridge} admits a bridge with a valid, unrevoked token.  Refusals
happen in the opening handshake with an HTTP status and a short reason.

Flow control (C{coder1_relay.routing} says why and how much): once open, a
connection's L{Endpoint} replaces twisted.web's HTTP channel as the producer
registered on its transport, and the transport's high-water mark becomes
C{HubSettings.send_buffer}.  A held connection is not read: the frames
already read wait in Autobahn's buffer, and its transport stops reading the
socket when more arrives, until it is released (C{coder1_relay.reading}).

The hot path: a whole binary message in one frame (what every party sends)
is read and written by the relay itself (C{coder1_wire.frames}), with the
checks Autobahn makes and without its per-frame layers; every other frame
goes through Autobahn.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie
from types import FunctionType
from typing import Any, ClassVar

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from coder1_relay.context import SESSION_COOKIE, Limits, RelayContext, TokenBucket
from coder1_relay.metric_labels import Role
from coder1_relay.nodelink import LinkRefused, NodeLink
from coder1_relay.reading import Backpressure, GatedReading, ReadGate
from coder1_relay.routing import RATE, Endpoint
from coder1_relay.store import StoreUnavailable
from coder1_relay.tokens import NodeClaims, TokenError
from coder1_wire import closecodes
from coder1_wire.frames import WholeMessages, binary_frame_bounds, binary_message, unmask

_VERSION = re.compile(r"[0-9A-Za-z.+-]{1,32}")
_LABEL = re.compile(r"[\w .@:+-]{1,64}", re.ASCII)


#: What Autobahn keeps of the opening handshake for the connection's life (read only there).
_HANDSHAKE_LEFTOVERS = (
    "http_request_data",
    "http_status_line",
    "http_headers",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_response_data",
)

#: Not C{log} on the protocols: that would replace Autobahn's own logger, whose
#: debug messages (dropped by default) include the handshake's token and cookie.
_log = Logger()

#: Autobahn's open state, looked up once: it is compared for every frame and message.
_OPEN = WebSocketServerProtocol.STATE_OPEN


class _RelayProtocol(GatedReading, WholeMessages, WebSocketServerProtocol):  # type: ignore[misc]  # autobahn's bases
    """
    What both endpoints share: the link the hub sends through, the reader it
    holds and releases, the message rate, and, with several relay nodes, the
    node link to the session's owner when that is another node.
    """

    factory: RelayWebSocketFactory
    #: What the metrics count it as (C{coder1_relay.metrics}).
    metrics_role: ClassVar[Role]
    endpoint: Endpoint | None = None
    _bucket: TokenBucket | None = None
    #: The clock's C{seconds}.
    _seconds: Callable[[], float]
    #: When the last socket read was handled (L{consumeData}): the time each
    #: message it brought was heard, with the clock read once per read.
    _read_at: float = 0.0
    #: Set when this connection's session is held by another node: what it sends
    #: goes there, and what comes from there is sent on it.
    _link: NodeLink | None = None
    #: The connection's id in telemetry (a node link carries it to the owner).
    connection_id: str = ""
    # Autobahn's options, which it sets on each connection (here, on its class).
    maskServerFrames: bool
    applyMask: bool
    _masked_in = True  # a client's frames

    def _make_bucket(self, limits: Limits) -> TokenBucket:
        """This endpoint's message rate."""
        raise NotImplementedError

    def _spend(self) -> None:
        """Take a token for one frame, and act if there was none."""
        raise NotImplementedError

    def send(self, frame: bytes) -> None:
        """
        Send C{frame} as one binary message.  Once open, the relay makes its
        frame (L{binary_message}) and writes it, the very bytes Autobahn's
        C{sendMessage} would write, without its layers: argument checks,
        compression and fragmentation, and a debug line formatted for
        every message and dropped.  Autobahn sends it when one of those
        applies (L{_choose_paths}), or while it has writes of its own queued.
        """
        if self.state != _OPEN:
            return
        if self._frames_out and len(frame) <= self._out_limit and not self.send_queue:
            transport: Any = self.transport
            transport.write(binary_message(frame))
        else:
            self.sendMessage(frame, isBinary=True)

    def _may_write_frames(self) -> bool:
        return not self.maskServerFrames

    def _may_read_frames(self) -> bool:
        return self.applyMask

    def _frame_begins(self) -> None:
        """A data frame begins: take a token for it, and act if there was none."""
        raise NotImplementedError

    def onMessageFrameBegin(self, length: int) -> None:
        if self._bucket is not None and self.state == _OPEN:
            self._frame_begins()
        WebSocketServerProtocol.onMessageFrameBegin(self, length)

    def _whole_messages(self, data: bytes) -> int:
        """
        Handle the whole binary messages at the front of C{data}, each in
        one frame, as Autobahn would (a token per frame, the size limits, the
        payload unmasked, L{onMessage}) without its ten call layers per
        frame, its per-frame copy of what is left, and the Deferred it makes
        for every message; stop at any other frame, or once the connection
        is held or closing.

        @return: how many bytes of C{data} were handled.
        """
        at, size = 0, len(data)
        while (frame := binary_frame_bounds(data, at, masked=True)) is not None:
            start, end = frame
            if end > size or end - start > self._in_limit:
                break
            # A tab past its rate is closed, and the frame goes unheard; a
            # bridge is held, and the frame that went into debt goes on.
            self._frame_begins()
            at = end
            if self.state != _OPEN:
                break
            self.onMessage(unmask(data[start:end], data[start - 4 : start]), True)
            if self._gate.closed or self.state != _OPEN:
                break
        return at

    def close(self, code: int, reason: str) -> None:
        if code == closecodes.GOING_AWAY:
            # Autobahn's sendClose takes 1000 and 3000-4999 only; RFC 6455's
            # "going away" is what browsers and other clients know.
            self.sendCloseFrame(code, reason.encode()[:123])
        else:
            self.sendClose(code, reason)

    def abort(self) -> None:
        self.dropConnection(abort=True)

    async def _route(self, role: str, session: str, attach: dict[str, Any]) -> bool:
        """
        With several relay nodes: find the node that holds C{session}, and
        when it is another, open the node link this connection will go through.

        @return: whether the connection is attached here.
        """
        mesh = self.factory.context.mesh
        if mesh is None:
            return True
        for _ in range(2):  # once more if the owner gave the session up meanwhile
            try:
                owner = await mesh.locate(session)
            except StoreUnavailable:
                raise ConnectionDeny(503, "relay state unavailable; try again") from None
            if owner.node == mesh.node:
                return True
            try:
                link = await mesh.links.open(owner, role, session, self.connection_id, attach)
            except LinkRefused as e:
                if e.status == 421:
                    continue
                raise ConnectionDeny(e.status or 503, e.reason) from None
            if self.state != WebSocketServerProtocol.STATE_CONNECTING:
                link.sendClose(closecodes.NORMAL)  # this connection went meanwhile
                raise ConnectionDeny(503, "connection closed")
            self._link = link
            return False
        raise ConnectionDeny(503, "relay nodes disagree on this session; try again")

    def _piped(self, link: NodeLink) -> None:
        """This connection goes through C{link}: each holds the other when full."""
        self._choose_paths()
        for name in _HANDSHAKE_LEFTOVERS:
            setattr(self, name, None)
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.registerProducer(Backpressure(link), True)
        link.carry(self)

    def _attached(self, endpoint: Endpoint) -> None:
        """
        The hub took this connection: its endpoint now hears about the send
        buffer.  What Autobahn kept of the opening handshake (the raw request,
        its parsed headers, the response: some KB per connection, and the
        bridge's token or the browser's cookie) is not needed any more.
        """
        for name in _HANDSHAKE_LEFTOVERS:
            setattr(self, name, None)
        self._choose_paths()
        self.endpoint = endpoint
        transport: Any = self.transport
        # twisted.web's HTTP channel, still registered, has had no say since the upgrade.
        transport.unregisterProducer()
        transport.registerProducer(endpoint, True)

    def connectionMade(self) -> None:
        super().connectionMade()
        context = self.factory.context
        context.connections.add(self)
        self._gate = ReadGate(self, context.clock)
        self._seconds = context.clock.seconds
        self._bucket = self._make_bucket(context.limits)
        # The high-water mark of the send buffer is the TCP transport's, under TLS.
        tcp = getattr(self.transport, "transport", None)
        if isinstance(tcp, FileDescriptor):
            tcp.bufferSize = context.hub.settings.send_buffer

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Autobahn leaves its closing-handshake timer running when the other end
        # drops the connection instead of answering our close.
        if self.closeHandshakeTimeoutCall is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None
        self._gate.stop()
        super().connectionLost(reason)
        self.factory.context.connections.remove(self)
        # Autobahn fires is_closed with the protocol itself, which holds it: a
        # reference cycle that only the garbage collector would free.  Nothing of
        # the relay waits on it.
        self.is_closed = succeed(None)

    def _frame_arrived(self) -> None:
        """One frame arrived: count it against this connection's rate."""
        if self.state == WebSocketServerProtocol.STATE_OPEN and self._bucket is not None:
            self._spend()

    # Counted per frame, not per message: a message cut in a thousand frames
    # costs the relay a thousand frames' work.  Pings and pongs count too.
    # Each endpoint's onMessageFrameBegin spends as its _spend does, inlined,
    # with the bucket refilled once for all the frames one read brought.
    # The same clock read is when the read's messages were heard (the heartbeat's).
    def consumeData(self) -> None:
        bucket = self._bucket
        self._read_at = bucket.refill() if bucket is not None else self._seconds()
        super().consumeData()

    def onPing(self, payload: bytes) -> None:
        self._frame_arrived()
        super().onPing(payload)

    def onPong(self, payload: bytes) -> None:
        self._frame_arrived()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != _OPEN:
            return
        if not isBinary:
            self.sendClose(closecodes.PROTOCOL_ERROR, "frames must be binary")
            return
        endpoint = self.endpoint
        if endpoint is None:
            if self._link is not None:
                self._link.send(payload)
            return
        # Endpoint.receive, inlined: one call layer less per message, and
        # heard at the time of the read that brought it (consumeData).
        endpoint.heard = self._read_at
        try:
            endpoint.hub.route(endpoint, payload)
        except Exception:
            _log.failure("routing a frame failed")
            self.sendClose(closecodes.PROTOCOL_ERROR, "internal error")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.endpoint is not None:
            self.factory.context.hub.detach(self.endpoint)
            self.endpoint = None
        if self._link is not None:
            link, self._link = self._link, None
            link.close(closecodes.NORMAL, "closed")


class IDEProtocol(_RelayProtocol):
    """A browser tab of an IDE session."""

    metrics_role = Role.IDE
    session: str = ""

    def _make_bucket(self, limits: Limits) -> TokenBucket:
        return TokenBucket(
            self.factory.context.clock, limits.messages_per_second, limits.message_burst
        )

    def _spend(self) -> None:
        """
        A browser past its rate is closed: no person types that fast, and the
        page sends keystrokes, pastes and resizes, never bulk data.
        """
        assert self._bucket is not None
        if not self._bucket.allow():
            self._refuse()

    def _refuse(self) -> None:
        self.factory.context.telemetry.throttled("rate")
        self.sendClose(closecodes.RATE_LIMITED, "too many messages")

    def _frame_begins(self) -> None:
        bucket = self._bucket
        assert bucket is not None
        if not bucket.take():
            self._refuse()

    def onConnect(self, request: ConnectionRequest) -> Any:
        context = self.factory.context
        if request.origin not in context.allowed_origins:
            raise ConnectionDeny(403, "origin not allowed")
        cookie = _cookie(request.headers.get("cookie", ""), SESSION_COOKIE)
        if cookie is None:
            raise ConnectionDeny(401, "no session cookie")
        try:
            self.session = context.tokens.verify_browser_session(cookie)
        except TokenError as e:
            raise ConnectionDeny(401, f"session {e}") from None
        self.connection_id = secrets.token_hex(8)
        if context.mesh is None:
            self._check_count()
            return None
        return Deferred.fromCoroutine(self._admit_here())

    async def _admit_here(self) -> None:
        if await self._route("ide", self.session, {}):
            self._check_count()

    def _check_count(self) -> None:
        # onOpen follows at once, so nothing slips in between.
        context = self.factory.context
        if context.hub.ide_count(self.session) >= context.limits.ide_connections_per_session:
            context.telemetry.throttled("sessions")
            raise ConnectionDeny(429, "too many connections for this browser session")

    def onOpen(self) -> None:
        if self._link is not None:
            self._piped(self._link)
            return
        self._attached(
            self.factory.context.hub.attach_ide(self.session, self, self.connection_id, reader=self)
        )


class BridgeProtocol(_RelayProtocol):
    """A paired bridge."""

    metrics_role = Role.BRIDGE
    _attach: dict[str, Any] | None = None
    #: Ends the hold for the rate, once its debt is paid.
    _paid: IDelayedCall | None = None

    def _make_bucket(self, limits: Limits) -> TokenBucket:
        return TokenBucket(
            self.factory.context.clock,
            limits.bridge_messages_per_second,
            limits.bridge_message_burst,
        )

    def _spend(self) -> None:
        """
        A bridge past its rate is slowed down, never closed: its frames are a
        command's output, and dropping them would lose it.  The relay holds it
        (stops reading its socket, and leaves the frames it has read but not
        yet handled in their buffer) until the debt is paid and a tenth of a
        second's worth is back; TCP then holds the bridge back.  This hold is
        counted with the others (routing's Flow control): whichever ends first
        does not end the other.
        """
        assert self._bucket is not None
        wait = self._bucket.borrow(headroom=self._bucket.rate / 10)
        if wait > 0:
            self._slow_down(wait)

    def _slow_down(self, wait: float) -> None:
        if self._paid is None and self.endpoint is not None:
            context = self.factory.context
            context.telemetry.throttled("rate")
            self.endpoint.hold(RATE)
            self._paid = context.clock.callLater(wait, self._rate_paid)

    def _frame_begins(self) -> None:
        bucket = self._bucket
        assert bucket is not None
        wait = bucket.owe(bucket.rate / 10)
        if wait > 0:
            self._slow_down(wait)

    def _rate_paid(self) -> None:
        self._paid = None
        if self.endpoint is not None:
            self.endpoint.release(RATE)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._paid is not None and self._paid.active():
            self._paid.cancel()
        self._paid = None
        super().connectionLost(reason)

    def onConnect(self, request: ConnectionRequest) -> Any:
        # Autobahn waits on a Deferred from onConnect: revocation is the store's to say.
        return Deferred.fromCoroutine(self._admit(request))

    async def _admit(self, request: ConnectionRequest) -> None:
        context = self.factory.context
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ConnectionDeny(401, "no bearer token")
        try:
            claims = context.tokens.verify_bridge_token(token.strip())
        except TokenError as e:
            raise ConnectionDeny(401, str(e)) from None
        now = context.clock.seconds()
        try:
            if await context.store.is_revoked(claims.jti, now):
                raise ConnectionDeny(401, "token has been revoked")
            paired = await context.store.bridges(claims.session, now)
        except StoreUnavailable:
            # Not 401: the bridge must try again, not give up its pairing.
            raise ConnectionDeny(
                503, "the relay cannot reach its storage right now; try again in a moment"
            ) from None
        record = next((r for r in paired if r.peer == claims.peer), None)
        if record is None or not record.bridge_key:
            raise ConnectionDeny(401, "this relay has no record of that pairing")
        version = request.headers.get("x-coder1-bridge-version", "")
        label = request.headers.get("x-coder1-label", "")
        attach = {
            "peer": claims.peer,
            "version": version if _VERSION.fullmatch(version) else "unknown",
            "label": label if _LABEL.fullmatch(label) else "bridge",
            "telemetry": request.headers.get("x-coder1-telemetry", "on") != "off",
            "expires_at": claims.expires_at,
            "bridge_key": record.bridge_key,
        }
        self.connection_id = secrets.token_hex(8)
        if await self._route("bridge", claims.session, attach):
            self._attach = {"session": claims.session, **attach}

    def onOpen(self) -> None:
        if self._link is not None:
            self._piped(self._link)
            return
        assert self._attach is not None
        attach, self._attach = self._attach, None
        self._attached(
            self.factory.context.hub.attach_bridge(
                link=self, connection_id=self.connection_id, reader=self, **attach
            )
        )


def _node_claims(context: RelayContext, request: ConnectionRequest) -> Deferred[NodeClaims]:
    """
    The node listener's side of a node link: a connection that another relay
    node accepted and checked (cookie or token, revocation), for a session this
    node holds.  Its node token says what the accepting node learned.
    """
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or context.mesh is None:
        raise ConnectionDeny(401, "no node token")
    try:
        claims = context.tokens.verify_node_token(token.strip())
    except TokenError as e:
        raise ConnectionDeny(401, str(e)) from None
    return Deferred.fromCoroutine(_owned(context, claims))


async def _owned(context: RelayContext, claims: NodeClaims) -> NodeClaims:
    mesh = context.mesh
    assert mesh is not None
    try:
        owner = await mesh.locate(claims.session)
    except StoreUnavailable:
        raise ConnectionDeny(503, "relay state unavailable; try again") from None
    if owner.node != mesh.node:
        raise ConnectionDeny(421, "this node does not hold that session")
    return claims


class NodeIDEProtocol(IDEProtocol):
    """A browser tab that connected to another relay node, for a session held here."""

    metrics_role = Role.NODE

    def onConnect(self, request: ConnectionRequest) -> Any:
        return _node_claims(self.factory.context, request).addCallback(self._admit_tab)

    def _admit_tab(self, claims: NodeClaims) -> None:
        if claims.role != "ide":
            raise ConnectionDeny(400, "node token is for a bridge")
        self.session, self.connection_id = claims.session, claims.connection_id
        self._check_count()


class NodeBridgeProtocol(BridgeProtocol):
    """A bridge that connected to another relay node, for a session held here."""

    metrics_role = Role.NODE

    def onConnect(self, request: ConnectionRequest) -> Any:
        return _node_claims(self.factory.context, request).addCallback(self._admit_bridge)

    def _admit_bridge(self, claims: NodeClaims) -> None:
        if claims.role != "bridge":
            raise ConnectionDeny(400, "node token is for a tab")
        self.connection_id = claims.connection_id
        attach = claims.attach
        try:
            self._attach = {
                "session": claims.session,
                "peer": int(attach["peer"]),
                "version": str(attach["version"]),
                "label": str(attach["label"]),
                "telemetry": bool(attach["telemetry"]),
                "expires_at": float(attach["expires_at"]),
                "bridge_key": str(attach["bridge_key"]),
            }
        except (KeyError, TypeError, ValueError):
            raise ConnectionDeny(400, "node token is malformed") from None


class RelayWebSocketFactory(WebSocketServerFactory):
    """A factory carrying the relay context, with explicit limits."""

    #: C{protocol} with this factory's options as class attributes (L{buildProtocol}).
    _configured: type[_RelayProtocol] | None = None
    _options: dict[str, Any] | None = None

    def __init__(self, context: RelayContext, protocol: type[_RelayProtocol]) -> None:
        # server=None: no Server header (Autobahn's names itself and its version).
        super().__init__(url=context.public_url.replace("https", "wss", 1), server=None)
        self.context = context
        self.protocol = protocol
        limits = context.limits
        self.setProtocolOptions(
            maxFramePayloadSize=limits.max_message_size,
            maxMessagePayloadSize=limits.max_message_size,
            openHandshakeTimeout=limits.handshake_timeout,
            closeHandshakeTimeout=5,
            tcpNoDelay=True,
            # Protocol violations get a close frame with a reason, not a dropped socket.
            failByDrop=False,
            # A GET without Upgrade is refused (426), not answered with Autobahn's
            # status page, which names its version and redirects anywhere (?redirect=).
            webStatus=False,
            # No compression: compressing secrets beside attacker-chosen bytes leaks
            # them (CRIME/BREACH), and end-to-end ciphertext does not compress anyway.
            perMessageCompressionAccept=lambda offers: None,
        )

    def buildProtocol(self, addr: Any) -> Any:
        """
        A connection whose options come with its class.  Autobahn copies its
        thirty options from the factory onto every new connection and formats
        them (pprint) for a debug line that is then dropped: about half a
        millisecond of a pairing's CPU and thirty entries in each connection's
        dict.  A subclass made once per set of options has them as class
        attributes, and nothing to copy (made anew when an option changes).
        """
        base = self.protocol
        options = {name: getattr(self, name) for name in base.CONFIG_ATTRS}
        if self._configured is None or options != self._options:
            self._options = options
            as_attributes = {
                # A function as a class attribute would become a method.
                name: staticmethod(value) if isinstance(value, FunctionType) else value
                for name, value in options.items()
            }
            self._configured = type(base.__name__, (base,), {**as_attributes, "CONFIG_ATTRS": ()})
        protocol = self._configured()
        protocol.factory = self
        return protocol


def _cookie(header: str, name: str) -> str | None:
    try:
        jar = SimpleCookie(header)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None
