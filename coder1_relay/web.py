"""
The relay's HTTP side: the page, the pairing API and the WebSocket mounts.

Every response carries strict security headers; API answers are JSON and
never cached.  Handlers are coroutines run with C{Deferred.fromCoroutine}.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Awaitable, Callable
from io import BytesIO
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import NoResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.static import File
from zope.interface import implementer

from coder1_relay.context import SESSION_COOKIE, RelayContext
from coder1_relay.metric_labels import PAIRING_ERRORS, PairingOutcome
from coder1_relay.pairing import RateLimited, RedeemRefused, check_public_key
from coder1_relay.store import BridgeRecord, StoreUnavailable
from coder1_relay.tls_server import SHARED_BATCH, TLSServerProtocol
from coder1_relay.tokens import BridgeClaims, TokenError
from coder1_relay.websocket import (
    BridgeProtocol,
    IDEProtocol,
    NodeBridgeProtocol,
    NodeIDEProtocol,
    RelayWebSocketFactory,
)
from coder1_wire import closecodes

STATIC = __file__.rsplit("/", 1)[0] + "/static"
_SECURITY_HEADERS = {
    # Scripts only from the relay itself, never inline.  xterm.js writes <style>
    # elements for its themes, so inline styles (not scripts) are allowed.
    b"Content-Security-Policy": b"default-src 'self'; script-src 'self'; "
    b"style-src 'self' 'unsafe-inline'; "
    b"img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    b"frame-ancestors 'none'; form-action 'self'",
    b"Strict-Transport-Security": b"max-age=31536000",
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Referrer-Policy": b"no-referrer",
    b"Cross-Origin-Opener-Policy": b"same-origin",
    b"Cross-Origin-Resource-Policy": b"same-origin",
}


#: The access log's lines are the events twisted.web's would be: this namespace, "{log_io}".
_ACCESS_LOG = Logger(namespace="twisted.python.log")
#: What twisted.web's escaping leaves as it is: printable ASCII but C{"} and C{\\}.
_PLAIN = re.compile(rb"[ !#-\[\]-~]*")


def access_line(timestamp: str | None, request: http.Request) -> str:
    """
    C{combinedLogFormatter}'s line for C{request}, made without escaping what
    needs none (a request's fields nearly always): the same text.
    """
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    referrer = request.getHeader(b"referer") or b"-"
    agent = request.getHeader(b"user-agent") or b"-"
    method, uri, protocol = request.method, request.uri, request.clientproto
    if not (
        isinstance(address, (IPv4Address, IPv6Address))
        and _PLAIN.fullmatch(b"%s%s%s%s%s" % (referrer, agent, method, uri, protocol))
    ):
        return str(http.combinedLogFormatter(timestamp, request))
    return (
        f'"{host}" - - {timestamp} "{method.decode()} {uri.decode()} {protocol.decode()}" '
        f'{request.code:d} {request.sentLength or "-"} "{referrer.decode()}" "{agent.decode()}"'
    )


class HTTPError(Exception):
    """An API refusal: status, short error code, message, extra headers."""

    def __init__(
        self, status: int, error: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.headers = headers or {}


Handler = Callable[[Request], Awaitable[tuple[int, dict[str, Any]]]]


class JSONEndpoint(Resource):
    """One API endpoint: a coroutine per HTTP method, returning (status, body)."""

    log = Logger()

    def __init__(self, context: RelayContext, **handlers: Handler) -> None:
        super().__init__()
        self.context = context
        self.handlers = {m.upper().encode(): h for m, h in handlers.items()}

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NoResource("no such endpoint")

    def render(self, request: Request) -> int | bytes:
        handler = self.handlers.get(request.method)
        if handler is None:
            request.setHeader(b"Allow", b", ".join(self.handlers))
            return _json(request, 405, {"error": "method-not-allowed", "message": "not here"})
        finished = [False]
        request.notifyFinish().addBoth(lambda _: finished.__setitem__(0, True))

        def done(result: tuple[int, dict[str, Any]]) -> None:
            if not finished[0]:
                # Twisted writes the headers and the body apart: held, they are one
                # TLS record and one send, also for an answer that waited on the store.
                with SHARED_BATCH.held():
                    request.write(_json(request, *result))
                    request.finish()

        def failed(failure: Failure) -> None:
            if failure.check(StoreUnavailable):
                failure = Failure(_store_unavailable())
            if failure.check(HTTPError):
                e: HTTPError = failure.value  # type: ignore[assignment]
                for name, value in e.headers.items():
                    request.setHeader(name, value)
                done((e.status, {"error": e.error, "message": e.message}))
            else:
                self.log.failure("API handler failed", failure)
                done((500, {"error": "internal", "message": "internal error"}))

        Deferred.fromCoroutine(handler(request)).addCallbacks(done, failed)  # type: ignore[arg-type]
        return NOT_DONE_YET


def _json(request: Request, status: int, body: dict[str, Any]) -> bytes:
    """
    C{body} as the answer, with its length: sent whole, not chunked (one write
    of headers and body, no closing chunk after it).
    """
    raw = json.dumps(body).encode()
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Length", b"%d" % len(raw))
    return raw


def _body(request: Request, limit: int) -> dict[str, Any]:
    assert request.content is not None
    raw = request.content.read(limit + 1)
    if len(raw) > limit:
        raise HTTPError(413, "too-large", "request body too large")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: 16 KiB of "[" nest deeper than the parser goes.
        raise HTTPError(400, "bad-json", "request body is not JSON") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "bad-json", "request body must be a JSON object")
    return body


def _client_ip(request: Request) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", "unknown"))


def _rate_limited(context: RelayContext, e: RateLimited) -> HTTPError:
    context.telemetry.throttled("pairing")
    retry = str(max(1, math.ceil(e.retry_after)))
    return HTTPError(
        429, "rate-limited", f"too many requests; retry in {retry}s", {"Retry-After": retry}
    )


#: What a bridge whose redemption failed on the store must do: its code may be used up.
_NEW_CODE = "get a new code and try again in a moment"


def _store_unavailable(what_to_do: str = "try again in a moment") -> HTTPError:
    """
    The store failed (a shared store unreachable): 503, and nothing was done
    that the client will hear of (a code may have been used up).
    """
    return HTTPError(
        503,
        "store-unavailable",
        f"the relay cannot reach its storage right now; {what_to_do}",
        {"Retry-After": "5"},
    )


def _too_many_bridges(context: RelayContext) -> HTTPError:
    context.telemetry.throttled("sessions")
    limit = context.limits.bridges_per_session
    return HTTPError(
        409,
        "too-many-bridges",
        f"this browser session has {limit} paired bridges already; revoke one first",
    )


class API:
    """The handlers, bound to one relay context."""

    def __init__(self, context: RelayContext) -> None:
        self.context = context

    def session(self, request: Request) -> str:
        """The request's browser session (401 without a valid cookie)."""
        session = self.cookie_session(request)
        if session is None:
            raise HTTPError(401, "no-session", "no valid browser session; reload the page")
        return session

    def cookie_session(self, request: Request) -> str | None:
        """The browser session of the request's cookie, if it is valid."""
        cookie = request.getCookie(SESSION_COOKIE.encode())
        if cookie is None:
            return None
        try:
            return self.context.tokens.verify_browser_session(cookie.decode("ascii"))
        except (TokenError, UnicodeDecodeError):
            return None

    def start_session(self, request: Request) -> None:
        """A new browser session, in the cookie of the answer."""
        _, value = self.context.tokens.issue_browser_session()
        request.addCookie(
            SESSION_COOKIE,
            value,
            max_age=str(int(self.context.tokens.browser_lifetime)),
            path="/",
            secure=True,
            httpOnly=True,
            sameSite="strict",
        )

    def same_origin(self, request: Request) -> None:
        """Refuse a state-changing browser request from another origin (CSRF)."""
        origin = (request.getHeader(b"origin") or b"").decode("latin-1").rstrip("/")
        if origin not in self.context.allowed_origins:
            raise HTTPError(403, "bad-origin", "origin not allowed")

    async def post_session(self, request: Request) -> tuple[int, dict[str, Any]]:
        """
        The only place a browser session starts, and only when the request has
        no valid one: a same-origin request, which carries the SameSite=Strict
        cookie.  A navigation from another site does not, so loading the page
        never starts one: it would replace the user's (the page asks here).
        """
        self.same_origin(request)
        if self.cookie_session(request) is not None:
            return 200, {"ok": True, "new": False}
        self.start_session(request)
        return 200, {"ok": True, "new": True}

    async def post_code(self, request: Request) -> tuple[int, dict[str, Any]]:
        self.same_origin(request)
        session = self.session(request)
        browser_key = _body(request, self.context.limits.max_body_size).get("browser_key")
        paired = await self.context.store.bridges(session, self.context.clock.seconds())
        if len(paired) >= self.context.limits.bridges_per_session:
            raise _too_many_bridges(self.context)
        try:
            grant = await self.context.pairing.new_code(
                session, _client_ip(request), check_public_key(browser_key)
            )
        except RateLimited as e:
            raise _rate_limited(self.context, e) from None
        except ValueError as e:
            raise HTTPError(400, "bad-key", str(e)) from None
        now = self.context.clock.seconds()
        answer: dict[str, Any] = {
            "code": grant.code,
            "expires_at": grant.expires_at,
            "expires_in": grant.expires_at - now,
            "relay": self.context.public_url,
        }
        if self.context.dev_cert is not None:
            answer["ca_cert"] = self.context.dev_cert
        self.context.metrics.issued()
        return 201, answer

    async def post_pair(self, request: Request) -> tuple[int, dict[str, Any]]:
        """A bridge redeems a code (L{_redeem}); its outcome is counted for the metrics."""
        metrics = self.context.metrics
        try:
            answer = await self._redeem(request)
        except HTTPError as e:
            metrics.paired(PAIRING_ERRORS.get(e.error, PairingOutcome.ERROR))
            raise
        except StoreUnavailable:
            metrics.paired(PairingOutcome.STORE_UNAVAILABLE)
            raise
        except Exception:
            metrics.paired(PairingOutcome.ERROR)
            raise
        metrics.paired(PairingOutcome.OK)
        return answer

    async def _redeem(self, request: Request) -> tuple[int, dict[str, Any]]:
        body = _body(request, self.context.limits.max_body_size)
        code, label = body.get("code"), body.get("label", "bridge")
        if not isinstance(code, str) or not isinstance(label, str):
            raise HTTPError(400, "bad-request", "code and label must be strings")
        try:
            done = await self.context.pairing.redeem(code, _client_ip(request), label)
        except RateLimited as e:
            raise _rate_limited(self.context, e) from None
        except RedeemRefused:
            raise HTTPError(403, "invalid-code", "that code is unknown, used or expired") from None
        except StoreUnavailable:
            raise _store_unavailable(_NEW_CODE) from None
        except ValueError as e:
            raise HTTPError(400, "bad-label", str(e)) from None
        try:
            await self.check_bridges(done.claims.session, done.record)
        except StoreUnavailable:
            # The token is never handed out: revoked, its record counts for nothing.
            with contextlib.suppress(StoreUnavailable):
                now = self.context.clock.seconds()
                await self.context.store.revoke(done.claims.jti, done.claims.expires_at, now)
            raise _store_unavailable(_NEW_CODE) from None
        return 200, {
            "token": done.token,
            "peer": done.claims.peer,
            "expires_at": done.claims.expires_at,
            "browser_key": done.browser_key,
        }

    async def check_bridges(self, session: str, record: BridgeRecord) -> None:
        """
        Refuse (409) a bridge that has just redeemed a code past
        C{Limits.bridges_per_session}: its token, never handed out, is revoked
        and the code stays used.  Counted after the redemption, so codes
        redeemed at the same moment cannot all slip in; a full session's
        browser is refused new codes already (C{post_code}).
        """
        store, now = self.context.store, self.context.clock.seconds()
        if len(await store.bridges(session, now)) > self.context.limits.bridges_per_session:
            await store.revoke(record.jti, record.expires_at, now)
            raise _too_many_bridges(self.context)

    async def bearer(self, request: Request) -> BridgeClaims:
        """The claims of the request's valid, unrevoked bridge token."""
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        try:
            if scheme.lower() != "bearer":
                raise TokenError("no bearer token")
            claims = self.context.tokens.verify_bridge_token(token.strip())
        except TokenError as e:
            raise HTTPError(401, "bad-token", str(e)) from None
        if await self.context.store.is_revoked(claims.jti, self.context.clock.seconds()):
            raise HTTPError(401, "bad-token", "token has been revoked")
        return claims

    async def post_pair_key(self, request: Request) -> tuple[int, dict[str, Any]]:
        """The bridge presents its public key, after it has the browser's."""
        claims = await self.bearer(request)
        bridge_key = _body(request, self.context.limits.max_body_size).get("bridge_key")
        try:
            record = await self.context.pairing.present_key(claims, check_public_key(bridge_key))
        except ValueError as e:
            raise HTTPError(409 if "already" in str(e) else 400, "bad-key", str(e)) from None
        self.context.paired(claims.session, record)
        return 200, {"peer": record.peer}

    async def get_token(self, request: Request) -> tuple[int, dict[str, Any]]:
        claims = await self.bearer(request)
        return 200, {"valid": True, "peer": claims.peer, "expires_at": claims.expires_at}

    async def delete_token(self, request: Request) -> tuple[int, dict[str, Any]]:
        """A bridge revokes its own token (C{coder1-bridge unpair})."""
        claims = await self.bearer(request)
        await self.context.store.revoke(claims.jti, claims.expires_at, self.context.clock.seconds())
        self.context.disconnect_bridge(
            claims.session, claims.peer, closecodes.REVOKED, "this bridge was unpaired"
        )
        return 200, {"revoked": claims.peer}

    async def get_bridges(self, request: Request) -> tuple[int, dict[str, Any]]:
        session = self.session(request)
        store, now = self.context.store, self.context.clock.seconds()
        present = {p.peer: p for p in await store.presence(session)}
        bridges = []
        for record in await store.bridges(session, now):
            if not record.bridge_key:
                continue  # redeemed a moment ago; it presents its key next
            live = present.get(record.peer)
            bridges.append(
                {
                    "peer": record.peer,
                    "label": live.label if live else record.label,
                    "paired_at": record.paired_at,
                    "expires_at": record.expires_at,
                    "connected": live is not None,
                    "version": live.version if live else None,
                    "since": live.since if live else None,
                    "bridge_key": record.bridge_key,
                }
            )
        return 200, {"bridges": bridges}

    async def post_revoke(self, request: Request) -> tuple[int, dict[str, Any]]:
        self.same_origin(request)
        session = self.session(request)
        peer = _body(request, self.context.limits.max_body_size).get("peer")
        store, now = self.context.store, self.context.clock.seconds()
        record = next((r for r in await store.bridges(session, now) if r.peer == peer), None)
        if record is None:
            raise HTTPError(404, "no-such-bridge", "no such bridge in this session")
        await store.revoke(record.jti, record.expires_at, now)
        self.context.disconnect_bridge(
            session, record.peer, closecodes.REVOKED, "this bridge was revoked"
        )
        return 200, {"revoked": record.peer}


class Static(File):
    """The page's files: JavaScript modules typed right, no directory listings."""

    contentTypes = {**File.contentTypes, ".js": "text/javascript", ".mjs": "text/javascript"}

    def getChild(self, path: bytes, request: Request) -> Resource:
        # A segment no file can be named (not UTF-8, or with a NUL) is simply not
        # found: twisted.web would log the first with a traceback, and fail with
        # 500 on the second when the OS refuses the name.
        try:
            name = path.decode("utf-8")
        except UnicodeDecodeError:
            return self.childNotFound
        if "\0" in name:
            return self.childNotFound
        return super().getChild(path, request)

    def directoryListing(self) -> Resource:
        return NoResource("no listing here")

    def createSimilarFile(self, path: str) -> File:
        return Static(path, self.defaultType, self.ignoredExts, self.registry)


class RelayRequest(Request):
    """
    A request whose body is kept in memory, and only up to one byte past
    C{Limits.max_body_size} (enough to answer 413); the rest is read and dropped.
    Its answer has no C{Server} header.
    """

    channel: RelayHTTPChannel
    _room = 0

    def gotLength(self, length: int | None) -> None:
        # Request would spool a large or chunked body to a temporary file.
        self.content = BytesIO()
        self._room = self.channel.site.context.limits.max_body_size + 1

    def handleContentChunk(self, data: bytes) -> None:
        if self._room > 0:
            kept = data[: self._room]
            self._room -= len(kept)
            assert self.content is not None
            self.content.write(kept)

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            # twisted.web names itself and its version on every answer: a scanner's gift.
            self.responseHeaders.removeHeader(b"Server")
        super().write(data)


class Upgrade(WebSocketResource):
    """
    Autobahn's WebSocket resource, which takes the connection over from
    Twisted Web's HTTP channel, leaving that channel and the upgrade request
    in a reference cycle (the channel lists the request, the request names
    the channel) that only the garbage collector would free: broken here.
    """

    def render(self, request: Request) -> bytes | int:
        result: bytes | int = super().render(request)
        channel: Any = request.channel
        if channel.transport is None and request in channel.requests:  # taken over
            channel.requests.remove(request)
        return result


@implementer(IHandshakeListener)
class RelayHTTPChannel(HTTPChannel):
    """
    HTTP/1.1 that drops a client too slow to finish its TLS handshake
    (C{Limits.tls_handshake_timeout}, from the TCP connection) or to send a
    whole request once it has begun (C{Limits.handshake_timeout}; a WebSocket
    opening handshake is such a request).  Between requests the Site's idle
    timeout applies.  A dropped client is aborted, not answered: it is not
    keeping up anyway.
    """

    site: RelaySite
    _deadline: IDelayedCall | None = None
    _busy = False

    def connectionMade(self) -> None:
        super().connectionMade()
        if isinstance(self.transport, TLSServerProtocol):
            self._until(self.site.context.limits.tls_handshake_timeout)

    def handshakeCompleted(self) -> None:
        self._until(None)

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None and not self._busy:
            self._until(self.site.context.limits.handshake_timeout)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._until(None)
        self._busy = True
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        # Cleared first: a pipelined next request is replayed from in there.
        self._busy = False
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._until(None)
        super().connectionLost(reason)

    def lineLengthExceeded(self, line: bytes) -> None:
        # A request line or header over 16 KiB: LineReceiver would only lose the
        # connection, which TLS puts off while this channel is its producer, so the
        # client would wait for the handshake timeout without an answer.
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        self.loseConnection()

    def _until(self, seconds: float | None) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None if seconds is None else self.callLater(seconds, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        self.site.context.telemetry.throttled("timeout")
        transport: Any = self.transport  # TLS, which can abort
        if transport is not None:
            transport.abortConnection()


class RelaySite(Site):
    """
    The relay's Site: security headers on every response, HTTP/1.1 only (the
    WebSocket upgrade needs it), the channel and request above, and the idle
    timeout of C{Limits}.
    """

    protocol = RelayHTTPChannel  # type: ignore[assignment]  # not the HTTP/2-or-1.1 switch
    requestFactory = RelayRequest
    #: No "Starting factory <...RelaySite object at 0x...>" in the operator's log.
    noisy = False

    def __init__(
        self, resource: Resource, context: RelayContext, *, access_log: bool = True
    ) -> None:
        super().__init__(
            resource,
            timeout=context.limits.idle_timeout,
            reactor=context.clock,
            parsePOSTFormSubmission=False,
        )
        self.context = context
        self.access_log = access_log

    def log(self, request: http.Request) -> None:
        """
        The access log (a line per request: address, method, path, status,
        size, referrer, user agent; never a body, a cookie or a token): about
        2 % of the relay's CPU while it pairs, so it can be turned off.

        The line and its event are twisted.web's (L{access_line}), made
        without the detour through C{twisted.python.log.logfile}, which
        buffers the text and splits it into lines again.
        """
        if self.access_log:
            _ACCESS_LOG.emit(
                LogLevel.info, "{log_io}", log_io=access_line(self._logDateTime, request)
            )

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]

    def getResourceFor(self, request: Request) -> Resource:
        for name, value in _SECURITY_HEADERS.items():
            request.setHeader(name, value)
        return super().getResourceFor(request)


def make_site(context: RelayContext, *, access_log: bool = True) -> RelaySite:
    """The relay's whole HTTP tree; C{access_log=False} logs no request."""
    api = API(context)
    # The page and its assets, with no cookie: the page starts or keeps its
    # session with POST /api/session (API.post_session says why).
    root = Static(STATIC)
    root.indexNames = ["index.html"]
    root.putChild(b"api", Resource())
    api_root = root.children[b"api"]
    api_root.putChild(b"session", JSONEndpoint(context, post=api.post_session))
    api_root.putChild(b"pairing-codes", JSONEndpoint(context, post=api.post_code))
    api_root.putChild(b"pair", JSONEndpoint(context, post=api.post_pair))
    api_root.children[b"pair"].putChild(b"key", JSONEndpoint(context, post=api.post_pair_key))
    api_root.putChild(b"token", JSONEndpoint(context, get=api.get_token, delete=api.delete_token))
    api_root.putChild(b"bridges", JSONEndpoint(context, get=api.get_bridges))
    api_root.putChild(b"revoke", JSONEndpoint(context, post=api.post_revoke))
    root.putChild(b"ws", Resource())
    ws = root.children[b"ws"]
    ws.putChild(b"ide", Upgrade(RelayWebSocketFactory(context, IDEProtocol)))
    ws.putChild(b"bridge", Upgrade(RelayWebSocketFactory(context, BridgeProtocol)))
    site = RelaySite(root, context, access_log=access_log)
    site.displayTracebacks = False
    return site


def make_node_site(context: RelayContext) -> RelaySite:
    """
    The node listener's tree (several relay nodes): only the node links'
    WebSocket endpoints, which take node tokens, never cookies or bridge tokens.
    """
    root = Resource()
    root.putChild(b"ws", Resource())
    root.children[b"ws"].putChild(b"node", Resource())
    node = root.children[b"ws"].children[b"node"]
    node.putChild(b"ide", Upgrade(RelayWebSocketFactory(context, NodeIDEProtocol)))
    node.putChild(b"bridge", Upgrade(RelayWebSocketFactory(context, NodeBridgeProtocol)))
    site = RelaySite(root, context, access_log=False)
    site.displayTracebacks = False
    return site
