"""
Lossless resume end to end (docs/protocol.md, section 5.7): a real relay in a
process of its own, killed with SIGKILL mid-stream and started again; a real
bridge; a command printing 50 MB of numbered lines; an IDE client that resumes
as the page does.  Every line arrives exactly once, in order.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import secrets
import signal
from collections.abc import Callable
from typing import Any

import attrs
from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from coder1_bridge.replay import CMD, MAX_CHUNK, PTY, Key, ReplaySettings
from coder1_bridge.service import BridgeService
from coder1_wire.envelope import Envelope, Kind, control
from tests.loopback import (
    Browser,
    ChildRelay,
    IDEConnection,
    pair_bridge,
    settle,
    start_bridge,
    start_child_relay,
    start_relay,
    stop_all,
)

_OPEN = WebSocketClientProtocol.STATE_OPEN
#: Lines of `seq 1 LINES`: 6,000,000 lines, 52,888,896 bytes.
LINES = 6_000_000
STREAM = 7
KEY: Key = (CMD, STREAM)


def expected_output(lines: int = LINES) -> bytes:
    return b"".join(b"%d\n" % i for i in range(1, lines + 1))


class _Discard(list[bytes]):
    """The raw frames: not kept (50 MB of them)."""

    def append(self, item: bytes) -> None:
        pass


@attrs.define
class _Connection(IDEConnection):
    """An IDE connection that hands the command's frames to C{sink} and keeps no raw frames."""

    sink: Callable[[IDEConnection, Envelope], bool] | None = None

    def received(self, envelope: Envelope) -> None:
        if self.sink is None or not self.sink(self, envelope):
            super().received(envelope)


