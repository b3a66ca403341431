"""
The relay's two WebSocket endpoints, as thin Autobahn adapters over the hub.

C{/ws/ide} admits a browser with a valid session cookie from an allowed
Origin; C{/ws/bridge} admits a bridge with a valid, unrevoked token.  Refusals
happen in the opening handshake with an HTTP status and a short reason.

Flow control (C{coder1_relay.routing} says why and how much): once open, a
connection's L{Endpoint} replaces twisted.web's HTTP channel as the producer
registered on its transport, and the transport's high-water mark becomes
C{HubSettings.send_buffer}.  A held connection is not read: its transport
stops reading the socket, and the frames already read wait in Autobahn's
buffer (L{_RelayProtocol.processData} says no) until it is released.
"""

from __future__ import annotations

import re
import secrets
from http.cookies import CookieError, SimpleCookie
from types import FunctionType
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from coder1_relay.context import SESSION_COOKIE, Limits, RelayContext, TokenBucket
from coder1_relay.routing import RATE, Endpoint
from coder1_relay.tokens import TokenError
from coder1_wire import closecodes

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


class _RelayProtocol(WebSocketServerProtocol):
    """
    What both endpoints share: the link the hub sends through, the reader it
    holds and releases, and the message rate.
    """

    factory: RelayWebSocketFactory
    endpoint: Endpoint | None = None
    _bucket: TokenBucket | None = None
    #: Handles the frames held while the connection was not read, once released.
    _read_held: IDelayedCall | None = None
    #: Between L{pause_reading} and L{resume_reading}: frames already read wait.
    _paused = False

    def _make_bucket(self, limits: Limits) -> TokenBucket:
        """This endpoint's message rate."""
        raise NotImplementedError

    def _spend(self) -> None:
        """Take a token for one frame, and act if there was none."""
        raise NotImplementedError

    def send(self, frame: bytes) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(frame, isBinary=True)

    def close(self, code: int, reason: str) -> None:
        self.sendClose(code, reason)

    def abort(self) -> None:
        self.dropConnection(abort=True)

    def pause_reading(self) -> None:
        self._paused = True
        transport: Any = self.transport  # TLS, which passes this on to TCP
        if transport is not None:
            transport.pauseProducing()

    def resume_reading(self) -> None:
        """
        Read the socket again, and the frames held in Autobahn's buffer in a
        moment: not from inside the hub, which is releasing holds.
        """
        self._paused = False
        if self.state not in (
            WebSocketServerProtocol.STATE_OPEN,
            WebSocketServerProtocol.STATE_CLOSING,
        ):
            return
        transport: Any = self.transport
        transport.resumeProducing()
        if self._read_held is None:
            self._read_held = self.factory.context.clock.callLater(0, self._handle_held)

    def _handle_held(self) -> None:
        self._read_held = None
        if self.state in (
            WebSocketServerProtocol.STATE_OPEN,
            WebSocketServerProtocol.STATE_CLOSING,
        ):
            self.consumeData()

    def processData(self) -> bool:
        # Autobahn handles the frames it has buffered one per call, until this says no.
        if self._paused:
            return False
        return bool(WebSocketServerProtocol.processData(self))

    def _attached(self, endpoint: Endpoint) -> None:
        """
        The hub took this connection: its endpoint now hears about the send
        buffer.  What Autobahn kept of the opening handshake (the raw request,
        its parsed headers, the response: some KB per connection, and the
        bridge's token or the browser's cookie) is not needed any more.
        """
        for name in _HANDSHAKE_LEFTOVERS:
            setattr(self, name, None)
        self.endpoint = endpoint
        transport: Any = self.transport
        # twisted.web's HTTP channel, still registered, has had no say since the upgrade.
        transport.unregisterProducer()
        transport.registerProducer(endpoint, True)

    def connectionMade(self) -> None:
        super().connectionMade()
        context = self.factory.context
        context.connections.add(self)
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
        if self._read_held is not None and self._read_held.active():
            self._read_held.cancel()
        self._read_held = None
        super().connectionLost(reason)
        self.factory.context.connections.remove(self)

    def _frame_arrived(self) -> None:
        """One frame arrived: count it against this connection's rate."""
        if self.state == WebSocketServerProtocol.STATE_OPEN and self._bucket is not None:
            self._spend()

    # Counted per frame, not per message: a message cut in a thousand frames
    # costs the relay a thousand frames' work.  Pings and pongs count too.
    def onMessageFrameBegin(self, length: int) -> None:
        if self._bucket is not None and self.state == WebSocketServerProtocol.STATE_OPEN:
            self._spend()
        WebSocketServerProtocol.onMessageFrameBegin(self, length)

    def onPing(self, payload: bytes) -> None:
        self._frame_arrived()
        super().onPing(payload)

    def onPong(self, payload: bytes) -> None:
        self._frame_arrived()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.endpoint is None or self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        if not isBinary:
            self.sendClose(closecodes.PROTOCOL_ERROR, "frames must be binary")
            return
        try:
            self.endpoint.receive(payload)
        except Exception:
            _log.failure("routing a frame failed")
            self.sendClose(closecodes.PROTOCOL_ERROR, "internal error")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.endpoint is not None:
            self.factory.context.hub.detach(self.endpoint)
            self.endpoint = None


