"""
The relay's HTTP face on loopback, with real TLS 1.3: the pairing API and its
limits, the WebSocket handshake refusals, security headers, and TLS versions.

Every test starts its own relay (rate limits count per client IP, and all
traffic here comes from 127.0.0.1), and waits for every connection it opened.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import ssl
from http.cookiejar import CookieJar
from io import BytesIO
from typing import Any, cast

import attrs
import jwt
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.types import ConnectionResponse
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from OpenSSL import SSL
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, CookieAgent, FileBodyProducer, readBody
from twisted.web.http import combinedLogFormatter
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel
from zope.interface import implementer

from coder1_relay.certs import DEV_CERT_NAME, DEV_KEY_NAME
from coder1_relay.context import SESSION_COOKIE
from coder1_relay.service import RelayService, RelaySettings, home_relative
from coder1_relay.web import access_line
from coder1_wire.e2e import Identity, b64u
from coder1_wire.tls import client_tls_options

from .logs import capture_logs
from .loopback import Browser, RelayTrust, reactor, settle, start_relay, stop_all

#: The public keys the ends exchange at pairing are opaque to the relay.
KEY = b64u(Identity.generate().public_raw)
CODE_BODY = {"browser_key": KEY}
API_PATHS = ["/api/session", "/api/pairing-codes", "/api/pair", "/api/token", "/api/revoke"]


# --- plain HTTP requests, for what Browser.request cannot send --------------------------------


async def fetch(
    relay: RelayService,
    method: bytes,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[bytes, bytes] | None = None,
    cookies: CookieJar | None = None,
) -> tuple[int, bytes, Headers]:
    """One HTTPS request with raw bytes in and out: (status, body, headers)."""
    agent: Any = Agent(reactor, contextFactory=RelayTrust(relay.keys.tls_cert_pem.decode()))
    if cookies is not None:
        agent = CookieAgent(agent, cookies)
    producer = FileBodyProducer(BytesIO(body)) if body is not None else None
    response = await agent.request(
        method,
        (relay.context.public_url + path).encode(),
        Headers({k: [v] for k, v in (headers or {}).items()}),
        producer,
    )
    return response.code, await readBody(response), response.headers


def header(headers: Headers, name: str) -> str:
    """The one value of header C{name}; fails if it is missing or repeated."""
    values = headers.getRawHeaders(name)
    assert values is not None and len(values) == 1, (name, values)
    return str(values[0])


# --- WebSocket probes ------------------------------------------------------------------------


class ProbeProtocol(WebSocketClientProtocol):
    """A WebSocket client that only reports whether it opened and how it closed."""

    factory: ProbeFactory

    def onConnect(self, response: ConnectionResponse) -> None:
        self.factory.response_headers = response.headers

    def onOpen(self) -> None:
        self.factory.opened.callback(True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        pass

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.callback(False)
        if not self.factory.closed.called:
            self.factory.closed.callback(reason or "")


class ProbeFactory(WebSocketClientFactory):
    protocol = ProbeProtocol  # type: ignore[assignment]

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.opened: Deferred[bool] = Deferred()
        self.closed: Deferred[str] = Deferred()
        #: The headers of the relay's 101 answer, once the handshake is done.
        self.response_headers: dict[str, str] = {}


async def websocket(
    relay: RelayService, path: str, headers: dict[str, str], origin: str | None = None
) -> tuple[ProbeFactory, ProbeProtocol]:
    """Connect to C{path} over TLS 1.3; the factory's C{opened} says how the handshake went."""
    factory = ProbeFactory(
        relay.context.public_url.replace("https", "wss", 1) + path, origin=origin, headers=headers
    )
    endpoint: Any = wrapClientTLS(
        client_tls_options("localhost", relay.keys.tls_cert_pem), _loopback(relay)
    )
    protocol: ProbeProtocol = await endpoint.connect(factory)
    return factory, protocol


def _loopback(relay: RelayService) -> Any:
    """A plain TCP endpoint for the relay's port."""
    port: Any = relay.port
    assert port is not None
    return HostnameEndpoint(reactor, "127.0.0.1", port.getHost().port)


# --- tokens made outside the relay -----------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unverified(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def _forge(alg: str, claims: dict[str, Any], sign: Any) -> str:
    """A JWT with the given C{alg} header, signed by C{sign(signing_input) -> bytes}."""
    head = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    signing_input = f"{head}.{body}".encode()
    return f"{head}.{body}.{_b64(sign(signing_input))}"


# --- the test cases ---------------------------------------------------------------------------


