"""
Plain HTTP to the relay's TLS port: a redirect to the https URL (or, for a
request that is not GET or HEAD, one line saying to use it), over a real
socket; TLS on the same port unchanged; half a plain request still dropped
by the TLS handshake timeout.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from coder1_relay.context import Limits
from coder1_relay.plain_http import answer

from .loopback import Browser, reactor, settle, start_relay, stop_all


class AnswerTests(SynchronousTestCase):
    """What a plain request is answered, by its request line alone."""

    def test_get_is_redirected_to_the_same_path(self) -> None:
        """GET: 301 to the path at the https URL, the URL in the one-line body, then closed."""
        said = answer(b"GET /a/b?c=1 HTTP/1.1\r\nHost: x\r\n\r\n", "https://relay.example.com")
        head, _, body = said.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"HTTP/1.1 301 Moved Permanently")
        self.assertIn(b"Location: https://relay.example.com/a/b?c=1", lines)
        self.assertIn(b"Connection: close", lines)
        self.assertIn(b"Content-Length: %d" % len(body), lines)
        self.assertEqual(body, b"This port speaks HTTPS only: https://relay.example.com/a/b?c=1\n")

    def test_head_has_no_body(self) -> None:
        """HEAD: the same headers, no body."""
        said = answer(b"HEAD / HTTP/1.0\r\n\r\n", "https://localhost:8443/")
        self.assertTrue(said.endswith(b"\r\n\r\n"))
        self.assertIn(b"Location: https://localhost:8443/\r\n", said)

    def test_other_methods_are_told(self) -> None:
        """POST (and the like): 400 with one line that says which URL to use; no Location."""
        said = answer(b"POST /api/pair HTTP/1.1\r\n\r\n", "https://localhost:8443")
        self.assertTrue(said.startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertNotIn(b"Location", said)
        self.assertTrue(
            said.endswith(b"\r\n\r\nThis port speaks HTTPS only: use https://localhost:8443/\n")
        )

    def test_odd_targets_go_to_the_root(self) -> None:
        """
        A target that is not a path, has a control character or non-ASCII byte (no
        header can be injected), or is too long, is sent to the root.
        """
        for target in (
            b"http://evil/",
            b"/a\rSet-Cookie:x",
            b"/\xc3\xa9",
            b"*",
            b"/" + b"a" * 3000,
        ):
            said = answer(b"GET " + target + b" HTTP/1.1\r\n\r\n", "https://r.example")
            self.assertIn(b"\r\nLocation: https://r.example/\r\n", said, target)


class _Plain(Protocol):
    """A client that sends C{chunks} one by one and keeps what comes back until closed."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        for chunk in self.chunks:
            self.transport.write(chunk)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed.callback(self.received)


class PlainHTTPOnTheTLSPortTests(TestCase):
    """A real relay on loopback, reached with plain HTTP over a real socket."""

    timeout = 30

    async def relay_port(self, **settings: object) -> int:
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        relay = await start_relay(FilePath(self.mktemp()), **settings)
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(relay)))
        self.relay = relay
        port: int = relay.port.getHost().port  # type: ignore[union-attr]
        return port

    async def plain(self, port: int, *chunks: bytes) -> bytes:
        client = _Plain(*chunks)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        return await client.closed

    async def test_plain_get_is_redirected(self) -> None:
        """
        C{GET /x?y} in plain HTTP, even in pieces, gets a 301 to the relay's https URL
        with the same path, and the connection closed; TLS on the same port still works.
        """
        port = await self.relay_port()
        said = await self.plain(port, b"GE", b"T /x?y HTTP/1.1\r\nHost: loc", b"alhost\r\n\r\n")
        self.assertTrue(said.startswith(b"HTTP/1.1 301 Moved Permanently\r\n"), said)
        self.assertIn(f"\r\nLocation: https://localhost:{port}/x?y\r\n".encode(), said)
        await Browser(self.relay).open_page()

    async def test_plain_post_is_told_to_use_https(self) -> None:
        """A plain POST gets 400 and one line naming the https URL."""
        port = await self.relay_port()
        said = await self.plain(port, b"POST /api/pair HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        self.assertTrue(said.startswith(b"HTTP/1.1 400 Bad Request\r\n"), said)
        self.assertTrue(said.endswith(f"use https://localhost:{port}/\n".encode()), said)

    async def test_half_a_plain_request_is_dropped(self) -> None:
        """
        A client that sends the start of a plain request and nothing more is
        dropped by the TLS handshake timeout, unanswered (slowloris).
        """
        port = await self.relay_port(limits=Limits(tls_handshake_timeout=0.5))
        self.assertEqual(await self.plain(port, b"GET / HT"), b"")
