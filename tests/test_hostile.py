"""
Hostile input, slow clients and floods against the relay, and its limits
(C{coder1_relay.context.Limits}).

The sans-IO parts (token bucket, per-address counts) run on a C{Clock}.  The
rest runs a real relay on loopback, over real TLS 1.3, with a *bystander*
alongside every attack: a really paired bridge and an IDE connection with an
end-to-end channel, running commands in a loop from 127.0.0.1 the whole time.
Each attack comes from an address of its own in 127.0.0.0/8, so per-address
limits hit the attacker and never the bystander, and it must end in a defined
way (a close code and reason, an HTTP status, or a refused connection) within
a bounded time, with no traceback logged by the relay.

Hypothesis drives the fuzzing from a worker thread, one real connection per
example (C{blockingCallFromThread}), while the reactor keeps serving both the
attacker and the bystander.
"""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import time
import warnings
from collections.abc import Callable, Coroutine
from contextlib import closing
from typing import Any, TypeVar

import attrs
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisDeprecationWarning
from OpenSSL import SSL
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.logger import formatEvent
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, FileBodyProducer, PartialDownloadError, readBody
from twisted.web.http_headers import Headers
from zope.interface import implementer

from coder1_relay.context import (
    FD_RESERVE,
    SESSION_COOKIE,
    Limits,
    PerAddress,
    TokenBucket,
    connection_room,
)
from coder1_relay.routing import HubSettings
from coder1_relay.service import RelayService
from coder1_relay.tap import Options
from coder1_relay.telemetry import TelemetrySettings
from coder1_wire import closecodes
from coder1_wire.crash import MAX_FRAMES
from coder1_wire.e2e import Identity, b64u
from coder1_wire.envelope import (
    HEADER,
    WIRE_VERSION,
    Envelope,
    EnvelopeError,
    Kind,
    control,
    decode,
    is_end_to_end,
    is_to_browser,
)
from coder1_wire.tls import client_tls_options

from .logs import capture_logs
from .loopback import (
    Browser,
    ConnectionRefusedByRelay,
    IDEConnection,
    RelayTrust,
    pair_bridge,
    reactor,
    settle,
    start_bridge,
    start_relay,
    stop_all,
)

T = TypeVar("T")

#: What the relay may answer hostile WebSocket input with (docs/protocol.md, section 8).
DEFINED_CLOSES = frozenset(
    {
        1002,  # Autobahn: a WebSocket protocol violation
        1007,  # Autobahn: a text message that is not UTF-8
        1009,  # Autobahn: a frame or message over Limits.max_message_size
        closecodes.PROTOCOL_ERROR,
        closecodes.RATE_LIMITED,
    }
)
KEY = b64u(Identity.generate().public_raw)


# --- a plain TCP client from any loopback address ---------------------------------------------


def _tcp(relay: RelayService, source: str) -> TCP4ClientEndpoint:
    port: Any = relay.port
    return TCP4ClientEndpoint(
        reactor, "127.0.0.1", port.getHost().port, timeout=5, bindAddress=(source, 0)
    )


class Raw(Protocol):
    """A TCP connection that sends what it is told and keeps what arrives."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.connected_at = 0.0
        self.lost_at: float | None = None
        self.lost: Deferred[float] = Deferred()
        self._more: Deferred[None] | None = None

    def connectionMade(self) -> None:
        self.connected_at = time.monotonic()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._wake()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost_at = time.monotonic()
        self.lost.callback(self.lost_at - self.connected_at)
        self._wake()

    def _wake(self) -> None:
        more, self._more = self._more, None
        if more is not None:
            more.callback(None)

    async def take(self, timeout: float = 5.0) -> bytes:
        """What arrived since last time, waiting for something if nothing has (b"" once lost)."""
        if not self.received and self.lost_at is None:
            self._more = Deferred()
            await self._more.addTimeout(timeout, reactor)
        data, self.received = bytes(self.received), bytearray()
        return data

    async def lifetime(self, timeout: float = 10.0) -> float:
        """Seconds from connect until the relay closed the connection."""
        if self.lost_at is not None:
            return self.lost_at - self.connected_at
        return await self.lost.addTimeout(timeout, reactor)


async def raw_connect(relay: RelayService, source: str) -> Raw:
    raw = Raw()
    await _tcp(relay, source).connect(Factory.forProtocol(lambda: raw))
    return raw


class HandTLS:
    """TLS 1.3 by hand (memory BIOs), so a test can cut, stall or spoil any record."""

    def __init__(self) -> None:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        self.tls = SSL.Connection(context, None)
        self.tls.set_tlsext_host_name(b"localhost")
        self.tls.set_connect_state()

    def _out(self) -> bytes:
        out = b""
        while True:
            try:
                out += self.tls.bio_read(65536)
            except SSL.WantReadError:
                return out

    def step(self, incoming: bytes = b"") -> tuple[bytes, bool]:
        """Feed what the server sent; (what to send back, whether the handshake is done)."""
        if incoming:
            self.tls.bio_write(incoming)
        try:
            self.tls.do_handshake()
        except SSL.WantReadError:
            return self._out(), False
        return self._out(), True

    def seal(self, data: bytes) -> bytes:
        self.tls.sendall(data)
        return self._out()

    def open(self, incoming: bytes) -> bytes:
        if incoming:
            self.tls.bio_write(incoming)
        plain = b""
        while True:
            try:
                plain += self.tls.recv(65536)
            except (SSL.WantReadError, SSL.ZeroReturnError):
                return plain

    async def handshake(self, raw: Raw) -> None:
        out, done = self.step()
        assert raw.transport is not None
        raw.transport.write(out)
        while not done:
            data = await raw.take()
            assert data, "the relay closed during the TLS handshake"
            out, done = self.step(data)
            if out:
                raw.transport.write(out)


# --- a WebSocket client that sends any frame at all -------------------------------------------


def ws_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = b"\x5a\xa5\x3c\xc3",
    length: str = "minimal",
) -> bytes:
    """One WebSocket frame, as a client would send it (or would not: nothing is checked)."""
    n = len(payload)
    if length == "minimal":
        length = "7" if n < 126 else "16" if n < 65536 else "64"
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)
    masked = 0x80 if mask is not None else 0
    if length == "7":
        head = bytes([first, masked | (n & 0x7F)])
    elif length == "16":
        head = bytes([first, masked | 126]) + (n & 0xFFFF).to_bytes(2, "big")
    else:
        head = bytes([first, masked | 127]) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    keystream = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(n, "big")
    return head + mask + body


def read_frames(data: bytes) -> list[tuple[int, bool, bytes, bytes | None]]:
    """The frames in C{data}: (opcode, fin, payload unmasked, mask or None) each."""
    frames = []
    while data:
        length, start = data[1] & 0x7F, 2
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, start = int.from_bytes(data[2:10], "big"), 10
        mask = None
        if data[1] & 0x80:
            mask, start = data[start : start + 4], start + 4
        body = data[start : start + length]
        if mask is not None:
            keystream = (mask * (length // 4 + 1))[:length]
            body = bytes(a ^ b for a, b in zip(body, keystream, strict=True))
        frames.append((data[0] & 0x0F, bool(data[0] & 0x80), body, mask))
        data = data[start + length :]
    return frames


def frame_mixes(
    frame: Callable[..., bytes],
    message: Callable[..., bytes],
    wrong_mask: bytes | None,
    *more: bytes,
) -> st.SearchStrategy[bytes]:
    """
    Frames one side might send, right and wrong, for the C{SameAsAutobahnTests}
    (messages up to 512 B): C{frame(opcode, payload, **options)} makes a frame
    as that side does, C{message(seq, size)} a message; C{wrong_mask} is the
    mask that side must not use; C{more} are frames of its own.
    """
    return st.one_of(
        st.builds(
            lambda seq, size: frame(0x2, message(seq, size)),
            st.integers(0, 9),
            st.integers(20, 300),
        ),
        st.builds(lambda size: frame(0x2, message(0, size)), st.sampled_from([512, 513, 700])),
        st.builds(
            lambda seq, size, cut: (
                frame(0x2, message(seq, size)[:cut], fin=False)
                + frame(0x0, message(seq, size)[cut:])
            ),
            st.integers(0, 9),
            st.integers(30, 200),
            st.integers(1, 29),
        ),
        st.just(frame(0x9, b"ping")),
        st.just(frame(0xA, b"pong")),
        st.just(frame(0x1, b"{}")),
        st.just(frame(0x2, message(0), mask=wrong_mask)),
        st.just(frame(0x2, message(0), rsv=4)),
        st.just(frame(0x2, message(0), length="16")),
        st.just(frame(0x2, message(0, 200), length="64")),
        st.just(frame(0x0, message(0))),
        *(st.just(each) for each in more),
    )


def ping_frame(tag: bytes) -> bytes:
    """A WebSocket-level ping: the relay answers it with a pong while the connection is open."""
    return ws_frame(0x9, tag)


class WireClient(Protocol):
    """
    A WebSocket client over TLS that writes raw frames and reads the relay's:
    the opening handshake's status, envelopes, pongs, and the close frame.
    """

    def __init__(self, path: str, headers: dict[str, str]) -> None:
        self.path, self.headers = path, headers
        self.buffer = b""
        self.status: int | None = None
        self.status_line = ""
        self.envelopes: list[Envelope] = []
        self.pongs: list[bytes] = []
        self.close: tuple[int, str] | None = None
        self.opened: Deferred[int] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self._events: Deferred[None] | None = None

    def connectionMade(self) -> None:
        lines = [
            f"GET {self.path} HTTP/1.1",
            "Host: localhost",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in self.headers.items()),
        ]
        assert self.transport is not None
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.status is None:
            head, found, rest = self.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            self.buffer = rest
            self.status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            self.status = int(self.status_line.split(" ", 2)[1])
            self.opened.callback(self.status)
        while self._frame():
            pass
        self._wake()

    def _frame(self) -> bool:
        data = self.buffer
        if len(data) < 2:
            return False
        opcode, n, at = data[0] & 0xF, data[1] & 0x7F, 2
        if n == 126:
            if len(data) < 4:
                return False
            n, at = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            if len(data) < 10:
                return False
            n, at = int.from_bytes(data[2:10], "big"), 10
        if len(data) < at + n:
            return False
        payload, self.buffer = data[at : at + n], data[at + n :]
        if opcode == 0x2:
            self.envelopes.append(decode(payload))
        elif opcode == 0xA:
            self.pongs.append(payload)
        elif opcode == 0x8 and self.close is None:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.close = (code, payload[2:].decode("utf-8", "replace"))
            # The relay waits for our close frame; an attacker does not bother.
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]
        return True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.opened.called:
            self.opened.errback(reason)
        self.lost.callback(None)
        self._wake()

    def _wake(self) -> None:
        events, self._events = self._events, None
        if events is not None:
            events.callback(None)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def kinds(self) -> list[int]:
        return [e.kind for e in self.envelopes]

    async def until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until C{done()} is true or the connection is gone; fail after C{timeout}."""
        deadline = time.monotonic() + timeout
        while not done() and not self.lost.called:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("the relay neither answered nor closed in time")
            self._events = Deferred()
            await self._events.addTimeout(left, reactor)

    async def outcome(self, tag: bytes, timeout: float = 10.0) -> int | str:
        """
        After the frames under test, a ping tagged C{tag}: the close code the
        relay answered with, C{"alive"} if it answered the ping (it read all
        of the frames and is waiting for more), or C{"dropped"}.
        """
        if not self.lost.called:
            self.send(ping_frame(tag))
        await self.until(lambda: self.close is not None or tag in self.pongs, timeout)
        if self.close is not None:
            return self.close[0]
        return "alive" if tag in self.pongs else "dropped"

    def hang_up(self) -> Deferred[None]:
        if not self.lost.called and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        return self.lost