class RelayTestCase(TestCase):
    """A fresh relay on loopback and a browser that has loaded its page."""

    timeout = 30

    async def start(self, *, open_page: bool = True) -> None:
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        self.relay = await start_relay(FilePath(self.mktemp()))
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(self.relay)))
        self.browser = Browser(self.relay)
        if open_page:
            await self.browser.open_page()

    async def pair(self, label: str = "laptop") -> dict[str, Any]:
        """A code from the browser, redeemed like the bridge does: the answer's body."""
        code = await self.browser.new_code()
        status, body, _ = await self.browser.request(
            b"POST", "/api/pair", {"code": code, "label": label, "bridge_key": KEY}
        )
        self.assertEqual(status, 200, body)
        status, answer, _ = await self.browser.request(
            b"POST",
            "/api/pair/key",
            {"bridge_key": KEY},
            headers={"Authorization": f"Bearer {body['token']}"},
        )
        self.assertEqual(status, 200, answer)
        return body

    def session_cookie(self) -> str:
        (value,) = [c.value for c in self.browser.cookies if c.name == SESSION_COOKIE]
        assert value is not None
        return value

    async def connect(
        self, path: str, headers: dict[str, str], origin: str | None = None
    ) -> tuple[bool, str]:
        """
        Open a WebSocket: (opened, close reason).  An opened one is closed
        cleanly again (and waited for) before this returns.
        """
        factory, protocol = await websocket(self.relay, path, headers, origin)
        opened = await factory.opened
        if opened:
            protocol.sendClose(1000)
        reason = await factory.closed
        return opened, reason

    async def assertRefused(
        self,
        path: str,
        headers: dict[str, str],
        status: int,
        reason: str,
        origin: str | None = None,
    ) -> None:
        """The handshake fails with HTTP C{status}, and the client sees C{reason}."""
        opened, seen = await self.connect(path, headers, origin)
        self.assertFalse(opened, f"{path} opened with {headers}")
        self.assertIn(f"WebSocket connection upgrade failed [{status}]: {reason}", seen)

    async def assertBridgeRefused(self, token: str | None, reason: str) -> None:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        await self.assertRefused("/ws/bridge", headers, 401, reason)


class SessionTests(RelayTestCase):
    """A browser session starts at the page's POST /api/session, and nowhere else."""

    async def test_page_never_sets_a_cookie(self) -> None:
        """
        Loading the page or its files never sets a cookie, with no cookie (as
        a link from another site arrives: the SameSite=Strict cookie is not
        sent) or with the session's: a navigation cannot replace a session.
        """
        await self.start()
        for cookies in (None, self.browser.cookies):
            for path in ("/", "/index.html", "/app.js"):
                status, _, headers = await fetch(self.relay, b"GET", path, cookies=cookies)
                self.assertEqual(status, 200, path)
                self.assertIsNone(headers.getRawHeaders("set-cookie"), path)

    async def test_started_once_then_kept(self) -> None:
        """
        POST /api/session without a valid cookie starts a session (C{new}
        true, a cookie); with the session's cookie it keeps that session
        (C{new} false, no cookie set), and the session's bridges stay listed.
        """
        await self.start(open_page=False)
        status, body, headers = await self.browser.request(b"POST", "/api/session")
        self.assertEqual((status, body), (200, {"ok": True, "new": True}))
        self.assertIsNotNone(headers.getRawHeaders("set-cookie"))
        first = self.session_cookie()
        await self.pair()
        status, body, headers = await self.browser.request(b"POST", "/api/session")
        self.assertEqual((status, body), (200, {"ok": True, "new": False}))
        self.assertIsNone(headers.getRawHeaders("set-cookie"))
        self.assertEqual(self.session_cookie(), first)
        status, body, _ = await self.browser.request(b"GET", "/api/bridges")
        self.assertEqual((status, len(body["bridges"])), (200, 1))
        stranger = Browser(self.relay)
        status, body, _ = await stranger.request(
            b"POST", "/api/session", headers={"Cookie": f"{SESSION_COOKIE}=forged"}
        )
        self.assertEqual((status, body), (200, {"ok": True, "new": True}))


