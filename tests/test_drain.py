"""
Stopping a relay without losing anyone (C{coder1_relay.drain}): stop
accepting, close every WebSocket with 1001 "going away", wait up to the drain
timeout, exit 0; clients come back at once, not after their backoff.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import ssl
from typing import cast

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from coder1_relay.context import Connections
from coder1_relay.drain import Drain
from coder1_relay.tap import Options
from coder1_wire import closecodes
from coder1_wire.envelope import Kind, control

from .loopback import Browser, pair_bridge, settle, start_bridge, start_child_relay, stop_all
from .test_cli import TWISTD, Collect, spawn
from .test_resume import LINES, STREAM, ResumingIDE, expected_output


@attrs.define(eq=False)
class _Connection:
    """A connection that closes when told to, or (C{stubborn}) never."""

    connections: Connections
    events: list[str]
    stubborn: bool = False
    code: int | None = None

    def close(self, code: int, reason: str) -> None:
        self.code = code
        self.events.append("close")
        if not self.stubborn:
            self.connections.remove(self)

    def abort(self) -> None:
        self.events.append("abort")
        self.connections.remove(self)


@attrs.define
class _Port:
    events: list[str]

    def stopListening(self) -> Deferred[None]:
        self.events.append("stop listening")
        return succeed(None)


class DrainTests(SynchronousTestCase):
    """The steps of a stop, on a clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[str] = []
        self.connections = Connections()
        self.lines: list[str] = []

        def observe(event: LogEvent) -> None:
            self.lines.append(formatEvent(event))

        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def connect(self, stubborn: bool = False) -> _Connection:
        connection = _Connection(self.connections, self.events, stubborn)
        self.connections.add(connection)
        return connection

    def drain(self, flushed: Deferred[None]) -> Deferred[None]:
        def leave() -> Deferred[None]:
            self.events.append("leave")
            return succeed(None)

        port = cast(IListeningPort, _Port(self.events))
        return Deferred.fromCoroutine(
            Drain(self.clock, 10).run([port], leave, self.connections, lambda: flushed)
        )

    def test_in_order_and_at_once(self) -> None:
        """
        The relay stops listening, leaves the deployment, then closes every
        connection with 1001; once they are closed and the store has flushed,
        it is done, without waiting for the timeout.
        """
        first, second = self.connect(), self.connect()
        flushed: Deferred[None] = Deferred()
        done = self.drain(flushed)
        self.assertEqual(self.events, ["stop listening", "leave", "close", "close"])
        self.assertEqual((first.code, second.code), (1001, closecodes.GOING_AWAY))
        self.assertNoResult(done)
        flushed.callback(None)
        self.successResultOf(done)
        self.assertIn(
            "relay stopped: WebSockets closed with 1001 (going away): 2, "
            "dropped at the drain timeout: 0",
            self.lines,
        )

    def test_stragglers_dropped_at_the_timeout(self) -> None:
        """
        A connection that does not close is dropped when the drain timeout is
        up; a store that has not flushed by then is waited for no longer, and
        that is said.
        """
        self.connect()
        self.connect(stubborn=True)
        done = self.drain(Deferred())
        self.clock.advance(9.9)
        self.assertNoResult(done)
        self.assertNotIn("abort", self.events)
        self.clock.advance(0.1)
        self.successResultOf(done)
        self.assertEqual(self.events[-1], "abort")
        self.assertIn("(going away): 1, dropped at the drain timeout: 1", self.lines[-2])
        self.assertIn("not finished writing within --drain-timeout (10 s)", self.lines[-1])