class IDEProtocol(_RelayProtocol):
    """A browser tab of an IDE session."""

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
            self.factory.context.telemetry.throttled("rate")
            self.sendClose(closecodes.RATE_LIMITED, "too many messages")

    def onConnect(self, request: ConnectionRequest) -> None:
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
        # onOpen follows at once (this is not a coroutine), so nothing slips in between.
        if context.hub.ide_count(self.session) >= context.limits.ide_connections_per_session:
            context.telemetry.throttled("sessions")
            raise ConnectionDeny(429, "too many connections for this browser session")

    def onOpen(self) -> None:
        self._attached(
            self.factory.context.hub.attach_ide(
                self.session, self, secrets.token_hex(8), reader=self
            )
        )


class BridgeProtocol(_RelayProtocol):
    """A paired bridge."""

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
        if wait > 0 and self._paid is None and self.endpoint is not None:
            context = self.factory.context
            context.telemetry.throttled("rate")
            self.endpoint.hold(RATE)
            self._paid = context.clock.callLater(wait, self._rate_paid)

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
        if await context.store.is_revoked(claims.jti, now):
            raise ConnectionDeny(401, "token has been revoked")
        record = next(
            (r for r in await context.store.bridges(claims.session, now) if r.peer == claims.peer),
            None,
        )
        if record is None or not record.bridge_key:
            raise ConnectionDeny(401, "this relay has no record of that pairing")
        version = request.headers.get("x-coder1-bridge-version", "")
        label = request.headers.get("x-coder1-label", "")
        self._attach = {
            "session": claims.session,
            "peer": claims.peer,
            "version": version if _VERSION.fullmatch(version) else "unknown",
            "label": label if _LABEL.fullmatch(label) else "bridge",
            "telemetry": request.headers.get("x-coder1-telemetry", "on") != "off",
            "expires_at": claims.expires_at,
            "bridge_key": record.bridge_key,
        }

    def onOpen(self) -> None:
        assert self._attach is not None
        attach, self._attach = self._attach, None
        self._attached(
            self.factory.context.hub.attach_bridge(
                link=self, connection_id=secrets.token_hex(8), reader=self, **attach
            )
        )


class RelayWebSocketFactory(WebSocketServerFactory):
    """A factory carrying the relay context, with explicit limits."""

    #: C{protocol} with this factory's options as class attributes (L{buildProtocol}).
    _configured: type[_RelayProtocol] | None = None
    _options: dict[str, Any] | None = None

    def __init__(self, context: RelayContext, protocol: type[_RelayProtocol]) -> None:
        super().__init__(url=context.public_url.replace("https", "wss", 1))
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