class PairingCodeTests(RelayTestCase):
    """POST /api/pairing-codes: a session's browser only, from our origin, rate limited."""

    async def test_sixth_code_in_a_minute_is_rate_limited(self) -> None:
        """
        Five codes a minute per session are granted; the sixth gets 429 with
        an integer C{Retry-After} of 1..60 seconds and a JSON error body.
        """
        await self.start()
        codes = [await self.browser.new_code() for _ in range(5)]
        self.assertEqual(len(set(codes)), 5)
        self.assertTrue(all(len(c) == 6 and c.isdigit() for c in codes), codes)
        status, body, headers = await self.browser.request(b"POST", "/api/pairing-codes", CODE_BODY)
        self.assertEqual(status, 429)
        self.assertEqual(body["error"], "rate-limited")
        self.assertIsInstance(body["message"], str)
        self.assertEqual(header(headers, "content-type"), "application/json")
        retry_after = header(headers, "retry-after")
        self.assertTrue(retry_after.isdigit(), retry_after)
        self.assertTrue(1 <= int(retry_after) <= 60, retry_after)

    async def test_code_names_the_development_certificate(self) -> None:
        """
        A relay with its development certificate tells the page where that file is, for the
        pairing command it shows (home-relative, so it pastes as is and names no user); a
        relay with an operator's certificate does not.
        """
        await self.start()
        status, body, _ = await self.browser.request(b"POST", "/api/pairing-codes", CODE_BODY)
        self.assertEqual(status, 201)
        dev_cert = self.relay.settings.state_dir.child(DEV_CERT_NAME).path
        self.assertEqual(body["ca_cert"], home_relative(dev_cert))
        home = os.path.expanduser("~")
        self.assertEqual(home_relative(f"{home}/.local/state/x.pem"), "~/.local/state/x.pem")
        self.assertEqual(home_relative(f"{home}x/y.pem"), f"{home}x/y.pem")
        state = self.relay.settings.state_dir
        operator = RelayService(
            reactor,
            RelaySettings(
                state_dir=FilePath(self.mktemp()),
                tls_cert=state.child(DEV_CERT_NAME),
                tls_key=state.child(DEV_KEY_NAME),
            ),
        )
        self.assertIsNone(operator.context.dev_cert)

    async def test_no_session_cookie(self) -> None:
        """Without a session cookie (the page never loaded) the answer is 401, no code."""
        await self.start(open_page=False)
        status, body, _ = await self.browser.request(b"POST", "/api/pairing-codes", CODE_BODY)
        self.assertEqual((status, body["error"]), (401, "no-session"))
        self.assertNotIn("code", body)

    async def test_foreign_or_missing_origin_is_refused(self) -> None:
        """
        CSRF: with a valid cookie but a foreign Origin, a look-alike one, an
        opaque C{null} one, or none at all, the answer is 403 and no code.
        """
        await self.start()
        own = self.relay.context.public_url
        for origin in ("https://evil.example", own + ".evil.example", "http://" + own[8:], "null"):
            self.browser.origin = origin
            status, body, _ = await self.browser.request(b"POST", "/api/pairing-codes", CODE_BODY)
            self.assertEqual((status, body.get("error")), (403, "bad-origin"), origin)
        self.browser.origin = None
        status, body, _ = await self.browser.request(
            b"POST", "/api/pairing-codes", CODE_BODY, origin=False
        )
        self.assertEqual((status, body.get("error")), (403, "bad-origin"))
        # The control: the same browser from its own origin gets a code.
        self.assertEqual(len(await self.browser.new_code()), 6)


class RedeemTests(RelayTestCase):
    """POST /api/pair: a code is good once, failures are bounded, bodies are checked."""

    async def test_good_code_then_same_code_again(self) -> None:
        """A live code gives 200 with a token and peer number; the same code again is 403."""
        await self.start()
        code = await self.browser.new_code()
        status, body, _ = await self.browser.request(
            b"POST", "/api/pair", {"code": code, "label": "laptop", "bridge_key": KEY}
        )
        self.assertEqual(status, 200, body)
        self.assertEqual(body["peer"], 1)
        self.assertIsInstance(body["token"], str)
        self.assertEqual(_unverified(body["token"])["peer"], 1)
        status, again, _ = await self.browser.request(
            b"POST", "/api/pair", {"code": code, "label": "laptop", "bridge_key": KEY}
        )
        self.assertEqual((status, again["error"]), (403, "invalid-code"))
        self.assertNotIn("token", again)

    async def test_concurrent_redemptions(self) -> None:
        """Two redemptions of one code in flight at once: exactly one gets a token."""
        await self.start()
        code = await self.browser.new_code()
        requests = [
            Deferred.fromCoroutine(
                Browser(self.relay).request(
                    b"POST", "/api/pair", {"code": code, "label": label, "bridge_key": KEY}
                )
            )
            for label in ("first", "second")
        ]
        results = await gatherResults(requests)
        statuses = sorted(status for status, _, _ in results)
        self.assertEqual(statuses, [200, 403])
        self.assertEqual(sum("token" in body for _, body, _ in results), 1)

    async def test_brute_force_bound(self) -> None:
        """
        Ten wrong codes from one IP within the hour, and the next attempt is
        429 even with a live code, which is then not consumed.
        """
        await self.start()
        code = await self.browser.new_code()
        wrong = [c for c in (f"{n:06d}" for n in range(11)) if c != code][:10]
        for guess in wrong:
            status, body, _ = await self.browser.request(
                b"POST", "/api/pair", {"code": guess, "label": "x", "bridge_key": KEY}
            )
            self.assertEqual((status, body["error"]), (403, "invalid-code"), guess)
        status, body, headers = await self.browser.request(
            b"POST", "/api/pair", {"code": code, "label": "x", "bridge_key": KEY}
        )
        self.assertEqual((status, body["error"]), (429, "rate-limited"))
        self.assertNotIn("token", body)
        self.assertGreaterEqual(int(header(headers, "retry-after")), 1)
        # Refused before the code was looked at: it is still live in the store.
        store: Any = self.relay.context.store
        self.assertIsNotNone(await store.take_code(code, reactor.seconds()))

    async def redeem_from(self, source: str, code: str) -> int:
        """C{POST /api/pair} with C{code} from the loopback address C{source}: the status."""
        agent = Agent(
            reactor,
            contextFactory=RelayTrust(self.relay.keys.tls_cert_pem.decode()),
            bindAddress=(source, 0),
        )
        body = json.dumps({"code": code, "label": "x"}).encode()
        response = await agent.request(
            b"POST",
            (self.relay.context.public_url + "/api/pair").encode(),
            Headers({b"Content-Type": [b"application/json"]}),
            FileBodyProducer(BytesIO(body)),
        )
        await readBody(response)
        return response.code

    async def test_distributed_guesser_cannot_block_pairing(self) -> None:
        """
        The audit's attack: 600 failed redemptions from 61 addresses, as fast
        as they go.  A person pairing from another network still pairs; the
        guesser is slowed: its addresses get 429 even with a live code, and the
        61st address, in a network of its own, got 3 guesses before its 429s.
        """
        await self.start()
        statuses: list[int] = []
        for n in range(61):
            statuses += [await self.redeem_from(f"127.0.{n + 1}.1", "000000") for _ in range(10)]
        self.assertEqual(statuses.count(403), 600 + 3)
        self.assertEqual(statuses[-7:], [429] * 7)
        code = await self.browser.new_code()
        self.assertEqual(await self.redeem_from("127.0.1.1", code), 429)
        self.assertEqual(await self.redeem_from("127.0.1.2", code), 429)
        self.assertEqual(await self.redeem_from("127.0.200.1", code), 200)

    async def test_body_not_json(self) -> None:
        """A body that is not a JSON object is 400 bad-json."""
        await self.start()
        for raw in (b"code=123456", b"{truncated", b'["123456"]', b"\xff\xfe"):
            status, body, headers = await fetch(
                self.relay,
                b"POST",
                "/api/pair",
                body=raw,
                headers={b"Content-Type": b"application/json"},
            )
            self.assertEqual((status, json.loads(body)["error"]), (400, "bad-json"), raw)
            self.assertEqual(header(headers, "content-type"), "application/json")

    async def test_body_too_large(self) -> None:
        """A body of 16 KiB + 1 byte is 413; one of exactly 16 KiB is read and judged."""
        await self.start()
        limit = self.relay.context.limits.max_body_size
        self.assertEqual(limit, 16 * 1024)

        def padded(size: int) -> bytes:
            stub = json.dumps(
                {"code": "000000", "label": "x", "bridge_key": KEY, "pad": ""}
            ).encode()
            raw = stub[:-2] + b"a" * (size - len(stub)) + stub[-2:]
            assert len(raw) == size
            return raw

        status, body, _ = await fetch(self.relay, b"POST", "/api/pair", body=padded(limit + 1))
        self.assertEqual((status, json.loads(body)["error"]), (413, "too-large"))
        status, body, _ = await fetch(self.relay, b"POST", "/api/pair", body=padded(limit))
        self.assertEqual((status, json.loads(body)["error"]), (403, "invalid-code"))