class RestartTests(TestCase):
    """A relay process restarted with SIGTERM during a 50 MB output, a bridge and an IDE."""

    timeout = 300

    async def test_sigterm_mid_stream(self) -> None:
        """
        The relay gets SIGTERM while a command prints 50 MB: it closes the
        bridge's and the IDE's WebSockets with 1001, drops none, and exits 0.
        A new relay on the same port and state directory gets the bridge
        back promptly: its first backoff step is made 45 s here, and it
        reconnects well within half of that after the new relay listens
        (prompt attempts are at most 1 s apart).  The IDE resumes; every line
        arrives exactly once, in order.
        """
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        state = FilePath(self.mktemp())
        relays = [await start_child_relay(state, "--drain-timeout=60")]
        self.addCleanup(lambda: Deferred.fromCoroutine(relays[-1].child.stop()))
        browser = Browser(relays[0].as_service())
        await browser.open_page()
        config = await pair_bridge(browser, FilePath(self.mktemp()), io.StringIO())
        bridge = await start_bridge(config)
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(bridge)))
        bridge.reconnect.initial_delay = 30.0
        bridge.reconnect.max_delay = 300.0
        first_step = 30.0 * 1.5  # backoffPolicy's first delay, before its jitter
        ide = ResumingIDE(browser)
        await ide.connect()
        assert ide.connection is not None
        start = control(Kind.CMD_START, {"argv": ["seq", "1", str(LINES)]}, stream=STREAM, peer=1)
        ide.connection.send(start)
        await ide.reached(10_000_000).addTimeout(120, reactor)

        old_bridge, old_ide = bridge.protocol, ide.connection
        assert old_bridge is not None
        os.kill(relays[0].pid, signal.SIGTERM)
        await relays[0].child.ended
        reason = relays[0].child.reason
        assert reason is not None
        self.assertIsInstance(reason.value, ProcessDone)  # exit status 0
        output = relays[0].child.output.decode()
        self.assertIn(
            "WebSockets closed with 1001 (going away): 2, dropped at the drain timeout: 0", output
        )
        self.assertNotIn("Traceback", output)
        self.assertEqual(old_bridge.relay_close_code, closecodes.GOING_AWAY)
        self.assertEqual(old_ide.close_code, closecodes.GOING_AWAY)

        listen = f"--listen=tcp:{relays[0].port.port}:interface=127.0.0.1"
        relays.append(await start_child_relay(state, listen))
        listening = reactor.seconds()
        await bridge.when_connected()
        gap = reactor.seconds() - listening
        self.assertLess(gap, first_step / 2)
        await ide.connect()
        end = await ide.exit.addTimeout(240, reactor)
        self.assertEqual(end.json()["exit_code"], 0)
        self.assertEqual(ide.gaps, [])
        expected = expected_output()
        self.assertEqual(len(ide.data), len(expected))
        self.assertEqual(hashlib.sha256(ide.data).digest(), hashlib.sha256(expected).digest())
        print(f"reconnect gap after the new relay listened: {gap:.2f} s", flush=True)


class TwistdTests(TestCase):
    """C{twistd -n coder1-relay} itself."""

    timeout = 60

    async def test_sigterm_exits_zero(self) -> None:
        """
        SIGTERM stops C{twistd -n coder1-relay} with exit status 0 (not
        "killed by SIGTERM", as twistd reports by default), after its drain.
        """
        proto = Collect(r"coder1 relay at https://localhost:(\d+)")
        process = spawn(
            proto,
            [
                TWISTD,
                "-n",
                "--pidfile=",
                "coder1-relay",
                "--listen=tcp:0:interface=127.0.0.1",
                f"--state-dir={self.mktemp()}",
                "--drain-timeout=5",
            ],
        )
        found = await proto.matched
        # An answered connection: the reactor runs, so its SIGTERM handler is in place.
        await deferToThread(ssl.get_server_certificate, ("127.0.0.1", int(found.group(1))))
        process.signalProcess(signal.SIGTERM)
        self.assertEqual(await proto.ended, 0, proto.output.decode())
        self.assertIn(b"relay stopped: WebSockets closed with 1001 (going away): 0", proto.output)


class OptionTests(SynchronousTestCase):
    """C{--drain-timeout}."""

    def test_drain_timeout(self) -> None:
        """It defaults to 10 s, takes fractions and 0, and refuses a negative number."""
        self.assertEqual(Options().settings().drain_timeout, 10.0)
        options = Options()
        options.parseOptions(["--drain-timeout=2.5"])
        self.assertEqual(options.settings().drain_timeout, 2.5)
        options.parseOptions(["--drain-timeout=0"])
        self.assertEqual(options.settings().drain_timeout, 0)
        error = self.assertRaises(UsageError, Options().parseOptions, ["--drain-timeout=-1"])
        self.assertEqual(str(error), "--drain-timeout must be 0 or more")
