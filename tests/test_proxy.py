"""
Tests for L{coder1_bridge.proxy}: which proxy HTTPS_PROXY and NO_PROXY
choose, and the bridge (pairing, status, its WebSocket) through a real HTTP
CONNECT proxy on loopback, written here with Twisted.
"""

from __future__ import annotations

import base64
import io

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from coder1_bridge import cli
from coder1_bridge.config import BridgeConfig
from coder1_bridge.proxy import ProxySetting, bypassed, proxy_for

from .loopback import RelayAndPage, reactor, start_bridge, stop_all


class ProxyForTests(SynchronousTestCase):
    """HTTPS_PROXY, ALL_PROXY and NO_PROXY, as curl and the other CLIs read them."""

    def test_no_proxy_set(self) -> None:
        """Without a proxy setting the relay is reached directly."""
        self.assertIsNone(proxy_for("relay.example.com", 443, {}))
        self.assertIsNone(proxy_for("relay.example.com", 443, {"HTTPS_PROXY": " "}))

    def test_which_setting(self) -> None:
        """https_proxy before HTTPS_PROXY before all_proxy; a URL without a scheme is http."""
        environ = {
            "HTTPS_PROXY": "http://upper:1",
            "https_proxy": "lower:3128",
            "ALL_PROXY": "http://all:2",
        }
        self.assertEqual(
            proxy_for("relay.example.com", 443, environ),
            ProxySetting("lower", 3128, "https_proxy"),
        )
        self.assertEqual(
            proxy_for("relay.example.com", 443, {"ALL_PROXY": "http://all"}),
            ProxySetting("all", 80, "ALL_PROXY"),
        )

    def test_credentials(self) -> None:
        """User and password in the URL become Basic proxy authorization, never shown."""
        proxy = proxy_for("r", 443, {"HTTPS_PROXY": "http://me:p%40ss@proxy:8080"})
        assert proxy is not None
        self.assertEqual(proxy.authorization, b"Basic " + base64.b64encode(b"me:p@ss"))
        self.assertEqual(proxy.url, "http://proxy:8080")
        self.assertNotIn("p@ss", repr(proxy))

    def test_not_http(self) -> None:
        """Only http:// proxies tunnel with CONNECT; anything else is refused by name."""
        for value in ("socks5://proxy:1080", "https://proxy:3128"):
            error = self.assertRaises(ValueError, proxy_for, "r", 443, {"HTTPS_PROXY": value})
            self.assertIn("HTTPS_PROXY must be an http:// proxy URL", str(error))

    def test_no_proxy_forms(self) -> None:
        """
        NO_PROXY: C{*}; names, with or without a leading dot or C{*.}, covering their
        subdomains; addresses and CIDR ranges; each with an optional port.
        """
        cases = [
            ("*", "relay.example.com", 443, True),
            ("example.com", "relay.example.com", 443, True),
            (".example.com", "relay.example.com", 443, True),
            ("*.example.com", "relay.example.com", 443, True),
            ("relay.example.com", "relay.example.com", 443, True),
            ("ample.com", "relay.example.com", 443, False),
            ("other.com, example.com", "relay.example.com", 443, True),
            ("example.com:443", "relay.example.com", 443, True),
            ("example.com:8443", "relay.example.com", 443, False),
            ("10.0.0.0/8", "10.1.2.3", 443, True),
            ("10.0.0.0/8", "11.1.2.3", 443, False),
            ("127.0.0.1", "127.0.0.1", 8443, True),
            ("::1", "::1", 443, True),
            ("", "relay.example.com", 443, False),
        ]
        for no_proxy, host, port, expected in cases:
            self.assertEqual(bypassed(host, port, no_proxy), expected, (no_proxy, host, port))
        environ = {"HTTPS_PROXY": "http://proxy:3128", "no_proxy": "example.com"}
        self.assertIsNone(proxy_for("relay.example.com", 443, environ))


@attrs.define
class ConnectProxy:
    """
    A tiny HTTP CONNECT proxy: what it was asked for (each request's head), and, if
    C{password} is set, Basic authorization required; C{refuse} answers every CONNECT
    with 403.
    """

    requests: list[bytes] = attrs.field(factory=list)
    password: str | None = None
    refuse: bool = False
    port: IListeningPort | None = None
    #: The connections open, on both sides.
    live: set[Protocol] = attrs.field(factory=set)

    async def listen(self) -> str:
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        self.port = port = await endpoint.listen(
            Factory.forProtocol(lambda: _ProxyConnection(self))
        )
        return f"http://127.0.0.1:{port.getHost().port}"

    async def close(self) -> None:
        """Stop listening, and wait until every connection through it has closed."""
        port, self.port = self.port, None
        if port is not None:
            await maybeDeferred(port.stopListening)
        while self.live:
            await deferLater(reactor, 0.01)
        await deferLater(reactor, 0)  # for the relay to see the last one go