class BridgeHandshakeTests(RelayTestCase):
    """/ws/bridge refuses, with 401 and a reason the bridge can show, every bad token."""

    async def test_valid_token_connects(self) -> None:
        """The control: the token /api/pair gave opens the bridge WebSocket."""
        await self.start()
        token = (await self.pair())["token"]
        opened, _ = await self.connect("/ws/bridge", {"Authorization": f"Bearer {token}"})
        self.assertTrue(opened)

    async def test_no_token(self) -> None:
        """No Authorization header, or one that is not a bearer token: 401."""
        await self.start()
        await self.assertBridgeRefused(None, "no bearer token")
        await self.assertRefused(
            "/ws/bridge", {"Authorization": "Basic dXNlcjpwYXNz"}, 401, "no bearer token"
        )

    async def test_garbage_token(self) -> None:
        """A bearer value that is no JWT at all: 401 malformed."""
        await self.start()
        await self.assertBridgeRefused("not-a-jwt", "token is malformed")

    async def test_expired_token(self) -> None:
        """A token signed by this relay whose exp has passed: 401 expired."""
        await self.start()
        tokens = self.relay.context.tokens
        past = Clock()
        past.advance(reactor.seconds() - tokens.bridge_lifetime - 3600)
        token, claims = attrs.evolve(tokens, clock=cast(Any, past)).issue_bridge_token("s", 1)
        self.assertLess(claims.expires_at, reactor.seconds())
        await self.assertBridgeRefused(token, "token has expired")

    async def test_tampered_token(self) -> None:
        """A real token with a changed claim (another peer, later exp): 401 bad signature."""
        await self.start()
        token = (await self.pair())["token"]
        head, _, signature = token.split(".")
        claims = _unverified(token)
        claims.update(peer=2, exp=claims["exp"] + 365 * 86400)
        tampered = f"{head}.{_b64(json.dumps(claims).encode())}.{signature}"
        await self.assertBridgeRefused(tampered, "token signature is invalid")
        # A single flipped character in the payload is caught too.
        payload = token.split(".")[1]
        flipped = payload[:10] + ("A" if payload[10] != "A" else "B") + payload[11:]
        await self.assertBridgeRefused(
            f"{head}.{flipped}.{signature}", "token signature is invalid"
        )

    async def test_wrong_audience(self) -> None:
        """The browser's session cookie, a token of this relay for browsers: 401 audience."""
        await self.start()
        await self.assertBridgeRefused(self.session_cookie(), "token is for another audience")

    async def test_alg_none_and_hmac(self) -> None:
        """
        An unsigned C{alg: none} token, and an HS256 one keyed with the relay's
        public key (algorithm confusion), are refused: 401 algorithm.
        """
        await self.start()
        claims = _unverified((await self.pair())["token"])
        await self.assertBridgeRefused(
            _forge("none", claims, lambda _: b""), "token algorithm not allowed"
        )
        public = self.relay.keys.signing_key.public_key()
        for secret in (
            public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
            public.public_bytes(Encoding.Raw, PublicFormat.Raw),
        ):
            forged = _forge(
                "HS256", claims, lambda data, k=secret: hmac.new(k, data, hashlib.sha256).digest()
            )
            await self.assertBridgeRefused(forged, "token algorithm not allowed")

    async def test_other_key(self) -> None:
        """Right claims, right algorithm, another Ed25519 key: 401 bad signature."""
        await self.start()
        claims = _unverified((await self.pair())["token"])
        forged = jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA")
        await self.assertBridgeRefused(forged, "token signature is invalid")

    async def test_revoked_token(self) -> None:
        """After the browser revokes bridge 1, its old (unexpired) token is refused: 401."""
        await self.start()
        token = (await self.pair())["token"]
        status, body, _ = await self.browser.request(b"POST", "/api/revoke", {"peer": 1})
        self.assertEqual((status, body), (200, {"revoked": 1}))
        await self.assertBridgeRefused(token, "token has been revoked")