@attrs.define
class ResumingIDE:
    """
    What the IDE page does for one command's output, over any number of IDE
    connections in turn: take frames in by byte position (dropping what it
    has), acknowledge, and resume on every new channel.
    """

    browser: Browser
    client: str = attrs.field(factory=lambda: secrets.token_urlsafe(12))
    data: bytearray = attrs.field(factory=bytearray)
    acked: int = 0
    window: int = ReplaySettings().window
    gaps: list[dict[str, Any]] = attrs.field(factory=list)
    duplicates: int = 0
    connections: int = 0
    exit: Deferred[Envelope] = attrs.field(factory=Deferred)
    progress: list[tuple[int, Deferred[None]]] = attrs.field(factory=list)
    connection: IDEConnection | None = None

    @property
    def next(self) -> int:
        return len(self.data)

    async def connect(self) -> None:
        """Connect (retrying while the relay is away), open a channel, RESUME."""
        while True:
            try:
                connection = await self.browser.connect_ide(
                    handshake=False,
                    connection=_Connection(
                        self.browser.identity, raw=_Discard(), sink=self._received
                    ),
                )
                break
            except Exception:
                await deferLater(reactor, 0.2)
        self.connection = connection
        self.connections += 1
        # The bridge reconnects on its own schedule: wait until the relay lists it.
        await connection.wait_for(
            lambda e: e.kind == Kind.PRESENCE and bool(e.json()["bridges"]), timeout=60
        )
        await connection.handshake(1)
        stream = {"type": CMD, "stream": STREAM, "next": self.next}
        body = {"client": self.client, "streams": [stream]}
        connection.send(control(Kind.RESUME, body, peer=1))

    def _received(self, connection: IDEConnection, envelope: Envelope) -> bool:
        """Take in one of the command's frames (True), or leave the frame to the connection."""
        if envelope.stream != STREAM or envelope.kind not in (
            Kind.CMD_STDOUT,
            Kind.CMD_STDERR,
            Kind.CMD_EXIT,
            Kind.GAP,
        ):
            return False
        if connection is not self.connection:
            return True  # a connection already given up
        if envelope.kind == Kind.GAP:
            self.gaps.append(envelope.json())
            return True
        end = envelope.seq + len(envelope.payload)
        if end <= self.next:
            self.duplicates += 1
            return True
        assert envelope.seq <= self.next, (envelope.seq, self.next)
        if envelope.kind == Kind.CMD_EXIT:
            if not self.exit.called:
                self.exit.callback(envelope)
            return True
        self.data += envelope.payload[self.next - envelope.seq :]
        if self.next - self.acked >= self.window // 2:
            self.ack()
        for reached in [p for p in self.progress if self.next >= p[0]]:
            self.progress.remove(reached)
            reached[1].callback(None)
        return True

    def ack(self) -> None:
        assert self.connection is not None
        self.acked = self.next
        body = {"streams": [{"type": CMD, "stream": STREAM, "next": self.next}]}
        if self.connection.close_code is None:
            self.connection.send(control(Kind.ACK, body, peer=1))

    def reached(self, size: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.progress.append((size, d))
        return d


class ChaosTests(TestCase):
    timeout = 300

    async def start(
        self, lines: int = LINES, replay: ReplaySettings | None = None
    ) -> tuple[ChildRelay, BridgeService, ResumingIDE]:
        self.state = FilePath(self.mktemp())
        relay = await start_child_relay(self.state)
        self.relays = [relay]
        self.addCleanup(lambda: Deferred.fromCoroutine(self.relays[-1].child.stop()))
        browser = Browser(relay.as_service())
        await browser.open_page()
        config = await pair_bridge(browser, FilePath(self.mktemp()), io.StringIO())
        bridge = await start_bridge(config, max_delay=1.0, replay=replay)
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(bridge)))
        ide = ResumingIDE(browser)
        await ide.connect()
        assert ide.connection is not None
        start = control(Kind.CMD_START, {"argv": ["seq", "1", str(lines)]}, stream=STREAM, peer=1)
        ide.connection.send(start)
        return relay, bridge, ide

    async def kill_relay(self, relay: ChildRelay) -> None:
        """SIGKILL the relay process, then start it again on the same port and state."""
        os.kill(relay.pid, signal.SIGKILL)
        await relay.child.ended
        listen = f"--listen=tcp:{relay.port.port}:interface=127.0.0.1"
        self.relays.append(await start_child_relay(self.state, listen))

    async def finish(self, ide: ResumingIDE, lines: int = LINES) -> None:
        end = await ide.exit.addTimeout(240, reactor)
        self.assertEqual(end.json()["exit_code"], 0)
        expected = expected_output(lines)
        self.assertEqual(ide.gaps, [])
        self.assertEqual(len(ide.data), len(expected))
        self.assertEqual(hashlib.sha256(ide.data).digest(), hashlib.sha256(expected).digest())

    async def test_relay_killed_twice(self) -> None:
        """
        The relay is SIGKILLed twice during a 50 MB output and started again; the
        bridge and the IDE reconnect by themselves, the IDE resumes, and ends with
        every line exactly once, in order (same length, same SHA-256).
        """
        relay, _bridge, ide = await self.start()
        for at in (10_000_000, 30_000_000):
            await ide.reached(at).addTimeout(120, reactor)
            await self.kill_relay(self.relays[-1])
            await ide.connect()
        await self.finish(ide)
        self.assertEqual(ide.connections, 3)
        del relay

    async def test_browser_side_drops_twice(self) -> None:
        """
        The IDE's connection is dropped (aborted, no close) twice during a 50 MB
        output; each time it reconnects and resumes, and ends with every line
        exactly once, in order.
        """
        _relay, _bridge, ide = await self.start()
        for at in (10_000_000, 30_000_000):
            await ide.reached(at).addTimeout(120, reactor)
            assert ide.connection is not None and ide.connection.protocol is not None
            transport: Any = ide.connection.protocol.transport
            transport.abortConnection()
            await ide.connection.lost
            await ide.connect()
        await self.finish(ide)
        self.assertEqual(ide.connections, 3)

    async def test_resume_restarts_a_held_command(self) -> None:
        """
        The audit's case: a replay buffer (64 KiB) smaller than the send window;
        `seq 1 200000` fills it while the page acknowledges nothing, so the
        command is held; the page's connection drops, and it resumes on a new
        channel from all it has.  That RESUME acknowledges it all, so the
        command reads on at once and every line arrives (it once stayed held
        until a second RESUME).
        """
        lines = 200_000
        _relay, bridge, ide = await self.start(lines, ReplaySettings(capacity=64 * 1024))
        ide.window = 2**62  # acknowledge nothing for now
        await ide.reached(64 * 1024).addTimeout(60, reactor)
        log = bridge.session.outbox.logs[KEY]
        while not (log.held and ide.next == log.end):
            await deferLater(reactor, 0.05)
        assert ide.connection is not None and ide.connection.protocol is not None
        transport: Any = ide.connection.protocol.transport
        transport.abortConnection()
        await ide.connection.lost
        ide.window = 1  # from now on acknowledge every frame, as the page's timer would
        await ide.connect()
        await self.finish(ide, lines)