class _ProxyConnection(Protocol):
    def __init__(self, proxy: ConnectProxy) -> None:
        self.proxy = proxy
        self.head = b""
        self.upstream: Protocol | None = None
        self.early = b""

    def connectionMade(self) -> None:
        self.proxy.live.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.transport.write(data)  # type: ignore[union-attr]
            return
        if self.head.endswith(b"\r\n\r\n"):
            self.early += data  # sent before the tunnel was up
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        self.head, _, self.early = self.head.partition(b"\r\n\r\n")
        self.head += b"\r\n\r\n"
        self.proxy.requests.append(self.head)
        method, target, _ = self.head.split(b"\r\n")[0].split(b" ")
        wanted = b"Basic " + base64.b64encode(f"me:{self.proxy.password}".encode())
        if self.proxy.password is not None and wanted not in self.head:
            self.answer(b"407 Proxy Authentication Required")
        elif self.proxy.refuse or method != b"CONNECT":
            self.answer(b"403 Forbidden")
        else:
            host, _, port = target.decode().rpartition(":")
            self.transport.pauseProducing()  # type: ignore[union-attr]
            d = HostnameEndpoint(reactor, host, int(port)).connect(
                Factory.forProtocol(lambda: _Upstream(self))
            )
            d.addErrback(lambda _: self.answer(b"502 Bad Gateway"))

    def answer(self, status: bytes) -> None:
        self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def opened(self, upstream: Protocol) -> None:
        self.upstream = upstream
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")  # type: ignore[union-attr]
        if self.early:
            upstream.transport.write(self.early)  # type: ignore[union-attr]
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.proxy.live.discard(self)
        if self.upstream is not None:
            self.upstream.transport.loseConnection()  # type: ignore[union-attr]


class _Upstream(Protocol):
    def __init__(self, client: _ProxyConnection) -> None:
        self.client = client

    def connectionMade(self) -> None:
        self.client.proxy.live.add(self)
        self.client.opened(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.client.proxy.live.discard(self)
        self.client.transport.loseConnection()  # type: ignore[union-attr]


class ThroughProxyTests(RelayAndPage):
    """The bridge behind an HTTP proxy, against a real relay, over real TLS inside the tunnel."""

    async def start(self) -> None:
        await super().start()
        self.proxy = ConnectProxy()
        self.proxy_url = await self.proxy.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.proxy.close()))
        self.target = f"localhost:{self.relay.port.getHost().port}".encode()  # type: ignore[union-attr]

    async def cli(self, environ: dict[str, str], *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        code = await cli.run(
            ["--config-dir", self.config_dir.path, *argv],
            reactor=reactor,
            out=out,
            environ=environ,
        )
        return code, out.getvalue()

    async def pair(self, environ: dict[str, str]) -> tuple[int, str]:
        code = await self.browser.new_code()
        relay = ["--relay", self.relay.context.public_url, "--ca-cert", self.ca.path]
        return await self.cli(environ, "pair", *relay, code)

    async def test_pair_status_and_bridge_through_the_proxy(self) -> None:
        """
        With HTTPS_PROXY set, C{pair}, C{status} and the bridge's WebSocket all go through
        the proxy's CONNECT tunnel to the relay (the proxy sees only its name and port), and
        work as they do directly.
        """
        environ = {"HTTPS_PROXY": self.proxy_url}
        status, out = await self.pair(environ)
        self.assertEqual(status, 0, out)
        status, out = await self.cli(environ, "status")
        self.assertEqual(status, 0, out)
        self.assertIn("accepts this bridge's token", out)
        config = BridgeConfig.load(self.config_dir)
        assert config is not None
        bridge = await start_bridge(config, environ=environ)
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(bridge)))
        # Pairing (redeeming the code and presenting the key on one kept-alive
        # connection), status, the WebSocket.
        self.assertEqual(len(self.proxy.requests), 3)
        for request in self.proxy.requests:
            self.assertTrue(request.startswith(b"CONNECT " + self.target + b" HTTP/1.1\r\n"))
            self.assertIn(b"\r\nHost: " + self.target + b"\r\n", request)

    async def test_credentials_are_sent(self) -> None:
        """A proxy that wants a password gets it, from the URL in HTTPS_PROXY."""
        self.proxy.password = "s3cret"
        status, out = await self.pair({"HTTPS_PROXY": f"http://me:s3cret@{self.proxy_url[7:]}"})
        self.assertEqual(status, 0, out)
        basic = b"Proxy-Authorization: Basic " + base64.b64encode(b"me:s3cret") + b"\r\n"
        # Pairing's two requests share one tunnel.
        self.assertEqual([basic in r for r in self.proxy.requests], [True])

    async def test_no_proxy_goes_direct(self) -> None:
        """A relay NO_PROXY names is reached directly: the proxy sees nothing."""
        status, out = await self.pair({"HTTPS_PROXY": self.proxy_url, "NO_PROXY": "localhost"})
        self.assertEqual(status, 0, out)
        self.assertEqual(self.proxy.requests, [])

    async def test_proxy_refusals_are_explained(self) -> None:
        """
        A proxy that refuses the tunnel, one that wants a password it is not given, and one
        that is not there are each said in a sentence naming the proxy and what to check.
        """
        self.proxy.refuse = True
        status, out = await self.pair({"HTTPS_PROXY": self.proxy_url})
        self.assertEqual(status, 1)
        self.assertIn(
            f"The proxy {self.proxy_url} refused to open a tunnel to {self.target.decode()} "
            "(HTTP 403 Forbidden). Check HTTPS_PROXY, or list localhost in NO_PROXY",
            out,
        )
        self.proxy.refuse, self.proxy.password = False, "s3cret"
        status, out = await self.pair({"HTTPS_PROXY": self.proxy_url})
        self.assertIn("(HTTP 407 Proxy Authentication Required)", out)
        await self.proxy.close()
        status, out = await self.pair({"HTTPS_PROXY": self.proxy_url})
        self.assertEqual(status, 1)
        self.assertIn(
            f"The proxy {self.proxy_url} (HTTPS_PROXY) cannot be reached: Nothing accepts "
            f"connections at {self.proxy_url[7:]}: is the proxy running",
            out,
        )