class IDEHandshakeTests(RelayTestCase):
    """/ws/ide needs both our Origin and a valid session cookie."""

    async def test_wrong_origin(self) -> None:
        """A foreign (or missing) Origin is 403, even with a valid cookie."""
        await self.start()
        cookie = {"Cookie": f"{SESSION_COOKIE}={self.session_cookie()}"}
        await self.assertRefused(
            "/ws/ide", cookie, 403, "origin not allowed", "https://evil.example"
        )
        await self.assertRefused("/ws/ide", cookie, 403, "origin not allowed", None)

    async def test_no_cookie(self) -> None:
        """The right Origin without a session cookie is 401."""
        await self.start()
        await self.assertRefused(
            "/ws/ide", {}, 401, "no session cookie", self.relay.context.public_url
        )

    async def test_tampered_cookie(self) -> None:
        """
        A session cookie with a changed subject (another session), or a bridge
        token in its place, is 401.
        """
        await self.start()
        origin = self.relay.context.public_url
        cookie = self.session_cookie()
        head, _, signature = cookie.split(".")
        claims = _unverified(cookie)
        claims["sub"] = "someone-elses-session"
        tampered = f"{head}.{_b64(json.dumps(claims).encode())}.{signature}"
        await self.assertRefused(
            "/ws/ide",
            {"Cookie": f"{SESSION_COOKIE}={tampered}"},
            401,
            "session token signature is invalid",
            origin,
        )
        bridge_token = (await self.pair())["token"]
        await self.assertRefused(
            "/ws/ide",
            {"Cookie": f"{SESSION_COOKIE}={bridge_token}"},
            401,
            "session token is for another audience",
            origin,
        )

    async def test_origin_and_cookie_open(self) -> None:
        """The control: our Origin and the page's cookie open the IDE WebSocket."""
        await self.start()
        opened, _ = await self.connect(
            "/ws/ide",
            {"Cookie": f"{SESSION_COOKIE}={self.session_cookie()}"},
            self.relay.context.public_url,
        )
        self.assertTrue(opened)


class TokenCheckTests(RelayTestCase):
    """GET /api/token tells a bridge whether its token is still good."""

    async def test_valid_then_revoked(self) -> None:
        """A fresh token is 200; after revocation the same token is 401 'revoked'."""
        await self.start()
        token = (await self.pair())["token"]
        bearer = {b"Authorization": f"Bearer {token}".encode()}
        status, raw, _ = await fetch(self.relay, b"GET", "/api/token", headers=bearer)
        body = json.loads(raw)
        self.assertEqual((status, body["valid"], body["peer"]), (200, True, 1))
        status, _, _ = await self.browser.request(b"POST", "/api/revoke", {"peer": 1})
        self.assertEqual(status, 200)
        status, raw, _ = await fetch(self.relay, b"GET", "/api/token", headers=bearer)
        body = json.loads(raw)
        self.assertEqual((status, body["error"]), (401, "bad-token"))
        self.assertIn("revoked", body["message"])

    async def test_no_token(self) -> None:
        """No bearer token is 401 too."""
        await self.start()
        status, raw, _ = await fetch(self.relay, b"GET", "/api/token")
        self.assertEqual((status, json.loads(raw)["error"]), (401, "bad-token"))