async def wire_connect(
    relay: RelayService, source: str, path: str, headers: dict[str, str]
) -> WireClient:
    """A L{WireClient} from C{source}, after a successful opening handshake."""
    client = WireClient(path, headers)
    endpoint = wrapClientTLS(
        client_tls_options("localhost", relay.keys.tls_cert_pem), _tcp(relay, source)
    )
    await endpoint.connect(Factory.forProtocol(lambda: client))
    status = await client.opened.addTimeout(10, reactor)
    assert status == 101, client.status_line
    await client.until(lambda: Kind.WELCOME in client.kinds())
    return client


# --- the bystander ----------------------------------------------------------------------------


@attrs.define
class Bystander:
    """A legitimate session that keeps running commands, one after the other, and checks them."""

    ide: IDEConnection
    runs: int = 0
    failures: list[str] = attrs.field(factory=list)
    _stopping: bool = False
    _done: Deferred[None] | None = None

    def start(self) -> None:
        self._done = Deferred.fromCoroutine(self._loop())

    async def _loop(self) -> None:
        stream = 1000
        while not self._stopping:
            stream += 1
            marker = f"bystander-{stream}"
            try:
                run = Deferred.fromCoroutine(self.ide.run(stream, {"argv": ["echo", marker]}))
                result = await run.addTimeout(15, reactor)
            except Exception as e:
                self.failures.append(f"command {stream}: {e!r}")
                return
            if result.stdout != f"{marker}\n".encode() or result.exit["exit_code"] != 0:
                self.failures.append(f"command {stream}: {result.stdout!r} {result.exit}")
                return
            self.runs += 1

    async def stop(self) -> tuple[int, list[str]]:
        self._stopping = True
        assert self._done is not None
        await self._done
        return self.runs, self.failures


# --- the test cases ---------------------------------------------------------------------------