@attrs.define
class _TwoTerminals:
    """An IDE following two terminals: counts a flood on one, watches for echo on the other."""

    flood_bytes: int = 0
    acked: int = 0
    echo: bytes = b""
    window: int = ReplaySettings().window
    connection: IDEConnection | None = None
    waiting: tuple[bytes, Deferred[int]] | None = None

    def take(self, connection: IDEConnection, envelope: Envelope) -> bool:
        if envelope.kind != Kind.PTY_OUTPUT:
            return False
        if envelope.stream == 1:
            self.flood_bytes += len(envelope.payload)
            closing = connection.protocol is None or connection.protocol.state != _OPEN
            if self.flood_bytes - self.acked >= self.window // 2 and not closing:
                self.acked = self.flood_bytes
                body = {
                    "streams": [
                        {"type": "pty", "stream": 1, "next": envelope.seq + len(envelope.payload)}
                    ]
                }
                connection.send(control(Kind.ACK, body, peer=1))
        elif envelope.stream == 2:
            self.echo += envelope.payload
            if self.waiting is not None and self.waiting[0] in self.echo:
                waiting, self.waiting = self.waiting[1], None
                waiting.callback(self.flood_bytes)
        return True


#: Bytes of the flood that may arrive between a key and its echo (the median of 20):
#: at most what one stream may have in flight to a tab (the send window, overshot by
#: at most one chunk) and what the relay queues for the tab before it holds the
#: bridge.  Without flow control all the way (the relay forwarding whatever comes),
#: megabytes would queue ahead of the echo.
AHEAD_BOUND = ReplaySettings().window + MAX_CHUNK + 64 * 1024


class FloodTests(TestCase):
    timeout = 120

    async def test_echo_not_behind_a_flood(self) -> None:
        """
        One terminal floods output as fast as it can while keys are typed into
        another: the flood's bytes that arrive between a key and its echo stay
        within what may be in flight (L{AHEAD_BOUND}): a window per stream, and
        nothing from the replay logs while the bridge's connection is full.
        """
        relay = await start_child_relay(FilePath(self.mktemp()))
        self.addCleanup(lambda: Deferred.fromCoroutine(relay.child.stop()))
        browser = Browser(relay.as_service())
        await browser.open_page()
        config = await pair_bridge(browser, FilePath(self.mktemp()), io.StringIO())
        bridge = await start_bridge(config)
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(bridge)))
        ide = _TwoTerminals()
        connection = await browser.connect_ide(
            handshake=False, connection=_Connection(browser.identity, raw=_Discard(), sink=ide.take)
        )
        await connection.wait_for(lambda e: e.kind == Kind.PRESENCE and bool(e.json()["bridges"]))
        await connection.handshake(1)
        connection.send(control(Kind.RESUME, {"client": "flood", "streams": []}, peer=1))
        for stream, argv in (
            (1, ["sh", "-c", "exec cat /dev/zero"]),
            (2, ["sh", "-c", "stty raw -echo; exec cat"]),
        ):
            body = {"cols": 80, "rows": 24, "argv": argv}
            connection.send(control(Kind.PTY_OPEN, body, stream=stream, peer=1))
        # A reader slower than the flood (a busy tab): half the time it does not read.
        assert connection.protocol is not None
        transport: Any = connection.protocol.transport
        ticks = itertools.count()
        throttle = LoopingCall(
            lambda: transport.pauseProducing() if next(ticks) % 2 else transport.resumeProducing()
        )
        throttle.start(0.05)
        self.addCleanup(lambda: throttle.stop() if throttle.running else None)
        while ide.flood_bytes < 4 * ide.window:
            await deferLater(reactor, 0.05)
        ahead = []
        for n in range(20):
            key = b"k%02d" % n
            ide.waiting = (key, Deferred())
            before = ide.flood_bytes
            connection.send(Envelope(Kind.PTY_INPUT, 2, n + 1, 1, key))
            after = await ide.waiting[1].addTimeout(30, reactor)
            ahead.append(after - before)
        ahead.sort()
        self.assertLessEqual(ahead[len(ahead) // 2], AHEAD_BOUND, ahead)
        throttle.stop()
        transport.abortConnection()
        await connection.lost


class OverflowTests(TestCase):
    timeout = 60

    async def test_terminal_overflow_is_marked(self) -> None:
        """
        A terminal prints 1 MB while no page follows it, with a 64 KiB replay
        buffer: the program is not held (it ends), and the page that comes back
        gets a GAP saying exactly how many bytes went, then the last of the
        output up to PTY_EXIT, with no silent hole.
        """
        relay = await start_child_relay(FilePath(self.mktemp()))
        self.addCleanup(lambda: Deferred.fromCoroutine(relay.child.stop()))
        browser = Browser(relay.as_service())
        await browser.open_page()
        config = await pair_bridge(browser, FilePath(self.mktemp()), io.StringIO())
        replay = ReplaySettings(capacity=64 * 1024)
        bridge = await start_bridge(config, replay=replay)
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(bridge)))

        frames: list[Envelope] = []

        def take(connection: IDEConnection, envelope: Envelope) -> bool:
            if envelope.stream != 3:
                return False
            frames.append(envelope)
            return True

        async def connect() -> IDEConnection:
            connection = await browser.connect_ide(
                handshake=False, connection=_Connection(browser.identity, sink=take)
            )
            await connection.wait_for(
                lambda e: e.kind == Kind.PRESENCE and bool(e.json()["bridges"])
            )
            await connection.handshake(1)
            return connection

        first = await connect()
        first.send(control(Kind.RESUME, {"client": "a", "streams": []}, peer=1))
        script = "sleep 1; head -c 1000000 /dev/zero | tr '\\0' a; echo; echo END"
        body = {"cols": 80, "rows": 24, "argv": ["sh", "-c", script]}
        first.send(control(Kind.PTY_OPEN, body, stream=3, peer=1))
        while not frames:
            await deferLater(reactor, 0.05)
        [opened] = frames
        self.assertEqual((opened.kind, opened.seq), (Kind.PTY_OPENED, 0))
        await first.close()
        # The program runs and ends meanwhile (a terminal is never held without a page).
        log = bridge.session.outbox.logs[(PTY, 3)]
        while not log.ended:
            await deferLater(reactor, 0.1)
        frames.clear()
        second = await connect()
        resumed_from = len(opened.payload)
        stream = {"type": PTY, "stream": 3, "next": resumed_from}
        second.send(control(Kind.RESUME, {"client": "b", "streams": [stream]}, peer=1))
        while not frames or frames[-1].kind != Kind.PTY_EXIT:
            await deferLater(reactor, 0.05)
        gap, *rest = frames
        self.assertEqual(gap.kind, Kind.GAP)
        said = gap.json()
        self.assertEqual((said["from"], said["to"]), (resumed_from, gap.seq))
        self.assertEqual(said["bytes"], gap.seq - resumed_from)
        self.assertGreater(said["bytes"], 900_000)
        output = b"".join(f.payload for f in rest if f.kind == Kind.PTY_OUTPUT)
        self.assertEqual(rest[0].seq, gap.seq)
        self.assertEqual(gap.seq + len(output) + len(rest[-1].payload), log.end)
        self.assertTrue(output.rstrip().endswith(b"END"), output[-40:])
        await second.close()