class SecurityHeaderTests(RelayTestCase):
    """Every answer carries the security headers; API answers are never cached."""

    def assertSecurityHeaders(self, what: str, headers: Headers) -> None:
        csp = header(headers, "content-security-policy")
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        # No inline or eval'd script anywhere; xterm.js needs inline <style>, styles only.
        self.assertEqual(directives["script-src"], "'self'", what)
        self.assertNotIn("unsafe-eval", csp, what)
        self.assertIn("default-src 'self'", csp, what)
        self.assertIn("frame-ancestors 'none'", csp, what)
        self.assertEqual(header(headers, "x-content-type-options"), "nosniff", what)
        self.assertEqual(header(headers, "x-frame-options"), "DENY", what)
        hsts = header(headers, "strict-transport-security")
        self.assertRegex(hsts, r"^max-age=\d+", what)
        self.assertGreaterEqual(int(hsts.split("=")[1].split(";")[0]), 180 * 86400, what)

    async def test_every_response(self) -> None:
        """The page, assets, every API endpoint (OK, refused, 405) and a 404 carry them."""
        await self.start()
        jar = self.browser.cookies
        answers = [
            ("page", "GET", "/", None, 200),
            ("index", "GET", "/index.html", None, 200),
            ("missing", "GET", "/no-such-page", None, 404),
            ("api missing", "GET", "/api/no-such-endpoint", None, 404),
            ("bridges", "GET", "/api/bridges", jar, 200),
            ("bridges anon", "GET", "/api/bridges", None, 401),
            ("pair bad", "POST", "/api/pair", None, 403),
            ("pair 405", "GET", "/api/pair", None, 405),
        ]
        for what, method, path, cookies, expected in answers:
            body = (
                json.dumps({"code": "000000", "bridge_key": KEY}).encode()
                if method == "POST"
                else None
            )
            status, _, headers = await fetch(
                self.relay, method.encode(), path, body=body, cookies=cookies
            )
            self.assertEqual(status, expected, what)
            self.assertSecurityHeaders(what, headers)
            if path.startswith("/api/") and expected != 404:
                self.assertEqual(header(headers, "cache-control"), "no-store", what)
                self.assertEqual(header(headers, "content-type"), "application/json", what)
        for path in API_PATHS:
            status, _, headers = await self.browser.request(b"POST", path, {"peer": 99})
            self.assertSecurityHeaders(path, headers)
            self.assertEqual(header(headers, "cache-control"), "no-store", path)

    async def test_no_server_header(self) -> None:
        """
        No answer names the software or its version: no C{Server} header on
        the page, an asset, an API answer, a 404, a 405, a 400 for a request
        line too long, nor on the WebSocket upgrade (Twisted and Autobahn each
        sent theirs, with versions).
        """
        await self.start()
        answers = [
            ("GET", "/", None),
            ("GET", "/app.js", None),
            ("GET", "/api/bridges", self.browser.cookies),
            ("GET", "/api/bridges", None),
            ("GET", "/no-such-page", None),
            ("GET", "/api/pair", None),
            ("GET", "/" + "a" * 20000, None),
        ]
        for method, path, cookies in answers:
            _, _, headers = await fetch(self.relay, method.encode(), path, cookies=cookies)
            self.assertIsNone(headers.getRawHeaders("server"), path[:20])
        factory, protocol = await websocket(
            self.relay,
            "/ws/ide",
            {"Cookie": f"{SESSION_COOKIE}={self.session_cookie()}"},
            self.relay.context.public_url,
        )
        self.assertTrue(await factory.opened)
        self.assertIn("upgrade", {name.lower() for name in factory.response_headers})
        self.assertNotIn("server", {name.lower() for name in factory.response_headers})
        protocol.sendClose(1000)
        await factory.closed

    async def test_session_cookie_attributes(self) -> None:
        """
        POST /api/session sets C{__Host-coder1-session} with Secure, HttpOnly,
        SameSite=Strict, Path=/ and no Domain (what the __Host- prefix demands).
        """
        await self.start(open_page=False)
        status, _, headers = await fetch(
            self.relay,
            b"POST",
            "/api/session",
            headers={b"Origin": self.relay.context.public_url.encode()},
        )
        self.assertEqual(status, 200)
        name_value, *attributes = [
            part.strip() for part in header(headers, "set-cookie").split(";")
        ]
        name, _, value = name_value.partition("=")
        self.assertEqual(name, SESSION_COOKIE)
        self.assertTrue(value)
        parsed = {a.partition("=")[0].lower(): a.partition("=")[2] for a in attributes}
        self.assertIn("secure", parsed)
        self.assertIn("httponly", parsed)
        self.assertEqual(parsed.get("samesite", "").lower(), "strict")
        self.assertEqual(parsed.get("path"), "/")
        self.assertNotIn("domain", parsed)
        self.assertGreater(int(parsed["max-age"]), 0)