class RelayUnderAttack(TestCase):
    """A real relay, a bystander session running commands, and helpers to attack the relay."""

    timeout = 90

    async def start(
        self,
        limits: Limits | None = None,
        hub: HubSettings | None = None,
        telemetry: TelemetrySettings | None = None,
    ) -> None:
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        settings: dict[str, Any] = {}
        if telemetry is not None:
            settings["telemetry"] = telemetry
        if limits is not None:
            settings["limits"] = limits
        if hub is not None:
            settings["hub"] = hub
        self.relay = await start_relay(FilePath(self.mktemp()), **settings)
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(self.relay)))
        self.limits = self.relay.context.limits
        self.browser = Browser(self.relay)
        await self.browser.open_page()
        config = await pair_bridge(self.browser, FilePath(self.mktemp()), io.StringIO())
        bridge = await start_bridge(config, label="bystander")
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(bridge)))
        ide = await self.browser.connect_ide()
        self.addCleanup(ide.close)
        await ide.wait_for(lambda e: e.kind == Kind.PRESENCE and bool(e.json()["bridges"]))
        self.bystander = Bystander(ide)
        self.bystander.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.bystander.stop()))

    async def bystander_kept_working(self, at_least: int = 1) -> None:
        """
        The bystander ran at least C{at_least} commands during the attack, all
        fine, still runs them, and the relay logged no traceback.
        """
        runs, failures = await self.bystander.stop()
        self.assertEqual(failures, [])
        self.assertGreaterEqual(runs, at_least)
        result = await self.bystander.ide.run(1, {"argv": ["echo", "after"]})
        self.assertEqual(result.stdout, b"after\n")
        self.assertEqual(self.flushLoggedErrors(), [])

    def throttled(self, reason: str) -> int:
        """How often the relay's telemetry counted a C{throttled} of C{reason}."""
        return self.counted("throttled", reason)

    def counted(self, name: str, label: str) -> int:
        """The relay's telemetry count C{name} of C{label}, written or not."""
        snapshot: dict[str, Any] = self.relay.telemetry.snapshot()
        rows = [*snapshot["pending"]["counts"], *snapshot["counts"]]
        return sum(
            int(row["value"]) for row in rows if row["name"] == name and row["label"] == label
        )

    async def other_browser(self) -> Browser:
        """Another browser session (an attacker's own, legitimately obtained)."""
        browser = Browser(self.relay)
        await browser.open_page()
        return browser

    def cookie(self, browser: Browser) -> str:
        (value,) = [c.value for c in browser.cookies if c.name == SESSION_COOKIE]
        assert value is not None
        return value

    async def ide_wire(self, source: str, browser: Browser) -> WireClient:
        """An IDE WebSocket of C{browser}'s session from C{source}, speaking raw frames."""
        headers = {
            "Origin": self.relay.context.public_url,
            "Cookie": f"{SESSION_COOKIE}={self.cookie(browser)}",
        }
        client = await wire_connect(self.relay, source, "/ws/ide", headers)
        self.addCleanup(client.hang_up)
        return client

    async def bridge_wire(self, source: str, token: str) -> WireClient:
        """A bridge WebSocket with C{token} from C{source}, speaking raw frames."""
        headers = {"Authorization": f"Bearer {token}"}
        client = await wire_connect(self.relay, source, "/ws/bridge", headers)
        self.addCleanup(client.hang_up)
        return client

    async def attacker_bridge(self) -> tuple[Browser, str, int]:
        """A session of the attacker's with a really paired bridge: (browser, token, peer)."""
        browser = await self.other_browser()
        config = await pair_bridge(browser, FilePath(self.mktemp()), io.StringIO(), "attacker")
        return browser, config.token, config.peer

    def in_thread(self, test: Callable[[], None]) -> Deferred[None]:
        """Run C{test} (Hypothesis) in a thread, while the reactor serves relay and bystander."""

        def run() -> None:
            with warnings.catch_warnings():
                # Autobahn's clients (the bystander's) draw their masks from the
                # global random in the reactor thread while Hypothesis generates
                # here; Hypothesis takes that for a strategy using random.
                warnings.filterwarnings(
                    "ignore", "Do not use the `random` module", HypothesisDeprecationWarning
                )
                test()

        return deferToThread(run)

    def blocking(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """From the Hypothesis thread: run the coroutine C{make()} in the reactor, wait for it."""
        result: T = blockingCallFromThread(
            reactor,
            lambda: Deferred.fromCoroutine(make()),  # type: ignore[arg-type]
        )
        return result


# --- the sans-IO limits, on a Clock -----------------------------------------------------------


class TokenBucketTests(SynchronousTestCase):
    """L{TokenBucket}: C{rate} tokens a second, at most C{burst}, time from the clock only."""

    def test_burst_then_rate(self) -> None:
        """A new bucket allows C{burst} at once; after that, C{rate} a second."""
        clock = Clock()
        bucket = TokenBucket(clock, rate=10.0, burst=5)
        self.assertEqual([bucket.allow() for _ in range(6)], [True] * 5 + [False])
        clock.advance(0.1)
        self.assertEqual([bucket.allow(), bucket.allow()], [True, False])
        clock.advance(0.35)
        self.assertEqual(sum(bucket.allow() for _ in range(10)), 3)

    def test_never_more_than_burst(self) -> None:
        """However long the bucket sits unused, it holds C{burst} tokens, no more."""
        clock = Clock()
        bucket = TokenBucket(clock, rate=100.0, burst=4)
        clock.advance(3600)
        self.assertEqual(sum(bucket.allow() for _ in range(100)), 4)
        self.assertFalse(bucket.full)
        clock.advance(1)
        self.assertTrue(bucket.full)

    def test_borrow_goes_into_debt(self) -> None:
        """
        C{borrow} always takes a token; in debt it says how long until the
        debt is paid and C{headroom} tokens are back (at most C{burst}).
        """
        clock = Clock()
        bucket = TokenBucket(clock, rate=100.0, burst=2)
        self.assertEqual([bucket.borrow(), bucket.borrow()], [0.0, 0.0])
        self.assertAlmostEqual(bucket.borrow(), 0.01)
        self.assertAlmostEqual(bucket.borrow(headroom=1), 0.03)
        self.assertAlmostEqual(bucket.borrow(headroom=50), 0.05)  # headroom capped at burst
        clock.advance(0.05)
        self.assertEqual(bucket.borrow(), 0.0)

    def test_take_and_owe_count_time_at_refill_only(self) -> None:
        """
        C{take} and C{owe} are C{allow} and C{borrow} on the tokens counted at
        the last C{refill} (the frames of one read): time passed since then
        gives no tokens until the next C{refill}.
        """
        clock = Clock()
        bucket = TokenBucket(clock, rate=10.0, burst=2)
        self.assertEqual([bucket.take(), bucket.take(), bucket.take()], [True, True, False])
        clock.advance(0.1)
        self.assertFalse(bucket.take())
        bucket.refill()
        self.assertEqual([bucket.take(), bucket.take()], [True, False])
        self.assertAlmostEqual(bucket.owe(), 0.1)
        self.assertAlmostEqual(bucket.owe(headroom=1), 0.3)
        clock.advance(0.4)
        self.assertAlmostEqual(bucket.owe(), 0.3)
        bucket.refill()  # the 0.4 s since the last: 4 tokens, and one goes
        self.assertEqual(bucket.owe(), 0.0)

    def test_clock_going_backwards(self) -> None:
        """A clock that steps back gives no tokens and takes none away."""
        clock = Clock()
        clock.advance(100)
        bucket = TokenBucket(clock, rate=1.0, burst=1)
        self.assertTrue(bucket.allow())
        clock.advance(-50)
        self.assertFalse(bucket.allow())
        clock.advance(1)
        self.assertTrue(bucket.allow())

    def test_defaults_leave_people_alone(self) -> None:
        """
        The default IDE rate never stops a person: 20 keystrokes a second for
        a minute, window resizes at 60 a second for 2 s, a reconnect that
        re-lists and resizes 32 terminals at once, heartbeats and pongs.
        The default bridge rate takes 10 MiB of output (1,280 frames of
        8 KiB, as the bridge reads a pipe) at once without slowing it.
        """
        clock = Clock()
        limits = Limits()
        ide = TokenBucket(clock, limits.messages_per_second, limits.message_burst)
        refused = 0
        for tick in range(60 * 60):  # a minute in 1/60 s steps
            sent = 1 if tick % 3 == 0 else 0  # 20 keys a second
            sent += 1 if 600 <= tick < 720 else 0  # resizes, 60 a second
            sent += 2 if tick % 900 == 0 else 0  # a ping and a pong every 15 s
            sent += 64 if tick == 1800 else 0  # reconnect: PTY_LIST + PTY_RESIZE for 32
            refused += sum(not ide.allow() for _ in range(sent))
            clock.advance(1 / 60)
        self.assertEqual(refused, 0)
        bridge = TokenBucket(clock, limits.bridge_messages_per_second, limits.bridge_message_burst)
        self.assertEqual(max(bridge.borrow() for _ in range(1280)), 0.0)


class PerAddressTests(SynchronousTestCase):
    """L{PerAddress}: open connections and new ones a second, per client address."""

    def test_open_connections_per_address(self) -> None:
        """
        Past C{connections_per_ip} open ones a new connection from that address
        is refused; other addresses are not affected; a closed one frees a place.
        """
        limits = Limits(connections_per_ip=3, new_connections_per_second=0)
        addresses = PerAddress(limits, Clock())
        self.assertEqual([addresses.admit("10.0.0.1") for _ in range(4)], [True] * 3 + [False])
        self.assertTrue(addresses.admit("10.0.0.2"))
        addresses.release("10.0.0.1")
        self.assertEqual(addresses.open("10.0.0.1"), 2)
        self.assertEqual([addresses.admit("10.0.0.1"), addresses.admit("10.0.0.1")], [True, False])

    def test_new_connections_per_second(self) -> None:
        """New connections from one address get C{new_connection_burst}, then the rate."""
        clock = Clock()
        limits = Limits(connections_per_ip=0, new_connections_per_second=2, new_connection_burst=3)
        addresses = PerAddress(limits, clock)
        self.assertEqual([addresses.admit("::1") for _ in range(4)], [True] * 3 + [False])
        self.assertTrue(addresses.admit("::2"))
        clock.advance(0.5)
        self.assertEqual([addresses.admit("::1"), addresses.admit("::1")], [True, False])

    def test_zero_means_no_limit(self) -> None:
        """C{connections_per_ip=0} and C{new_connections_per_second=0} turn both limits off."""
        limits = Limits(connections_per_ip=0, new_connections_per_second=0)
        addresses = PerAddress(limits, Clock())
        self.assertTrue(all(addresses.admit("10.0.0.1") for _ in range(10_000)))

    def test_forgets_quiet_addresses(self) -> None:
        """
        The buckets of addresses with nothing open whose buckets have filled up
        again are forgotten, so many addresses cannot grow the table for good.
        """
        clock = Clock()
        addresses = PerAddress(Limits(), clock)
        for n in range(5000):
            address = f"10.0.{n // 256}.{n % 256}"
            self.assertTrue(addresses.admit(address))
            addresses.release(address)
            clock.advance(0.1)
        self.assertLessEqual(len(addresses._buckets), 1024)


class LimitsTests(SynchronousTestCase):
    """Every limit has a safe default and is a twistd option."""

    def test_defaults(self) -> None:
        """The defaults are the ones README.md ("Limits") documents."""
        self.assertEqual(
            attrs.asdict(Limits()),
            {
                "max_message_size": 1024 * 1024,
                "handshake_timeout": 10.0,
                "max_body_size": 16 * 1024,
                "tls_handshake_timeout": 10.0,
                "idle_timeout": 45.0,
                "messages_per_second": 200.0,
                "message_burst": 400,
                "bridge_messages_per_second": 5000.0,
                "bridge_message_burst": 10000,
                "connections_per_ip": 64,
                "new_connections_per_second": 20.0,
                "new_connection_burst": 200,
                "ide_connections_per_session": 16,
                "bridges_per_session": 16,
                "max_connections": 0,
            },
        )

    def test_nonsense_refused(self) -> None:
        """A limit of zero where zero means nothing, or a negative one, is refused."""
        for bad in (
            {"messages_per_second": 0},
            {"message_burst": 0},
            {"tls_handshake_timeout": -1},
            {"connections_per_ip": -1},
            {"bridges_per_session": 0},
            {"max_connections": -1},
        ):
            self.assertRaises(ValueError, Limits, **bad)

    def test_options(self) -> None:
        """
        Each limit is an option of C{twistd coder1-relay}; C{--idle-timeout}
        also sets the WebSocket heartbeat timeout; nonsense is a usage error.
        """
        options = Options()
        options.parseOptions(
            [
                "--messages-per-second=50",
                "--message-burst=60",
                "--connections-per-ip=0",
                "--bridges-per-session=4",
                "--ide-connections-per-session=2",
                "--tls-handshake-timeout=3",
                "--idle-timeout=90",
                "--max-message-size=65536",
                "--max-connections=5000",
            ]
        )
        settings = options.settings()
        self.assertEqual(
            attrs.asdict(settings.limits),
            {
                **attrs.asdict(Limits()),
                "messages_per_second": 50.0,
                "message_burst": 60,
                "connections_per_ip": 0,
                "bridges_per_session": 4,
                "ide_connections_per_session": 2,
                "tls_handshake_timeout": 3.0,
                "idle_timeout": 90.0,
                "max_message_size": 65536,
                "max_connections": 5000,
            },
        )
        self.assertEqual(settings.hub.heartbeat_timeout, 90.0)
        self.assertEqual(Options().settings().limits, Limits())
        self.assertTrue(Options().settings().access_log)
        quiet = Options()
        quiet.parseOptions(["--no-access-log"])
        self.assertFalse(quiet.settings().access_log)
        for bad in (["--message-burst=0"], ["--idle-timeout=10"], ["--new-connection-burst=-5"]):
            self.assertRaises(usage.UsageError, Options().parseOptions, bad)


class ConnectionRoomTests(SynchronousTestCase):
    """L{connection_room}: the relay-wide cap on connections, and what the relay says of it."""

    def test_from_the_open_file_limit(self) -> None:
        """
        With no C{--max-connections}, the cap is the open-file limit less
        L{FD_RESERVE}, and the message says how many paired sessions (two
        connections each) that is: a warning, when the limit could be raised.
        """
        room = connection_room(0, 1024, 524288)
        self.assertEqual((room.cap, room.warn), (1024 - FD_RESERVE, True))
        self.assertIn("room for 960 connections (RLIMIT_NOFILE 1024", room.message)
        self.assertIn("about 480 paired sessions", room.message)
        self.assertIn("raise the limit up to 524288", room.message)
        room = connection_room(0, 65536, 65536)
        self.assertEqual((room.cap, room.warn), (65536 - FD_RESERVE, False))
        self.assertIn("about 32736 paired sessions", room.message)
        self.assertEqual(connection_room(0, 10, 10).cap, 1)

    def test_given(self) -> None:
        """
        C{--max-connections} is the cap while the open-file limit has room for
        it; past that, the cap is what the limit leaves, with a warning.
        """
        room = connection_room(100, 1024, 524288)
        self.assertEqual((room.cap, room.warn), (100, False))
        self.assertIn("room for 100 connections (--max-connections): about 50", room.message)
        room = connection_room(5000, 1024, 524288)
        self.assertEqual((room.cap, room.warn), (960, True))
        self.assertIn("--max-connections 5000 is more than the open-file limit", room.message)
        self.assertIn("about 480 paired sessions", room.message)

    def test_no_open_file_limit(self) -> None:
        """Without an open-file limit only C{--max-connections} caps (0: nothing does)."""
        self.assertEqual(connection_room(0, None, None).cap, 0)
        self.assertEqual(connection_room(300, None, None).cap, 300)
        self.assertFalse(connection_room(300, None, None).warn)


# --- limits on connections, sessions and bridges ----------------------------------------------


class ConnectionLimitTests(RelayUnderAttack):
    """Connections per client address, IDE connections per session, bridges per session."""

    async def test_connections_per_ip(self) -> None:
        """
        Past C{connections_per_ip} open TCP connections from one address, the
        next is closed at once, before TLS, and counted; other addresses still
        get in, and a closed connection frees a place.
        """
        await self.start(Limits(connections_per_ip=4))
        held = [await raw_connect(self.relay, "127.0.0.2") for _ in range(4)]
        refused = await raw_connect(self.relay, "127.0.0.2")
        self.assertLess(await refused.lifetime(timeout=3), 1.0)
        self.assertEqual(await refused.take(), b"")
        self.assertEqual(self.throttled("connections"), 1)
        self.assertTrue(all(raw.lost_at is None for raw in held))
        elsewhere = await raw_connect(self.relay, "127.0.0.3")
        await HandTLS().handshake(elsewhere)
        assert held[0].transport is not None
        held[0].transport.loseConnection()
        await held[0].lost
        await deferLater(reactor, 0.1)
        again = await raw_connect(self.relay, "127.0.0.2")
        await HandTLS().handshake(again)
        for raw in [*held[1:], elsewhere, again]:
            assert raw.transport is not None
            raw.transport.loseConnection()
        await self.bystander_kept_working()

    async def test_max_connections(self) -> None:
        """
        Once the relay holds C{max_connections} TCP connections, from any
        addresses, the next is closed at once, before TLS, and counted; the
        relay logs why once (and at start, how many sessions fit), and no
        traceback; a closed connection frees a place, and the connections it
        holds (the bystander's too) carry on.
        """
        events = capture_logs(self)
        await self.start(Limits(max_connections=12))
        port: Any = self.relay.port
        guard = port.factory
        held = [
            await raw_connect(self.relay, f"127.0.0.{2 + n % 3}")
            for n in range(12 - len(guard.protocols))
        ]
        await deferLater(reactor, 0.1)
        self.assertEqual(len(guard.protocols), 12)
        refused = [await raw_connect(self.relay, f"127.0.0.{5 + n}") for n in range(3)]
        for raw in refused:
            self.assertLess(await raw.lifetime(timeout=3), 1.0)
            self.assertEqual(await raw.take(), b"")
        self.assertEqual(self.throttled("connections"), 3)
        self.assertTrue(all(raw.lost_at is None for raw in held))
        said = [formatEvent(e) for e in events if "refusing new connections" in formatEvent(e)]
        self.assertEqual(
            said, ["refusing new connections: the relay holds 12, its most (--max-connections)"]
        )
        started = "room for 12 connections (--max-connections): about 6 paired sessions"
        self.assertTrue([e for e in events if started in formatEvent(e)])
        assert held[0].transport is not None
        held[0].transport.loseConnection()
        await held[0].lost
        await deferLater(reactor, 0.1)
        again = await raw_connect(self.relay, "127.0.0.9")
        await HandTLS().handshake(again)
        for raw in [*held[1:], again]:
            assert raw.transport is not None
            raw.transport.loseConnection()
        await self.bystander_kept_working()
        self.assertFalse([e for e in events if "log_failure" in e])

    async def test_ide_connections_per_session(self) -> None:
        """
        A browser session may hold C{ide_connections_per_session} (16) IDE
        WebSockets; the next is refused in the handshake with 429 and a reason.
        Other sessions are not affected, and a closed tab frees a place.
        """
        await self.start()
        browser = await self.other_browser()
        tabs = [await browser.connect_ide(handshake=False) for _ in range(16)]
        for tab in tabs:
            self.addCleanup(tab.close)
        with self.assertRaises(ConnectionRefusedByRelay) as refused:
            await browser.connect_ide(handshake=False)
        self.assertIn(
            "[429]: too many connections for this browser session", str(refused.exception)
        )
        self.assertEqual(self.throttled("sessions"), 1)
        mine = await self.browser.connect_ide()
        self.addCleanup(mine.close)
        await tabs[0].close()
        await deferLater(reactor, 0.1)
        tab = await browser.connect_ide(handshake=False)
        self.addCleanup(tab.close)
        await self.bystander_kept_working()

    async def test_bridges_per_session(self) -> None:
        """
        With C{bridges_per_session} bridges paired, the browser is refused a
        new code (409), and a code issued earlier is refused at redemption (409,
        the bridge never gets a usable token); revoking a bridge makes room.
        """
        await self.start(Limits(bridges_per_session=2))
        browser = await self.other_browser()
        early = await browser.new_code()
        paired = [await self.redeem(browser, await browser.new_code()) for _ in range(2)]
        self.assertEqual([status for status, _ in paired], [200, 200])
        status, body, _ = await browser.request(b"POST", "/api/pairing-codes", {"browser_key": KEY})
        self.assertEqual((status, body["error"]), (409, "too-many-bridges"))
        self.assertIn("revoke one first", body["message"])
        status, body = await self.redeem(browser, early)
        self.assertEqual((status, body["error"]), (409, "too-many-bridges"))
        self.assertNotIn("token", body)
        session = self.relay.context.tokens.verify_browser_session(self.cookie(browser))
        records = await self.relay.context.store.bridges(session, reactor.seconds())
        self.assertEqual([r.peer for r in records], [paired[0][1]["peer"], paired[1][1]["peer"]])
        self.assertEqual(self.throttled("sessions"), 2)
        status, _, _ = await browser.request(b"POST", "/api/revoke", {"peer": records[0].peer})
        self.assertEqual(status, 200)
        status, body = await self.redeem(browser, await browser.new_code())
        self.assertEqual(status, 200, body)
        await self.bystander_kept_working()

    async def redeem(self, browser: Browser, code: str) -> tuple[int, dict[str, Any]]:
        body = {"code": code, "label": "spare", "bridge_key": KEY}
        status, answer, _ = await browser.request(b"POST", "/api/pair", body, origin=False)
        return status, answer


# --- slow clients -----------------------------------------------------------------------------


class Polite(Protocol):
    """A TLS client that sends one request and closes when the relay does."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.answered_at = 0.0
        self.lost: Deferred[float] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.answered_at = time.monotonic()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(time.monotonic())


class SlowClientTests(RelayUnderAttack):
    """Clients that are slow to finish TLS or a request are dropped; idle ones are closed."""

    LIMITS = Limits(tls_handshake_timeout=0.5, handshake_timeout=0.5, idle_timeout=1.0)

    async def test_silent_client_dropped(self) -> None:
        """A TCP connection that never starts TLS is dropped after C{tls_handshake_timeout}."""
        await self.start(self.LIMITS)
        raw = await raw_connect(self.relay, "127.0.0.2")
        lifetime = await raw.lifetime()
        self.assertTrue(0.4 <= lifetime <= 3.0, lifetime)
        self.assertEqual(self.throttled("timeout"), 1)
        await self.bystander_kept_working()

    async def test_stalled_tls_handshake_dropped(self) -> None:
        """
        A client that stops half-way through its ClientHello, or dribbles it a
        byte at a time, is dropped C{tls_handshake_timeout} after it connected:
        bytes arriving do not push the deadline back.
        """
        await self.start(self.LIMITS)
        hello, _ = HandTLS().step()
        stalled = await raw_connect(self.relay, "127.0.0.2")
        assert stalled.transport is not None
        stalled.transport.write(hello[: len(hello) // 2])
        dribbling = await raw_connect(self.relay, "127.0.0.3")
        for byte in hello[:40]:
            if dribbling.lost_at is not None:
                break
            assert dribbling.transport is not None
            dribbling.transport.write(bytes([byte]))
            await deferLater(reactor, 0.05)
        for raw in (stalled, dribbling):
            lifetime = await raw.lifetime()
            self.assertTrue(0.4 <= lifetime <= 3.0, lifetime)
        await self.bystander_kept_working()

    async def test_slow_request_dropped(self) -> None:
        """
        Slowloris: after TLS, a request sent a byte at a time is dropped
        C{handshake_timeout} after its first byte, though bytes keep coming
        well within the idle timeout.  The same goes for a WebSocket handshake.
        """
        await self.start(self.LIMITS)
        for path in ("/", "/ws/ide"):
            raw = await raw_connect(self.relay, "127.0.0.2")
            tls = HandTLS()
            await tls.handshake(raw)
            request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n" + (
                "X-Padding: " + "a" * 200 + "\r\n\r\n"
            )
            started = time.monotonic()
            for byte in request.encode():
                if raw.lost_at is not None:
                    break
                assert raw.transport is not None
                raw.transport.write(tls.seal(bytes([byte])))
                await deferLater(reactor, 0.05)
            await raw.lifetime()
            assert raw.lost_at is not None
            self.assertTrue(0.4 <= raw.lost_at - started <= 3.0, raw.lost_at - started)
            self.assertNotIn(b"HTTP/1.1", tls.open(await raw.take()))
        await self.bystander_kept_working()

    async def test_idle_keep_alive_closed(self) -> None:
        """An HTTP keep-alive connection that says nothing more is closed after C{idle_timeout}."""
        await self.start(self.LIMITS)
        client = Polite(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        endpoint = wrapClientTLS(
            client_tls_options("localhost", self.relay.keys.tls_cert_pem),
            _tcp(self.relay, "127.0.0.2"),
        )
        await endpoint.connect(Factory.forProtocol(lambda: client))
        closed_at = await client.lost.addTimeout(10, reactor)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 OK"))
        self.assertTrue(0.8 <= closed_at - client.answered_at <= 3.0, closed_at)
        await self.bystander_kept_working()


# --- message rates ----------------------------------------------------------------------------

PING = Envelope(Kind.PING).encode()


class MessageRateTests(RelayUnderAttack):
    """Messages a second per connection: an IDE is closed past its rate, a bridge is slowed."""

    async def test_ide_flood_closed(self) -> None:
        """
        An IDE connection that sends 5,000 messages at once is answered for the
        first C{message_burst} (400), then closed with 4029 C{too many
        messages}; the relay counts it and the bystander does not notice.
        """
        await self.start()
        flood = await self.ide_wire("127.0.0.2", await self.other_browser())
        started = time.monotonic()
        flood.send(ws_frame(0x2, PING) * 5000)
        await flood.until(lambda: flood.close is not None)
        refilled = (time.monotonic() - started) * self.limits.messages_per_second
        self.assertEqual(flood.close, (closecodes.RATE_LIMITED, "too many messages"))
        pongs = flood.kinds().count(Kind.PONG)
        self.assertTrue(400 <= pongs <= 400 + refilled + 1, (pongs, refilled))
        self.assertEqual(self.throttled("rate"), 1)
        await self.bystander_kept_working()

    async def test_bridge_flood_slowed_not_closed(self) -> None:
        """
        A bridge sending faster than C{bridge_messages_per_second} is not closed
        and loses nothing: the relay reads its socket more slowly, so it takes
        at least as long as the rate allows.
        """
        await self.start(Limits(bridge_messages_per_second=1000.0, bridge_message_burst=100))
        _, token, _ = await self.attacker_bridge()
        bridge = await self.bridge_wire("127.0.0.2", token)
        started = time.monotonic()
        for _ in range(10):
            bridge.send(ws_frame(0x2, PING) * 150)
            await deferLater(reactor, 0.01)
        await bridge.until(lambda: bridge.kinds().count(Kind.PONG) == 1500, timeout=20)
        elapsed = time.monotonic() - started
        self.assertIsNone(bridge.close)
        self.assertEqual(bridge.kinds().count(Kind.PONG), 1500)
        # 1,400 past the burst, at 1,000 a second.
        self.assertTrue(1.3 <= elapsed <= 5.0, elapsed)
        self.assertGreaterEqual(self.throttled("rate"), 1)
        await self.bystander_kept_working()


# --- fuzzing ----------------------------------------------------------------------------------

OVERSIZE = "oversize"

payloads = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"{}", b"[]", b"null", b'{"error": 1}', b"\xff\xfe", b"{" * 50]),
)
#: Envelopes with any header at all, and well-formed ones (of any kind, either way).
envelopes = st.one_of(
    st.builds(
        lambda *fields: HEADER.pack(*fields[:-1]) + fields[-1],
        st.one_of(st.just(WIRE_VERSION), st.integers(0, 255)),
        st.one_of(st.sampled_from(list(Kind)), st.integers(0, 255)),
        st.one_of(st.just(0), st.integers(0, 0xFFFF)),
        st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, 2**32 - 1)),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**64 - 1),
        payloads,
    ),
    st.builds(
        lambda kind, peer, stream, seq, payload: Envelope(
            kind, stream=stream, seq=seq, peer=peer, payload=payload
        ).encode(),
        st.sampled_from(list(Kind)),
        st.sampled_from([0, 1, 2]),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**64 - 1),
        payloads,
    ),
)
#: One WebSocket message: (how it is sent, its payload).
messages = st.one_of(
    st.tuples(st.just("binary"), envelopes),
    st.tuples(st.just("binary"), st.binary(max_size=40)),
    st.tuples(st.just("text"), st.text(max_size=40).map(str.encode)),
    st.tuples(st.just("text"), st.binary(max_size=40)),
    st.tuples(st.just(OVERSIZE), st.just(b"")),
)
#: Whole WebSocket frames with any header at all (close frames aside: closing is no attack).
frames = st.builds(
    lambda fin, rsv, opcode, masked, length, payload: ws_frame(
        opcode,
        payload,
        fin=fin,
        rsv=rsv,
        mask=b"\x01\x02\x03\x04" if masked else None,
        length=length,
    ),
    st.booleans(),
    st.one_of(st.just(0), st.integers(0, 7)),
    st.sampled_from([0x0, 0x1, 0x2, 0x3, 0x7, 0x9, 0xA, 0xB, 0xF]),
    st.one_of(st.just(True), st.booleans()),
    st.sampled_from(["minimal", "minimal", "16", "64"]),
    st.one_of(envelopes, st.binary(max_size=200)),
)

Expected = tuple[int | str, int | None]


def _common(how: str, payload: bytes) -> Expected | Envelope:
    """What the relay does with a message whatever the endpoint, or the envelope to judge."""
    if how == OVERSIZE:
        return 1009, None
    if how == "text":
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return 1007, None
        return closecodes.PROTOCOL_ERROR, None
    try:
        envelope = decode(payload)
    except EnvelopeError:
        return closecodes.PROTOCOL_ERROR, None
    if envelope.kind == Kind.PING:
        return "alive", Kind.PONG
    if envelope.kind == Kind.PONG:
        return "alive", None
    return envelope


def expected_from_ide(how: str, payload: bytes) -> Expected:
    """
    The relay's answer to one message from an IDE connection of a session
    with no bridge connected: a close code, or C{"alive"} and the kind of
    frame it answers with (docs/protocol.md, sections 5 and 8).
    """
    judged = _common(how, payload)
    if not isinstance(judged, Envelope):
        return judged
    if not is_end_to_end(judged.kind) or is_to_browser(judged.kind):
        return closecodes.PROTOCOL_ERROR, None
    return "alive", Kind.ERROR  # bridge-offline


def expected_from_bridge(peer: int) -> Callable[[str, bytes], Expected]:
    """The same for a message from bridge C{peer}, whose session has no tab open."""

    def expected(how: str, payload: bytes) -> Expected:
        judged = _common(how, payload)
        if not isinstance(judged, Envelope):
            return judged
        if judged.kind == Kind.CRASH:
            return "alive", None
        if not is_end_to_end(judged.kind) or not is_to_browser(judged.kind):
            return closecodes.PROTOCOL_ERROR, None
        if judged.peer != peer:
            return closecodes.PROTOCOL_ERROR, None
        return "alive", None

    return expected


def fuzz_settings(examples: int) -> Callable[[T], T]:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )


class FuzzTests(RelayUnderAttack):
    """
    Malformed envelopes, invalid UTF-8, wrong types, unknown kinds, oversize
    frames and broken WebSocket frames at both WebSocket endpoints, bad HTTP
    at the API, garbage and truncated TLS records on the socket: each gets
    its defined answer within 10 s, and the bystander keeps working.
    """

    timeout = 120

    async def check_messages(
        self, connect: Callable[[], Coroutine[Any, Any, WireClient]], expected: Any
    ) -> None:
        tags = iter(range(10**9))

        async def one(how: str, payload: bytes) -> tuple[int | str, list[int], str]:
            client = await connect()
            if how == OVERSIZE:
                head = Envelope(Kind.CMD_STDIN, peer=1, stream=1).encode()
                payload = head + bytes(self.limits.max_message_size + 1 - len(head))
            client.send(ws_frame(0x1 if how == "text" else 0x2, payload))
            answer = await client.outcome(b"probe:%d" % next(tags))
            reason = client.close[1] if client.close else ""
            kinds = client.kinds()
            await client.hang_up()
            return answer, kinds, reason

        @fuzz_settings(80)
        @given(messages)
        @example(("text", b"\xff\xfe"))
        @example(("text", b"\xed\xa0\x80"))  # an encoded surrogate: not UTF-8
        @example(("binary", b"\x01\x05\x00"))  # shorter than the header
        @example(("binary", HEADER.pack(2, Kind.PING, 0, 0, 0, 0)))  # another wire version
        @example(("binary", HEADER.pack(1, Kind.PING, 1, 0, 0, 0)))  # a reserved flag
        @example(("binary", HEADER.pack(1, 0x01, 0, 0, 0, 0)))  # an unknown kind
        @example(("binary", HEADER.pack(1, Kind.WELCOME, 0, 0, 0, 0) + b"{}"))
        @example(("binary", HEADER.pack(1, Kind.CMD_START, 0, 1, 7, 0) + b"\xff"))
        @example(("binary", HEADER.pack(1, Kind.CMD_STDOUT, 0, 1, 7, 0) + b"x"))
        @example(("binary", HEADER.pack(1, Kind.CRASH, 0, 0, 0, 0) + b"[1, 2]"))
        @example((OVERSIZE, b""))
        def check(message: tuple[str, bytes]) -> None:
            how, payload = message
            want, reply = expected(how, payload)
            answer, kinds, reason = self.blocking(lambda: one(how, payload))
            assert answer == want, (message, answer, reason)
            if isinstance(answer, int):
                assert reason, (message, answer)
            if reply is not None:
                assert reply in kinds, (message, kinds)

        await self.in_thread(check)

    async def check_frames(self, connect: Callable[[], Coroutine[Any, Any, WireClient]]) -> None:
        tags = iter(range(10**9))

        async def one(sent: list[bytes]) -> tuple[int | str, str]:
            client = await connect()
            client.send(b"".join(sent))
            answer = await client.outcome(b"probe:%d" % next(tags))
            reason = client.close[1] if client.close else ""
            await client.hang_up()
            return answer, reason

        @fuzz_settings(60)
        @given(st.lists(frames, min_size=1, max_size=3))
        @example([ws_frame(0x2, PING, mask=None)])  # not masked
        @example([ws_frame(0x2, PING, rsv=4)])  # compression was not negotiated
        @example([ws_frame(0x3, PING)])  # a reserved opcode
        @example([ws_frame(0x0, PING)])  # a continuation of nothing
        @example([ws_frame(0x2, PING, fin=False)])  # a message left open, then a new one
        @example([ws_frame(0x9, bytes(126))])  # a control frame too long
        @example([ws_frame(0x9, b"", fin=False)])  # a fragmented control frame
        @example([ws_frame(0x2, PING, length="64")])  # not the shortest length
        def check(sent: list[bytes]) -> None:
            answer, reason = self.blocking(lambda: one(sent))
            assert answer == "alive" or answer in DEFINED_CLOSES, (sent, answer, reason)
            if answer != "alive":
                assert reason, (sent, answer)

        await self.in_thread(check)

    async def test_ide_messages(self) -> None:
        """
        Each hostile message on an IDE connection gets exactly the answer the
        protocol defines: 1007 for text that is not UTF-8, 4000 with a reason
        for other text, a bad envelope, a control kind the browser may not
        send or a kind for the browser, 1009 for an oversize message, and an
        ERROR (bridge-offline) or PONG for well-formed ones.
        """
        await self.start()
        browser = await self.other_browser()
        await self.check_messages(lambda: self.ide_wire("127.0.0.2", browser), expected_from_ide)
        await self.bystander_kept_working(at_least=5)

    async def test_bridge_messages(self) -> None:
        """
        The same on a bridge connection: 4000 for a bad envelope, a kind for the
        bridge, a frame naming another bridge or a control kind it may not send.
        """
        await self.start()
        _, token, peer = await self.attacker_bridge()
        await self.check_messages(
            lambda: self.bridge_wire("127.0.0.3", token), expected_from_bridge(peer)
        )
        await self.bystander_kept_working(at_least=5)

    async def test_ide_frames(self) -> None:
        """
        Broken WebSocket frames (reserved bits and opcodes, no mask, overlong
        lengths, fragments out of place, long control frames) on an IDE
        connection: closed with a defined code and a reason, or still in step.
        """
        await self.start()
        browser = await self.other_browser()
        await self.check_frames(lambda: self.ide_wire("127.0.0.4", browser))
        await self.bystander_kept_working(at_least=5)

    async def test_bridge_frames(self) -> None:
        """The same broken frames on a bridge connection."""
        await self.start()
        _, token, _ = await self.attacker_bridge()
        await self.check_frames(lambda: self.bridge_wire("127.0.0.5", token))
        await self.bystander_kept_working(at_least=5)

    async def test_http_api(self) -> None:
        """
        Requests of any method, to any API path, with bodies of the wrong JSON
        types, invalid UTF-8, no JSON at all or too large, with and without a
        cookie, an Origin or a token: each gets a 4xx (JSON, for the API's own
        endpoints) or a 2xx, never a 500 (the page's files answer methods
        twisted.web does not know with its own 501).
        """
        await self.start()
        attacker = await self.other_browser()
        jar = f"{SESSION_COOKIE}={self.cookie(attacker)}"
        agent = Agent(
            reactor,
            contextFactory=RelayTrust(self.relay.keys.tls_cert_pem.decode()),
            bindAddress=("127.0.0.6", 0),
        )
        url = self.relay.context.public_url

        async def one(
            method: bytes, path: str, body: bytes | None, headers: dict[bytes, bytes]
        ) -> tuple[int, bytes, bytes]:
            producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
            response = await agent.request(
                method,
                (url + path).encode(),
                Headers({k: [v] for k, v in headers.items()}),
                producer,
            )
            try:
                data = await readBody(response)
            except PartialDownloadError as e:
                # Autobahn refuses a WebSocket handshake with a bare status line,
                # no length, then closes.
                data = e.response or b""
            kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
            return response.code, kind, data

        json_values = st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
            max_leaves=10,
        )
        fields = st.sampled_from(["code", "label", "browser_key", "bridge_key", "peer"])
        bodies = st.one_of(
            st.none(),
            st.dictionaries(fields, json_values, max_size=4).map(lambda d: json.dumps(d).encode()),
            json_values.map(lambda v: json.dumps(v).encode()),
            st.binary(max_size=200),
            st.sampled_from([b"\xff\xfe{}", b'{"code": "\xff"}', b"{" * 10_000, b" " * 20_000]),
        )
        headers = st.fixed_dictionaries(
            {},
            optional={
                b"cookie": st.sampled_from([jar.encode(), b"__Host-coder1-session=forged"]),
                b"origin": st.sampled_from([url.encode(), b"https://evil.example", b"null"]),
                b"authorization": st.sampled_from([b"Bearer a.b.c", b"Bearer", b"Basic eDp5"]),
                b"content-type": st.sampled_from([b"application/json", b"text/plain"]),
            },
        )
        paths = st.sampled_from(
            [
                "/api/session",
                "/api/pairing-codes",
                "/api/pair",
                "/api/pair/key",
                "/api/token",
                "/api/bridges",
                "/api/revoke",
                "/api/nothing",
                "/",
                "/app.js",
                "/ws/ide",
                "/ws/bridge",
                "/ws/ide?redirect=https%3A%2F%2Fevil.example",
                "/%2e%2e/%2e%2e/etc/passwd",
            ]
        )
        methods = st.sampled_from([b"GET", b"POST", b"DELETE", b"PUT", b"PATCH", b"OPTIONS"])
        endpoints = st.sampled_from(
            [
                (b"POST", "/api/session"),
                (b"POST", "/api/pairing-codes"),
                (b"POST", "/api/pair"),
                (b"POST", "/api/pair/key"),
                (b"GET", "/api/token"),
                (b"DELETE", "/api/token"),
                (b"GET", "/api/bridges"),
                (b"POST", "/api/revoke"),
                (b"GET", "/"),
                (b"GET", "/ws/ide"),
                (b"GET", "/ws/bridge"),
            ]
        )

        origin = {b"origin": url.encode(), b"cookie": jar.encode()}

        @fuzz_settings(150)
        @given(st.one_of(endpoints, st.tuples(methods, paths)), bodies, headers)
        @example((b"POST", "/api/pair"), b'{"code": 123456, "label": []}', {})
        @example((b"POST", "/api/pair"), b'{"code": "\xff\xfe"}', {})
        @example((b"POST", "/api/pair"), b"[" * 10_000, {})
        @example((b"POST", "/api/pair"), b" " * 20_000, {})
        @example((b"POST", "/api/pairing-codes"), b'{"browser_key": 5}', origin)
        @example((b"POST", "/api/revoke"), b'{"peer": "1"}', origin)
        @example(
            (b"POST", "/api/pair/key"), b'{"bridge_key": null}', {b"authorization": b"Bearer x"}
        )
        @example((b"GET", "/ws/ide?redirect=https%3A%2F%2Fevil.example"), None, {})
        def check(
            target: tuple[bytes, str], body: bytes | None, headers: dict[bytes, bytes]
        ) -> None:
            method, path = target
            status, kind, data = self.blocking(lambda: one(method, path, body, headers))
            own = path.startswith("/api/") and path != "/api/nothing"
            # twisted.web's own answer to a method it does not know, for the page's files.
            unknown = status == 501 and not own and method not in (b"GET", b"HEAD", b"POST")
            said = (method, path, body and body[:60], headers, status, data[:200])
            assert 200 <= status < 500 or unknown, said
            assert not 300 <= status < 400, said  # no redirects, open or not
            if own and status >= 400 and status != 404:
                assert kind == b"application/json", (method, path, status, kind)
                answer = json.loads(data)
                assert set(answer) == {"error", "message"}, answer

        await self.in_thread(check)
        await self.bystander_kept_working(at_least=5)

    async def test_socket_garbage_and_truncated_tls(self) -> None:
        """
        Bytes that are not TLS, a ClientHello cut short, and after the
        handshake, at the page, the API and both WebSocket endpoints, a TLS
        record cut short or spoiled: the relay closes the connection within
        its TLS handshake timeout (or at once), logs no traceback, and the
        bystander keeps working.
        """
        await self.start(Limits(tls_handshake_timeout=0.3, handshake_timeout=0.3))
        bound = 2.0

        async def garbage(data: bytes) -> float:
            raw = await raw_connect(self.relay, "127.0.0.7")
            assert raw.transport is not None
            raw.transport.write(data)
            return await raw.lifetime(timeout=bound)

        hello, _ = HandTLS().step()

        # Mostly five bytes or more: fewer are no whole record header, so each
        # such example waits for the handshake timeout, which the ones below show.
        @fuzz_settings(40)
        @given(st.binary(min_size=5, max_size=2000))
        @example(b"\x00")
        @example(b"\x16\x03")
        @example(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        @example(b"\x16\x03\x01\x00\xff")  # a record header that promises more
        @example(hello[:-1])
        @example(hello[:5] + b"\x00" * (len(hello) - 5))
        @example(hello + b"\x17\x03\x03\x00\x10" + bytes(16))  # data before the handshake ends
        def check(data: bytes) -> None:
            lifetime = self.blocking(lambda: garbage(data))
            assert lifetime <= bound, (data, lifetime)

        await self.in_thread(check)

        # A ClientHello cut short, then the client hangs up.
        raw = await raw_connect(self.relay, "127.0.0.7")
        assert raw.transport is not None
        raw.transport.write(hello[:30])
        raw.transport.loseConnection()
        await raw.lifetime()

        browser = await self.other_browser()
        _, token, _ = await self.attacker_bridge()
        origin, cookie = self.relay.context.public_url, self.cookie(browser)
        requests = {
            "/": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
            "/api/pair": (
                b"POST /api/pair HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}"
            ),
            "/ws/ide": (
                "GET /ws/ide HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n"
                f"Cookie: {SESSION_COOKIE}={cookie}\r\n\r\n"
            ).encode(),
            "/ws/bridge": (
                "GET /ws/bridge HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode(),
        }
        for path, request in requests.items():
            for spoil in ("cut", "flip"):
                raw = await raw_connect(self.relay, "127.0.0.8")
                tls = HandTLS()
                await tls.handshake(raw)
                assert raw.transport is not None
                payload = request
                if path.startswith("/ws/"):
                    raw.transport.write(tls.seal(request))
                    answer = b""
                    while b"\r\n\r\n" not in answer and raw.lost_at is None:
                        answer += tls.open(await raw.take())
                    self.assertIn(b" 101 ", answer.split(b"\r\n", 1)[0])
                    payload = ws_frame(0x2, PING)
                record = tls.seal(payload)
                if spoil == "cut":
                    raw.transport.write(record[: len(record) // 2])
                    raw.transport.loseConnection()
                else:
                    raw.transport.write(record[:-3] + bytes([record[-3] ^ 1]) + record[-2:])
                lifetime = await raw.lifetime(timeout=bound)
                self.assertLessEqual(lifetime, bound, (path, spoil))
        await self.bystander_kept_working(at_least=5)


# --- floods from one address ------------------------------------------------------------------


class Pipelined(Protocol):
    """Sends many HTTP requests at once on one connection; counts the statuses that come back."""

    STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")

    def __init__(self, requests: list[bytes]) -> None:
        self.requests = requests
        self.received = b""
        self.statuses: list[int] = []
        self.done: Deferred[list[int]] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(self.requests))

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.statuses = [int(s) for s in self.STATUS.findall(self.received)]
        if len(self.statuses) == len(self.requests) and not self.done.called:
            assert self.transport is not None
            self.transport.loseConnection()
            self.done.callback(self.statuses)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(self.statuses)


@implementer(IHandshakeListener)
class Handshake(Protocol):
    """A TLS client that only reports whether its handshake completed."""

    def __init__(self) -> None:
        self.done: Deferred[bool] = Deferred()

    def handshakeCompleted(self) -> None:
        if not self.done.called:
            self.done.callback(True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(False)


class FloodTests(RelayUnderAttack):
    """Thousands of pairing attempts and handshakes from one address: throttled and counted."""

    async def test_crash_report_flood(self) -> None:
        """
        The audit's flood: a paired bridge sends crash reports with 1 MB module
        names, then thousands of the largest valid ones, with a canary for
        every name.  The huge ones are refused unread, the bridge's day's
        budget keeps 5 of the rest, the names none of the relay's code holds
        are kept as "?", the database stays under its cap, another session's
        bridge still has its report kept, and the bystander kept working.
        """
        cap = 1024 * 1024
        await self.start(telemetry=TelemetrySettings(max_bytes=cap))
        _, token, peer = await self.attacker_bridge()
        attacker = await self.bridge_wire("127.0.0.7", token)
        frame = {"module": "coder1_bridge.canary_7f3a9", "function": "CANARY_7f3a9", "line": 1}
        valid = {"type": "CANARY_7f3a9", "frames": [frame] * MAX_FRAMES, "version": "0.1.0"}
        huge = {**valid, "frames": [{**frame, "module": "coder1_bridge." + "m" * 10**6}]}
        for report, times in ((huge, 20), (valid, 2000)):
            message = ws_frame(0x2, control(Kind.CRASH, report, peer=peer).encode())
            for _ in range(times):
                attacker.send(message)
            self.assertEqual(await attacker.outcome(b"after"), "alive")
        _, other_token, other_peer = await self.attacker_bridge()
        other = await self.bridge_wire("127.0.0.8", other_token)
        real = {
            "type": "coder1_bridge.replay.BadResume",
            "frames": [{"module": "coder1_bridge.connection", "function": "attach", "line": 7}],
            "version": "0.1.0",
        }
        other.send(ws_frame(0x2, control(Kind.CRASH, real, peer=other_peer).encode()))
        self.assertEqual(await other.outcome(b"after"), "alive")
        await self.bystander_kept_working()
        # Every report was handled (under load, the last may still be on their way).
        for _ in range(100):
            if self.counted("crash_report_dropped", "budget") == 2000 - 5:
                break
            await deferLater(reactor, 0.1)
        await stop_all(self.relay)

        path = self.relay.settings.state_dir.child("telemetry.sqlite").path
        self.assertLessEqual(os.path.getsize(path), cap)
        with open(path, "rb") as file:
            self.assertNotIn(b"7f3a9", file.read())
        with closing(sqlite3.connect(path)) as db:
            rows = db.execute("SELECT type, frames FROM crash_reports ORDER BY id").fetchall()
            # Summed over the hours: the flood may straddle the end of one.
            query = "SELECT name || ':' || label, sum(value) FROM counts GROUP BY name, label"
            counts = dict(db.execute(query).fetchall())
        self.assertEqual([t for t, _ in rows], ["?"] * 5 + [real["type"]])
        self.assertEqual(json.loads(rows[-1][1])[0]["function"], "attach")
        self.assertEqual(counts["crash_report_refused:"], 20)
        self.assertEqual(counts["crash_report_dropped:budget"], 2000 - 5)

    async def test_pairing_flood(self) -> None:
        """
        2,000 attempts to redeem guessed codes from one address: the first
        C{failures_per_ip_per_hour} (10) are refused as invalid, every other
        one is answered 429 and counted; meanwhile a real bridge pairs from
        another address and the bystander keeps running commands.
        """
        await self.start()
        request = (
            b"POST /api/pair HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s"
        )

        async def flood(connection: int) -> list[int]:
            await deferLater(reactor, connection * 0.1)  # a flood that lasts a second or so
            bodies = [
                json.dumps({"code": f"{connection:02d}{n:04d}", "label": "x", "bridge_key": KEY})
                for n in range(200)
            ]
            client = Pipelined([request % (len(b), b.encode()) for b in bodies])
            endpoint = wrapClientTLS(
                client_tls_options("localhost", self.relay.keys.tls_cert_pem),
                _tcp(self.relay, "127.0.0.2"),
            )
            await endpoint.connect(Factory.forProtocol(lambda: client))
            return await client.done.addTimeout(60, reactor)

        async def legitimate() -> None:
            await deferLater(reactor, 0.3)
            await pair_bridge(self.browser, FilePath(self.mktemp()), io.StringIO(), "second")

        runs = self.bystander.runs
        pairing = Deferred.fromCoroutine(legitimate())
        results = await gatherResults([Deferred.fromCoroutine(flood(n)) for n in range(10)])
        await pairing
        self.assertGreater(self.bystander.runs, runs)  # commands ran during the flood
        statuses = [status for batch in results for status in batch]
        policy = self.relay.settings.pairing
        self.assertEqual(len(statuses), 2000)
        self.assertEqual(statuses.count(403), policy.failures_per_ip_per_hour)
        self.assertEqual(statuses.count(429), 2000 - policy.failures_per_ip_per_hour)
        self.assertEqual(self.throttled("pairing"), 2000 - policy.failures_per_ip_per_hour)
        status, body, _ = await self.browser.request(b"GET", "/api/bridges")
        self.assertEqual((status, len(body["bridges"])), (200, 2))
        await self.bystander_kept_working()

    async def handshake(self, source: str, held: list[Handshake]) -> bool:
        """One TLS connection from C{source}: whether its handshake completed (then it is held)."""
        client = Handshake()
        endpoint = wrapClientTLS(
            client_tls_options("localhost", self.relay.keys.tls_cert_pem),
            _tcp(self.relay, source),
        )
        await endpoint.connect(Factory.forProtocol(lambda: client))
        if await client.done.addTimeout(10, reactor):
            held.append(client)
            return True
        return False

    async def let_go(self, held: list[Handshake], pause: float = 0.1) -> None:
        for client in held:
            assert client.transport is not None
            client.transport.loseConnection()
        await DeferredList([Deferred.fromCoroutine(_gone(c)) for c in held])
        held.clear()
        await deferLater(reactor, pause)  # for the relay to see them go

    async def test_handshake_flood_held(self) -> None:
        """
        1,000 TLS connections from one address, held open once in: the relay
        completes C{connections_per_ip} (64) handshakes and closes every other
        connection at once, before TLS, counting each; another address still
        gets in meanwhile, and this one does again once it lets go.
        """
        await self.start()
        held: list[Handshake] = []
        outcomes: list[bool] = []
        for wave in range(25):
            attempts = [
                Deferred.fromCoroutine(self.handshake("127.0.0.2", held)) for _ in range(40)
            ]
            outcomes += await gatherResults(attempts)
            if wave == 12:
                tab = await self.browser.connect_ide()  # from 127.0.0.1, meanwhile
                self.addCleanup(tab.close)
        self.assertEqual(outcomes.count(True), self.limits.connections_per_ip)
        self.assertEqual(self.throttled("connections"), outcomes.count(False))
        await self.let_go(held)
        self.assertTrue(await self.handshake("127.0.0.2", held))
        await self.let_go(held)
        await self.bystander_kept_working()

    async def test_handshake_flood_churn(self) -> None:
        """
        1,000 TLS handshakes from one address, each connection closed once it
        is in (so never many open at once): past C{new_connection_burst} (200)
        only C{new_connections_per_second} (20) a second get in, the rest are
        closed at once and counted.
        """
        await self.start()
        held: list[Handshake] = []
        outcomes: list[bool] = []
        started = time.monotonic()
        for _ in range(25):
            attempts = [
                Deferred.fromCoroutine(self.handshake("127.0.0.2", held)) for _ in range(40)
            ]
            outcomes += await gatherResults(attempts)
            await self.let_go(held, pause=0.01)
        elapsed = time.monotonic() - started
        limits = self.limits
        allowed = limits.new_connection_burst + limits.new_connections_per_second * elapsed
        self.assertTrue(limits.new_connection_burst <= outcomes.count(True) <= allowed, outcomes)
        self.assertEqual(self.throttled("connections"), outcomes.count(False))
        # How many got in depends on how long the flood took (a loaded machine is
        # slower): every attempt past what the rate allowed in that time was refused.
        self.assertGreaterEqual(outcomes.count(False), len(outcomes) - int(allowed))
        self.assertGreater(outcomes.count(False), 0)
        await self.bystander_kept_working()


async def _gone(client: Handshake) -> None:
    transport: Any = client.transport
    while transport is not None and transport.connected:
        await deferLater(reactor, 0.01)