class ClosedTerminalTests(TestCase):
    timeout = 60

    async def test_closed_terminal_log_forgotten(self) -> None:
        """
        Through a real relay and bridge: a terminal the page closes (PTY_CLOSE) has
        no log left once its PTY_EXIT has come, so a later RESUME lists it as
        unknown; a terminal whose program ended by itself is still replayed.
        """
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        relay = await start_relay(FilePath(self.mktemp()))
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(relay)))
        browser = Browser(relay)
        await browser.open_page()
        config = await pair_bridge(browser, FilePath(self.mktemp()), io.StringIO())
        bridge = await start_bridge(config)
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(bridge)))
        ide = await browser.connect_ide(handshake=False)
        self.addCleanup(ide.close)
        await ide.wait_for(lambda e: e.kind == Kind.PRESENCE and bool(e.json()["bridges"]))
        await ide.handshake(1)
        ide.send(control(Kind.RESUME, {"client": "page", "streams": []}, peer=1))

        def ended(stream: int) -> Callable[[Envelope], bool]:
            return lambda e: e.stream == stream and e.kind == Kind.PTY_EXIT

        running = {"cols": 80, "rows": 24, "argv": ["sh", "-c", "echo hello; exec sleep 60"]}
        ide.send(control(Kind.PTY_OPEN, running, stream=5, peer=1))
        await ide.wait_for(lambda e: e.stream == 5 and b"hello" in e.payload)
        ide.send(Envelope(Kind.PTY_CLOSE, 5, 1, 1))
        await ide.wait_for(ended(5))
        self.assertNotIn((PTY, 5), bridge.session.outbox.logs)

        done = {"cols": 80, "rows": 24, "argv": ["sh", "-c", "echo bye"]}
        ide.send(control(Kind.PTY_OPEN, done, stream=6, peer=1))
        end = await ide.wait_for(ended(6))
        position = end.seq + len(end.payload)
        ack = {"streams": [{"type": PTY, "stream": 6, "next": position}]}
        ide.send(control(Kind.ACK, ack, peer=1))

        streams = [{"type": PTY, "stream": s, "next": 0} for s in (5, 6)]
        ide.frames.clear()
        ide.send(control(Kind.RESUME, {"client": "page", "streams": streams}, peer=1))
        resumed = await ide.wait_for(lambda e: e.kind == Kind.RESUMED)
        self.assertEqual(resumed.json()["unknown"], [{"type": PTY, "stream": 5}])
        replayed = await ide.wait_for(ended(6))
        self.assertEqual(replayed.seq, end.seq)