class HostilePathTests(RelayTestCase):
    """Paths the relay cannot map to a file: 404 (or 400), and no traceback in the log."""

    async def test_unmappable_paths_not_found(self) -> None:
        """
        A NUL byte (C{/app.js%00.html}, which once answered 500), dot segments
        spelled C{%2e%2e}, an encoded slash, invalid and overlong UTF-8, a
        segment longer than any file name and a request line longer than
        twisted.web reads: each answers 404 or 400, and the relay logs no
        traceback, no failure and nothing at error level or above.
        """
        await self.start(open_page=False)
        events = capture_logs(self)
        paths = [
            "/app.js%00.html",
            "/index.html%00",
            "/vendor/%00",
            "/%00",
            "/%2e%2e/%2e%2e/etc/passwd",
            "/vendor/%2e%2e%2fapp.js",
            "/..%2f..%2fetc%2fpasswd",
            "/%ff%fe",
            "/%c0%ae%c0%ae/app.js",
            "/vendor/%ed%a0%80",
            "/" + "a" * 5000,
            "/vendor/" + "%e2%82%ac" * 2000,
        ]
        for path in paths:
            status, _, _ = await fetch(self.relay, b"GET", path)
            self.assertIn(status, (400, 404), path)
        self.assertEqual(self.flushLoggedErrors(), [])
        loud = [
            formatEvent(e)
            for e in events
            if "log_failure" in e or e.get("log_level") in (LogLevel.error, LogLevel.critical)
        ]
        self.assertEqual(loud, [])
        self.assertFalse([e for e in events if "Traceback" in formatEvent(e)])


@implementer(IHandshakeListener)
class _TLSProbe(Protocol):
    """Reports the TLS handshake's outcome: the version on success, the failure otherwise."""

    def __init__(self) -> None:
        self.done: Deferred[str] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        transport: Any = self.transport
        self.done.callback(transport.getHandle().get_protocol_version_name())
        transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.errback(reason)
        self.lost.callback(None)


class TLSVersionTests(RelayTestCase):
    """The relay's port speaks TLS 1.3 only."""

    async def handshake(self, maximum: TLSVersion | None) -> str | Failure:
        """A bare TLS handshake with the relay: the version agreed, or why it failed."""
        extra = {} if maximum is None else {"lowerMaximumSecurityTo": maximum}
        options = optionsForClientTLS(
            "localhost",
            trustRoot=Certificate.loadPEM(self.relay.keys.tls_cert_pem),
            extraCertificateOptions=extra,
        )
        probe = _TLSProbe()
        endpoint: Any = wrapClientTLS(options, _loopback(self.relay))
        await endpoint.connect(Factory.forProtocol(lambda: probe))
        try:
            outcome: str | Failure = await probe.done
        except Exception:
            outcome = Failure()
        await probe.lost
        return outcome

    async def test_tls12_refused_tls13_accepted(self) -> None:
        """A client capped at TLS 1.2 fails the handshake; a TLS 1.3 client completes it."""
        await self.start(open_page=False)
        refused = await self.handshake(TLSVersion.TLSv1_2)
        # The server answers a TLS 1.2 ClientHello with a protocol_version alert.
        self.assertIsInstance(refused, Failure, refused)
        assert isinstance(refused, Failure)
        self.assertTrue(refused.check(SSL.Error), refused)
        self.assertIn("protocol version", str(refused.value))
        accepted = await self.handshake(None)
        self.assertEqual(accepted, "TLSv1.3")


def _two_connections(port: int, ca_pem: str) -> tuple[bool, bool]:
    """
    With Python's ssl module (its own OpenSSL): a request on one connection,
    then a second connection offering the first one's session.  Whether the
    first brought a ticket, and whether the second resumed.
    """
    context = ssl.create_default_context(cadata=ca_pem)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    address = ("127.0.0.1", port)
    with (
        socket.create_connection(address) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        # Tickets come after the handshake: reading the answer takes them in.
        tls.sendall(b"GET /api/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        while tls.recv(65536):
            pass
        session = tls.session
    assert session is not None
    with (
        socket.create_connection(address) as raw,
        context.wrap_socket(raw, server_hostname="localhost", session=session) as again,
    ):
        return session.has_ticket, bool(again.session_reused)


class TicketTests(RelayTestCase):
    """What docs/security.md (section 9) says of TLS session tickets, with a real client."""

    async def test_tickets_never_resume(self) -> None:
        """
        The relay sends no TLS 1.3 session ticket, so a client has no session
        to offer and the next connection is a full handshake.
        """
        await self.start(open_page=False)
        port: Any = self.relay.port
        had_ticket, reused = await deferToThread(
            _two_connections, port.getHost().port, self.relay.keys.tls_cert_pem.decode()
        )
        self.assertFalse(had_ticket)
        self.assertFalse(reused)


def _kept_alive(port: int, ca_pem: str, origin: str) -> list[tuple[bytes, bytes]]:
    """
    With Python's ssl module: POST /api/session twice on one connection, each
    answer read by its Content-Length (a chunked answer has none).  The heads
    and bodies, as received.
    """
    context = ssl.create_default_context(cadata=ca_pem)
    request = (
        f"POST /api/session HTTP/1.1\r\nHost: localhost\r\nOrigin: {origin}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    answers = []
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
        tls.makefile("rb") as stream,
    ):
        for _ in range(2):
            tls.sendall(request)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += stream.readline()
            length = re.search(rb"(?im)^content-length: (\d+)\r$", head)
            assert length is not None, head
            answers.append((head, stream.read(int(length.group(1)))))
    return answers


class AnswerTests(RelayTestCase):
    """How API answers are framed on the wire."""

    async def test_api_answers_have_their_length(self) -> None:
        """
        An API answer carries its Content-Length and is not chunked (one write,
        no closing chunk), and a kept-alive connection takes the next request.
        """
        await self.start(open_page=False)
        port: Any = self.relay.port
        answers = await deferToThread(
            _kept_alive,
            port.getHost().port,
            self.relay.keys.tls_cert_pem.decode(),
            self.relay.context.public_url,
        )
        self.assertEqual(len(answers), 2)
        for head, body in answers:
            self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
            self.assertNotIn(b"transfer-encoding", head.lower())
            self.assertEqual(json.loads(body)["ok"], True)


class AccelerationTests(TestCase):
    """Autobahn runs with its native (NVX) helpers."""

    def test_nvx_in_use(self) -> None:
        """
        USES_NVX is true and the frame masker is NVX's: pure-Python masking is
        roughly 100x slower, which would cap the relay's throughput.
        """
        from autobahn import websocket
        from autobahn.websocket import xormasker

        self.assertTrue(websocket.USES_NVX)
        self.assertTrue(xormasker.create_xor_masker.__module__.startswith("autobahn.nvx"))


class AccessLogTests(TestCase):
    """The access log: a line per request by default; none with C{access_log=False}."""

    timeout = 30

    async def requests_logged(self, **settings: Any) -> list[str]:
        """The access-log lines of a page load and a session request to a fresh relay."""
        lines: list[str] = []

        @implementer(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            text = formatEvent(event)
            if '"GET /' in text or '"POST /api/' in text:
                lines.append(text)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        relay = await start_relay(FilePath(self.mktemp()), **settings)
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(relay)))
        browser = Browser(relay)
        await browser.open_page()
        status, _, _ = await browser.request(b"POST", "/api/session", {})
        self.assertLess(status, 500)
        return lines

    async def test_on_by_default(self) -> None:
        """Each request is a line: method and path, nothing of its body."""
        lines = await self.requests_logged()
        self.assertTrue(any('"POST /api/session' in line for line in lines), lines)

    async def test_off(self) -> None:
        """With C{access_log=False} no request is logged."""
        self.assertEqual(await self.requests_logged(access_log=False), [])

    async def test_as_twisted_web_logs_it(self) -> None:
        """
        A line is the event twisted.web's access log would be: its namespace,
        level and text (after the time), from the time to the user agent.
        """
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        await self.requests_logged()
        logged = [e for e in events if '"POST /api/session' in formatEvent(e)]
        self.assertTrue(logged)
        for event in logged:
            self.assertEqual(event["log_namespace"], "twisted.python.log")
            self.assertEqual(event["log_level"], LogLevel.info)
            self.assertRegex(
                formatEvent(event),
                r'^"127\.0\.0\.1" - - \[[^]]+\] "POST /api/session HTTP/1\.1" 200 \d+ "-" "[^"]+"$',
            )


class AccessLineTests(SynchronousTestCase):
    """L{access_line}: twisted.web's combined log line, made faster, the same text."""

    def line_pair(self, **fields: Any) -> tuple[str, str]:
        """Ours and twisted.web's line for a request with C{fields} (bytes, or C{client})."""
        request = Request(DummyChannel())
        request.client = fields.pop("client", IPv4Address("TCP", "127.1.2.3", 5555))
        request.method = fields.pop("method", b"POST")
        request.uri = fields.pop("uri", b"/api/pair/key")
        request.clientproto = fields.pop("clientproto", b"HTTP/1.1")
        request.code, request.sentLength = fields.pop("code", 200), fields.pop("length", 11)
        for name, value in fields.items():
            request.requestHeaders.setRawHeaders(name.replace("_", "-"), [value])
        stamp = "[05/Dec/2026:20:58:43 +0000]"
        return access_line(stamp, request), combinedLogFormatter(stamp, request)

    def test_same_text(self) -> None:
        """
        Plain requests, and requests whose fields need escaping (quotes,
        backslashes, control and non-ASCII bytes) or have none, give
        twisted.web's line exactly.
        """
        cases: list[dict[str, Any]] = [
            {},
            {"referer": b"https://relay.example/", "user_agent": b"Mozilla/5.0 (X11; it's)"},
            {"user_agent": b'say "hi"'},
            {"referer": b"back\\slash"},
            {"uri": b"/caf\xc3\xa9?q=\x00\x7f"},
            {"uri": b"/tab\there", "method": b"GET"},
            {"user_agent": b"both ' and \""},
            {"code": 404, "length": 0},
            {"client": IPv6Address("TCP", "::1", 5555)},
            {"client": UNIXAddress(b"/run/relay.sock")},
            {"clientproto": b"HTTP/1.0", "method": b"DELETE", "uri": b""},
        ]
        for fields in cases:
            ours, theirs = self.line_pair(**fields)
            self.assertEqual(ours, theirs, fields)
